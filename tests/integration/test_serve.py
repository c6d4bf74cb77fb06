"""The Serve application on the shared Ray cluster: served predictions equal offline ones, bad input
gets its documented 4xx without hurting the server, batching is reconfigured live, metrics are exported."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from resnet_dist.augment import normalize
from resnet_dist.checkpoint import load_model
from resnet_dist.parquet import read_split
from resnet_dist.engine import Precision, predict_logits
from resnet_dist.inference import checkpoint_id, resolve_checkpoint
from tests.integration.conftest import free_port, missing_dashboard_series, scraped_names
from tests.unit.test_serve_inputs import png_header_only

pytestmark = pytest.mark.integration

N_IMAGES = 200
MB = 1024 * 1024


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained for one epoch on 2,000 real images (about 30 s on 2 cores), by the
    command a user runs (jobs/train.py --local), so this test does not hang on the trainer's internals."""
    out = tmp_path_factory.mktemp("serve_run")
    run = subprocess.run([sys.executable, "jobs/train.py", "--local", "--model", "debug", "--data", str(real_cifar_dir),
                          "--train-subset", "2000", "--epochs", "1", "--batch-size", "250", "--run-dir", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def test_images(real_cifar_dir: Path) -> np.ndarray:
    return read_split(real_cifar_dir, "test").images[:N_IMAGES]


# Serving runs at the checkpoint's precision as the device resolves it (bf16 autocast on a CPU
# with native bf16, as here), and a bf16 result moves with the batch it was computed in; the
# reference is fp32. A served class counts as the offline one when it is the offline top-1, or
# within NEAR_TIE of it in offline probability (a near tie that bf16 rounding may flip): the
# run_dir model (8 steps of training) spreads its probabilities (top-1 0.11-0.21), and bf16 moved
# them by at most 0.0007 at batches 1-200 (2 of 200 top-1s flipped), so 3x that.
NEAR_TIE = 0.002


@dataclasses.dataclass(frozen=True)
class Offline:
    probs: np.ndarray   # (N_IMAGES, classes), fp32, one batch

    @property
    def top1(self) -> list[int]:
        return self.probs.argmax(1).tolist()

    def agrees(self, i: int, index: int) -> bool:
        return index == self.top1[i] or self.probs[i, self.top1[i]] - self.probs[i, index] < NEAR_TIE

    def all_agree(self, indices: list[int]) -> bool:
        """indices[i] is the served class of test image i."""
        return all(self.agrees(i, index) for i, index in enumerate(indices))


@pytest.fixture(scope="module")
def offline(run_dir: Path, test_images: np.ndarray) -> Offline:
    """Single-process prediction with the serving preprocessing: checkpoint mean/std, fp32, no flip TTA."""
    model, ckpt = load_model(resolve_checkpoint(run_dir))
    x = normalize(torch.from_numpy(test_images), ckpt["mean"], ckpt["std"])
    probs = torch.softmax(predict_logits(model, x, Precision(None, False), flip_tta=False), dim=1).numpy()
    top = np.sort(probs, axis=1)
    # The tolerance must leave most images an exact check (19% are near ties here), or the test would prove little.
    assert np.mean(top[:, -1] - top[:, -2] < NEAR_TIE) < 0.3
    return Offline(probs)


API_KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def served(ray_driver, run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app behind an API key (from a file, as a mounted Kubernetes Secret gives it); the client sends it."""
    from ray import serve

    from cluster.serve import ServeConfig
    from cluster.serve_deploy import deploy

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(API_KEY + "\n")
    cfg = ServeConfig(checkpoint=str(run_dir), name="serve-test", num_cpus=1, threads=1,
                      max_batch_size=8, batch_wait_timeout_s=0.05, port=free_port(), access_log=False,
                      api_key_file=str(key_file))
    url = deploy(cfg)
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield cfg, client
    serve.shutdown()   # give the CPU back to the other tests


def predict(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"})


def test_served_predictions_equal_offline(served, run_dir, test_images, offline) -> None:
    _, client = served
    with ThreadPoolExecutor(16) as pool:   # concurrent, so requests share batches
        responses = list(pool.map(lambda im: predict(client, png(im)), test_images))
    assert [r.status_code for r in responses] == [200] * N_IMAGES
    bodies = [r.json() for r in responses]
    served_top1 = [b["predictions"][0]["index"] for b in bodies]
    assert offline.all_agree(served_top1), [(i, a, b) for i, (a, b) in enumerate(zip(served_top1, offline.top1)) if a != b]
    assert sum(a == b for a, b in zip(served_top1, offline.top1)) >= 0.95 * N_IMAGES
    # The served probabilities are the offline ones, to bf16's precision.
    served_p = np.array([b["predictions"][0]["probability"] for b in bodies])
    assert np.abs(served_p - offline.probs[np.arange(N_IMAGES), served_top1]).max() < NEAR_TIE
    assert max(b["batch_size"] for b in bodies) > 1
    file = resolve_checkpoint(run_dir)
    assert bodies[0]["model_version"].startswith(checkpoint_id(file) + "+")
    assert len(bodies[0]["predictions"]) == 5

    # The same images through multipart/form-data and the JSON batch route.
    r = client.post("/v1/predict?top_k=2", files={"file": ("a.png", png(test_images[0]), "image/png")})
    assert r.status_code == 200 and offline.agrees(0, r.json()["predictions"][0]["index"])
    assert len(r.json()["predictions"]) == 2
    batch = {"images": [base64.b64encode(png(im)).decode() for im in test_images[:10]]}
    r = client.post("/v1/predict/batch", json=batch)
    assert r.status_code == 200
    assert offline.all_agree([p[0]["index"] for p in r.json()["predictions"]]) and len(r.json()["predictions"]) == 10
    assert r.json()["batch_sizes"] == [10] * 10   # the request's images are one model call


def bad_requests(max_body: int) -> list[tuple[str, dict, int, str]]:
    """(path, httpx request arguments, expected status, fragment of the error)."""
    img = {"Content-Type": "application/octet-stream"}
    return [
        ("/v1/predict", {"content": b"definitely not an image", "headers": img}, 400, "not a PNG or JPEG"),
        ("/v1/predict", {"content": b"", "headers": img}, 400, "empty body"),
        ("/v1/predict", {"content": b"\x89PNG" + b"\0" * max_body, "headers": img}, 413, "exceeds the limit"),
        # A generator body goes out chunked, without Content-Length: the size is counted while reading.
        ("/v1/predict", {"content": iter([b"\0" * MB] * (max_body // MB + 1)), "headers": img}, 413, "exceeds the limit"),
        ("/v1/predict", {"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported content type"),
        ("/v1/predict", {"content": png_header_only(20000, 20000), "headers": img}, 400, "image too large"),
        ("/v1/predict", {"content": png_header_only(5000, 5000), "headers": img}, 400, "5000x5000"),
        ("/v1/predict", {"files": {"other": ("a.png", b"x")}}, 400, "no field 'file'"),
        ("/v1/predict?top_k=0", {"content": b"x", "headers": img}, 422, "top_k"),
        ("/v1/predict/batch", {"content": b"{oops", "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
        ("/v1/predict/batch", {"json": {"images": ["%%%"]}}, 400, "malformed base64"),
        ("/v1/predict/batch", {"json": {"images": ["AAAA"] * 65}}, 413, "too many images"),
        ("/v1/predict/batch", {"json": {"images": [base64.b64encode(b"junk").decode()]}}, 400, "images[0]: not a PNG"),
        ("/v1/predict/batch", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415, "content type"),
        ("/v1/nope", {}, 404, "Not Found"),
    ]


def test_bad_input_is_refused_and_server_keeps_answering(served, test_images, offline) -> None:
    cfg, client = served
    for i, (path, kwargs, status, fragment) in enumerate(bad_requests(cfg.max_body_bytes)):
        r = client.post(path, **kwargs)
        assert r.status_code == status, (path, r.text)
        body = r.json()
        assert list(body) == ["error"] and fragment in body["error"], (path, body)
        assert "\n" not in r.text
        good = predict(client, png(test_images[i]))
        assert good.status_code == 200 and offline.agrees(i, good.json()["predictions"][0]["index"])
    r = client.get("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_a_client_that_sends_a_huge_body_before_reading_still_gets_its_413(served) -> None:
    """64 MiB declared and sent in full before the client reads: the answer is a readable 413
    (the connection is not reset under the client's feet)."""
    cfg, client = served
    body = b"\0" * (64 * MB)
    head = (f"POST {client.base_url.raw_path.decode().rstrip('/')}/v1/predict HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((client.base_url.host, client.base_url.port), timeout=60) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 4194304 bytes" in answer, answer[:300]


def test_model_health_and_docs(served, run_dir) -> None:
    cfg, client = served
    model = client.get("/v1/model").json()
    assert model["flavor"] == "debug" and len(model["classes"]) == 10
    # The trainer records the best checkpoint's test accuracy in it (metrics.json holds the same figure).
    assert model["test_accuracy"] == json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"]
    assert model["checkpoint_id"] == checkpoint_id(resolve_checkpoint(run_dir))
    assert model["data_fingerprint"].startswith("sha256:") and model["code_version"]
    assert model["batching"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    assert model["graph"] == "torchscript"   # the replica froze it (ServeConfig.torchscript); the
    # prediction tests compare its answers with the eager fp32 model's (`offline`)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert client.get("/docs").status_code == 200
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"} <= set(client.get("/openapi.json").json()["paths"])


def test_reconfigure_changes_batch_size_live(served, test_images) -> None:
    from cluster.serve_deploy import deploy

    cfg, client = served
    replica = client.get("/healthz").json()["replica"]
    try:
        deploy(dataclasses.replace(cfg, max_batch_size=2, batch_wait_timeout_s=0.2))
        assert client.get("/v1/model").json()["batching"] == {"max_batch_size": 2, "batch_wait_timeout_s": 0.2}
        with ThreadPoolExecutor(8) as pool:
            sizes = [r.json()["batch_size"] for r in pool.map(lambda im: predict(client, png(im)), test_images[:16])]
        assert max(sizes) == 2
        assert client.get("/healthz").json()["replica"] == replica   # reconfigured, not restarted
    finally:
        deploy(cfg)


def series(text: str, name: str, application: str | None = None) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each series `name` in a Prometheus text scrape (of one Serve application)."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            body, value = line.split("{", 1)[1].rsplit("}", 1)
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
            if application is None or labels.get("application") == application:
                out.append((labels, float(value.split()[0])))
    return out


def test_metrics_reach_prometheus(served, ray_cluster, run_dir, test_images) -> None:
    """Serve's own request, latency, batch and queue metrics describe this app's traffic, and the
    project's model info names the checkpoint served."""
    from cluster.serve import MODEL_INFO_METRIC, PROMETHEUS_NAMES

    cfg, client = served
    # Traffic of its own, whichever tests ran before: concurrent (so batches form), one bad image, one too many.
    with ThreadPoolExecutor(8) as pool:
        assert {r.status_code for r in pool.map(lambda im: predict(client, png(im)), test_images[:32])} == {200}
    assert predict(client, b"not an image").status_code == 400
    assert client.post("/v1/predict/batch", json={"images": ["AAAA"] * 65}).status_code == 413
    model_info = PROMETHEUS_NAMES[MODEL_INFO_METRIC]
    mine = lambda text, name: series(text, name, cfg.name)   # noqa: E731

    def ready(text: str) -> bool:
        return (any(s["status_code"] == "400" for s, _ in mine(text, "ray_serve_num_http_requests_total"))
                and bool(mine(text, "ray_serve_actual_batch_size_count")) and bool(mine(text, model_info)))

    deadline, text = time.monotonic() + 45, ""
    while time.monotonic() < deadline and not ready(text):   # Ray exports metrics every few seconds
        time.sleep(2)
        text = httpx.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).text
    requests = Counter()
    for s, n in mine(text, "ray_serve_num_http_requests_total"):
        # Counted where requests enter Serve: behind HAProxy that is the replica's direct ingress,
        # which labels them with the application's route prefix (cluster/runtime.py SERVE_ENV).
        assert s["route"] == cfg.route_prefix, s
        requests[(s["method"], s["status_code"])] += n
    # The real status codes, as the app answered them.
    assert requests[("POST", "200")] >= 32 and requests[("POST", "400")] >= 1 and requests[("POST", "413")] >= 1, requests
    assert any(s["method"] == "POST" for s, _ in mine(text, "ray_serve_http_request_latency_ms_bucket"))
    # Some model calls took more than one image (@serve.batch's own histogram).
    (batches,) = [n for s, n in mine(text, "ray_serve_actual_batch_size_count")]
    (single,) = [n for s, n in mine(text, "ray_serve_actual_batch_size_bucket") if float(s["le"]) == 1.0]
    assert single < batches
    assert mine(text, "ray_serve_batch_queue_length"), "Serve's batch queue gauge is missing"
    ((info, value),) = mine(text, model_info)
    assert value == 1 and info["flavor"] == "debug"
    assert info["version"].startswith(checkpoint_id(resolve_checkpoint(run_dir)) + "+")
    assert info["deployment"] == "Classifier" and info["replica"] == client.get("/healthz").json()["replica"]
    # The project exports no copies of Serve's serving metrics any more.
    names = scraped_names(ray_cluster.metrics_port)
    assert [n for n in names if n.startswith("ray_resnet_dist_serve_")] == [model_info]
    # Every serving metric the Grafana dashboard queries is among them.
    assert not missing_dashboard_series(names, serve=True)


def test_api_key_is_required_on_v1_and_health_stays_open(served, test_images) -> None:
    cfg, client = served
    base = str(client.base_url).rstrip("/")
    image = {"content": png(test_images[0]), "headers": {"Content-Type": "image/png"}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": API_KEY[:-1]}):
        for method, path, kwargs in (("POST", "/v1/predict", image), ("GET", "/v1/model", {})):
            r = httpx.request(method, base + path, **{**kwargs, "headers": {**kwargs.get("headers", {}), **headers}})
            assert r.status_code == 401 and "API key" in r.json()["error"], (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(base + "/v1/predict", **{**image, "headers": {**image["headers"], "X-API-Key": API_KEY}})
    assert r.status_code == 200
    assert httpx.get(base + "/healthz").status_code == 200      # the replica's, open
    assert httpx.get(base + "/-/healthz").status_code == 200    # the Serve proxy's, open
    assert client.get("/v1/model").json()["api_key_required"] is True


def big_png(image: np.ndarray, side: int = 1024) -> bytes:
    """`image` upscaled to side x side (the most the server accepts): a PNG of just under 1 MB."""
    return png(np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR)))


def test_large_images_do_not_stall_the_replica(served, test_images, offline) -> None:
    """While 1-megapixel images are decoded (in the replica's decode pool), the replica keeps
    answering /healthz and small requests; and the cap refuses more pixels than that."""
    cfg, client = served
    big = [big_png(im) for im in test_images[:24]]
    health_ms: list[float] = []
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(predict, client, b) for b in big]
        while not all(f.done() for f in pending):
            t = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            health_ms.append((time.perf_counter() - t) * 1000)
            small = predict(client, png(test_images[30]))
            assert small.status_code == 200 and offline.agrees(30, small.json()["predictions"][0]["index"])
        answers = [f.result() for f in pending]
    assert [r.status_code for r in answers] == [200] * len(big)
    assert len(health_ms) >= 2, "the large images were answered before the replica was probed"
    # Generous for 2 busy cores: what is checked is that no probe waited for the decodes.
    assert max(health_ms) < 1000, health_ms
    r = predict(client, big_png(test_images[0], 1025))
    assert r.status_code == 400 and "1025x1025 exceeds 1048576 pixels" in r.json()["error"]


@pytest.fixture(scope="module")
def guarded(served, run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A second application on its own copy of the checkpoint, with one request in flight and one
    queued at most, so the proxy's queue bound is reachable with a few clients."""
    from ray import serve

    from cluster.serve import ServeConfig
    from cluster.serve_deploy import application_config, deploy

    copy = tmp_path_factory.mktemp("guarded") / "model.pt"
    copy.write_bytes(resolve_checkpoint(run_dir).read_bytes())
    cfg = ServeConfig(checkpoint=str(copy), name="guarded", route_prefix="/guarded", num_cpus=0.1, threads=1,
                      max_ongoing_requests=1, max_queued_requests=1, max_batch_size=1, retry_after_s=2,
                      port=served[0].port, access_log=False)
    url = deploy(cfg)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield cfg, application_config(cfg), client
    serve.delete(cfg.name)


def test_past_the_queue_bound_requests_get_503_with_retry_after(guarded, test_images) -> None:
    _, _, client = guarded
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda im: predict(client, big_png(im)), test_images[:48]))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers["retry-after"] == "2"
    assert predict(client, png(test_images[0])).status_code == 200   # and then it serves again


def test_a_partial_user_config_is_merged_with_the_defaults(guarded) -> None:
    """As a RayService that sets only one batching field: the replica keeps the others, no crash loop."""
    from cluster.serve_deploy import apply_application

    cfg, app, client = guarded
    replica = client.get("/healthz").json()["replica"]
    apply_application({**app, "deployments": [{**app["deployments"][0], "user_config": {"batch_wait_timeout_s": 0.02}}]},
                      timeout_s=120)
    assert client.get("/v1/model").json()["batching"] == {"max_batch_size": 1, "batch_wait_timeout_s": 0.02}
    assert client.get("/healthz").json()["replica"] == replica   # reconfigured in place


def test_a_replica_refuses_a_checkpoint_that_changed_under_its_pin(guarded, run_dir: Path) -> None:
    """The file behind a running deployment is replaced; a replica added later (scale-up, or a restart
    after a crash) finds another content id and refuses to start, while the running one keeps serving."""
    from cluster.serve_deploy import apply_application
    from resnet_dist.checkpoint import load_checkpoint, save_checkpoint

    cfg, app, client = guarded
    pinned = app["args"]["checkpoint_id"]
    assert client.get("/v1/model").json()["checkpoint_id"] == pinned
    changed = load_checkpoint(cfg.checkpoint)
    changed["epoch"] = changed["epoch"] + 1
    save_checkpoint(changed, cfg.checkpoint)
    assert checkpoint_id(cfg.checkpoint) != pinned
    with pytest.raises(RuntimeError, match=f"pinned to {pinned}"):
        apply_application({**app, "deployments": [{**app["deployments"][0], "num_replicas": 2}]}, timeout_s=180)
    model = client.get("/v1/model")
    assert model.status_code == 200 and model.json()["checkpoint_id"] == pinned


def test_a_client_cannot_lift_the_request_timeout(served, run_dir: Path, test_images) -> None:
    """Serve lets a request lift its timeout by a header (x-request-timeout-seconds: 0) and applies one
    cluster-wide value; the replica keeps this application's own: a request held 3 s in the batcher
    gets its 408 after 1 s, header or not."""
    from ray import serve

    from cluster.serve import ServeConfig
    from cluster.serve_deploy import deploy

    cfg = ServeConfig(checkpoint=str(run_dir), name="deadline", route_prefix="/deadline", num_cpus=0.1, threads=1,
                      max_batch_size=8, batch_wait_timeout_s=3.0, request_timeout_s=1.0,
                      port=served[0].port, access_log=False)
    url = deploy(cfg)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for headers in ({}, {"x-request-timeout-seconds": "0"}):   # without the replica's own: 200 after 3 s
                r = client.post("/v1/predict", content=png(test_images[0]),
                                headers={"Content-Type": "image/png", **headers})
                assert r.status_code == 408 and "timed out after 1 s" in r.json()["error"], (headers, r.text)
            assert client.get("/healthz").status_code == 200
    finally:
        serve.delete(cfg.name)
