"""Ray Tune: a sweep of training runs judged at rungs counted in training images.

A one-worker trial runs the training loop in the Tune trial's own process (cluster/trial.py:
no Train controller or worker to start, the process reused by the next trial) and asks Tune
for the CPUs (or GPU) it trains on. A trial with more workers is the Train V2 way: a small
function that builds a `TorchTrainer` (cluster/train.py) and calls `fit()`, with
`TuneReportCallback` turning every `ray.train.report` into a Tune result; it asks for a sliver
of CPU itself and its Train workers hold the real resources.

Every trial reports at each rung (`images_seen`, all workers) and each epoch's end. Two
schedulers: "halving" (cluster/halving.py: successive halving that pauses a trial at its rung
and resumes it from its checkpoint, for clusters that run fewer trials at once than a rung
holds) and "asha" (Tune's asynchronous ASHA, for many trials at once; its rungs kept across
driver restarts here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune as tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from cluster.halving import SuccessiveHalving, read_state, rung_milestones, write_state
from cluster.resources import TRIAL_DRIVER_CPUS, Resources
from cluster.train import WorkerJob, build_trainer
from cluster.trial import run_trial_here
from resnet_dist import storage as storage_lib
from resnet_dist.config import ConfigError, RunConfig, check_model_flavor
from resnet_dist.spec import RunSpec

# Peak learning rate per optimizer at the base batch size; the sweep samples a
# log-uniform multiplier of it, so one range fits both optimizers.
BASE_LR = {"sgd": 0.2, "adamw": 2e-3}


@dataclass(frozen=True)
class SearchSpace:
    flavors: tuple[str, ...] = ("resnet20",)
    widths: tuple[float, ...] = (1.0,)
    blocks: tuple[str, ...] = ("basic",)
    optimizers: tuple[str, ...] = ("sgd",)
    lr_mult: tuple[float, float] = (0.5, 2.0)          # log-uniform multiplier of BASE_LR[optimizer]
    weight_decay: tuple[float, float] = (1e-4, 1e-3)   # log-uniform
    momentum: tuple[float, ...] = (0.9,)
    batch_sizes: tuple[int, ...] = (128,)
    label_smoothing: tuple[float, ...] = (0.0, 0.1)
    schedules: tuple[str, ...] = ("onecycle",)
    pads: tuple[int, ...] = (4,)                       # random-crop padding, pixels

    def validate(self) -> None:
        for name in ("flavors", "widths", "blocks", "optimizers", "momentum", "batch_sizes", "label_smoothing",
                     "schedules", "pads"):
            if not getattr(self, name):
                raise ConfigError(f"empty search space: no {name.replace('_', ' ')} to choose from")
        for flavor in self.flavors:
            check_model_flavor(flavor)
        if any(p < 0 for p in self.pads):
            raise ConfigError(f"crop paddings must be >= 0 pixels, got {list(self.pads)}")
        for lo, hi, what in (*self.lr_mult, "lr multiplier"), (*self.weight_decay, "weight decay"):
            if not 0 < lo <= hi:
                raise ConfigError(f"{what} range must satisfy 0 < low <= high, got {lo}..{hi}")

    def param_space(self) -> dict[str, Any]:
        """Tune's search space over the sampled fields (constants stay out of it)."""
        def choice(values: tuple) -> Any:
            return tune.choice(list(values)) if len(values) > 1 else values[0]

        def loguniform(lo: float, hi: float) -> Any:
            return tune.loguniform(lo, hi) if hi > lo else lo

        return {
            "flavor": choice(self.flavors), "width": choice(self.widths), "block": choice(self.blocks),
            "optimizer": choice(self.optimizers), "lr_mult": loguniform(*self.lr_mult),
            "weight_decay": loguniform(*self.weight_decay), "momentum": choice(self.momentum),
            "batch_size": choice(self.batch_sizes), "label_smoothing": choice(self.label_smoothing),
            "schedule": choice(self.schedules), "pad": choice(self.pads),
        }

    def center(self) -> dict[str, Any]:
        """The first trial's sample: each choice's first value, each range's geometric middle
        (a preset lists its base recipe's values first, so the sweep always tries the recipe)."""
        def mid(lo: float, hi: float) -> float:
            return math.sqrt(lo * hi)

        return {"flavor": self.flavors[0], "width": self.widths[0], "block": self.blocks[0],
                "optimizer": self.optimizers[0], "lr_mult": mid(*self.lr_mult), "weight_decay": mid(*self.weight_decay),
                "momentum": self.momentum[0], "batch_size": self.batch_sizes[0],
                "label_smoothing": self.label_smoothing[0], "schedule": self.schedules[0], "pad": self.pads[0]}


