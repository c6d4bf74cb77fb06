"""Where outputs live: a local directory, or a URI that pyarrow.fs opens (s3://, gs://, file://...).

The project's own files (best.pt, finetuned.pt, report.md, trials.csv, summaries) are read and
written as files, so a run whose output is a URI works in a local *staging* copy of it and
mirrors that copy to the URI with pyarrow.fs (`Mirror`): pulled when the run starts (a re-run
resumes from what the URI holds), pushed after each phase and when the entry point leaves,
however it leaves short of a SIGKILL. Ray Train and Tune write their own state (checkpoints,
experiment state) to the URI themselves, so the mirror leaves those entries alone. Files that
must reach the URI at once (ASHA's rungs, a checkpoint read by workers on other nodes) are
written or read with `write_bytes` / `read_bytes` directly.

Credentials and endpoints come the usual way: the environment (AWS_ACCESS_KEY_ID, ...,
GOOGLE_APPLICATION_CREDENTIALS) or query parameters pyarrow reads from the URI
(`s3://bucket/prefix?endpoint_override=host:9000&scheme=http` for MinIO).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import Iterable

from resnet_dist.config import ConfigError

# The local staging copies of URI outputs, one directory per URI; override with this variable.
STAGING_ENV = "RESNET_DIST_STAGING"
DEFAULT_STAGING = Path("~/.cache/resnet-dist/staging")


def is_uri(target: str | os.PathLike) -> bool:
    return "://" in str(target)


def resolve(target: str | os.PathLike) -> str:
    """An absolute path (workers and replicas run in other directories), or the URI as given."""
    return str(target) if is_uri(target) else str(Path(target).resolve())


def _split(uri: str) -> tuple[str, str, str]:
    """"s3://b/p?x=1" -> ("s3", "b/p", "?x=1"); the query (pyarrow's options) stays with every join."""
    scheme, rest = uri.split("://", 1)
    path, _, query = rest.partition("?")
    return scheme, path, f"?{query}" if query else ""


def join(target: str | os.PathLike, *parts: str) -> str:
    """TARGET/part/...: a URI stays a URI (its query kept), a path stays a path."""
    if not is_uri(target):
        return str(Path(target).joinpath(*parts))
    scheme, path, query = _split(str(target))
    return f"{scheme}://{PurePosixPath(path, *parts).as_posix()}{query}"


def parent(target: str) -> str:
    if not is_uri(target):
        return str(Path(target).parent)
    scheme, path, query = _split(target)
    return f"{scheme}://{PurePosixPath(path).parent.as_posix()}{query}"


def name(target: str) -> str:
    return PurePosixPath(_split(target)[1]).name if is_uri(target) else Path(target).name


def filesystem(target: str):
    """(pyarrow FileSystem, its path) of a URI or a local path; ConfigError when pyarrow cannot open it."""
    import pyarrow.fs as pafs

    if not is_uri(target):
        return pafs.LocalFileSystem(), str(Path(target).resolve())
    try:
        return pafs.FileSystem.from_uri(target)
    except Exception as e:   # unknown scheme, bad query, missing credentials...
        raise ConfigError(f"storage {target}: pyarrow cannot open it ({' '.join(str(e).split())[:200]})") from None


def with_fs_path(target: str, fs_path: str) -> str:
    """The URI, on TARGET's file system, of `fs_path` (a path as pyarrow and Ray Train give it:
    "bucket/prefix/..." for s3, "/abs/..." for file); `fs_path` itself for a local target."""
    if not is_uri(target):
        return fs_path
    scheme, _, query = _split(target)
    return f"{scheme}://{fs_path.lstrip('/') if scheme != 'file' else fs_path}{query}"


def read_bytes(target: str | os.PathLike) -> bytes:
    if not is_uri(target):
        return Path(target).read_bytes()
    fs, path = filesystem(str(target))
    with fs.open_input_stream(path) as f:   # a missing object is an OSError (FileNotFoundError on file://)
        return f.read()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write a whole file. Objects in a bucket appear whole or not at all; on a file system the
    bytes go to a temporary name first and are renamed into place."""
    if not is_uri(target):
        from resnet_dist.outputs import atomic_write_bytes   # outputs imports torch; only paths need it

        atomic_write_bytes(target, data)
        return
    fs, path = filesystem(str(target))
    fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if _is_local_fs(fs) else path
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    if tmp != path:
        fs.move(tmp, path)


def is_file(target: str | os.PathLike) -> bool:
    if not is_uri(target):
        return Path(target).is_file()
    import pyarrow.fs as pafs

    fs, path = filesystem(str(target))
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(target: str | os.PathLike) -> bool:
    if not is_uri(target):
        return Path(target).is_dir()
    import pyarrow.fs as pafs

    fs, path = filesystem(str(target))
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _is_local_fs(fs) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def staging_dir(uri: str) -> Path:
    """The local staging copy of `uri`: STAGING/<last part>-<hash of the URI>."""
    root = Path(os.environ.get(STAGING_ENV) or DEFAULT_STAGING).expanduser()
    return (root / f"{name(uri) or 'root'}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}").resolve()


def _files(fs, root: str) -> dict[str, object]:
    """relative posix path -> FileInfo of every file under `root` (none when it does not exist)."""
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            out[PurePosixPath(info.path).relative_to(PurePosixPath(root)).as_posix()] = info
    return out


def _skipped(rel: str, skip: Iterable[str]) -> bool:
    top = rel.split("/", 1)[0]
    return any(fnmatch.fnmatch(top, pattern) for pattern in skip)


def sync(src_fs, src: str, dst_fs, dst: str, skip: Iterable[str] = ()) -> int:
    """Copy every file under `src` that `dst` lacks, or holds with another size or an older
    time, skipping top-level entries that match `skip` (glob patterns); returns files copied.
    Nothing is deleted at `dst`."""
    import pyarrow.fs as pafs

    skip = tuple(skip)
    have = _files(dst_fs, dst)
    copied = 0
    for rel, info in sorted(_files(src_fs, src).items()):
        if _skipped(rel, skip):
            continue
        old = have.get(rel)
        if old is not None and old.size == info.size and (old.mtime is None or info.mtime is None
                                                           or old.mtime >= info.mtime):
            continue
        target = f"{dst.rstrip('/')}/{rel}"
        dst_fs.create_dir(str(PurePosixPath(target).parent), recursive=True)
        pafs.copy_files(info.path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)
        copied += 1
    return copied


class Mirror:
    """An output directory that may be a URI: `local` is where this process reads and writes.

    For a local path, `local` is that path and pull/push do nothing. For a URI, `local` is its
    staging copy (`staging_dir`); `with Mirror(...)` pulls on entry and pushes on exit. `skip`
    names the top-level entries that others write to the URI directly (Ray's run state, a
    file store of MLflow's), which the mirror neither pulls nor pushes."""

    def __init__(self, target: str | os.PathLike, skip: Iterable[str] = ()) -> None:
        target = str(target)
        self.uri: str | None = target if is_uri(target) else None
        self.target = target if self.uri else str(Path(target).resolve())
        self.local = staging_dir(target) if self.uri else Path(self.target)
        self.skip = tuple(skip)
        if self.uri:
            self._fs, self._path = filesystem(self.uri)

    def file(self, *parts: str) -> str:
        """TARGET/parts: what a process elsewhere (a worker, a Serve replica) reads."""
        return join(self.target, *parts)

    def pull(self) -> int:
        if not self.uri:
            return 0
        import pyarrow.fs as pafs

        self.local.mkdir(parents=True, exist_ok=True)
        return sync(self._fs, self._path, pafs.LocalFileSystem(), str(self.local), self.skip)

    def push(self) -> int:
        if not self.uri:
            return 0
        import pyarrow.fs as pafs

        self._fs.create_dir(self._path, recursive=True)
        return sync(pafs.LocalFileSystem(), str(self.local), self._fs, self._path, self.skip)

    def check_writable(self) -> None:
        """ConfigError at the entry point when the URI cannot be written (no bucket, no rights)."""
        if not self.uri:
            return
        probe = join(self.uri, f".write-test-{uuid.uuid4().hex[:8]}")
        try:
            write_bytes(probe, b"")
            fs, path = filesystem(probe)
            fs.delete_file(path)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"storage {self.uri} is not writable: {' '.join(str(e).split())[:200]}") from None

    def __enter__(self) -> "Mirror":
        self.pull()
        return self

    def __exit__(self, *exc) -> None:
        self.push()
