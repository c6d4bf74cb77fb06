"""The main job: ASHA sweep -> best trial on validation -> fine-tune -> evaluate -> report.

Everything lands in one sweep directory, STORAGE/NAME:
  trials.csv, best_config.json, best.pt (the selected trial's best checkpoint),
  finetuned.pt, report.md + PNG plots, summary.json; Tune's and Train's own
  state lives beside them (tune/, train/), which is what a re-run resumes from.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray.tune as tune

from cluster.progress import fit_streaming
from cluster.runtime import cluster_cpus, cluster_gpus, connect
from cluster.tracking import TrackingConfig, check_mlflow_uri, log_artifacts
from cluster.train import CHECKPOINT_FILE, WorkerJob, build_trainer, default_threads
from cluster.tune import (
    TRIAL_DRIVER_CPUS, AshaConfig, SearchSpace, TrialResources, build_tuner, plan_resources, trial_run_config,
)
from resnet_dist.checkpoint import load_checkpoint, save_checkpoint
from resnet_dist.config import OPTIMIZERS, ConfigError, RunConfig
from resnet_dist.data import ensure_prepared, is_prepared, read_manifest
from resnet_dist.finetune import (
    OWN_DATA_DEFAULTS, FinetuneConfig, auto_schedule, finetune_run_config, finetune_start,
)
from resnet_dist.inference import SWEEP_FINETUNED
from resnet_dist.metrics import classification_report
from resnet_dist.report import sweep_cost, trial_cost, write_report
from resnet_dist.training import evaluate_checkpoint, write_json

FINETUNED_CHECKPOINT = SWEEP_FINETUNED[-1]   # what serving looks for in a sweep directory
FINETUNE_RUN = "finetune"                    # Train run, TensorBoard run and MLflow run of fine-tuning
SELECTED_CHECKPOINT = "best.pt"
PROBE_CHECKPOINT = "probe.pt"                # the linear probe fine-tuning starts from (other classes)


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    storage: str = "runs"
    data_dir: str = "data/cifar10"
    space: SearchSpace = field(default_factory=SearchSpace)
    asha: AshaConfig = field(default_factory=AshaConfig)
    num_samples: int = 4
    workers_per_trial: int = 1
    max_concurrent: int = 2
    train_subset: int = 0           # train images per epoch in the sweep (0 = all)
    seed: int = 0
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(mode="full"))
    finetune_epochs: int = 0        # 0 = sized to the data: >= MIN_STEPS optimizer steps (finetune.auto_schedule)
    finetune_lr: float = 0.02
    # Fine-tuning's own optimizer, so that finetune_lr means one thing whichever optimizer the
    # selected trial used (AdamW at an SGD rate diverges); momentum and weight decay stay the trial's.
    finetune_optimizer: str = "sgd"
    finetune_data: str = ""         # "" = CIFAR-10 (train+val); else an image folder/archive with its own classes
    finetune_subset: int = 0
    finetune_batch_size: int = 0    # 0 = sized to the data: ~1/20 of it, at most the selected trial's batch
    serve: bool = False
    # MLflow tracking URI; None = a file store in the sweep directory (mlruns/), "off" = no MLflow.
    # TensorBoard events always go to the sweep directory's tensorboard/.
    mlflow_uri: str | None = None
    # "pipeline": Ray Data augments every epoch; "device": each worker reads its shard once and
    # augments it with torch in the training process; "auto": device on GPUs, pipeline on CPUs.
    data_path: str = "auto"

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage).resolve() / self.name


PRESETS: dict[str, SweepConfig] = {
    # Tests: tiny model, tiny data, 4 trials. The search is seeded: with seed 0 the second trial
    # samples lr_mult 0.053 (the first 0.52), learns nothing in its first epoch, and ASHA (top
    # half continues) stops it there -- a stop the tests can count on, without more trials.
    "smoke": SweepConfig(
        space=SearchSpace(flavors=("debug",), lr_mult=(0.05, 2.0), batch_sizes=(32,)),
        asha=AshaConfig(max_epochs=2, grace_period=1, reduction_factor=2), num_samples=4, max_concurrent=1,
        finetune=FinetuneConfig(mode="head"), finetune_epochs=1, finetune_lr=0.05,
        # On the real CIFAR-10 (`scripts/main.sh --preset smoke`): 2,000 images an epoch, not
        # 45,000, so the whole loop takes minutes; the tests' tiny data sets are smaller anyway.
        train_subset=2000, finetune_subset=2000,
    ),
    # The README default: real CIFAR-10 on 2 CPU cores in <= 15 min for the whole pipeline.
    # At ~300 img/s (ResNet-20, 2 cores) and ~40 s to start each trial, the budget goes to the
    # final model: a short sweep (3 trials on 5,000-image epochs, ASHA keeping the top third
    # at epoch 1), then fine-tuning of the selected model over all of train+val for 2 epochs
    # (same classes, so its head is kept) with AdamW at 0.1: 70.9% test accuracy here, against
    # 63.2% with SGD at 0.1 and 63.8% with AdamW at 0.003 (README). Device-side augmentation:
    # on 2 cores it trains at the plain loop's speed, the Ray Data augmenting pipeline at about
    # 0.55x (bench/train_throughput.py, docs/benchmarks.md).
    "local": SweepConfig(
        space=SearchSpace(flavors=("resnet20",), widths=(1.0,), optimizers=("sgd", "adamw"), lr_mult=(0.5, 2.0),
                          batch_sizes=(128,), label_smoothing=(0.0, 0.1)),
        asha=AshaConfig(max_epochs=2, grace_period=1, reduction_factor=3), num_samples=3, max_concurrent=1,
        train_subset=5000, data_path="device",
        finetune=FinetuneConfig(mode="full", reset_head=False, backbone_lr_scale=0.5), finetune_epochs=2,
        finetune_lr=0.1, finetune_optimizer="adamw", finetune_subset=0, serve=True,
    ),
    # A GPU cluster: several workers per trial, deeper and wider nets, 30 epochs.
    "cluster": SweepConfig(
        space=SearchSpace(flavors=("resnet18", "resnet56", "resnet110", "wrn16_4"), widths=(1.0, 2.0),
                          blocks=("basic", "bottleneck"), optimizers=("sgd", "adamw"), lr_mult=(0.25, 4.0),
                          weight_decay=(5e-5, 2e-3), momentum=(0.85, 0.9, 0.95), batch_sizes=(256, 512, 1024),
                          label_smoothing=(0.0, 0.1, 0.2), schedules=("onecycle", "cosine")),
        asha=AshaConfig(max_epochs=30, grace_period=3, reduction_factor=3), num_samples=64, workers_per_trial=4,
        max_concurrent=8, finetune=FinetuneConfig(mode="full"), finetune_epochs=5, finetune_lr=0.01,
    ),
}


def validate(cfg: SweepConfig) -> None:
    """Clear errors before any trial starts."""
    cfg.space.validate()
    cfg.asha.validate()
    cfg.finetune.validate()
    if cfg.data_path not in ("auto", "pipeline", "device"):
        raise ConfigError(f"--data-path must be auto, pipeline or device, got {cfg.data_path!r}")
    if cfg.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {cfg.num_samples}")
    if cfg.finetune_optimizer not in OPTIMIZERS:
        raise ConfigError(f"--finetune-optimizer must be {'|'.join(OPTIMIZERS)}, got {cfg.finetune_optimizer!r}")
    if cfg.finetune_epochs < 0 or not cfg.finetune_lr > 0 or cfg.finetune_subset < 0 or cfg.finetune_batch_size < 0:
        raise ConfigError("--finetune-epochs, --finetune-subset and --finetune-batch-size must be >= 0 "
                          "(0 = from the data's size), --finetune-lr > 0")
    read_manifest(cfg.data_dir)
    check_mlflow_uri(cfg.mlflow_uri)
    if cfg.finetune_data and not Path(cfg.finetune_data).exists():
        raise ConfigError(f"fine-tuning data {cfg.finetune_data} does not exist")
    if "://" in cfg.storage:
        # The report, best.pt and the fine-tuning read and write the sweep directory as files.
        raise ConfigError(f"--storage {cfg.storage}: URIs are not supported yet; mount the bucket or file "
                          "share (NFS, a CSI driver) and pass its path")
    _check_writable(Path(cfg.storage).resolve())


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"storage {path} is not writable: {e.strerror or e}") from e


def base_run_config(cfg: SweepConfig) -> RunConfig:
    return RunConfig().replace(
        data={"data_dir": str(Path(cfg.data_dir).resolve()), "train_subset": cfg.train_subset},
        # Trials are compared on plain val accuracy (flip TTA would double every epoch's eval);
        # the test numbers before/after fine-tuning use TTA (evaluate_checkpoint).
        train={"epochs": cfg.asha.max_epochs, "seed": cfg.seed, "eval_flip_tta": False},
    )


def collect_trials(results: tune.ResultGrid, base: RunConfig, max_epochs: int,
                   resources: TrialResources) -> list[dict[str, Any]]:
    """One row per trial: sampled config, epochs run, best val acc and its checkpoint, ASHA stop,
    and its cost (wall, CPU- and GPU-seconds held, images; resnet_dist.report.trial_cost)."""
    cpus = resources.workers * resources.cpus_per_worker + TRIAL_DRIVER_CPUS
    gpus = resources.workers if resources.use_gpu else 0
    rows = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or df.empty or "val_acc" not in df:
            continue
        df = df.sort_values("epoch").drop_duplicates("epoch", keep="last")
        best_row = df.loc[df["val_acc"].idxmax()]
        run = trial_run_config(base, r.config)
        epochs_run = int(df["epoch"].max())
        rows.append({
            "trial_id": r.metrics.get("trial_id", Path(r.path).name), "status": "ERROR" if r.error else "TERMINATED",
            "flavor": run.model.flavor, "width": run.model.width, "block": run.model.block or "basic",
            "optimizer": run.optim.optimizer, "lr": run.optim.lr, "weight_decay": run.optim.weight_decay,
            "momentum": run.optim.momentum, "batch_size": run.train.batch_size,
            "label_smoothing": run.optim.label_smoothing, "schedule": run.optim.schedule,
            "epochs_run": epochs_run, "best_val_acc": float(best_row["val_acc"]),
            "best_checkpoint": best_row.get("checkpoint_path"),
            "stopped_early": epochs_run < max_epochs and not r.error,
            "stopped_at_epoch": epochs_run if epochs_run < max_epochs else None,
            "history": list(zip(df["epoch"].astype(int).tolist(), df["val_acc"].astype(float).tolist())),
            "config": run.to_dict(),
            "cost": trial_cost(df.to_dict("records"), cpus, gpus, max_epochs),
        })
    return rows


class LiveTrials(tune.Callback):
    """A rich live table of trials (status, epoch, val acc), refreshed as results arrive.
    Tune callbacks run in the driver, so this draws in the user's terminal."""

    def __init__(self, max_epochs: int = 0) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.max_epochs = max_epochs
        self.live = None   # made in setup(): Tune pickles its callbacks, and a Live holds locks
        self._terminal = True

    def __getstate__(self) -> dict[str, Any]:
        return {"rows": self.rows, "max_epochs": self.max_epochs, "live": None, "_terminal": self._terminal}

    def _table(self):
        from rich.table import Table

        t = Table(title="ASHA sweep")
        for col in ("trial", "status", "model", "optimizer", "lr", "epoch", "val acc"):
            t.add_column(col, justify="right")
        for tid, r in self.rows.items():
            t.add_row(tid, r["status"], r["model"], r["optimizer"], r["lr"], str(r.get("epoch", "")),
                      f"{r['val_acc']:.2%}" if "val_acc" in r else "")
        return t

    def _update(self, trial, status: str, result: dict | None = None) -> None:
        c = trial.config
        row = self.rows.setdefault(trial.trial_id, {
            "model": f"{c['flavor']} x{c['width']:g}", "optimizer": c["optimizer"],
            "lr": f"{c['lr_mult']:.2f}x", "status": status})
        changed = row["status"] != status or bool(result)
        row["status"] = status
        if result:
            row.update(epoch=int(result.get("epoch", 0)), val_acc=float(result.get("val_acc", 0.0)))
        if self.live is not None:
            self.live.update(self._table())
        if changed and not self._terminal:
            self._print_line(trial.trial_id, row, result)

    def _print_line(self, trial_id: str, row: dict[str, Any], result: dict | None) -> None:
        """Outside a terminal (a job log) a live table cannot redraw: one line per event instead."""
        from resnet_dist.console import console

        line = f"trial {trial_id} ({row['model']}, {row['optimizer']}, lr {row['lr']}): {row['status']}"
        if result:
            epoch_s = float(result.get("epoch_s", 0.0))
            left = max(0, self.max_epochs - row["epoch"])
            line += (f", epoch {row['epoch']}/{self.max_epochs}: val acc {row['val_acc']:.2%}, "
                     f"{float(result.get('images_per_s', 0.0)):.0f} img/s, {epoch_s:.1f} s/epoch"
                     + (f", ETA {left * epoch_s:.0f} s if ASHA keeps it" if left else ""))
        console.print(line, soft_wrap=True)

    def setup(self, **info) -> None:
        from rich.live import Live

        from resnet_dist.console import console

        self._terminal = console.is_terminal
        if self._terminal:
            self.live = Live(self._table(), console=console, refresh_per_second=2)
            self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "DONE" if self.rows[trial.trial_id].get("epoch") else "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "ERROR")

    def on_experiment_end(self, trials, **info) -> None:
        if self.live is not None:
            self.live.stop()
        else:
            from resnet_dist.console import console

            console.print(self._table())


