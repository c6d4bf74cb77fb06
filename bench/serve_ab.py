"""Ray Serve against the plain peer with the load generated outside the Ray driver, and with
Ray's direct-ingress fast path switched on by request headers (docs/benchmarks.md):

    python bench/serve_ab.py --checkpoint runs/bench-ft [--levels 16 32] [--seconds 8] [--rounds 2]

bench/serve_load.py's clients run in the process that started Ray and deployed the app. Here
each measurement is a fresh client process (closed-loop aiohttp, the same PNG payloads), so
the driver's own threads cannot tax the clients. At each level and round, three runs back to back:
Serve; Serve with `x-request-disconnect-disabled: ?1` and `x-request-timeout-seconds: 0`, the
two headers under which a direct-ingress replica awaits the app without its receive and
request tasks (ray/serve/_private/replica.py `_direct_ingress_asgi`); and the peer
(bench/plain_server.py). Reports req/s, p50 and the client's CPU ms per request, then one JSON line.
Joins RAY_ADDRESS or a running local Ray, else starts one with the project's ingress (HAProxy + direct ingress).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
from serve_load import INGRESS_ENV, PNG, closed_loop, encode_png, payload_images, start_peer  # noqa: E402

FAST_PATH = {**PNG, "x-request-disconnect-disabled": "?1", "x-request-timeout-seconds": "0"}


async def client(port: int, concurrency: int, seconds: float, fast: bool, data: str) -> dict:
    import aiohttp

    images, _ = payload_images(data)
    payloads = [encode_png(im) for im in images]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=aiohttp.TCPConnector(limit=256)) as c:
        await closed_loop(c, payloads, 4, 1.0, 10**9)   # warm-up: connections
        before = resource.getrusage(resource.RUSAGE_SELF)
        r = await closed_loop(c, payloads, concurrency, seconds, 10**9, headers=FAST_PATH if fast else PNG)
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"requests": r["requests"], "errors": r["errors"], "req_per_s": r["throughput_rps"],
            "p50_ms": r["p50_ms"], "client_cpu_ms_per_request": round(1000 * cpu_s / max(1, r["requests"]), 3)}


def measure(port: int, concurrency: int, seconds: float, fast: bool, data: str) -> dict:
    """One client process's run; its JSON line back."""
    cmd = [sys.executable, os.path.abspath(__file__), "--client", str(port), str(concurrency), str(seconds), data]
    out = subprocess.run(cmd + (["--fast"] if fast else []), capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"client process failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--client"]:   # a client process of measure()
        port, n, secs, data = sys.argv[2:6]
        print(json.dumps(asyncio.run(client(int(port), int(n), float(secs), "--fast" in sys.argv, data))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run dir (best.pt) or sweep dir")
    p.add_argument("--data", default="data/cifar10", help="prepared data set whose test images are sent")
    p.add_argument("--levels", type=int, nargs="+", default=[16, 32], help="client concurrencies")
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each run, s (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all levels (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--peer-port", type=int, default=8100)
    args = p.parse_args(argv)
    if min(args.levels) < 1 or args.seconds <= 0 or args.rounds < 1:
        p.error("--levels must be >= 1, --seconds > 0 and --rounds >= 1")

    from ray import serve

    from cluster.runtime import connect
    from cluster.serve import ServeConfig
    from cluster.serve_deploy import deploy
    from resnet_dist.checkpoint import CheckpointError
    from resnet_dist.inference import load_predictor
    from termui.cli import die

    try:
        load_predictor(args.checkpoint)   # a missing or corrupt file: one line here, not a failed deploy
    except CheckpointError as e:
        die(str(e))
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.update(INGRESS_ENV["haproxy"])
    connect()
    cfg = ServeConfig(checkpoint=args.checkpoint, name="serve-ab", host="127.0.0.1", port=args.port, access_log=False)
    deploy(cfg)
    peer, rows = None, []
    try:
        peer = start_peer(argparse.Namespace(peer_port=args.peer_port), cfg)
        for rnd in range(args.rounds):
            for n in args.levels:
                for server, port, fast in (("Serve", args.port, False), ("Serve, fast-path headers", args.port, True),
                                           ("peer", args.peer_port, False)):
                    row = {"round": rnd, "concurrency": n, "server": server, **measure(port, n, args.seconds, fast, args.data)}
                    rows.append(row)
                    print(f"{time.strftime('%H:%M:%S')} round {rnd} c={n:<3} {server:<25} {row['req_per_s']:8.1f} req/s  "
                          f"p50 {row['p50_ms']:6.1f} ms  client {row['client_cpu_ms_per_request']:.3f} ms/req  "
                          f"errors {row['errors']}", flush=True)
    finally:
        if peer:
            peer.terminate()
            peer.wait(timeout=30)
        serve.delete(cfg.name)
    peak = {s: max(r["req_per_s"] for r in rows if r["server"] == s) for s in {r["server"] for r in rows}}
    print(json.dumps({"rows": rows, "peak_req_per_s": peak,
                      "serve_over_peer_peak": round(peak["Serve"] / peak["peer"], 3),
                      "fast_path_over_serve_peak": round(peak["Serve, fast-path headers"] / peak["Serve"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
