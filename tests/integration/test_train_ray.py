"""Distributed training on the shared real Ray cluster: sharding, DDP sync,
checkpoint evaluation, resume after a killed driver, a SIGKILLed worker, and clear
errors for bad configs. `ray job submit` of the main job, from a clean clone with an
empty HOME, is CI's own step (scripts/first_run_check.sh), so it is not repeated here."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_dist.checkpoint import load_checkpoint
from resnet_dist.config import RunConfig
from resnet_dist.engine import lr_factor
from resnet_dist.outputs import evaluate_checkpoint

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def train_cmd(data_dir, run_dir, *extra):
    return [sys.executable, "jobs/train.py", "--workers", "2", "--model", "debug", "--data", str(data_dir),
            "--run-dir", str(run_dir), *extra]


def run_train(data_dir, run_dir, *extra, timeout=400):
    return subprocess.run(train_cmd(data_dir, run_dir, *extra), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def reports(run_dir) -> list[list[dict]]:
    return [json.loads(line) for line in (Path(run_dir) / "reports.jsonl").read_text().splitlines()]


def _count_reports(run_dir) -> int:
    path = Path(run_dir) / "reports.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_each_sample_goes_to_exactly_one_worker_per_epoch(ray_driver, tiny_data_dir, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    from cluster.data import build_datasets, torch_batches
    from resnet_dist.config import DataConfig
    from resnet_dist.parquet import read_manifest

    manifest = read_manifest(tiny_data_dir)
    # No crop/flip: a sample's normalised pixels identify it.
    datasets = build_datasets(str(tiny_data_dir), manifest, DataConfig(pad=0, flip=False), splits=("train",))

    def loop(config):
        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(2):
            seen = [hashlib.sha1(x.numpy().tobytes()).hexdigest()
                    for xb, _ in torch_batches(shard, 32, train=False) for x in xb]
            Path(config["out"], f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(seen))
            ray.train.report({"epoch": epoch})

    TorchTrainer(loop, train_loop_config={"out": str(tmp_path)}, datasets=datasets,
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "storage"), name="shard")).fit()
    n = manifest["counts"]["train"]
    for epoch in range(2):
        a, b = (set(json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text())) for r in (0, 1))
        # equal=True: every worker gets n // 2 rows (train may drop one; val is not split this way)
        assert len(a) + len(b) == n - n % 2 and not a & b, (len(a), len(b), len(a & b))
        assert abs(len(a) - len(b)) <= 1


def test_two_workers_stay_in_sync_and_report_what_the_checkpoint_scores(ray_driver, tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = run_train(tiny_data_dir, run_dir, "--epochs", "2", "--batch-size", "32", "--eval-batch-size", "20")
    assert done.returncode == 0, done.stderr[-3000:]
    per_epoch = reports(run_dir)
    assert len(per_epoch) == 2
    for ranks in per_epoch:
        assert [r["rank"] for r in ranks] == [0, 1]
        assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
        assert ranks[0]["val_acc"] == ranks[1]["val_acc"]   # all-reduced: every rank holds the global figure
        assert ranks[0]["val_images"] == 41                 # every val image counted once (41 is odd)
    summary = json.loads((run_dir / "metrics.json").read_text())
    best = load_checkpoint(run_dir / "best.pt")
    offline = evaluate_checkpoint(best, tiny_data_dir, "val")
    assert offline.accuracy == pytest.approx(summary["best_val_acc"], abs=1e-9)
    assert sum(map(sum, summary["test"]["confusion_matrix"])) == 60


def test_resume_after_the_driver_is_killed(ray_driver, real_cifar_dir, tmp_path):
    run_dir = tmp_path / "resume"
    # The device data path: resuming is about the checkpoint, and it starts faster than a Ray Data
    # pipeline (the pipeline's own recovery is the SIGKILLed worker's test below).
    args = ["--epochs", "3", "--train-subset", "2000", "--batch-size", "100", "--max-failures", "0",
            "--data-path", "device"]
    log = open(tmp_path / "first-run.log", "w")
    proc = subprocess.Popen(train_cmd(real_cifar_dir, run_dir, *args), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    # The driver logs a report once Ray Train registered its checkpoint.
    while time.time() < deadline and _count_reports(run_dir) < 2 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)   # the driver and its children, mid-run
    proc.wait()
    assert list(run_dir.glob("checkpoint_epoch_0002")), "epoch 2 was never checkpointed"
    time.sleep(5)   # let Ray reap the dead driver's actors

    done = run_train(real_cifar_dir, run_dir, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [ranks[0] for ranks in reports(run_dir)]
    # The second run starts where the first stopped (epoch 3), from the epoch-2 state.
    last = resumed[-1]
    assert last["epoch"] == 3 and last["resumed_from_epoch"] == 2
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    cfg = RunConfig.from_dict(load_checkpoint(run_dir / "last.pt")["run_config"])
    steps = 2000 // 100
    # The scheduler continued, not restarted: after epoch 3 the lr is the schedule's value at step
    # 3*steps (the end of the decay), not its value 1*steps into a fresh schedule.
    assert last["lr"] == pytest.approx(cfg.optim.lr * lr_factor(cfg.optim, 3 * steps, steps, 3), abs=1e-9)
    assert lr_factor(cfg.optim, steps, steps, 3) > 0.1
    assert history[2]["train_loss"] < history[0]["train_loss"]   # continuous: no jump back to a fresh model


def test_training_survives_a_sigkilled_worker(ray_driver, tiny_data_dir, tmp_path):
    from ray.util.state import list_actors

    run_dir = tmp_path / "fault"
    # The device path, which starts in seconds (the Ray Data pipeline runs end to end in the
    # two-worker test above); 12 tiny epochs take long enough for the kill to land mid-run.
    proc = subprocess.Popen(train_cmd(tiny_data_dir, run_dir, "--epochs", "12", "--batch-size", "32",
                                      "--data-path", "device", "--max-failures", "2"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and _count_reports(run_dir) < 1:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    rows = [ranks[0] for ranks in reports(run_dir)]
    epochs = [r["epoch"] for r in rows]
    # The epoch the kill cut short may be re-run once after the restart; nothing earlier is lost.
    assert epochs[-1] == 12 and epochs[0] == 1 and set(epochs) == set(range(1, 13))
    assert max(r["resumed_from_epoch"] for r in rows) >= 1
    final = load_checkpoint(run_dir / "last.pt")
    assert final["epoch"] == 12


def _child_named(pid: int, name: str) -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            comm, ppid = stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == pid and comm == name:
                return int(proc.name)
    return None


# The session runs this test first (tests/integration/conftest.py), while every CPU of the
# shared cluster is free: an elastic run starts with the workers the free CPUs hold.
def test_an_elastic_run_survives_a_lost_node(ray_driver, ray_cluster, tiny_data_dir, tmp_path):
    """A second node joins the shared cluster (its own raylet, as a second machine would); one
    of the two workers lands on it (1.5 CPUs each: one fits per 2-CPU node). Its raylet is
    SIGKILLed mid-run: the run goes on from its last checkpoint with the one worker the head
    node holds (elastic, --min-workers 1) and finishes, losing at most the epoch it was in."""

    ray_bin = str(Path(sys.executable).with_name("ray"))
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        agent_port = sock.getsockname()[1]   # the head's agent holds the default port
    node = subprocess.Popen([ray_bin, "start", f"--address={ray_cluster.address}", "--num-cpus=2", "--block",
                             f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats"],
                            env=ray_cluster.env, stdout=open(tmp_path / "node.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    run_dir = tmp_path / "elastic"
    proc = None
    try:
        import ray

        deadline = time.time() + 60
        while time.time() < deadline and ray.cluster_resources().get("CPU", 0) < 4:
            time.sleep(0.5)
        assert ray.cluster_resources().get("CPU", 0) == 4, (tmp_path / "node.log").read_text()[-2000:]
        # An elastic run starts with as many workers as the free CPUs hold: wait until the
        # earlier tests' workers have given theirs back, or it starts with one.
        while time.time() < deadline + 30 and ray.available_resources().get("CPU", 0) < 4:
            time.sleep(0.5)
        proc = subprocess.Popen(train_cmd(tiny_data_dir, run_dir, "--epochs", "30", "--batch-size", "32",
                                          "--data-path", "device", "--min-workers", "1", "--cpus-per-worker", "1.5",
                                          "--max-failures", "2"),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                # Until the GCS marks the node dead, Train's first restart asks
                                # for 2 workers again and waits out its start timeout (60 s by
                                # default) before it goes on with 1; 10 s keeps the test short.
                                env={**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
        deadline = time.time() + 300
        while time.time() < deadline and _count_reports(run_dir) < 1 and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        # Two ranks report; one of them runs on the second node (1.5 CPUs each: one fits per
        # 2-CPU node), which the end of the run shows: after the kill one rank is left.
        assert len(reports(run_dir)[0]) == 2
        raylet = _child_named(node.pid, "raylet")
        assert raylet, "the second node's raylet was not found"
        os.kill(raylet, signal.SIGKILL)   # the machine is gone: its raylet and, with it, its worker
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc and proc.poll() is None:
            proc.kill()
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        # The tests after this one size their runs by the cluster's CPUs: wait until the GCS
        # has marked the node dead and its 2 CPUs are gone.
        deadline = time.time() + 90
        while time.time() < deadline and ray.cluster_resources().get("CPU", 0) > 2:
            time.sleep(0.5)
    per_report = reports(run_dir)
    epochs = [ranks[0]["epoch"] for ranks in per_report]
    assert epochs[0] == 1 and epochs[-1] == 30 and set(epochs) == set(range(1, 31))
    assert len(epochs) - len(set(epochs)) <= 1   # at most the epoch the node died in is re-run
    assert len(per_report[0]) == 2 and len(per_report[-1]) == 1   # two workers, then the one left
    assert max(ranks[0]["resumed_from_epoch"] for ranks in per_report) >= 1
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 30


@pytest.mark.parametrize("args,message", [
    (["--workers", "3", "--batch-size", "96"], "3 workers need 3 CPUs"),
    (["--batch-size", "33"], "not divisible by 2 workers"),
])
def test_bad_configs_fail_before_any_worker_starts(ray_driver, tiny_data_dir, tmp_path, args, message):
    done = run_train(tiny_data_dir, tmp_path / "bad", *args, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "bad").exists()


def test_missing_data_dir_is_one_line(tmp_path):
    done = run_train(tmp_path / "nothing", tmp_path / "bad", timeout=120)
    assert done.returncode == 2 and "manifest.json" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
