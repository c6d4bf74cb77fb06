import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_dist.checkpoint import load_checkpoint, load_model
from resnet_dist.config import RunConfig
from resnet_dist.training import TrainingHooks, fit_local

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(data_dir, epochs=2):
    return RunConfig().replace(
        model={"flavor": "debug"}, data={"data_dir": str(data_dir)},
        optim={"lr": 0.05, "warmup_epochs": 0.5}, train={"epochs": epochs, "batch_size": 32, "eval_batch_size": 64},
    )


def test_fit_local_writes_checkpoints_and_metrics(tiny_data_dir, tmp_path):
    summary = fit_local(tiny_cfg(tiny_data_dir), tmp_path)
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["confusion_matrix"] == summary["test"]["confusion_matrix"]
    assert sum(map(sum, saved["test"]["confusion_matrix"])) == 60
    model, ckpt = load_model(tmp_path / "best.pt")
    assert ckpt["epoch"] == summary["best_epoch"] and len(ckpt["classes"]) == 10
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


class StopAfter(TrainingHooks):
    """Simulates a kill right after epoch `k` was checkpointed."""

    def __init__(self, k):
        self.k = k

    def epoch_end(self, record, history):
        if record["epoch"] == self.k:
            raise KeyboardInterrupt


def test_fit_local_resumes_where_it_stopped(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, epochs=3)
    straight = fit_local(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        fit_local(cfg, tmp_path / "resumed", hooks=StopAfter(2))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed = fit_local(cfg, tmp_path / "resumed")
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    # Same weights, optimizer, schedule, RNG and data order: epoch 3 repeats the straight run's.
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        assert resumed["history"][2][key] == pytest.approx(straight["history"][2][key], rel=1e-4, abs=1e-6)


def test_train_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "jobs/train.py", "--local", *args], cwd=REPO, capture_output=True, text=True)

    missing = run("--data", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error:") and "manifest.json" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad_lr = run("--lr", "-1", "--data", str(tmp_path))
    assert bad_lr.returncode == 2 and "optim.lr" in bad_lr.stderr
    bad_flavor = run("--model", "resnet7", "--data", str(tmp_path))
    assert bad_flavor.returncode == 2 and "resnet7" in bad_flavor.stderr
