import csv
import math

from resnet_dist.metrics import classification_report, confusion_matrix
from resnet_dist.report import asha_savings, write_report

import numpy as np


def trial(tid, epochs, acc, stopped):
    return {"trial_id": tid, "status": "TERMINATED", "flavor": "resnet20", "width": 1.0, "block": "basic",
            "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "batch_size": 128,
            "label_smoothing": 0.1, "schedule": "onecycle", "epochs_run": epochs, "best_val_acc": acc,
            "stopped_early": stopped, "stopped_at_epoch": epochs if stopped else None,
            "history": [(e, acc * e / epochs) for e in range(1, epochs + 1)]}


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
    for png in ("val_acc.png", "confusion_before.png", "confusion_after.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert [r["trial_id"] for r in rows] == ["a", "b"] and rows[1]["stopped_early"] == "True"
    assert not math.isnan(float(rows[0]["best_val_acc"]))
