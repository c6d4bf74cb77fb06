"""Readers, split, Parquet conversion and the prepare_data CLI, on tiny synthetic data."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resnet_dist import data, parquet, prepare
from resnet_dist.arrays import DataError, ImageArrays, holdout_size, stratified_split
from resnet_dist.constants import EXIT_BAD_INPUT, IMAGE_BYTES
from resnet_dist.parquet import (
    FORMAT_VERSION, decode_images, encode_images, read_manifest, read_split, split_files, write_shards,
)
from resnet_dist.prepare import ensure_prepared, prepare_dataset
from resnet_dist.sources import load_source

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "dog", "frog")


def make_split(per_class: int, seed: int = 0) -> ImageArrays:
    """Random 32x32 RGB images, class-major; pixel (0, 0) holds a unique id so rows can be matched."""
    rng = np.random.default_rng(seed)
    n = per_class * len(CLASSES)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return ImageArrays(images, np.repeat(np.arange(len(CLASSES)), per_class).astype(np.int64), CLASSES)


def make_source() -> dict[str, ImageArrays]:
    return {"train": make_split(8, seed=0), "test": make_split(3, seed=1)}


def write_folder(root: Path, splits: dict[str, ImageArrays], suffix: str = ".png") -> Path:
    """ROOT/SPLIT/<class>/NNNN.png; names sort in array order."""
    for split, arrays in splits.items():
        for i, (image, label) in enumerate(zip(arrays.images, arrays.labels)):
            path = root / split / arrays.classes[label] / f"{i:04d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    return root


def write_tar(folder: Path, dest: Path, top: str | None) -> Path:
    """Archive the folder's splits, under one top-level directory `top` or at the root."""
    mode = {".gz": "w:gz", ".xz": "w:xz", ".tar": "w"}[dest.suffix]
    with tarfile.open(dest, mode) as tar:
        for split_dir in sorted(folder.iterdir()):
            tar.add(split_dir, arcname=f"{top}/{split_dir.name}" if top else split_dir.name)
    return dest


def write_cifar(root: Path, splits: dict[str, ImageArrays]) -> Path:
    """A fake torchvision cifar-10-batches-py: rows are the R, G, B planes, bytes keys as in the real pickles."""
    batch_dir = root / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)

    def dump(name: str, arrays: ImageArrays, rows: slice) -> None:
        planes = arrays.images[rows].transpose(0, 3, 1, 2).reshape(-1, 3072)
        with (batch_dir / name).open("wb") as f:
            pickle.dump({b"data": planes, b"labels": arrays.labels[rows].tolist()}, f)

    train = splits["train"]
    for i, rows in enumerate(np.array_split(np.arange(len(train.labels)), 5), start=1):
        dump(f"data_batch_{i}", train, slice(rows[0], rows[-1] + 1))
    dump("test_batch", splits["test"], slice(None))
    with (batch_dir / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)
    return batch_dir


def assert_same(a: ImageArrays, b: ImageArrays) -> None:
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.images, b.images)


def by_id(arrays: ImageArrays) -> ImageArrays:
    """Rows sorted by the id make_split wrote into pixel (0, 0)."""
    ids = arrays.images[:, 0, 0, 0].astype(int) + 256 * arrays.images[:, 0, 0, 1].astype(int)
    order = np.argsort(ids)
    return ImageArrays(arrays.images[order], arrays.labels[order], arrays.classes)


def mtimes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*")}


# --------------------------------------------------------------------------- readers


def test_all_source_kinds_read_the_same_arrays(tmp_path: Path) -> None:
    source = make_source()
    folder = write_folder(tmp_path / "folder", source)
    batches = write_cifar(tmp_path / "torchvision", source)
    paths = [
        folder,
        write_tar(folder, tmp_path / "a.tar.gz", top="mydata"),
        write_tar(folder, tmp_path / "b.tar.xz", top=None),
        write_tar(folder, tmp_path / "c.tar", top="x"),
        batches,
        batches.parent,
    ]
    for path in paths:
        loaded = load_source(path)
        assert set(loaded) == {"train", "test"}, path
        for split in ("train", "test"):
            assert_same(loaded[split], source[split])
            assert loaded[split].images.dtype == np.uint8 and loaded[split].labels.dtype == np.int64