def trial_run_config(base: RunConfig, sample: dict[str, Any]) -> RunConfig:
    """The RunConfig of one trial: the base with the sampled values in place."""
    return base.replace(
        model={"flavor": sample["flavor"], "width": sample["width"], "block": sample["block"]},
        optim={"optimizer": sample["optimizer"], "lr": BASE_LR[sample["optimizer"]] * sample["lr_mult"],
               "weight_decay": sample["weight_decay"], "momentum": sample["momentum"],
               "label_smoothing": sample["label_smoothing"], "schedule": sample["schedule"]},
        train={"batch_size": sample["batch_size"]},
        data={"pad": sample.get("pad", base.data.pad)},   # trials saved before pads were searched have none
    )


def trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train run of the sampled config (a Train driver, not a worker)."""
    plan = config["plan"]
    res = Resources(**plan["resources"])
    cfg = trial_run_config(RunConfig.from_dict(plan["base"]), config)
    trial_id = tune.get_context().get_trial_id()
    tracking = {**plan["tracking"], "run_name": trial_id, "tags": {"trial": trial_id}} if plan.get("tracking") else None
    job = WorkerJob(RunSpec.from_manifest(cfg, plan["manifest"]), res.threads,
                    tags={"run": plan["name"], "trial": trial_id}, data_path=res.data_path, tracking=tracking)
    if res.in_process:
        run_trial_here(job)
        return
    # The Train run is named after the trial, so a restored trial resumes its own checkpoints.
    build_trainer(job, res, f"trial-{trial_id}", plan["train_storage"], max_failures=1,
                  callbacks=[TuneReportCallback()]).fit()


SCHEDULERS = ("halving", "asha")
# The time unit of both schedulers: training images of a trial so far, all workers together.
TIME_ATTR = "images_seen"


@dataclass(frozen=True)
class RungConfig:
    """When trials are compared and how many go on. Rungs are in training images:
    first_rung_images, then x reduction_factor each, below max_t = max_epochs of the sweep's
    train set (the budget of a trial never stopped: the winner trains to it)."""

    scheduler: str = "halving"       # "halving" (pause at rungs) | "asha" (asynchronous)
    max_epochs: int = 3
    first_rung_images: int = 10_000
    reduction_factor: int = 3        # keep 1/reduction_factor of the trials at each rung

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be {' or '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.max_epochs < 1:
            raise ConfigError(f"--max-epochs must be >= 1, got {self.max_epochs}")
        if self.first_rung_images < 1:
            raise ConfigError(f"--first-rung-images must be >= 1, got {self.first_rung_images}")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction factor must be >= 2, got {self.reduction_factor}")

    def max_images(self, train_images: int) -> int:
        return self.max_epochs * train_images

    def milestones(self, train_images: int, num_samples: int) -> list[int]:
        """The rungs, in images: each a point where every trial reports (train.report_at_images).
        Halving stops adding rungs once one trial is left to judge (9 trials at 1/3: two rungs,
        9 -> 3 -> 1); ASHA, whose trials keep arriving, gets every rung below max_t."""
        rungs = rung_milestones(self.first_rung_images, self.reduction_factor, self.max_images(train_images))
        if self.scheduler == "halving":
            rungs = [m for k, m in enumerate(rungs) if num_samples // self.reduction_factor ** k > 1]
        return rungs


# The scheduler's rungs (every trial's metric at each milestone, and its decisions), beside
# Tune's experiment directory: not inside it, where a restored run's sync of its staged copy
# would overwrite the file.
RUNGS_FILE = "rungs.json"


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs and stop decisions survive a restart of the sweep driver.

    Tune restores trials and the searcher after a driver restart but not the scheduler's
    rungs: the trials after a restart would be judged only against each other, and a trial
    the old rungs would stop could run to max_t. The rungs, and the trials ASHA decided to
    stop early (the driver may die before Tune acts on a decision), are saved to `state_file`
    after every result (atomically; a few bytes per trial) and read back on first use.
    """

    def __init__(self, state_file: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._state_file = state_file
        self._stopped: set[str] = set()
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        saved = read_state(self._state_file)
        if saved is None:   # a new sweep, or a state file cut short: start empty
            return
        self._stopped.update(saved["stopped"])
        for bracket, rungs in zip(self._brackets, saved["rungs"]):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs):
                if milestone == saved_milestone:
                    recorded.update(saved_recorded)

    def _save(self) -> None:
        state = {"rungs": [[[m, rec] for m, rec in b._rungs] for b in self._brackets], "stopped": sorted(self._stopped)}
        write_state(self._state_file, state)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        if trial.trial_id in self._stopped:   # decided before a restart, not acted on
            return self.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get(self._time_attr, self._max_t) < self._max_t:   # early, not at max_t
            self._stopped.add(trial.trial_id)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def set_aside_incomplete_experiment(path: Path) -> Path | None:
    """A sweep killed after Tune wrote tuner.pkl but before its first experiment state has
    nothing to resume, yet `Tuner.can_restore` says yes and `Tuner.restore` then fails on every
    re-run. Such a directory is renamed aside (kept, not deleted) so the sweep starts afresh;
    returns where it went, or None when there was nothing to set aside."""
    if not (path / "tuner.pkl").is_file() or any(path.glob("experiment_state-*.json")):
        return None
    aside = path.with_name(f"{path.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside


def build_tuner(name: str, storage: str, space: SearchSpace, rungs: RungConfig, num_samples: int, seed: int,
                plan: dict[str, Any], resources: Resources, train_images: int, center_first: bool = True,
                callbacks: list | None = None) -> tune.Tuner:
    """A new Tuner, or the same sweep restored when STORAGE/NAME holds one (finished
    trials are not re-run; stopped ones stay stopped; the scheduler keeps its rungs)."""
    if resources.in_process:
        trainable = tune.with_resources(trial_fn, {"cpu": resources.cpus_per_worker,
                                                   "gpu": 1 if resources.use_gpu else 0})
    else:
        trainable = tune.with_resources(trial_fn, {"cpu": TRIAL_DRIVER_CPUS})
    path = storage_lib.join(storage, name)
    if not storage_lib.is_uri(path):   # an object store cannot rename a directory; Tune's own error then
        set_aside_incomplete_experiment(Path(path))
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    state_file = storage_lib.join(storage, RUNGS_FILE)
    milestones = rungs.milestones(train_images, num_samples)
    if rungs.scheduler == "halving":
        # No cap from the searcher: it counts a paused trial as running, so a cap would never let
        # rung 0 fill. The trials' own resource requests bound how many run at once.
        searcher = tune.search.BasicVariantGenerator(
            random_state=seed, points_to_evaluate=[space.center()] if center_first else None)
        scheduler = SuccessiveHalving(state_file, metric="val_acc", mode="max", time_attr=TIME_ATTR,
                                      milestones=milestones, reduction_factor=rungs.reduction_factor,
                                      num_samples=num_samples)
    else:
        # Tune ignores max_concurrent_trials for a generator passed in, so the generator caps it itself:
        # without the cap, trials start beyond what the cluster fits and their workers wait forever.
        searcher = tune.search.BasicVariantGenerator(
            random_state=seed, max_concurrent=resources.max_concurrent,
            points_to_evaluate=[space.center()] if center_first else None)
        scheduler = ResumableASHA(state_file, time_attr=TIME_ATTR, max_t=rungs.max_images(train_images),
                                  grace_period=rungs.first_rung_images, reduction_factor=rungs.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={**space.param_space(), "plan": plan},
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=num_samples, search_alg=searcher,
                                    scheduler=scheduler,
                                    # A trial process goes on to the next trial or resume (cluster/trial.py).
                                    reuse_actors=resources.in_process),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks or [],
            failure_config=tune.FailureConfig(max_failures=1), verbose=0,
            # In-process trials' checkpoints are Tune's: the best two on val and the latest
            # (what a paused trial resumes from) are kept. Train-path trials keep theirs in Train.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_acc",
                                                    checkpoint_score_order="max")),
    )
