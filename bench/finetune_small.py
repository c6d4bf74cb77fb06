"""Fine-tuning on a user's own small data set, measured: a made-up 10-class folder of 32x32
shapes and textures (random colours, positions, sizes and noise; 150 train and 36 test images
per class), then `jobs/finetune.py --local` with its default options from a checkpoint.

    python bench/finetune_small.py --checkpoint runs/sweep                 # the defaults
    python bench/finetune_small.py --checkpoint runs/sweep -- --mode head  # extra jobs/finetune.py options

Prints the linear probe ("before": a linear head on the frozen backbone), the fine-tuned test
accuracy ("after"), the wall time, and one JSON line. `make_shapes_folder` is also what the
tests use (tests/unit/test_finetune_small.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "triangle", "cross", "ring", "hbars", "vbars", "diagonal", "checker", "dots")


def _mask(name: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Where the foreground goes: a shape at a random place and size, or a texture patch."""
    yy, xx = np.mgrid[:size, :size].astype(float)
    cy, cx = rng.uniform(11, 21, 2)
    r = rng.uniform(6, 10)
    dy, dx = yy - cy, xx - cx
    if name == "circle":
        return np.hypot(dy, dx) < r
    if name == "square":
        return (abs(dy) < r * 0.85) & (abs(dx) < r * 0.85)
    if name == "triangle":
        return (dy > -r) & (dy < r * 0.8) & (abs(dx) < (dy + r) * 0.6)
    if name == "cross":
        return ((abs(dy) < r * 0.3) & (abs(dx) < r)) | ((abs(dx) < r * 0.3) & (abs(dy) < r))
    if name == "ring":
        d = np.hypot(dy, dx)
        return (d < r) & (d > r * 0.55)
    patch = (abs(dy) < r + 3) & (abs(dx) < r + 3)
    period = rng.integers(3, 6)
    phase = rng.integers(0, period)
    texture = {
        "hbars": (yy.astype(int) + phase) % period < period / 2,
        "vbars": (xx.astype(int) + phase) % period < period / 2,
        "diagonal": (yy.astype(int) + xx.astype(int) + phase) % period < period / 2,
        "checker": ((yy.astype(int) // 2 + xx.astype(int) // 2) % 2) == 0,
        "dots": ((yy.astype(int) + phase) % period == 0) & ((xx.astype(int) + phase) % period == 0),
    }[name]
    return patch & texture


def make_image(name: str, rng: np.random.Generator) -> np.ndarray:
    background = rng.uniform(0, 255, 3)
    foreground = (background + rng.uniform(90, 165, 3) * rng.choice([-1, 1], 3)) % 256
    img = np.where(_mask(name, rng)[..., None], foreground, background) + rng.normal(0, 18, (32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_shapes_folder(root: str | Path, train_per_class: int = 150, test_per_class: int = 36, seed: int = 0,
                       classes: tuple[str, ...] = CLASSES) -> Path:
    """ROOT/{train,test}/<class>/NNN.png, as a user's own folder would be laid out."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(make_image(name, rng)).save(d / f"{i:03d}.png")
    return root


# Other class groupings of CIFAR-10: 5 classes of 2 CIFAR classes each.
CIFAR_GROUPS = {"air_sea": ("airplane", "ship"), "road": ("automobile", "truck"), "bird_frog": ("bird", "frog"),
                "cat_dog": ("cat", "dog"), "deer_horse": ("deer", "horse")}


def make_cifar_groups_folder(root: str | Path, cifar_dir: str | Path, train_per_class: int = 300,
                             test_per_class: int = 200, seed: int = 0) -> Path:
    """A 5-class folder from prepared CIFAR-10 (jobs/prepare_data.py): train images from its
    train split, test images from its test split (which no model selection here ever used)."""
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from resnet_dist.parquet import read_split

    root, rng = Path(root), np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        arrays = read_split(cifar_dir, split)
        for group, members in CIFAR_GROUPS.items():
            ids = [arrays.classes.index(m) for m in members]
            pool = np.flatnonzero(np.isin(arrays.labels, ids))
            d = root / split / group
            d.mkdir(parents=True, exist_ok=True)
            for i, j in enumerate(rng.choice(pool, n, replace=False)):
                Image.fromarray(arrays.images[j]).save(d / f"{i:03d}.png")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/sweep", help="what to fine-tune (jobs/finetune.py --checkpoint)")
    p.add_argument("--workdir", help="where the folder and the outputs go (default: a temp dir)")
    p.add_argument("--cifar-groups", metavar="CIFAR_DIR",
                   help="instead of the shapes: 5 groupings of CIFAR-10 classes (1,500 train, 1,000 test images) "
                        "from this prepared CIFAR-10")
    p.add_argument("extra", nargs="*", help="more jobs/finetune.py options, after --")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-small-"))
    folder = (make_cifar_groups_folder(work / "cifar-groups", args.cifar_groups) if args.cifar_groups
              else make_shapes_folder(work / "shapes"))
    out = work / "out"
    cmd = [sys.executable, str(REPO / "jobs" / "finetune.py"), "--local", "--checkpoint", args.checkpoint,
           "--data", str(folder), "--out", str(out), "--mlflow-uri", "off", *args.extra]
    print(" ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"error: jobs/finetune.py failed: {(run.stderr or run.stdout).strip().splitlines()[-1:]}")
    summary = json.loads((out / "finetune.json").read_text())
    before, after = summary["before"]["accuracy"], summary["after"]["accuracy"]
    epochs = len(summary["history"])
    print(f"{len(summary['after']['classes'])} classes, {summary['config']['train']['batch_size']} batch, {epochs} epochs: "
          f"before ({summary['before_kind']}) {before:.2%}, after {after:.2%}, {seconds:.0f} s wall")
    print(json.dumps({"before": before, "before_kind": summary["before_kind"], "after": after, "epochs": epochs,
                      "batch_size": summary["config"]["train"]["batch_size"], "seconds": round(seconds, 1),
                      "options": args.extra}))


if __name__ == "__main__":
    main()
