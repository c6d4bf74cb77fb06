"""The sweep's command line: every SweepConfig field as an option over a preset."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from cluster.sweep_config import PRESETS, SweepConfig
from resnet_dist.config import OPTIMIZERS, FinetuneConfig


def add_sweep_args(p) -> None:
    """Every SweepConfig field as an option; unset options keep the preset's value."""
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="local", help="base settings (default: %(default)s)")
    a("--name", help="sweep name: the directory under --storage; re-running the same name resumes it")
    a("--storage", help="where sweeps live: a local dir, a shared mount (NFS) or a URI (s3://bucket/prefix, gs://..., file://...); default: runs")
    a("--data", dest="data_dir", help="prepared Parquet data (default: data/cifar10)")
    a("--num-samples", type=int, help="trials to sample")
    a("--scheduler", choices=["halving", "asha"],
      help="halving: trials paused at each rung until all reach it (one or a few at a time); asha: asynchronous (many at once)")
    a("--max-epochs", type=int, help="epochs of a trial never stopped: the winner's whole training")
    a("--first-rung-images", type=int, help="training images at the first rung (then x the reduction factor)")
    a("--reduction-factor", type=int, help="keep 1/N of the trials at each rung")
    a("--val-subset", type=int, help="trials validate on N evenly spaced val images (0 = all)")
    a("--center-first", action=argparse.BooleanOptionalAction,
      help="the first trial is the centre of the search space (the preset's base recipe)")
    a("--workers-per-trial", type=int, help="Ray Train workers of each trial")
    a("--min-workers-per-trial", type=int,
      help="elastic trials: after a lost node, go on with as few workers as this (0 = fixed)")
    a("--max-concurrent", type=int, help="upper bound on trials at once (the cluster may allow fewer)")
    a("--train-subset", type=int, help="train images per epoch in the sweep (0 = all)")
    a("--seed", type=int, help="seed of the search")
    a("--data-path", choices=["auto", "pipeline", "device"],
      help="augment in the Ray Data pipeline, or on each worker's device after one read (auto: device on GPUs)")
    for name, kind in (("flavors", str), ("widths", float), ("blocks", str), ("optimizers", str),
                       ("momentum", float), ("batch-sizes", int), ("label-smoothing", float), ("schedules", str)):
        a(f"--{name}", nargs="+", type=kind, help=f"search space: {name} to choose from")
    a("--pads", nargs="+", type=int, help="search space: random-crop paddings to choose from, pixels")
    a("--lr-mult", nargs=2, type=float, metavar=("LOW", "HIGH"), help="log-uniform multiplier of the optimizer's base lr")
    a("--weight-decay", nargs=2, type=float, metavar=("LOW", "HIGH"), help="log-uniform weight decay range")
    a("--finetune-mode", choices=["head", "full", "last-stage"], help="what fine-tuning trains")
    a("--finetune-backbone-lr-scale", type=float, help="lr multiplier of the pretrained layers that train")
    a("--finetune-reset-head", action=argparse.BooleanOptionalAction,
      help="a new random head even when the classes are the same (it is always new for other classes)")
    a("--finetune-epochs", type=int, help="epochs of fine-tuning (0 = enough for 300 optimizer steps)")
    a("--finetune-lr", type=float, help="peak lr of fine-tuning (the head's; see --finetune-mode)")
    a("--finetune-optimizer", choices=OPTIMIZERS, help="optimizer of fine-tuning (default: the preset's)")
    a("--finetune-probe-init", action=argparse.BooleanOptionalAction,
      help="for other classes, start the head from the linear probe (LP-FT) instead of random weights")
    a("--finetune-data", help="an image folder/archive with its own classes (default: CIFAR-10 train+val)")
    a("--finetune-subset", type=int, help="fine-tuning images per epoch (0 = all)")
    a("--finetune-batch-size", type=int, help="global batch of fine-tuning (0 = ~1/20 of the images, "
                                              "16 to the selected trial's batch)")
    a("--serve", action=argparse.BooleanOptionalAction, help="deploy the fine-tuned model on Ray Serve at the end")
    a("--mlflow-uri", help="MLflow tracking URI, e.g. http://mlflow:5000 (default: a file store in the sweep "
                           "directory, mlruns/; off = no MLflow)")


def sweep_config_from_args(args) -> SweepConfig:
    cfg = PRESETS[args.preset]
    top = {k: getattr(args, k) for k in ("name", "storage", "data_dir", "num_samples", "workers_per_trial",
                                         "min_workers_per_trial",
                                         "max_concurrent", "train_subset", "seed", "data_path", "serve", "mlflow_uri",
                                         "val_subset", "center_first")
           if getattr(args, k) is not None}
    space = {k: tuple(getattr(args, k)) for k in ("flavors", "widths", "blocks", "optimizers", "momentum",
                                                   "batch_sizes", "label_smoothing", "schedules", "lr_mult",
                                                   "weight_decay", "pads") if getattr(args, k) is not None}
    rungs = {k: getattr(args, k) for k in ("scheduler", "max_epochs", "first_rung_images", "reduction_factor")
             if getattr(args, k) is not None}
    ft = {f.name: getattr(args, f"finetune_{f.name}") for f in fields(FinetuneConfig)
          if getattr(args, f"finetune_{f.name}") is not None}
    # User paths are made absolute once, here: trials, Train workers and the job's copy of
    # the code (ray job submit --working-dir) run in other directories.
    for d, key in ((top, "storage"), (top, "data_dir"), (ft, "data")):
        if d.get(key) and "://" not in d[key]:   # URIs are left as given (and refused in validate)
            d[key] = str(Path(d[key]).resolve())
    base_ft = cfg.finetune
    if ft.get("data"):
        # A user's own data: the measured own-data defaults (FinetuneConfig's) and a schedule
        # sized to it, not the preset's settings for CIFAR-10 train+val; options typed still win.
        base_ft = FinetuneConfig(subset=cfg.finetune.subset)
    cfg = replace(cfg, **top, space=replace(cfg.space, **space), rungs=replace(cfg.rungs, **rungs))
    return replace(cfg, finetune=replace(base_ft, **ft))
