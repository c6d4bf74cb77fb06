"""Train one ResNet config: in this process (`--local`) or as DDP on Ray Train.

    python jobs/train.py --local --model resnet20 --epochs 4 --data data/cifar10
    python jobs/train.py --workers 2 --model resnet20 --epochs 4 --data data/cifar10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cluster.resources import check_workers
from cluster.tracking import check_mlflow_uri
from termui.cli import add_config_args, config_from_args, die, job_parser
from resnet_dist import storage
from resnet_dist.config import TRAIN_PRESETS, ConfigError, RunConfig
from resnet_dist.data import DataError, read_manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__, ray=True)
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="default",
                   help="base settings: default = the 4-epoch recipe, quick = it for 1 epoch on 5,000 images, gpu94 = ResNet-9 for 94%% on one GPU "
                        "(default: %(default)s)")
    p.add_argument("--run-dir", help="output directory or URI, e.g. s3://bucket/runs/r1 (default: runs/train-<time>)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--min-workers", type=int, default=0, help="elastic: after a lost node, go on with this many or more (0 = fixed)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0 = its CPU share)")
    p.add_argument("--cpus-per-worker", type=float, help="logical CPUs per Ray Train worker (default: a share that leaves one CPU for Ray Data)")
    p.add_argument("--data-path", choices=["auto", "pipeline", "device"], default="auto",
                   help="Ray Data augments each epoch (pipeline) or workers augment on their device (default: device on GPU)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts allowed (default: %(default)s)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: a file store in RUN_DIR/mlruns; off = none)")
    p.add_argument("--restart", action="store_true",
                   help="start afresh when RUN_DIR holds a run of another config (its files are kept aside)")
    add_config_args(p, base=RunConfig().replace(**TRAIN_PRESETS["default"]))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args, RunConfig().replace(**TRAIN_PRESETS[args.preset]))
        read_manifest(cfg.data.data_dir)   # fail fast on missing or corrupt data
        check_mlflow_uri(args.mlflow_uri)
        check_workers(args.workers, args.min_workers)   # before connecting to Ray
        if args.run_dir and storage.is_uri(args.run_dir):
            storage.Mirror(args.run_dir).check_writable()
    except (ConfigError, DataError) as e:
        die(str(e))
    # Absolute once, here: Ray Train's controller and workers run in other directories.
    cfg = cfg.replace(data={"data_dir": str(Path(cfg.data.data_dir).resolve())})
    run_dir = storage.resolve(args.run_dir or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        if args.local:
            from cluster.local_train import run_local

            summary = run_local(cfg, run_dir, args.threads, args.mlflow_uri, args.restart)
        else:
            from cluster.runtime import set_verbose
            from cluster.train import run_distributed

            set_verbose(args.verbose)
            summary = run_distributed(cfg, run_dir, args.workers, args.threads, args.cpus_per_worker,
                                      args.max_failures, args.data_path, args.mlflow_uri, args.restart, args.min_workers)
    except ConfigError as e:
        die(str(e))
    from termui.console import console, print_eval_report

    print_eval_report(summary["test"], "test (best val checkpoint)")
    console.print(f"mean throughput {summary['mean_images_per_s']:.0f} img/s; outputs in {run_dir}")


if __name__ == "__main__":
    main()
