"""Outputs at a URI (resnet_dist.storage): file:// and a real S3-compatible server (moto's,
installed with the test extra, spoken to over HTTP by pyarrow's own S3 client)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_dist import storage
from resnet_dist.checkpoint import load_checkpoint, resolve_checkpoint
from resnet_dist.config import ConfigError

BUCKET = "resnet-dist-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, one bucket; yields a function BUCKET/prefix -> s3:// URI."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(BUCKET)
        yield lambda prefix: f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        proc.terminate()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    return tmp_path / "staging"


def test_uri_joins_keep_the_scheme_and_the_query():
    uri = "s3://b/runs?endpoint_override=h:9000&scheme=http"
    assert storage.join(uri, "sweep", "best.pt") == "s3://b/runs/sweep/best.pt?endpoint_override=h:9000&scheme=http"
    assert storage.parent(storage.join(uri, "x")) == uri
    assert storage.name(storage.join(uri, "x")) == "x"
    assert storage.with_fs_path(uri, "b/runs/t/checkpoint_epoch_0001") == \
        "s3://b/runs/t/checkpoint_epoch_0001?endpoint_override=h:9000&scheme=http"
    assert storage.join("file:///tmp/r", "a") == "file:///tmp/r/a"
    assert storage.with_fs_path("file:///tmp/r", "/tmp/r/a") == "file:///tmp/r/a"
    assert storage.join("runs", "a") == "runs/a" and not storage.is_uri("runs")


def test_a_mirror_pulls_pushes_and_leaves_others_entries_alone(tmp_path, staging):
    target = tmp_path / "bucket" / "sweep"
    (target / "tune").mkdir(parents=True)
    (target / "tune" / "state.json").write_text("ray's")
    (target / "report.md").write_text("old report")
    with storage.Mirror(target.as_uri(), skip=("tune",)) as m:
        assert m.local.is_relative_to(staging) and m.local != target
        assert (m.local / "report.md").read_text() == "old report"       # pulled: a re-run resumes from it
        assert not (m.local / "tune").exists()                            # Ray's own, left at the URI
        (m.local / "report.md").write_text("new report, longer")
        (m.local / "sub").mkdir()
        (m.local / "sub" / "best.pt").write_bytes(b"weights")
        (m.local / "tune").mkdir()
        (m.local / "tune" / "state.json").write_text("a stale local copy")
    assert (target / "report.md").read_text() == "new report, longer"     # pushed on exit
    assert (target / "sub" / "best.pt").read_bytes() == b"weights"
    assert (target / "tune" / "state.json").read_text() == "ray's"        # never overwritten
    assert storage.Mirror(target.as_uri(), skip=("tune",)).push() == 0   # nothing changed: nothing copied


def test_a_mirror_pushes_what_was_written_when_the_run_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with storage.Mirror(target.as_uri()) as m:
            (m.local / "epoch1.json").write_text("{}")
            raise RuntimeError("a worker died")
    assert (target / "epoch1.json").is_file()


def _checkpoint(path: Path) -> None:
    from resnet_dist.checkpoint import build_checkpoint, save_checkpoint
    from resnet_dist.config import ModelConfig, RunConfig
    from resnet_dist.models import build_model

    mc = ModelConfig(flavor="debug")
    save_checkpoint(build_checkpoint(build_model(mc), model_config=mc, run_config=RunConfig().to_dict(),
                                     classes=[str(i) for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3,
                                     data_fingerprint="fp", epoch=1, metrics={}), path)


def test_checkpoints_resolve_and_load_from_s3_and_unusable_uris_are_one_line(s3, tmp_path):
    local = tmp_path / "run"
    local.mkdir()
    _checkpoint(local / "best.pt")
    run = s3("runs/r1")
    storage.write_bytes(storage.join(run, "best.pt"), (local / "best.pt").read_bytes())
    assert resolve_checkpoint(run) == storage.join(run, "best.pt")          # a run dir's best.pt, as for paths
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model_state"]["fc.weight"],
                                              load_checkpoint(local)["model_state"]["fc.weight"])
    # What a Serve replica does with a URI (cluster/serve.py: Classifier -> load_predictor).
    from resnet_dist.inference import checkpoint_id, load_predictor

    predictor = load_predictor(run)
    assert predictor.classes == [str(i) for i in range(10)]
    assert checkpoint_id(storage.join(run, "best.pt")) == checkpoint_id(local / "best.pt")
    from resnet_dist.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint at s3://"):
        resolve_checkpoint(s3("runs/missing"))
    with pytest.raises(ConfigError, match="pyarrow cannot open it"):
        storage.Mirror("nosuchscheme://x/y").check_writable()
    with pytest.raises(ConfigError, match="not writable"):
        storage.Mirror(s3("x").replace(BUCKET, "no-such-bucket")).check_writable()


def _train(run_dir: str, data: Path, epochs: str, *extra: str) -> None:
    from jobs.train import main

    main(["--local", "--model", "debug", "--data", str(data), "--train-subset", "64", "--epochs", epochs,
          "--batch-size", "32", "--no-eval-flip-tta", "--run-dir", run_dir, *extra])


def test_a_local_run_on_s3_writes_there_resumes_from_there_and_logs_tensorboard_there(s3, tiny_data_dir, staging):
    run = s3("train/r1")
    _train(run, tiny_data_dir, "1", "--mlflow-uri", "off")
    fs, path = storage.filesystem(run)
    import pyarrow.fs as pafs

    names = {i.path[len(path) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if i.type == pafs.FileType.File}
    assert {"best.pt", "last.pt", "metrics.json", "identity.json"} <= names, names
    assert any(n.startswith("tensorboard/") and "events" in n for n in names), names   # uploaded by the tracker
    assert ".driver.lock" not in names
    first = json.loads(storage.read_bytes(storage.join(run, "metrics.json")))["history"]
    # Another machine: no staging copy. The same run resumes from what S3 holds: nothing is
    # left to train, so its history is the first run's, to the timing of each epoch.
    shutil.rmtree(staging)
    _train(run, tiny_data_dir, "1", "--mlflow-uri", "off")
    again = json.loads(storage.read_bytes(storage.join(run, "metrics.json")))["history"]
    assert [r["epoch"] for r in again] == [1] and again[0]["epoch_s"] == first[0]["epoch_s"]
    with pytest.raises(SystemExit) as exit_:   # --restart cannot set a URI's old run aside
        _train(run, tiny_data_dir, "2", "--mlflow-uri", "off", "--restart")
    assert exit_.value.code == 2


def test_a_local_run_at_a_file_uri_keeps_mlflow_in_a_file_store_there(tiny_data_dir, tmp_path):
    target = tmp_path / "store" / "r2"
    _train(target.as_uri(), tiny_data_dir, "1")
    assert (target / "best.pt").is_file() and (target / "metrics.json").is_file()
    assert list((target / "tensorboard").rglob("events.out.tfevents.*"))
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri((target / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["resnet-dist-train"], output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["test_acc"] >= 0
