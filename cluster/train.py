"""Ray Train: the DDP worker loop and the TorchTrainer around it.

The worker loop is resnet_dist's engine fed by Ray Data; this file only adds
what Ray needs: the config dict, the dataset shards, `prepare_model` (DDP),
`ray.train.report` once per epoch with a checkpoint, and restore from
`ray.train.get_checkpoint()` after a failure or a re-run.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray
import ray.train
import ray.train.torch
import torch

from cluster.data import build_datasets, materialize, torch_batches
from cluster.metrics import TrainMetrics
from cluster.tracking import TRAIN_EXPERIMENT, Tracker, TrackingConfig, log_artifacts
from resnet_dist.checkpoint import CHECKPOINT_FILE, build_checkpoint, load_checkpoint, save_checkpoint
from resnet_dist.config import ConfigError, ModelConfig, RunConfig
from resnet_dist.engine import evaluate, train_epoch
from resnet_dist.finetune import FinetuneConfig, prepare_finetune, set_train_mode
from resnet_dist.loader import ArrayLoader
from resnet_dist.training import build_training, epoch_record, restore_training

# Keep this many checkpoints per run, ranked by validation accuracy.
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class WorkerJob:
    """Everything a Train worker needs, sent as a plain dict (`train_loop_config`)."""

    run: RunConfig
    manifest: dict[str, Any]      # classes, image_shape, counts, mean, std, fingerprint
    threads: int = 1              # torch CPU threads per worker
    tags: dict[str, str] = field(default_factory=dict)   # metric labels, e.g. the trial id
    # "pipeline": Ray Data augments every epoch (CPU default); "device": each worker reads
    # its shard once and augments on its device (GPU default, airbench-style).
    data_path: str = "pipeline"
    train_splits: tuple[str, ...] = ("train",)   # fine-tuning on CIFAR-10 trains on train + val
    init_checkpoint: str = ""                    # fine-tuning: the checkpoint to start from
    finetune: dict[str, Any] | None = None       # fine-tuning: FinetuneConfig fields
    tracking: dict[str, Any] | None = None       # cluster.tracking.TrackingConfig fields; rank 0 logs

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run.to_dict(), "manifest": self.manifest, "threads": self.threads, "tags": self.tags,
                "data_path": self.data_path, "train_splits": list(self.train_splits),
                "init_checkpoint": self.init_checkpoint, "finetune": self.finetune, "tracking": self.tracking}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkerJob":
        return cls(RunConfig.from_dict(d["run"]), d["manifest"], d["threads"], d["tags"], d["data_path"],
                   tuple(d["train_splits"]), d["init_checkpoint"], d["finetune"], d.get("tracking"))


def steps_per_epoch(job: WorkerJob) -> int:
    n = sum(job.manifest["counts"][s] for s in job.train_splits)
    if job.run.data.train_subset:
        n = min(n, job.run.data.train_subset)
    return n // job.run.train.batch_size


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job = WorkerJob.from_dict(config)
    cfg = job.run
    torch.set_num_threads(job.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    classes = job.manifest["classes"]
    model_cfg = ModelConfig(**{**cfg.model.__dict__, "num_classes": len(classes)})
    torch.manual_seed(cfg.train.seed)   # same initial weights on every rank (DDP also broadcasts them)
    per_worker_batch = cfg.train.batch_size // world

    model, lr_scale, train_mode = None, None, None
    if job.finetune is not None:
        ft = FinetuneConfig(**job.finetune)
        model, model_cfg, lr_scale = prepare_finetune(load_checkpoint(job.init_checkpoint), len(classes), ft)
        train_mode = set_train_mode   # frozen BN layers stay in eval mode
    state = build_training(cfg, model_cfg, steps_per_epoch(job), device, model=model, lr_scale=lr_scale,
                           wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    start_epoch, history = 0, []
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            ckpt = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        start_epoch = restore_training(state, ckpt)
        history = list(ckpt["extra"].get("history", []))

    metrics = TrainMetrics({**job.tags, "rank": str(rank)})
    tracker = None
    if job.tracking and rank == 0:
        tracker = Tracker(TrackingConfig(**job.tracking), params={"config": cfg.to_dict(), **job.tags,
                                                                 "finetune": job.finetune or {}})
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    on_device, val_on_device = None, None
    if job.data_path == "device":
        images, labels = materialize(train_shard, device)
        on_device = ArrayLoader(images, labels, per_worker_batch, job.manifest["mean"], job.manifest["std"],
                                data=cfg.data, train=True, seed=cfg.train.seed * 1000 + rank)
        # 5,000 normalised val images = 61 MB of float32; re-running Ray Data for them every
        # epoch costs seconds of task start-up on a small node.
        vx, vy = materialize(val_shard, device)
        val_on_device = list(zip(vx.split(cfg.train.eval_batch_size), vy.split(cfg.train.eval_batch_size)))
    for epoch in range(start_epoch, cfg.train.epochs):
        if on_device is not None:
            on_device.set_epoch(epoch)
        batches = on_device if on_device is not None else torch_batches(train_shard, per_worker_batch, train=True, device=device)
        stats = train_epoch(
            state.model, batches, state.optimizer, state.scheduler, state.loss_fn, device, state.precision,
            state.scaler, cfg.train.grad_accum, train_mode=train_mode,
        )
        val_batches = val_on_device if val_on_device is not None else torch_batches(
            val_shard, cfg.train.eval_batch_size, train=False, device=device)
        val = evaluate(state.model, val_batches, len(classes), device, state.precision, cfg.train.eval_flip_tta)
        record = epoch_record(epoch + 1, stats, val, state.scheduler.get_last_lr()[0])
        record["val_images"] = val.images
        record["rank"] = rank
        # Sum of all weights in float64: equal on every rank iff DDP kept the replicas in sync.
        record["param_checksum"] = float(sum(p.detach().double().sum() for p in state.model.parameters()))
        record["resumed_from_epoch"] = start_epoch
        history.append(record)
        metrics.observe_epoch(stats, record)
        if tracker is not None:
            tracker.log_epoch(record)
        _report(record, history, state, job, model_cfg, rank)
    if tracker is not None:
        tracker.close()


def _report(record: dict, history: list, state, job: WorkerJob, model_cfg: ModelConfig, rank: int) -> None:
    """All ranks report (it is a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(record, checkpoint=None)
        return
    ckpt = build_checkpoint(
        state.model, model_config=model_cfg, run_config=job.run.to_dict(), classes=job.manifest["classes"],
        mean=job.manifest["mean"], std=job.manifest["std"], data_fingerprint=job.manifest["fingerprint"],
        epoch=int(record["epoch"]), metrics=record, optimizer=state.optimizer, scheduler=state.scheduler,
        extra={"history": history},
    )
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(ckpt, Path(d) / CHECKPOINT_FILE)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_epoch_{int(record['epoch']):04d}")


def check_resources(cfg: RunConfig, workers: int, use_gpu: bool) -> None:
    """Clear errors before any worker starts: batch split and cluster capacity."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if cfg.train.batch_size % workers:
        raise ConfigError(f"global batch {cfg.train.batch_size} is not divisible by {workers} workers")
    if (cfg.train.batch_size // workers) % cfg.train.grad_accum:
        raise ConfigError(f"per-worker batch {cfg.train.batch_size // workers} is not divisible by grad_accum {cfg.train.grad_accum}")
    total = ray.cluster_resources()
    need, have = ("GPU", total.get("GPU", 0)) if use_gpu else ("CPU", total.get("CPU", 0))
    if workers > have:
        raise ConfigError(f"{workers} workers need {workers} {need}s but the Ray cluster has {have:g}")


def build_trainer(
    job: WorkerJob,
    data_dir: str,
    workers: int,
    name: str,
    storage_path: str,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    callbacks: Sequence[Any] = (),
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for `job`; re-running with the same name and storage resumes it."""
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        datasets=build_datasets(data_dir, job.manifest, job.run.data, raw_train=job.data_path == "device",
                                train_splits=job.train_splits),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=KEEP_CHECKPOINTS, checkpoint_score_attribute="val_acc", checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks),
        ),
    )


