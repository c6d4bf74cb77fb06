"""Ray Data pipeline: Parquet shards -> decoded, augmented, normalised batches.

The pipeline data path: Ray Train splits the train dataset across its workers
(`streaming_split(equal=True)`), and each epoch re-executes the pipeline, so
the file order and the augmentation are fresh every epoch. (The device path reads the
shards straight into memory and augments there: resnet_dist.local.train_loader.)
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import ray.data
import torch

from resnet_dist.augment import augment, normalize
from resnet_dist.config import DataConfig
from resnet_dist.parquet import decode_images, split_files


def read_split(data_dir: str, split: str | Sequence[str], limit: int = 0,
               seed: int | None = None) -> ray.data.Dataset:
    """A split's Parquet shards as a Ray Dataset of raw rows (image: H*W*3 bytes, label).

    The train split is read in a new random file order each epoch ("files"
    shuffle); rows were already shuffled once at conversion, and a local shuffle
    buffer in the iterator mixes across shard boundaries. This costs nothing
    next to a full `random_shuffle` (see docs/benchmarks.md). `seed` makes the file order of every epoch reproducible (each epoch's
    differs: Ray Data reseeds per execution).
    """
    splits = [split] if isinstance(split, str) else list(split)
    files = [f for s in splits for f in split_files(data_dir, s)]
    shuffle = ray.data.FileShuffleConfig(seed=seed) if "train" in splits else None
    ds = ray.data.read_parquet(files, columns=["image", "label"], shuffle=shuffle)
    return ds.limit(limit) if limit else ds


class _Transform:
    """map_batches callable: raw rows -> float32 NCHW `x` (augmented when `data` is given,
    else normalised only) and int64 `y`."""

    def __init__(self, image_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 data: DataConfig | None) -> None:
        self.image_shape, self.mean, self.std, self.data = tuple(image_shape), tuple(mean), tuple(std), data

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data (2.60) hands the fixed_size_binary column over as an object array of bytes;
        # joining them costs ~1.6 ms per 500 images on this project's CPU VM.
        images = decode_images(batch["image"], self.image_shape)
        if self.data is None:
            x = normalize(images, self.mean, self.std)
        else:
            d = self.data
            # A fresh OS-seeded generator per batch: this object is pickled into every
            # task, so a generator stored on it would repeat the same draws in each.
            x = augment(images, np.random.default_rng(), d.pad, d.pad_mode, d.flip, d.cutout, self.mean, self.std)
        return {"x": x, "y": batch["label"].astype(np.int64)}


def build_datasets(data_dir: str, manifest: dict[str, Any], data: DataConfig,
                   splits: Sequence[str] = ("train", "val"),
                   train_splits: Sequence[str] = ("train",), seed: int | None = None) -> dict[str, ray.data.Dataset]:
    """Ray Datasets of the pipeline data path: "train" (the union of `train_splits`, read in a
    seeded random file order) augmented every epoch; the others normalised only. (The device
    path and every worker's val read the shards directly: resnet_dist.local.)"""
    out = {}
    for split in splits:
        train = split == "train"
        ds = read_split(data_dir, tuple(train_splits) if train else split, data.train_subset if train else 0,
                        seed=seed)
        fn = _Transform(manifest["image_shape"], manifest["mean"], manifest["std"], data if train else None)
        # A plain function keeps the work in short tasks; batch 500 images = 1.5 MB raw, 6 MB out.
        out[split] = ds.map_batches(fn, batch_format="numpy", batch_size=500)
    return out


def torch_batches(shard: Any, batch_size: int, train: bool, device: torch.device | str = "cpu",
                  shuffle_buffer: int = 2000, shuffle_seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) tensors from a worker's dataset shard (a ray.data.DataIterator).

    Training drops the partial last batch so every rank runs the same number of
    steps (DDP needs it) and mixes rows across blocks in a local shuffle buffer.
    """
    for b in shard.iter_torch_batches(
        batch_size=batch_size, drop_last=train, device=device, prefetch_batches=2,
        local_shuffle_buffer_size=shuffle_buffer if train else None,
        local_shuffle_seed=shuffle_seed if train else None,
    ):
        yield b["x"], b["y"]
