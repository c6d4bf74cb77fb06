"""The main job: sweep (successive halving or ASHA) -> best trial on validation -> fine-tune -> evaluate -> report.

Everything lands in one sweep directory, STORAGE/NAME (a path, or a URI mirrored from a local
copy: resnet_dist.storage):
  trials.csv, best_config.json, best.pt (the selected trial's best checkpoint),
  finetuned.pt and finetune.json (resnet_dist.outputs), report.md + PNG plots,
  summary.json; Tune's and Train's own state lives beside them (tune/, train/), which is
  what a re-run resumes from.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray.tune as tune

from cluster.finetune import FINETUNE_RUN, finetune_on_ray
from cluster.lock import DriverLock
from cluster.progress import LiveTrials
from cluster.resources import TRIAL_DRIVER_CPUS, Resources, plan_for_cluster, plan_trials_in_process
from cluster.runtime import connect
from cluster.sweep_config import SweepConfig, base_run_config, in_process, sweep_rungs, sweep_tracking
from cluster.tracking import REMOTE_ENTRIES, log_artifacts
from cluster.tune import RUNGS_FILE, build_tuner, trial_run_config
from resnet_dist import storage
from resnet_dist.checkpoint import BEST_CHECKPOINT, load_checkpoint, save_checkpoint
from resnet_dist.config import RunConfig
from resnet_dist.data import read_manifest
from resnet_dist.identity import claim_mirrored
from resnet_dist.outputs import write_json
from resnet_dist.report import sweep_cost, trial_cost, write_report
from resnet_dist.storage import Mirror


def trial_checkpoint(r: tune.Result, best_row: Any) -> str | None:
    """Where the trial's best checkpoint lies: Train's (reported as checkpoint_path), or for an
    in-process trial Tune's own (one of its best two on val, kept by the CheckpointConfig)."""
    path = best_row.get("checkpoint_path")
    if isinstance(path, str) and path:
        return path
    kept = [(c, m) for c, m in (r.best_checkpoints or []) if "val_acc" in m]
    return max(kept, key=lambda cm: cm[1]["val_acc"])[0].path if kept else None


def trial_reports(r: tune.Result):
    """The trial's reports, one row each: Tune's `metrics_dataframe` (its result.json), plus any
    report that only the trial's progress.csv holds. When a paused trial resumes, Tune first
    copies each of its log files back from the storage (ray/tune/logger/logger.py
    `_restore_from_remote`), so a copy older than the local file (most likely one taken while the
    driver's upload of it is still in flight) loses the reports after it, and the next report is
    appended after the gap (seen once in CI, 2026-12-08: result.json without a resumed trial's
    epoch-1 report, which its progress.csv kept)."""
    import pandas as pd

    df = r.metrics_dataframe
    try:
        with r.filesystem.open_input_stream(f"{r.path}/progress.csv") as f:
            logged = pd.read_csv(io.BytesIO(f.readall()))
    except (OSError, ValueError):   # no progress.csv, or an empty or cut-short one: result.json alone
        return df
    key = "training_iteration"
    if df is None or df.empty or key not in df or key not in logged:
        return df
    missing = logged[~logged[key].isin(df[key])]
    if missing.empty:
        return df
    return pd.concat([df, missing[[c for c in missing.columns if c in df.columns]]], ignore_index=True)


