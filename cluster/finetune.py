"""Fine-tuning on Ray Train: resnet_dist.finetune's plan, run by Train workers, finished
with the same wrap-up and files as the local path (resnet_dist.outputs)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.resources import Resources
from cluster.tracking import TrackingConfig, log_artifacts
from cluster.train import WorkerJob, report_logger, run_train
from resnet_dist.checkpoint import FINETUNED_CHECKPOINT
from resnet_dist.config import FinetuneConfig
from resnet_dist.data import ensure_prepared
from resnet_dist.finetune import SUMMARY_FILE, finish_finetune, plan_finetune
from resnet_dist.local import FINETUNE_RUN_DIR

FINETUNE_RUN = "finetune"    # the Train run, TensorBoard run and MLflow run of fine-tuning


def finetune_on_ray(source: Path, data: Path, out: Path, ft: FinetuneConfig, res: Resources,
                    tracking: TrackingConfig, name: str) -> dict[str, Any]:
    """Fine-tune the checkpoint `source` on `data` (prepared Parquet, or an image folder or
    archive, prepared into out/finetune-data first) with every worker of `res` (fine-tuning
    runs alone: all the trial slots); writes out/finetuned.pt and out/finetune.json and returns
    the latter. `tracking` is the experiment the fine-tuning run joins."""
    from termui.console import console

    out.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_prepared(data, out / "finetune-data")
    workers = res.workers * res.max_concurrent
    plan = plan_finetune(source, data_dir, out, ft, workers)
    run = plan.spec.run
    console.print(f"before fine-tuning ({plan.before_kind}): test accuracy {plan.before.accuracy:.2%}")
    console.print(f"fine-tuning ({ft.mode}): {run.train.epochs} epochs of {plan.spec.train_images:,} images at "
                  f"batch {run.train.batch_size}, {ft.optimizer} lr {ft.lr:g}")
    tracking = replace(tracking, run_name=FINETUNE_RUN, tags={"source": str(source)})
    job = WorkerJob(plan.spec, res.threads, tags={"run": f"{name}-finetune"}, data_path=res.data_path,
                    tracking=tracking.to_dict())
    run_path = out / FINETUNE_RUN_DIR
    tuned, _, history = run_train(job, replace(res, workers=workers), run_path, 1,
                                  report_logger(run_path, f"Fine-tuning ({ft.mode})", run.train.epochs))
    summary = finish_finetune(out, plan, tuned, history)
    log_artifacts(tracking, FINETUNE_RUN, [out / FINETUNED_CHECKPOINT, out / SUMMARY_FILE],
                  {"test_acc_before": summary["before"]["accuracy"], "test_acc_after": summary["after"]["accuracy"]})
    return summary


def finetune_job(source: Path, data: Path, out: Path, ft: FinetuneConfig, workers: int, local: bool,
                 mlflow_uri: str | None, verbose: bool = False, restart: bool = False) -> dict[str, Any]:
    """jobs/finetune.py after its checks: in this process (`local`) or on Ray Train, one driver
    at a time per output directory, which resumes only the same fine-tuning (`restart`: afresh,
    the old files set aside), tracked as the `finetune` run of OUT's experiment."""
    from cluster.lock import DriverLock
    from resnet_dist.identity import claim

    tracking = TrackingConfig.for_dir(out, out.name, FINETUNE_RUN, mlflow_uri)
    with DriverLock(out, "fine-tuning output"):
        claim(out, {"kind": "finetune", "source": str(source), "finetune": ft.to_dict()}, "fine-tuning output",
              restart)
        if local:
            from cluster.tracking import run_tracked
            from resnet_dist.local import finetune_local
            from resnet_dist.training import Sinks
            from termui.console import RichProgress

            summary = run_tracked(tracking, {"source": str(source), **ft.to_dict()},
                                  lambda sink: finetune_local(source, data, out, ft, Sinks(RichProgress(), sink)),
                                  lambda s: {"test_acc_before": s["before"]["accuracy"],
                                             "test_acc_after": s["after"]["accuracy"]})
            log_artifacts(tracking, FINETUNE_RUN, [out / FINETUNED_CHECKPOINT, out / SUMMARY_FILE])
            return summary
        from cluster.resources import plan_for_cluster
        from cluster.runtime import connect, set_verbose

        set_verbose(verbose)
        connect()
        return finetune_on_ray(source, data, out, ft, plan_for_cluster(workers), tracking, out.name)
