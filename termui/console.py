"""Terminal output with rich: per-epoch progress, the history table, evaluation reports."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from resnet_dist.training import Sink


def _columns() -> int:
    try:
        return int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        return 0


# In a terminal rich fits its width. Elsewhere (a `ray job submit` job log, a file) there is
# no width to fit, and rich would take COLUMNS or 80 and cut the wider tables: 160 holds them all.
JOB_LOG_WIDTH = 160
console = Console(log_path=False, width=None if sys.stdout.isatty() else max(JOB_LOG_WIDTH, _columns()))


def history_table(history: Sequence[dict[str, float]], title: str = "Training") -> Table:
    t = Table(title=title)
    for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "img/s", "epoch s", "data wait"):
        t.add_column(col, justify="right")
    for r in history:
        t.add_row(
            f"{r['epoch']:.4g}", f"{r['train_loss']:.4f}", f"{r['train_acc']:.2%}", f"{r['val_loss']:.4f}",
            f"{r['val_acc']:.2%}", f"{r['lr']:.4g}", f"{r['images_per_s']:.0f}", f"{r['epoch_s']:.1f}",
            f"{r['data_wait_frac']:.1%}",
        )
    return t


def eta_line(history: Sequence[dict[str, float]], epochs: int, what: str) -> str:
    """"fine-tuning: epoch 1/2 done, 312 img/s, ETA 160 s": progress between epoch tables."""
    last = history[-1]
    left = max(0.0, epochs - float(last["epoch"]))
    # Seconds per epoch so far: reports may come more often than once an epoch, and a resumed
    # run's history here starts where it resumed.
    covered = float(last["epoch"]) - float(history[0].get("resumed_from_epoch", 0))
    per_epoch = sum(r["epoch_s"] for r in history) / max(1e-9, covered)
    eta = f", ETA {left * per_epoch:.0f} s" if left else ", done"
    return f"{what}: epoch {last['epoch']:.4g}/{epochs}, {last['images_per_s']:.0f} img/s{eta}"


def print_eval_report(report: dict[str, Any], title: str, out: Console = console) -> None:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of a classification report."""
    classes = report["classes"]
    out.print(f"[bold]{title}[/bold]: accuracy [bold]{report['accuracy']:.2%}[/bold], macro F1 {report['macro_f1']:.4f}")
    pc = Table(title=f"{title}: per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        pc.add_column(col, justify="right")
    for name in classes:
        r = report["per_class"][name]
        pc.add_row(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
    out.print(pc)
    cm = Table(title=f"{title}: confusion matrix (rows = true, columns = predicted)")
    cm.add_column("")
    for name in classes:
        cm.add_column(name[:5], justify="right")
    for name, row in zip(classes, report["confusion_matrix"]):
        cm.add_row(name, *(str(v) for v in row))
    out.print(cm)


class RichProgress(Sink):
    """The local loop's terminal: a progress bar per epoch and the history table after each report."""

    def __init__(self, out: Console = console) -> None:
        self.out = out
        self.progress: Progress | None = None
        self.task = None

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.out, transient=True,
        )
        self.task = self.progress.add_task("train", total=steps, rate="")
        self.progress.start()

    def step(self, step: int, images: int) -> None:
        if self.progress is not None:
            elapsed = self.progress.tasks[0].elapsed or 0.0
            rate = f"{step * images / elapsed:.0f} img/s" if elapsed > 0 else ""
            self.progress.update(self.task, completed=step, rate=rate)

    def report(self, record, history, checkpoint) -> None:
        if self.progress is not None and float(record["epoch"]).is_integer():
            self.progress.stop()
        self.out.print(history_table(history))
