"""A run knows what it is: re-using a run directory with another config is one clear error,
--restart sets the old files aside, the same config resumes."""

from __future__ import annotations

import json

import pytest

from resnet_dist.config import ConfigError, RunConfig
from resnet_dist.identity import IDENTITY_FILE, claim, differences, run_identity


def test_claim_records_resumes_refuses_and_restarts(tmp_path):
    run = tmp_path / "run"
    a = run_identity(RunConfig().to_dict(), "fp1")
    assert claim(run, a, "run") is None and json.loads((run / IDENTITY_FILE).read_text()) == a
    (run / "last.pt").write_bytes(b"old state")
    assert claim(run, a, "run") is None and (run / "last.pt").exists()   # the same run resumes
    b = run_identity(RunConfig().replace(optim={"lr": 0.05}).to_dict(), "fp1")
    with pytest.raises(ConfigError, match=r"started with another config \(optim.lr 0.2 -> 0.05\).*--restart"):
        claim(run, b, "run")
    assert (run / "last.pt").read_bytes() == b"old state"   # refused: nothing touched
    aside = claim(run, b, "run", restart=True)
    assert (aside / "last.pt").read_bytes() == b"old state" and not (run / "last.pt").exists()
    assert json.loads((run / IDENTITY_FILE).read_text()) == b
    # Other data is another run, even with the same config; execution-only settings are not.
    assert "data_fingerprint fp1 -> fp2" in differences(b, run_identity(RunConfig().replace(optim={"lr": 0.05}).to_dict(), "fp2"))
    faster = RunConfig().replace(optim={"lr": 0.05}, train={"eval_batch_size": 10}).to_dict()
    assert claim(run, run_identity(faster, "fp1"), "run") is None


def test_jobs_train_refuses_a_run_dir_of_another_config_and_restart_works(tiny_data_dir, tmp_path, capsys):
    run_dir = tmp_path / "r"

    from jobs.train import main

    def train(epochs, *extra) -> str:
        """jobs/train.py's main() in this process (a subprocess would only add its start-up)."""
        main(["--local", "--model", "debug", "--data", str(tiny_data_dir), "--train-subset", "64", "--epochs", epochs,
              "--batch-size", "32", "--no-eval-flip-tta", "--mlflow-uri", "off", "--run-dir", str(run_dir), *extra])

    train("1")
    train("1")   # the same run again: it resumes (nothing left to train)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train("2")
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert "train.epochs 1 -> 2" in err and "--restart" in err
    train("2", "--restart")
    assert [r["epoch"] for r in json.loads((run_dir / "metrics.json").read_text())["history"]] == [1, 2]
    assert list(tmp_path.glob("r.replaced-*/best.pt"))   # the old run, kept