def test_jpeg_folder_without_test_split(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "jpeg", {"train": make_split(4)}, suffix=".jpg")
    loaded = load_source(folder)
    assert list(loaded) == ["train"]
    assert loaded["train"].images.shape == (12, 32, 32, 3)
    assert loaded["train"].labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_resize_converts_mode_and_size(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    for i, name in enumerate(CLASSES):
        (folder / "train" / name).mkdir(parents=True)
        Image.new("L", (40, 48), color=50 * i).save(folder / "train" / name / "a.png")
    loaded = load_source(folder, resize=16)["train"]
    assert loaded.images.shape == (3, 16, 16, 3)
    assert loaded.images[2].min() == loaded.images[2].max() == 100   # grey 100 -> RGB (100, 100, 100)


# --------------------------------------------------------------------------- split


def test_stratified_split_is_balanced_exact_and_seeded() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20]).astype(np.int64)
    arrays = ImageArrays(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), labels, CLASSES)
    train, val = stratified_split(arrays, 10, seed=3)
    assert np.bincount(val.labels).tolist() == [5, 3, 2]
    assert np.bincount(train.labels).tolist() == [45, 27, 18]
    assert sorted(np.concatenate([train.images, val.images]).ravel().tolist()) == list(range(100))
    np.testing.assert_array_equal(stratified_split(arrays, 10, seed=3)[1].images, val.images)
    assert not np.array_equal(stratified_split(arrays, 10, seed=4)[1].images, val.images)
    # Largest-remainder rounding still yields exactly val_size.
    assert len(stratified_split(arrays, 7, seed=0)[1].labels) == 7
    with pytest.raises(DataError, match="val_size"):
        stratified_split(arrays, 100, seed=0)


# --------------------------------------------------------------------------- prepare / read back


