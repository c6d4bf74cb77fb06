"""Serve a checkpoint over HTTP with Ray Serve (API: docs/serving.md).

    python jobs/serve.py runs/train-X                 # a run dir (best.pt), a checkpoint file or a sweep dir
    python jobs/serve.py sweeps/s1 --replicas 2 --max-batch-size 32 --batch-wait-ms 5
    python jobs/serve.py sweeps/s1 --print-config     # the pinned Serve application, for a RayService

With RAY_ADDRESS set (a `ray job submit` job, or a `ray start` cluster named
explicitly) the app is deployed there and this script exits; the app keeps
running until `serve shutdown`. Without RAY_ADDRESS the script starts (or
joins) a local Ray and blocks until Ctrl-C, then shuts Serve down -- a Ray
started here dies with this process anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from resnet_dist.checkpoint import CheckpointError, load_checkpoint
from termui.cli import add_serve_args, die, job_parser
from resnet_dist.config import ConfigError
from resnet_dist.inference import resolve_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__, ray=True)
    p.add_argument("checkpoint", help="checkpoint file, run directory or sweep directory; a path or a URI (s3://...)")
    add_serve_args(p)   # --replicas, --max-batch-size, --batch-wait-ms, --num-cpus, --threads, --port
    p.add_argument("--max-replicas", type=int, default=0, help="autoscale up to this many replicas (0 = fixed)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: %(default)s)")
    p.add_argument("--api-key-file", default="", help="require the key in this file on /v1/* (default: open)")
    p.add_argument("--print-config", action="store_true",
                   help="print the application as a Serve config (JSON, which is YAML; checkpoint_id pinned) and exit")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        load_checkpoint(resolve_checkpoint(args.checkpoint))   # fail fast, before Ray starts
        from cluster.serve import ServeConfig, read_api_key
        from cluster.serve_deploy import deploy

        cfg = ServeConfig(
            checkpoint=args.checkpoint, replicas=args.replicas, max_replicas=args.max_replicas,
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
            num_cpus=args.num_cpus, num_gpus=args.num_gpus, threads=args.threads, host=args.host, port=args.port,
            api_key_file=args.api_key_file, torchscript=not args.eager_model,
        ).validated()
        if cfg.api_key_file:
            read_api_key(cfg.api_key_file)   # unreadable or empty: say so here, not in a replica log
        if args.print_config:
            from cluster.serve_deploy import application_config

            # JSON is YAML too: it goes into a Serve config file or a RayService's serveConfigV2 as it is.
            print(json.dumps({"applications": [application_config(cfg)]}, indent=2))
            return
    except (CheckpointError, ConfigError) as e:
        die(str(e))
    from ray import serve

    from cluster.runtime import connect, set_verbose

    set_verbose(args.verbose)
    connect()
    try:
        url = deploy(cfg)
    except RuntimeError as e:   # Serve could not start the replicas (see the Ray logs)
        die(f"deployment failed: {e}", code=1)
    print(f"serving {args.checkpoint} at {url}  (API docs: {url}/docs)")
    print(f"  curl -s -H 'Content-Type: image/png' --data-binary @image.png {url}/v1/predict")
    if os.environ.get("RAY_ADDRESS"):
        print(f"deployed on {os.environ['RAY_ADDRESS']}; stop it with `serve shutdown` there")
        return
    print("Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
