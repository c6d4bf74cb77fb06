"""How to spend a few CPU cores on ResNet-20: one process with all threads, or one process per
core; and the eval batch size. No Ray, synthetic inputs (the cost does not depend on pixels).

    python bench/cpu_split.py [--flavor resnet20] [--steps 20]

Prints training images/s of (a) one process at `os.cpu_count()` torch threads and (b) that many
1-thread processes at once (their sum), then inference images/s at eval batches 1000, 500, 250
and 128 at all threads; one JSON line. The `local` sweep preset (one trial at a time) and
`TrainConfig.eval_batch_size` (250) cite its figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_rate(flavor: str, threads: int, steps: int, batch: int = 128) -> float:
    import torch

    from resnet_dist.config import ModelConfig
    from resnet_dist.models import build_model

    torch.set_num_threads(threads)
    model = build_model(ModelConfig(flavor=flavor))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for i in range(steps + 5):   # 5 warm-up steps
        if i == 5:
            t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def _worker(args: tuple[str, int]) -> float:
    return train_rate(args[0], 1, args[1])


def eval_rates(flavor: str, threads: int, images: int = 3000) -> dict[int, float]:
    import torch

    from resnet_dist.config import ModelConfig
    from resnet_dist.models import build_model

    torch.set_num_threads(threads)
    model = build_model(ModelConfig(flavor=flavor)).eval()
    out = {}
    for bs in (1000, 500, 250, 128):
        x = torch.randn(bs, 3, 32, 32)
        with torch.inference_mode():
            model(x)
            t, n = time.perf_counter(), 0
            while n < images:
                model(x)
                n += bs
        out[bs] = n / (time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="resnet20")
    p.add_argument("--steps", type=int, default=20, help="timed training steps of batch 128")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    one = train_rate(args.flavor, cores, args.steps)
    with mp.get_context("spawn").Pool(cores) as pool:
        each = pool.map(_worker, [(args.flavor, args.steps)] * cores)
    evals = eval_rates(args.flavor, cores)
    print(f"{args.flavor} training, batch 128: one process x {cores} threads {one:.0f} img/s; "
          f"{cores} processes x 1 thread {sum(each):.0f} img/s in all ({', '.join(f'{r:.0f}' for r in each)})")
    print("inference at", cores, "threads:", ", ".join(f"batch {b}: {r:.0f} img/s" for b, r in evals.items()))
    print(json.dumps({"flavor": args.flavor, "cores": cores, "one_process_img_s": round(one),
                      "split_img_s": round(sum(each)), "eval_img_s": {b: round(r) for b, r in evals.items()}}))


if __name__ == "__main__":
    main()
