"""One driver per sweep or run directory.

Two drivers on one directory would restore and run the same trials and delete each other's
checkpoints. The driver holds an exclusive `flock` on DIR/.driver.lock while it runs: local
file systems and NFSv4 (through its lock manager) honour it. The kernel (or the NFS server,
when the client's lease expires) drops the lock of a driver that dies, however it dies, so a
stale lock is taken over by the next driver without a check of its own; the file keeps the
last holder's host, pid and start time for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from resnet_dist.config import ConfigError

LOCK_FILE = ".driver.lock"


class DriverLock:
    """`with DriverLock(dir):` -- ConfigError naming the holder when another driver has it."""

    def __init__(self, directory: str | os.PathLike, what: str = "sweep") -> None:
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "DriverLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{self.what} {self.path.parent} is in use by another driver ({holder}); "
                              "wait for it to finish or stop it, or use another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
