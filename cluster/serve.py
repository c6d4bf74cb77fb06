"""The Ray Serve application: a ResNet classifier behind a FastAPI ingress.

`deploy(ServeConfig(checkpoint=...))` runs it on the current Ray connection and
returns its base URL; `app_builder` builds the same application for a Serve
config file (`import_path: cluster.serve:app_builder`, as in
k8s/rayservice.yaml). Requests are validated and decoded in the request
handler, so bad input never reaches the model; valid images are grouped by
`@serve.batch`, whose max batch size and wait timeout come from the
deployment's `user_config` and can be changed live (`deploy` again with new
values: the replicas are reconfigured, not restarted). The API, limits and
metrics are described in docs/serving.md.
"""

# No `from __future__ import annotations`: FastAPI must see real types in the
# endpoint signatures, which Serve rewrites for class-based views.
import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.util.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.metrics import GaugeKeeper
from resnet_dist.config import ConfigError
from resnet_dist.constants import IMAGE_SIZE
from resnet_dist.inference import (
    DEFAULT_MAX_IMAGE_PIXELS, InputError, checkpoint_id, decode_batch_json, decode_image, load_predictor,
    media_type, multipart_file, predict_probs, resolve_checkpoint, top_k as top_classes,
)

log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "Classifier"

# Metric names as registered with ray.util.metrics. Ray's Prometheus exporter
# adds the `ray_` prefix, and `_total` to counters: see PROMETHEUS_NAMES.
REQUESTS_METRIC = "resnet_dist_serve_requests"                     # Counter, tags route, status
LATENCY_METRIC = "resnet_dist_serve_request_latency_seconds"       # Histogram, tag route
BATCH_SIZE_METRIC = "resnet_dist_serve_batch_size"                 # Histogram, images per model call
MODEL_INFO_METRIC = "resnet_dist_serve_model_info"                 # Gauge = 1, tags version, flavor
PROMETHEUS_NAMES = {
    REQUESTS_METRIC: f"ray_{REQUESTS_METRIC}_total",
    LATENCY_METRIC: f"ray_{LATENCY_METRIC}",
    BATCH_SIZE_METRIC: f"ray_{BATCH_SIZE_METRIC}",
    MODEL_INFO_METRIC: f"ray_{MODEL_INFO_METRIC}",
}
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]

SINGLE_IMAGE_TYPES = ("application/octet-stream", "image/png", "image/jpeg", "multipart/form-data")
LIVE_FIELDS = ("max_batch_size", "batch_wait_timeout_s")            # user_config: changed without restart
SCALING_FIELDS = ("replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests")


