"""The checkpoint format: one self-describing dict.

It holds the unwrapped weights, optimizer, scheduler, epoch, RNG states,
model and run config, class names, normalisation constants, data fingerprint,
code version and metrics, so serving can rebuild the model from it alone.
It contains only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`, and it is written atomically.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from resnet_dist import __version__, storage
from resnet_dist.config import ModelConfig, section_from_dict
from resnet_dist.models import ResNet, build_model

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"   # file name inside a checkpoint directory
# The files of a run or sweep directory (resnet_dist.outputs has the layout).
LAST_CHECKPOINT = "last.pt"           # the latest epoch of a run
BEST_CHECKPOINT = "best.pt"           # a run's best validation epoch; a sweep's selected trial
FINETUNED_CHECKPOINT = "finetuned.pt" # fine-tuning's result: what serving loads
PROBE_CHECKPOINT = "probe.pt"         # the linear probe fine-tuning started from (other classes)
# What a directory means, in order: for serving, its fine-tuned model first; as the source
# of fine-tuning, the selected (not the fine-tuned) model first.
SERVING_ORDER = (FINETUNED_CHECKPOINT, CHECKPOINT_FILE, BEST_CHECKPOINT)
SOURCE_ORDER = (BEST_CHECKPOINT, CHECKPOINT_FILE, FINETUNED_CHECKPOINT)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or not in this project's format."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code when available, else the package version."""
    env = os.environ.get("RESNET_DIST_CODE_VERSION")
    if env:
        return env
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return f"v{__version__}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_checkpoint(
    model: nn.Module,
    *,
    model_config: ModelConfig,
    run_config: dict[str, Any],
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    data_fingerprint: str,
    epoch: int,
    metrics: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict. `epoch` is the number of completed epochs."""
    return {
        "format_version": FORMAT_VERSION,
        "model_state": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "rng_state": rng_state(),
        "model_config": model_config.__dict__.copy(),
        "run_config": run_config,
        "classes": list(classes),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "data_fingerprint": data_fingerprint,
        "code_version": code_version(),
        "metrics": metrics,
        "extra": extra or {},
    }


def default_file_mode() -> int:
    """0o666 less the process umask: the mode `open()` would give a new file. mkstemp (used for
    atomic writes) makes 0600, which would keep another user id on shared storage (a serving
    pod, a teammate) from reading best.pt. The umask is read from /proc where it can be, since
    setting it to read it back races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically: a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint(path: str | os.PathLike, order: Sequence[str] = SERVING_ORDER) -> Path | str:
    """The checkpoint file meant by `path`, the one resolver of the project: a file, or in a
    directory (a run, a sweep, a fine-tuning output, a Ray checkpoint) the first of `order`
    that is there. `path` may be a URI (resnet_dist.storage); the answer is then one too."""
    if storage.is_uri(path):
        return _resolve_uri(str(path), order)
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: no such file or directory")
    for name in order:
        if (p / name).is_file():
            return p / name
    raise CheckpointError(f"no checkpoint in {path}: looked for {', '.join(order)}")


def _resolve_uri(uri: str, order: Sequence[str]) -> str:
    try:
        if storage.is_file(uri):
            return uri
        if not storage.is_dir(uri):
            raise CheckpointError(f"no checkpoint at {uri}: no such file or directory")
        for name in order:
            if storage.is_file(storage.join(uri, name)):
                return storage.join(uri, name)
    except OSError as e:   # no such bucket, no rights, unreachable endpoint
        raise CheckpointError(f"no checkpoint at {uri}: {' '.join(str(e).split())[:200]}") from None
    raise CheckpointError(f"no checkpoint in {uri}: looked for {', '.join(order)}")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (`weights_only=True`); CheckpointError if unusable."""
    p = resolve_checkpoint(path)
    try:
        source = io.BytesIO(storage.read_bytes(p)) if storage.is_uri(p) else p
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle error, foreign object...
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p} is not a resnet-dist checkpoint (format {FORMAT_VERSION})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> ResNet:
    """Rebuild the network from the checkpoint alone, in eval mode."""
    model = build_model(section_from_dict(ModelConfig, ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ResNet, dict[str, Any]]:
    """Load a checkpoint and rebuild its model; returns (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, device), ckpt
