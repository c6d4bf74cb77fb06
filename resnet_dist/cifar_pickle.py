"""torchvision's pickled CIFAR-10 (``cifar-10-batches-py/``), read with a restricted unpickler.

On its own because pickle can run code on load: everything that touches a pickle is here,
in one short module, so the allow-list below is the whole of what such a file may build.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resnet_dist.arrays import DataError, ImageArrays, to_rgb_square
from resnet_dist.constants import CHANNELS, IMAGE_SIZE

CIFAR_DIR_NAME = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

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


def find_cifar_batches(path: Path) -> Path | None:
    """The cifar-10-batches-py directory at or directly under `path`, if any."""
    if path.name == CIFAR_DIR_NAME or (path / "batches.meta").is_file():
        return path
    return path / CIFAR_DIR_NAME if (path / CIFAR_DIR_NAME).is_dir() else None


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


def load_cifar_batches(root: Path, resize: int | None) -> dict[str, ImageArrays]:
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
        out = {k: (np.stack([np.asarray(to_rgb_square(Image.fromarray(im), resize)) for im in images]), labels)
               for k, (images, labels) in out.items()}
    return {k: ImageArrays(images, labels, classes) for k, (images, labels) in out.items()}
