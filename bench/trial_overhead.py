"""What a Ray Train run costs beyond its training: one short run, plain and on Ray Train.

    python bench/trial_overhead.py --data data/cifar10 [--subset 2000] [--repeats 2]

Runs the same 1-epoch config (the `debug` model, batch 100, `--subset` training images)
  (a) in this process (resnet_dist.local.train_local: read, train, validate, checkpoint),
  (b) as a 1-worker Ray Train run on the device data path (what a sweep trial runs), and
  (c) the same on the Ray Data pipeline path,
each `--repeats` times, on a local Ray cluster it starts (or RAY_ADDRESS). The overhead of
(b) and (c) is their wall time minus (a)'s: actor start-up (the Train controller and
worker import torch), the process group, data set-up, checkpoint upload. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/cifar10", help="prepared Parquet data")
    p.add_argument("--subset", type=int, default=2000, help="training images of the one epoch")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import ray
    from rich.console import Console
    from rich.table import Table

    from cluster.resources import Resources
    from cluster.runtime import connect
    from cluster.train import WorkerJob, build_trainer
    from resnet_dist.config import RunConfig
    from resnet_dist.data import read_manifest
    from resnet_dist.local import train_local
    from resnet_dist.spec import RunSpec

    data = str(Path(args.data).resolve())
    cfg = RunConfig().replace(model={"flavor": "debug"}, data={"data_dir": data, "train_subset": args.subset},
                              train={"epochs": 1, "batch_size": 100})
    spec = RunSpec.from_manifest(cfg, read_manifest(data))
    connect()
    tmp = Path(tempfile.mkdtemp(prefix="trial-overhead-"))
    walls: dict[str, list[float]] = {"plain": [], "device": [], "pipeline": []}
    for i in range(args.repeats):
        t = time.perf_counter()
        train_local(spec, tmp / f"plain{i}", resume=False)
        walls["plain"].append(time.perf_counter() - t)
        for path in ("device", "pipeline"):
            res = Resources(workers=1, use_gpu=False, cpus_per_worker=1, threads=1, max_concurrent=1, data_path=path)
            t = time.perf_counter()
            build_trainer(WorkerJob(spec, 1, data_path=path), res, f"{path}{i}", str(tmp / "ray")).fit()
            walls[path].append(time.perf_counter() - t)
    plain = statistics.median(walls["plain"])
    table = Table(title=f"one 1-epoch run of {args.subset} images (debug model), median of {args.repeats}")
    for col in ("run", "wall s", "overhead vs plain, s"):
        table.add_column(col, justify="right" if col != "run" else "left")
    out = {"subset": args.subset, "repeats": args.repeats, "cpus": ray.cluster_resources().get("CPU")}
    for name, label in (("plain", "(a) plain, this process"), ("device", "(b) Ray Train, device path"),
                        ("pipeline", "(c) Ray Train, Ray Data pipeline")):
        wall = statistics.median(walls[name])
        table.add_row(label, f"{wall:.1f}", "" if name == "plain" else f"{wall - plain:.1f}")
        out[f"{name}_wall_s"] = round(wall, 2)
        out[f"{name}_walls_s"] = [round(w, 2) for w in walls[name]]
    Console().print(table)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
