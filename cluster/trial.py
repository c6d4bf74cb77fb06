"""A one-worker sweep trial in the Tune trial's own process: no Train controller, no worker
actor, no process group.

A 1-worker trial on Ray Train starts three processes that each import torch (the trial, the
Train controller, the worker), ~12 s on 2 cores before its first step (bench/trial_overhead.py).
Here the trial function runs the same loop (resnet_dist.training.run_loop) on the same
in-memory loaders as a Train worker on the device path, and reports to Tune directly, with a
checkpoint at every report (the rungs and epoch ends). The sweep reuses trial processes
(`reuse_actors`) and each process reads the data set once (resnet_dist.local.read_split_once),
so a trial, or a paused trial resumed, starts training in about a second. Trials with more
workers keep the Ray Train path (cluster/tune.py).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray.tune as tune
import torch

from cluster.train import WorkerJob, job_sinks
from resnet_dist.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from resnet_dist.engine import select_device
from resnet_dist.local import train_loader, val_loader
from resnet_dist.training import Position, Sink, build_state, restore_training, run_loop


class TuneSink(Sink):
    """Every report to Tune with its checkpoint, stamped with this start's set-up timings."""

    def __init__(self, stamps: dict[str, float]) -> None:
        self.stamps = stamps

    def report(self, record: dict[str, Any], history: list[dict[str, Any]], checkpoint: Callable[[], dict]) -> None:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(checkpoint(), Path(d) / CHECKPOINT_FILE)
            # reported_at: unix time, beside start_entered_at (bench/trial_overhead.py's timeline).
            metrics = {**record, "rank": 0, **self.stamps, "checkpoint_s": time.perf_counter() - t,
                       "reported_at": time.time()}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def run_trial_here(job: WorkerJob) -> None:
    """Train `job` in this process from Tune's checkpoint of it, if any (a resume after a pause,
    a failure or a driver restart), reporting to Tune."""
    entered = time.time()
    t0 = time.perf_counter()
    torch.set_num_threads(job.threads)
    device = select_device()
    spec = job.spec
    train, val = train_loader(spec, device), val_loader(spec, device)
    state = build_state(spec, device, len(train))
    start, history = Position(), []
    resumed = tune.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            start, history = restore_training(state, load_checkpoint(Path(d) / CHECKPOINT_FILE))
    # Unix time this start entered the trial function, and seconds to its data and a ready
    # model: bench/trial_overhead.py puts them beside the driver's own clock.
    stamps = {"start_entered_at": entered, "start_setup_s": time.perf_counter() - t0}

    def train_batches(epoch: int):
        train.set_epoch(epoch)
        return train

    sink = job_sinks(job, 0, TuneSink(stamps))
    try:
        run_loop(state, spec, train_batches, lambda: val, sink, len(train), start, history)
    finally:
        sink.close()