def collect_trials(results: tune.ResultGrid, max_epochs: int,
                   resources: Resources) -> list[dict[str, Any]]:
    """One row per trial: sampled config, epochs run (fractional: rungs fall inside epochs),
    best val acc and its checkpoint, the early stop, and its cost (wall, CPU- and GPU-seconds
    held, images; resnet_dist.report.trial_cost)."""
    if resources.in_process:
        cpus, gpus = resources.cpus_per_worker, 1 if resources.use_gpu else 0
    else:
        cpus = resources.workers * resources.cpus_per_worker + TRIAL_DRIVER_CPUS
        gpus = resources.workers if resources.use_gpu else 0
    rows = []
    for r in results:
        df = trial_reports(r)
        if df is None or df.empty or "val_acc" not in df:
            continue
        df = df.sort_values("step").drop_duplicates("step", keep="last")
        best_row = df.loc[df["val_acc"].idxmax()]
        # The trial's own saved config (its plan's base and its sample), never the command line's.
        run = trial_run_config(RunConfig.from_dict(r.config["plan"]["base"]), r.config)
        epochs_run = round(float(df["epoch"].max()), 4)
        rows.append({
            "trial_id": r.metrics.get("trial_id", Path(r.path).name), "status": "ERROR" if r.error else "TERMINATED",
            "flavor": run.model.flavor, "width": run.model.width, "block": run.model.block or "basic",
            "optimizer": run.optim.optimizer, "lr": run.optim.lr, "weight_decay": run.optim.weight_decay,
            "momentum": run.optim.momentum, "batch_size": run.train.batch_size,
            "label_smoothing": run.optim.label_smoothing, "schedule": run.optim.schedule, "pad": run.data.pad,
            "epochs_run": int(epochs_run) if epochs_run.is_integer() else epochs_run,
            "images_seen": int(df["images_seen"].max()) if "images_seen" in df else None,
            "best_val_acc": float(best_row["val_acc"]),
            "best_checkpoint": trial_checkpoint(r, best_row),
            "stopped_early": epochs_run < max_epochs and not r.error,
            "stopped_at_epoch": epochs_run if epochs_run < max_epochs else None,
            "history": list(zip(df["epoch"].astype(float).tolist(), df["val_acc"].astype(float).tolist())),
            "config": run.to_dict(),
            "cost": trial_cost(df.to_dict("records"), cpus, gpus, max_epochs),
        })
    return rows


