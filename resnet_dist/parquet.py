"""The on-disk format of a prepared data set, and reading it back.

    DIR/manifest.json                  classes, counts, train mean/std, fingerprint, format_version
    DIR/{train,val,test}/part-NNNNN.parquet
        image: fixed_size_binary(H*W*3), one image's raw uint8 pixels, HWC (3,072 bytes for CIFAR)
        label: int64, an index into the manifest's classes

Both halves of the format (manifest and shards) and its version live in this one module, so
the writer and every reader agree by construction. How a source becomes this format is
`resnet_dist.prepare`'s job.

Format versions: 1 stored images as variable-length `binary` (an int32 offset per row);
2 (now) as `fixed_size_binary`, whose data buffer is the images back to back, so a
column decodes with one `np.frombuffer`. A data directory in another format is refused by
`read_manifest` with the command that converts it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet_dist.arrays import DataError, ImageArrays
from resnet_dist.constants import DEFAULT_VAL_SIZE

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
OUTPUT_SPLITS = ("train", "val", "test")
DEFAULT_ROWS_PER_SHARD = 5000   # images per Parquet file: 15 MB of CIFAR pixels
_REQUIRED_KEYS = ("format_version", "classes", "image_shape", "counts", "mean", "std", "fingerprint")


# --------------------------------------------------------------------------- manifest


def _fingerprint(splits: Mapping[str, ImageArrays]) -> str:
    """sha256 over the class names and every split's image bytes and labels, in order.

    A function of the content only (not of how it is stored), so it is the same in every format.
    """
    first = next(iter(splits.values()))
    h = hashlib.sha256(json.dumps(list(first.classes)).encode())
    for name, arrays in splits.items():
        h.update(json.dumps([name, list(arrays.images.shape)]).encode())
        h.update(np.ascontiguousarray(arrays.images))
        h.update(arrays.labels.astype("<i8"))
    return f"sha256:{h.hexdigest()}"


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on pixel values scaled to [0, 1]."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[-1]):
        # Exact moments from a 256-bin histogram, without a float copy of the images.
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        m = hist @ levels / hist.sum()
        mean.append(round(float(m), 6))
        std.append(round(math.sqrt(max(float(hist @ levels**2 / hist.sum() - m * m), 0.0)), 6))
    return mean, std


def build_manifest(splits: Mapping[str, ImageArrays], source: dict, options: dict) -> dict:
    """The manifest.json of `splits` ("train" first), in the current format."""
    classes = list(splits["train"].classes)
    mean, std = _channel_stats(splits["train"].images)
    return {
        "format_version": FORMAT_VERSION,
        "classes": classes,
        "image_shape": list(splits["train"].images.shape[1:]),
        "counts": {k: len(a.labels) for k, a in splits.items()},
        "class_counts": {k: dict(zip(classes, np.bincount(a.labels, minlength=len(classes)).tolist()))
                         for k, a in splits.items()},
        "mean": mean,
        "std": std,
        "fingerprint": _fingerprint(splits),
        "options": options,
        "source": source,
    }


def _prepare_command(manifest: dict, data_dir: PathLike) -> str:
    """The jobs/prepare_data.py command line that converts `data_dir` again from its source."""
    options = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    flags = []
    # val_size None (10% of a user's folder, from ensure_prepared) has no flag; that path re-converts itself.
    for key, flag, default in (("val_size", "--val-size", DEFAULT_VAL_SIZE), ("seed", "--seed", 0),
                               ("resize", "--resize", None), ("rows_per_shard", "--rows-per-shard",
                                                              DEFAULT_ROWS_PER_SHARD)):
        value = options.get(key)
        if value is not None and value != default:
            flags += [flag, str(value)]
    return shlex.join(["python", "jobs/prepare_data.py", str(source.get("path", "SOURCE")), str(data_dir),
                       *flags, "--force"])


def read_manifest(data_dir: PathLike, check_format: bool = True) -> dict:
    """The manifest.json of a prepared data set; DataError if missing, corrupt or (unless
    `check_format` is off) in another format version than this code reads."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; prepare the data first with jobs/prepare_data.py") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: corrupt manifest ({exc})") from exc
    if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED_KEYS):
        raise DataError(f"{path}: corrupt manifest (needs keys {', '.join(_REQUIRED_KEYS)})")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise DataError(f"{path}: corrupt manifest (format_version {version!r} is not an integer)")
    if check_format and version != FORMAT_VERSION:
        age, fix = (("an older", "convert it again") if version < FORMAT_VERSION else
                    ("a newer", "read it with that version, or convert it again for this one"))
        raise DataError(f"{path}: data format {version}, written by {age} resnet-dist; this one reads format "
                        f"{FORMAT_VERSION}; {fix}: {_prepare_command(manifest, data_dir)}")
    return manifest


def is_prepared(data: PathLike) -> bool:
    """Whether `data` is a prepared data set (Parquet shards + manifest), not raw images."""
    return (Path(data) / MANIFEST_NAME).is_file()


# --------------------------------------------------------------------------- image column


def image_type(image_shape: Sequence[int]) -> pa.DataType:
    """The arrow type of the image column: one fixed-size value of H*W*C bytes per row."""
    return pa.binary(math.prod(int(d) for d in image_shape))


