"""Convert CIFAR-10 (pickled batches, an image folder or a tar archive of one) to Parquet shards.

    python jobs/prepare_data.py ../shared/datasets/cifar10-jpeg.tar.xz data/cifar10

Writes OUT/{train,val,test}/part-*.parquet and OUT/manifest.json; re-running
with the same source and options is a no-op. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from termui.cli import die, job_parser
from resnet_dist.arrays import DataError
from resnet_dist.constants import DEFAULT_VAL_SIZE
from resnet_dist.prepare import prepare_dataset


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser(__doc__)
    p.add_argument("source", help="cifar-10-batches-py dir, image folder ROOT/{train,test}/<class>/ or a .tar[.gz|.xz]")
    p.add_argument("out_dir", help="output directory (created atomically)")
    p.add_argument("--val-size", type=positive_int, default=DEFAULT_VAL_SIZE, help="images held out of train for val")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split and the train shuffle")
    p.add_argument("--resize", type=positive_int, default=None, metavar="N", help="convert images to RGB NxN (bicubic)")
    p.add_argument("--rows-per-shard", type=positive_int, default=5000, help="images per Parquet file")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds a different data set")
    return p.parse_args(argv)


def summary(manifest: dict, out_dir: str) -> Table:
    shape = "x".join(map(str, manifest["image_shape"]))
    table = Table(title=f"{out_dir}  ({len(manifest['classes'])} classes, images {shape})")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("per class (min-max)", justify="right")
    for split, count in manifest["counts"].items():
        per_class = manifest["class_counts"][split].values()
        table.add_row(split, f"{count:,}", f"{min(per_class):,}-{max(per_class):,}")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Progress goes to stdout so that stderr carries only the one-line error.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        manifest = prepare_dataset(args.source, args.out_dir, val_size=args.val_size, seed=args.seed,
                                   resize=args.resize, rows_per_shard=args.rows_per_shard, force=args.force)
    except (DataError, OSError) as exc:
        die(str(exc))
    console = Console()
    console.print(summary(manifest, args.out_dir))
    console.print(f"train mean {manifest['mean']}, std {manifest['std']} (pixels in [0, 1])")
    console.print(f"fingerprint {manifest['fingerprint']}", soft_wrap=True)


if __name__ == "__main__":
    main()
