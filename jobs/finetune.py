"""Fine-tune a checkpoint (a sweep's selected best.pt by default) on CIFAR-10 or on your own
images, on Ray Train (or in this process with --local), and evaluate it on the test split
before and after: accuracy, per-class precision/recall, confusion matrix.

    python jobs/finetune.py --checkpoint runs/sweep --data my_photos/ --mode head --out runs/photos
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/finetune.py --data "$PWD/my_photos" ...

--data is prepared Parquet (jobs/prepare_data.py) or an image folder/archive laid out as
SPLIT/<class>/*.png (train/ and test/; val/ is carved from train). The output directory
holds finetuned.pt and finetune.json, with or without --local; serve it with
`python jobs/serve.py OUT`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet_dist import storage
from resnet_dist.config import OPTIMIZERS, ConfigError
from resnet_dist.data import DataError
from termui.cli import die, job_parser


def main(argv=None) -> None:
    from cluster.finetune import finetune_job
    from cluster.tracking import check_mlflow_uri
    from resnet_dist.checkpoint import SOURCE_ORDER, CheckpointError, load_checkpoint, resolve_checkpoint
    from resnet_dist.config import FINETUNE_MODES, FinetuneConfig
    from resnet_dist.finetune import MIN_BATCH, MIN_STEPS, STEPS_PER_EPOCH
    from termui.console import console, print_eval_report

    own = FinetuneConfig()   # the defaults for a user's own data (resnet_dist.config)
    p = job_parser(__doc__, ray=True)
    p.add_argument("--checkpoint", default="runs/sweep", help="a .pt file, or a sweep/run directory (its best.pt); paths or URIs")
    p.add_argument("--data", default="data/cifar10", help="prepared Parquet data, or an image folder/archive")
    p.add_argument("--out", default="runs/finetune", help="output directory or URI (default: %(default)s)")
    p.add_argument("--mode", choices=FINETUNE_MODES, default=own.mode, help="what trains (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=0,
                   help=f"epochs (default 0: enough for {MIN_STEPS} optimizer steps at the batch below)")
    p.add_argument("--lr", type=float, default=own.lr, help="peak lr of the head (default: %(default)s)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=own.optimizer, help="(default: %(default)s)")
    p.add_argument("--backbone-lr-scale", type=float, default=own.backbone_lr_scale,
                   help="lr multiplier of pretrained layers that train (default: %(default)s)")
    p.add_argument("--reset-head", action=argparse.BooleanOptionalAction, default=own.reset_head,
                   help="a new head even for the same classes (always new for other classes)")
    p.add_argument("--probe-init", action=argparse.BooleanOptionalAction, default=own.probe_init,
                   help="for other classes, start the head from the linear probe on the frozen backbone "
                        "(LP-FT; the probe is also what 'before' reports) instead of random weights")
    p.add_argument("--subset", type=int, default=0, help="training images per epoch (0 = all)")
    p.add_argument("--batch-size", type=int, default=0,
                   help=f"global batch (default 0: about 1/{STEPS_PER_EPOCH} of the train images, "
                        f"{MIN_BATCH} to the checkpoint's batch)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: a file store in OUT/mlruns; off = none)")
    p.add_argument("--restart", action="store_true",
                   help="start afresh when OUT holds another fine-tuning (its files are kept aside)")
    args = p.parse_args(argv)

    # Absolute once, here: Ray Train's controller and workers run in other directories.
    data, out = Path(args.data).resolve(), storage.resolve(args.out)   # --out may be a URI (s3://...)
    ft = FinetuneConfig(mode=args.mode, reset_head=args.reset_head, backbone_lr_scale=args.backbone_lr_scale,
                        probe_init=args.probe_init, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                        subset=args.subset, batch_size=args.batch_size, data=str(data))
    try:
        ft.validate()
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        source = resolve_checkpoint(storage.resolve(args.checkpoint), SOURCE_ORDER)
        load_checkpoint(source)   # refuse a corrupt or foreign file before anything runs
        if not data.exists():
            raise DataError(f"fine-tuning data {data} does not exist")
        check_mlflow_uri(args.mlflow_uri)
        storage.Mirror(out).check_writable()
        summary = finetune_job(source, data, out, ft, args.workers, args.local, args.mlflow_uri, args.verbose,
                               args.restart)
    except (ConfigError, DataError, CheckpointError) as e:
        die(str(e))
    print_eval_report(summary["before"], f"test, before fine-tuning ({summary['before_kind']})")
    print_eval_report(summary["after"], "test, after fine-tuning")
    console.print(f"fine-tuned {args.mode} from {source} -> {out}")


if __name__ == "__main__":
    main()
