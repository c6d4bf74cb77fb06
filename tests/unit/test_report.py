import csv
import math

from resnet_dist.metrics import classification_report, confusion_matrix
import pytest

from resnet_dist.report import asha_savings, sweep_cost, trial_cost, write_report

import numpy as np


def trial(tid, epochs, acc, stopped):
    return {"trial_id": tid, "status": "TERMINATED", "flavor": "resnet20", "width": 1.0, "block": "basic",
            "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "batch_size": 128,
            "label_smoothing": 0.1, "schedule": "onecycle", "epochs_run": epochs, "best_val_acc": acc,
            "stopped_early": stopped, "stopped_at_epoch": epochs if stopped else None,
            "history": [(e, acc * e / epochs) for e in range(1, epochs + 1)],
            "cost": trial_cost(results(epochs), cpus=1.0, gpus=0.0, max_epochs=3)}


def results(epochs: int) -> list[dict]:
    """Tune-like results: 30 s to the first report (20 s of it start-up), then 10 s an epoch."""
    return [{"time_total_s": 30.0 + 10 * i, "time_this_iter_s": 30.0 if i == 0 else 10.0, "epoch_s": 8.0,
             "images": 1000} for i in range(epochs)]


def test_trial_cost_counts_resources_held_over_wall_time_and_projects_to_max_t():
    c = trial_cost(results(1), cpus=2.0, gpus=1.0, max_epochs=3)
    assert (c["wall_s"], c["cpu_s"], c["gpu_s"], c["images"], c["train_s"]) == (30.0, 60.0, 30.0, 1000, 8.0)
    assert c["outside_train_share"] == pytest.approx(1 - 8 / 30, abs=1e-4)
    assert c["full_wall_s"] == 30 + 2 * 8.0   # one report only: later epochs priced at its training time
    c = trial_cost(results(2), cpus=2.0, gpus=0.0, max_epochs=3)
    assert c["full_wall_s"] == 40 + 10 and c["full_cpu_s"] == 100 and c["gpu_s"] == 0


def test_sweep_cost_totals_and_asha_savings():
    trials = [trial("a", 3, 0.7, False), trial("b", 1, 0.4, True)]
    cost = sweep_cost(trials)
    assert cost["cpu_s"] == 50 + 30 and cost["full_cpu_s"] == 50 + (30 + 2 * 8)
    assert cost["asha_saved_share"] == pytest.approx(1 - 80 / 96)
    assert cost["images"] == 4000 and cost["outside_train_share"] == pytest.approx(1 - 32 / 80)


def test_asha_savings_counts_trial_epochs():
    trials = [trial("a", 3, 0.7, False), trial("b", 1, 0.4, True), trial("c", 1, 0.3, True), trial("d", 2, 0.5, True)]
    assert asha_savings(trials, 3) == (3 + 1 + 1 + 2) / 12
    assert asha_savings([], 3) == 0.0


def test_report_files_exist_and_say_what_happened(tmp_path):
    trials = [trial("a", 3, 0.7, False), trial("b", 1, 0.4, True)]
    classes = ["x", "y", "z"]
    labels = np.array([0, 1, 2, 2])
    before = classification_report(confusion_matrix(labels, np.array([0, 0, 2, 1]), 3), classes)
    after = classification_report(confusion_matrix(labels, np.array([0, 1, 2, 2]), 3), classes)
    report = write_report(tmp_path, title="Sweep t", trials=trials, max_epochs=3, best=trials[0], before=before,
                          after=after, finetune={"mode": "head", "epochs": 1, "data": "CIFAR-10 train+val"})
    text = report.read_text()
    assert "1 stopped early" in text and "4 trial-epochs run of 6" in text
    assert "| accuracy | 50.00% | 100.00% |" in text
    assert "## Cost" in text and "Stopping trials early saved 17% of the CPU-seconds" in text
    for png in ("val_acc.png", "confusion_before.png", "confusion_after.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert [r["trial_id"] for r in rows] == ["a", "b"] and rows[1]["stopped_early"] == "True"
    assert not math.isnan(float(rows[0]["best_val_acc"]))
    assert float(rows[1]["cpu_s"]) == 30.0 and int(rows[0]["images"]) == 3000
