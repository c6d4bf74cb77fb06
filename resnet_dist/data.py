"""Read image-classification data sets and convert them to sharded Parquet.

Sources, auto-detected by `load_source`:
  * torchvision's pickled ``cifar-10-batches-py/`` directory (or a directory holding it);
  * an image folder ``ROOT/{train,test}/<class>/*.{png,jpg,jpeg}``;
  * a .tar / .tar.gz / .tgz / .tar.xz archive of such a folder, streamed into memory.

`prepare_dataset` writes ``OUT/{train,val,test}/part-NNNNN.parquet`` (columns
``image``: the raw HWC uint8 bytes, ``label``: int64) and ``OUT/manifest.json``,
so training never decodes an image file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import lzma
import math
import os
import pickle
import secrets
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from resnet_dist.constants import CHANNELS, DEFAULT_VAL_SIZE, IMAGE_SIZE

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SOURCE_SPLITS = ("train", "test")
OUTPUT_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")
CIFAR_DIR_NAME = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class DataError(ValueError):
    """Bad input data; str(e) is one clear line naming the file/problem."""


# eq=False: the generated __eq__ would compare numpy arrays, which is ambiguous.
@dataclass(frozen=True, eq=False)
class ImageArrays:
    """One split in memory."""

    images: np.ndarray        # uint8 (N, H, W, 3)
    labels: np.ndarray        # int64 (N,), indices into classes
    classes: tuple[str, ...]


# --------------------------------------------------------------------------- readers


def load_source(path: PathLike, resize: int | None = None) -> dict[str, ImageArrays]:
    """Read a data set into memory: keys "train" and, when the source has one, "test".

    Without `resize` every image must be 32x32 RGB; with `resize=N` images are
    converted to RGB and resized to NxN (PIL bicubic).
    """
    src = Path(path)
    if resize is not None and resize < 1:
        raise DataError(f"resize must be a positive image size in pixels, got {resize}")
    if not src.exists():
        raise DataError(f"{src}: no such file or directory")
    if src.is_file():
        if not src.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"{src}: not a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive")
        return _load_tree(src, *_read_archive(src), resize)
    batches = _find_cifar_batches(src)
    if batches is not None:
        return _load_cifar_batches(batches, resize)
    return _load_tree(src, *_scan_folder(src), resize)


def _is_image_name(name: str) -> bool:
    # Hidden files include macOS "._x.jpg" resource forks, which are not images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _read_archive(path: Path) -> tuple[set[tuple[str, ...]], dict[tuple[str, ...], bytes | Path]]:
    """Directory entries and image bytes of a tar archive, read in one sequential pass."""
    dirs: set[tuple[str, ...]] = set()
    files: dict[tuple[str, ...], bytes | Path] = {}
    try:
        # "r|*" streams members in order (compression auto-detected): no seeks, nothing on disk.
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in ("", ".", "/"))
                if not parts or any(p.startswith(".") for p in parts):
                    continue
                if member.isdir():
                    dirs.add(parts)
                elif member.isfile() and _is_image_name(parts[-1]):
                    files[parts] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc})") from exc
    return dirs, files


def _scan_folder(root: Path) -> tuple[set[tuple[str, ...]], dict[tuple[str, ...], bytes | Path]]:
    """Directories and image paths of a folder, at most TOP/SPLIT/CLASS/FILE deep."""
    dirs: set[tuple[str, ...]] = set()
    files: dict[tuple[str, ...], bytes | Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        # Deeper levels cannot hold images of this layout; skip walking them.
        dirnames[:] = [] if len(rel) >= 3 else [d for d in dirnames if not d.startswith(".")]
        dirs.update(rel + (d,) for d in dirnames)
        files.update({rel + (n,): Path(dirpath, n) for n in filenames if _is_image_name(n)})
    return dirs, files


def _load_tree(
    source: Path,
    dirs: set[tuple[str, ...]],
    files: Mapping[tuple[str, ...], bytes | Path],
    resize: int | None,
) -> dict[str, ImageArrays]:
    """Decode a [TOP/]SPLIT/CLASS/FILE tree; classes are the sorted class directory names."""
    dirs = dirs | {parts[:i] for parts in files for i in range(1, len(parts))}
    tops = {d[0] for d in dirs}
    if "train" in tops:
        prefix: tuple[str, ...] = ()
    elif len(tops) == 1 and (next(iter(tops)), "train") in dirs:
        prefix = (next(iter(tops)),)   # an archive of the folder itself: one top-level directory
    else:
        raise DataError(f"{source}: no train/ directory found (expected [TOP/]train/<class>/*.png|jpg)")
    depth = len(prefix)
    grouped: dict[tuple[str, str], list[tuple[str, ...]]] = {}
    for parts in files:
        if len(parts) == depth + 3 and parts[:depth] == prefix:
            grouped.setdefault((parts[depth], parts[depth + 1]), []).append(parts)

    in_folder = source.is_dir()

    def where(parts: tuple[str, ...]) -> str:   # how error messages name a file or directory
        return str(source.joinpath(*parts)) if in_folder else f"{source}:{'/'.join(parts)}"

    out: dict[str, ImageArrays] = {}
    for split in SOURCE_SPLITS:
        if prefix + (split,) not in dirs:
            continue
        classes = tuple(sorted(d[-1] for d in dirs if len(d) == depth + 2 and d[:-1] == prefix + (split,)))
        if not classes:
            raise DataError(f"{where(prefix + (split,))}: no class directories found")
        items: list[tuple[str, bytes | Path]] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            members = sorted(grouped.get((split, name), []))
            if not members:
                raise DataError(f"{where(prefix + (split, name))}: empty class directory "
                                f"(no {'/'.join(IMAGE_SUFFIXES)} images)")
            items.extend((where(m), files[m]) for m in members)
            labels.extend([label] * len(members))
        start = time.perf_counter()
        log.info("decoding %d %s images (%d classes)...", len(items), split, len(classes))
        images = _decode_files(items, resize)
        log.info("decoded %d %s images in %.1f s", len(items), split, time.perf_counter() - start)
        out[split] = ImageArrays(images, np.asarray(labels, dtype=np.int64), classes)
    if "test" in out and out["test"].classes != out["train"].classes:
        only_train = sorted(set(out["train"].classes) - set(out["test"].classes))
        only_test = sorted(set(out["test"].classes) - set(out["train"].classes))
        raise DataError(f"{source}: train and test have different class sets "
                        f"(only in train: {only_train}; only in test: {only_test})")
    return out


def _decode_files(items: Sequence[tuple[str, bytes | Path]], resize: int | None) -> np.ndarray:
    """Decode (name, bytes-or-path) pairs into one uint8 (N, S, S, 3) array."""
    size = resize or IMAGE_SIZE
    out = np.empty((len(items), size, size, CHANNELS), dtype=np.uint8)
    for i, (name, data) in enumerate(items):
        out[i] = _decode_one(name, data if isinstance(data, bytes) else data.read_bytes(), resize)
    return out


def _decode_one(name: str, data: bytes, resize: int | None) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))
        img.load()
    except UnidentifiedImageError as exc:   # its message names a BytesIO, not the file
        raise DataError(f"{name}: corrupt or unreadable image (not a PNG or JPEG file)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: corrupt or unreadable image ({exc})") from exc
    if resize is None:
        if img.mode != "RGB" or img.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]} {img.mode}, expected "
                            f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB; pass --resize {IMAGE_SIZE} to convert it")
        return np.asarray(img)
    return np.asarray(_to_rgb_square(img, resize))


def _to_rgb_square(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB")
    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC)


def _find_cifar_batches(path: Path) -> Path | None:
    """The cifar-10-batches-py directory at or directly under `path`, if any."""
    if path.name == CIFAR_DIR_NAME or (path / "batches.meta").is_file():
        return path
    return path / CIFAR_DIR_NAME if (path / CIFAR_DIR_NAME).is_dir() else None


# What the official CIFAR-10 python batches (and numpy arrays pickled like them) are made of:
# dicts, lists, bytes, str and ints need no global; numpy arrays and scalars need these.
# Any other global (os.system, builtins.eval, subprocess.Popen...) is what a pickle that runs
# code on load would name, so it is refused before anything is called.
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),   # how Python 3 pickles bytes at protocol 2
})


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the official batch files hold (see above)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: the official CIFAR-10 batches hold only dicts, lists, "
                "bytes, str, ints and numpy arrays (this file could run code)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    # The official CIFAR-10 python format is pickle, which can run code on load: a restricted
    # unpickler reads it, so a folder from anywhere cannot (jobs/prepare_data.py, --finetune-data).
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing CIFAR-10 batch file") from exc
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"{path}: corrupt CIFAR-10 batch file ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: corrupt CIFAR-10 batch file (not a dict)")
    return obj


def _field(batch: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: CIFAR-10 batch file has no {key!r} entry")


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "labels", path), dtype=np.int64)
    # Rows are 3,072 bytes: the 32x32 red plane, then green, then blue.
    row_bytes = IMAGE_SIZE * IMAGE_SIZE * CHANNELS
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row_bytes:
        raise DataError(f"{path}: 'data' must be uint8 (N, {row_bytes}), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{path}: label {bad[0]} out of range 0..{num_classes - 1}")
    images = data.reshape(-1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _load_cifar_batches(root: Path, resize: int | None) -> dict[str, ImageArrays]:
    """Read torchvision's cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta)."""
    meta_path = root / "batches.meta"
    names = _field(_unpickle(meta_path), "label_names", meta_path)
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if not classes:
        raise DataError(f"{meta_path}: no classes found (empty label_names)")
    train = [_read_cifar_batch(root / name, len(classes)) for name in CIFAR_TRAIN_BATCHES]
    test = _read_cifar_batch(root / "test_batch", len(classes))
    out = {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": test,
    }
    if resize not in (None, IMAGE_SIZE):
        out = {k: (np.stack([np.asarray(_to_rgb_square(Image.fromarray(im), resize)) for im in images]), labels)
               for k, (images, labels) in out.items()}
    return {k: ImageArrays(images, labels, classes) for k, (images, labels) in out.items()}


