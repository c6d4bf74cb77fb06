"""One driver per sweep: a real second process holds the lock; a killed holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.lock import LOCK_FILE, DriverLock
from resnet_dist.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from cluster.lock import DriverLock\nwith DriverLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)"


def test_a_second_driver_is_refused_and_a_killed_drivers_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another driver .*pid {holder.pid}") as err:
            with DriverLock(tmp_path):
                pass
        assert "\n" not in str(err.value)
        os.kill(holder.pid, signal.SIGKILL)   # dies without releasing anything
        holder.wait()
        with DriverLock(tmp_path):            # the stale lock is taken over
            assert f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
        with DriverLock(tmp_path):            # and released on exit
            pass
    finally:
        holder.kill()
        holder.wait()
