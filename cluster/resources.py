"""The one resource planner: how many workers, CPUs and threads a Train run gets, for a
training job, each trial of a sweep and fine-tuning alike."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from resnet_dist.config import ConfigError

# Logical CPUs a trial's own driver function asks for: enough to be a real
# resource request (Tune rejects 0), small enough to leave the CPUs to its workers.
TRIAL_DRIVER_CPUS = 0.01


@dataclass(frozen=True)
class Resources:
    """How each Train run is sized, derived from the cluster (see `plan_resources`)."""

    workers: int                # Train workers of one run
    use_gpu: bool
    cpus_per_worker: float      # logical CPUs each worker asks Ray for
    threads: int                # torch CPU threads per worker
    max_concurrent: int         # runs at once (sweep trials; 1 for a single run)
    data_path: str              # "device" on GPUs, "pipeline" on CPUs (cluster/data.py)
    # Elastic lower bound: after a node is lost, Ray Train restarts the run from its last
    # checkpoint with as few as this many workers (and grows back when capacity returns);
    # 0 = a fixed size of `workers`.
    min_workers: int = 0
    # A one-worker sweep trial trained in the Tune trial's own process (cluster/trial.py),
    # which asks for `cpus_per_worker` CPUs (and the GPU) itself.
    in_process: bool = False

    def num_workers(self) -> int | tuple[int, int]:
        """ScalingConfig's num_workers: fixed, or (min, max) when elastic."""
        return (self.min_workers, self.workers) if 0 < self.min_workers < self.workers else self.workers


def check_workers(workers: int, min_workers: int) -> None:
    """Workers of a run, and the elastic lower bound (0 = fixed)."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if not 0 <= min_workers <= workers:
        raise ConfigError(f"min workers must be 0 (a fixed size) or 1 to {workers} (the workers), got {min_workers}")


def plan_resources(workers: int, max_concurrent: int, cpus: float, gpus: float, node_cores: int) -> Resources:
    """Size runs so that every running run's workers fit at once, with one CPU left for Ray
    Data, and no run waits PENDING for CPUs another run's workers hold."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if gpus >= 1:
        concurrent = max(1, min(max_concurrent, int(gpus // workers)))
        if concurrent * workers > gpus:
            raise ConfigError(f"{workers} GPU workers per run, but the cluster has {gpus:g} GPUs")
        cpus_per_worker = max(1.0, math.floor((cpus - 1) / (concurrent * workers))) if cpus > 1 else 1.0
        return Resources(workers, True, cpus_per_worker, int(cpus_per_worker), concurrent, "device")
    spare = cpus - 1.0   # one whole CPU for Ray Data's read/augment tasks (each asks for 1)
    if spare <= 0:
        raise ConfigError(f"the Ray cluster has {cpus:g} CPUs; training on CPUs needs at least 2")
    concurrent = max(1, min(max_concurrent, int(spare // (0.5 * workers))))
    # The trials' own driver slivers come out of the workers' share, not Ray Data's:
    # were Ray Data left 0.99 CPU, its 1-CPU read tasks could never be scheduled.
    cpus_per_worker = min(1.0, (spare - concurrent * TRIAL_DRIVER_CPUS) / (concurrent * workers))
    threads = max(1, node_cores // (concurrent * workers))
    return Resources(workers, False, cpus_per_worker, threads, concurrent, "pipeline")


def plan_in_process(max_concurrent: int, cpus: float, gpus: float, node_cores: int) -> Resources:
    """One-worker trials in their own Tune process on the device data path (no Ray Data, so
    no CPU kept for it): the cluster's CPUs (or GPUs) shared among `max_concurrent` trials,
    which is what bounds how many run at once."""
    if gpus >= 1:
        concurrent = max(1, min(max_concurrent, int(gpus)))
        cpus_each = max(1.0, math.floor(cpus / concurrent))
        return Resources(1, True, cpus_each, int(cpus_each), concurrent, "device", in_process=True)
    concurrent = max(1, min(max_concurrent, int(cpus)))
    return Resources(1, False, cpus / concurrent, max(1, node_cores // concurrent), concurrent, "device",
                     in_process=True)


def plan_for_cluster(workers: int, max_concurrent: int = 1) -> Resources:
    """`plan_resources` for the connected Ray cluster (its CPUs and GPUs, this node's cores)."""
    from cluster.runtime import cluster_cpus, cluster_gpus

    return plan_resources(workers, max_concurrent, cluster_cpus(), cluster_gpus(), os.cpu_count() or 1)


def plan_trials_in_process(max_concurrent: int) -> Resources:
    """`plan_in_process` for the connected Ray cluster's free CPUs: a trial that asked for all
    of them would wait forever beside a Ray Serve replica of an earlier run holding one."""
    import ray

    from cluster.runtime import cluster_gpus

    free = float(ray.available_resources().get("CPU", 0))
    if free < 1:
        raise ConfigError(f"the Ray cluster has {free:g} CPUs free; a trial needs at least 1")
    return plan_in_process(max_concurrent, math.floor(free), cluster_gpus(), os.cpu_count() or 1)
