import numpy as np
import pytest
import torch

from resnet_dist import augment as A
from resnet_dist.constants import CIFAR10_MEAN, CIFAR10_STD


def batch(n=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_augment_shapes_dtypes_and_range(backend):
    x = batch()
    rng = np.random.default_rng(0) if backend == "numpy" else torch.Generator().manual_seed(0)
    if backend == "torch":
        x = torch.from_numpy(x)
    out = A.augment(x, rng, pad=4, cutout_size=8)
    assert tuple(out.shape) == (8, 3, 32, 32)
    assert str(out.dtype).endswith("float32")
    lo = min((0 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
    hi = max((1 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
    assert float(out.min()) >= lo - 1e-5 and float(out.max()) <= hi + 1e-5


def test_numpy_and_torch_primitives_agree():
    x = batch()
    dy, dx = np.arange(8) % 9, (np.arange(8) * 3) % 9
    mask = np.arange(8) % 2 == 0
    for mode in ("reflect", "zeros"):
        a = A.flip(A.crop(x, 4, mode, dy, dx), mask)
        b = A.flip(A.crop(torch.from_numpy(x), 4, mode, torch.from_numpy(dy), torch.from_numpy(dx)), torch.from_numpy(mask))
        np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_allclose(A.normalize(x), A.normalize(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)


def test_crop_at_centre_offset_is_identity_and_shift_moves_pixels():
    x = batch()
    c = np.full(8, 4)
    np.testing.assert_array_equal(A.crop(x, 4, "zeros", c, c), x)
    # dy = dx = 0 shifts the image down-right by 4: the top-left 4 rows/cols come from zero padding.
    z = np.zeros(8, dtype=int)
    shifted = A.crop(x, 4, "zeros", z, z)
    np.testing.assert_array_equal(shifted[:, 4:, 4:], x[:, :28, :28])
    assert shifted[:, :4].max() == 0


def test_flip_twice_is_identity_and_mirrors_columns():
    x = batch()
    mask = np.ones(8, dtype=bool)
    np.testing.assert_array_equal(A.flip(A.flip(x, mask), mask), x)
    np.testing.assert_array_equal(A.flip(x, mask)[:, :, 0], x[:, :, -1])
    np.testing.assert_array_equal(A.flip(x, ~mask), x)


def test_seeded_and_per_image_independent():
    x = np.repeat(batch(1), 64, axis=0)   # 64 copies of one image
    a = A.augment(x, np.random.default_rng(1))
    b = A.augment(x, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    c = A.augment(x, np.random.default_rng(2))
    assert not np.array_equal(a, c)
    # Identical inputs get different crops/flips within one batch.
    distinct = {a[i].tobytes() for i in range(len(a))}
    assert len(distinct) > 10


def test_cutout_zeroes_a_square():
    x = np.ones((4, 3, 32, 32), np.float32)
    out = A.cutout(x, 8, np.random.default_rng(0))
    zeros_per_image = (out[:, 0] == 0).sum(axis=(1, 2))
    assert all(16 <= z <= 64 for z in zeros_per_image)   # a full square or one clipped at the border
    assert (out[:, 0] == out[:, 1]).all()                  # same hole in every channel