# --------------------------------------------------------------------------- splitting


def _subset(arrays: ImageArrays, index: np.ndarray) -> ImageArrays:
    return ImageArrays(arrays.images[index], arrays.labels[index], arrays.classes)


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
    return _subset(arrays, ~is_val), _subset(arrays, is_val)


# --------------------------------------------------------------------------- Parquet output


def _source_signature(path: Path) -> str:
    """Cheap identity of a source: sha256 of an archive file, or of a directory's sorted listing with sizes."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(path).as_posix()}\t{p.stat().st_size}\n".encode())
    return f"sha256:{h.hexdigest()}"


def _fingerprint(splits: Mapping[str, ImageArrays]) -> str:
    """sha256 over the class names and every split's image bytes and labels, in order."""
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


def _build_manifest(splits: Mapping[str, ImageArrays], source: dict, options: dict) -> dict:
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


def _binary_column(images: np.ndarray) -> pa.Array:
    """Arrow binary array whose row i is images[i]'s raw bytes, built without per-row Python objects."""
    row_bytes = int(np.prod(images.shape[1:]))
    offsets = np.arange(len(images) + 1, dtype=np.int64) * row_bytes
    if offsets[-1] > np.iinfo(np.int32).max:   # arrow binary offsets are int32
        raise DataError(f"a shard of {len(images)} images of {row_bytes} bytes exceeds 2 GiB; lower rows_per_shard")
    flat = np.ascontiguousarray(images).reshape(-1)
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(flat)]
    return pa.Array.from_buffers(pa.binary(), len(images), buffers)


