"""The main job on the shared real Ray cluster: a `smoke` sweep (successive halving) whose driver is
SIGKILLed after two trials finished and then re-run (resume), fine-tuning in `full`
mode on a 3-class image folder made here, the report, and `head` fine-tuning of the
selected checkpoint on Ray Train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_dist.checkpoint import load_checkpoint
from resnet_dist.storage import STAGING_ENV
from tests.integration.conftest import missing_dashboard_series, scraped_names

# The module fixture (two sweep runs, up to 300 s + 420 s) counts toward its first test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
THREE_CLASSES = ("disc", "ring", "square")


def make_three_class_folder(root: Path) -> Path:
    """train/ and test/ PNGs of three shapes under noise: a user's own small data set."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 15.5, xx - 15.5)
    masks = {"disc": r < 9, "ring": (r > 6) & (r < 11), "square": (abs(yy - 15.5) < 8) & (abs(xx - 15.5) < 8)}
    for split, n in (("train", 60), ("test", 8)):
        for name in THREE_CLASSES:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = 60 + 140 * masks[name][..., None] + rng.normal(0, 20, (32, 32, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


def sweep_cmd(data_dir: Path, storage: str, folder: Path) -> list[str]:
    return [sys.executable, "jobs/sweep.py", "--preset", "smoke", "--name", "smoke", "--storage", str(storage),
            "--data", str(data_dir), "--data-path", "device", "--finetune-mode", "full", "--finetune-data", str(folder),
            # Two trials at once (1 CPU and 1 thread each, in their own Tune processes): pauses and
            # resumes interleave, as on a cluster that runs fewer trials at once than a rung holds.
            "--max-concurrent", "2",
            # 162 training images at the smoke batch of 32 are 5 steps an epoch: a 3-class head and
            # a tiny backbone need ~40 steps to separate the shapes. 0.1: from the selected checkpoint
            # (the best trial's best report, 128 images in) fine-tuning at 0.2 collapsed to one class
            # once; 0.05 and 0.1 gave 100% test (jobs/finetune.py --local on the same checkpoint).
            "--finetune-epochs", "8", "--finetune-lr", "0.1", "--finetune-backbone-lr-scale", "1.0"]


def tune_trials(tune_dir: Path) -> dict[str, dict]:
    """Trial id -> Tune's own saved view of it (status, last result), from the newest experiment state."""
    states = sorted(tune_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):   # being rewritten
        return {}
    trials = {}
    for state, meta in data["trial_data"]:
        state = json.loads(state) if isinstance(state, str) else state
        meta = json.loads(meta) if isinstance(meta, str) else meta
        trials[state["trial_id"]] = {"status": state["status"], "last_result": meta.get("last_result", {})}
    return trials


def result_rows(tune_dir: Path) -> dict[str, list[dict]]:
    """Trial id -> every result row Tune logged for it (one per epoch run)."""
    out = {}
    for f in tune_dir.glob("trial_fn_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def sweep(ray_cluster, tiny_data_dir, tmp_path_factory):
    """The smoke sweep, killed once after two finished trials and resumed to the end. While it
    runs, the names of the series on Ray's metrics endpoint are collected."""
    tmp = tmp_path_factory.mktemp("sweep")
    folder = make_three_class_folder(tmp / "shapes")
    # The sweep's storage is a file:// URI: everything the driver writes goes through its local
    # staging copy and pyarrow.fs (resnet_dist.storage), Ray's own state straight to the URI;
    # the tests below read the URI's directory as they would a plain --storage path's (which
    # CI's first-run check of scripts/main.sh runs).
    storage = tmp / "runs"
    tune_dir = storage / "smoke" / "tune"
    scraped: set[str] = set()
    env = {**os.environ, STAGING_ENV: str(tmp / "staging")}

    def start(log_name: str) -> subprocess.Popen:
        return subprocess.Popen(sweep_cmd(tiny_data_dir, storage.as_uri(), folder), cwd=REPO, env=env,
                                stdout=open(tmp / log_name, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    proc = start("first-run.log")
    try:
        deadline = time.time() + 300
        finished: dict[str, dict] = {}
        while time.time() < deadline and proc.poll() is None:
            scraped |= scraped_names(ray_cluster.metrics_port)
            finished = {t: s for t, s in tune_trials(tune_dir).items() if s["status"] == "TERMINATED"}
            if len(finished) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp / "first-run.log").read_text()[-3000:]
        assert len(finished) >= 2, "two trials never finished in time: " + (tmp / "first-run.log").read_text()[-3000:]
        before_kill = {t: rows for t, rows in result_rows(tune_dir).items() if t in finished}
        kill_group(proc)   # the sweep driver and its children
        time.sleep(5)   # let Ray reap the dead driver's trial actors

        proc = start("second-run.log")
        deadline = time.time() + 420
        while time.time() < deadline and proc.poll() is None:
            scraped |= scraped_names(ray_cluster.metrics_port)
            time.sleep(0.5)
        out = (tmp / "second-run.log").read_text()
        assert proc.poll() == 0, out[-5000:]
    finally:
        # Whatever fails here (an assertion, pytest-timeout), no sweep is left holding the
        # shared cluster's CPUs for the tests after this module.
        kill_group(proc)
    return {"dir": storage / "smoke", "tune_dir": tune_dir, "finished_before_kill": before_kill, "stdout": out,
            "scraped": scraped, "staging": tmp / "staging"}


def test_finished_trials_are_not_rerun_after_the_driver_is_killed(sweep):
    after = result_rows(sweep["tune_dir"])
    assert len(after) >= 4
    for trial_id, rows in sweep["finished_before_kill"].items():
        assert after[trial_id] == rows, f"trial {trial_id} ran again after the resume"
        epochs = [r["epoch"] for r in after[trial_id]]
        assert len(epochs) == len(set(epochs))


# What a sweep writes to STORAGE/NAME (cluster/sweep.py's docstring), a path or a URI alike.
SWEEP_OUTPUTS = {"identity.json", "trials.csv", "best_config.json", "best.pt", "finetuned.pt", "finetune.json",
                 "report.md", "summary.json", "rungs.json", "val_acc.png", "confusion_before.png",
                 "confusion_after.png", "tune", "train", "tensorboard", "mlruns", "finetune-data"}


def test_a_sweep_at_a_uri_writes_the_same_outputs_as_at_a_path(sweep):
    names = {p.name for p in sweep["dir"].iterdir()}
    assert SWEEP_OUTPUTS <= names, SWEEP_OUTPUTS - names
    assert ".driver.lock" not in names    # the lock stays with the driver's local copy
    staged = [p for p in sweep["staging"].iterdir() if p.name.startswith("smoke-")]
    assert len(staged) == 1 and (staged[0] / ".driver.lock").is_file()
    assert (staged[0] / "report.md").read_bytes() == (sweep["dir"] / "report.md").read_bytes()
    summary = json.loads((sweep["dir"] / "summary.json").read_text())
    assert summary["sweep_dir"] == (sweep["dir"]).as_uri() and summary["report"].startswith("file://")


def test_halving_stops_trials_at_their_rungs_and_the_best_trial_is_selected(sweep):
    trials = tune_trials(sweep["tune_dir"])
    rows = result_rows(sweep["tune_dir"])
    assert len(trials) >= 4 and all(s["status"] == "TERMINATED" for s in trials.values())
    epochs_run = {t: max(r["epoch"] for r in rows[t]) for t in trials}
    max_t = 2   # the smoke preset's max epochs
    assert max(epochs_run.values()) == max_t
    stopped = {t for t, e in epochs_run.items() if e < max_t}
    # The smoke preset's rungs: 64 and 128 images, the best half kept at each (4 -> 2 -> 1).
    rungs = json.loads((sweep["dir"] / "rungs.json").read_text())
    assert rungs["milestones"] == [64, 128]
    # Every trial reached rung 0, before the driver was killed and after: the rungs outlived it.
    assert set(rungs["recorded"][0]) == set(trials)
    assert sum(rungs["decided"][0].values()) == len(trials) // 2 and sum(rungs["decided"][1].values()) == 1
    assert len(stopped) == len(trials) - 1
    for t in stopped:
        # Each lost at a rung and stopped there; or, if it waited at that rung when the driver was
        # killed, one report later (Tune restarts every unfinished trial: cluster/halving.py).
        lost = [k for k, d in enumerate(rungs["decided"]) if d is not None and d.get(t) is False]
        assert len(lost) == 1, (t, rungs["decided"])
        reports = sorted(r["images_seen"] for r in rows[t])
        at_rung = next(i for i, n in enumerate(reports) if n >= rungs["milestones"][lost[0]])
        assert len(set(reports[at_rung:])) <= 2, (t, reports)

    best_val = {t: max(r["val_acc"] for r in rows[t]) for t in trials}
    chosen = json.loads((sweep["dir"] / "best_config.json").read_text())
    assert chosen["val_acc"] == pytest.approx(max(best_val.values()))
    assert best_val[chosen["trial_id"]] == pytest.approx(max(best_val.values()))
    assert load_checkpoint(sweep["dir"] / "best.pt")["metrics"]["val_acc"] == pytest.approx(chosen["val_acc"])

    table = {line.split(",")[0]: line for line in (sweep["dir"] / "trials.csv").read_text().splitlines()[1:]}
    assert set(table) == set(trials)
    assert sum(",True," in line for line in table.values()) == len(stopped)


def test_a_trial_paused_at_a_rung_resumes_exactly_where_it_stopped(sweep, tmp_path):
    """A trial that was paused (at a rung, or by the driver's kill) and resumed from its
    checkpoint has the curve of the same config trained without a pause: every report's
    weights and validation accuracy equal, so the schedule, the optimizer state and the data
    order went on where they were."""
    from cluster.tune import trial_run_config
    from resnet_dist.config import RunConfig
    from resnet_dist.local import train_local
    from resnet_dist.spec import RunSpec

    rows = result_rows(sweep["tune_dir"])
    resumed = [t for t, rs in rows.items() if len({r["start_entered_at"] for r in rs}) > 1]
    assert resumed, "no trial was paused and resumed"
    trial = max(resumed, key=lambda t: len(rows[t]))
    params = json.loads(next(sweep["tune_dir"].glob(f"trial_fn_{trial}*/params.json")).read_text())
    spec = RunSpec.from_manifest(trial_run_config(RunConfig.from_dict(params["plan"]["base"]), params),
                                 params["plan"]["manifest"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the trial (two at a time on 2 CPUs): sums add up in the same order
    try:
        _, history = train_local(spec, tmp_path / "straight", resume=False)
    finally:
        torch.set_num_threads(threads)
    straight = {r["step"]: r for r in history}
    for r in sorted(rows[trial], key=lambda r: r["step"]):
        assert r["param_checksum"] == pytest.approx(straight[r["step"]]["param_checksum"], rel=1e-5), r["step"]
        assert r["val_acc"] == pytest.approx(straight[r["step"]]["val_acc"])
        assert r["lr"] == pytest.approx(straight[r["step"]]["lr"])


def test_full_finetuning_on_a_three_class_folder_and_the_report(sweep):
    d = sweep["dir"]
    tuned = load_checkpoint(d / "finetuned.pt")
    assert list(tuned["classes"]) == list(THREE_CLASSES)
    assert tuned["model_config"]["num_classes"] == 3 and tuned["metrics"]["test_acc"] >= 0.6   # chance is 1/3
    # --finetune-lr is an SGD rate whichever optimizer the selected trial used.
    assert tuned["run_config"]["optim"]["optimizer"] == "sgd"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["after"]["accuracy"] == pytest.approx(tuned["metrics"]["test_acc"])
    assert len(summary["after"]["confusion_matrix"]) == 3
    assert sum(map(sum, summary["after"]["confusion_matrix"])) == 3 * 8   # the folder's whole test split
    report = (d / "report.md").read_text()
    assert "successive halving" in report and "trial-epochs" in report
    for png in ("val_acc.png", "confusion_before.png", "confusion_after.png"):
        assert (d / png).stat().st_size > 1000
        assert png in report


def test_every_trial_is_tracked_in_tensorboard_and_mlflow_and_costed(sweep):
    """One TensorBoard run and one MLflow run per trial (plus fine-tuning's), the selected and
    fine-tuned models as artifacts, and each trial's cost in trials.csv and the report."""
    import csv

    import mlflow
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    d = sweep["dir"]
    trials = set(tune_trials(sweep["tune_dir"]))
    m = EventMultiplexer()
    m.AddRunsFromDirectory(str(d / "tensorboard"))
    m.Reload()
    assert set(m.Runs()) == trials | {"finetune"}
    rows = result_rows(sweep["tune_dir"])
    for t in trials:   # a resumed trial appends; every report Tune recorded is there, at its step
        logged, recorded = {e.step for e in m.Scalars(t, "accuracy/val")}, {r["step"] for r in rows[t]}
        # Tracked before it goes to Tune (cluster/train.py): a report the killed driver never
        # recorded may be logged, one at most, and never a gap.
        assert recorded <= logged and len(logged - recorded) <= 1, (t, logged, recorded)

    # Read back as a user would: the file store (MLflow 3 wants it asked for), `mlflow ui` alike.
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri((d / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["smoke"])
    assert sorted(runs["tags.mlflow.runName"]) == sorted(trials | {"finetune"})
    trial_runs = runs[runs["tags.mlflow.runName"] != "finetune"]
    assert trial_runs["params.config.optim.lr"].notna().all() and trial_runs["metrics.val_acc"].notna().all()
    client = mlflow.MlflowClient()
    by_name = dict(zip(runs["tags.mlflow.runName"], runs["run_id"]))
    chosen = json.loads((d / "best_config.json").read_text())["trial_id"]
    assert "best.pt" in {a.path for a in client.list_artifacts(by_name[chosen])}
    assert {"finetuned.pt", "report.md"} <= {a.path for a in client.list_artifacts(by_name["finetune"])}

    table = list(csv.DictReader(open(d / "trials.csv")))
    per_epoch = (199 // 32) * 32   # the tiny set's 199 train images at the smoke batch of 32, last batch dropped
    for row in table:
        assert float(row["wall_s"]) > float(row["train_s"]) > 0 and float(row["cpu_s"]) > 0
        assert int(row["images"]) == int(row["images_seen"]) <= 2 * per_epoch
        assert 0 < float(row["outside_train_share"]) < 1 and float(row["gpu_s"]) == 0
    cost = json.loads((d / "summary.json").read_text())["cost"]
    assert cost["cpu_s"] == pytest.approx(sum(float(r["cpu_s"]) for r in table), rel=1e-3)
    assert 0 < cost["asha_saved_share"] < 1   # halving stopped trials
    report = (d / "report.md").read_text()
    assert "## Cost" in report and "Stopping trials early saved" in report and "CPU-s held" in report


def test_finetune_job_in_head_mode_on_ray_train_trains_only_the_head(sweep, ray_cluster, tiny_data_dir, tmp_path):
    """jobs/finetune.py on the shared cluster, from the sweep's directory (its best.pt), with
    every path relative to where it is run, as in the README (Train's workers run elsewhere)."""
    out = tmp_path / "head"
    rel = lambda p: os.path.relpath(p, tmp_path)   # noqa: E731
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "finetune.py"), "--checkpoint", rel(sweep["dir"]),
                          "--data", rel(tiny_data_dir), "--mode", "head", "--epochs", "1", "--out", "head"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    before = load_checkpoint(sweep["dir"] / "best.pt")["model_state"]
    after = load_checkpoint(out / "finetuned.pt")["model_state"]
    head = {k for k in after if k.startswith("fc.")}
    assert head and all(not torch.equal(before[k], after[k]) for k in head)
    # The frozen backbone, BN running statistics included, is bit-for-bit the selected checkpoint's.
    assert all(torch.equal(before[k], after[k]) for k in after if k not in head)
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["finetune"]["mode"] == "head" and 0 <= summary["after"]["accuracy"] <= 1
    assert list((out / "tensorboard" / "finetune").glob("events.out.tfevents.*"))
    assert len(summary["before"]["confusion_matrix"]) == len(summary["after"]["confusion_matrix"]) == 10


def test_training_metrics_of_the_dashboard_reach_prometheus(sweep):
    """Every training metric k8s/grafana/resnet-dist.json queries was on Ray's metrics
    endpoint while the sweep's trials ran."""
    assert not missing_dashboard_series(sweep["scraped"], serve=False), sorted(
        n for n in sweep["scraped"] if "resnet_dist" in n)
