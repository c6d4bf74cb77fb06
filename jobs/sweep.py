"""The main job: a sweep over architecture and optimizer on Ray Tune (successive halving
with pauses, or ASHA; one-worker trials in their own process, larger ones on Ray Train),
then fine-tuning of the best checkpoint, evaluation before/after, a report, and
(with --serve) the fine-tuned model on Ray Serve.

    python jobs/sweep.py --preset local                 # a local Ray it starts itself
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/sweep.py --preset local

Re-running with the same --name and --storage resumes the sweep.
"""

from __future__ import annotations

from resnet_dist.checkpoint import CheckpointError
from resnet_dist.config import ConfigError
from resnet_dist.data import DataError
from termui.cli import die, job_parser


def main(argv=None) -> None:
    from cluster.runtime import set_verbose
    from cluster.sweep import run_sweep
    from cluster.sweep_config import validate
    from termui.console import console, print_eval_report
    from termui.sweep_args import add_sweep_args, sweep_config_from_args

    p = job_parser(__doc__, ray=True)
    add_sweep_args(p)
    p.add_argument("--restart", action="store_true",
                   help="start the sweep afresh when --name holds one with another config (its files are kept aside)")
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    cfg = sweep_config_from_args(args)
    try:
        validate(cfg)
    except (ConfigError, DataError) as e:
        die(str(e))
    try:
        summary = run_sweep(cfg, console, args.restart)
    except (ConfigError, DataError, CheckpointError) as e:   # e.g. an unreadable --finetune-data folder
        die(str(e))
    print_eval_report(summary["before"], f"test, before fine-tuning ({summary['before_kind']})")
    print_eval_report(summary["after"], "test, after fine-tuning")
    console.print(f"{summary['stopped_early']} of {len(summary['trials'])} trials stopped at a rung; "
                  f"report: {summary['report']} ({summary['seconds']:.0f} s)", soft_wrap=True)
    if cfg.serve:
        from cluster.probe import serve_and_probe

        serve_and_probe(cfg, console)


if __name__ == "__main__":
    main()
