"""Serving inputs without Ray: image decoding (resnet_dist.inference), HTTP request parsing
(cluster.http_requests), top-k, checkpoint lookup, and the application config `deploy` applies."""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from starlette.requests import Request

from cluster.http_requests import (
    RequestError, authorize, decode_batch_json, media_type, multipart_file, read_body, require_media_type, within,
)
from resnet_dist.checkpoint import CheckpointError
from resnet_dist.inference import DEFAULT_MAX_IMAGE_PIXELS, InputError, checkpoint_id, decode_image, resolve_checkpoint, top_k

REPO = Path(__file__).resolve().parents[2]


def encode(img: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but which carries almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def rgb32() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_png_roundtrip_is_lossless(rgb32: np.ndarray) -> None:
    out = decode_image(encode(rgb32))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, rgb32)


def test_jpeg_grey_and_rgba_become_rgb(rgb32: np.ndarray) -> None:
    assert decode_image(encode(rgb32, "JPEG")).shape == (32, 32, 3)
    assert decode_image(encode(Image.fromarray(rgb32[..., 0], "L"))).shape == (32, 32, 3)
    rgba = np.dstack([rgb32, np.full((32, 32), 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgba, "RGBA"))), rgb32)   # alpha dropped


def test_other_sizes_are_resized_bicubic() -> None:
    big = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(big).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(decode_image(encode(big)), expected)
    assert decode_image(encode(big), size=16).shape == (16, 16, 3)


@pytest.mark.parametrize("data, message", [
    (b"", "empty image"),
    (b"hello, this is not an image", "not a PNG or JPEG"),
    (encode(Image.new("RGB", (8, 8)), "GIF"), "not a PNG or JPEG"),   # a real image, but not an accepted format
])
def test_non_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_image(data)


def test_truncated_png_is_refused(rgb32: np.ndarray) -> None:
    with pytest.raises(InputError, match="corrupt image data"):
        decode_image(encode(rgb32)[:60])


