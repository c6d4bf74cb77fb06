"""Scale an autoscaling Ray cluster up to N GPUs, wait for them, then run a command.

The sweep sizes its trials to the GPUs the cluster has when it starts
(`plan_resources` in cluster/tune.py: trials at once = GPUs // workers per
trial), so on a cluster whose GPU worker group starts small it would run far
fewer trials at once than it could. Run it through this instead:

    python k8s/wait_for_gpus.py --gpus 32 --bundle-gpus 4 --timeout 1800 -- \
        python jobs/sweep.py --preset cluster ...

It asks the Ray autoscaler for `--gpus / --bundle-gpus` nodes' worth of GPUs
(`ray.autoscaler.sdk.request_resources`, bundles of `--bundle-gpus` GPUs, i.e.
whole GPU nodes), waits until the cluster has them or `--timeout` passes (then
goes on with what is there), runs the command, and finally withdraws the
request so that idle nodes can be scaled down again. The exit code is the
command's. `--gpus 0` with no command withdraws a request left behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs to ask for and wait for (0 = withdraw the request)")
    p.add_argument("--bundle-gpus", type=int, default=1,
                   help="GPUs per requested bundle: the GPUs of one worker node (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait before going on with the GPUs there are (default: %(default)s)")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between checks (default: %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if args.gpus < 0 or args.bundle_gpus < 1 or args.gpus % args.bundle_gpus:
        p.error(f"--gpus must be a multiple of --bundle-gpus >= 1, got {args.gpus} and {args.bundle_gpus}")
    if args.gpus and not args.command:
        p.error("no command to run: put it after --")
    return args


def _connect() -> None:
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="WARNING", log_to_driver=False)


def _request(gpus: int, bundle_gpus: int) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": bundle_gpus}] * (gpus // bundle_gpus))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    _connect()
    _request(args.gpus, args.bundle_gpus)
    if not args.gpus:
        print("wait_for_gpus: GPU request withdrawn", flush=True)
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        have = float(ray.cluster_resources().get("GPU", 0))
        if have >= args.gpus or time.monotonic() >= deadline:
            break
        print(f"wait_for_gpus: {have:g} of {args.gpus} GPUs in the cluster, waiting", flush=True)
        time.sleep(args.poll)
    print(f"wait_for_gpus: the cluster has {have:g} GPUs (asked for {args.gpus}); running {' '.join(args.command)}",
          flush=True)
    ray.shutdown()   # the command connects by itself

    child = subprocess.Popen(args.command)
    # `ray job stop` and pod shutdown send SIGTERM to this process: pass it on.
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    try:
        _connect()
        _request(0, 1)   # withdraw: idle GPU nodes may go again
        ray.shutdown()
    except Exception as e:   # the command's exit code matters more than the clean-up
        print(f"wait_for_gpus: could not withdraw the GPU request: {e}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
