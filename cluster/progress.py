"""Live progress from Ray Train to the driver's terminal.

Ray Train callbacks run in the Train controller actor, not in the driver, so
`ReportForwarder` forwards each epoch's report through a Ray queue and
`fit_streaming` prints them in the driver while `fit()` runs.
"""

from __future__ import annotations

import queue as stdlib_queue
import threading
from typing import Any, Callable

from ray.train import UserCallback
from ray.util.queue import Queue


class ReportForwarder(UserCallback):
    def __init__(self, q: Queue, tag: str = "") -> None:
        self.q, self.tag = q, tag

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # metrics[i] is worker i's report; the figures are all-reduced, so rank 0's are global.
        self.q.put({"tag": self.tag, "metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None})


def fit_streaming(trainer_factory: Callable[[list], Any], on_report: Callable[[dict], None]) -> Any:
    """Build a trainer with a forwarding callback, run `fit()` in a thread, and call
    `on_report` in this thread for every epoch report. Returns fit()'s result."""
    q = Queue()
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
