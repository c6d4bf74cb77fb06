"""The sweep report: `report.md` with PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")   # render to files; there is no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COST_COLUMNS = ("wall_s", "cpu_s", "gpu_s", "images", "train_s", "outside_train_share")
TRIAL_COLUMNS = ("trial_id", "status", "flavor", "width", "block", "optimizer", "lr", "weight_decay", "momentum",
                 "batch_size", "label_smoothing", "schedule", "pad", "epochs_run", "images_seen", "best_val_acc",
                 "stopped_early",
                 "stopped_at_epoch", *COST_COLUMNS)


SCHEDULER_NAMES = {"halving": "successive halving (trials paused at each rung until all reach it)",
                   "asha": "ASHA (asynchronous)"}


def asha_savings(trials: Sequence[dict[str, Any]], max_epochs: int) -> float:
    """Compute used / compute had every trial run to max_t, in trial-epochs."""
    planned = max_epochs * len(trials)
    return sum(t["epochs_run"] for t in trials) / planned if planned else 0.0


def trial_cost(epochs: Sequence[dict[str, float]], cpus: float, gpus: float, max_epochs: int) -> dict[str, float]:
    """What one trial held and did, from its per-epoch results (in epoch order).

    Each result needs Tune's `time_total_s` (seconds since the trial started) and
    `time_this_iter_s` (since its previous report), and the loop's `epoch_s` (training steps
    only, seconds) and `images` (all workers). Resources are held for the trial's whole wall
    time, so CPU-seconds = CPUs reserved x wall seconds (GPUs alike). `full_*` projects the
    trial to `max_epochs`, every further epoch costing the mean of its later reports (its first
    report also carries the start-up), for the savings against running every trial to the end.
    """
    wall = float(epochs[-1]["time_total_s"]) if epochs else 0.0
    train = sum(float(e["epoch_s"]) for e in epochs)
    iters = [float(e["time_this_iter_s"]) for e in epochs]
    # Reports may fall inside epochs (rungs): each one's `epoch` is fractional.
    at = [float(e.get("epoch", i + 1)) for i, e in enumerate(epochs)]
    if len(epochs) > 1 and at[-1] > at[0]:
        per_epoch = sum(iters[1:]) / (at[-1] - at[0])
    else:
        per_epoch = float(epochs[0]["epoch_s"]) / at[0] if epochs and at[0] > 0 else 0.0
    full_wall = wall + max(0.0, max_epochs - (at[-1] if epochs else 0.0)) * per_epoch
    return {"wall_s": round(wall, 2), "cpu_s": round(cpus * wall, 2), "gpu_s": round(gpus * wall, 2),
            "images": int(sum(float(e["images"]) for e in epochs)), "train_s": round(train, 2),
            "outside_train_share": round(1 - train / wall, 4) if wall > 0 else 0.0,
            "full_wall_s": round(full_wall, 2), "full_cpu_s": round(cpus * full_wall, 2),
            "full_gpu_s": round(gpus * full_wall, 2)}


def sweep_cost(trials: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The sweep's totals of `trial_cost`, and what stopping trials early saved against every trial run to max_t
    (a share of CPU-seconds; GPU-seconds alike on a GPU cluster)."""
    total = {k: sum(t["cost"][k] for t in trials) for k in
             ("wall_s", "cpu_s", "gpu_s", "images", "train_s", "full_wall_s", "full_cpu_s", "full_gpu_s")}
    total["outside_train_share"] = 1 - total["train_s"] / total["wall_s"] if total["wall_s"] else 0.0
    full = total["full_gpu_s"] or total["full_cpu_s"]
    used = total["gpu_s"] if total["full_gpu_s"] else total["cpu_s"]
    total["asha_saved_share"] = 1 - used / full if full else 0.0
    return total


