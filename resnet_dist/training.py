"""Building blocks of a training run, shared by the one-process trainer
(`fit_local`) and the Ray Train worker loop (`cluster/train.py`)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from resnet_dist.checkpoint import (
    build_checkpoint, default_file_mode, load_checkpoint, model_from_checkpoint, restore_rng_state, save_checkpoint,
    unwrap,
)
from resnet_dist.config import ConfigError, ModelConfig, RunConfig
from resnet_dist.data import read_manifest, read_split
from resnet_dist.engine import (
    EpochStats, EvalResult, Precision, build_optimizer, build_scheduler, evaluate, make_grad_scaler,
    select_device, select_precision, train_epoch,
)
from resnet_dist.loader import ArrayLoader
from resnet_dist.metrics import classification_report
from resnet_dist.models import build_model

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


@dataclass
class TrainingState:
    """What a training loop mutates: a plain container, the logic lives in functions."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    precision: Precision
    device: torch.device


def build_training(
    cfg: RunConfig,
    model_cfg: ModelConfig,
    steps_per_epoch: int,
    device: torch.device,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    model: nn.Module | None = None,
    lr_scale: Callable[[str], float] | None = None,
) -> TrainingState:
    """Model (built from `model_cfg` unless given), optimizer, per-step schedule, AMP scaler and loss.

    `wrap` turns the device-placed model into its distributed form (DDP).
    """
    precision = select_precision(cfg.train, device)
    model = (model if model is not None else build_model(model_cfg)).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The optimizer sees the bare parameters; DDP/compile wrappers share them.
    optimizer = build_optimizer(model, cfg.optim, lr_scale)
    if wrap is not None:
        model = wrap(model)
    if cfg.train.compile:
        model = torch.compile(model)
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs),
        scaler=make_grad_scaler(precision, device),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
        precision=precision,
        device=device,
    )


def restore_training(state: TrainingState, ckpt: dict[str, Any]) -> int:
    """Load weights, optimizer, scheduler and RNG from a checkpoint; returns the next epoch (0-based)."""
    unwrap(state.model).load_state_dict(ckpt["model_state"])
    if ckpt.get("optimizer_state") is not None:
        state.optimizer.load_state_dict(ckpt["optimizer_state"])
    if ckpt.get("scheduler_state") is not None:
        state.scheduler.load_state_dict(ckpt["scheduler_state"])
    restore_rng_state(ckpt["rng_state"])
    return int(ckpt["epoch"])


def epoch_record(epoch: int, stats: EpochStats, val: EvalResult, lr: float) -> dict[str, float]:
    """One row of the training history; `epoch` counts from 1."""
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_acc": stats.accuracy,
        "val_loss": val.loss,
        "val_acc": val.accuracy,
        "lr": lr,
        "images": stats.images,           # all ranks together
        "images_per_s": stats.images_per_second,
        "epoch_s": stats.seconds,
        "step_s": stats.step_seconds,
        "data_wait_frac": stats.data_wait_fraction,
    }


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic, durable JSON write: a unique temp file beside `path` (two writers never share
    one), fsync, then rename, so a reader never sees half a file, even after a crash. NaN and
    infinities (e.g. "before" accuracy where the classes differ) are written as null: JSON has
    no NaN, and other readers refuse it."""
    path = Path(path)
    text = json.dumps(_finite(obj), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())   # mkstemp makes 0600; others on shared storage may read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x



class TrainingHooks:
    """Progress callbacks of `fit_local`; the default does nothing (the CLI shows rich output)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, step: int, images: int) -> None: ...
    def epoch_end(self, record: dict[str, float], history: list[dict[str, float]]) -> None: ...


