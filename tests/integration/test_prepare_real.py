"""The real CIFAR-10 archive in ../shared, converted to Parquet (about 20-30 s per conversion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_dist.constants import CIFAR10_CLASSES
from resnet_dist.parquet import FORMAT_VERSION, read_manifest, read_split, split_files
from resnet_dist.prepare import prepare_dataset

pytestmark = pytest.mark.integration

# "pixel statistics (train)" in ../shared/README.md, measured on all 50,000 train images.
README_MEAN = (0.4913, 0.4821, 0.4465)
README_STD = (0.2452, 0.2428, 0.2606)
# The content fingerprint every figure in README.md and docs/ names; a function of the pixels
# and labels only, so the storage format (1: binary, 2: fixed_size_binary) leaves it unchanged.
README_FINGERPRINT = "sha256:9030509c62a422de95aa3f102e26804ae29b57767246883f9a4e944fa4d436e4"


def test_counts_classes_and_balance(real_cifar_dir: Path) -> None:
    manifest = read_manifest(real_cifar_dir)
    assert tuple(manifest["classes"]) == CIFAR10_CLASSES
    assert manifest["image_shape"] == [32, 32, 3]
    assert manifest["counts"] == {"train": 45_000, "val": 5_000, "test": 10_000}
    for split, per_class in (("train", 4_500), ("val", 500), ("test", 1_000)):
        assert manifest["class_counts"][split] == dict.fromkeys(CIFAR10_CLASSES, per_class)
    val = read_split(real_cifar_dir, "val")
    assert val.images.shape == (5_000, 32, 32, 3)
    assert np.bincount(val.labels).tolist() == [500] * 10


def test_stored_as_fixed_size_binary_with_the_same_fingerprint(real_cifar_dir: Path) -> None:
    manifest = read_manifest(real_cifar_dir)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["fingerprint"] == README_FINGERPRINT
    for split in ("train", "val", "test"):
        files = split_files(real_cifar_dir, split)
        assert len(files) == manifest["counts"][split] // 5000
        assert all(pq.read_schema(f).field("image").type == pa.binary(3072) for f in files)


def test_statistics_match_readme(real_cifar_dir: Path) -> None:
    manifest = read_manifest(real_cifar_dir)
    np.testing.assert_allclose(manifest["mean"], README_MEAN, atol=0.003)
    np.testing.assert_allclose(manifest["std"], README_STD, atol=0.003)


def test_fingerprint_is_stable_and_rerun_is_noop(real_cifar_dir: Path, shared_dir: Path, tmp_path: Path) -> None:
    archive = shared_dir / "datasets" / "cifar10-jpeg.tar.xz"
    manifest = read_manifest(real_cifar_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in real_cifar_dir.rglob("*")}
    assert prepare_dataset(archive, real_cifar_dir) == manifest
    assert {p: p.stat().st_mtime_ns for p in real_cifar_dir.rglob("*")} == mtimes

    again = prepare_dataset(archive, tmp_path / "cifar10")
    assert again["fingerprint"] == manifest["fingerprint"]
