"""Where a served request's time goes, in three small measurements (docs/benchmarks.md):

    python bench/serve_overhead.py --checkpoint runs/sweep

(a) the load generator's own CPU per request: httpx against aiohttp, POSTing a
    2.3 kB body at concurrency 8 to a trivial local aiohttp server (process CPU
    time, so other load on the machine matters little);
(b) sequential latency on one keep-alive connection (http.client) of the Serve
    app: `GET /-/healthz` (the proxy answers), `GET /healthz` (a round trip to
    the replica) and `POST /v1/predict` with batching off;
(c) raw in-process inference at several batch sizes, 1 thread: the most that
    batching can gain for this model on this CPU.
Prints one JSON line. Joins RAY_ADDRESS or a running local Ray, else starts one.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import time

import numpy as np
from serve_load import encode_png, payload_images, raw_predictor, raw_throughput

CLIENT_SERVER = """
from aiohttp import web
async def handle(request):
    await request.read()
    return web.json_response({"predictions": [{"class": "cat", "index": 3, "probability": 0.5}] * 5})
app = web.Application()
app.router.add_post("/v1/predict", handle)
web.run_app(app, host="127.0.0.1", port=%d, print=None)
"""


def client_cpu(port: int, requests: int, concurrency: int) -> dict[str, float]:
    """ms of this process's CPU per request, for httpx and aiohttp (best of two rounds each)."""
    import aiohttp
    import httpx

    server = subprocess.Popen([sys.executable, "-c", CLIENT_SERVER % port])
    body, url = os.urandom(2300), f"http://127.0.0.1:{port}"
    headers = {"Content-Type": "image/png"}

    async def with_httpx() -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            async def user() -> None:
                for _ in range(requests // concurrency):
                    (await c.post("/v1/predict", content=body, headers=headers)).read()
            await asyncio.gather(*(user() for _ in range(concurrency)))

    async def with_aiohttp() -> None:
        async with aiohttp.ClientSession(url) as s:
            async def user() -> None:
                for _ in range(requests // concurrency):
                    async with s.post("/v1/predict", data=body, headers=headers) as r:
                        await r.read()
            await asyncio.gather(*(user() for _ in range(concurrency)))

    try:
        for _ in range(100):   # wait for the server to listen
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                break
            except OSError:
                time.sleep(0.1)
        out: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
        for _ in range(2):
            for name, run in (("httpx", with_httpx), ("aiohttp", with_aiohttp)):
                cpu = time.process_time()
                asyncio.run(run())
                out[name].append((time.process_time() - cpu) / requests * 1000)
        return {name: round(min(v), 3) for name, v in out.items()}
    finally:
        server.kill()


def sequential_latency(port: int, png: bytes, n: int) -> dict[str, float]:
    """p50 ms of `n` sequential requests per route on one connection (after 20 warm-up requests)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    routes = {"GET /-/healthz": ("GET", "/-/healthz", None, {}), "GET /healthz": ("GET", "/healthz", None, {}),
              "POST /v1/predict": ("POST", "/v1/predict", png, {"Content-Type": "image/png"})}
    out = {}
    for name, (method, path, body, headers) in routes.items():
        times = []
        for i in range(20 + n):
            t = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"error: {name} answered {r.status}")
            if i >= 20:
                times.append(time.perf_counter() - t)
        out[name] = round(float(np.percentile(np.asarray(times) * 1000, 50)), 2)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run dir (best.pt) or sweep dir")
    p.add_argument("--data", default="data/cifar10", help="prepared data set whose test images are used")
    p.add_argument("--port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--client-port", type=int, default=18123, help="port of the trivial server of (a)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    args = p.parse_args(argv)

    from resnet_dist.checkpoint import CheckpointError, load_checkpoint
    from termui.cli import die
    from resnet_dist.inference import resolve_checkpoint

    try:
        checkpoint = str(resolve_checkpoint(args.checkpoint))
        load_checkpoint(checkpoint)
    except CheckpointError as e:
        die(str(e))
    images, _ = payload_images(args.data)
    result = {"client_cpu_ms_per_request": client_cpu(args.client_port, 2000, 8)}

    from ray import serve

    from cluster.runtime import connect
    from cluster.serve import ServeConfig
    from cluster.serve_deploy import deploy

    connect()
    cfg = ServeConfig(checkpoint=checkpoint, name="serve-overhead", max_batch_size=1, port=args.port, access_log=False)
    deploy(cfg)
    try:
        result["sequential_p50_ms"] = sequential_latency(args.port, encode_png(images[0]), 200)
    finally:
        serve.delete(cfg.name)
    served = raw_predictor(checkpoint, 1, cfg.torchscript)   # the replica's model
    result["raw_images_per_s"] = {b: raw_throughput(served, images, b, 3.0)["images_per_s"] for b in args.batch_sizes}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
