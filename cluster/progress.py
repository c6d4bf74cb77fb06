"""Live progress to the driver's terminal, from Ray Train and from Ray Tune.

Ray Train callbacks run in the Train controller actor, not in the driver, so
`ReportForwarder` forwards each report through a Ray queue and `fit_streaming`
prints them in the driver while `fit()` runs. Tune callbacks run in the driver:
`LiveTrials` draws the sweep's one table of trials.
"""

from __future__ import annotations

import queue as stdlib_queue
import threading
from typing import Any, Callable

import ray
import ray.tune as tune

from ray.train import UserCallback
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class ReportForwarder(UserCallback):
    def __init__(self, q: Queue, tag: str = "") -> None:
        self.q, self.tag = q, tag

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # metrics[i] is worker i's report; the figures are all-reduced, so rank 0's are global.
        self.q.put({"tag": self.tag, "metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None})


def fit_streaming(trainer_factory: Callable[[list], Any], on_report: Callable[[dict], None]) -> Any:
    """Build a trainer with a forwarding callback, run `fit()` in a thread, and call
    `on_report` in this thread for every epoch report. Returns fit()'s result."""
    # On this process's node, as Ray Train places its controller: a queue actor placed on
    # another node took the whole run down with it when that node was lost, though Train
    # itself survived it (tests/integration/test_train_ray.py, the opt-in lost-node test).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    q = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = trainer_factory([ReportForwarder(q)])
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    while t.is_alive() or not q.empty():
        try:
            on_report(q.get(timeout=0.5))
        except stdlib_queue.Empty:
            continue
    q.shutdown()
    if "error" in box:
        raise box["error"]
    return box["result"]


class LiveTrials(tune.Callback):
    """A rich live table of trials (status, epoch, val acc), refreshed as results arrive.
    Tune callbacks run in the driver, so this draws in the user's terminal."""

    def __init__(self, max_epochs: int = 0) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.max_epochs = max_epochs
        self.live = None   # made in setup(): Tune pickles its callbacks, and a Live holds locks
        self._terminal = True

    def __getstate__(self) -> dict[str, Any]:
        return {"rows": self.rows, "max_epochs": self.max_epochs, "live": None, "_terminal": self._terminal}

    def _table(self):
        from rich.table import Table

        t = Table(title="sweep")
        for col in ("trial", "status", "model", "optimizer", "lr", "epoch", "val acc"):
            t.add_column(col, justify="right")
        for tid, r in self.rows.items():
            t.add_row(tid, r["status"], r["model"], r["optimizer"], r["lr"],
                      f"{r['epoch']:.2f}" if "epoch" in r else "",
                      f"{r['val_acc']:.2%}" if "val_acc" in r else "")
        return t

    def _update(self, trial, status: str, result: dict | None = None, trials=()) -> None:
        for other in trials:   # paused, stopped and pending trials have no event of their own
            if other is not trial and other.trial_id in self.rows:
                self.rows[other.trial_id]["status"] = other.status
        c = trial.config
        row = self.rows.setdefault(trial.trial_id, {
            "model": f"{c['flavor']} x{c['width']:g}", "optimizer": c["optimizer"],
            "lr": f"{c['lr_mult']:.2f}x", "status": status})
        changed = row["status"] != status or bool(result)
        row["status"] = status
        if result:
            row.update(epoch=float(result.get("epoch", 0)), val_acc=float(result.get("val_acc", 0.0)))
        if self.live is not None:
            self.live.update(self._table())
        if changed and not self._terminal:
            self._print_line(trial.trial_id, row, result)

    def _print_line(self, trial_id: str, row: dict[str, Any], result: dict | None) -> None:
        """Outside a terminal (a job log) a live table cannot redraw: one line per event instead."""
        from termui.console import console

        line = f"trial {trial_id} ({row['model']}, {row['optimizer']}, lr {row['lr']}): {row['status']}"
        if result:
            line += (f", epoch {row['epoch']:.2f}/{self.max_epochs} ({int(result.get('images_seen', 0)):,} images): "
                     f"val acc {row['val_acc']:.2%}, {float(result.get('images_per_s', 0.0)):.0f} img/s")
        console.print(line, soft_wrap=True)

    def setup(self, **info) -> None:
        from rich.live import Live

        from termui.console import console

        self._terminal = console.is_terminal
        if self._terminal:
            self.live = Live(self._table(), console=console, refresh_per_second=2)
            self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "RUNNING", trials=trials)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._update(trial, "RUNNING", result, trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epoch = self.rows[trial.trial_id].get("epoch", 0)
        self._update(trial, "DONE" if epoch >= self.max_epochs else "STOPPED at a rung" if epoch else "TERMINATED",
                     trials=trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "ERROR", trials=trials)

    def on_experiment_end(self, trials, **info) -> None:
        if self.live is not None:
            self.live.stop()
        else:
            from termui.console import console

            console.print(self._table())
