"""TensorBoard and MLflow tracking against real files: events read back with tensorboard's
own reader, runs with mlflow.search_runs."""

from __future__ import annotations

import mlflow
import pytest
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from cluster.tracking import Tracker, TrackerSink, TrackingConfig, flatten, log_artifacts


def record(epoch: int, acc: float) -> dict:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "train_acc": acc - 0.05, "val_loss": 2.1 / epoch,
            "val_acc": acc, "lr": 0.1 / epoch, "images_per_s": 300.0, "epoch_s": 10.0, "data_wait_frac": 0.02}


def scalars(logdir, run: str, tag: str) -> list[tuple[int, float]]:
    m = EventMultiplexer()
    m.AddRunsFromDirectory(str(logdir))
    m.Reload()
    return [(e.step, e.value) for e in m.Scalars(run, tag)]


def test_flatten_gives_dotted_string_params():
    assert flatten({"optim": {"lr": 0.1, "milestones": [1, 2]}, "seed": 0}) == {
        "optim.lr": "0.1", "optim.milestones": "[1, 2]", "seed": "0"}


def test_two_runs_side_by_side_in_tensorboard_and_mlflow(tmp_path):
    cfg = TrackingConfig.for_dir(tmp_path, "sweep-a", "")
    for trial, accs in (("t0", (0.3, 0.5)), ("t1", (0.2,))):
        tracker = Tracker(TrackingConfig(**{**cfg.to_dict(), "run_name": trial}),
                          params={"config": {"optim": {"lr": 0.1}}, "trial": trial})
        for i, acc in enumerate(accs, 1):
            tracker.log_epoch(record(i, acc))
        tracker.close()

    m = EventMultiplexer()
    m.AddRunsFromDirectory(str(tmp_path / "tensorboard"))
    m.Reload()
    assert sorted(m.Runs()) == ["t0", "t1"]
    assert scalars(tmp_path / "tensorboard", "t0", "accuracy/val") == [(1, pytest.approx(0.3)), (2, pytest.approx(0.5))]
    assert "optim/lr" in m.Runs()["t0"]["scalars"] and "throughput/images_per_s" in m.Runs()["t0"]["scalars"]

    mlflow.set_tracking_uri(cfg.mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["sweep-a"])
    assert sorted(runs["tags.mlflow.runName"]) == ["t0", "t1"]
    t0 = runs[runs["tags.mlflow.runName"] == "t0"].iloc[0]
    assert t0["params.config.optim.lr"] == "0.1" and t0["metrics.val_acc"] == pytest.approx(0.5)
    assert t0["status"] == "FINISHED"
    history = mlflow.MlflowClient(cfg.mlflow_uri).get_metric_history(t0["run_id"], "val_acc")
    assert [(h.step, round(h.value, 3)) for h in history] == [(1, 0.3), (2, 0.5)]


def test_a_resumed_run_continues_the_same_mlflow_run_and_artifacts_attach(tmp_path):
    cfg = TrackingConfig.for_dir(tmp_path, "exp", "trial-x")
    first = Tracker(cfg, params={"a": 1})
    first.log_epoch(record(1, 0.4))            # the process dies here: no close()
    again = Tracker(cfg, params={"a": 1})
    assert again.run_id == first.run_id
    again.log_epoch(record(2, 0.6))
    again.close()
    (tmp_path / "best.pt").write_bytes(b"weights")
    assert log_artifacts(cfg, "trial-x", [tmp_path / "best.pt"], {"test_acc": 0.61, "before": float("nan")})
    assert not log_artifacts(cfg, "no-such-run", [tmp_path / "best.pt"])
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["best.pt"]
    run = client.get_run(first.run_id)
    assert run.data.metrics["test_acc"] == pytest.approx(0.61) and "before" not in run.data.metrics
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    assert len(mlflow.search_runs(experiment_names=["exp"])) == 1


def test_a_run_killed_while_mlflow_created_it_is_set_aside(tmp_path):
    """SIGKILL between MLflow's creating a run directory and writing its meta.yaml leaves an
    empty file, and the file store then fails every search of the experiment (seen in a
    killed-and-resumed sweep). A later tracker moves the run to mlruns.broken/ and goes on."""
    import os
    import time

    cfg = TrackingConfig.for_dir(tmp_path, "exp", "trial-a")
    first = Tracker(cfg, params={"a": 1})
    first.close()
    exp_dir = next(p for p in (tmp_path / "mlruns").iterdir() if (p / first.run_id).is_dir())
    broken = exp_dir / "0123456789abcdef0123456789abcdef"
    broken.mkdir()
    (broken / "meta.yaml").write_text("")
    old = time.time() - 60
    os.utime(broken / "meta.yaml", (old, old))
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    with pytest.raises(AttributeError):   # what the broken run does to the file store
        client.search_runs([exp_dir.name])
    again = Tracker(TrackingConfig(**{**cfg.to_dict(), "run_name": "trial-b"}), params={"a": 2})
    again.close()
    assert not broken.exists() and (tmp_path / "mlruns.broken" / f"{exp_dir.name}-{broken.name}").is_dir()
    names = {r.info.run_name for r in client.search_runs([exp_dir.name])}
    assert names == {"trial-a", "trial-b"}


def test_mlflow_off_still_writes_tensorboard(tmp_path):
    cfg = TrackingConfig.for_dir(tmp_path, "exp", "r", mlflow_uri="off")
    assert cfg.mlflow_uri == ""
    sink = TrackerSink(Tracker(cfg))
    sink.report(record(1, 0.5), [], lambda: {})
    sink.close()
    assert not (tmp_path / "mlruns").exists()
    assert scalars(tmp_path / "tensorboard", "r", "accuracy/val") == [(1, pytest.approx(0.5))]


def test_reports_between_epoch_ends_are_tracked_at_their_optimizer_step(tmp_path):
    cfg = TrackingConfig.for_dir(tmp_path, "exp", "r", mlflow_uri="off")
    sink = TrackerSink(Tracker(cfg), per_epoch=False)
    for step, acc in ((5, 0.2), (10, 0.4)):
        sink.report({**record(1, acc), "epoch": step / 10, "step": step}, [], lambda: {})
    sink.close()
    assert scalars(tmp_path / "tensorboard", "r", "accuracy/val") == [(5, pytest.approx(0.2)), (10, pytest.approx(0.4))]


def test_an_unusable_mlflow_uri_is_one_line_before_anything_runs(tiny_data_dir, tmp_path, capsys):
    """Nothing listens on port 9 here: the job says so in one line and exits 2, instead of
    every worker retrying a dead tracking server."""
    from jobs.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--local", "--data", str(tiny_data_dir), "--run-dir", str(tmp_path / "r"),
              "--mlflow-uri", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --mlflow-uri http://127.0.0.1:9: cannot use it")
    assert not (tmp_path / "r").exists()
