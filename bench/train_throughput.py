"""Training throughput: plain PyTorch vs the Ray Train path, same model, batch and machine.

    python bench/train_throughput.py --data data/cifar10

Measures steady-state training images/s (the last epoch of each run, so
start-up and the first epoch's warm-up are excluded) of
  (a) a plain single-process loop over in-memory tensors (resnet_dist's ArrayLoader),
  (b) Ray Train with 1 worker and (c) with 2 workers (1 CPU thread each),
each Ray case with the Ray Data pipeline and with the device-side path;
plus the data-wait share of step time, and separately the start-up time of a
trivial 2-worker fit(). Prints a table, the ratios to (a), and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def plain_loop(cfg, threads: int) -> dict:
    from resnet_dist.parquet import read_manifest, read_split
    from resnet_dist.engine import select_device
    from resnet_dist.loader import ArrayLoader
    from resnet_dist.training import build_training
    from resnet_dist.engine import train_epoch

    torch.set_num_threads(threads)
    manifest = read_manifest(cfg.data.data_dir)
    train = read_split(cfg.data.data_dir, "train")
    n = cfg.data.train_subset
    loader = ArrayLoader.from_numpy(train.images[:n], train.labels[:n], batch_size=cfg.train.batch_size,
                                    mean=manifest["mean"], std=manifest["std"], data=cfg.data, train=True)
    device = select_device()
    state = build_training(cfg, cfg.model, len(loader), device)
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        stats = train_epoch(state.model, loader, state.optimizer, state.scheduler, state.loss_fn, device,
                            state.precision)
    return {"images_per_s": stats.images_per_second, "data_wait_frac": stats.data_wait_fraction}


def ray_run(cfg, workers: int, threads: int, data_path: str, name: str, storage: str) -> dict:
    from dataclasses import replace

    from cluster.progress import fit_streaming
    from cluster.resources import plan_for_cluster
    from cluster.train import WorkerJob, build_trainer
    from resnet_dist.parquet import read_manifest
    from resnet_dist.spec import RunSpec

    job = WorkerJob(RunSpec.from_manifest(cfg, read_manifest(cfg.data.data_dir)), threads, data_path=data_path)
    res = replace(plan_for_cluster(workers), threads=threads, data_path=data_path)
    reports: list[dict] = []
    t0 = time.perf_counter()
    fit_streaming(lambda cbs: build_trainer(job, res, name, storage, 0, cbs),
                  lambda r: reports.append(r["metrics"][0]))
    last = reports[-1]
    return {"images_per_s": last["images_per_s"], "data_wait_frac": last["data_wait_frac"],
            "fit_s": time.perf_counter() - t0}


def trivial_fit_seconds(storage: str) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        ray.train.report({"ok": 1})

    t0 = time.perf_counter()
    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(name=f"trivial-{time.time_ns()}", storage_path=storage)).fit()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--subset", type=int, default=10000, help="train images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is measured")
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--storage", default="/tmp/resnet-dist-bench")
    args = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    from cluster.runtime import connect
    from resnet_dist.config import RunConfig

    cfg = RunConfig().replace(
        model={"flavor": args.model}, data={"data_dir": os.path.abspath(args.data), "train_subset": args.subset},
        train={"epochs": args.epochs, "batch_size": args.batch_size},
    )
    cores = os.cpu_count() or 1
    # Each figure is printed as soon as it is measured, so a run cut short still reports.
    rows = {"(a) plain PyTorch, 1 process": plain_loop(cfg, cores)}
    print(json.dumps({"row": "(a)", **rows["(a) plain PyTorch, 1 process"]}), flush=True)
    t0 = time.perf_counter()
    connect()
    init_s = time.perf_counter() - t0
    startup_s = trivial_fit_seconds(args.storage)
    print(json.dumps({"ray_init_s": init_s, "trivial_fit_s": startup_s}), flush=True)
    for workers in (1, 2):
        for path in ("pipeline", "device"):
            label = f"({'b' if workers == 1 else 'c'}) Ray Train, {workers} worker{'s' if workers > 1 else ''}, {path}"
            rows[label] = ray_run(cfg, workers, max(1, cores // workers), path, f"bench-{workers}-{path}-{time.time_ns()}", args.storage)
            print(json.dumps({"row": label, **rows[label]}), flush=True)

    base = rows["(a) plain PyTorch, 1 process"]["images_per_s"]
    table = Table(title=f"{args.model}, global batch {args.batch_size}, {args.subset} images/epoch, {cores} cores")
    for col in ("configuration", "img/s", "x plain", "data wait"):
        table.add_column(col, justify="right")
    for label, r in rows.items():
        table.add_row(label, f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / base:.2f}", f"{r['data_wait_frac']:.1%}")
    console = Console(width=120)
    console.print(table)
    console.print(f"ray.init: {init_s:.1f} s; trivial 2-worker fit(): {startup_s:.1f} s")
    print(json.dumps({"rows": rows, "ray_init_s": init_s, "trivial_fit_s": startup_s}))


if __name__ == "__main__":
    main()