def test_prepare_round_trip(tmp_path: Path) -> None:
    source = make_source()
    folder = write_folder(tmp_path / "src", source)
    out = tmp_path / "out"
    manifest = prepare_dataset(folder, out, val_size=6, seed=1, rows_per_shard=5)

    assert manifest == read_manifest(out)
    assert manifest["classes"] == list(CLASSES)
    assert manifest["image_shape"] == [32, 32, 3]
    assert manifest["counts"] == {"train": 18, "val": 6, "test": 9}
    assert manifest["class_counts"]["val"] == {"cat": 2, "dog": 2, "frog": 2}
    assert manifest["options"] == {"val_size": 6, "seed": 1, "resize": None, "rows_per_shard": 5}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test", "train", "val"]

    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert_same(test, source["test"])
    assert_same(by_id(ImageArrays(np.concatenate([train.images, val.images]),
                                  np.concatenate([train.labels, val.labels]), train.classes)), source["train"])
    assert not np.array_equal(train.labels, np.sort(train.labels))   # train rows were shuffled

    pixels = train.images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(manifest["mean"], pixels.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(manifest["std"], pixels.std(axis=0), atol=1e-5)

    files = split_files(out, "train")
    assert files == sorted(files) and [Path(f).name for f in files] == [f"part-0000{i}.parquet" for i in range(4)]
    table = pq.read_table(files[0])
    assert table.schema.field("image").type == pa.binary(IMAGE_BYTES)   # fixed_size_binary[3072]
    assert table.schema.field("label").type == pa.int64()
    # What Ray Data's numpy batches hold for this column: an object array of bytes, one per row.
    batch = decode_images(table.column("image").to_numpy(zero_copy_only=False), manifest["image_shape"])
    np.testing.assert_array_equal(batch, train.images[:5])
    assert batch.flags.writeable
    assert train.images.flags.writeable and test.images.flags.writeable   # read_split copies out of arrow


def test_images_round_trip_through_a_fixed_size_binary_shard(tmp_path: Path) -> None:
    split = make_split(7, seed=5)
    write_shards(split, tmp_path / "train", rows_per_shard=8)
    files = sorted((tmp_path / "train").glob("part-*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert pq.read_schema(files[0]).field("image").type == pa.binary(32 * 32 * 3)
    # Parquet stores it as FIXED_LEN_BYTE_ARRAY: no per-row length, just 3,072 bytes per image.
    column = pq.ParquetFile(files[0]).schema.column(0)
    assert column.physical_type == "FIXED_LEN_BYTE_ARRAY" and column.length == 3072

    tables = [pq.read_table(f) for f in files]
    images = np.concatenate([decode_images(t.column("image"), (32, 32, 3)) for t in tables])
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    assert images.dtype == np.uint8 and images.shape == (21, 32, 32, 3)
    np.testing.assert_array_equal(images, split.images)
    np.testing.assert_array_equal(labels, split.labels)

    # One chunk decodes to a view of arrow's data buffer (no copy), offsets of slices included.
    chunk = tables[0].column("image").chunk(0)
    view = decode_images(chunk, (32, 32, 3))
    assert view.ctypes.data == chunk.buffers()[1].address and not view.flags.writeable
    np.testing.assert_array_equal(decode_images(chunk.slice(3, 4), (32, 32, 3)), split.images[3:7])
    np.testing.assert_array_equal(decode_images(pa.chunked_array([chunk.slice(6), chunk.slice(0, 2)]), (32, 32, 3)),
                                  split.images[[6, 7, 0, 1]])
    assert decode_images(chunk.slice(0, 0), (32, 32, 3)).shape == (0, 32, 32, 3)


def test_encode_images_is_the_raw_hwc_bytes() -> None:
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    column = encode_images(images)
    assert column.type == pa.binary(12) and column.to_pylist() == [bytes(range(12)), bytes(range(12, 24))]
    with pytest.raises(DataError, match="uint8"):
        encode_images(images.astype(np.int16))


def test_decode_images_rejects_wrong_sizes_types_and_nulls() -> None:
    values = np.array([b"\x00" * 12, b"\x01" * 12], dtype=object)
    assert decode_images(values, (2, 2, 3)).shape == (2, 2, 2, 3)
    assert decode_images([b"\x00" * 12], (2, 2, 3)).shape == (1, 2, 2, 3)
    with pytest.raises(DataError, match="row 0 holds 12 bytes; expected 3072"):
        decode_images(values, (32, 32, 3))
    # 11 + 13 bytes add up to two rows of 12, and are still refused.
    with pytest.raises(DataError, match="row 0 holds 11 bytes; expected 12"):
        decode_images(np.array([b"\x00" * 11, b"\x00" * 13], dtype=object), (2, 2, 3))
    with pytest.raises(DataError, match="row 1 holds NoneType"):
        decode_images(np.array([b"\x00" * 12, None], dtype=object), (2, 2, 3))
    with pytest.raises(DataError, match=r"fixed_size_binary\[12\], expected fixed_size_binary\[48\]"):
        decode_images(encode_images(np.zeros((2, 2, 2, 3), np.uint8)), (4, 4, 3))
    with pytest.raises(DataError, match="2 missing images"):
        decode_images(pa.array([b"\x00" * 12, None, None], type=pa.binary(12)), (2, 2, 3))
    # The format-1 column (variable-length binary) is named as an older format, not mis-read.
    with pytest.raises(DataError, match="is binary, expected fixed_size_binary.*older resnet-dist.*--force"):
        decode_images(pa.array([b"\x00" * 12] * 2, type=pa.binary()), (2, 2, 3))


def test_rerun_is_a_noop_and_other_options_need_force(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "src", make_source())
    out = tmp_path / "out"
    first = prepare_dataset(folder, out, val_size=6)
    before = mtimes(out)
    assert prepare_dataset(folder, out, val_size=6) == first
    assert mtimes(out) == before

    with pytest.raises(DataError, match="--force"):
        prepare_dataset(folder, out, val_size=3)
    assert mtimes(out) == before
    replaced = prepare_dataset(folder, out, val_size=3, force=True)
    assert replaced["counts"]["val"] == 3 and read_manifest(out) == replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]   # no tmp/old siblings left


def test_fingerprint_is_stable_and_tracks_content(tmp_path: Path) -> None:
    source = make_source()
    folder = write_folder(tmp_path / "src", source)
    a = prepare_dataset(folder, tmp_path / "a", val_size=6)
    b = prepare_dataset(write_tar(folder, tmp_path / "src.tar.gz", top="t"), tmp_path / "b", val_size=6)
    assert a["fingerprint"] == b["fingerprint"]
    assert a["source"]["signature"] != b["source"]["signature"]

    image = source["test"].images[0].copy()
    image[5, 5] ^= 1
    Image.fromarray(image).save(folder / "test" / "cat" / "0000.png")
    assert prepare_dataset(folder, tmp_path / "c", val_size=6)["fingerprint"] != a["fingerprint"]


# --------------------------------------------------------------------------- format versions


def as_format_1(out: Path) -> None:
    """Rewrite a prepared directory as format 1 wrote it: images as variable-length binary."""
    for shard in out.glob("*/part-*.parquet"):
        table = pq.read_table(shard)
        images = table.column("image").cast(pa.binary())
        pq.write_table(table.set_column(0, "image", images), shard, use_dictionary=False)
        assert pq.read_schema(shard).field("image").type == pa.binary()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))


