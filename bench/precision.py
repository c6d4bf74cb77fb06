"""CPU precision and memory layout: ResNet training and inference images/s under each choice.

    python bench/precision.py                     # resnet20, 2 threads, train batch 128, eval batch 250

fp32 / bf16 autocast x default (NCHW) / channels_last memory format, synthetic inputs (the
speed of a step does not depend on pixel values), steady state after warm-up steps. Prints
a table, what `amp="auto"`/`channels_last="auto"` pick on this machine, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_dist.config import ModelConfig, TrainConfig   # noqa: E402
from resnet_dist.engine import Precision, select_precision   # noqa: E402
from resnet_dist.models import build_model   # noqa: E402

WARMUP_STEPS = 3   # oneDNN picks and caches kernels on the first steps
CPU = torch.device("cpu")
CHOICES = {"fp32": None, "bf16": torch.bfloat16}


def _model_and_input(flavor: str, precision: Precision, batch: int, width: float = 1.0):
    torch.manual_seed(0)
    model = build_model(ModelConfig(flavor=flavor, width=width))
    x = torch.randn(batch, 3, 32, 32)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def train_rate(flavor: str, precision: Precision, batch: int, steps: int, width: float = 1.0) -> float:
    """Training images/s (forward, backward, SGD step) at `precision`, after WARMUP_STEPS."""
    model, x = _model_and_input(flavor, precision, batch, width)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            t0 = time.perf_counter()
        with precision.autocast(CPU):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def eval_rate(flavor: str, precision: Precision, batch: int, steps: int) -> float:
    """Inference images/s at `precision`, after WARMUP_STEPS."""
    model, x = _model_and_input(flavor, precision, batch)
    model.eval()
    with torch.inference_mode():
        for i in range(WARMUP_STEPS + steps):
            if i == WARMUP_STEPS:
                t0 = time.perf_counter()
            with precision.autocast(CPU):
                model(x)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="resnet20")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, nargs="+", default=[1, 250, 1000])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--widths", type=float, nargs="*", default=[0.75, 1.0, 1.5, 2.0],
                    help="also train at these width multipliers, channels_last, fp32 and bf16")
    args = ap.parse_args()
    if min(args.threads, args.train_batch, args.steps, *args.eval_batches) < 1:
        ap.error("--threads, --train-batch, --eval-batches and --steps must be >= 1")
    if any(w <= 0 for w in args.widths):
        ap.error("--widths must be > 0")
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.flavor}, {args.threads} threads, img/s")
    table.add_column("precision"), table.add_column("layout")
    table.add_column(f"train @{args.train_batch}", justify="right")
    for b in args.eval_batches:
        table.add_column(f"eval @{b}", justify="right")
    rows = []
    for name, dtype in CHOICES.items():
        for cl in (False, True):
            precision = Precision(dtype, cl)
            row = {"precision": name, "channels_last": cl,
                   "train": train_rate(args.flavor, precision, args.train_batch, args.steps),
                   "eval": {b: eval_rate(args.flavor, precision, b, max(args.steps, 2000 // b))
                            for b in args.eval_batches}}
            rows.append(row)
            table.add_row(name, "channels_last" if cl else "NCHW", f"{row['train']:.0f}",
                          *(f"{row['eval'][b]:.0f}" for b in args.eval_batches))
    console = Console()
    console.print(table)
    widths = {}
    if args.widths:
        wt = Table(title=f"{args.flavor} training img/s by width (channels_last, batch {args.train_batch})")
        for col in ("width", "fp32", "bf16"):
            wt.add_column(col, justify="right")
        for w in args.widths:
            widths[w] = {name: train_rate(args.flavor, Precision(dtype, True), args.train_batch, args.steps, w)
                         for name, dtype in CHOICES.items()}
            wt.add_row(f"{w:g}", f"{widths[w]['fp32']:.0f}", f"{widths[w]['bf16']:.0f}")
        console.print(wt)
    auto = select_precision(TrainConfig(), CPU)
    console.print(f"auto on this CPU: autocast {auto.autocast_dtype}, channels_last {auto.channels_last} "
                  f"(capability {torch.backends.cpu.get_cpu_capability()})")
    print(json.dumps({"flavor": args.flavor, "threads": args.threads, "rows": rows, "widths": widths,
                      "auto": {"autocast": str(auto.autocast_dtype), "channels_last": auto.channels_last}}))


if __name__ == "__main__":
    main()
