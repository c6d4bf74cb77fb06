"""The Ray Serve application: a ResNet classifier behind a FastAPI ingress.

`app_builder` builds the application for a Serve config file (`import_path:
cluster.serve:app_builder`, as in k8s/rayservice.yaml); `cluster.serve_deploy.deploy`
applies such a config on the current Ray connection and returns its base URL, so both
are one mechanism.
Requests are parsed (cluster/http_requests.py) and the images decoded in the request
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
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.http_requests import (
    BATCH_TYPE, SINGLE_IMAGE_TYPES, RequestError, authorize, decode_batch_json, multipart_file, read_body,
    require_media_type, within,
)
from cluster.metrics import GaugeKeeper
from resnet_dist import storage
from resnet_dist.config import ConfigError
from resnet_dist.constants import IMAGE_SIZE
from resnet_dist.inference import (
    DEFAULT_MAX_IMAGE_PIXELS, INLINE_DECODE_PIXELS, InputError, decode_image, decode_pixels, freeze_predictor,
    freeze_startup_heap, load_predictor, open_image, predict_probs, resolve_checkpoint, share_gil_with_model_thread,
    top_k as top_classes,
)

log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "Classifier"
IMPORT_PATH = "cluster.serve:app_builder"

# Requests, latency, errors, batch sizes and queues are Ray Serve's own metrics
# (ray_serve_num_http_requests_total, ray_serve_http_request_latency_ms,
# ray_serve_actual_batch_size, ray_serve_batch_queue_length, ...; k8s/grafana/metrics.yaml).
# The project adds only what Serve cannot know: which model a replica serves. A
# ray.serve.metrics Gauge, so it carries Serve's deployment/replica/application labels.
# Ray's Prometheus exporter adds the `ray_` prefix: see PROMETHEUS_NAMES.
MODEL_INFO_METRIC = "resnet_dist_serve_model_info"                 # Gauge = 1, tags version, flavor
PROMETHEUS_NAMES = {MODEL_INFO_METRIC: f"ray_{MODEL_INFO_METRIC}"}

# Multipart bodies parsed on the event loop up to this size, larger ones in the decode pool
# (images: resnet_dist.inference.INLINE_DECODE_PIXELS).
INLINE_PARSE_BYTES = 64 * 1024

LIVE_FIELDS = ("max_batch_size", "batch_wait_timeout_s")            # user_config: changed without restart
# Set by `deploy` as Serve deployment options, outside the application's args, so a change
# is applied to the running replicas (more or fewer of them), not by replacing them.
# (max_ongoing_requests is not one: the replicas check max_batch_size against it.)
SCALING_FIELDS = ("replicas", "max_replicas", "target_ongoing_requests")


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
    # Requests waiting for a replica slot where they enter Serve (each ingress: a replica's own
    # behind HAProxy, else each proxy); past it a 503 with Retry-After.
    max_queued_requests: int = 256
    retry_after_s: float = 1.0           # Retry-After of those 503s, s
    # End to end per request, s; past it a 408. Each replica enforces it on /v1/predict*
    # (http_requests.within): Serve's own is one value for the cluster, set by the first
    # serve.start (`deploy` passes this one), or unset in a config file that gives none in
    # http_options, and a client can lift it for its request by a header.
    request_timeout_s: float = 60.0
    decode_threads: int = 2              # images parsed and decoded at once per replica, off the event loop
    # The model as a frozen TorchScript graph (resnet_dist.inference.freeze_predictor: faster, and
    # not starved of the GIL by the event loop); False, or a model it cannot trace = eager PyTorch.
    torchscript: bool = True
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch_images: int = 64           # images per /v1/predict/batch request
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS   # declared width*height limit (decompression bombs)
    top_k: int = 5                       # classes returned per image unless the request asks (?top_k=)
    host: str = "127.0.0.1"              # HTTP proxy bind address (cluster-wide, first serve.start wins)
    port: int = 8000
    route_prefix: str = "/"
    access_log: bool = True              # Serve's per-request log line in each replica
    # The checkpoint file's content id (resnet_dist.inference.checkpoint_id) every replica must
    # find, so a replica started later (autoscaling, a crash) cannot serve another file put at
    # the same path. `deploy` pins it; "" = not pinned (a warning in each replica's log).
    checkpoint_id: str = ""
    # A file holding the API key required on /v1/* (a mounted Kubernetes Secret); "" = open.
    # The key itself never enters the config, which the Serve dashboard shows.
    api_key_file: str = ""

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
            (min(self.max_body_bytes, self.max_batch_images, self.max_image_pixels, self.top_k,
                 self.max_queued_requests, self.decode_threads) >= 1,
             "max_body_bytes, max_batch_images, max_image_pixels, top_k, max_queued_requests and "
             "decode_threads must be >= 1"),
            (self.retry_after_s >= 0 and self.request_timeout_s > 0,
             "retry_after_s must be >= 0 and request_timeout_s > 0"),
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
    # The image itself is not acceptable (resnet_dist.inference.decode_image): the client's fault.
    return _error(400, str(e))


@app.exception_handler(RequestError)
async def _request_error(request: Request, e: RequestError) -> JSONResponse:
    response = _error(e.status, str(e))
    response.headers.update(e.headers)
    return response


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error(e.status_code, e.detail)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    return _error(422, f"invalid request: {'.'.join(map(str, first.get('loc', ())))} {first.get('msg', '')}")


@app.exception_handler(Exception)
async def _json_500(request: Request, e: Exception) -> JSONResponse:
    """Turn crashes into a one-line JSON 500 (Serve counts and times every response itself).
    An exception handler, not an @app.middleware: Starlette's BaseHTTPMiddleware runs every
    request through an extra task and memory stream, on the hot path of every request."""
    log.error("unhandled error in %s", request.url.path, exc_info=e)   # a bug, not bad input
    return _error(500, "internal server error")


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
        "content": {BATCH_TYPE: {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"},
                                      "description": "base64 PNG/JPEG images (at most max_batch_images)"}},
        }}},
    }
}


def model_info_gauge() -> Gauge:
    """The one metric of the project's own: 1 for the model a replica serves (its version and flavor)."""
    return Gauge(MODEL_INFO_METRIC, description="1 for the model being served", tag_keys=("version", "flavor"))


