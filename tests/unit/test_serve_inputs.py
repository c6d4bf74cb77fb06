"""Request decoding and validation for serving, checkpoint lookup, and top-k (no Ray)."""

from __future__ import annotations

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

from resnet_dist.checkpoint import CheckpointError
from resnet_dist.inference import (
    InputError, decode_batch_json, decode_image, media_type, multipart_file, resolve_checkpoint,
    top_k,
)


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
def test_non_images_are_400(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as e:
        decode_image(data)
    assert e.value.status == 400


def test_truncated_png_is_400(rgb32: np.ndarray) -> None:
    with pytest.raises(InputError, match="corrupt image data") as e:
        decode_image(encode(rgb32)[:60])
    assert e.value.status == 400


@pytest.mark.parametrize("side", [5000, 20000, 100000])
def test_decompression_bomb_is_refused_from_the_header(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # .load() would decode side*side pixels; it must never be reached.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(InputError, match="image too large") as e:
        decode_image(png_header_only(side, side))
    assert e.value.status == 400


def test_pixel_limit_is_configurable(rgb32: np.ndarray) -> None:
    with pytest.raises(InputError, match="32x32 exceeds 1000 pixels"):
        decode_image(encode(rgb32), max_pixels=1000)


def test_media_type() -> None:
    assert media_type("Image/PNG; charset=binary") == "image/png"
    assert media_type(None) == ""


def test_multipart_file(rgb32: np.ndarray) -> None:
    png = encode(rgb32)
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nhi\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--XyZ--\r\n")
    assert multipart_file(body, "multipart/form-data; boundary=XyZ") == png
    with pytest.raises(InputError, match="no field 'file'"):
        multipart_file(body.replace(b'name="file"', b'name="img"'), "multipart/form-data; boundary=XyZ")
    with pytest.raises(InputError, match="malformed multipart"):
        multipart_file(b"garbage", "multipart/form-data")


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
        with pytest.raises(InputError, match=message) as e:
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
    with pytest.raises(InputError) as err:
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
