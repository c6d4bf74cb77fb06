"""Successive halving that pauses trials at their rung: halving that works when the cluster
runs fewer trials at once than a rung holds (one, on a 2-core machine).

Tune's ASHA decides each trial on the rung as it stands when the trial reaches it; run one
trial at a time, the first is the best it has seen and always goes on, so nothing is halved.
Here a trial that reaches a rung is PAUSED (Tune keeps its checkpoint and frees its resources)
until every candidate of the rung has reported there; then the best 1/`reduction_factor` go on
from exactly where they stopped (their checkpoint: weights, optimizer, schedule, data
position) and the rest are stopped. The rungs are in training images (`time_attr`), so a rung
can be a fraction of an epoch while survivors keep training in the same run up to `max_t`.

The rungs and decisions survive a restart of the sweep driver: they are saved to
`state_file` after every change and read back on first use. After a restart Tune puts every
unfinished trial back in PENDING and starts all PENDING trials itself: those a decision
stopped are stopped before that; one still waiting on its rung trains on to its next report
(one segment of work) and is paused there again; the rest resume as decided.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from resnet_dist import storage as storage_lib


def read_state(state_file: str) -> dict[str, Any] | None:
    """A scheduler's saved state (a URI too: resnet_dist.storage), or None for a new sweep or a
    file cut short."""
    try:
        return json.loads(storage_lib.read_bytes(state_file))
    except (OSError, ValueError):
        return None


def write_state(state_file: str, state: dict[str, Any]) -> None:
    """Straight to the storage, atomically: a driver killed mid-sweep leaves the rungs where its
    successor, on any machine, reads them."""
    storage_lib.write_bytes(state_file, json.dumps(state).encode())


def rung_milestones(first: int, reduction_factor: int, max_t: int) -> list[int]:
    """first, first*eta, first*eta^2, ... below max_t: the images at which trials are compared."""
    out, m = [], first
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return out


class SuccessiveHalving(FIFOScheduler):
    """Synchronous successive halving with pause and resume (module docstring)."""

    def __init__(self, state_file: str, *, metric: str, mode: str, time_attr: str, milestones: list[int],
                 reduction_factor: int, num_samples: int) -> None:
        super().__init__()
        self._state_file = state_file
        self._metric, self._sign = metric, 1.0 if mode == "max" else -1.0
        self._time_attr = time_attr
        self._milestones = list(milestones)
        self._eta = reduction_factor
        self._num_samples = num_samples
        # rung k: trial id -> metric at milestone k; decided: trial id -> goes on past it
        self._recorded: list[dict[str, float]] = [{} for _ in milestones]
        self._decided: list[dict[str, bool] | None] = [None for _ in milestones]
        self._dead: set[str] = set()   # ended (error, stop, max_t) without owing a rung result
        self._seen: set[str] = set()
        self._loaded = False

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True   # set at construction (Tune calls this with the TuneConfig's, the same)

    # -- state ------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        saved = read_state(self._state_file)
        if saved is None or saved.get("milestones") != self._milestones:
            return
        self._recorded = [dict(r) for r in saved["recorded"]]
        self._decided = [dict(d) if d is not None else None for d in saved["decided"]]
        self._dead = set(saved["dead"])
        self._seen = set(saved["seen"])

    def _save(self) -> None:
        state = {"milestones": self._milestones, "recorded": self._recorded, "decided": self._decided,
                 "dead": sorted(self._dead), "seen": sorted(self._seen)}
        write_state(self._state_file, state)

    # -- the rule ---------------------------------------------------------------------------
    def _candidates(self, k: int) -> set[str] | None:
        """Trials owed a result at rung k; None while rung k-1 is undecided (or, for rung 0,
        while not every sample has been created)."""
        if k == 0:
            return set(self._seen) if len(self._seen) >= self._num_samples else None
        prev = self._decided[k - 1]
        return None if prev is None else {t for t, go in prev.items() if go}

    def _try_decide(self, k: int) -> bool:
        """Decide rung k if every candidate has reported there or ended; True if decided now."""
        if self._decided[k] is not None:
            return False
        candidates = self._candidates(k)
        if candidates is None or any(t not in self._recorded[k] and t not in self._dead for t in candidates):
            return False
        ranked = sorted((t for t in candidates if t in self._recorded[k]),
                        key=lambda t: self._sign * self._recorded[k][t], reverse=True)
        keep = set(ranked[:max(1, math.floor(len(ranked) / self._eta))]) if ranked else set()
        self._decided[k] = {t: t in keep for t in ranked}
        return True

    def _decide_all(self) -> None:
        for k in range(len(self._milestones)):
            self._try_decide(k)

    def _verdict(self, trial_id: str) -> bool | None:
        """True: free to train on; False: stopped at a rung; None: waiting for a rung's decision.
        Rungs are gone through in order: the first one it has reached that did not let it on."""
        for k, rec in enumerate(self._recorded):
            if trial_id not in rec:
                return True
            decided = self._decided[k]
            if decided is None:
                return None
            if not decided.get(trial_id, False):
                return False
        return True

    def _settle_others(self, tune_controller, current: Trial | None) -> None:
        """Stop the paused or pending trials the decisions stopped (the running one gets STOP)."""
        for t in list(tune_controller.get_trials()):
            if t is current or t.trial_id in self._dead or (t.status not in (Trial.PAUSED, Trial.PENDING)
                                                            and not t.is_saving):
                continue
            if self._verdict(t.trial_id) is False:   # marked dead first: stop_trial calls on_trial_remove
                self._dead.add(t.trial_id)
                tune_controller.stop_trial(t)

    # -- Tune's hooks -----------------------------------------------------------------------
    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._load()
        self._seen.add(trial.trial_id)
        self._save()

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._load()
        t = result.get(self._time_attr, 0)
        tid = trial.trial_id
        for k, m in enumerate(self._milestones):
            # Its first report at or past the milestone; only the rung's candidates count in its
            # decision. (Recorded even before the trial is a candidate: a trial Tune restarted
            # after a driver restart may have trained past a rung while the one before was open.)
            if m <= t and tid not in self._recorded[k]:
                self._recorded[k][tid] = float(result[self._metric])
        self._decide_all()
        verdict = self._verdict(tid)
        self._settle_others(tune_controller, trial)
        if verdict is False:
            self._dead.add(tid)
        self._save()
        if verdict is None:
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE if verdict else TrialScheduler.STOP

    def _ended(self, tune_controller, trial: Trial) -> None:
        self._load()
        self._dead.add(trial.trial_id)
        self._decide_all()
        self._settle_others(tune_controller, trial)
        self._save()

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """New trials first (rung 0 fills before anything is decided), then paused trials a
        decision let through, oldest first; never a trial still waiting on its rung."""
        self._load()
        # Restored trials all come back PENDING, and Tune starts every PENDING trial: those a
        # decision stopped are stopped here first. (One still waiting on its rung may be started
        # by Tune and then trains to its next report before it is paused again.)
        self._settle_others(tune_controller, None)
        trials = list(tune_controller.get_trials())
        for status in (Trial.PENDING, Trial.PAUSED):
            for t in trials:
                if t.status == status and self._verdict(t.trial_id) is True:
                    return t
        return None

    def debug_string(self) -> str:
        return f"SuccessiveHalving: rungs at {self._milestones} {self._time_attr}, keep 1/{self._eta}"
