"""The sweep's configuration: `SweepConfig`, its named presets and its checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cluster.resources import check_workers
from cluster.tracking import TrackingConfig, check_mlflow_uri
from cluster.tune import RungConfig, SearchSpace
from resnet_dist import storage
from resnet_dist.config import ConfigError, FinetuneConfig, RunConfig
from resnet_dist.data import read_manifest
from resnet_dist.spec import RunSpec


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    storage: str = "runs"
    data_dir: str = "data/cifar10"
    space: SearchSpace = field(default_factory=SearchSpace)
    rungs: RungConfig = field(default_factory=RungConfig)
    num_samples: int = 4
    # The first trial is the centre of the space (SearchSpace.center: the preset's base recipe).
    center_first: bool = True
    # Trials validate on N evenly spaced val images (0 = all): the same images at every rung.
    val_subset: int = 0
    workers_per_trial: int = 1
    # Elastic trials: after a lost node a trial goes on from its last checkpoint with as few
    # as this many workers; 0 = fixed at workers_per_trial (cluster/resources.py).
    min_workers_per_trial: int = 0
    max_concurrent: int = 2
    train_subset: int = 0           # train images per epoch in the sweep (0 = all)
    seed: int = 0
    # Fine-tuning of the selected trial; `finetune.data` "" = CIFAR-10 (train+val), else an
    # image folder/archive with its own classes.
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(
        mode="full", backbone_lr_scale=0.1, lr=0.02))
    serve: bool = False
    # MLflow tracking URI; None = a file store in the sweep directory (mlruns/), "off" = no MLflow.
    # TensorBoard events always go to the sweep directory's tensorboard/.
    mlflow_uri: str | None = None
    # "pipeline": Ray Data augments every epoch; "device": each worker reads its shard once and
    # augments it with torch in the training process; "auto": device on GPUs, pipeline on CPUs.
    data_path: str = "auto"

    @property
    def sweep_target(self) -> str:
        """STORAGE/NAME: an absolute path, or a URI (s3://, gs://, file://; resnet_dist.storage)."""
        return storage.join(storage.resolve(self.storage), self.name)

    @property
    def sweep_dir(self) -> Path:
        """Where this driver reads and writes the sweep's files: STORAGE/NAME itself, or for a
        URI its local staging copy (mirrored to it: cluster/sweep.py)."""
        target = self.sweep_target
        return storage.staging_dir(target) if storage.is_uri(target) else Path(target)


PRESETS: dict[str, SweepConfig] = {
    # Tests: tiny model, tiny data, 4 trials halved at 64 and 128 images (4 -> 2 -> 1). With
    # seed 0 the sampled trials include lr_mult 0.053, which learns nothing by the first rung.
    "smoke": SweepConfig(
        space=SearchSpace(flavors=("debug",), lr_mult=(0.05, 2.0), batch_sizes=(32,)),
        rungs=RungConfig(max_epochs=2, first_rung_images=64, reduction_factor=2), num_samples=4, max_concurrent=1,
        # On the real CIFAR-10 (`scripts/main.sh --preset smoke`): 2,000 images an epoch, not
        # 45,000, so the whole loop takes minutes; the tests' tiny data sets are smaller anyway.
        train_subset=2000, data_path="device",
        finetune=FinetuneConfig(mode="head", backbone_lr_scale=0.1, epochs=1, lr=0.05, subset=2000),
    ),
    # The README default: real CIFAR-10 on 2 CPU cores, the whole pipeline in under 15 min. The
    # space is centred on the measured 4-epoch recipe (README: SGD-Nesterov, one-cycle to 0.6 at
    # batch 128, 2-px crops, smoothing 0.2, wd 5e-4; 80.4% test): the first trial is the recipe
    # itself. 9 trials halved x3 at 6,000 and 18,000 images (about 6 s and 17 s of training at
    # ~1,100 img/s, bf16 + channels_last: bench/precision.py); the winner goes on in the same run
    # to 11 epochs on all of train (9-11 min), which leaves the search ~1.5 min. (At 12 epochs
    # the job took 12 min 43 s, and 14 min 52 s later the same afternoon on a slower VM: too
    # close to 15; README.) One trial at a time on both cores: the winner's epochs, most of the
    # budget, run alone, at 890-949 img/s with 2 threads against 567-597 with 1. (Two 1-thread
    # trials at once would train 1,141-1,195 img/s in all, bench/cpu_split.py in bf16: about
    # 20 s saved on the rungs; not measured end to end, so not taken.)
    # Val: all 5,000 images (1-2 s in bf16), so a rung's decision is not a 2,500-image coin toss.
    # Width stays 1.0: every other width trains slower here (0.75: 493 img/s against 1,192 in
    # bf16, 443 against 631 in fp32, its 12-24-48 channels suiting oneDNN's kernels badly; 1.5
    # and 2: 509-542 bf16), so its winner would not finish in the budget.
    # Fine-tuning: one short low-rate pass over 5,000 train+val images; after a full one-cycle
    # run it buys nothing measurable (README: at 0.02 -0.23 points, at 0.005 -0.03, 20,000
    # images at 0.005 -0.10), so it is the gentlest of those.
    "local": SweepConfig(
        space=SearchSpace(flavors=("resnet20",), widths=(1.0,), optimizers=("sgd",), lr_mult=(2.0, 4.5),
                          weight_decay=(2.5e-4, 1e-3), batch_sizes=(128,), label_smoothing=(0.2, 0.1, 0.3),
                          pads=(2, 3)),
        rungs=RungConfig(max_epochs=11, first_rung_images=6000, reduction_factor=3), num_samples=9,
        max_concurrent=1, val_subset=0, data_path="device", serve=True,
        finetune=FinetuneConfig(mode="full", reset_head=False, backbone_lr_scale=1.0, epochs=1, lr=0.005,
                                optimizer="sgd", subset=5000),
    ),
    # A GPU cluster: several workers per trial, deeper and wider nets, 30 epochs, many trials
    # at once: asynchronous ASHA (no pauses), first rung at 3 epochs.
    "cluster": SweepConfig(
        space=SearchSpace(flavors=("resnet18", "resnet56", "resnet110", "wrn16_4"), widths=(1.0, 2.0),
                          blocks=("basic", "bottleneck"), optimizers=("sgd", "adamw"), lr_mult=(0.25, 4.0),
                          weight_decay=(5e-5, 2e-3), momentum=(0.85, 0.9, 0.95), batch_sizes=(256, 512, 1024),
                          label_smoothing=(0.0, 0.1, 0.2), schedules=("onecycle", "cosine")),
        rungs=RungConfig(scheduler="asha", max_epochs=30, first_rung_images=135_000, reduction_factor=3),
        num_samples=64, workers_per_trial=4, min_workers_per_trial=2,
        max_concurrent=8, finetune=FinetuneConfig(mode="full", backbone_lr_scale=0.1, epochs=5, lr=0.01),
    ),
}


def validate(cfg: SweepConfig) -> None:
    """Clear errors before any trial starts."""
    cfg.space.validate()
    cfg.rungs.validate()
    cfg.finetune.validate()
    if cfg.data_path not in ("auto", "pipeline", "device"):
        raise ConfigError(f"--data-path must be auto, pipeline or device, got {cfg.data_path!r}")
    check_workers(cfg.workers_per_trial, cfg.min_workers_per_trial)
    if cfg.rungs.scheduler == "halving" and not in_process(cfg):
        raise ConfigError("--scheduler halving pauses trials that train in their own Tune process: one worker per "
                          "trial on the device data path; use --scheduler asha for Ray Train trials")
    if cfg.val_subset < 0:
        raise ConfigError(f"--val-subset must be >= 0, got {cfg.val_subset}")
    if cfg.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {cfg.num_samples}")
    read_manifest(cfg.data_dir)
    check_mlflow_uri(cfg.mlflow_uri)
    if cfg.finetune.data and not Path(cfg.finetune.data).exists():
        raise ConfigError(f"fine-tuning data {cfg.finetune.data} does not exist")
    if storage.is_uri(cfg.storage):
        storage.Mirror(cfg.sweep_target).check_writable()
    else:
        _check_writable(Path(cfg.storage).resolve())


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"storage {path} is not writable: {e.strerror or e}") from e


