"""Ray Data on the shared real cluster reads the fixed_size_binary Parquet shards to the
same pixels as the in-process reader (resnet_dist.parquet.read_split)."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_dist.augment import normalize
from resnet_dist.parquet import decode_images, read_manifest, read_split, split_files

pytestmark = pytest.mark.integration


def rows(x: np.ndarray, y: np.ndarray) -> list[tuple[bytes, int]]:
    """The (pixels, label) rows as a sorted list: Ray Data does not promise row order."""
    return sorted(zip((r.tobytes() for r in x), y.tolist()))


def collect(ds, *keys: str) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    return {k: np.concatenate([b[k] for b in batches]) for k in keys}


def test_ray_data_numpy_batches_decode_to_the_same_pixels(ray_driver, tiny_data_dir) -> None:
    import ray.data

    manifest = read_manifest(tiny_data_dir)
    shape = manifest["image_shape"]

    def probe(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = batch["image"]
        # What this Ray version hands a numpy-format function for a fixed_size_binary column.
        kind = f"{type(column).__name__} {column.dtype} {sorted({type(v).__name__ for v in column})}"
        x = decode_images(column, shape)
        return {"x": x, "y": batch["label"], "kind": np.array([kind] * len(x)),
                "writable": np.full(len(x), x.flags.writeable)}

    ds = ray.data.read_parquet(split_files(tiny_data_dir, "train"), columns=["image", "label"])
    assert str(ds.schema().base_schema.field("image").type) == "fixed_size_binary[3072]"
    got = collect(ds.map_batches(probe, batch_format="numpy", batch_size=64), "x", "y", "kind", "writable")
    assert set(got["kind"].tolist()) == {"ndarray object ['bytes']"}
    assert got["writable"].all()
    expected = read_split(tiny_data_dir, "train")
    assert got["x"].dtype == np.uint8 and got["x"].shape == expected.images.shape
    assert rows(got["x"], got["y"]) == rows(expected.images, expected.labels)


def test_the_training_pipeline_yields_the_stored_pixels(ray_driver, tiny_data_dir) -> None:
    from cluster.data import build_datasets
    from resnet_dist.config import DataConfig

    manifest = read_manifest(tiny_data_dir)
    # No crop padding and no flip: the "augmented" train images are the stored ones, normalised.
    datasets = build_datasets(str(tiny_data_dir), manifest, DataConfig(pad=0, flip=False), splits=("train", "val"))
    train, val = collect(datasets["train"], "x", "y"), collect(datasets["val"], "x", "y")
    for got, split in ((train, "train"), (val, "val")):
        expected = read_split(tiny_data_dir, split)
        # Bit-identical to normalising what read_split returns (the device path's source).
        assert got["x"].dtype == np.float32 and got["x"].shape == (len(expected.labels), 3, 32, 32)
        reference = normalize(expected.images, manifest["mean"], manifest["std"])
        assert rows(got["x"], got["y"]) == rows(reference, expected.labels), split