@dataclass(frozen=True)
class ServeConfig:
    """Everything the serving application needs; one replica = one process holding the model."""

    checkpoint: str                      # checkpoint file, run dir (best.pt) or sweep dir (see resolve_checkpoint)
    name: str = "resnet-dist"            # Serve application name
    replicas: int = 1                    # replicas (the minimum when autoscaling)
    max_replicas: int = 0                # > replicas: autoscale between replicas and max_replicas
    target_ongoing_requests: float = 16  # autoscaling target of in-flight requests per replica
    num_cpus: float = 1.0                # CPUs reserved per replica
    num_gpus: float = 0.0                # GPUs per replica; > 0 puts the model on CUDA
    threads: int = 0                     # torch threads per replica; 0 = max(1, int(num_cpus))
    max_batch_size: int = 16             # images per model call; 1 = batching off (live)
    batch_wait_timeout_s: float = 0.005  # how long a batch waits to fill, s (live)
    max_ongoing_requests: int = 64       # per replica; also the largest batch that can form
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch_images: int = 64           # images per /v1/predict/batch request
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS   # declared width*height limit (decompression bombs)
    top_k: int = 5                       # classes returned per image unless the request asks (?top_k=)
    host: str = "127.0.0.1"              # HTTP proxy bind address (cluster-wide, first serve.start wins)
    port: int = 8000
    route_prefix: str = "/"
    access_log: bool = True              # Serve's per-request log line in each replica

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))

    def validated(self) -> "ServeConfig":
        checks = [
            (self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}"),
            (self.max_replicas == 0 or self.max_replicas >= self.replicas,
             f"max_replicas must be 0 (no autoscaling) or >= replicas, got {self.max_replicas}"),
            (self.num_cpus > 0 and self.num_gpus >= 0, "num_cpus must be > 0 and num_gpus >= 0"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (1 <= self.max_batch_size <= self.max_ongoing_requests,
             f"max_batch_size must be in [1, max_ongoing_requests={self.max_ongoing_requests}], got {self.max_batch_size}"),
            (self.batch_wait_timeout_s >= 0, f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}"),
            (min(self.max_body_bytes, self.max_batch_images, self.max_image_pixels, self.top_k) >= 1,
             "max_body_bytes, max_batch_images, max_image_pixels and top_k must be >= 1"),
            (self.route_prefix.startswith("/"), f"route_prefix must start with '/', got {self.route_prefix!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def user_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LIVE_FIELDS}

    def merged_user_config(self, user_config: dict[str, Any] | None) -> dict[str, Any]:
        """A (possibly partial) user_config over this config's values, validated: a RayService
        that sets only max_batch_size keeps the default wait. ConfigError (one line) on an
        unknown key or a bad value, so Serve reports the update as failed with why."""
        given = dict(user_config or {})
        unknown = sorted(set(given) - set(LIVE_FIELDS))
        if unknown:
            raise ConfigError(f"unknown user_config key(s) {unknown}; the live ones are {list(LIVE_FIELDS)}")
        try:
            values = {"max_batch_size": int(given.get("max_batch_size", self.max_batch_size)),
                      "batch_wait_timeout_s": float(given.get("batch_wait_timeout_s", self.batch_wait_timeout_s))}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"user_config {given}: {e}") from None
        return dataclasses.replace(self, **values).validated().user_config()


# --------------------------------------------------------------------------- HTTP app

app = FastAPI(
    title="resnet-dist classifier",
    version="1",
    description="CIFAR-style image classification with a resnet-dist checkpoint. "
                "Errors are one-line JSON: {\"error\": \"...\"}.",
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


@app.exception_handler(InputError)
async def _input_error(request: Request, e: InputError) -> JSONResponse:
    return _error(e.status, str(e))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error(e.status_code, e.detail)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    return _error(422, f"invalid request: {'.'.join(map(str, first.get('loc', ())))} {first.get('msg', '')}")


@app.middleware("http")
async def _count_and_time(request: Request, call_next):
    """Count every response by route and status and time it; turn crashes into a JSON 500."""
    start = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception:   # a bug, not bad input: log it, keep serving
        log.exception("unhandled error in %s", request.url.path)
        response = _error(500, "internal server error")
    route = getattr(request.scope.get("route"), "path", "unmatched")   # the template, not the raw path
    metrics: ServeMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.requests.inc(1, tags={"route": route, "status": str(response.status_code)})
        metrics.latency.observe(time.perf_counter() - start, tags={"route": route})
    return response


@dataclass(frozen=True, eq=False)
class ServeMetrics:
    requests: Counter
    latency: Histogram
    batch_size: Histogram
    model_info: Gauge

    @classmethod
    def create(cls) -> "ServeMetrics":
        return cls(
            Counter(REQUESTS_METRIC, description="HTTP requests by route and status code", tag_keys=("route", "status")),
            Histogram(LATENCY_METRIC, description="request latency in the replica, s",
                      boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",)),
            Histogram(BATCH_SIZE_METRIC, description="images per model call", boundaries=BATCH_SIZE_BOUNDARIES),
            Gauge(MODEL_INFO_METRIC, description="1 for the model being served", tag_keys=("version", "flavor")),
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it exceeds `limit` bytes (declared or actual)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError("invalid Content-Length header")
        if int(declared) > limit:
            raise InputError(f"body of {declared} bytes exceeds the limit of {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    if not size:
        raise InputError("empty body")
    return b"".join(chunks)


SINGLE_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in SINGLE_IMAGE_TYPES[:3]},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}
BATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"},
                                      "description": "base64 PNG/JPEG images (at most max_batch_images)"}},
        }}},
    }
}


