"""Fine-tuning on Ray Train: resnet_dist.finetune's plan, run by Train workers, finished
with the same wrap-up and files as the local path (resnet_dist.outputs)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.resources import Resources
from cluster.tracking import REMOTE_ENTRIES, TrackingConfig, log_artifacts
from cluster.train import WorkerJob, report_logger, run_train
from resnet_dist import storage
from resnet_dist.checkpoint import FINETUNED_CHECKPOINT, PROBE_CHECKPOINT
from resnet_dist.config import FinetuneConfig
from resnet_dist.data import ensure_prepared
from resnet_dist.finetune import SUMMARY_FILE, finish_finetune, plan_finetune
from resnet_dist.local import FINETUNE_RUN_DIR
from resnet_dist.storage import Mirror

FINETUNE_RUN = "finetune"    # the Train run, TensorBoard run and MLflow run of fine-tuning
# What others write to a fine-tuning output URI directly: Ray Train's run, tracking.
FINETUNE_REMOTE = (FINETUNE_RUN_DIR.parts[0], ".driver.lock", *REMOTE_ENTRIES)


def finetune_on_ray(source: str, data: Path, out: Mirror, ft: FinetuneConfig, res: Resources,
                    tracking: TrackingConfig, name: str) -> dict[str, Any]:
    """Fine-tune the checkpoint `source` (a path or URI) on `data` (prepared Parquet, or an
    image folder or archive, prepared into out/finetune-data first) with every worker of `res`
    (fine-tuning runs alone: all the trial slots); writes finetuned.pt and finetune.json to
    `out` (a directory, or a URI's local mirror, pushed here) and returns the latter. `tracking`
    is the experiment the fine-tuning run joins."""
    from termui.console import console

    local = out.local
    local.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_prepared(data, local / "finetune-data")
    workers = res.workers * res.max_concurrent
    plan = plan_finetune(source, data_dir, local, ft, workers)
    if out.uri and plan.spec.init_checkpoint == str(local / PROBE_CHECKPOINT):
        # The linear probe is where training starts: workers on any node read it from the URI.
        out.push()
        plan = replace(plan, spec=replace(plan.spec, init_checkpoint=out.file(PROBE_CHECKPOINT)))
    run = plan.spec.run
    console.print(f"before fine-tuning ({plan.before_kind}): test accuracy {plan.before.accuracy:.2%}")
    console.print(f"fine-tuning ({ft.mode}): {run.train.epochs} epochs of {plan.spec.train_images:,} images at "
                  f"batch {run.train.batch_size}, {ft.optimizer} lr {ft.lr:g}")
    tracking = replace(tracking, run_name=FINETUNE_RUN, tags={"source": str(source)})
    job = WorkerJob(plan.spec, res.threads, tags={"run": f"{name}-finetune"}, data_path=res.data_path,
                    tracking=tracking.to_dict())
    run_path = local / FINETUNE_RUN_DIR
    tuned, _, history = run_train(job, replace(res, workers=workers), out.file(str(FINETUNE_RUN_DIR)), 1,
                                  report_logger(run_path, f"Fine-tuning ({ft.mode})", run.train.epochs))
    summary = finish_finetune(local, plan, tuned, history)
    out.push()
    log_artifacts(tracking, FINETUNE_RUN, [local / FINETUNED_CHECKPOINT, local / SUMMARY_FILE],
                  {"test_acc_before": summary["before"]["accuracy"], "test_acc_after": summary["after"]["accuracy"]})
    return summary


def finetune_job(source: str, data: Path, out: str, ft: FinetuneConfig, workers: int, local: bool,
                 mlflow_uri: str | None, verbose: bool = False, restart: bool = False) -> dict[str, Any]:
    """jobs/finetune.py after its checks: in this process (`local`) or on Ray Train, one driver
    at a time per output directory (a path or a URI, mirrored: resnet_dist.storage), which
    resumes only the same fine-tuning (`restart`: afresh, the old files set aside), tracked as
    the `finetune` run of OUT's experiment."""
    from cluster.lock import DriverLock
    from resnet_dist.identity import claim_mirrored

    # --local trains in this process: its checkpoints (train/finetune) are the mirror's to push.
    mirror = Mirror(out, skip=FINETUNE_REMOTE[1:] if local else FINETUNE_REMOTE)
    name = storage.name(mirror.target)
    tracking = TrackingConfig.for_dir(mirror.target, name, FINETUNE_RUN, mlflow_uri)
    with mirror, DriverLock(mirror.local, "fine-tuning output"):
        claim_mirrored(mirror, {"kind": "finetune", "source": str(source), "finetune": ft.to_dict()},
                       "fine-tuning output", restart)
        if local:
            from cluster.tracking import run_tracked
            from resnet_dist.local import finetune_local
            from resnet_dist.training import Sinks
            from termui.console import RichProgress

            summary = run_tracked(tracking, {"source": str(source), **ft.to_dict()},
                                  lambda sink: finetune_local(source, data, mirror.local, ft, Sinks(RichProgress(), sink)),
                                  lambda s: {"test_acc_before": s["before"]["accuracy"],
                                             "test_acc_after": s["after"]["accuracy"]})
            log_artifacts(tracking, FINETUNE_RUN, [mirror.local / FINETUNED_CHECKPOINT, mirror.local / SUMMARY_FILE])
            return summary
        from cluster.resources import plan_for_cluster
        from cluster.runtime import connect, set_verbose

        set_verbose(verbose)
        connect()
        return finetune_on_ray(source, data, mirror, ft, plan_for_cluster(workers), tracking, name)
