"""Training engine: plain functions with explicit arguments.

`train_epoch` consumes any iterable of (images, labels) batches (an in-memory
loader here, Ray Data's `iter_torch_batches` on a Ray worker), so the same
step runs on a laptop, under torchrun and inside Ray Train. When a
torch.distributed process group is up, epoch metrics are all-reduced so every
rank returns the global figure.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from resnet_dist.config import OptimConfig, TrainConfig
from resnet_dist.metrics import accuracy


def select_device(local_rank: int = 0) -> torch.device:
    """CUDA when there is a GPU (the worker's local one), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32) and channels_last."""

    autocast_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def _cpu_probe(name: str) -> bool:
    """torch.cpu's private capability probes (absent in some builds: then False)."""
    probe = getattr(torch.cpu, name, None)
    return bool(probe and probe())


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512-BF16, e.g. Sapphire Rapids with AMX).

    There oneDNN runs bf16 convolutions natively: ResNet-20 training at batch 128 on 2 cores went
    449-528 -> 1,200 img/s with bf16 autocast + channels_last (bench/precision.py). Elsewhere bf16 on
    a CPU is emulated and slower than fp32, so "auto" leaves it off.
    """
    return _cpu_probe("_is_avx512_bf16_supported")


def cpu_has_avx512() -> bool:
    """channels_last fp32 convolutions measured faster on an AVX-512 CPU (658-670 vs 449-528 img/s, bench/precision.py)."""
    return _cpu_probe("_is_avx512_supported")


def select_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """"auto" picks what was measured fastest at the same accuracy on the device.

    CUDA: bf16 autocast (fp16 where bf16 is unsupported) and channels_last. CPU: bf16 autocast where the
    CPU has native bf16 instructions (4 epochs of the recipe: 80.19% test in 3 min 8 s vs 80.43% in
    9 min 13 s in fp32, README), channels_last on AVX-512 CPUs, fp32 and the default layout elsewhere.
    """
    cuda = device.type == "cuda"
    if cfg.amp == "auto":
        if cuda:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[cfg.amp]
    if cfg.channels_last == "auto":
        channels_last = cuda or cpu_has_avx512()
    else:
        channels_last = cfg.channels_last == "on"
    return Precision(dtype, channels_last)


def make_grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    if precision.autocast_dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over the trainable parameters.

    BN parameters and biases (tensors of rank <= 1) get no weight decay when
    `cfg.wd_skip_bn_bias`. `lr_scale(name)` gives a per-parameter multiplier of
    `cfg.lr` (discriminative rates for fine-tuning); parameters sharing a
    (scale, decay) pair form one group.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if (cfg.wd_skip_bn_bias and p.ndim <= 1) else cfg.weight_decay
        scale = lr_scale(name) if lr_scale else 1.0
        groups.setdefault((scale, wd), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    param_groups = [{"params": ps, "lr": cfg.lr * s, "weight_decay": wd} for (s, wd), ps in groups.items()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (0-based)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    end = cfg.final_lr_fraction
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.step_gamma ** sum(epoch >= m for m in cfg.step_milestones)
    if step < warmup:
        return (step + 1) / warmup   # linear warm-up, never exactly 0
    t = min(1.0, (step - warmup) / max(1, total - warmup))   # progress of the decay in [0, 1]
    if cfg.schedule == "onecycle":
        return 1.0 - (1.0 - end) * t                          # linear decay (triangle)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))   # cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step schedule; its state_dict is plain (the lambda is not saved)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch, epochs))


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    grad_accum: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over a batch, in `grad_accum` micro-batches.

    Returns (summed loss, number correct) as 0-d tensors on the device, so the
    caller decides when to synchronise. Under DDP, gradient all-reduce runs
    only on the last micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    chunks = list(zip(x.chunk(grad_accum), y.chunk(grad_accum)))
    for i, (xb, yb) in enumerate(chunks):
        sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), precision.autocast(x.device):
            logits = model(xb)
            loss = loss_fn(logits, yb)
        (scaler.scale(loss / len(chunks)) if scaler else loss / len(chunks)).backward()
        loss_sum += loss.detach().float() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss_sum, correct


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int                 # images seen by all ranks together
    seconds: float              # wall time of the epoch on this rank
    data_wait_seconds: float    # time this rank spent waiting for the next batch
    steps: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


def _timed(batches: Iterable, clock: list[float]) -> Iterator:
    """Yield from `batches`, adding the time spent waiting for each item to clock[0]."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        clock[0] += time.perf_counter() - t0
        yield item


def prepare_inputs(x: torch.Tensor, y: torch.Tensor, device: torch.device, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    if precision.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True).long()


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: nn.Module,
    device: torch.device,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    grad_accum: int = 1,
    on_step: Callable[[int, int], None] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
) -> EpochStats:
    """Train over `batches` once. `on_step(step, batch_images)` is called after each step;
    `train_mode(model)` after `model.train()` (fine-tuning keeps frozen BN layers in eval)."""
    model.train()
    if train_mode is not None:
        train_mode(model)
    wait = [0.0]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n, steps = 0, 0
    start = time.perf_counter()
    for x, y in _timed(batches, wait):
        x, y = prepare_inputs(x, y, device, precision)
        l, c = train_step(model, x, y, optimizer, loss_fn, precision, scaler, grad_accum)
        loss_sum += l
        correct += c
        n += len(y)
        steps += 1
        if scheduler is not None:
            scheduler.step()
        if on_step:
            on_step(steps, len(y))
    seconds = time.perf_counter() - start
    totals = _all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(n), device=device, dtype=torch.float64)]))
    total_loss, total_correct, total_n = totals.tolist()
    return EpochStats(
        loss=total_loss / max(1.0, total_n),
        accuracy=total_correct / max(1.0, total_n),
        images=int(total_n),
        seconds=seconds,
        data_wait_seconds=wait[0],
        steps=steps,
    )


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: np.ndarray   # (C, C) int64, rows = true class
    images: int


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, precision: Precision, flip_tta: bool) -> torch.Tensor:
    """Logits in fp32; with `flip_tta`, the average over the image and its mirror."""
    with precision.autocast(x.device):
        logits = model(x).float()
        if flip_tta:
            logits = 0.5 * (logits + model(x.flip(3)).float())
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device,
    precision: Precision,
    flip_tta: bool = True,
) -> EvalResult:
    """Loss, accuracy and confusion matrix over `batches` (all ranks' batches when distributed)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    cm = torch.zeros(num_classes * num_classes, device=device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in batches:
        x, y = prepare_inputs(x, y, device, precision)
        logits = predict_logits(model, x, precision, flip_tta)
        loss_sum += loss_fn(logits, y).double()
        cm += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2).double()
    totals = _all_reduce_sum(torch.cat([cm, loss_sum[None]]))
    confusion = totals[:-1].round().long().cpu().numpy().reshape(num_classes, num_classes)
    n = int(confusion.sum())
    return EvalResult(loss=float(totals[-1]) / max(1, n), accuracy=accuracy(confusion), confusion=confusion, images=n)
