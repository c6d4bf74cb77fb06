"""Typed, frozen run configuration.

Parsed once at an entry point; Ray passes it around as a plain dict
(`to_dict`) and a worker turns it back into dataclasses on its first line
(`RunConfig.from_dict`). Unknown keys are an error, so a typo in a sweep or a
command line never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, TypeVar

from resnet_dist.flavors import UnknownFlavor, check_flavor

T = TypeVar("T")
OPTIMIZERS = ("sgd", "adamw")        # what engine.build_optimizer builds


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line."""


@dataclass(frozen=True)
class ModelConfig:
    flavor: str = "resnet20"          # a key of resnet_dist.flavors.FLAVORS
    width: float = 1.0                # multiplier on every stage's channel count
    block: str | None = None          # "basic" | "bottleneck"; None keeps the flavor's
    stem: str | None = None           # "cifar" | "imagenet"; None keeps the flavor's
    num_classes: int = 10
    dropout: float = 0.0              # dropout probability before the linear head
    zero_init_residual: bool = True   # zero each block's last BN gamma (identity at init)


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = "data/cifar10"    # output of jobs/prepare_data.py
    train_subset: int = 0             # use only the first N train images (0 = all)
    pad: int = 4                      # random-crop padding, pixels
    pad_mode: str = "reflect"         # "reflect" | "zeros"
    flip: bool = True                 # random horizontal flip
    cutout: int = 0                   # cutout square side, pixels (0 = off)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"            # "sgd" (Nesterov momentum) | "adamw"
    lr: float = 0.2                   # peak learning rate for `TrainConfig.batch_size`
    momentum: float = 0.9             # SGD momentum / AdamW beta1
    nesterov: bool = True
    weight_decay: float = 5e-4
    wd_skip_bn_bias: bool = True      # no weight decay on BN parameters and biases
    label_smoothing: float = 0.1
    schedule: str = "onecycle"        # "onecycle" | "cosine" | "step" | "constant"
    warmup_epochs: float = 0.5        # linear warm-up length (onecycle/cosine), epochs
    final_lr_fraction: float = 0.0    # lr at the end of onecycle/cosine, as a fraction of `lr`
    step_milestones: tuple[int, ...] = (50, 75)  # epochs at which "step" multiplies lr by gamma
    step_gamma: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    # Global batch (all workers together), images. 128 measured best for 4 epochs of
    # ResNet-20 on 2 CPU cores at lr 0.2, pad 4 (an earlier session: 76.9% test vs 75.6% at 64
    # and 71.5% at 256); larger batches take fewer steps, too few in 4 epochs.
    batch_size: int = 128
    grad_accum: int = 1               # micro-batches accumulated per optimizer step
    seed: int = 0
    # "auto": bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on other CPUs
    # (resnet_dist.engine.select_precision gives the measurements) | "bf16" | "fp16" | "off"
    amp: str = "auto"
    channels_last: str = "auto"       # "auto" (on for CUDA and AVX-512 CPUs) | "on" | "off"
    compile: bool = False             # opt-in torch.compile of the model
    early_stop_patience: int = 0      # stop after N reports without val-acc gain (0 = off)
    # Report (validate, checkpoint, tell Tune) every N training images, all workers together,
    # as well as at each epoch's end; 0 = once per epoch. Sub-epoch reports let a scheduler judge
    # trials before a long first epoch ends.
    report_every_images: int = 0
    # Also report when the run's training images (all workers, counted from its start) reach
    # each of these: a sweep's rungs (cluster/halving.py), wherever they fall in an epoch.
    report_at_images: tuple[int, ...] = ()
    # Validate on N evenly spaced val images only (0 = all; every class keeps its share): a
    # sweep's trials compare on the same images at every rung for a fraction of a full pass
    # (5,000 images are ~6 s on 2 cores).
    val_subset: int = 0
    eval_flip_tta: bool = True        # average logits over the image and its mirror at eval
    # Images per eval forward. ResNet-20 on 2 cores (bench/cpu_split.py, two runs, 2026-12-06):
    # 457-462 img/s at 1000, 876-1228 at 250, 1072-1343 at 128 (cache-bound). 250, the value the
    # README's measured sweep ran at; 128 may be a little faster still.
    eval_batch_size: int = 250


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config section(s): {sorted(unknown)}")
        return cls(
            model=section_from_dict(ModelConfig, d.get("model", {})),
            data=section_from_dict(DataConfig, d.get("data", {})),
            optim=section_from_dict(OptimConfig, d.get("optim", {})),
            train=section_from_dict(TrainConfig, d.get("train", {})),
        ).validated()

    def replace(self, **sections: Mapping[str, Any]) -> "RunConfig":
        """Copy with some fields overridden, e.g. `cfg.replace(optim={"lr": 0.1})`."""
        d = self.to_dict()
        for name, values in sections.items():
            if name not in d:
                raise ConfigError(f"unknown config section: {name}")
            d[name].update(values)
        return RunConfig.from_dict(d)

    def validated(self) -> "RunConfig":
        m, o, t, da = self.model, self.optim, self.train, self.data
        check_model_flavor(m.flavor)
        _check(m.width > 0, f"model.width must be > 0, got {m.width}")
        _check(m.block in (None, "basic", "bottleneck"), f"model.block must be basic|bottleneck, got {m.block!r}")
        _check(m.stem in (None, "cifar", "imagenet"), f"model.stem must be cifar|imagenet, got {m.stem!r}")
        _check(m.num_classes >= 2, f"model.num_classes must be >= 2, got {m.num_classes}")
        _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
        _check(da.pad_mode in ("reflect", "zeros"), f"data.pad_mode must be reflect|zeros, got {da.pad_mode!r}")
        _check(da.pad >= 0 and da.cutout >= 0 and da.train_subset >= 0, "data.pad, data.cutout and data.train_subset must be >= 0")
        _check(o.optimizer in OPTIMIZERS, f"optim.optimizer must be {'|'.join(OPTIMIZERS)}, got {o.optimizer!r}")
        _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        _check(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
        _check(0 <= o.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}")
        _check(o.schedule in ("onecycle", "cosine", "step", "constant"),
               f"optim.schedule must be onecycle|cosine|step|constant, got {o.schedule!r}")
        _check(t.report_every_images >= 0, f"train.report_every_images must be >= 0, got {t.report_every_images}")
        _check(all(n > 0 for n in t.report_at_images), f"train.report_at_images must be > 0, got {t.report_at_images}")
        _check(t.val_subset >= 0, f"train.val_subset must be >= 0, got {t.val_subset}")
        _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
        _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
        _check(t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
               f"train.batch_size {t.batch_size} must be a multiple of train.grad_accum {t.grad_accum}")
        _check(t.amp in ("auto", "bf16", "fp16", "off"), f"train.amp must be auto|bf16|fp16|off, got {t.amp!r}")
        _check(t.channels_last in ("auto", "on", "off"), f"train.channels_last must be auto|on|off, got {t.channels_last!r}")
        return self


def check_model_flavor(name: str) -> None:
    """ConfigError unless `name` is a flavor (resnet_dist.flavors.check_flavor decides)."""
    try:
        check_flavor(name)
    except UnknownFlavor as e:
        raise ConfigError(str(e)) from None


FINETUNE_MODES = ("head", "full", "last-stage")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every fine-tuning setting (resnet_dist.finetune). The defaults are those for a user's own
    data with other classes, measured on a 10-class folder of 1,500 made-up images from a
    ResNet-20 CIFAR-10 checkpoint (bench/finetune_small.py, README): every layer, the head from
    the linear probe, SGD at 0.1, the backbone at half that: 99.7% test against 99.2% at lr 0.2,
    98.3% with the backbone at the full rate, 95.6% from a random head, 54.2% with the backbone
    at 0.1x, 25.0% head only (the probe: 24.7%)."""

    mode: str = "full"              # "head" | "full" | "last-stage": which layers train
    reset_head: bool = True         # a new random head; forced when the class count differs
    backbone_lr_scale: float = 0.5  # lr multiplier of the pretrained layers that train; the head gets 1.0
    # Data with other classes: the new head starts from the linear probe fitted on the frozen
    # backbone (LP-FT, Kumar et al. 2022), not from random weights, so the first steps of full
    # fine-tuning do not wreck the pretrained features with a random head's gradients.
    probe_init: bool = True
    epochs: int = 0                 # 0 = sized to the data (finetune.auto_schedule)
    lr: float = 0.1                 # peak lr of the head
    # Fine-tuning's own optimizer, so that lr means one thing whichever optimizer trained the
    # source (AdamW at an SGD rate diverges); momentum and weight decay stay the source's.
    optimizer: str = "sgd"
    subset: int = 0                 # train images per epoch (0 = all)
    batch_size: int = 0             # global batch (0 = sized to the data, finetune.auto_schedule)
    data: str = ""                  # prepared Parquet or an image folder/archive; "" = the source's data

    def validate(self) -> "FinetuneConfig":
        _check(self.mode in FINETUNE_MODES, f"finetune.mode must be {'|'.join(FINETUNE_MODES)}, got {self.mode!r}")
        # Written so that NaN fails too.
        _check(self.backbone_lr_scale > 0, f"finetune.backbone_lr_scale must be > 0, got {self.backbone_lr_scale}")
        _check(self.optimizer in OPTIMIZERS,
               f"finetune.optimizer must be {'|'.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.lr > 0, f"finetune.lr must be > 0, got {self.lr}")
        _check(self.epochs >= 0 and self.subset >= 0 and self.batch_size >= 0,
               "finetune.epochs, finetune.subset and finetune.batch_size must be >= 0 (0 = from the data's size)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FinetuneConfig":
        return section_from_dict(cls, d)


def section_from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """Build one config dataclass from a dict, rejecting unknown keys."""
    names = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# Named presets for jobs/train.py: overrides applied on top of the defaults.
# The 4-epoch recipe for ResNet-20 on CIFAR-10 (README "Training in one process"): at 4
# epochs a high peak rate, lighter crops (2 px, not 4) and stronger label smoothing (0.2)
# win. Test accuracy of `jobs/train.py --local` with pad 2 and smoothing 0.2 (2 CPU cores,
# 1 torch thread each, two runs at a time): lr 0.2 77.4%, 0.4 79.5%, 0.6 80.1%, 0.8 80.1%;
# 0.8 dipped to 51% val in epoch 2, so 0.6. The sweep builds on the dataclass defaults, not this.
FOUR_EPOCH_RECIPE: dict[str, dict[str, Any]] = {"data": {"pad": 2}, "optim": {"lr": 0.6, "label_smoothing": 0.2}}
# A recipe for 94% test accuracy as fast as possible on one modern GPU (bench/gpu_check.sh):
# Myrtle's ResNet-9 with the DAWNBench schedule shape (Page 2018: linear warm-up to 0.4 at
# batch 512, then linear decay to 0; SGD-Nesterov 0.9, weight decay 5e-4), 4-px reflect crops,
# flips and 8-px cutout, label smoothing 0.2, flip TTA, bf16 autocast, channels_last and
# torch.compile (the last three are what "auto" picks on CUDA; compile is switched on here),
# the data resident on the GPU and augmented there in batches (resnet_dist.loader). Page's
# baseline reached 94% in 24 epochs; label smoothing and TTA should need fewer, so 18. Not yet
# measured on a GPU (no GPU was lent when it was written): bench/gpu_check.sh measures it.
# It runs on CPU too (slowly: ~6.6 M parameters), which is how the tests exercise it.
GPU94_RECIPE: dict[str, dict[str, Any]] = {
    "model": {"flavor": "resnet9"},
    "data": {"pad": 4, "pad_mode": "reflect", "cutout": 8},
    "optim": {"optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
              "label_smoothing": 0.2, "schedule": "onecycle", "warmup_epochs": 4.0},
    "train": {"epochs": 18, "batch_size": 512, "compile": True, "eval_batch_size": 2000},
}
TRAIN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The full recipe: ResNet-20, 4 epochs, all 45,000 train images (~10 min on 2 CPU cores).
    "default": FOUR_EPOCH_RECIPE,
    # A first look in about a minute on 2 CPU cores: 1 epoch on 5,000 images.
    "quick": {**FOUR_EPOCH_RECIPE, "data": {**FOUR_EPOCH_RECIPE["data"], "train_subset": 5000}, "train": {"epochs": 1}},
    # One modern GPU, 94% test accuracy as fast as possible (see GPU94_RECIPE).
    "gpu94": GPU94_RECIPE,
}
