"""How to spend a few CPU cores on ResNet-20: one process with all threads, or one process per
core; and the eval batch size. No Ray, synthetic inputs (the cost does not depend on pixels).

    python bench/cpu_split.py [--flavor resnet20] [--steps 20]

Prints training images/s of (a) one process at `os.cpu_count()` torch threads and (b) that many
1-thread processes at once (their sum), then inference images/s at eval batches 1000, 500, 250
and 128 at all threads, all at the precision training picks on this CPU (bench/precision.py's
loops); one JSON line. The `local` sweep preset (one trial at a time) and
`TrainConfig.eval_batch_size` (250) cite its figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/precision.py: the rate loops


def _precision():
    """What training uses on this CPU (`auto`: bf16 + channels_last where the CPU has native bf16)."""
    import torch

    from resnet_dist.config import TrainConfig
    from resnet_dist.engine import select_precision

    return select_precision(TrainConfig(), torch.device("cpu"))


def train_rate(flavor: str, threads: int, steps: int, batch: int = 128) -> float:
    import torch

    from precision import train_rate as rate

    torch.set_num_threads(threads)
    return rate(flavor, _precision(), batch, steps)


def _worker(args: tuple[str, int]) -> float:
    return train_rate(args[0], 1, args[1])


def eval_rates(flavor: str, threads: int, images: int = 3000) -> dict[int, float]:
    import torch

    from precision import eval_rate

    torch.set_num_threads(threads)
    return {bs: eval_rate(flavor, _precision(), bs, max(2, images // bs)) for bs in (1000, 500, 250, 128)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="resnet20")
    p.add_argument("--steps", type=int, default=20, help="timed training steps of batch 128")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    cores = os.cpu_count() or 1
    one = train_rate(args.flavor, cores, args.steps)
    with mp.get_context("spawn").Pool(cores) as pool:
        each = pool.map(_worker, [(args.flavor, args.steps)] * cores)
    evals = eval_rates(args.flavor, cores)
    print(f"{args.flavor} training, batch 128: one process x {cores} threads {one:.0f} img/s; "
          f"{cores} processes x 1 thread {sum(each):.0f} img/s in all ({', '.join(f'{r:.0f}' for r in each)})")
    print("inference at", cores, "threads:", ", ".join(f"batch {b}: {r:.0f} img/s" for b, r in evals.items()))
    print("precision:", _precision())
    print(json.dumps({"flavor": args.flavor, "cores": cores, "precision": str(_precision()), "one_process_img_s": round(one),
                      "split_img_s": round(sum(each)), "eval_img_s": {b: round(r) for b, r in evals.items()}}))


if __name__ == "__main__":
    main()
