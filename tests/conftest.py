"""Shared fixtures: the ../shared checkout, the real CIFAR-10 as Parquet, a tiny synthetic data set."""

from __future__ import annotations

import os
from pathlib import Path

# Ray reads its auth mode once, when it is first imported (collection imports it),
# and the integration cluster is a `ray start --head` with token authentication.
os.environ["RAY_AUTH_MODE"] = "token"

import numpy as np
import pytest
from PIL import Image

from resnet_dist.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared directory beside the checkout."""
    return REPO.parent / "shared"


@pytest.fixture(scope="session")
def real_cifar_dir(shared_dir: Path) -> Path:
    """The real CIFAR-10 prepared into <repo>/data/cifar10 (a no-op once done, so reused across sessions)."""
    archive = shared_dir / "datasets" / "cifar10-jpeg.tar.xz"
    if not archive.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {archive}")
    out = REPO / "data" / "cifar10"
    prepare_dataset(archive, out)
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes, 199 train / 41 val / 60 test 32x32 PNGs, prepared to Parquet.

    Each class has its own colour and stripe direction under pixel noise, so a
    small model can learn it in a few epochs.
    """
    root = tmp_path_factory.mktemp("tiny_source")
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 216, size=(10, 3))
    stripes = (np.arange(32) // 4 % 2 * 40)[:, None]   # 4-pixel bands, +40 brightness
    for split, per_class in (("train", 24), ("test", 6)):
        for c in range(10):
            class_dir = root / split / f"class{c}"
            class_dir.mkdir(parents=True)
            pattern = palette[c] + (stripes if c % 2 else stripes.T)[..., None]
            for i in range(per_class):
                noisy = pattern + rng.normal(0, 12, size=(32, 32, 3))
                Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(class_dir / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("tiny_data") / "prepared"
    # 41 val images: odd, so 2 workers cannot split them evenly, and validation must still count
    # every one (Ray's equal split would drop one).
    prepare_dataset(root, out, val_size=41, seed=0, rows_per_shard=100)
    return out