def in_process(cfg: SweepConfig) -> bool:
    """Whether each trial trains in its own Tune process (cluster/trial.py) rather than on Ray
    Train: one worker, fed from memory (the device path; "auto" is the device path on GPUs and
    for one worker alike, as no Ray Data pipeline is worth starting for it)."""
    return cfg.workers_per_trial == 1 and cfg.data_path in ("device", "auto")


def sweep_rungs(cfg: SweepConfig) -> tuple[int, list[int]]:
    """Training images in one epoch of a trial (RunSpec.train_images: all of train, or
    `train_subset`), and the rungs in images."""
    run = RunConfig().replace(data={"train_subset": cfg.train_subset})
    train_images = RunSpec.from_manifest(run, read_manifest(cfg.data_dir)).train_images
    return train_images, cfg.rungs.milestones(train_images, cfg.num_samples)


def base_run_config(cfg: SweepConfig) -> RunConfig:
    return RunConfig().replace(
        data={"data_dir": str(Path(cfg.data_dir).resolve()), "train_subset": cfg.train_subset},
        # Trials are compared on plain val accuracy (flip TTA would double every epoch's eval);
        # the test numbers before/after fine-tuning use TTA (resnet_dist.outputs). Every trial
        # reports at each rung, wherever it falls in an epoch.
        train={"epochs": cfg.rungs.max_epochs, "seed": cfg.seed, "eval_flip_tta": False,
               "report_at_images": sweep_rungs(cfg)[1], "val_subset": cfg.val_subset},
    )


def sweep_tracking(cfg: SweepConfig) -> TrackingConfig:
    """TensorBoard and MLflow of a sweep: its directory's tensorboard/ and mlruns/, one
    experiment named after the sweep, one run per trial (its id) and one for fine-tuning."""
    return TrackingConfig.for_dir(cfg.sweep_target, cfg.name, "", cfg.mlflow_uri)
