"""Experiment tracking: TensorBoard scalars and MLflow runs, one run per trial or training run.

Written by whoever runs the epoch loop's rank 0: a Ray Train worker (training, Tune trials,
fine-tuning) or the local loop. Ray Train V2 dropped the built-in V1 logging integrations,
so this is plain tensorboard + MLflow client code called from the loop. It never imports
Ray, so local runs use it as well.

Layout, under a sweep or run directory (DIR):
  DIR/tensorboard/<run>/events.*   `tensorboard --logdir DIR/tensorboard`: every run side by side
  DIR/mlruns/                      the default MLflow store (a local file store), one experiment
                                   per sweep or run directory; `--mlflow-uri` names a server instead
A run re-opened after a restart (a resumed trial, a re-run of the same command) appends to the
same TensorBoard directory and the same MLflow run (found by its `resnet_dist.run` tag).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from resnet_dist import storage
from resnet_dist.config import ConfigError
from resnet_dist.training import Sink

RUN_TAG = "resnet_dist.run"
TRAIN_EXPERIMENT = "resnet-dist-train"         # jobs/train.py runs; a sweep's experiment is its name
# Epoch-record key -> TensorBoard tag (MLflow takes the record's own keys).
SCALARS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
    "lr": "optim/lr", "images_per_s": "throughput/images_per_s", "data_wait_frac": "throughput/data_wait_frac",
    "epoch_s": "time/epoch_s",
}


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's tracking goes; plain values, so it travels in a Ray config dict."""

    tensorboard_dir: str = ""     # events go to tensorboard_dir/run_name ("" = no TensorBoard)
    mlflow_uri: str = ""          # an MLflow tracking URI: file:///..., http://server ("" = no MLflow)
    experiment: str = ""          # MLflow experiment (one per sweep)
    run_name: str = ""            # the trial id, "finetune", the run directory's name
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_dir(cls, out_dir: str | os.PathLike, experiment: str, run_name: str, mlflow_uri: str | None = None,
                **tags: str) -> "TrackingConfig":
        """The default layout under `out_dir` (module docstring); `mlflow_uri` "off" turns MLflow off.
        `out_dir` may be a URI (resnet_dist.storage): TensorBoard's events then go there (each
        run writes a local copy and uploads it after every epoch), and the default MLflow store
        is a file store there when the URI is a file system (file://), else off: MLflow cannot
        keep a file store in a bucket, so an object store needs `--mlflow-uri` of a server."""
        if storage.is_uri(out_dir):
            target = str(out_dir)
            default = f"file://{storage.filesystem(storage.join(target, 'mlruns'))[1]}" \
                if target.startswith("file://") else ""
            uri = default if mlflow_uri is None else ("" if mlflow_uri == "off" else mlflow_uri)
            return cls(storage.join(target, "tensorboard"), uri, experiment, run_name, dict(tags))
        out = Path(out_dir).resolve()
        uri = (out / "mlruns").as_uri() if mlflow_uri is None else ("" if mlflow_uri == "off" else mlflow_uri)
        return cls(str(out / "tensorboard"), uri, experiment, run_name, dict(tags))


# Entries of an output directory that tracking writes to a URI itself (resnet_dist.storage.Mirror skips them).
REMOTE_ENTRIES = ("tensorboard", "mlruns")
# ... and what Ray Train writes into a run directory itself (its checkpoints and their state),
# with the driver's lock, which stays with the local copy.
TRAIN_RUN_ENTRIES = ("checkpoint_*", ".validate_storage_marker", ".driver.lock", *REMOTE_ENTRIES)


