"""One real local Ray cluster for the whole integration session.

It is started the way a user starts one, `ray start --head` with token
authentication, and this test process joins it as a driver (RAY_ADDRESS), so
the same cluster also takes `ray job submit` in the submission test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.runtime import SERVE_ENV

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOST_NODE_TEST = "test_an_elastic_run_survives_a_lost_node"


def pytest_collection_modifyitems(session, config, items):
    """The lost-node test runs first, on the fresh cluster: an elastic run starts with as many
    workers as the CPUs free at that moment hold, and after other tests (Serve replicas, reused
    Tune trial processes) it could start with one, leaving nothing on the second node to lose."""
    first = [item for item in items if item.name == LOST_NODE_TEST]
    items[:] = first + [item for item in items if item.name != LOST_NODE_TEST]


@dataclass(frozen=True)
class LocalCluster:
    address: str          # GCS address for ray.init / RAY_ADDRESS
    dashboard_url: str    # job submission endpoint
    metrics_port: int     # Prometheus endpoint of the head node
    env: dict             # environment for CLI clients (token auth)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    # Metrics exported every 2 s (default 10 s), so a scrape sees short test runs' metrics.
    # A stopping replica behind HAProxy drains for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
    # (30 s by default) so HAProxy can take it out of rotation; the tests delete apps as they go.
    env = {**os.environ, **SERVE_ENV, "RAY_AUTH_MODE": "token", "RAY_metrics_report_interval_ms": "2000",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    # Its own short temp dir (socket paths are limited to ~107 bytes) marks this cluster's
    # processes, so teardown stops them and not a Ray the developer runs beside the tests.
    temp_dir = tempfile.mkdtemp(prefix="rdt-", dir="/tmp")
    # Its own token (256 bits, as `ray get-auth-token --generate` makes), in that dir: the tests
    # never write the user's ~/.ray/auth_token, so they cannot hide what a fresh machine lacks
    # (scripts/first_run_check.sh runs the main command with an empty HOME for that).
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    gcs, dashboard, metrics = free_port(), free_port(), free_port()
    # Ports of its own for every agent and server too, off Ray's defaults (52365, 10001, ...): a
    # straggler of this cluster must never hold the port a later `ray start` of the machine
    # wants (scripts/first_run_check.sh runs right after the suite; "No available agent to
    # submit job" was what a held agent port looked like there).
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    # Every process of the cluster inherits this. Ray Train's PlacementGroupCleaner (which frees
    # the workers' CPUs when Tune stops a trial under a live Train run) finds the state API by it;
    # without it, it would look in /tmp/ray/ray_current_cluster, which names some other cluster
    # (or a dead one) because this one runs in its own temp dir, and the CPUs would stay held.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    start = subprocess.run(
        [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--metrics-export-port={metrics}", *agent_ports, "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    if start.returncode != 0:
        pytest.fail(f"ray start failed: {start.stderr[-2000:]}")
    ip = _node_ip(start.stdout) or "127.0.0.1"
    cluster = LocalCluster(f"{ip}:{gcs}", f"http://127.0.0.1:{dashboard}", metrics, env)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update({"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)})
    try:
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_cluster(temp_dir, f"RAY_API_SERVER_ADDRESS={env['RAY_API_SERVER_ADDRESS']}")
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop_cluster(temp_dir: str, env_marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names `temp_dir` or whose
    environment holds `env_marker` (a few Ray agents rename themselves, e.g. ray::DashboardAgent,
    and would outlive the tests, spinning on the dead GCS)."""
    def pids() -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if (temp_dir.encode() in (proc / "cmdline").read_bytes()
                            or env_marker.encode() + b"\0" in (proc / "environ").read_bytes() + b"\0"):
                        found.append(int(proc.name))
                except OSError:
                    pass
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while pids() and time.time() < deadline:
            time.sleep(0.2)


def _node_ip(stdout: str) -> str | None:
    for line in stdout.splitlines():
        if "Local node IP:" in line:
            return line.split("Local node IP:")[1].strip()
    return None


@pytest.fixture(scope="session")
def ray_driver(ray_cluster: LocalCluster):
    """This process connected to the shared cluster as a Ray driver."""
    from cluster.runtime import connect

    connect()
    return ray_cluster


def dashboard_metrics() -> dict[str, dict]:
    """The metrics the Grafana dashboard queries (k8s/grafana/metrics.yaml): base name -> kind, labels."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "metrics.yaml").read_text())
    return {spec["prefix"] + name: m for name, m in spec["metrics"].items()}


SERIES_SUFFIX = {"gauge": "", "counter": "_total", "histogram": "_bucket"}


def scraped_names(metrics_port: int) -> set[str]:
    """Names of the series Ray's Prometheus endpoint of this node serves now."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def missing_dashboard_series(seen: set[str], serve: bool) -> list[str]:
    """The dashboard's serving (or else training) metrics of which no series was seen."""
    return [name for name, m in dashboard_metrics().items()
            if ("_serve_" in name) == serve and name + SERIES_SUFFIX[m["kind"]] not in seen]
