"""Load test of the Serve application, on loopback (127.0.0.1) only.

    python bench/serve_load.py --checkpoint runs/train-X
    python bench/serve_load.py --checkpoint runs/train-X --levels 1 4 --level-seconds 1 \\
        --raw-seconds 1 --soak-seconds 5 --malformed 40          # smoke run, < 1 minute

Closed-loop clients (asyncio + aiohttp; each sends its next request when the
last one is answered) at rising concurrency measure throughput and p50/p95/p99
latency of POST /v1/predict with (a) dynamic batching on and (b) off
(max_batch_size=1, set live); (c) is the raw in-process throughput of the
same model with the same thread count, the ceiling the server can approach.
The clients share the server's cores, so their cost counts: aiohttp spends
about 0.15 ms of CPU per request here, httpx 1.2-1.4 ms (bench/serve_overhead.py).
Then a soak sends valid requests open-loop at half the peak throughput of (a)
with malformed requests spread evenly among them, and checks that every
malformed one got its 4xx, nothing got a 5xx, and no replica restarted.
Prints rich tables and, last, one JSON line. Exit code 1 if the soak failed.
Joins RAY_ADDRESS or a running local Ray, else starts one (cluster.runtime.connect).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import struct
import sys
import time
import zlib
from collections import Counter
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

PNG = {"Content-Type": "image/png"}
MAX_IN_FLIGHT = 256   # open-loop soak: cap on outstanding requests, so a stall cannot pile up unboundedly


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run dir (best.pt) or sweep dir")
    p.add_argument("--data", default="data/cifar10", help="prepared data set whose test images are sent "
                                                          "(random images if missing; default: %(default)s)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="client concurrencies")
    p.add_argument("--level-seconds", type=float, default=10.0, help="duration of each level, s (default: %(default)s)")
    p.add_argument("--max-requests", type=int, default=20_000, help="request cap per level (default: %(default)s)")
    p.add_argument("--raw-seconds", type=float, default=5.0, help="duration of each raw measurement, s")
    p.add_argument("--soak-seconds", type=float, default=60.0, help="soak duration, s (default: %(default)s)")
    p.add_argument("--malformed", type=int, default=1000, help="malformed requests in the soak (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=16, help="batching-on max batch size (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="batch wait timeout, ms (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per replica (0 = num-cpus)")
    p.add_argument("--port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1 (default: %(default)s)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- payloads


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def payload_images(data_dir: str, n: int = 256) -> tuple[np.ndarray, str]:
    from resnet_dist.arrays import DataError
    from resnet_dist.parquet import read_split

    try:
        return read_split(data_dir, "test").images[:n], f"{data_dir} test split"
    except (DataError, OSError):
        return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "random 32x32 images"


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but that holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def malformed_requests(max_body: int, max_images: int) -> list[tuple[str, str, dict, int]]:
    """(name, path, request arguments, expected status) for each kind of bad request."""
    octet = {"Content-Type": "application/octet-stream"}
    return [
        ("not an image", "/v1/predict", {"data": b"hello world", "headers": octet}, 400),
        ("empty body", "/v1/predict", {"data": b"", "headers": octet}, 400),
        ("wrong type", "/v1/predict", {"data": b"x", "headers": {"Content-Type": "text/plain"}}, 415),
        ("bomb 20000^2", "/v1/predict", {"data": bomb_png(20000, 20000), "headers": PNG}, 400),
        ("too big", "/v1/predict", {"data": b"\0" * (max_body + 1), "headers": octet}, 413),
        ("bad JSON", "/v1/predict/batch", {"data": b"{nope", "headers": {"Content-Type": "application/json"}}, 400),
        ("bad base64", "/v1/predict/batch", {"json": {"images": ["%%%"]}}, 400),
        ("too many", "/v1/predict/batch",
         {"json": {"images": [base64.b64encode(b"x").decode()] * (max_images + 1)}}, 413),
    ]


# --------------------------------------------------------------------------- load generators


def summarize(latencies: list[float], statuses: Counter, seconds: float) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    ok = statuses.get(200, 0)
    return {"requests": sum(statuses.values()), "ok": ok, "errors": sum(statuses.values()) - ok,
            "throughput_rps": round(ok / seconds, 1) if seconds else 0.0,
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}}


async def post(client: aiohttp.ClientSession, path: str, **kwargs) -> int | str:
    """POST and read the whole response; its status, or "transport error"."""
    try:
        async with client.post(path, **kwargs) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return "transport error"


async def closed_loop(client: aiohttp.ClientSession, payloads: list[bytes], concurrency: int,
                      seconds: float, max_requests: int) -> dict[str, Any]:
    latencies, statuses = [], Counter()
    deadline = time.perf_counter() + seconds

    async def user(i: int) -> None:
        while time.perf_counter() < deadline and len(latencies) < max_requests:
            t = time.perf_counter()
            statuses[await post(client, "/v1/predict", data=payloads[i % len(payloads)], headers=PNG)] += 1
            latencies.append(time.perf_counter() - t)
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(concurrency)))
    return {"concurrency": concurrency, **summarize(latencies, statuses, time.perf_counter() - start)}


async def soak(client: aiohttp.ClientSession, payloads: list[bytes], rate: float, seconds: float,
               bad: list[tuple[str, str, dict, int]], n_bad: int) -> dict[str, Any]:
    """Open loop: valid requests at `rate`/s and `n_bad` malformed ones, both spread evenly over `seconds`."""
    schedule = [(i / rate, None) for i in range(int(rate * seconds))]
    schedule += [((j + 0.5) * seconds / n_bad, bad[j % len(bad)]) for j in range(n_bad)] if n_bad else []
    schedule.sort(key=lambda s: s[0])
    latencies, statuses, unexpected = [], Counter(), Counter()
    limit = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def send(i: int, kind) -> None:
        async with limit:
            t = time.perf_counter()
            if kind is None:
                status = await post(client, "/v1/predict", data=payloads[i % len(payloads)], headers=PNG)
            else:
                status = await post(client, kind[1], **kind[2])
            statuses[status] += 1
            if kind is None:
                latencies.append(time.perf_counter() - t)
                if status != 200:
                    unexpected[f"valid -> {status}"] += 1
            elif status != kind[3]:
                unexpected[f"{kind[0]} -> {status}"] += 1

    start, tasks = time.perf_counter(), []
    for i, (at, kind) in enumerate(schedule):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(send(i, kind)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    valid = Counter({200: statuses.get(200, 0), "other": len(latencies) - statuses.get(200, 0)})
    return {"target_rps": round(rate, 1), "seconds": round(elapsed, 1), "malformed": n_bad,
            **summarize(latencies, valid, elapsed),
            "status_counts": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "unexpected": dict(unexpected),
            "server_errors_5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500)}


def raw_throughput(checkpoint: str, images: np.ndarray, batch_size: int, threads: int, seconds: float) -> dict[str, Any]:
    """Images/s of predict_top_k in this process (no HTTP, no decoding) at one batch size."""
    import torch

    from resnet_dist.inference import load_predictor, predict_top_k

    torch.set_num_threads(threads)
    p = load_predictor(checkpoint, torch.device("cpu"))
    batch = np.resize(images, (batch_size, *images.shape[1:]))
    predict_top_k(p, batch, 5)   # warm-up
    calls, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        predict_top_k(p, batch, 5)
        calls.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    ms = np.asarray(calls) * 1000
    return {"batch_size": batch_size, "threads": threads, "calls": len(calls),
            "images_per_s": round(len(calls) * batch_size / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def replica_ids(app: str) -> set[str]:
    """Ids of the app's live replica actors (named SERVE_REPLICA::app#deployment#id); a restart shows as a new id."""
    import ray

    from cluster.serve import DEPLOYMENT_NAME

    prefix = f"SERVE_REPLICA::{app}#{DEPLOYMENT_NAME}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


