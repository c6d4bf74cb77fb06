"""What one training run is: its config, its data and, for fine-tuning, where it starts.

A `RunSpec` holds plain values only, so the same object drives the local loop and, as a
dict in a Ray config, every Ray Train worker: both paths build their model, their batches
and their checkpoints from it, and cannot disagree about them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from resnet_dist.config import ConfigError, FinetuneConfig, ModelConfig, RunConfig


@dataclass(frozen=True)
class RunSpec:
    run: RunConfig
    classes: tuple[str, ...]
    mean: tuple[float, ...]           # per-channel normalisation of the inputs, pixels in [0, 1]
    std: tuple[float, ...]
    fingerprint: str                  # the prepared data's fingerprint (resnet_dist.data)
    counts: Mapping[str, int]         # images per split
    image_shape: tuple[int, ...]      # (H, W, C) of the stored uint8 images
    # Fine-tuning on the data the source was selected on (CIFAR-10) trains on train + val:
    # model selection is done. Then the last epoch is the result, as nothing is held out.
    train_splits: tuple[str, ...] = ("train",)
    init_checkpoint: str = ""         # fine-tuning: the checkpoint the weights start from
    finetune: FinetuneConfig | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)   # written into every checkpoint

    @classmethod
    def from_manifest(cls, run: RunConfig, manifest: Mapping[str, Any], *, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None, **kw: Any) -> "RunSpec":
        """The spec of training `run` on the prepared data `manifest` describes; `mean`/`std`
        override the data's own statistics (fine-tuning keeps the source's)."""
        return cls(run=run, classes=tuple(manifest["classes"]), mean=tuple(mean or manifest["mean"]),
                   std=tuple(std or manifest["std"]), fingerprint=manifest["fingerprint"],
                   counts=dict(manifest["counts"]), image_shape=tuple(manifest["image_shape"]), **kw)

    @property
    def model_config(self) -> ModelConfig:
        """The architecture of a run from scratch (fine-tuning takes the source's instead)."""
        return dataclasses.replace(self.run.model, num_classes=len(self.classes))

    @property
    def train_images(self) -> int:
        """Training images per epoch, all workers together."""
        n = sum(self.counts[s] for s in self.train_splits)
        return min(n, self.run.data.train_subset) if self.run.data.train_subset else n

    def steps_per_epoch(self) -> int:
        steps = self.train_images // self.run.train.batch_size
        if steps < 1:
            raise ConfigError(f"the train split has {self.train_images} images, fewer than one batch of "
                              f"{self.run.train.batch_size}; lower the batch size")
        return steps

    @property
    def selects_last(self) -> bool:
        """Which checkpoint a run delivers: its last when val was trained on, else its best on val."""
        return "val" in self.train_splits

    def manifest(self) -> dict[str, Any]:
        """What the Ray Data pipeline needs to decode and normalise (cluster/data.py)."""
        return {"classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "image_shape": list(self.image_shape), "counts": dict(self.counts), "fingerprint": self.fingerprint}

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run.to_dict(), "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std), "fingerprint": self.fingerprint, "counts": dict(self.counts),
                "image_shape": list(self.image_shape), "train_splits": list(self.train_splits),
                "init_checkpoint": self.init_checkpoint,
                "finetune": self.finetune.to_dict() if self.finetune else None, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunSpec":
        return cls(run=RunConfig.from_dict(d["run"]), classes=tuple(d["classes"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), fingerprint=d["fingerprint"], counts=dict(d["counts"]),
                   image_shape=tuple(d["image_shape"]), train_splits=tuple(d["train_splits"]),
                   init_checkpoint=d["init_checkpoint"],
                   finetune=FinetuneConfig.from_dict(d["finetune"]) if d["finetune"] else None,
                   extra=dict(d["extra"]))
