"""The one training loop, for every path: local `jobs/train.py --local`, a Ray Train
worker, a Tune trial's workers, and fine-tuning, local and on Ray.

`run_loop` takes the training state, a batch source per epoch and a *sink*. It trains,
validates and hands each report (the metrics and a way to build the checkpoint) to the
sink: the local sink writes last.pt/best.pt (resnet_dist.local), Ray's calls
`ray.train.report` (cluster/train.py). Reports come at every epoch's end and, with
`train.report_every_images`, every N images in between.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from resnet_dist.checkpoint import build_checkpoint, load_checkpoint, restore_rng_state, unwrap
from resnet_dist.config import ModelConfig, RunConfig
from resnet_dist.engine import (
    EpochStats, EvalResult, Precision, build_optimizer, build_scheduler, evaluate, make_grad_scaler,
    select_precision, train_epoch,
)
from resnet_dist.finetune import prepare_finetune, set_train_mode
from resnet_dist.models import build_model
from resnet_dist.spec import RunSpec

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


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
    model_config: ModelConfig | None = None
    train_mode: Callable[[nn.Module], None] | None = None   # fine-tuning keeps frozen BN layers in eval


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
        model_config=model_cfg,
    )


def build_state(spec: RunSpec, device: torch.device, steps_per_epoch: int,
                wrap: Callable[[nn.Module], nn.Module] | None = None) -> TrainingState:
    """The training state of `spec`: a new model, or for fine-tuning the start checkpoint's
    network with its frozen parts and per-part rates. Seeded, so every rank (and the local
    and Ray paths) starts from the same weights. `steps_per_epoch` is this rank's, which sizes
    the lr schedule."""
    torch.manual_seed(spec.run.train.seed)   # before prepare_finetune too: it may draw a new head
    if not spec.init_checkpoint:
        return build_training(spec.run, spec.model_config, steps_per_epoch, device, wrap)
    model, model_cfg, lr_scale = prepare_finetune(load_checkpoint(spec.init_checkpoint), len(spec.classes),
                                                  spec.finetune)
    state = build_training(spec.run, model_cfg, steps_per_epoch, device, wrap, model, lr_scale)
    state.train_mode = set_train_mode
    return state


@dataclass(frozen=True)
class Position:
    """Where a run stands: `epoch` completed epochs plus `step` optimizer steps into the next."""

    epoch: int = 0
    step: int = 0


def restore_training(state: TrainingState, ckpt: dict[str, Any]) -> tuple[Position, list[dict[str, Any]]]:
    """Load weights, optimizer, scheduler and RNG from a checkpoint of this run; returns where
    to go on from and the history so far."""
    unwrap(state.model).load_state_dict(ckpt["model_state"])
    if ckpt.get("optimizer_state") is not None:
        state.optimizer.load_state_dict(ckpt["optimizer_state"])
    if ckpt.get("scheduler_state") is not None:
        state.scheduler.load_state_dict(ckpt["scheduler_state"])
    restore_rng_state(ckpt["rng_state"])
    extra = ckpt.get("extra", {})
    return Position(int(ckpt["epoch"]), int(extra.get("step_in_epoch", 0))), list(extra.get("history", []))


def run_checkpoint(state: TrainingState, spec: RunSpec, record: dict[str, Any], history: list[dict[str, Any]],
                   position: Position) -> dict[str, Any]:
    """The self-describing checkpoint of `state` at `position` (resnet_dist.checkpoint)."""
    return build_checkpoint(
        state.model, model_config=state.model_config, run_config=spec.run.to_dict(), classes=spec.classes,
        mean=spec.mean, std=spec.std, data_fingerprint=spec.fingerprint, epoch=position.epoch, metrics=record,
        optimizer=state.optimizer, scheduler=state.scheduler,
        extra={**spec.extra, "history": list(history), "step_in_epoch": position.step},
    )


class Sink:
    """Receives what the loop produces; every method is optional (the base does nothing).

    `report(record, history, checkpoint)` gets the metrics of one report, the history so far
    (this record last) and `checkpoint()`, which builds the checkpoint dict on demand (only
    the ranks that save one pay for it)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, step: int, images: int) -> None: ...
    def report(self, record: dict[str, Any], history: list[dict[str, Any]],
               checkpoint: Callable[[], dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class Sinks(Sink):
    """Several sinks, called in order."""

    def __init__(self, *sinks: Sink | None) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        for s in self.sinks:
            s.epoch_start(epoch, epochs, steps)

    def step(self, step: int, images: int) -> None:
        for s in self.sinks:
            s.step(step, images)

    def report(self, record, history, checkpoint) -> None:
        for s in self.sinks:
            s.report(record, history, checkpoint)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def epoch_record(epoch: float, stats: EpochStats, val: EvalResult, lr: float) -> dict[str, float]:
    """One row of the training history; `epoch` counts from 1 (fractional between epoch ends)."""
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_acc": stats.accuracy,
        "val_loss": val.loss,
        "val_acc": val.accuracy,
        "val_images": val.images,
        "lr": lr,
        "images": stats.images,           # all ranks together, since the last report
        "images_per_s": stats.images_per_second,
        "epoch_s": stats.seconds,         # wall time since the last report, s
        "step_s": stats.step_seconds,
        "data_wait_frac": stats.data_wait_fraction,
    }


def steps_per_report(cfg: RunConfig, steps_per_epoch: int) -> int:
    """Optimizer steps between reports: a whole epoch, or about `report_every_images`."""
    every = cfg.train.report_every_images
    if not every:
        return steps_per_epoch
    return max(1, min(steps_per_epoch, round(every / cfg.train.batch_size)))


def milestone_steps(cfg: RunConfig) -> list[int]:
    """The global steps (from the run's start) at which `report_at_images` falls due: the
    first step whose images, all workers together, reach each milestone."""
    batch = cfg.train.batch_size
    return sorted({-(-n // batch) for n in cfg.train.report_at_images})


def param_checksum(model: nn.Module) -> float:
    """Sum of all weights in float64: equal on every rank iff DDP kept the replicas in sync,
    and equal between two runs that trained alike (the parity tests compare it)."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def run_loop(
    state: TrainingState,
    spec: RunSpec,
    train_batches: Callable[[int], Batches],
    val_batches: Callable[[], Batches],
    sink: Sink,
    steps_per_epoch: int,
    start: Position = Position(),
    history: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Train `spec.run.train.epochs` epochs from `start`; returns the history.

    `train_batches(epoch)` gives that epoch's (images, labels) batches; `val_batches()` the
    validation batches. Every report validates, appends a record to the history and calls
    `sink.report`. Early stopping counts reports without a new best validation accuracy.
    """
    cfg = spec.run
    history = list(history)
    best_acc = max((r["val_acc"] for r in history), default=-1.0)
    stale = 0
    chunk = steps_per_report(cfg, steps_per_epoch)
    milestones = milestone_steps(cfg)
    group = state.optimizer.param_groups[0]
    for epoch in range(start.epoch, cfg.train.epochs):
        done = start.step if epoch == start.epoch else 0
        batches = iter(train_batches(epoch))
        if done:   # resuming inside an epoch: its order is seeded, so skip what was trained
            for _ in itertools.islice(batches, done):
                pass
        sink.epoch_start(epoch + 1, cfg.train.epochs, steps_per_epoch)
        while done < steps_per_epoch:
            at = epoch * steps_per_epoch + done   # global steps so far
            n = min([chunk, steps_per_epoch - done, *(m - at for m in milestones if m > at)])
            stats = train_epoch(state.model, itertools.islice(batches, n), state.optimizer, state.scheduler,
                                state.loss_fn, state.device, state.precision, state.scaler, cfg.train.grad_accum,
                                on_step=lambda s, images: sink.step(done + s, images), train_mode=state.train_mode)
            if stats.steps == 0:   # the source ran dry at a report boundary: the epoch ends here
                break
            done += stats.steps
            t_val = time.perf_counter()
            val = evaluate(state.model, val_batches(), len(spec.classes), state.device, state.precision,
                           cfg.train.eval_flip_tta)
            val_s = time.perf_counter() - t_val
            end = done >= steps_per_epoch or stats.steps < n   # fewer batches than planned: epoch over
            position = Position(epoch + 1, 0) if end else Position(epoch, done)
            # Param groups may run at scaled rates (fine-tuning): record the unscaled one.
            lr = cfg.optim.lr * group["lr"] / group["initial_lr"]
            record = epoch_record(epoch + 1 if end else epoch + done / steps_per_epoch, stats, val, lr)
            step = epoch * steps_per_epoch + done
            # images_seen: training images of the whole run so far, all workers (a sweep's time unit).
            record.update(step=step, images_seen=step * cfg.train.batch_size, val_s=val_s,
                          param_checksum=param_checksum(state.model), resumed_from_epoch=start.epoch)
            history.append(record)
            sink.report(record, history, lambda r=record, p=position: run_checkpoint(state, spec, r, history, p))
            if val.accuracy > best_acc:
                best_acc, stale = val.accuracy, 0
            else:
                stale += 1
            if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
                return history
    return history
