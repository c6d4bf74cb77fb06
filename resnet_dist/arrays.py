"""A data set split in memory (`ImageArrays`), the `DataError` of every data module, and the
seeded, class-stratified train/val split.

Kept apart from the readers (`sources`, `cifar_pickle`) and the on-disk format (`parquet`)
because all of them use these types, so they sit at the bottom of the import graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from resnet_dist.constants import DEFAULT_VAL_SIZE


class DataError(ValueError):
    """Bad input data; str(e) is one clear line naming the file/problem."""


# eq=False: the generated __eq__ would compare numpy arrays, which is ambiguous.
@dataclass(frozen=True, eq=False)
class ImageArrays:
    """One split in memory."""

    images: np.ndarray        # uint8 (N, H, W, 3)
    labels: np.ndarray        # int64 (N,), indices into classes
    classes: tuple[str, ...]


def subset(arrays: ImageArrays, index: np.ndarray) -> ImageArrays:
    """The rows `index` (integer or boolean) of `arrays`, same classes."""
    return ImageArrays(arrays.images[index], arrays.labels[index], arrays.classes)


def to_rgb_square(img: Image.Image, size: int) -> Image.Image:
    """`img` as RGB, resized to size x size pixels (PIL bicubic) unless it already is."""
    img = img.convert("RGB")
    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC)


def stratified_split(arrays: ImageArrays, val_size: int, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """Hold out `val_size` images, each class in proportion to its share; returns (train, val).

    Deterministic for a given seed; both parts keep the input's order.
    """
    n = len(arrays.labels)
    if not 0 < val_size < n:
        raise DataError(f"val_size must be between 1 and {n - 1} (the train split has {n} images), got {val_size}")
    counts = np.bincount(arrays.labels, minlength=len(arrays.classes))
    # Largest-remainder rounding in integers, so the per-class counts add up to exactly val_size.
    take, remainder = np.divmod(counts * val_size, n)
    take[np.argsort(-remainder, kind="stable")[: val_size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    is_val = np.zeros(n, dtype=bool)
    for label, k in enumerate(take):
        is_val[rng.permutation(np.flatnonzero(arrays.labels == label))[:k]] = True
    return subset(arrays, ~is_val), subset(arrays, is_val)


def holdout_size(n_train: int) -> int:
    """Validation images to carve from a user's own train split of `n_train` images: 10%,
    at most the CIFAR-10 default, at least one."""
    return max(1, min(DEFAULT_VAL_SIZE, n_train // 10))
