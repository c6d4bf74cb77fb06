"""The one-process path: the training loop fed from memory, its sink writing files.

`train_local` is the local twin of a Ray Train run (cluster/train.py): the same RunSpec,
the same `run_loop`, the same checkpoints; `fit_local` and `finetune_local` add the same
wrap-up as the Ray path (resnet_dist.outputs, resnet_dist.finetune).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from resnet_dist.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, save_checkpoint
from resnet_dist.config import FinetuneConfig, RunConfig
from resnet_dist.data import ensure_prepared, read_manifest, read_split
from resnet_dist.engine import select_device
from resnet_dist.finetune import finish_finetune, plan_finetune
from resnet_dist.identity import claim, run_identity
from resnet_dist.loader import ArrayLoader
from resnet_dist.outputs import wrap_up, write_json
from resnet_dist.spec import RunSpec
from resnet_dist.training import Position, Sink, Sinks, build_state, restore_training, run_loop

METRICS_FILE = "metrics.json"
# A run's own epoch checkpoints under a fine-tuning output directory, where Ray Train keeps its
# (STORAGE/train/finetune); a fine-tuning directory may be a sweep's, whose best.pt is the
# selected trial and must not be overwritten.
FINETUNE_RUN_DIR = Path("train") / "finetune"


def loader_seed(seed: int, rank: int = 0) -> int:
    """Shuffle and augmentation seed of one rank's in-memory loader: rank 0 of a Ray run draws
    what the local run draws (the parity tests compare them)."""
    return seed + 1000 * rank


class DirSink(Sink):
    """The local run's sink: last.pt at every report, best.pt on a new best val accuracy, and
    the history so far in metrics.json (the wrap-up rewrites it with the test report)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)

    def report(self, record: dict[str, Any], history: list[dict[str, Any]], checkpoint: Callable[[], dict]) -> None:
        ckpt = checkpoint()
        save_checkpoint(ckpt, self.run_dir / LAST_CHECKPOINT)
        if record["val_acc"] > max((r["val_acc"] for r in history[:-1]), default=-1.0):
            save_checkpoint(ckpt, self.run_dir / BEST_CHECKPOINT)
        write_json(self.run_dir / METRICS_FILE, {"history": history})


@functools.lru_cache(maxsize=4)
def _split_arrays(data_dir: str, split: str, fingerprint: str):
    return read_split(data_dir, split)


def read_split_once(data_dir: str | os.PathLike, split: str):
    """`read_split`, kept for this process's later runs on the same data: a sweep's trial
    processes are reused (cluster/trial.py), so each reads CIFAR-10 once (~1 s), not once per
    trial and resume. Keyed on the manifest's fingerprint: re-prepared data is read afresh.
    The arrays are shared: loaders slice them and never write to them."""
    return _split_arrays(str(Path(data_dir).resolve()), split, read_manifest(data_dir)["fingerprint"])


def train_loader(spec: RunSpec, device: torch.device, rank: int = 0, world: int = 1) -> ArrayLoader:
    """The augmenting in-memory loader of rank `rank` of `world`: the union of `spec.train_splits`
    (`train_subset` applied), of which each rank takes an equal contiguous share (train_images //
    world: every rank runs the same number of steps, as DDP needs), at the per-rank batch size.
    Read straight from the Parquet shards; rank 0 of 1 is the local run's loader."""
    cfg = spec.run
    parts = [read_split_once(cfg.data.data_dir, s) for s in spec.train_splits]
    images = np.concatenate([p.images for p in parts]) if len(parts) > 1 else parts[0].images
    labels = np.concatenate([p.labels for p in parts]) if len(parts) > 1 else parts[0].labels
    share = spec.train_images // world
    mine = slice(rank * share, (rank + 1) * share)
    return ArrayLoader.from_numpy(images[mine], labels[mine], batch_size=cfg.train.batch_size // world,
                                  data=cfg.data, train=True, seed=loader_seed(cfg.train.seed, rank),
                                  mean=spec.mean, std=spec.std, device=device)


def val_loader(spec: RunSpec, device: torch.device, rank: int = 0, world: int = 1) -> ArrayLoader:
    """The normalising loader of rank `rank`'s share of val: every world-th image, so each image
    counts once over all ranks (5,000 CIFAR-10 images are 15 MB of uint8)."""
    val = read_split_once(spec.run.data.data_dir, "val")
    images, labels = val.images, val.labels
    if 0 < spec.run.train.val_subset < len(labels):
        # Evenly spaced, not the first N: prepared val is stored class by class (the first half of
        # CIFAR-10's is classes 0-4), so spacing keeps every class in its share.
        keep = np.linspace(0, len(labels) - 1, spec.run.train.val_subset).round().astype(np.int64)
        images, labels = images[keep], labels[keep]
    return ArrayLoader.from_numpy(images[rank::world], labels[rank::world],
                                  batch_size=spec.run.train.eval_batch_size, mean=spec.mean, std=spec.std,
                                  device=device)


def train_local(spec: RunSpec, run_dir: str | os.PathLike, sink: Sink | None = None,
                resume: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run `spec` in this process, writing last.pt/best.pt into `run_dir`; with `resume`, an
    existing last.pt there is continued from. Returns (the checkpoint the run delivers: its
    last when it trained on val, else its best on val; the history)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = select_device()
    spec.steps_per_epoch()   # a clear error when there is not one batch
    train, val = train_loader(spec, device), val_loader(spec, device)
    state = build_state(spec, device, len(train))
    start, history = Position(), []
    if resume and (run_dir / LAST_CHECKPOINT).exists():
        start, history = restore_training(state, load_checkpoint(run_dir / LAST_CHECKPOINT))

    def train_batches(epoch: int) -> ArrayLoader:
        train.set_epoch(epoch)
        return train

    history = run_loop(state, spec, train_batches, lambda: val, Sinks(DirSink(run_dir), sink),
                       len(train), start, history)
    delivered = load_checkpoint(run_dir / (LAST_CHECKPOINT if spec.selects_last else BEST_CHECKPOINT))
    return delivered, history


def fit_local(cfg: RunConfig, run_dir: str | os.PathLike, sink: Sink | None = None,
              resume: bool = True, restart: bool = False) -> dict[str, Any]:
    """Train one config in this process from the Parquet shards in `cfg.data.data_dir`; writes
    last.pt, best.pt (with test_acc) and metrics.json into `run_dir`. A run directory of another
    config is refused (resnet_dist.identity; `restart` sets its files aside). Returns the summary."""
    spec = RunSpec.from_manifest(cfg, read_manifest(cfg.data.data_dir))
    claim(run_dir, run_identity(cfg.to_dict(), spec.fingerprint), "run", restart)
    best, history = train_local(spec, run_dir, sink, resume)
    return wrap_up(run_dir, best, history, cfg.data.data_dir, checkpoint_name=BEST_CHECKPOINT,
                   summary_name=METRICS_FILE, flip_tta=cfg.train.eval_flip_tta)


def finetune_local(source: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
                   ft: FinetuneConfig, sink: Sink | None = None) -> dict[str, Any]:
    """jobs/finetune.py --local: fine-tune the checkpoint `source` on `data` (prepared Parquet,
    or an image folder/archive, prepared into out_dir/finetune-data first) in this process.
    Writes what the Ray path writes (resnet_dist.outputs); returns finetune.json's content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_prepared(data, out / "finetune-data")
    plan = plan_finetune(source, data_dir, out, ft)
    tuned, history = train_local(plan.spec, out / FINETUNE_RUN_DIR, sink, resume=False)
    return finish_finetune(out, plan, tuned, history)
