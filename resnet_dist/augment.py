"""Batched, seeded image augmentation.

Every function takes a whole batch and works on numpy arrays (what Ray Data's
`map_batches` hands over) and on torch tensors on any device (the GPU path
augments on the device). Images are uint8 NHWC, as stored in the Parquet
shards; `normalize` turns them into float32 NCHW model inputs.

The random wrappers draw their parameters from an explicit generator
(`np.random.Generator` or `torch.Generator`), so a seed fixes the result.
The deterministic primitives (`crop`, `flip`) take those parameters
explicitly, which is what the tests check.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from resnet_dist.constants import CIFAR10_MEAN, CIFAR10_STD

Array = Union[np.ndarray, torch.Tensor]
Rng = Union[np.random.Generator, torch.Generator]


def _is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def _arange(n: int, like: Array) -> Array:
    return torch.arange(n, device=like.device) if _is_torch(like) else np.arange(n)


def _randint(rng: Rng, high: int, n: int, like: Array) -> Array:
    """n integers in [0, high), on `like`'s device."""
    if isinstance(rng, np.random.Generator):
        return rng.integers(0, high, size=n)
    return torch.randint(0, high, (n,), generator=rng).to(like.device)


def crop(images: Array, pad: int, pad_mode: str, dy: Array, dx: Array) -> Array:
    """Pad each NHWC image by `pad` pixels, then cut the HxW window at (dy[i], dx[i]).

    dy, dx are per-image offsets in [0, 2*pad]; dy = dx = pad returns the input.
    """
    if pad == 0:
        return images
    n, h, w = images.shape[:3]
    if _is_torch(images):
        # F.pad's reflect mode wants channels first; go NCHW and back.
        mode = "reflect" if pad_mode == "reflect" else "constant"
        padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (pad,) * 4, mode=mode).permute(0, 2, 3, 1)
    else:
        mode = "reflect" if pad_mode == "reflect" else "constant"
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    rows = dy[:, None] + _arange(h, images)[None, :]   # (N, H)
    cols = dx[:, None] + _arange(w, images)[None, :]   # (N, W)
    idx = _arange(n, images)[:, None, None]
    return padded[idx, rows[:, :, None], cols[:, None, :]]


def flip(images: Array, mask: Array) -> Array:
    """Mirror (left-right) the NHWC images where `mask` is true."""
    if _is_torch(images):
        return torch.where(mask[:, None, None, None], images.flip(2), images)
    return np.where(mask[:, None, None, None], images[:, :, ::-1], images)


def random_crop(images: Array, pad: int, pad_mode: str, rng: Rng) -> Array:
    n = images.shape[0]
    return crop(images, pad, pad_mode, _randint(rng, 2 * pad + 1, n, images), _randint(rng, 2 * pad + 1, n, images))


def random_flip(images: Array, rng: Rng) -> Array:
    return flip(images, _randint(rng, 2, images.shape[0], images) == 1)


def cutout(x: Array, size: int, rng: Rng) -> Array:
    """Zero a size x size square (clipped at the border) at a random centre of each NCHW image."""
    n, _, h, w = x.shape
    cy, cx = _randint(rng, h, n, x), _randint(rng, w, n, x)
    ys, xs = _arange(h, x), _arange(w, x)
    half = size // 2
    inside_y = (ys[None, :] >= cy[:, None] - half) & (ys[None, :] < cy[:, None] - half + size)
    inside_x = (xs[None, :] >= cx[:, None] - half) & (xs[None, :] < cx[:, None] - half + size)
    hole = inside_y[:, None, :, None] & inside_x[:, None, None, :]   # (N, 1, H, W)
    return x * (~hole)


def normalize(images: Array, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> Array:
    """uint8 NHWC in [0, 255] -> float32 NCHW with per-channel mean/std (given on the [0, 1] scale)."""
    if _is_torch(images):
        m = torch.tensor(mean, device=images.device, dtype=torch.float32) * 255
        s = torch.tensor(std, device=images.device, dtype=torch.float32) * 255
        # permute (not contiguous) leaves NHWC memory = channels_last NCHW, which convs like.
        return ((images.float() - m) / s).permute(0, 3, 1, 2)
    m = np.asarray(mean, np.float32) * 255
    s = np.asarray(std, np.float32) * 255
    return np.ascontiguousarray(((images.astype(np.float32) - m) / s).transpose(0, 3, 1, 2))


def augment(
    images: Array,
    rng: Rng,
    pad: int = 4,
    pad_mode: str = "reflect",
    hflip: bool = True,
    cutout_size: int = 0,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Array:
    """The training transform: random crop, random flip, normalise, optional cutout.

    uint8 NHWC in, float32 NCHW out.
    """
    x = random_crop(images, pad, pad_mode, rng)
    if hflip:
        x = random_flip(x, rng)
    x = normalize(x, mean, std)
    if cutout_size > 0:
        x = cutout(x, cutout_size, rng)
    return x
