"""Convert a source data set into the Parquet format of `resnet_dist.parquet`, atomically.

The conversion job on its own: read the source (`resnet_dist.sources`), hold out a
stratified val split, shuffle train, write everything to a temporary sibling of OUT and
rename it into place, so OUT is either complete or untouched; decide when an existing OUT
can be reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np

from resnet_dist.arrays import DataError, holdout_size, stratified_split, subset
from resnet_dist.constants import DEFAULT_VAL_SIZE
from resnet_dist.parquet import (
    DEFAULT_ROWS_PER_SHARD, FORMAT_VERSION, MANIFEST_NAME, PathLike, build_manifest, is_prepared, read_manifest,
    write_shards,
)
from resnet_dist.sources import load_source

log = logging.getLogger(__name__)


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


def _reusable_manifest(out: Path, source: dict, options: dict, force: bool) -> dict | None:
    """OUT's manifest if OUT already holds this exact conversion; None if OUT may be (re)written.

    The same conversion in an older format version is re-written without `force` (nothing
    of the user's is lost: the source is at hand). Raises DataError if OUT holds something
    else (another source or options, a newer format, files that are not a data set) and
    `force` is not set.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    try:
        manifest: dict | None = read_manifest(out, check_format=False)
    except DataError:
        manifest = None
    same = (manifest is not None and manifest.get("source", {}).get("signature") == source["signature"]
            and manifest.get("options") == options)
    version = manifest["format_version"] if manifest else None
    if same and version == FORMAT_VERSION and not force:
        return manifest
    if force or not any(out.iterdir()):
        return None
    if same and version < FORMAT_VERSION:
        log.info("%s holds this data set in format %d; converting it again to format %d", out, version, FORMAT_VERSION)
        return None
    if manifest is None:
        what = "files that are not a prepared data set"
    elif version > FORMAT_VERSION:
        what = f"a data set in format {version}, newer than this version's {FORMAT_VERSION}"
    else:
        what = "a data set from a different source or options"
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
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    force: bool = False,
) -> dict:
    """Convert `source` into OUT/{train,val,test}/*.parquet + manifest.json; returns the manifest.

    val is a seeded, class-stratified hold-out of the source's train split: `val_size`
    images, or with None `holdout_size` of it (a user's own data set, size unknown). A
    re-run with the same source and options is a no-op (or a re-conversion, if OUT is in
    an older format); a different OUT raises DataError unless `force`. Everything is
    written to a temporary sibling and renamed into place at the end, so OUT is either
    complete or untouched.
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
    train = subset(train, np.random.default_rng([seed, 1]).permutation(len(train.labels)))
    splits = {"train": train, "val": val, **({"test": loaded["test"]} if "test" in loaded else {})}
    manifest = build_manifest(splits, source_info, options)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)   # mkdtemp makes it owner-only; the data set is meant to be shared
        for name, arrays in splits.items():
            write_shards(arrays, tmp / name, rows_per_shard)
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
