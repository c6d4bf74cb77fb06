"""Ray Train: the DDP worker loop and the TorchTrainer around it.

The worker runs resnet_dist's one training loop (`resnet_dist.training.run_loop`), fed by
Ray Data; this file only adds what Ray needs: the config dict, the dataset shards,
`prepare_model` (DDP), a sink that calls `ray.train.report` with a checkpoint, and the
restore from `ray.train.get_checkpoint()` after a failure or a re-run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import ray.train
import ray.train.torch
import torch

from cluster.data import build_datasets, torch_batches
from cluster.metrics import TrainMetrics
from cluster.progress import fit_streaming
from cluster.resources import Resources, check_workers
from cluster.tracking import TRAIN_RUN_ENTRIES, Tracker, TrackerSink, TrackingConfig
from resnet_dist import storage
from resnet_dist.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from resnet_dist.config import ConfigError, RunConfig
from resnet_dist.local import loader_seed, train_loader, val_loader
from resnet_dist.spec import RunSpec
from resnet_dist.training import Position, Sink, Sinks, build_state, restore_training, run_loop

# Keep this many checkpoints per run, ranked by validation accuracy.
KEEP_CHECKPOINTS = 2
# A preempted (spot) node is not the run's fault: Ray Train restarts from the last checkpoint
# without limit, counted apart from `max_failures` (crashes, lost nodes).
MAX_PREEMPTION_FAILURES = -1
# The Train controller polls its workers (and so drains their reports) at this interval, 2 s by
# default; 0.2 s cuts a few seconds off every fit() and report. `fit()` forwards it to the
# controller from the environment of the process that calls it, which for a sweep is each
# trial's own process, not the sweep driver: so it is set where the trainer is built.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


@dataclass(frozen=True)
class WorkerJob:
    """Everything a Train worker needs, sent as a plain dict (`train_loop_config`)."""

    spec: RunSpec
    threads: int = 1              # torch CPU threads per worker
    tags: dict[str, str] = field(default_factory=dict)   # metric labels, e.g. the trial id
    # "pipeline": Ray Data augments every epoch (CPU default); "device": each worker reads
    # its shard once and augments on its device (GPU default, airbench-style).
    data_path: str = "pipeline"
    tracking: dict[str, Any] | None = None       # cluster.tracking.TrackingConfig fields; rank 0 logs

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "threads": self.threads, "tags": self.tags,
                "data_path": self.data_path, "tracking": self.tracking}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkerJob":
        return cls(RunSpec.from_dict(d["spec"]), d["threads"], d["tags"], d["data_path"], d["tracking"])


class RaySink(Sink):
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def report(self, record: dict[str, Any], history: list[dict[str, Any]], checkpoint: Callable[[], dict]) -> None:
        metrics = {**record, "rank": self.rank}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(checkpoint(), Path(d) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=checkpoint_dir_name(record))


class MetricsSink(Sink):
    """Prometheus gauges of this worker (cluster/metrics.py), set at every report."""

    def __init__(self, metrics: TrainMetrics) -> None:
        self.metrics = metrics

    def report(self, record, history, checkpoint) -> None:
        self.metrics.observe(record)


def job_sinks(job: WorkerJob, rank: int, report: Sink) -> Sinks:
    """Where a worker's reports go: Prometheus gauges, on rank 0 the run's TensorBoard/MLflow
    tracking, and `report` (to Ray)."""
    tracker = None
    if job.tracking and rank == 0:
        tracker = Tracker(TrackingConfig(**job.tracking), params={"config": job.spec.run.to_dict(), **job.tags,
                                                                 "finetune": job.spec.extra.get("finetune", {})})
    train = job.spec.run.train
    # Reports inside epochs (rungs, report_every_images) are tracked at the optimizer step.
    per_epoch = not (train.report_every_images or train.report_at_images)
    # `report` last: a Tune trial that is paused or stopped at a rung never returns from it.
    return Sinks(MetricsSink(TrainMetrics({**job.tags, "rank": str(rank)})),
                 TrackerSink(tracker, per_epoch) if tracker else None, report)


def checkpoint_dir_name(record: dict[str, Any]) -> str:
    """checkpoint_epoch_0004 at an epoch's end, checkpoint_step_0000123 between."""
    epoch = record["epoch"]
    return (f"checkpoint_epoch_{int(epoch):04d}" if float(epoch).is_integer()
            else f"checkpoint_step_{int(record['step']):07d}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job = WorkerJob.from_dict(config)
    spec, cfg = job.spec, job.spec.run
    torch.set_num_threads(job.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Val is read by every worker straight from its Parquet shards (it is small, and Ray Data
    # would cost seconds of start-up in every trial); each evaluates every world-th image.
    val = val_loader(spec, device, rank, world)
    if job.data_path == "device":
        # Each worker reads its equal share of train once, straight from the shards, and
        # augments it on its device every epoch: the local run's batches (the parity tests).
        loader = train_loader(spec, device, rank, world)
        steps = len(loader)

        def train_batches(epoch: int):
            loader.set_epoch(epoch)
            return loader
    else:
        # Ray Data reads, splits (streaming_split(equal=True): train_images // world rows each)
        # and augments train every epoch.
        train_shard = ray.train.get_dataset_shard("train")
        per_worker_batch = cfg.train.batch_size // world
        steps = (spec.train_images // world) // per_worker_batch

        def train_batches(epoch: int):
            # The local shuffle is seeded per run, epoch and rank: a run is reproducible.
            return torch_batches(train_shard, per_worker_batch, train=True, device=device,
                                 shuffle_seed=loader_seed(cfg.train.seed, rank) * 1000 + epoch)

    state = build_state(spec, device, steps, wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    start, history = Position(), []
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            start, history = restore_training(state, load_checkpoint(Path(d) / CHECKPOINT_FILE))
    sink = job_sinks(job, rank, RaySink(rank))
    try:
        run_loop(state, spec, train_batches, lambda: val, sink, steps, start, history)
    finally:
        sink.close()


def check_resources(cfg: RunConfig, workers: int, use_gpu: bool, min_workers: int = 0) -> None:
    """Clear errors before any worker starts: batch split and cluster capacity. An elastic run
    that lost workers trains at the per-worker batch global // world (256 at 3 workers: 85
    each, 255 in all) until it grows back, so only grad_accum is checked at every size."""
    check_workers(workers, min_workers)
    if cfg.train.batch_size % workers:
        raise ConfigError(f"global batch {cfg.train.batch_size} is not divisible by {workers} workers")
    for world in range(min_workers or workers, workers + 1):
        if (cfg.train.batch_size // world) % cfg.train.grad_accum:
            raise ConfigError(f"per-worker batch {cfg.train.batch_size // world} is not divisible by grad_accum {cfg.train.grad_accum}")
    total = ray.cluster_resources()
    need, have = ("GPU", total.get("GPU", 0)) if use_gpu else ("CPU", total.get("CPU", 0))
    if workers > have:
        raise ConfigError(f"{workers} workers need {workers} {need}s but the Ray cluster has {have:g}")


def build_trainer(job: WorkerJob, res: Resources, name: str, storage_path: str, max_failures: int = 2,
                  callbacks: Sequence[Any] = ()) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for `job` sized by `res`; re-running with the same name and storage resumes it."""
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)   # a user's own setting wins
    spec = job.spec
    # Ray Data feeds the pipeline path only (train: read, split across the workers, augmented
    # every epoch). The device path's workers read their shares straight from the Parquet
    # shards (resnet_dist.local.train_loader), as every worker reads val: a Ray Data read of
    # a data set that fits in memory costs ~10 s of task and actor start-up per trial on 2
    # cores (docs/benchmarks.md, "Start-up of a run") and buys nothing when the augmentation
    # runs on the device.
    pipeline = job.data_path == "pipeline"
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        datasets=build_datasets(spec.run.data.data_dir, spec.manifest(), spec.run.data, splits=("train",),
                                train_splits=spec.train_splits, seed=spec.run.train.seed) if pipeline else None,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]) if pipeline else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers(), use_gpu=res.use_gpu, resources_per_worker={"CPU": res.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=KEEP_CHECKPOINTS, checkpoint_score_attribute="val_acc", checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                                   max_preemption_failures=MAX_PREEMPTION_FAILURES),
            callbacks=list(callbacks),
        ),
    )


def run_train(job: WorkerJob, res: Resources, run_path: str | os.PathLike, max_failures: int,
              on_report: Callable[[dict], None]) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Run `job` on Ray Train at `run_path` (STORAGE/NAME, a path or a URI: a re-run resumes
    there), calling `on_report` in this process for every report. Returns (the checkpoint the
    run delivers: its last when it trained on val, else its best on val; the last checkpoint;
    the history)."""
    target = storage.resolve(run_path)
    result = fit_streaming(lambda callbacks: build_trainer(job, res, storage.name(target), storage.parent(target),
                                                           max_failures, callbacks), on_report)
    with result.checkpoint.as_directory() as d:
        last = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    delivered = last
    if not job.spec.selects_last:
        best, _ = max(result.best_checkpoints, key=lambda cm: cm[1]["val_acc"])
        with best.as_directory() as d:
            delivered = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    return delivered, last, last["extra"]["history"]


def report_logger(run_path: Path, title: str, epochs: int) -> Callable[[dict], None]:
    """`on_report` of a job: every rank's report as one JSON line in run_path/reports.jsonl (a
    user, and the tests, can compare ranks), then the history table and a progress line."""
    from termui.console import console, eta_line, history_table

    history: list[dict] = []
    run_path.mkdir(parents=True, exist_ok=True)

    def on_report(report: dict) -> None:
        history.append(report["metrics"][0])
        with open(run_path / "reports.jsonl", "a") as f:
            f.write(json.dumps(report["metrics"]) + "\n")
        console.print(history_table(history, title=title))
        console.print(eta_line(history, epochs, title.lower()))

    return on_report


def run_distributed(cfg: RunConfig, run_dir: str, workers: int, threads: int = 0,
                    cpus_per_worker: float | None = None, max_failures: int = 2,
                    data_path: str = "auto", mlflow_uri: str | None = None, restart: bool = False,
                    min_workers: int = 0) -> dict[str, Any]:
    """`jobs/train.py` without `--local`: DDP on Ray Train, the same outputs as a local run
    (resnet_dist.outputs). `run_dir` is STORAGE/NAME for Ray Train: re-running with the same
    run dir resumes from its latest checkpoint."""
    from cluster.resources import plan_for_cluster
    from cluster.runtime import connect
    from cluster.tracking import TRAIN_EXPERIMENT, log_artifacts
    from resnet_dist.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT
    from resnet_dist.data import read_manifest
    from resnet_dist.local import METRICS_FILE
    from resnet_dist.outputs import wrap_up
    from termui.console import console

    connect()
    res = plan_for_cluster(workers)
    res = replace(res, threads=threads or res.threads, cpus_per_worker=cpus_per_worker or res.cpus_per_worker,
                  data_path=res.data_path if data_path == "auto" else data_path, min_workers=min_workers)
    check_resources(cfg, workers, res.use_gpu, min_workers)
    spec = RunSpec.from_manifest(cfg, read_manifest(cfg.data.data_dir))
    spec.steps_per_epoch()   # a clear error when there is not one batch
    # A URI run dir: Ray Train writes its checkpoints there itself, this driver its own files
    # (best.pt, metrics.json, reports.jsonl) to a local copy mirrored to it (resnet_dist.storage).
    mirror = storage.Mirror(run_dir, skip=TRAIN_RUN_ENTRIES)
    run_path = mirror.local
    tracking = TrackingConfig.for_dir(mirror.target, TRAIN_EXPERIMENT, storage.name(mirror.target), mlflow_uri)
    job = WorkerJob(spec, res.threads, tags={"run": run_path.name}, data_path=res.data_path,
                    tracking=tracking.to_dict())
    console.print(f"[bold]Ray Train[/bold]: {workers} workers x {res.cpus_per_worker:g} CPU"
                  f"{' + 1 GPU' if res.use_gpu else ''}, {job.data_path} data path, {cfg.model.flavor}, "
                  f"{cfg.train.epochs} epochs, global batch {cfg.train.batch_size} -> {mirror.target}")
    from cluster.lock import DriverLock
    from resnet_dist.identity import claim_mirrored, run_identity

    with mirror, DriverLock(run_path, "run"):
        claim_mirrored(mirror, run_identity(cfg.to_dict(), spec.fingerprint), "run", restart)
        best, last, history = run_train(job, res, mirror.target, max_failures,
                                        report_logger(run_path, f"Training ({workers} workers)", cfg.train.epochs))
        save_checkpoint(last, run_path / LAST_CHECKPOINT)
        summary = wrap_up(run_path, best, history, cfg.data.data_dir, checkpoint_name=BEST_CHECKPOINT,
                          summary_name=METRICS_FILE, flip_tta=cfg.train.eval_flip_tta)
    log_artifacts(tracking, storage.name(mirror.target), [run_path / BEST_CHECKPOINT, run_path / METRICS_FILE],
                  {"test_acc": summary["test"]["accuracy"]})
    return summary
