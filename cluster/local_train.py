"""`jobs/train.py --local`: the one training loop in this process, tracked, into a run
directory or URI; no Ray (it is imported by none of this)."""

from __future__ import annotations

from resnet_dist.config import RunConfig


def run_local(cfg: RunConfig, run_dir: str, threads: int, mlflow_uri: str | None = None, restart: bool = False) -> dict:
    import torch

    from cluster.tracking import TRAIN_EXPERIMENT, TRAIN_RUN_ENTRIES, TrackingConfig, log_artifacts, run_tracked
    from resnet_dist.checkpoint import BEST_CHECKPOINT
    from resnet_dist.data import read_manifest
    from resnet_dist.identity import claim_mirrored, run_identity
    from resnet_dist.storage import Mirror
    from resnet_dist.local import fit_local
    from resnet_dist.training import Sinks
    from termui.console import RichProgress, console

    if threads:
        torch.set_num_threads(threads)
    console.print(f"[bold]local training[/bold] {cfg.model.flavor} x{cfg.model.width}, {cfg.train.epochs} epochs, "
                  f"batch {cfg.train.batch_size}, {torch.get_num_threads()} threads -> {run_dir}")
    mirror = Mirror(run_dir, skip=TRAIN_RUN_ENTRIES)   # a URI: a local copy, pushed at the end
    out = mirror.local
    with mirror:
        # Before tracking opens its files in the run directory: --restart moves them aside.
        claim_mirrored(mirror, run_identity(cfg.to_dict(), read_manifest(cfg.data.data_dir)["fingerprint"]), "run",
                       restart)
        tracking = TrackingConfig.for_dir(mirror.target, TRAIN_EXPERIMENT, out.name, mlflow_uri)
        summary = run_tracked(tracking, {"config": cfg.to_dict()},
                              lambda sink: fit_local(cfg, out, Sinks(RichProgress(), sink)),
                              lambda s: {"test_acc": s["test"]["accuracy"]}, per_epoch=not cfg.train.report_every_images)
    log_artifacts(tracking, out.name, [out / BEST_CHECKPOINT, out / "metrics.json"])
    return summary