# --------------------------------------------------------------------------- report


def level_table(title: str, rows: list[dict[str, Any]]) -> Table:
    t = Table(title=title)
    for col in ("concurrency", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["concurrency"]), str(r["requests"]), str(r["errors"]), f"{r['throughput_rps']:.1f}",
                  f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}")
    return t


def raw_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="(c) raw in-process inference (no HTTP, no decoding)")
    for col in ("batch", "threads", "images/s", "p50 ms/call", "p99 ms/call"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["batch_size"]), str(r["threads"]), f"{r['images_per_s']:.0f}", f"{r['p50_ms']:.2f}",
                  f"{r['p99_ms']:.2f}")
    return t


def soak_table(s: dict[str, Any], peak: float) -> Table:
    t = Table(title=f"soak at {s['target_rps']} req/s (half of peak {peak:.1f}) for {s['seconds']} s")
    for col in ("valid", "failed", "malformed", "unexpected", "5xx", "p50 ms", "p99 ms", "restart", "pass"):
        t.add_column(col, justify="right")
    t.add_row(str(s["requests"]), str(s["errors"]), str(s["malformed"]), str(sum(s["unexpected"].values())),
              str(s["server_errors_5xx"]), f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}", str(s["replica_restarted"]),
              "[green]yes[/green]" if s["passed"] else "[red]NO[/red]")
    return t


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from ray import serve

    from cluster.runtime import connect
    from cluster.serve import ServeConfig
    from cluster.serve_deploy import deploy

    images, source = payload_images(args.data)
    payloads = [encode_png(im) for im in images]
    connect()
    cfg = ServeConfig(checkpoint=args.checkpoint, name="serve-bench", replicas=args.replicas, num_cpus=args.num_cpus,
                      threads=args.threads, max_batch_size=args.max_batch_size,
                      batch_wait_timeout_s=args.batch_wait_ms / 1000, host="127.0.0.1", port=args.port,
                      access_log=False)
    url = deploy(cfg)
    console.print(f"serving {args.checkpoint} at {url}; payload: {source}; {cfg.torch_threads} torch thread(s)/replica")
    result: dict[str, Any] = {"url": url, "config": dataclasses.asdict(cfg)}
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    try:
        async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
            await closed_loop(client, payloads, 4, 1.0, 50)   # warm-up: connections, first batches
            modes = (("(a) batching on", "batching_on", cfg),
                     ("(b) batching off", "batching_off", dataclasses.replace(cfg, max_batch_size=1)))
            for title, key, c in modes:
                deploy(c)   # a live reconfigure, no restart
                rows = [await closed_loop(client, payloads, n, args.level_seconds, args.max_requests) for n in args.levels]
                console.print(level_table(f"{title}: max_batch_size={c.max_batch_size}", rows))
                result[key] = rows
            deploy(cfg)
            result["raw"] = [raw_throughput(str(cfg.checkpoint), images, b, cfg.torch_threads, args.raw_seconds)
                             for b in sorted({1, cfg.max_batch_size})]
            console.print(raw_table(result["raw"]))

            peak = max(r["throughput_rps"] for r in result["batching_on"])
            before = replica_ids(cfg.name)
            bad = malformed_requests(cfg.max_body_bytes, cfg.max_batch_images)
            s = await soak(client, payloads, max(1.0, peak / 2), args.soak_seconds, bad, args.malformed)
            after = replica_ids(cfg.name)
            s["replicas_before"], s["replicas_after"] = len(before), len(after)
            s["replica_restarted"] = before != after
            s["passed"] = not s["unexpected"] and s["server_errors_5xx"] == 0 and not s["replica_restarted"]
            result["soak"] = s
            console.print(soak_table(s, peak))
            if s["unexpected"]:
                console.print(f"unexpected statuses: {s['unexpected']}")
    finally:
        serve.delete(cfg.name)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    from resnet_dist.checkpoint import CheckpointError, load_checkpoint
    from termui.cli import die
    from resnet_dist.inference import resolve_checkpoint

    try:
        load_checkpoint(resolve_checkpoint(args.checkpoint))
    except CheckpointError as e:
        die(str(e))
    console = Console(log_path=False)
    result = asyncio.run(run(args, console))
    print(json.dumps(result, default=str))
    sys.exit(0 if result["soak"]["passed"] else 1)


if __name__ == "__main__":
    main()