def finetune_distributed(cfg: SweepConfig, source: Path, data_dir: Path, resources: TrialResources,
                         console, ft: FinetuneConfig | None = None) -> dict[str, Any]:
    """Fine-tune `source` on Ray Train (with `ft`, default cfg.finetune); returns the fine-tuned
    checkpoint dict."""
    from resnet_dist.console import eta_line, history_table

    ft = ft or cfg.finetune
    src = load_checkpoint(source)
    data_manifest = read_manifest(data_dir)
    # The backbone learnt on inputs normalised with the source data's statistics; keep them.
    manifest = {**data_manifest, "mean": src["mean"], "std": src["std"]}
    # CIFAR-10 itself: model selection is done, so train on train + val; a user's data keeps val held out.
    splits = ("train", "val") if not cfg.finetune_data else ("train",)
    n_train = sum(data_manifest["counts"][s] for s in splits)
    epochs, batch = auto_schedule(min(n_train, cfg.finetune_subset or n_train),
                                  RunConfig.from_dict(src["run_config"]).train.batch_size,
                                  cfg.finetune_epochs, cfg.finetune_batch_size)
    workers = resources.workers * resources.max_concurrent   # fine-tuning runs alone: use every trial slot
    batch = max(workers, batch - batch % workers)             # each worker gets batch / workers
    run = finetune_run_config(src["run_config"], epochs=epochs, lr=cfg.finetune_lr,
                              optimizer=cfg.finetune_optimizer, subset=cfg.finetune_subset,
                              batch_size=batch).replace(data={"data_dir": str(data_dir)})
    console.print(f"fine-tuning ({ft.mode}): {epochs} epochs of {n_train:,} images at batch {batch}, "
                  f"{cfg.finetune_optimizer} lr {cfg.finetune_lr:g}")
    tracking = replace(sweep_tracking(cfg), run_name=FINETUNE_RUN, tags={"source": str(source)})
    job = WorkerJob(run, manifest, default_threads(workers, resources.cpus_per_worker),
                    tags={"run": f"{cfg.name}-finetune"}, data_path=resources.data_path, train_splits=splits,
                    init_checkpoint=str(source), finetune=asdict(ft), tracking=tracking.to_dict())
    history: list[dict] = []

    def on_report(r: dict) -> None:
        history.append(r["metrics"][0])
        console.print(history_table(history, title=f"Fine-tuning ({ft.mode})"))
        console.print(eta_line(history, epochs, "fine-tuning"))

    result = fit_streaming(lambda cbs: build_trainer(
        job, str(data_dir), workers, FINETUNE_RUN, str(cfg.sweep_dir / "train"), resources.use_gpu,
        resources.cpus_per_worker, 1, cbs), on_report)
    with result.checkpoint.as_directory() as d:   # the last epoch: train+val leaves nothing to select on
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def finetune_stage(cfg: SweepConfig, source: Path, resources: TrialResources, console) -> dict[str, Any]:
    """Fine-tune `source` (cfg.finetune*) on Ray Train and evaluate it on the test split before
    and after; writes cfg.sweep_dir/finetuned.pt, which serving loads. "Before" is the source
    checkpoint, or for data with other classes the linear probe on its frozen backbone, whose
    head (probe.pt) fine-tuning then starts from (resnet_dist.finetune.finetune_start)."""
    selected = load_checkpoint(source)
    ft_data = (ensure_prepared(cfg.finetune_data, cfg.sweep_dir / "finetune-data") if cfg.finetune_data
               else Path(cfg.data_dir).resolve())
    start, ft, before, before_kind = finetune_start(selected, ft_data, cfg.finetune)
    if start is not selected:
        source = save_checkpoint(start, cfg.sweep_dir / PROBE_CHECKPOINT)
    console.print(f"before fine-tuning ({before_kind}): test accuracy {before.accuracy:.2%}")
    tuned = finetune_distributed(cfg, source, ft_data, resources, console, ft)
    after = evaluate_checkpoint(tuned, ft_data, "test")
    tuned["metrics"]["test_acc"] = after.accuracy   # serving reports it (GET /v1/model)
    save_checkpoint(tuned, cfg.sweep_dir / FINETUNED_CHECKPOINT)
    after_rep = classification_report(after.confusion, tuned["classes"])
    before_rep = classification_report(before.confusion, tuned["classes"])
    return {"tuned": tuned, "before": before_rep, "before_kind": before_kind, "after": after_rep, "data_dir": ft_data}