def run_distributed(cfg: RunConfig, run_dir: str, workers: int, threads: int = 0,
                    cpus_per_worker: float | None = None, max_failures: int = 2,
                    data_path: str = "auto", mlflow_uri: str | None = None) -> dict[str, Any]:
    """`jobs/train.py` without `--local`: DDP on Ray Train, the same outputs as a local run.

    `run_dir` is STORAGE/NAME for Ray Train: re-running with the same run dir
    resumes from its latest checkpoint.
    """
    from cluster.progress import fit_streaming
    from cluster.runtime import cluster_gpus, connect
    from resnet_dist.console import console, eta_line, history_table, print_eval_report
    from resnet_dist.data import read_manifest
    from resnet_dist.training import BEST_CHECKPOINT, LAST_CHECKPOINT, evaluate_checkpoint, write_summary

    connect()
    cfg = cfg.replace(data={"data_dir": str(Path(cfg.data.data_dir).resolve())})   # workers run in another cwd
    use_gpu = cluster_gpus() > 0
    check_resources(cfg, workers, use_gpu)
    manifest = read_manifest(cfg.data.data_dir)
    cpus = cpus_per_worker if cpus_per_worker is not None else default_cpus_per_worker(workers, use_gpu)
    run_path = Path(run_dir).resolve()
    tracking = TrackingConfig.for_dir(run_path, TRAIN_EXPERIMENT, run_path.name, mlflow_uri)
    job = WorkerJob(cfg, manifest, threads or default_threads(workers, cpus), tags={"run": run_path.name},
                    data_path=data_path if data_path != "auto" else ("device" if use_gpu else "pipeline"),
                    tracking=tracking.to_dict())
    console.print(f"[bold]Ray Train[/bold]: {workers} workers x {cpus:g} CPU{' + 1 GPU' if use_gpu else ''}, "
                  f"{job.data_path} data path, "
                  f"{cfg.model.flavor}, {cfg.train.epochs} epochs, global batch {cfg.train.batch_size} -> {run_path}")
    history: list[dict] = []

    run_path.mkdir(parents=True, exist_ok=True)

    def on_report(report: dict) -> None:
        history.append(report["metrics"][0])
        # Every rank's report, one JSON line per epoch: lets a user (and the tests) compare ranks.
        with open(run_path / "reports.jsonl", "a") as f:
            f.write(json.dumps(report["metrics"]) + "\n")
        console.print(history_table(history, title=f"Training ({workers} workers)"))
        console.print(eta_line(history, cfg.train.epochs, "training"))

    t0 = time.perf_counter()
    result = fit_streaming(
        lambda callbacks: build_trainer(job, cfg.data.data_dir, workers, run_path.name, str(run_path.parent),
                                        use_gpu, cpus, max_failures, callbacks),
        on_report,
    )
    console.print(f"fit() took {time.perf_counter() - t0:.1f} s")
    best_ckpt, _ = max(result.best_checkpoints, key=lambda cm: cm[1]["val_acc"])
    with best_ckpt.as_directory() as d:
        best = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    with result.checkpoint.as_directory() as d:
        last = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    save_checkpoint(last, run_path / LAST_CHECKPOINT)
    test = evaluate_checkpoint(best, cfg.data.data_dir, "test", flip_tta=cfg.train.eval_flip_tta)
    best["metrics"]["test_acc"] = test.accuracy   # serving reports it (GET /v1/model)
    save_checkpoint(best, run_path / BEST_CHECKPOINT)
    summary = write_summary(run_path, cfg, last["extra"]["history"], best, test)
    log_artifacts(tracking, run_path.name, [run_path / BEST_CHECKPOINT, run_path / "metrics.json"],
                  {"test_acc": test.accuracy})
    print_eval_report(summary["test"], "test (best val checkpoint)")
    return summary


def default_threads(workers: int, cpus_per_worker: float) -> int:
    """torch threads per worker: on one node, its cores split evenly (logical CPU
    shares may be fractional to leave room for Ray Data); else the worker's CPU share."""
    from cluster.runtime import cluster_cpus

    if len(ray.nodes()) == 1:
        return max(1, int(cluster_cpus() // workers))
    return max(1, round(cpus_per_worker))


def default_cpus_per_worker(workers: int, use_gpu: bool) -> float:
    """Logical CPUs per Train worker: a whole share of the cluster, less what the
    Ray Data pipeline needs to keep feeding them (one CPU's worth, spread)."""
    from cluster.runtime import cluster_cpus

    if use_gpu:
        return 1.0
    spare = cluster_cpus() - 1.0   # leave one CPU for Ray Data's read/augment tasks
    return max(0.5, min(1.0, spare / workers)) if spare > 0 else 0.5
