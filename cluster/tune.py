"""Ray Tune: an ASHA sweep of Ray Train runs, the Train V2 way.

Each Tune trial is a small function that builds a `TorchTrainer` (cluster/train.py)
and calls `fit()`; `TuneReportCallback` turns every `ray.train.report` (one per
epoch) into a Tune result, which is ASHA's time unit. Trials ask for a sliver of
CPU themselves; their Train workers hold the real resources.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune as tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from cluster.resources import TRIAL_DRIVER_CPUS, Resources
from cluster.train import WorkerJob, build_trainer
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

    def validate(self) -> None:
        for name in ("flavors", "widths", "blocks", "optimizers", "momentum", "batch_sizes", "label_smoothing", "schedules"):
            if not getattr(self, name):
                raise ConfigError(f"empty search space: no {name.replace('_', ' ')} to choose from")
        for flavor in self.flavors:
            check_model_flavor(flavor)
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
            "schedule": choice(self.schedules),
        }


def trial_run_config(base: RunConfig, sample: dict[str, Any]) -> RunConfig:
    """The RunConfig of one trial: the base with the sampled values in place."""
    return base.replace(
        model={"flavor": sample["flavor"], "width": sample["width"], "block": sample["block"]},
        optim={"optimizer": sample["optimizer"], "lr": BASE_LR[sample["optimizer"]] * sample["lr_mult"],
               "weight_decay": sample["weight_decay"], "momentum": sample["momentum"],
               "label_smoothing": sample["label_smoothing"], "schedule": sample["schedule"]},
        train={"batch_size": sample["batch_size"]},
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
    # The Train run is named after the trial, so a restored trial resumes its own checkpoints.
    build_trainer(job, res, f"trial-{trial_id}", plan["train_storage"], max_failures=1,
                  callbacks=[TuneReportCallback()]).fit()


@dataclass(frozen=True)
class AshaConfig:
    max_epochs: int = 3        # ASHA's max_t: epochs of a trial that is never stopped
    grace_period: int = 1      # epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # keep 1/reduction_factor of the trials at each rung

    def validate(self) -> None:
        if not 1 <= self.grace_period <= self.max_epochs:
            raise ConfigError(f"grace period {self.grace_period} must be between 1 and max epochs {self.max_epochs}")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction factor must be >= 2, got {self.reduction_factor}")


# ASHA's rungs (every trial's metric at each milestone), beside Tune's experiment directory:
# not inside it, where a restored run's sync of its staged copy would overwrite the file.
ASHA_STATE_FILE = "asha_rungs.json"


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
        try:
            saved = json.loads(storage_lib.read_bytes(self._state_file))
        except (OSError, ValueError):   # a new sweep, or a state file cut short: start empty
            return
        self._stopped.update(saved["stopped"])
        for bracket, rungs in zip(self._brackets, saved["rungs"]):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs):
                if milestone == saved_milestone:
                    recorded.update(saved_recorded)

    def _save(self) -> None:
        # Straight to the storage, a URI too (resnet_dist.storage): a driver killed mid-sweep
        # leaves the rungs where its successor, on any machine, reads them.
        state = {"rungs": [[[m, rec] for m, rec in b._rungs] for b in self._brackets], "stopped": sorted(self._stopped)}
        storage_lib.write_bytes(self._state_file, json.dumps(state).encode())

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


def build_tuner(name: str, storage: str, space: SearchSpace, asha: AshaConfig, num_samples: int, seed: int,
                plan: dict[str, Any], resources: Resources, callbacks: list | None = None) -> tune.Tuner:
    """A new Tuner, or the same sweep restored when STORAGE/NAME holds one (finished
    trials are not re-run; ASHA-stopped ones stay stopped; ASHA keeps its rungs)."""
    trainable = tune.with_resources(trial_fn, {"cpu": TRIAL_DRIVER_CPUS})
    path = storage_lib.join(storage, name)
    if not storage_lib.is_uri(path):   # an object store cannot rename a directory; Tune's own error then
        set_aside_incomplete_experiment(Path(path))
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    # Tune ignores max_concurrent_trials for a generator passed in, so the generator caps it itself:
    # without the cap, trials start beyond what the cluster fits and their workers wait forever.
    searcher = tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=resources.max_concurrent)
    return tune.Tuner(
        trainable,
        param_space={**space.param_space(), "plan": plan},
        tune_config=tune.TuneConfig(
            metric="val_acc", mode="max", num_samples=num_samples,
            search_alg=searcher,
            scheduler=ResumableASHA(storage_lib.join(storage, ASHA_STATE_FILE), time_attr="epoch", max_t=asha.max_epochs,
                                    grace_period=asha.grace_period, reduction_factor=asha.reduction_factor),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks or [],
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=0),
    )