def finetune_job(source: Path, data: Path, out: Path, ft: FinetuneConfig, *, epochs: int, lr: float, optimizer: str,
                 subset: int, batch_size: int, workers: int, console, mlflow_uri: str | None = None) -> dict[str, Any]:
    """jobs/finetune.py on Ray: `data` is prepared Parquet or a raw image folder/archive;
    out/ gets finetuned.pt (what serving loads) and finetune.json."""
    prepared = is_prepared(data)
    cfg = SweepConfig(name=out.name, storage=str(out.parent), data_dir=str(data) if prepared else "",
                      finetune=ft, finetune_epochs=epochs, finetune_lr=lr, finetune_optimizer=optimizer,
                      finetune_data="" if prepared else str(data),
                      finetune_subset=subset, finetune_batch_size=batch_size, mlflow_uri=mlflow_uri)
    connect()
    resources = plan_resources(workers, 1, cluster_cpus(), cluster_gpus(), os.cpu_count() or 1)
    stage = finetune_stage(cfg, source, resources, console)
    summary = {"source": str(source), "mode": ft.mode, "before": stage["before"], "before_kind": stage["before_kind"],
               "after": stage["after"]}
    write_json(out / "finetune.json", summary)
    log_artifacts(sweep_tracking(cfg), FINETUNE_RUN, [out / FINETUNED_CHECKPOINT, out / "finetune.json"],
                  {"test_acc_before": stage["before"]["accuracy"], "test_acc_after": stage["after"]["accuracy"]})
    return summary


