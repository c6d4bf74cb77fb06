"""Connecting to Ray and sizing work to the cluster."""

from __future__ import annotations

import logging
import os

import ray
import ray.data

# Ray Train V2 (the default since Ray 2.50) is what this project is written for.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The Train controller polls workers (and so drains their reports) at this
# interval, 2 s by default; 0.2 s cuts a few seconds off every fit() and report.
# The driver forwards it to the controller and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Serve's throughput mode (Ray's own switch, documented for KubeRay): the router and
# user code run on the proxy's and replica's main event loops, the proxy reaches the
# replica over gRPC, request logs are buffered. Measured with bench/serve_load.py on 2
# cores (docs/benchmarks.md): one client's latency 19.8 -> 14.1 ms, peak 94 -> 106 req/s.
# Direct ingress, part of that mode, stays off: it pays off with HAProxy in front, and
# through Serve's own proxy it measured slower (peak 90 req/s). Serve reads these when its processes
# start, so they must be in the environment of `ray start` (scripts/main.sh, k8s/) or of
# the process that starts a local Ray (this module sets them for that case).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
for _key, _value in SERVE_ENV.items():
    os.environ.setdefault(_key, _value)


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS) or a running local
    `ray start --head`; otherwise start a local Ray in this process."""
    if ray.is_initialized():
        return
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus,
        logging_level=logging.WARNING,
        # The job's code travels with `ray job submit --working-dir`; a local run shares this tree.
        log_to_driver=True,
    )
    # Per-operator progress bars would interleave with the rich tables.
    ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))