def _write_shards(arrays: ImageArrays, split_dir: Path, rows_per_shard: int) -> None:
    split_dir.mkdir()
    for shard, start in enumerate(range(0, len(arrays.labels), rows_per_shard)):
        stop = start + rows_per_shard
        table = pa.table({
            "image": _binary_column(arrays.images[start:stop]),
            "label": pa.array(arrays.labels[start:stop], type=pa.int64()),
        })
        # Pixel bytes barely compress and min/max statistics of 3 KB blobs are useless.
        pq.write_table(table, split_dir / f"part-{shard:05d}.parquet", use_dictionary=False,
                       write_statistics=["label"])


def _reusable_manifest(out: Path, source: dict, options: dict, force: bool) -> dict | None:
    """OUT's manifest if OUT already holds this exact conversion; None if OUT may be (re)written.

    Raises DataError if OUT holds something else and `force` is not set.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    try:
        manifest: dict | None = read_manifest(out)
    except DataError:
        manifest = None
    same = (manifest is not None and manifest.get("source", {}).get("signature") == source["signature"]
            and manifest.get("options") == options)
    if same and not force:
        return manifest
    if force or not any(out.iterdir()):
        return None
    what = "a data set from a different source or options" if manifest else "files that are not a prepared data set"
    raise DataError(f"{out}: already holds {what}; pass --force to replace it")


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished tmp dir to OUT; an existing OUT is swapped aside first, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def holdout_size(n_train: int) -> int:
    """Validation images to carve from a user's own train split of `n_train` images: 10%,
    at most the CIFAR-10 default, at least one."""
    return max(1, min(DEFAULT_VAL_SIZE, n_train // 10))


def is_prepared(data: PathLike) -> bool:
    """Whether `data` is a prepared data set (Parquet shards + manifest), not raw images."""
    return (Path(data) / MANIFEST_NAME).is_file()


def ensure_prepared(data: PathLike, workdir: PathLike) -> Path:
    """`data` itself when it is prepared Parquet; otherwise `data` (an image folder or archive)
    prepared into `workdir` with `holdout_size` val images (a no-op when already there)."""
    if is_prepared(data):
        return Path(data)
    prepare_dataset(data, workdir, val_size=None)
    return Path(workdir)


def prepare_dataset(
    source: PathLike,
    out_dir: PathLike,
    val_size: int | None = DEFAULT_VAL_SIZE,
    seed: int = 0,
    resize: int | None = None,
    rows_per_shard: int = 5000,
    force: bool = False,
) -> dict:
    """Convert `source` into OUT/{train,val,test}/*.parquet + manifest.json; returns the manifest.

    val is a seeded, class-stratified hold-out of the source's train split: `val_size`
    images, or with None `holdout_size` of it (a user's own data set, size unknown). A
    re-run with the same source and options is a no-op; a different OUT raises
    DataError unless `force`. Everything is written to a temporary sibling and
    renamed into place at the end, so OUT is either complete or untouched.
    """
    src, out = Path(source), Path(out_dir)
    if rows_per_shard < 1:
        raise DataError(f"rows_per_shard must be positive, got {rows_per_shard}")
    if not src.exists():
        raise DataError(f"{src}: no such file or directory")
    source_info = {"path": str(src.resolve()), "signature": _source_signature(src)}
    options = {"val_size": val_size, "seed": seed, "resize": resize, "rows_per_shard": rows_per_shard}
    existing = _reusable_manifest(out, source_info, options, force)
    if existing is not None:
        log.info("%s is already prepared from this source with these options; nothing to do", out)
        return existing

    log.info("reading %s", src)
    loaded = load_source(src, resize)
    n_val = holdout_size(len(loaded["train"].labels)) if val_size is None else val_size
    train, val = stratified_split(loaded["train"], n_val, seed)
    # Shuffle train once so every shard mixes classes; its own seeded stream, independent of the split.
    train = _subset(train, np.random.default_rng([seed, 1]).permutation(len(train.labels)))
    splits = {"train": train, "val": val, **({"test": loaded["test"]} if "test" in loaded else {})}
    manifest = _build_manifest(splits, source_info, options)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)   # mkdtemp makes it owner-only; the data set is meant to be shared
        for name, arrays in splits.items():
            _write_shards(arrays, tmp / name, rows_per_shard)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        # Another process (e.g. a second test session) may have finished the same job meanwhile.
        existing = _reusable_manifest(out, source_info, options, force)
        if existing is not None:
            shutil.rmtree(tmp)
            return existing
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s)", out, ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()))
    return manifest


# --------------------------------------------------------------------------- reading back


def read_manifest(data_dir: PathLike) -> dict:
    """The manifest.json of a prepared data set; DataError if missing or corrupt."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; prepare the data first with jobs/prepare_data.py") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: corrupt manifest ({exc})") from exc
    required = ("format_version", "classes", "image_shape", "counts", "mean", "std", "fingerprint")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise DataError(f"{path}: corrupt manifest (needs keys {', '.join(required)})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest['format_version']}, expected {FORMAT_VERSION}; "
                        "prepare the data again")
    return manifest


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
    """Read one split's shards back into memory."""
    manifest = read_manifest(data_dir)
    try:
        table = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in split_files(data_dir, split)])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{Path(data_dir) / split}: corrupt Parquet shard ({exc})") from exc
    if table.num_rows != manifest["counts"][split]:
        raise DataError(f"{Path(data_dir) / split}: {table.num_rows} rows, manifest says {manifest['counts'][split]}")
    images = decode_images(table.column("image"), manifest["image_shape"])
    labels = table.column("label").to_numpy().astype(np.int64)  # a writable copy
    return ImageArrays(images, labels, tuple(manifest["classes"]))


def _arrow_bytes(chunk: pa.Array) -> np.ndarray:
    """The concatenated value bytes of one arrow binary chunk (a view, no per-row copies)."""
    offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    _, offsets_buf, data_buf = chunk.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[chunk.offset: chunk.offset + len(chunk) + 1]
    return np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]]


def decode_images(
    column_values: Iterable[bytes] | pa.Array | pa.ChunkedArray, image_shape: Sequence[int]
) -> np.ndarray:
    """Turn a column of raw HWC uint8 image bytes into one writable uint8 array (N, H, W, C).

    Takes an arrow binary (chunked) array, or a numpy object array / list of
    bytes, which is what Ray Data's map_batches passes for the "image" column.
    """
    shape = tuple(int(d) for d in image_shape)
    if isinstance(column_values, (pa.Array, pa.ChunkedArray)):
        n = len(column_values)
        chunks = column_values.chunks if isinstance(column_values, pa.ChunkedArray) else [column_values]
        # np.concatenate copies out of arrow's read-only buffers.
        flat = np.concatenate([_arrow_bytes(c) for c in chunks] or [np.empty(0, np.uint8)])
    else:
        values = column_values if isinstance(column_values, (list, np.ndarray)) else list(column_values)
        n = len(values)
        # One join + one frombuffer instead of N small conversions; a bytearray keeps the
        # result writable (torch.from_numpy warns about read-only arrays).
        flat = np.frombuffer(bytearray().join(values), dtype=np.uint8)
    if flat.size != n * math.prod(shape):
        raise DataError(f"image column holds {flat.size} bytes for {n} rows; "
                        f"expected {math.prod(shape)} per row of shape {shape}")
    return flat.reshape((n, *shape))