def write_trials_csv(trials: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRIAL_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({**t, **t.get("cost", {})} for t in trials)


def plot_val_curves(trials: Sequence[dict[str, Any]], max_epochs: int, path: str | os.PathLike,
                    rung_epochs: Sequence[float] = ()) -> None:
    """Validation accuracy against epochs for every trial, the rungs as dotted lines; an x
    marks where a trial was stopped, the best trial drawn thick."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    best = max(trials, key=lambda t: t["best_val_acc"])["trial_id"] if trials else None
    for r in rung_epochs:
        ax.axvline(r, color="grey", ls=":", lw=1)
    for t in trials:
        epochs = [e for e, _ in t["history"]]
        accs = [a for _, a in t["history"]]
        (line,) = ax.plot(epochs, accs, marker="o", ms=3, label=t["trial_id"] + (" (best)" if t["trial_id"] == best else ""),
                          lw=2.5 if t["trial_id"] == best else 1, alpha=1 if t["trial_id"] == best else 0.7)
        if t["stopped_early"] and epochs:
            ax.plot(epochs[-1], accs[-1], "x", color=line.get_color(), ms=10, mew=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    # Rungs may sit at small fractions of an epoch: a log axis keeps them apart.
    first = min([e for t in trials for e, _ in t["history"]] + list(rung_epochs) or [1.0])
    if first < 0.5:
        ax.set_xscale("log")
        ax.set_xlim(first * 0.8, max_epochs * 1.1)
    else:
        ax.set_xlim(0.8 * min(first, 1.0), max_epochs + 0.2)
    ax.set_title("sweep (dotted: rungs, x: stopped at a rung)")
    ax.grid(alpha=0.3)
    if len(trials) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: str | os.PathLike) -> None:
    m = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=110)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _metrics_table(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    rows = ["| | before fine-tuning | after fine-tuning |", "| --- | ---: | ---: |",
            f"| accuracy | {before['accuracy']:.2%} | {after['accuracy']:.2%} |",
            f"| macro F1 | {before['macro_f1']:.4f} | {after['macro_f1']:.4f} |"]
    for name in after["classes"]:
        b = before["per_class"].get(name)
        a = after["per_class"][name]
        b_txt = f"{b['precision']:.3f} / {b['recall']:.3f}" if b else "n/a"
        rows.append(f"| {name}: precision / recall | {b_txt} | {a['precision']:.3f} / {a['recall']:.3f} |")
    return rows


def write_report(out_dir: str | os.PathLike, *, title: str, trials: Sequence[dict[str, Any]], max_epochs: int,
                 best: dict[str, Any], before: dict[str, Any], after: dict[str, Any], finetune: dict[str, Any],
                 scheduler: str = "asha", rung_epochs: Sequence[float] = (), notes: Sequence[str] = ()) -> Path:
    """Write trials.csv, the plots and report.md into `out_dir`; returns report.md's path."""
    out = Path(out_dir)
    write_trials_csv(trials, out / "trials.csv")
    plot_val_curves(trials, max_epochs, out / "val_acc.png", rung_epochs)
    plot_confusion(before["confusion_matrix"], before["classes"], "before fine-tuning", out / "confusion_before.png")
    plot_confusion(after["confusion_matrix"], after["classes"], "after fine-tuning", out / "confusion_after.png")
    stopped = [t for t in trials if t["stopped_early"]]
    cost = sweep_cost(trials)
    lines = [
        f"# {title}", "",
        f"{len(trials)} trials, {SCHEDULER_NAMES.get(scheduler, scheduler)}, max {max_epochs} epochs"
        + (f", rungs at {', '.join(f'{r:.3g}' for r in rung_epochs)} epochs" if rung_epochs else "")
        + f"; {len(stopped)} stopped early.",
        f"Compute used: {sum(t['epochs_run'] for t in trials):.4g} trial-epochs run of "
        f"{max_epochs * len(trials)} had every trial run to max_t ({asha_savings(trials, max_epochs):.0%}).", "",
        "## Cost", "",
        "| | wall s | CPU-s held | GPU-s held | images | training steps s | outside training steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| all trials | {cost['wall_s']:.0f} | {cost['cpu_s']:.0f} | {cost['gpu_s']:.0f} | {cost['images']:,} | "
        f"{cost['train_s']:.0f} | {cost['outside_train_share']:.0%} |",
        f"| had every trial run to max_t (projected) | {cost['full_wall_s']:.0f} | {cost['full_cpu_s']:.0f} | "
        f"{cost['full_gpu_s']:.0f} | | | |", "",
        f"Stopping trials early saved {cost['asha_saved_share']:.0%} of the {'GPU' if cost['full_gpu_s'] else 'CPU'}-seconds. "
        f"{cost['outside_train_share']:.0%} of the trials' wall time went outside training steps (start-up, "
        "data setup, validation, checkpoints). Wall seconds add up trials that may have run at the same time; "
        "resources held = what each trial reserved x its wall time.", "",
        "## Trials", "",
        "| trial | flavor | width | block | optimizer | lr | wd | batch | smoothing | pad | epochs | best val acc | stopped "
        "| wall s | CPU-s | GPU-s | images | outside training |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in sorted(trials, key=lambda t: -t["best_val_acc"]):
        c = t["cost"]
        lines.append(
            f"| {t['trial_id']} | {t['flavor']} | {t['width']:g} | {t['block']} | {t['optimizer']} | {t['lr']:.3g} | "
            f"{t['weight_decay']:.2g} | {t['batch_size']} | {t['label_smoothing']:g} | {t.get('pad', '')} | "
            f"{t['epochs_run']:.3g} | {t['best_val_acc']:.2%} | "
            f"{'at epoch %.3g' % t['stopped_at_epoch'] if t['stopped_early'] else 'no'} | "
            f"{c['wall_s']:.0f} | {c['cpu_s']:.0f} | {c['gpu_s']:.0f} | {c['images']:,} | {c['outside_train_share']:.0%} |")
    lines += ["", "![validation accuracy per trial](val_acc.png)", "",
              f"Selected on validation accuracy: trial `{best['trial_id']}` ({best['best_val_acc']:.2%} at its best epoch).",
              "", "## Fine-tuning", "",
              f"Mode `{finetune['mode']}`, {finetune['epochs']} epochs, on {finetune['data']}; "
              "both evaluations on the same test set. \"Before\" is the "
              f"{finetune.get('before', 'source checkpoint')}"
              + (" (a linear head fitted on the frozen backbone: the data has other classes)."
                 if finetune.get("before") == "linear probe" else "."), "", *_metrics_table(before, after), "",
              "![confusion before](confusion_before.png) ![confusion after](confusion_after.png)", ""]
    lines += [f"- {n}" for n in notes]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
