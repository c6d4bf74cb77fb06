"""Read a source data set into memory: `load_source` picks the reader.

Sources, auto-detected:
  * torchvision's pickled ``cifar-10-batches-py/`` directory, or a directory holding it
    (`resnet_dist.cifar_pickle`);
  * an image folder ``ROOT/{train,test}/<class>/*.{png,jpg,jpeg}``;
  * a .tar / .tar.gz / .tgz / .tar.xz archive of such a folder, streamed into memory.

This module turns files into `ImageArrays` and nothing else; what is written to disk
from them is `resnet_dist.parquet`'s business.
"""

from __future__ import annotations

import io
import logging
import lzma
import os
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from resnet_dist.arrays import DataError, ImageArrays, to_rgb_square
from resnet_dist.cifar_pickle import find_cifar_batches, load_cifar_batches
from resnet_dist.constants import CHANNELS, IMAGE_SIZE

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SOURCE_SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")


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
    batches = find_cifar_batches(src)
    if batches is not None:
        return load_cifar_batches(batches, resize)
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
    return np.asarray(to_rgb_square(img, resize))