@pytest.mark.parametrize("side", [5000, 20000, 100000])
def test_decompression_bomb_is_refused_from_the_header(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # .load() would decode side*side pixels; it must never be reached.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(InputError, match="image too large"):
        decode_image(png_header_only(side, side))


def test_pixel_limit_is_configurable(rgb32: np.ndarray) -> None:
    with pytest.raises(InputError, match="32x32 exceeds 1000 pixels"):
        decode_image(encode(rgb32), max_pixels=1000)


def test_default_pixel_cap_is_a_megapixel_and_big_jpegs_decode_at_a_reduced_scale(monkeypatch) -> None:
    """A 32x32 model needs no more than 1024x1024, and a big JPEG is decoded at 1/8 scale (draft)."""
    assert DEFAULT_MAX_IMAGE_PIXELS == 1024 * 1024
    with pytest.raises(InputError, match="1025x1024 exceeds 1048576 pixels"):
        decode_image(png_header_only(1025, 1024))
    yy, xx = np.mgrid[0:1024, 0:1024]
    smooth = np.stack([xx // 4, yy // 4, (xx + yy) // 8], axis=-1).astype(np.uint8)
    data = encode(smooth, "JPEG")
    decoded: list[tuple[int, int]] = []
    from PIL import ImageFile

    load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)   # the size PIL decodes at, after draft()
        return load(self)

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", spy)
    out = decode_image(data)
    assert out.shape == (32, 32, 3) and decoded and decoded[0] == (128, 128)
    # Close to the full-resolution decode resized the same way (JPEG's own DCT scaling differs a little).
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 3


def test_media_type() -> None:
    assert media_type("Image/PNG; charset=binary") == "image/png"
    assert media_type(None) == ""
    assert require_media_type("image/png; x=y", ("image/png", "image/jpeg")) == "image/png"
    for given, message in (("text/plain", "'text/plain'; use one of image/png, image/jpeg"), (None, r"'\(none\)'")):
        with pytest.raises(RequestError, match=message) as e:
            require_media_type(given, ("image/png", "image/jpeg"))
        assert e.value.status == 415
    with pytest.raises(RequestError, match="use application/json$"):
        require_media_type("text/plain", ("application/json",))


def test_multipart_file(rgb32: np.ndarray) -> None:
    png = encode(rgb32)
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nhi\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--XyZ--\r\n")
    assert multipart_file(body, "multipart/form-data; boundary=XyZ") == png
    for args, message in (((body.replace(b'name="file"', b'name="img"'), "multipart/form-data; boundary=XyZ"),
                           "no field 'file'"), ((b"garbage", "multipart/form-data"), "malformed multipart")):
        with pytest.raises(RequestError, match=message) as e:
            multipart_file(*args)
        assert e.value.status == 400


def test_batch_json(rgb32: np.ndarray) -> None:
    png = encode(rgb32)
    b64 = base64.b64encode(png).decode()
    assert decode_batch_json(json.dumps({"images": [b64, b64]}).encode(), 4) == [png, png]
    cases = [
        (b"{not json", 400, "malformed JSON"),
        (b"\xff\xfe", 400, "malformed JSON"),
        (b'["a"]', 400, "body must be"),
        (b'{"images": [1]}', 400, "body must be"),
        (b'{"images": []}', 400, "no images"),
        (json.dumps({"images": ["!!notbase64!!"]}).encode(), 400, r"images\[0\]: malformed base64"),
        (json.dumps({"images": [b64] * 5}).encode(), 413, "too many images: 5 > 4"),
    ]
    for body, status, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            decode_batch_json(body, 4)
        assert e.value.status == status


def test_top_k_orders_and_clips() -> None:
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    out = top_k(probs, ["a", "b", "c"], 5)
    assert [[p["class"] for p in row] for row in out] == [["b", "c", "a"], ["a", "c", "b"]]
    assert out[0][0] == {"class": "b", "index": 1, "probability": pytest.approx(0.7)}


def test_resolve_checkpoint(tmp_path: Path) -> None:
    def touch(rel: str) -> Path:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        return p

    f = touch("a/model.pt")
    assert resolve_checkpoint(f) == f
    assert resolve_checkpoint(touch("ckdir/checkpoint.pt").parent) == tmp_path / "ckdir/checkpoint.pt"
    assert resolve_checkpoint(touch("run/best.pt").parent) == tmp_path / "run/best.pt"
    # A sweep directory holds the selected trial's best.pt too: the fine-tuned model is what is served.
    touch("sweep/best.pt")
    assert resolve_checkpoint(touch("sweep/finetuned.pt").parent) == tmp_path / "sweep/finetuned.pt"
    # As the source of fine-tuning, the same directory means its selected model.
    from resnet_dist.checkpoint import SOURCE_ORDER
    from resnet_dist.checkpoint import resolve_checkpoint as resolve_in_order

    assert resolve_in_order(tmp_path / "sweep", SOURCE_ORDER) == tmp_path / "sweep/best.pt"
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="looked for finetuned.pt, checkpoint.pt, best.pt"):
        resolve_checkpoint(tmp_path / "empty")


def test_deeply_nested_json_is_a_400_not_a_crash():
    with pytest.raises(RequestError) as err:
        decode_batch_json(b"[" * 100_000 + b"]" * 100_000, 64)
    assert err.value.status == 400 and "nested too deeply" in str(err.value)


def test_a_partial_user_config_keeps_the_other_defaults_and_bad_ones_are_one_line():
    """A RayService that sets only max_batch_size (k8s/rayservice.yaml) must not crash-loop."""
    from cluster.serve import ServeConfig
    from resnet_dist.config import ConfigError

    cfg = ServeConfig(checkpoint="x", max_batch_size=16, batch_wait_timeout_s=0.005)
    assert cfg.merged_user_config({"max_batch_size": 32}) == {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}
    assert cfg.merged_user_config({}) == cfg.merged_user_config(None) == cfg.user_config()
    for bad, message in (({"max_batch_size": 0}, "max_batch_size must be in"), ({"batch_size": 8}, "unknown user_config"),
                         ({"batch_wait_timeout_s": "soon"}, "user_config"), ({"max_batch_size": 1000}, "max_batch_size")):
        with pytest.raises(ConfigError, match=message) as err:
            cfg.merged_user_config(bad)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- request bodies


def body_request(chunks: list[bytes], headers: dict[str, str]) -> Request:
    """A Starlette request fed by an ASGI receive channel that delivers `chunks` (how the server reads bodies)."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages = messages or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive)


@pytest.mark.parametrize("chunks, headers, status, message", [
    ([b"x" * 11], {"content-length": "11"}, 413, "body of 11 bytes exceeds the limit of 10 bytes"),
    ([b"x"], {"content-length": "ten"}, 400, "invalid Content-Length"),
    ([b"x" * 6, b"x" * 6], {}, 413, "body exceeds the limit of 10 bytes"),   # chunked: counted while read
    ([], {}, 400, "empty body"),
])
def test_read_body_limits(chunks, headers, status, message) -> None:
    with pytest.raises(RequestError, match=message) as e:
        asyncio.run(read_body(body_request(chunks, headers), limit=10))
    assert e.value.status == status


def test_read_body_joins_chunks_up_to_the_limit() -> None:
    assert asyncio.run(read_body(body_request([b"abcde", b"fghij"], {}), limit=10)) == b"abcdefghij"


def test_api_key_from_a_bearer_token_or_x_api_key_header() -> None:
    authorize(body_request([], {}), None)   # no key configured: open
    for ok in ({"authorization": "Bearer s3cret"}, {"Authorization": "bearer s3cret"}, {"x-api-key": "s3cret"}):
        authorize(body_request([], ok), "s3cret")
    for bad in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic s3cret"}, {"x-api-key": ""},
                {"authorization": "Bearer s3cret", "x-api-key": "nope"}):
        with pytest.raises(RequestError, match="API key") as err:
            authorize(body_request([], bad), "s3cret")
        assert err.value.status == 401 and err.value.headers == {"WWW-Authenticate": "Bearer"}


def test_within_answers_408_at_its_deadline_and_passes_the_rest_through() -> None:
    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    async def own_timeout() -> None:
        raise TimeoutError("the work's own")

    async def quick() -> str:
        await asyncio.sleep(0)
        return "answer"

    with pytest.raises(RequestError, match="timed out after 0.05 s") as e:
        asyncio.run(within(0.05, slow()))
    assert e.value.status == 408
    with pytest.raises(TimeoutError, match="the work's own"):   # not mistaken for the deadline
        asyncio.run(within(5, own_timeout()))
    assert asyncio.run(within(5, quick())) == "answer"


def test_api_key_file_is_read_once_and_must_hold_a_key(tmp_path: Path) -> None:
    from cluster.serve import ServeConfig, read_api_key
    from resnet_dist.config import ConfigError

    (tmp_path / "key").write_text("  s3cret\n")   # as a Kubernetes Secret volume holds it
    assert read_api_key(str(tmp_path / "key")) == "s3cret"
    (tmp_path / "empty").write_text("\n")
    for path, message in ((tmp_path / "empty", "is empty"), (tmp_path / "missing", "cannot read it")):
        with pytest.raises(ConfigError, match=message):
            read_api_key(str(path))
    for bad, message in ((dict(max_queued_requests=0), "max_queued_requests"), (dict(decode_threads=0), "decode_threads"),
                         (dict(request_timeout_s=0), "request_timeout_s")):
        with pytest.raises(ConfigError, match=message):
            ServeConfig(checkpoint="x", **bad).validated()


def test_resnet_dist_knows_nothing_of_http_or_ray() -> None:
    """resnet_dist imports no web framework or Ray, and inference holds no HTTP status codes."""
    banned = {"fastapi", "starlette", "ray", "httpx", "aiohttp"}
    for path in sorted((REPO / "resnet_dist").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
    tree = ast.parse((REPO / "resnet_dist" / "inference.py").read_text())
    codes = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is int
             and 400 <= n.value < 600]
    assert not codes, f"HTTP status codes in resnet_dist/inference.py: {codes}"
    assert not any(isinstance(n, ast.Attribute) and n.attr == "status" for n in ast.walk(tree))


# --------------------------------------------------------------------------- what deploy applies


@pytest.fixture
def checkpoint_file(tmp_path: Path) -> Path:
    f = tmp_path / "run" / "best.pt"
    f.parent.mkdir()
    f.write_bytes(b"weights v1")   # nothing is loaded before a replica starts
    return f


def serve_config_file(*apps: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate({"applications": list(apps)})


def test_deploy_applies_a_valid_serve_config_whose_code_version_ignores_batching_and_scaling(checkpoint_file):
    """`deploy` reconfigures instead of replacing replicas exactly when Serve's code version of
    the config-file application (import path, runtime_env, args) stays the same."""
    import dataclasses

    from ray.serve._private.deploy_utils import get_app_code_version   # Serve's own rule, to check against

    from cluster.serve import DEPLOYMENT_NAME, IMPORT_PATH, LIVE_FIELDS, ServeConfig
    from cluster.serve_deploy import application_config

    cfg = ServeConfig(checkpoint=str(checkpoint_file.parent), name="clf", route_prefix="/clf")
    base = application_config(cfg)
    (app,) = serve_config_file(base).applications
    assert app.import_path == IMPORT_PATH and app.name == "clf" and app.route_prefix == "/clf"
    assert app.args["checkpoint"] == str(checkpoint_file.resolve())   # resolved: replicas may run elsewhere
    (dep,) = app.deployments
    assert dep.name == DEPLOYMENT_NAME and set(dep.user_config) == set(LIVE_FIELDS)
    assert dep.num_replicas == 1

    def version(c: ServeConfig) -> str:
        (a,) = serve_config_file(application_config(c)).applications
        return get_app_code_version(a)

    live = dataclasses.replace(cfg, max_batch_size=2, batch_wait_timeout_s=0.2)
    assert version(live) == version(dataclasses.replace(cfg, replicas=3)) == version(cfg)
    scaled = dataclasses.replace(cfg, replicas=2, max_replicas=4, target_ongoing_requests=4)
    # Turning autoscaling on or off is a new code version to Serve (it hashes the autoscaling
    # policy); changing its bounds is not.
    assert version(scaled) == version(dataclasses.replace(scaled, replicas=1, max_replicas=8))
    assert application_config(live)["deployments"][0]["user_config"] == {"max_batch_size": 2, "batch_wait_timeout_s": 0.2}
    auto = serve_config_file(application_config(scaled)).applications[0].deployments[0]
    assert auto.autoscaling_config == {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 4}
    for heavy in (dataclasses.replace(cfg, threads=2), dataclasses.replace(cfg, max_ongoing_requests=32),
                  dataclasses.replace(cfg, top_k=3)):
        assert version(heavy) != version(cfg)
    before = version(cfg)
    assert base["args"]["checkpoint_id"] == checkpoint_id(checkpoint_file)   # what every replica must find
    checkpoint_file.write_bytes(b"weights v2")   # a new model at the same path replaces the replicas
    assert version(cfg) != before
    assert application_config(cfg)["args"]["checkpoint_id"] == checkpoint_id(checkpoint_file)
    # A config pinned to the old file refuses the new one, in deploy as in a replica.
    from resnet_dist.config import ConfigError
    with pytest.raises(ConfigError, match="pinned to"):
        application_config(dataclasses.replace(cfg, checkpoint_id=base["args"]["checkpoint_id"]))
    # The job's runtime_env (a submitted job's working_dir) goes with it, so replicas import this code.
    env = {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}
    assert serve_config_file(application_config(cfg, env)).applications[0].runtime_env == env


def test_app_builder_builds_what_deploy_applies(checkpoint_file):
    from cluster.serve import ServeConfig, app_builder
    from cluster.serve_deploy import application_config

    for cfg in (ServeConfig(checkpoint=str(checkpoint_file)),
                # A max_ongoing_requests under the default batch size: the default must not fail
                # validation, since the real batch size arrives in the user_config.
                ServeConfig(checkpoint=str(checkpoint_file), max_ongoing_requests=8, max_batch_size=8)):
        bound = app_builder(application_config(cfg)["args"])
        assert type(bound).__name__ == "Application"
