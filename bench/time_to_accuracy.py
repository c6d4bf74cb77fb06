"""Time to a test accuracy (94% by default) of a `jobs/train.py` preset, airbench-style.

    python bench/time_to_accuracy.py --data data/cifar10                      # the gpu94 preset
    python bench/time_to_accuracy.py --data data/cifar10 --preset default --target 0.80
    python bench/time_to_accuracy.py --dry-run                                # tiny data, 2 steps (CPU tests)

Uses resnet_dist alone (no Ray). The clock counts training steps only, as airbench does:
process start, data loading (the whole split is moved to the device first), torch.compile's
warm-up (a few steps on a copy of the state, then the state is put back) and the per-epoch
test evaluation are outside it. The test split is evaluated after every epoch (flip TTA as the
preset says) to find the first epoch at or above the target; that epoch's cumulative training
time is the figure. Prints one line per epoch and a final JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from anywhere without installing the package (the GPU machine)

from resnet_dist.config import TRAIN_PRESETS, RunConfig  # noqa: E402
from resnet_dist.engine import evaluate, select_device, train_epoch  # noqa: E402
from resnet_dist.loader import ArrayLoader  # noqa: E402
from resnet_dist.models import count_parameters  # noqa: E402
from resnet_dist.parquet import read_manifest, read_split  # noqa: E402
from resnet_dist.prepare import prepare_dataset  # noqa: E402
from resnet_dist.training import build_training  # noqa: E402

WARMUP_STEPS = 3   # compile and cuDNN autotuning happen here, off the clock


def make_tiny_dataset(root: Path) -> Path:
    """4 classes of noise at 4 brightness levels (96 train PNGs less 16 for val, 16 test), as Parquet."""
    from PIL import Image

    rng = np.random.default_rng(0)
    src = root / "src"
    for split, n in (("train", 24), ("test", 4)):
        for c in range(4):
            d = src / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32, 3)) + 50 * c
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    prepare_dataset(src, root / "prepared", val_size=16, seed=0)
    return root / "prepared"


def run(cfg: RunConfig, target: float, device: torch.device, max_steps: int = 0) -> dict:
    manifest = read_manifest(cfg.data.data_dir)
    mean, std, classes = manifest["mean"], manifest["std"], manifest["classes"]
    cfg = cfg.replace(model={"num_classes": len(classes)})
    train, test = read_split(cfg.data.data_dir, "train"), read_split(cfg.data.data_dir, "test")
    n = cfg.data.train_subset or len(train.labels)
    loader = ArrayLoader.from_numpy(train.images[:n], train.labels[:n], device=device, batch_size=cfg.train.batch_size,
                                    mean=mean, std=std, data=cfg.data, train=True, seed=cfg.train.seed)
    test_loader = ArrayLoader.from_numpy(test.images, test.labels, device=device,
                                         batch_size=cfg.train.eval_batch_size, mean=mean, std=std)
    torch.manual_seed(cfg.train.seed)
    state = build_training(cfg, cfg.model, len(loader), device)

    # Warm-up off the clock on the real state, then put weights, optimizer and schedule back.
    saved = copy.deepcopy((state.model.state_dict(), state.optimizer.state_dict(), state.scheduler.state_dict()))
    t0 = time.perf_counter()
    warm = [next(iter(loader)) for _ in range(min(WARMUP_STEPS, len(loader)))]
    train_epoch(state.model, warm, state.optimizer, state.scheduler, state.loss_fn, device, state.precision,
                state.scaler, cfg.train.grad_accum)
    evaluate(state.model, [next(iter(test_loader))], len(classes), device, state.precision, cfg.train.eval_flip_tta)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    state.model.load_state_dict(saved[0])
    state.optimizer.load_state_dict(saved[1])
    state.scheduler.load_state_dict(saved[2])

    print(f"{cfg.model.flavor} ({count_parameters(state.model) / 1e6:.2f} M parameters), {n} train images, "
          f"batch {cfg.train.batch_size}, {cfg.train.epochs} epochs, precision {state.precision}, "
          f"compile {cfg.train.compile}; warm-up {warmup_s:.1f} s (not counted)", flush=True)
    train_s, reached, epochs = 0.0, None, []
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        batches = loader if not max_steps else [b for _, b in zip(range(max_steps), loader)]
        _sync(device)
        t0 = time.perf_counter()
        stats = train_epoch(state.model, batches, state.optimizer, state.scheduler, state.loss_fn, device,
                            state.precision, state.scaler, cfg.train.grad_accum)
        _sync(device)
        train_s += time.perf_counter() - t0
        acc = evaluate(state.model, test_loader, len(classes), device, state.precision, cfg.train.eval_flip_tta).accuracy
        epochs.append({"epoch": epoch + 1, "train_s": round(train_s, 3), "test_acc": acc,
                       "images_per_s": round(stats.images / max(1e-9, stats.seconds), 1),
                       "step_ms": round(1000 * stats.step_seconds, 2)})
        print(f"epoch {epoch + 1:3d}  train {train_s:8.2f} s  {epochs[-1]['images_per_s']:9.0f} img/s  "
              f"step {epochs[-1]['step_ms']:7.2f} ms  test acc {acc:.4f}", flush=True)
        if reached is None and acc >= target:
            reached = epochs[-1]
    return {"flavor": cfg.model.flavor, "target": target, "time_to_target_s": reached["train_s"] if reached else None,
            "epoch_reached": reached["epoch"] if reached else None, "final_test_acc": epochs[-1]["test_acc"],
            "train_s": round(train_s, 3), "warmup_s": round(warmup_s, 2), "epochs": epochs}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/cifar10", help="prepared Parquet data (jobs/prepare_data.py)")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="gpu94")
    p.add_argument("--target", type=float, default=0.94, help="test accuracy to reach (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny made-up data, 1 epoch of 2 steps at batch 16, no compile: checks the path, not the speed")
    args = p.parse_args(argv)
    overrides = TRAIN_PRESETS[args.preset]
    cfg = RunConfig().replace(**overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if args.dry_run:
            data = make_tiny_dataset(Path(tmp))
            cfg = cfg.replace(data={"data_dir": str(data)},
                              train={"epochs": 1, "batch_size": 16, "compile": False, "eval_batch_size": 16})
        else:
            if not (Path(args.data) / "manifest.json").is_file():
                sys.exit(f"error: no prepared data at {args.data} (run jobs/prepare_data.py first)")
            cfg = cfg.replace(data={"data_dir": str(args.data)}, **({"train": {"epochs": args.epochs}} if args.epochs else {}))
        result = run(cfg, args.target, select_device(), max_steps=2 if args.dry_run else 0)
    print(json.dumps({"preset": args.preset, "dry_run": args.dry_run, **result}))


if __name__ == "__main__":
    main()