def check_mlflow_uri(uri: str | None) -> None:
    """Fail fast, at the entry point, on an MLflow URI that cannot be used: one ConfigError line,
    instead of every trial's worker retrying a dead server for minutes. The default (None),
    "off" and file stores need no check."""
    if uri is None or uri == "off" or uri.startswith("file:"):
        return
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}   # this probe only
    saved = {k: os.environ.get(k) for k in probe}
    os.environ.update(probe)
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as e:   # MlflowException, connection errors, unknown schemes
        raise ConfigError(f"--mlflow-uri {uri}: cannot use it ({' '.join(str(e).split())[:200]})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": "0.1"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


# A file-store run whose meta.yaml is still empty this long after it was made was cut short
# by a kill while MLflow created it (it writes the file at once); seconds.
BROKEN_RUN_AGE_S = 10.0


def set_aside_broken_runs(root: Path) -> list[Path]:
    """Move runs with an empty meta.yaml (a process SIGKILLed while MLflow created them) to
    ROOT.broken/ beside it (not inside: the file store reads every directory there as an
    experiment): the file store otherwise fails every later search of their experiment
    (`'NoneType' object has no attribute 'copy'`), and a resumed sweep could never log again."""
    moved = []
    for meta in root.glob("*/*/meta.yaml"):
        try:
            st = meta.stat()
        except OSError:
            continue
        if st.st_size == 0 and time.time() - st.st_mtime > BROKEN_RUN_AGE_S:
            run = meta.parent
            dest = root.with_name(root.name + ".broken") / f"{run.parent.name}-{run.name}"
            dest.parent.mkdir(exist_ok=True)
            try:
                run.rename(dest)
                moved.append(dest)
            except OSError:   # another process moved it first
                pass
    return moved


def _client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked; it
        # is what works with no server and on a shared file system (one directory per run).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from urllib.parse import unquote, urlparse

        root = Path(unquote(urlparse(uri).path))
        if root.is_dir():
            set_aside_broken_runs(root)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    """The experiment's id, created if missing (two trials may race to create it)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:   # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(client, experiment: str, run_name: str) -> str | None:
    """The id of the MLflow run tagged with `run_name` in `experiment`, if there is one."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1)
    return runs[0].info.run_id if runs else None


class Tracker:
    """One run's TensorBoard writer and MLflow run; `log_epoch` after every report."""

    def __init__(self, cfg: TrackingConfig, params: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.writer = None
        self.client = None
        self.run_id: str | None = None
        self._tb_mirror: storage.Mirror | None = None
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # A URI: events go to a local copy, uploaded after every epoch and at the end.
            self._tb_mirror = storage.Mirror(storage.join(cfg.tensorboard_dir, cfg.run_name))
            self.writer = SummaryWriter(log_dir=str(self._tb_mirror.local), flush_secs=10)
        if cfg.mlflow_uri:
            self.client = _client(cfg.mlflow_uri)
            self.run_id = find_run(self.client, cfg.experiment, cfg.run_name)
            if self.run_id is None:
                run = self.client.create_run(experiment_id(self.client, cfg.experiment), run_name=cfg.run_name,
                                             tags={RUN_TAG: cfg.run_name, **cfg.tags})
                self.run_id = run.info.run_id
                if params:
                    from mlflow.entities import Param

                    self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in flatten(params).items()])
            else:
                self.client.update_run(self.run_id, status="RUNNING")

    def log_epoch(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """Scalars of one epoch record (resnet_dist.training.epoch_record); step = its epoch unless given."""
        step = int(record["epoch"]) if step is None else step
        values = {k: float(record[k]) for k in SCALARS if k in record}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(SCALARS[k], v, step)
            self.writer.flush()
            self._tb_mirror.push()
        if self.client is not None:
            _log_metrics(self.client, self.run_id, values, step)

    def log_metrics(self, values: Mapping[str, float]) -> None:
        """Run-level figures (test accuracy before/after); MLflow only."""
        if self.client is not None:
            _log_metrics(self.client, self.run_id, values)

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
            self._tb_mirror.push()
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)


def _log_metrics(client, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
    """One MLflow batch of metrics at `step`; NaN and infinities are left out ("before" is not a
    number when fine-tuning changed the classes, and MLflow's UI cannot plot one)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()
                                      if math.isfinite(float(v))])


def _find(cfg: TrackingConfig, run_name: str):
    """(client, run id) of the MLflow run `run_name` in `cfg`'s experiment, or None."""
    if not cfg.mlflow_uri:
        return None
    client = _client(cfg.mlflow_uri)
    run_id = find_run(client, cfg.experiment, run_name)
    return (client, run_id) if run_id else None


def log_artifacts(cfg: TrackingConfig, run_name: str, paths: list[str | os.PathLike],
                  metrics: Mapping[str, float] | None = None) -> bool:
    """Attach files (best.pt, finetuned.pt, report.md) and run-level figures (test accuracy) to
    the MLflow run `run_name`; False when MLflow is off or there is no such run."""
    found = _find(cfg, run_name)
    if found is None:
        return False
    client, run_id = found
    if metrics:
        _log_metrics(client, run_id, metrics)
    for p in paths:
        if Path(p).is_file():
            client.log_artifact(run_id, str(p))
    return True


class TrackerSink(Sink):
    """A sink of the training loop (resnet_dist.training) that tracks every report: at its
    epoch as the step, or, for reports between epoch ends (train.report_every_images), at the
    run's optimizer step."""

    def __init__(self, tracker: Tracker, per_epoch: bool = True) -> None:
        self.tracker, self.per_epoch = tracker, per_epoch

    def report(self, record, history, checkpoint) -> None:
        self.tracker.log_epoch(record, None if self.per_epoch else int(record["step"]))

    def close(self) -> None:
        self.tracker.close()


def run_tracked(cfg: TrackingConfig, params: Mapping[str, Any], fn: Callable[[Sink], Any],
                metrics: Callable[[Any], Mapping[str, float]] | None = None, per_epoch: bool = True) -> Any:
    """Run a local loop, `fn(sink)`, with its reports tracked; the run is closed FINISHED with
    `metrics(result)` logged, or FAILED if `fn` raises. Returns what `fn` returned."""
    tracker = Tracker(cfg, params)
    try:
        result = fn(TrackerSink(tracker, per_epoch))
    except BaseException:
        tracker.close("FAILED")
        raise
    if metrics is not None:
        tracker.log_metrics(metrics(result))
    tracker.close()
    return result
