"""A run knows what it is: the config that defines a run, sweep or fine-tuning is recorded in
its directory (identity.json) when it starts, and a re-run resumes only when it matches.

Without it a re-used `--run-dir`, `--out` or sweep `--name` with another config silently
resumes the old state: a shape or optimizer crash, or zero epochs and the old model reported
as the new result. `--restart` moves the old files aside (kept, not deleted) and starts afresh.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from resnet_dist import storage
from resnet_dist.config import ConfigError
from resnet_dist.outputs import write_json

IDENTITY_FILE = "identity.json"
# Kept where they are by --restart: the driver lock another process may be waiting on.
KEEP_ON_RESTART = {".driver.lock"}
# Settings that change how a run is executed or reported, not what it computes.
EXECUTION_ONLY = {"eval_batch_size", "compile", "amp", "channels_last"}


def run_identity(run_config: Mapping[str, Any], data_fingerprint: str, **extra: Any) -> dict[str, Any]:
    """What defines a training run: its config (less execution-only settings) and its data."""
    train = {k: v for k, v in run_config["train"].items() if k not in EXECUTION_ONLY}
    data = {k: v for k, v in run_config["data"].items() if k != "data_dir"}   # the fingerprint says which
    return {**{k: dict(v) for k, v in run_config.items()}, "train": train, "data": data,
            "data_fingerprint": data_fingerprint, **extra}


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any], most: int = 3) -> str:
    """"optim.lr 0.6 -> 0.2, train.epochs 4 -> 8": what changed, for a one-line error."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = [f"{k} {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys[:most]]
    return ", ".join(shown) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def claim(directory: str | os.PathLike, identity: Mapping[str, Any], what: str, restart: bool = False) -> Path | None:
    """Make `directory` the home of `identity`. A new (or pre-identity) directory records it;
    a matching one resumes; another config is a ConfigError naming the difference, unless
    `restart`, which moves the old files into DIR.replaced-<time>/ and starts afresh. Returns
    where the old files went, or None. Call it while holding the directory's driver lock."""
    directory = Path(directory)
    identity = json.loads(json.dumps(identity))   # plain JSON values, as they are read back
    path = directory / IDENTITY_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    old = [p for p in directory.iterdir() if p.name not in KEEP_ON_RESTART] if directory.is_dir() else []
    aside = None
    if saved is not None and saved != identity and not restart:
        raise ConfigError(f"{what} {directory} was started with another config ({differences(saved, identity)}); "
                          "pass --restart to start afresh (the old files are kept aside) or use another name")
    if restart and old:
        aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for p in old:
            p.rename(aside / p.name)
    if saved != identity or aside is not None:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(path, identity)
    return aside


def claim_mirrored(mirror: storage.Mirror, identity: Mapping[str, Any], what: str, restart: bool = False) -> Path | None:
    """`claim` of an output directory that may be a URI (its mirror's local copy, pulled first).
    A URI's old files cannot be set aside (an object store has no rename of a directory, and
    Ray's state there would be resumed), so `restart` is refused where the URI holds a run."""
    if mirror.uri and restart and storage.is_file(storage.join(mirror.target, IDENTITY_FILE)):
        raise ConfigError(f"--restart: {what} {mirror.target} already holds one, and files in a URI cannot be "
                          "set aside; use another name, or delete it first")
    return claim(mirror.local, identity, what, restart)
