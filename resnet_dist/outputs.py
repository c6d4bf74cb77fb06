"""The end of every run, local or on Ray: evaluate the delivered checkpoint on the test
split, record its test accuracy in it, save it and write the run's summary.

Layout of a run directory (jobs/train.py, local or Ray):
  last.pt, best.pt (the best validation epoch, with test_acc), metrics.json
and of a fine-tuning output directory (jobs/finetune.py, and a sweep's directory):
  finetuned.pt (what serving loads, with test_acc), finetune.json; probe.pt when the linear
  probe is where it started; train/finetune/ holds the run's own epoch checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from resnet_dist.checkpoint import default_file_mode, model_from_checkpoint, save_checkpoint
from resnet_dist.config import RunConfig
from resnet_dist.data import read_split
from resnet_dist.engine import EvalResult, evaluate, select_device, select_precision
from resnet_dist.loader import ArrayLoader
from resnet_dist.metrics import classification_report


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomic, durable write: a unique temp file beside `path` (two writers never share one),
    fsync, then rename, so a reader never sees half a file, even after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())   # mkstemp makes 0600; others on shared storage may read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON written atomically (`atomic_write_bytes`). NaN and infinities (e.g. "before"
    accuracy where the classes differ) are written as null: JSON has no NaN, and other readers
    refuse it."""
    atomic_write_bytes(path, json.dumps(_finite(obj), indent=2, allow_nan=False).encode())


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def evaluate_checkpoint(ckpt: dict[str, Any], data_dir: str | os.PathLike, split: str,
                        device: torch.device | None = None, batch_size: int = 1000, flip_tta: bool = True) -> EvalResult:
    """Single-process evaluation of a checkpoint on one split of a prepared data set."""
    device = device or select_device()
    model = model_from_checkpoint(ckpt, device)
    arrays = read_split(data_dir, split)
    loader = ArrayLoader.from_numpy(arrays.images, arrays.labels, batch_size=batch_size,
                                    mean=ckpt["mean"], std=ckpt["std"], device=device)
    train_cfg = RunConfig.from_dict(ckpt["run_config"]).train
    return evaluate(model, loader, len(ckpt["classes"]), device, select_precision(train_cfg, device), flip_tta)


def wrap_up(out_dir: str | os.PathLike, ckpt: dict[str, Any], history: Sequence[Mapping[str, Any]],
            data_dir: str | os.PathLike, *, checkpoint_name: str, summary_name: str, test_key: str = "test",
            flip_tta: bool = True, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `ckpt` (the checkpoint a run delivers) on the test split of `data_dir`, record
    test_acc in it (serving reports it: GET /v1/model), save it as out_dir/checkpoint_name and
    write out_dir/summary_name: config, per-report history, the delivered epoch and the test
    report (under `test_key`), plus `extra`. Returns the summary."""
    out = Path(out_dir)
    test = evaluate_checkpoint(ckpt, data_dir, "test", flip_tta=flip_tta)
    ckpt["metrics"]["test_acc"] = test.accuracy
    save_checkpoint(ckpt, out / checkpoint_name)
    history = [dict(r) for r in history]
    rates = [r["images_per_s"] for r in history]
    summary = {
        "config": ckpt["run_config"],
        "history": history,
        "best_epoch": ckpt["epoch"],
        "best_val_acc": ckpt["metrics"].get("val_acc"),
        test_key: classification_report(test.confusion, ckpt["classes"]),
        "data_fingerprint": ckpt["data_fingerprint"],
        "mean_images_per_s": sum(rates) / len(rates) if rates else math.nan,
        **(extra or {}),
    }
    write_json(out / summary_name, summary)
    return summary