def sweep_identity(cfg: SweepConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """What defines a sweep (resnet_dist.identity): the search and the fine-tuning, on this data;
    not where it runs, how many trials at once, or whether it serves at the end."""
    d = asdict(cfg)
    for key in ("name", "storage", "data_dir", "max_concurrent", "serve", "mlflow_uri", "data_path"):
        d.pop(key)
    return {"kind": "sweep", **d, "data_fingerprint": manifest["fingerprint"]}


# What Ray Tune, Ray Train and tracking write to a sweep URI themselves, and the local lock:
# the mirror of the driver's own files (resnet_dist.storage) leaves them alone.
SWEEP_REMOTE = ("tune", "train", RUNGS_FILE, ".driver.lock", *REMOTE_ENTRIES)


def run_sweep(cfg: SweepConfig, console, restart: bool = False) -> dict[str, Any]:
    """The whole loop, one driver at a time per sweep directory (cluster/lock.py; for a URI,
    per machine: an object store has no locks), resumed only with the config it was started
    with (`restart`: afresh, the old files set aside); returns the summary also written to
    summary.json. A URI's files are pulled into a local copy first and pushed after each phase."""
    with Mirror(cfg.sweep_target, skip=SWEEP_REMOTE) as mirror, DriverLock(mirror.local):
        aside = claim_mirrored(mirror, sweep_identity(cfg, read_manifest(cfg.data_dir)), "sweep", restart)
        if aside is not None:
            console.print(f"--restart: the sweep's old files are in {aside}")
        return _run_sweep(cfg, console, mirror)


def trial_resources(cfg: SweepConfig) -> Resources:
    """How each trial is sized on the connected cluster: in its own process, or on Ray Train."""
    if in_process(cfg):
        return plan_trials_in_process(cfg.max_concurrent)
    resources = replace(plan_for_cluster(cfg.workers_per_trial, cfg.max_concurrent),
                        min_workers=cfg.min_workers_per_trial)
    return resources if cfg.data_path == "auto" else replace(resources, data_path=cfg.data_path)


def sweep_tuner(cfg: SweepConfig, target: str, resources: Resources, console=None,
                callbacks: list | None = None) -> tune.Tuner:
    """The sweep's Tuner at STORAGE/NAME (`target`): a new one, or the one there restored."""
    manifest = read_manifest(cfg.data_dir)
    tracking = sweep_tracking(cfg)
    plan = {"base": base_run_config(cfg).to_dict(), "manifest": manifest, "resources": asdict(resources),
            "name": cfg.name, "train_storage": storage.join(target, "train"), "tracking": tracking.to_dict()}
    train_images, rungs = sweep_rungs(cfg)
    if console is not None:
        console.print(f"[bold]sweep[/bold] {cfg.name}: {cfg.num_samples} trials, {cfg.rungs.scheduler} at "
                      f"{', '.join(f'{m:,}' for m in rungs)} images (keep 1/{cfg.rungs.reduction_factor}), max "
                      f"{cfg.rungs.max_epochs} epochs of {train_images:,}; {resources.max_concurrent} at a time x "
                      + (f"{resources.cpus_per_worker:g} CPU in the trial's process" if resources.in_process else
                         f"{resources.workers} Train worker(s) x {resources.cpus_per_worker:g} CPU")
                      + f"{' + 1 GPU' if resources.use_gpu else ''} -> {target}", soft_wrap=True)
        if storage.is_uri(target) and not tracking.mlflow_uri and cfg.mlflow_uri is None:
            console.print(f"MLflow off: its file store cannot live in {target}; pass --mlflow-uri of a tracking server")
    return build_tuner("tune", target, cfg.space, cfg.rungs, cfg.num_samples, cfg.seed, plan, resources,
                       train_images, cfg.center_first, callbacks=callbacks)


def _run_sweep(cfg: SweepConfig, console, mirror: Mirror) -> dict[str, Any]:
    t0 = time.perf_counter()
    connect()
    sweep_dir, target = mirror.local, mirror.target
    manifest = read_manifest(cfg.data_dir)
    resources = trial_resources(cfg)
    tracking = sweep_tracking(cfg)
    train_images, rungs = sweep_rungs(cfg)
    tuner = sweep_tuner(cfg, target, resources, console, callbacks=[LiveTrials(cfg.rungs.max_epochs)])
    t_sweep = time.perf_counter()
    results = tuner.fit()
    sweep_s = time.perf_counter() - t_sweep
    trials = collect_trials(results, cfg.rungs.max_epochs, resources)
    if not trials:
        raise RuntimeError(f"no trial reported a result; see {storage.join(target, 'tune')}")
    best = max(trials, key=lambda t: t["best_val_acc"])
    # Ray gives the checkpoint's path on the storage's file system ("bucket/..." for s3).
    selected = load_checkpoint(storage.with_fs_path(target, best["best_checkpoint"]))
    save_checkpoint(selected, sweep_dir / BEST_CHECKPOINT)
    write_json(sweep_dir / "best_config.json", {"trial_id": best["trial_id"], "val_acc": best["best_val_acc"],
                                                "epoch": selected["metrics"].get("epoch", selected["epoch"]),
                                                "config": best["config"]})
    mirror.push()   # fine-tuning's workers, on any node, read best.pt from the storage
    console.print(f"best trial {best['trial_id']}: val acc {best['best_val_acc']:.2%} at epoch "
                  f"{float(selected['metrics'].get('epoch', selected['epoch'])):.3g}")
    log_artifacts(tracking, best["trial_id"], [sweep_dir / BEST_CHECKPOINT, sweep_dir / "best_config.json"])

    data = Path(cfg.finetune.data) if cfg.finetune.data else Path(cfg.data_dir).resolve()
    tuned = finetune_on_ray(mirror.file(BEST_CHECKPOINT), data, mirror, cfg.finetune, resources, tracking, cfg.name)
    before_rep, after_rep = tuned["before"], tuned["after"]
    report = write_report(
        sweep_dir, title=f"Sweep {cfg.name}", trials=trials, max_epochs=cfg.rungs.max_epochs, best=best,
        scheduler=cfg.rungs.scheduler, rung_epochs=[m / train_images for m in rungs],
        before=before_rep, after=after_rep,
        finetune={"mode": cfg.finetune.mode, "epochs": tuned["best_epoch"],
                  "data": cfg.finetune.data or "CIFAR-10 train+val", "before": tuned["before_kind"]},
        notes=[f"data: {cfg.data_dir} (fingerprint {manifest['fingerprint'][:16]})",
               f"wall time of the sweep (Tune's fit): {sweep_s:.0f} s; of the pipeline up to this report: "
               f"{time.perf_counter() - t0:.0f} s"],
    )
    summary = {"name": cfg.name, "sweep_dir": target, "trials": [{k: v for k, v in t.items() if k != "config"}
               for t in trials], "best": best["trial_id"], "best_val_acc": best["best_val_acc"],
               "before": before_rep, "before_kind": tuned["before_kind"], "after": after_rep,
               "report": storage.join(target, Path(report).name),
               "stopped_early": sum(t["stopped_early"] for t in trials), "cost": sweep_cost(trials),
               "rungs_images": rungs, "sweep_s": sweep_s,
               "seconds": time.perf_counter() - t0}
    write_json(sweep_dir / "summary.json", summary)
    log_artifacts(tracking, FINETUNE_RUN, [report, sweep_dir / "summary.json", sweep_dir / "trials.csv"])
    return summary
