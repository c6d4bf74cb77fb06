"""Where a sweep trial's time goes, and what orchestration costs per trial.

    python bench/trial_overhead.py --data data/cifar10 [--trials 9] [--subset 4000] [--train-path]

Runs a real sweep through the project's own Tuner (cluster.sweep.sweep_tuner: the `local`
preset's ResNet-20 space, successive halving with pauses, one trial at a time in its own reused
process) on `--subset` training images for 1 epoch, rungs at subset/8 and x3: of `--trials`
trials, a third are resumed after a pause and one trains to the end. From every report's own
timestamps (cluster/trial.py: when each start entered the trial function, its set-up, each
report's training, validation and checkpoint seconds, when it reported) it charges to each
trial:
  launch      from the previous report anywhere (or the sweep's start) to this start entering
              the trial function: Tune's scheduling, the pause or stop of the previous trial, a
              process start or reuse
  setup       data (read once per process) and model built or restored from the checkpoint
  checkpoint  each report's checkpoint written and handed to Tune
  other       the rest of the time between its reports that is neither training nor validation
Orchestration = launch + setup + checkpoint + other: everything but training steps and
validation. Prints a table per trial, the median and mean per trial, and one JSON line.
`--train-path` also runs one trial's config as a 1-worker Ray Train run (what every trial was
before, and what multi-worker trials still are) and prints its overhead: its wall time minus its
training and validation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def charge(rows: list[dict], fit_start: float) -> dict[str, dict[str, float]]:
    """Per trial: seconds of launch, setup, checkpoint, other, train and val (module docstring)."""
    rows = sorted(rows, key=lambda r: r["reported_at"])
    out: dict[str, dict[str, float]] = {}
    prev_report, seen_starts = fit_start, set()
    last_in_start: dict[tuple, float] = {}
    for r in rows:
        c = out.setdefault(r["trial_id"], dict.fromkeys(("launch", "setup", "checkpoint", "other", "train", "val",
                                                          "starts"), 0.0))
        start = (r["trial_id"], r["start_entered_at"])
        if start not in seen_starts:
            seen_starts.add(start)
            c["starts"] += 1
            c["launch"] += max(0.0, r["start_entered_at"] - prev_report)
            c["setup"] += r["start_setup_s"]
            since = r["start_entered_at"] + r["start_setup_s"]
        else:
            since = last_in_start[start]
        c["train"] += r["epoch_s"]
        c["val"] += r["val_s"]
        c["checkpoint"] += r["checkpoint_s"]
        c["other"] += max(0.0, r["reported_at"] - since - r["epoch_s"] - r["val_s"] - r["checkpoint_s"])
        last_in_start[start] = r["reported_at"]
        prev_report = max(prev_report, r["reported_at"])
    for c in out.values():
        c["overhead"] = c["launch"] + c["setup"] + c["checkpoint"] + c["other"]
    return out


def train_path_overhead(cfg, data: str, tmp: Path) -> float:
    """A 1-worker Ray Train run of the sweep's first trial config: wall minus training and validation."""
    from cluster.resources import Resources
    from cluster.train import WorkerJob, build_trainer
    from cluster.sweep_config import base_run_config
    from cluster.tune import trial_run_config
    from resnet_dist.data import read_manifest
    from resnet_dist.spec import RunSpec

    # One report (the epoch's end): a Train run's result keeps only its checkpoints' metrics.
    run = trial_run_config(base_run_config(cfg), cfg.space.center()).replace(train={"report_at_images": []})
    spec = RunSpec.from_manifest(run, read_manifest(data))
    res = Resources(workers=1, use_gpu=False, cpus_per_worker=1, threads=2, max_concurrent=1, data_path="device")
    t = time.perf_counter()
    result = build_trainer(WorkerJob(spec, 2, data_path="device"), res, "train-path", str(tmp / "ray")).fit()
    wall = time.perf_counter() - t
    df = result.metrics_dataframe
    return wall - float(df["epoch_s"].sum() + df["val_s"].sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/cifar10", help="prepared Parquet data")
    p.add_argument("--trials", type=int, default=9)
    p.add_argument("--subset", type=int, default=4000, help="training images of the 1-epoch budget")
    p.add_argument("--train-path", action="store_true", help="also time one 1-worker Ray Train run")
    args = p.parse_args()

    import ray
    from rich.console import Console
    from rich.table import Table

    from cluster.runtime import connect
    from cluster.sweep import trial_resources, sweep_tuner
    from cluster.sweep_config import PRESETS

    data = str(Path(args.data).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="trial-overhead-"))
    cfg = PRESETS["local"]
    cfg = replace(cfg, name="bench", storage=str(tmp), data_dir=data, num_samples=args.trials, train_subset=args.subset,
                  rungs=replace(cfg.rungs, max_epochs=1, first_rung_images=max(128, args.subset // 8)),
                  mlflow_uri="off")
    connect()
    resources = trial_resources(cfg)
    tuner = sweep_tuner(cfg, str(tmp / "bench"), resources)
    fit_start = time.time()
    results = tuner.fit()
    fit_wall = time.time() - fit_start
    rows = [row for r in results for row in r.metrics_dataframe.to_dict("records")]
    per = charge(rows, fit_start)

    table = Table(title=f"{args.trials} trials of the local preset's space on {args.subset} images, 1 epoch budget "
                        f"(rungs {', '.join(map(str, cfg.rungs.milestones(args.subset, args.trials)))}): seconds")
    cols = ("starts", "launch", "setup", "checkpoint", "other", "overhead", "train", "val")
    table.add_column("trial")
    for col in cols:
        table.add_column(col, justify="right")
    for tid, c in sorted(per.items()):
        table.add_row(tid, *(f"{c[k]:.0f}" if k == "starts" else f"{c[k]:.2f}" for k in cols))
    overheads = [c["overhead"] for c in per.values()]
    accounted = sum(c["overhead"] + c["train"] + c["val"] for c in per.values())
    out = {"trials": len(per), "subset": args.subset, "cpus": ray.cluster_resources().get("CPU"),
           "median_overhead_s": round(statistics.median(overheads), 3),
           "mean_overhead_s": round(statistics.mean(overheads), 3),
           "starts": int(sum(c["starts"] for c in per.values())),
           "breakdown_s": {k: round(sum(c[k] for c in per.values()), 2) for k in cols[1:]},
           "fit_wall_s": round(fit_wall, 2), "fit_unaccounted_s": round(fit_wall - accounted, 2)}
    console = Console(width=120)
    console.print(table)
    console.print(f"orchestration per trial: median {out['median_overhead_s']:.2f} s, mean {out['mean_overhead_s']:.2f} s; "
                  f"Tune's fit {fit_wall:.1f} s, {out['fit_unaccounted_s']:.1f} s of it charged to no trial (after "
                  "the last report)")
    if args.train_path:
        out["train_path_overhead_s"] = round(train_path_overhead(cfg, data, tmp), 2)
        console.print(f"the same config as a 1-worker Ray Train run: {out['train_path_overhead_s']:.1f} s outside "
                      "training and validation")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