def run_sweep(cfg: SweepConfig, console) -> dict[str, Any]:
    """The whole loop; returns the summary also written to summary.json."""
    t0 = time.perf_counter()
    connect()
    sweep_dir = cfg.sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cfg.data_dir)
    resources = plan_resources(cfg.workers_per_trial, cfg.max_concurrent, cluster_cpus(), cluster_gpus(),
                               os.cpu_count() or 1)
    if cfg.data_path != "auto":
        resources = replace(resources, data_path=cfg.data_path)
    base = base_run_config(cfg)
    tracking = sweep_tracking(cfg)
    plan = {"base": base.to_dict(), "manifest": manifest, "resources": asdict(resources), "name": cfg.name,
            "train_storage": str(sweep_dir / "train"), "tracking": tracking.to_dict()}
    console.print(f"[bold]sweep[/bold] {cfg.name}: {cfg.num_samples} trials, ASHA max {cfg.asha.max_epochs} epochs, "
                  f"{resources.max_concurrent} at a time x {resources.workers} worker(s) x {resources.cpus_per_worker:g} CPU"
                  f"{' + 1 GPU' if resources.use_gpu else ''} -> {sweep_dir}")
    tuner = build_tuner("tune", str(sweep_dir), cfg.space, cfg.asha, cfg.num_samples, cfg.seed, plan, resources,
                        callbacks=[LiveTrials(cfg.asha.max_epochs)])
    results = tuner.fit()
    trials = collect_trials(results, base, cfg.asha.max_epochs, resources)
    if not trials:
        raise RuntimeError(f"no trial reported a result; see {sweep_dir / 'tune'}")
    best = max(trials, key=lambda t: t["best_val_acc"])
    selected = load_checkpoint(best["best_checkpoint"])
    save_checkpoint(selected, sweep_dir / SELECTED_CHECKPOINT)
    write_json(sweep_dir / "best_config.json", {"trial_id": best["trial_id"], "val_acc": best["best_val_acc"],
                                                "epoch": selected["epoch"], "config": best["config"]})
    console.print(f"best trial {best['trial_id']}: val acc {best['best_val_acc']:.2%} at epoch {selected['epoch']}")
    log_artifacts(tracking, best["trial_id"], [sweep_dir / SELECTED_CHECKPOINT, sweep_dir / "best_config.json"])

    stage = finetune_stage(cfg, sweep_dir / SELECTED_CHECKPOINT, resources, console)
    before_rep, after_rep = stage["before"], stage["after"]
    report = write_report(
        sweep_dir, title=f"Sweep {cfg.name}", trials=trials, max_epochs=cfg.asha.max_epochs, best=best,
        before=before_rep, after=after_rep,
        finetune={"mode": cfg.finetune.mode, "epochs": stage["tuned"]["epoch"],
                  "data": cfg.finetune_data or "CIFAR-10 train+val", "before": stage["before_kind"]},
        notes=[f"data: {cfg.data_dir} (fingerprint {manifest['fingerprint'][:16]})",
               f"wall time of the pipeline up to this report: {time.perf_counter() - t0:.0f} s"],
    )
    summary = {"name": cfg.name, "sweep_dir": str(sweep_dir), "trials": [{k: v for k, v in t.items() if k != "config"}
               for t in trials], "best": best["trial_id"], "best_val_acc": best["best_val_acc"],
               "before": before_rep, "before_kind": stage["before_kind"], "after": after_rep, "report": str(report),
               "stopped_early": sum(t["stopped_early"] for t in trials), "cost": sweep_cost(trials),
               "seconds": time.perf_counter() - t0}
    write_json(sweep_dir / "summary.json", summary)
    log_artifacts(tracking, FINETUNE_RUN, [sweep_dir / FINETUNED_CHECKPOINT, report, sweep_dir / "summary.json",
                                           sweep_dir / "trials.csv"],
                  {"test_acc_before": before_rep["accuracy"], "test_acc_after": after_rep["accuracy"]})
    return summary