def fit_local(cfg: RunConfig, run_dir: str | os.PathLike, hooks: TrainingHooks | None = None, resume: bool = True) -> dict[str, Any]:
    """Train one config in this process from the Parquet shards in `cfg.data.data_dir`.

    Writes `last.pt` every epoch, `best.pt` whenever validation accuracy improves,
    and `metrics.json` (history + final test report) into `run_dir`. With
    `resume`, an existing `last.pt` there is continued from. Returns the summary
    that `metrics.json` holds.
    """
    hooks = hooks or TrainingHooks()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cfg.data.data_dir)
    classes = manifest["classes"]
    mean, std = manifest["mean"], manifest["std"]
    model_cfg = ModelConfig(**{**cfg.model.__dict__, "num_classes": len(classes)})
    torch.manual_seed(cfg.train.seed)
    device = select_device()

    train_loader, val_loader, test_loader = load_loaders(cfg, mean, std, device)
    state = build_training(cfg, model_cfg, len(train_loader), device)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume and (run_dir / LAST_CHECKPOINT).exists():
        ckpt = load_checkpoint(run_dir / LAST_CHECKPOINT)
        start_epoch = restore_training(state, ckpt)
        history = list(ckpt["extra"].get("history", []))

    def checkpoint(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return build_checkpoint(
            state.model, model_config=model_cfg, run_config=cfg.to_dict(), classes=classes, mean=mean, std=std,
            data_fingerprint=manifest["fingerprint"], epoch=epoch, metrics=metrics,
            optimizer=state.optimizer, scheduler=state.scheduler, extra={"history": history},
        )

    run_epochs(state, cfg, train_loader, val_loader, len(classes), run_dir, checkpoint, history, start_epoch, hooks)
    best = load_checkpoint(run_dir / BEST_CHECKPOINT)
    unwrap(state.model).load_state_dict(best["model_state"])
    test_result = evaluate(state.model, test_loader, len(classes), device, state.precision, cfg.train.eval_flip_tta)
    best["metrics"]["test_acc"] = test_result.accuracy   # serving reports it (GET /v1/model)
    save_checkpoint(best, run_dir / BEST_CHECKPOINT)
    return write_summary(run_dir, cfg, history, best, test_result)


def load_loaders(cfg: RunConfig, mean: Sequence[float], std: Sequence[float],
                 device: torch.device) -> tuple[ArrayLoader, ArrayLoader, ArrayLoader]:
    """In-memory train (augmented, `train_subset` applied), val and test loaders of `cfg.data.data_dir`."""
    train = read_split(cfg.data.data_dir, "train")
    n = cfg.data.train_subset or len(train.labels)
    if min(n, len(train.labels)) < cfg.train.batch_size:
        raise ConfigError(f"train split has {min(n, len(train.labels))} images, fewer than one batch of "
                          f"{cfg.train.batch_size}; lower the batch size")
    val = read_split(cfg.data.data_dir, "val")
    test = read_split(cfg.data.data_dir, "test")
    common = {"mean": mean, "std": std, "device": device}
    return (
        ArrayLoader.from_numpy(train.images[:n], train.labels[:n], batch_size=cfg.train.batch_size, data=cfg.data,
                               train=True, seed=cfg.train.seed, **common),
        ArrayLoader.from_numpy(val.images, val.labels, batch_size=cfg.train.eval_batch_size, **common),
        ArrayLoader.from_numpy(test.images, test.labels, batch_size=cfg.train.eval_batch_size, **common),
    )


def run_epochs(
    state: TrainingState, cfg: RunConfig, train_loader: ArrayLoader, val_loader: ArrayLoader, num_classes: int,
    run_dir: Path, checkpoint: Callable[[int, dict[str, Any]], dict[str, Any]], history: list[dict[str, float]],
    start_epoch: int = 0, hooks: TrainingHooks | None = None, train_mode: Callable[[nn.Module], None] | None = None,
) -> list[dict[str, float]]:
    """The one-process epoch loop: train, validate, append to `history`, write
    `last.pt` every epoch and `best.pt` on a new best validation accuracy, stop early
    after `early_stop_patience` epochs without one. `checkpoint(epoch, record)` builds the dict."""
    hooks = hooks or TrainingHooks()
    best_acc = max((r["val_acc"] for r in history), default=-1.0)
    stale = 0
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        hooks.epoch_start(epoch + 1, cfg.train.epochs, len(train_loader))
        stats = train_epoch(state.model, train_loader, state.optimizer, state.scheduler, state.loss_fn, state.device,
                            state.precision, state.scaler, cfg.train.grad_accum, on_step=hooks.step,
                            train_mode=train_mode)
        val = evaluate(state.model, val_loader, num_classes, state.device, state.precision, cfg.train.eval_flip_tta)
        # Param groups may run at scaled rates (fine-tuning): record the unscaled one.
        group = state.optimizer.param_groups[0]
        record = epoch_record(epoch + 1, stats, val, cfg.optim.lr * group["lr"] / group["initial_lr"])
        history.append(record)
        ckpt = checkpoint(epoch + 1, record)
        save_checkpoint(ckpt, run_dir / LAST_CHECKPOINT)
        if val.accuracy > best_acc:
            best_acc, stale = val.accuracy, 0
            save_checkpoint(ckpt, run_dir / BEST_CHECKPOINT)
        else:
            stale += 1
        hooks.epoch_end(record, history)
        if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
            break
    return history


def write_summary(run_dir: str | os.PathLike, cfg: RunConfig, history: list[dict[str, float]],
                  best: dict[str, Any], test: EvalResult) -> dict[str, Any]:
    """`metrics.json` of a run: config, per-epoch history, best epoch and the test report."""
    summary = {
        "config": cfg.to_dict(),
        "history": history,
        "best_epoch": best["epoch"],
        "best_val_acc": best["metrics"]["val_acc"],
        "test": classification_report(test.confusion, best["classes"]),
        "data_fingerprint": best["data_fingerprint"],
        "mean_images_per_s": _mean([r["images_per_s"] for r in history]),
    }
    write_json(Path(run_dir) / "metrics.json", summary)
    return summary


def evaluate_checkpoint(ckpt: dict[str, Any], data_dir: str | os.PathLike, split: str,
                        device: torch.device | None = None, batch_size: int = 1000, flip_tta: bool = True) -> EvalResult:
    """Single-process evaluation of a checkpoint on one split of a prepared data set."""
    device = device or select_device()
    model = model_from_checkpoint(ckpt, device)
    arrays = read_split(data_dir, split)
    loader = ArrayLoader.from_numpy(arrays.images, arrays.labels, batch_size=batch_size,
                                    mean=ckpt["mean"], std=ckpt["std"], device=device)
    train_cfg = RunConfig.from_dict(ckpt["run_config"]).train
    return evaluate(model, loader, len(ckpt["classes"]), device, select_precision(train_cfg, device), flip_tta)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