def test_data_in_the_old_format_is_refused_by_readers_with_the_command_that_converts_it(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "src", make_source())
    out = tmp_path / "out"
    prepare_dataset(folder, out, val_size=6, seed=3)
    as_format_1(out)
    for read in (read_manifest, lambda d: split_files(d, "train"), lambda d: read_split(d, "val")):
        with pytest.raises(DataError) as info:
            read(out)
        message = str(info.value)
        assert "\n" not in message and "data format 1, written by an older resnet-dist" in message
        assert message.endswith(f"python jobs/prepare_data.py {folder} {out} --val-size 6 --seed 3 --force")
    assert read_manifest(out, check_format=False)["format_version"] == 1
    # Shards of format 1 under a current manifest (a half-copied directory) are refused, not mis-read.
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION}))
    with pytest.raises(DataError, match=r"val: image column is binary, expected fixed_size_binary\[3072\]"):
        read_split(out, "val")


def test_the_same_conversion_in_the_old_format_is_converted_again_others_need_force(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "src", make_source())
    out = tmp_path / "out"
    current = prepare_dataset(folder, out, val_size=6)
    before = {s: read_split(out, s) for s in ("train", "val", "test")}
    as_format_1(out)
    with pytest.raises(DataError, match="different source or options; pass --force"):
        prepare_dataset(folder, out, val_size=5)
    again = prepare_dataset(folder, out, val_size=6)   # same source and options: no --force needed
    assert again == current and read_manifest(out) == current and again["format_version"] == FORMAT_VERSION == 2
    assert again["fingerprint"] == current["fingerprint"]
    for split, arrays in before.items():
        assert_same(read_split(out, split), arrays)
    assert pq.read_schema(split_files(out, "test")[0]).field("image").type == pa.binary(IMAGE_BYTES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]

    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(DataError, match="format 3, written by a newer resnet-dist; .*read it with that version"):
        read_manifest(out)
    with pytest.raises(DataError, match=f"format {FORMAT_VERSION + 1}, newer than this version's .*--force"):
        prepare_dataset(folder, out, val_size=6)   # never downgraded behind a newer version's back
    assert prepare_dataset(folder, out, val_size=6, force=True)["format_version"] == FORMAT_VERSION


def test_the_data_module_re_exports_the_public_names() -> None:
    from resnet_dist import arrays, sources

    homes = {"DataError": arrays, "ImageArrays": arrays, "holdout_size": arrays, "stratified_split": arrays,
             "load_source": sources, "read_manifest": parquet, "read_split": parquet, "split_files": parquet,
             "decode_images": parquet, "is_prepared": parquet, "prepare_dataset": prepare,
             "ensure_prepared": prepare}
    for name, module in homes.items():
        assert getattr(data, name) is getattr(module, name), name
    assert set(homes) <= set(data.__all__) and all(hasattr(data, n) for n in data.__all__)


# --------------------------------------------------------------------------- bad input


def truncated_archive(tmp_path: Path, suffix: str) -> Path:
    archive = write_tar(write_folder(tmp_path / "src", make_source()), tmp_path / f"src.tar{suffix}", top=None)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return archive


def corrupt_image(tmp_path: Path) -> Path:
    folder = write_folder(tmp_path / "src", make_source())
    (folder / "train" / "dog" / "0009.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def wrong_size(tmp_path: Path) -> Path:
    folder = write_folder(tmp_path / "src", make_source())
    Image.new("RGB", (40, 40)).save(folder / "test" / "frog" / "0007.png")
    return folder


def empty_class(tmp_path: Path) -> Path:
    folder = write_folder(tmp_path / "src", make_source())
    (folder / "train" / "zebra").mkdir()
    return folder


def label_out_of_range(tmp_path: Path) -> Path:
    batches = write_cifar(tmp_path / "src", make_source())
    batch = pickle.loads((batches / "data_batch_3").read_bytes())
    batch[b"labels"][0] = 3
    (batches / "data_batch_3").write_bytes(pickle.dumps(batch))
    return batches


def no_classes(tmp_path: Path) -> Path:
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "train" / "stray.png").write_bytes(b"")
    return tmp_path / "src"


def class_mismatch(tmp_path: Path) -> Path:
    folder = write_folder(tmp_path / "src", make_source())
    (folder / "test" / "frog").rename(folder / "test" / "bird")
    return folder