def sweep_tracking(cfg: SweepConfig) -> TrackingConfig:
    """TensorBoard and MLflow of a sweep: its directory's tensorboard/ and mlruns/, one
    experiment named after the sweep, one run per trial (its id) and one for fine-tuning."""
    return TrackingConfig.for_dir(cfg.sweep_dir, cfg.name, "", cfg.mlflow_uri)


def add_sweep_args(p) -> None:
    """Every SweepConfig field as an option; unset options keep the preset's value."""
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="local", help="base settings (default: %(default)s)")
    a("--name", help="sweep name: the directory under --storage; re-running the same name resumes it")
    a("--storage", help="where sweeps live: a local dir or a shared mount (NFS, a mounted bucket); default: runs")
    a("--data", dest="data_dir", help="prepared Parquet data (default: data/cifar10)")
    a("--num-samples", type=int, help="trials to sample")
    a("--max-epochs", type=int, help="ASHA max_t: epochs of a trial never stopped")
    a("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    a("--reduction-factor", type=int, help="ASHA: keep 1/N of the trials at each rung")
    a("--workers-per-trial", type=int, help="Ray Train workers of each trial")
    a("--max-concurrent", type=int, help="upper bound on trials at once (the cluster may allow fewer)")
    a("--train-subset", type=int, help="train images per epoch in the sweep (0 = all)")
    a("--seed", type=int, help="seed of the search")
    a("--data-path", choices=["auto", "pipeline", "device"],
      help="augment in the Ray Data pipeline, or on each worker's device after one read (auto: device on GPUs)")
    for name, kind in (("flavors", str), ("widths", float), ("blocks", str), ("optimizers", str),
                       ("momentum", float), ("batch-sizes", int), ("label-smoothing", float), ("schedules", str)):
        a(f"--{name}", nargs="+", type=kind, help=f"search space: {name} to choose from")
    a("--lr-mult", nargs=2, type=float, metavar=("LOW", "HIGH"), help="log-uniform multiplier of the optimizer's base lr")
    a("--weight-decay", nargs=2, type=float, metavar=("LOW", "HIGH"), help="log-uniform weight decay range")
    a("--finetune-mode", choices=["head", "full", "last-stage"], help="what fine-tuning trains")
    a("--finetune-backbone-lr-scale", type=float, help="lr multiplier of the pretrained layers that train")
    a("--finetune-reset-head", action=argparse.BooleanOptionalAction,
      help="a new random head even when the classes are the same (it is always new for other classes)")
    a("--finetune-epochs", type=int, help="epochs of fine-tuning (0 = enough for 300 optimizer steps)")
    a("--finetune-lr", type=float, help="peak lr of fine-tuning (the head's; see --finetune-mode)")
    a("--finetune-optimizer", choices=OPTIMIZERS, help="optimizer of fine-tuning (default: sgd)")
    a("--finetune-data", help="an image folder/archive with its own classes (default: CIFAR-10 train+val)")
    a("--finetune-subset", type=int, help="fine-tuning images per epoch (0 = all)")
    a("--finetune-batch-size", type=int, help="global batch of fine-tuning (0 = ~1/20 of the images, "
                                              "16 to the selected trial's batch)")
    a("--serve", action=argparse.BooleanOptionalAction, help="deploy the fine-tuned model on Ray Serve at the end")
    a("--mlflow-uri", help="MLflow tracking URI, e.g. http://mlflow:5000 (default: a file store in the sweep "
                           "directory, mlruns/; off = no MLflow)")


def sweep_config_from_args(args) -> SweepConfig:
    cfg = PRESETS[args.preset]
    top = {k: getattr(args, k) for k in ("name", "storage", "data_dir", "num_samples", "workers_per_trial",
                                         "max_concurrent", "train_subset", "seed", "data_path", "finetune_epochs",
                                         "finetune_lr", "finetune_optimizer", "finetune_data", "finetune_subset",
                                         "finetune_batch_size", "serve", "mlflow_uri") if getattr(args, k) is not None}
    space = {k: tuple(getattr(args, k)) for k in ("flavors", "widths", "blocks", "optimizers", "momentum",
                                                   "batch_sizes", "label_smoothing", "schedules", "lr_mult",
                                                   "weight_decay") if getattr(args, k) is not None}
    asha = {k: getattr(args, k) for k in ("max_epochs", "grace_period", "reduction_factor")
            if getattr(args, k) is not None}
    ft = {k: v for k, v in (("mode", args.finetune_mode), ("backbone_lr_scale", args.finetune_backbone_lr_scale),
                            ("reset_head", args.finetune_reset_head)) if v is not None}
    if top.get("finetune_data"):
        # A user's own data: the measured own-data defaults and a schedule sized to it (the
        # presets' fine-tuning settings are for CIFAR-10 train+val); options typed still win.
        top = {"finetune_epochs": 0, "finetune_batch_size": 0, "finetune_optimizer": OWN_DATA_DEFAULTS["optimizer"],
               "finetune_lr": OWN_DATA_DEFAULTS["lr"], **top}
        ft = {"mode": OWN_DATA_DEFAULTS["mode"], "backbone_lr_scale": OWN_DATA_DEFAULTS["backbone_lr_scale"], **ft}
    # User paths are made absolute once, here: trials, Train workers and the job's copy of
    # the code (ray job submit --working-dir) run in other directories.
    for key in ("storage", "data_dir", "finetune_data"):
        if top.get(key) and "://" not in top[key]:   # URIs are left as given (and refused in validate)
            top[key] = str(Path(top[key]).resolve())
    cfg = replace(cfg, **top, space=replace(cfg.space, **space), asha=replace(cfg.asha, **asha))
    return replace(cfg, finetune=replace(cfg.finetune, **ft))


def serve_and_probe(cfg: SweepConfig, console, probes: int = 8) -> str:
    """Deploy the fine-tuned model on Ray Serve, send `probes` real test images, print
    what came back; returns the app's URL."""
    import io

    import httpx
    import numpy as np
    from PIL import Image
    from rich.table import Table

    from cluster.serve import ServeConfig, deploy
    from resnet_dist.data import read_split

    console.print(f"deploying {cfg.sweep_dir / FINETUNED_CHECKPOINT} on Ray Serve, then {probes} test images...",
                  soft_wrap=True)
    # Two replicas' worth of CPU is not there on a small machine; a sweep's model is small.
    url = deploy(ServeConfig(checkpoint=str(cfg.sweep_dir), num_cpus=min(1.0, max(0.5, cluster_cpus() - 1))))
    data_dir = cfg.sweep_dir / "finetune-data" if cfg.finetune_data else Path(cfg.data_dir)
    test = read_split(data_dir, "test")
    table = Table(title=f"Ray Serve at {url}: {probes} test images")
    for col in ("image", "true class", "predicted", "probability"):
        table.add_column(col)
    with httpx.Client(timeout=30) as client:
        # Spread over the split, which is stored class by class, so the probes show several classes.
        for i in np.linspace(0, len(test.labels) - 1, probes).astype(int).tolist():
            buf = io.BytesIO()
            Image.fromarray(test.images[i]).save(buf, format="PNG")
            r = client.post(f"{url}/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
            r.raise_for_status()
            top = r.json()["predictions"][0]
            table.add_row(str(i), test.classes[test.labels[i]], top["class"], f"{top['probability']:.2f}")
    console.print(table)
    console.print(f"try it: curl -s -X POST --data-binary @image.png -H 'content-type: image/png' {url}/v1/predict")
    return url
