"""In-memory batch iteration over uint8 image arrays.

Used by the one-process trainer and by the device-side path on Ray workers:
the whole split sits in memory (on the GPU there) as uint8 NHWC (150 MB for
CIFAR-10 train), and each batch is augmented with the torch functions of
`resnet_dist.augment` on that device, airbench-style.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from resnet_dist.augment import augment, normalize
from resnet_dist.config import DataConfig


@dataclass
class ArrayLoader:
    """Batches of (float32 NCHW images, int64 labels) from uint8 NHWC tensors.

    `train=True`: reshuffled and augmented every epoch (seeded by `seed` and the
    epoch), partial last batch dropped so every step has the same size.
    `train=False`: fixed order, normalised only, every image kept.
    """

    images: torch.Tensor        # uint8 (N, H, W, 3), on the device that augments
    labels: torch.Tensor        # int64 (N,)
    batch_size: int
    mean: Sequence[float]
    std: Sequence[float]
    data: DataConfig | None = None   # augmentation settings; None = no augmentation
    train: bool = False
    seed: int = 0
    epoch: int = 0

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu", **kw) -> "ArrayLoader":
        # np.require copies only read-only arrays (torch warns about those).
        images, labels = np.require(images, requirements="W"), np.require(labels, requirements="W")
        return cls(torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device), **kw)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g).to(self.labels.device) if self.train else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order[sl] if order is not None else None
            x = self.images[idx] if idx is not None else self.images[sl]
            y = self.labels[idx] if idx is not None else self.labels[sl]
            if self.train and self.data is not None:
                d = self.data
                x = augment(x, g, d.pad, d.pad_mode, d.flip, d.cutout, self.mean, self.std)
            else:
                x = normalize(x, self.mean, self.std)
            yield x, y