def encode_images(images: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 (N, H, W, C) images as an arrow fixed_size_binary(H*W*C) array over the same
    memory (no copy for a C-contiguous input): row i is images[i]'s raw HWC bytes."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    flat = np.ascontiguousarray(images).reshape(-1)
    return pa.FixedSizeBinaryArray.from_buffers(image_type(images.shape[1:]), len(images),
                                                [None, pa.py_buffer(flat)])


def _chunk_pixels(chunk: pa.Array, row_bytes: int) -> np.ndarray:
    """A read-only uint8 view of one fixed_size_binary chunk's rows (its slice of the data buffer)."""
    if not pa.types.is_fixed_size_binary(chunk.type) or chunk.type.byte_width != row_bytes:
        hint = (": prepared by an older resnet-dist; convert it again with jobs/prepare_data.py --force"
                if pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type) else "")
        raise DataError(f"image column is {chunk.type}, expected {pa.binary(row_bytes)}{hint}")
    if chunk.null_count:
        raise DataError(f"image column has {chunk.null_count} missing images")
    if len(chunk) == 0:
        return np.empty(0, dtype=np.uint8)
    view = np.frombuffer(chunk.buffers()[1], dtype=np.uint8, count=len(chunk) * row_bytes,
                         offset=chunk.offset * row_bytes)
    # Buffers read from Parquet are mutable; a writable view would let a caller change the
    # arrow column (and every table sharing it) behind its back.
    view.flags.writeable = False
    return view


def decode_images(
    column: pa.Array | pa.ChunkedArray | np.ndarray | Iterable[bytes], image_shape: Sequence[int]
) -> np.ndarray:
    """An image column as one uint8 array (N, H, W, C).

    Takes the arrow column (fixed_size_binary(H*W*C), as read from a shard): a single chunk
    gives a read-only view of arrow's buffer, no copy; several chunks are concatenated once.
    Or a numpy object array / list of `bytes`, one per row, which is what Ray Data
    (2.60) hands a `map_batches(batch_format="numpy")` function for a fixed_size_binary
    column: they are joined once into a new, writable array.
    """
    shape = tuple(int(d) for d in image_shape)
    row_bytes = math.prod(shape)
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        views = [_chunk_pixels(c, row_bytes) for c in chunks]
        flat = views[0] if len(views) == 1 else np.concatenate(views or [np.empty(0, np.uint8)])
        return flat.reshape((-1, *shape))
    values = column if isinstance(column, (list, np.ndarray)) else list(column)
    # A per-row length check (N ints, microseconds for a batch), so that rows of the wrong
    # size are an error even when their total happens to be a multiple of the row size.
    wrong = next((i for i, v in enumerate(values) if not isinstance(v, (bytes, bytearray, memoryview))
                  or len(v) != row_bytes), None)
    if wrong is not None:
        v = values[wrong]
        what = f"{len(v)} bytes" if isinstance(v, (bytes, bytearray, memoryview)) else type(v).__name__
        raise DataError(f"image column row {wrong} holds {what}; expected {row_bytes} bytes (shape {shape})")
    # One join + one frombuffer instead of N small conversions; a bytearray keeps the result
    # writable (torch.from_numpy warns about read-only arrays).
    return np.frombuffer(bytearray().join(values), dtype=np.uint8).reshape((len(values), *shape))


# --------------------------------------------------------------------------- shards


def write_shards(arrays: ImageArrays, split_dir: Path, rows_per_shard: int) -> None:
    """`arrays` as split_dir/part-NNNNN.parquet, `rows_per_shard` images per file, in order."""
    split_dir.mkdir()
    for shard, start in enumerate(range(0, len(arrays.labels), rows_per_shard)):
        stop = start + rows_per_shard
        table = pa.table({
            "image": encode_images(arrays.images[start:stop]),
            "label": pa.array(arrays.labels[start:stop], type=pa.int64()),
        })
        # Pixel bytes barely compress and min/max statistics of 3 KB blobs are useless.
        pq.write_table(table, split_dir / f"part-{shard:05d}.parquet", use_dictionary=False,
                       write_statistics=["label"])


def split_files(data_dir: PathLike, split: str) -> list[str]:
    """The Parquet shard paths of one split ("train", "val" or "test"), sorted."""
    counts = read_manifest(data_dir)["counts"]
    if split not in counts:
        raise DataError(f"{data_dir}: no {split!r} split (has {', '.join(counts)})")
    files = sorted(str(p) for p in (Path(data_dir) / split).glob("part-*.parquet"))
    if not files:
        raise DataError(f"{Path(data_dir) / split}: no Parquet shards")
    return files


def read_split(data_dir: PathLike, split: str) -> ImageArrays:
    """Read one split's shards back into memory (writable arrays)."""
    manifest = read_manifest(data_dir)
    where = Path(data_dir) / split
    try:
        table = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in split_files(data_dir, split)])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{where}: corrupt Parquet shard ({exc})") from exc
    if table.num_rows != manifest["counts"][split]:
        raise DataError(f"{where}: {table.num_rows} rows, manifest says {manifest['counts'][split]}")
    try:
        images = decode_images(table.column("image"), manifest["image_shape"])
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    # One copy out of arrow's read-only buffers (a single shard decodes to a view of them).
    images = images if images.flags.writeable else images.copy()
    labels = table.column("label").to_numpy().astype(np.int64)  # a writable copy
    return ImageArrays(images, labels, tuple(manifest["classes"]))