TOP_K_QUERY = Query(None, ge=1, le=1000, description="classes per image (default: the server's top_k)")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class Classifier:
    """One replica: the model, its limits, and the dynamic batcher."""

    def __init__(self, cfg: ServeConfig) -> None:
        # Batching settings arrive through reconfigure(user_config), never from `cfg`.
        torch.set_num_threads(cfg.torch_threads)   # replicas share the node's cores
        self.cfg = cfg
        self.predictor = load_predictor(cfg.checkpoint)
        self.metrics = ServeMetrics.create()
        app.state.metrics = self.metrics
        # Kept set: Ray drops a gauge that is not set again within ~20 s (cluster/metrics.py).
        self.gauges = GaugeKeeper()
        self.gauges.set(self.metrics.model_info, 1, {"version": self.predictor.version,
                                                     "flavor": self.predictor.ckpt["model_config"]["flavor"]})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        live = self.cfg.merged_user_config(user_config)
        self.predict_batch.set_max_batch_size(live["max_batch_size"])
        self.predict_batch.set_batch_wait_timeout_s(live["batch_wait_timeout_s"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)   # overridden by reconfigure
    async def predict_batch(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, int]]:
        """One model call for the images queued together: (class probabilities, batch size) per image."""
        self.metrics.batch_size.observe(len(images))
        # In a thread: the event loop keeps accepting and decoding requests while the model runs.
        probs = await asyncio.to_thread(predict_probs, self.predictor, np.stack(images))
        return [(row, len(images)) for row in probs]

    def _decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, IMAGE_SIZE, self.cfg.max_image_pixels)

    def _top(self, probs: torch.Tensor, k: int | None) -> list[dict[str, Any]]:
        return top_classes(probs[None], self.predictor.classes, k or self.cfg.top_k)[0]

    @app.post("/v1/predict", openapi_extra=SINGLE_BODY_DOC,
              summary="Classify one PNG/JPEG image (raw body or multipart field `file`)")
    async def predict(self, request: Request, top_k: int | None = TOP_K_QUERY) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if media_type(content_type) not in SINGLE_IMAGE_TYPES:
            raise InputError(f"unsupported content type {media_type(content_type) or '(none)'!r}; "
                             f"use one of {', '.join(SINGLE_IMAGE_TYPES)}", status=415)
        body = await _read_body(request, self.cfg.max_body_bytes)
        if media_type(content_type) == "multipart/form-data":
            body = multipart_file(body, content_type)
        probs, batch = await self.predict_batch(self._decode(body))
        return {"predictions": self._top(probs, top_k), "model_version": self.predictor.version, "batch_size": batch}

    @app.post("/v1/predict/batch", openapi_extra=BATCH_BODY_DOC,
              summary='Classify several images: {"images": [base64 PNG/JPEG, ...]}')
    async def predict_many(self, request: Request, top_k: int | None = TOP_K_QUERY) -> dict[str, Any]:
        if media_type(request.headers.get("content-type")) != "application/json":
            raise InputError("unsupported content type; use application/json", status=415)
        raw = decode_batch_json(await _read_body(request, self.cfg.max_body_bytes), self.cfg.max_batch_images)
        images = []
        for i, data in enumerate(raw):
            try:
                images.append(self._decode(data))
            except InputError as e:
                raise InputError(f"images[{i}]: {e}", e.status) from None
        results = await asyncio.gather(*(self.predict_batch(x) for x in images))
        return {"predictions": [self._top(p, top_k) for p, _ in results], "model_version": self.predictor.version,
                "batch_sizes": [b for _, b in results]}

    @app.get("/v1/model", summary="The model being served and the current batching settings")
    async def model(self) -> dict[str, Any]:
        return {**self.predictor.info(), "batching": {
            "max_batch_size": self.predict_batch._get_max_batch_size(),
            "batch_wait_timeout_s": self.predict_batch._get_batch_wait_timeout_s(),
        }, "limits": {"max_body_bytes": self.cfg.max_body_bytes, "max_batch_images": self.cfg.max_batch_images,
                      "max_image_pixels": self.cfg.max_image_pixels, "top_k": self.cfg.top_k}}

    @app.get("/healthz", summary="Liveness and readiness (the model is loaded)")
    async def healthz(self) -> dict[str, Any]:
        # Answered only once __init__ has loaded the model, so live = ready.
        return {"status": "ok", "model_loaded": True, "version": self.predictor.version,
                "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid()}


# --------------------------------------------------------------------------- deployment


def build_app(cfg: ServeConfig):
    """The bound Serve application for `cfg`, its checkpoint resolved to an absolute file path."""
    cfg = dataclasses.replace(cfg, checkpoint=str(resolve_checkpoint(cfg.checkpoint).resolve())).validated()
    autoscale = cfg.max_replicas > cfg.replicas
    deployment = Classifier.options(
        num_replicas=None if autoscale else cfg.replicas,
        autoscaling_config={"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests} if autoscale else None,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        user_config=cfg.user_config(),
        logging_config={"enable_access_log": cfg.access_log},
    )
    # serve.run gives every deploy a random code version, which replaces all
    # replicas. Pinning the version to a hash of everything but the live and
    # scaling fields (as Serve's config-file deploys do, via the private
    # `_internal` flag) makes a batching-only change a reconfigure() call.
    heavy = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LIVE_FIELDS + SCALING_FIELDS}
    version = hashlib.sha256(json.dumps({**heavy, "checkpoint_id": checkpoint_id(cfg.checkpoint)},
                                        sort_keys=True).encode()).hexdigest()[:16]
    return deployment.options(version=version, _internal=True).bind(cfg)


# Fields that only `deploy` uses; a Serve config file sets them itself (http_options, route_prefix, name).
DEPLOY_ONLY_FIELDS = ("name", "host", "port", "route_prefix")


def app_builder(args: dict):
    """The application for a Serve config file (`import_path: cluster.serve:app_builder`,
    e.g. a KubeRay RayService's serveConfigV2): `args` holds ServeConfig fields, at least
    `checkpoint`. The config's own `user_config` for the Classifier deployment, where
    given, replaces the batching settings built here.

    (`args: dict`, not `dict[str, Any]`: Serve checks whether the annotation is a
    pydantic model, which a generic alias breaks on Python 3.10.)
    """
    allowed = [f.name for f in dataclasses.fields(ServeConfig) if f.name not in DEPLOY_ONLY_FIELDS]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown serve argument(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    if "checkpoint" not in args:
        raise ConfigError("serve arguments need `checkpoint` (a checkpoint file, run dir or sweep dir)")
    return build_app(ServeConfig(**args))


def deploy(cfg: ServeConfig) -> str:
    """Run (or update in place) the application on the current Ray connection; returns its base URL.

    The checkpoint path must be readable at the same path on every node that runs a replica.
    """
    application = build_app(cfg)   # validates and resolves before anything starts
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application, name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
    # HTTP options are cluster-wide and fixed by the first serve.start: report the proxy actually running.
    http = serve.context._get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{host}:{http.port}{cfg.route_prefix.rstrip('/')}"