def read_api_key(path: str) -> str:
    """The API key in file `path` (surrounding whitespace dropped); ConfigError if unreadable or empty."""
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"api_key_file {path}: cannot read it ({type(e).__name__})") from None
    if not key:
        raise ConfigError(f"api_key_file {path} is empty")
    return key


def check_pin(cfg: "ServeConfig", found: str) -> None:
    """ConfigError unless the checkpoint file's content id `found` is the one `cfg` is pinned to."""
    if cfg.checkpoint_id and found != cfg.checkpoint_id:
        raise ConfigError(f"checkpoint {cfg.checkpoint} has content id {found}, but this deployment is pinned to "
                          f"{cfg.checkpoint_id}: the file changed; deploy it again to serve it as a new version")


TOP_K_QUERY = Query(None, ge=1, le=1000, description="classes per image (default: the server's top_k)")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class Classifier:
    """One replica: the model, its limits, and the dynamic batcher."""

    def __init__(self, cfg: ServeConfig) -> None:
        # Batching settings arrive through reconfigure(user_config), never from `cfg`.
        torch.set_num_threads(cfg.torch_threads)   # replicas share the node's cores
        share_gil_with_model_thread()              # the model thread beside the event loop
        self.cfg = cfg
        self.api_key = read_api_key(cfg.api_key_file) if cfg.api_key_file else None
        self.predictor = load_predictor(cfg.checkpoint)
        if cfg.torchscript:
            self.predictor = freeze_predictor(self.predictor)
        # The hash of the bytes just loaded, not of the path: refuse to serve another model.
        check_pin(cfg, self.predictor.checkpoint_id)
        if not cfg.checkpoint_id:
            log.warning("serving %s (content id %s) unpinned: set checkpoint_id so that every replica "
                        "serves this file", cfg.checkpoint, self.predictor.checkpoint_id)
        # Large images, batch bodies and large multipart bodies are parsed and decoded here, so the
        # event loop keeps answering /healthz and reading other requests; at most decode_threads
        # at once. Small images are decoded inline (_decode_one).
        self.decode_pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="decode")
        # Every model call runs in this one thread, in arrival order: the batcher's and the batch
        # route's (a request of many images is already a batch), so they never compete for the
        # replica's torch threads, and the event loop keeps serving while the model runs.
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="model")
        # What the batcher was last set to (reported by /v1/model). Kept here because the
        # @serve.batch wrapper has public setters but no public getters.
        self.batching = cfg.user_config()
        self.model_info = model_info_gauge()
        # Kept set: Ray drops a gauge that is not set again within ~20 s (cluster/metrics.py).
        self.gauges = GaugeKeeper()
        self.gauges.set(self.model_info, 1, {"version": self.predictor.version,
                                             "flavor": self.predictor.ckpt["model_config"]["flavor"]})
        # Last: the startup heap (torch, Ray, FastAPI, the model) out of full collections, which
        # would otherwise stop the event loop and the model thread to walk it (freeze_startup_heap).
        freeze_startup_heap()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        live = self.cfg.merged_user_config(user_config)
        self.predict_batch.set_max_batch_size(live["max_batch_size"])
        self.predict_batch.set_batch_wait_timeout_s(live["batch_wait_timeout_s"])
        self.batching = live

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)   # overridden by reconfigure
    async def predict_batch(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, int]]:
        """One model call for the images queued together: (class probabilities, batch size) per image."""
        probs = await self._model(np.stack(images))
        return [(row, len(images)) for row in probs]

    async def _model(self, images: np.ndarray) -> torch.Tensor:
        """Class probabilities of a uint8 NHWC batch, computed in the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.model_pool, predict_probs, self.predictor, images)

    async def _offload(self, fn, *args):
        """fn(*args) in the decode pool (its exceptions propagate as if called here)."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    async def _decode_one(self, body: bytes, content_type: str, kind: str) -> np.ndarray:
        """The request's image; small ones on the event loop, large ones in the decode pool."""
        if kind == "multipart/form-data":
            body = (multipart_file(body, content_type) if len(body) <= INLINE_PARSE_BYTES
                    else await self._offload(multipart_file, body, content_type))
        img = open_image(body, self.cfg.max_image_pixels)   # the header only: microseconds
        if img.width * img.height <= INLINE_DECODE_PIXELS:
            return decode_pixels(img, IMAGE_SIZE)
        return await self._offload(decode_pixels, img, IMAGE_SIZE)

    def _decode_many(self, body: bytes) -> list[np.ndarray]:
        images = []
        for i, data in enumerate(decode_batch_json(body, self.cfg.max_batch_images)):
            try:
                images.append(decode_image(data, IMAGE_SIZE, self.cfg.max_image_pixels))
            except InputError as e:   # name the culprit; still the image's fault, so a 400
                raise RequestError(f"images[{i}]: {e}") from None
        return images

    def _top(self, probs: torch.Tensor, k: int | None) -> list[dict[str, Any]]:
        return top_classes(probs[None], self.predictor.classes, k or self.cfg.top_k)[0]

    @app.post("/v1/predict", openapi_extra=SINGLE_BODY_DOC,
              summary="Classify one PNG/JPEG image (raw body or multipart field `file`)")
    async def predict(self, request: Request, top_k: int | None = TOP_K_QUERY) -> JSONResponse:
        return await within(self.cfg.request_timeout_s, self._predict(request, top_k))

    async def _predict(self, request: Request, top_k: int | None) -> JSONResponse:
        authorize(request, self.api_key)
        content_type = request.headers.get("content-type", "")
        kind = require_media_type(content_type, SINGLE_IMAGE_TYPES)
        body = await read_body(request, self.cfg.max_body_bytes)
        image = await self._decode_one(body, content_type, kind)
        probs, batch = await self.predict_batch(image)
        # A JSONResponse, not a dict: FastAPI would first walk the dict through jsonable_encoder,
        # which plain JSON types do not need.
        return JSONResponse({"predictions": self._top(probs, top_k), "model_version": self.predictor.version,
                             "batch_size": batch})

    @app.post("/v1/predict/batch", openapi_extra=BATCH_BODY_DOC,
              summary='Classify several images: {"images": [base64 PNG/JPEG, ...]}')
    async def predict_many(self, request: Request, top_k: int | None = TOP_K_QUERY) -> JSONResponse:
        return await within(self.cfg.request_timeout_s, self._predict_many(request, top_k))

    async def _predict_many(self, request: Request, top_k: int | None) -> JSONResponse:
        authorize(request, self.api_key)
        require_media_type(request.headers.get("content-type"), (BATCH_TYPE,))
        images = await self._offload(self._decode_many, await read_body(request, self.cfg.max_body_bytes))
        # One model call for the request's images (at most max_batch_images), not one batcher item
        # each: they are a batch already, and 64 batcher items, futures and top-k calls per request
        # held the batch route to 0.43-0.54x of raw inference (docs/benchmarks.md).
        probs = await self._model(np.stack(images))
        return JSONResponse({"predictions": top_classes(probs, self.predictor.classes, top_k or self.cfg.top_k),
                             "model_version": self.predictor.version, "batch_sizes": [len(images)] * len(images)})

    @app.get("/v1/model", summary="The model being served and the current batching settings")
    async def model(self, request: Request) -> dict[str, Any]:
        authorize(request, self.api_key)
        return {**self.predictor.info(), "batching": dict(self.batching),
                "limits": {"max_body_bytes": self.cfg.max_body_bytes, "max_batch_images": self.cfg.max_batch_images,
                           "max_image_pixels": self.cfg.max_image_pixels, "top_k": self.cfg.top_k,
                           "max_queued_requests": self.cfg.max_queued_requests,
                           "request_timeout_s": self.cfg.request_timeout_s},
                "api_key_required": self.api_key is not None}

    @app.get("/healthz", summary="Liveness and readiness (the model is loaded)")
    async def healthz(self) -> dict[str, Any]:
        # Answered only once __init__ has loaded the model, so live = ready.
        return {"status": "ok", "model_loaded": True, "version": self.predictor.version,
                "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid()}


# --------------------------------------------------------------------------- deployment


def resolved(cfg: ServeConfig) -> ServeConfig:
    """`cfg` validated, its checkpoint resolved to an absolute file path."""
    return dataclasses.replace(cfg, checkpoint=storage.resolve(resolve_checkpoint(cfg.checkpoint))).validated()


def build_app(cfg: ServeConfig):
    """The bound Serve application for `cfg` (what `app_builder` returns to Serve)."""
    cfg = resolved(cfg)
    deployment = Classifier.options(
        **scaling_options(cfg),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": cfg.retry_after_s},
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        user_config=cfg.user_config(),
        logging_config={"enable_access_log": cfg.access_log},
    )
    return deployment.bind(cfg)


def scaling_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's replica-count options for `cfg`: a fixed count, or autoscaling between replicas and max_replicas."""
    if cfg.max_replicas > cfg.replicas:
        return {"num_replicas": None, "autoscaling_config": {
            "min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests}}
    return {"num_replicas": cfg.replicas, "autoscaling_config": None}


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
    args = dict(args)
    allowed = [f.name for f in dataclasses.fields(ServeConfig) if f.name not in DEPLOY_ONLY_FIELDS]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown serve argument(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    if "checkpoint" not in args:
        raise ConfigError("serve arguments need `checkpoint` (a checkpoint file, run dir or sweep dir)")
    cfg = ServeConfig(**args)
    if "max_batch_size" not in args:
        # The batching settings normally come from the config's user_config (`deploy` never
        # puts them in args): the built-in default only has to pass validation, also next
        # to a max_ongoing_requests below it.
        cfg = dataclasses.replace(cfg, max_batch_size=min(cfg.max_batch_size, cfg.max_ongoing_requests))
    return build_app(cfg)