BAD_INPUTS = {
    "missing path": (lambda tmp: tmp / "nowhere", "nowhere: no such file"),
    "truncated tar.xz": (lambda tmp: truncated_archive(tmp, ".xz"), "truncated or corrupt archive"),
    "truncated tar.gz": (lambda tmp: truncated_archive(tmp, ".gz"), "truncated or corrupt archive"),
    "corrupt image": (corrupt_image, "dog/0009.png: corrupt or unreadable image"),
    "wrong size": (wrong_size, "frog/0007.png: image is 40x40 RGB, expected 32x32 RGB; pass --resize 32"),
    "empty class dir": (empty_class, "zebra: empty class directory"),
    "label out of range": (label_out_of_range, "data_batch_3: label 3 out of range 0..2"),
    "no classes": (no_classes, "no class directories found"),
    "class mismatch": (class_mismatch, r"different class sets \(only in train: \['frog'\]; only in test: \['bird'\]\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    source = make(tmp_path)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(DataError, match=message) as info:
        prepare_dataset(source, outputs / "prepared", val_size=6)
    assert "\n" not in str(info.value)
    assert list(outputs.iterdir()) == []


def test_wrong_size_works_with_resize(tmp_path: Path) -> None:
    manifest = prepare_dataset(wrong_size(tmp_path), tmp_path / "out", val_size=6, resize=32)
    assert manifest["counts"]["test"] == 9 and manifest["options"]["resize"] == 32


def test_failure_while_writing_keeps_existing_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_folder(tmp_path / "src", make_source())
    out = tmp_path / "out"
    prepare_dataset(folder, out, val_size=6)
    before = mtimes(out)

    def fail(arrays: ImageArrays, split_dir: Path, rows_per_shard: int) -> None:
        if split_dir.name == "val":
            raise OSError("disk full")
        split_dir.mkdir()

    monkeypatch.setattr(prepare, "write_shards", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(folder, out, val_size=3, force=True)
    assert mtimes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_read_manifest_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest.json: missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt manifest"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "jobs/prepare_data.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "no such file" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_converts_a_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "src", make_source())
    result = run_cli(folder, tmp_path / "out", "--val-size", "6", "--rows-per-shard", "10")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out")
    assert manifest["fingerprint"] in result.stdout
    assert len(split_files(tmp_path / "out", "train")) == 2


def test_a_users_folder_gets_a_tenth_of_train_as_val_and_prepared_data_is_used_as_is(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "src", make_source())
    n_train = len(make_source()["train"].labels)
    assert holdout_size(n_train) == max(1, n_train // 10)
    assert holdout_size(10**6) == 5000 and holdout_size(3) == 1
    out = ensure_prepared(folder, tmp_path / "prepared")
    manifest = read_manifest(out)
    assert manifest["counts"]["val"] == holdout_size(n_train)
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == n_train
    before = mtimes(out)
    assert ensure_prepared(folder, tmp_path / "prepared") == out and mtimes(out) == before   # no-op re-run
    assert ensure_prepared(out, tmp_path / "elsewhere") == out   # prepared Parquet is used where it is
    assert not (tmp_path / "elsewhere").exists()


class _RunsACommand:
    """What a hostile batches.meta holds: unpickling it would call os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("hostile", ["batches.meta", "data_batch_2"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(hostile, tmp_path, capsys):
    from jobs.prepare_data import main

    batch_dir = write_cifar(tmp_path / "src", make_source())
    marker = tmp_path / "pwned"
    payload = {b"label_names": _RunsACommand(marker)} if hostile == "batches.meta" else _RunsACommand(marker)
    (batch_dir / hostile).write_bytes(pickle.dumps(payload))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([str(batch_dir), str(out), "--val-size", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "refused to load posix.system" in err and hostile in err
    assert not marker.exists(), "the pickle's command ran"
    assert not out.exists()


def test_official_style_batches_still_load_at_every_pickle_protocol(tmp_path):
    batch_dir = write_cifar(tmp_path / "src", make_source())
    for name in ("data_batch_1", "batches.meta"):   # protocol 2: bytes via _codecs.encode, as Python 3 writes it
        (batch_dir / name).write_bytes(pickle.dumps(pickle.loads((batch_dir / name).read_bytes()), protocol=2))
    prepare_dataset(batch_dir, tmp_path / "out", val_size=3)
    assert read_manifest(tmp_path / "out")["counts"] == {"train": 21, "val": 3, "test": 9}
