"""Inference without Ray: request decoding/validation, batched top-k prediction, checkpoint lookup.

Request images are PNG or JPEG bytes. Their declared size is checked from the
header before any pixel is decoded (a tiny PNG can claim 20000x20000 and
expand to 1.2 GB), then they are converted to RGB and, when not already the
model's input size, resized to it with PIL bicubic -- the same policy as
`prepare_data.py --resize`: the aspect ratio is not kept, an alpha channel
is dropped (not composited).

Prediction uses the checkpoint's mean/std and `predict_logits` WITHOUT flip
test-time augmentation (`FLIP_TTA = False`): one forward pass per image.
Offline evaluation that should match the server must use `flip_tta=False` too.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from resnet_dist.augment import normalize
from resnet_dist.checkpoint import SERVING_ORDER, CheckpointError, load_model
from resnet_dist.checkpoint import resolve_checkpoint as _resolve
from resnet_dist.config import RunConfig
from resnet_dist.constants import IMAGE_SIZE
from resnet_dist.engine import Precision, predict_logits, select_device, select_precision

FLIP_TTA = False                         # serving does one forward pass per image
IMAGE_FORMATS = ("PNG", "JPEG")          # what PIL may open; everything else is refused
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096   # declared width*height above this is refused (16.8 MP)



class InputError(ValueError):
    """A request that must not reach the model; `status` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- request decoding


def decode_image(data: bytes, size: int = IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (size, size, 3); InputError (400) for anything else.

    The declared width x height is checked from the header, before decoding.
    """
    if not data:
        raise InputError("empty image")
    try:
        # Image.open parses only the header; pixels are decoded by .load() below.
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise InputError("not a PNG or JPEG image") from None
    except Image.DecompressionBombError:   # PIL's own limit (2 x 89 MP) hit while reading the header
        raise InputError(f"image too large: declared size exceeds {max_pixels} pixels") from None
    except Exception as e:   # a hostile header can raise almost anything inside PIL
        raise InputError(f"unreadable image header ({type(e).__name__})") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise InputError(f"image too large: declared size {w}x{h} exceeds {max_pixels} pixels")
    try:
        img.load()
        rgb = img.convert("RGB")
    except Exception as e:   # truncated or corrupt pixel data
        raise InputError(f"corrupt image data ({type(e).__name__})") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def media_type(content_type: str | None) -> str:
    """`image/png; charset=x` -> `image/png` (lower case; '' when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def multipart_file(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The bytes of form field `field` in a multipart/form-data body; InputError (400) if absent."""
    # The stdlib MIME parser reads multipart/form-data once it is given the header with the boundary.
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart() or msg.defects:
        raise InputError("malformed multipart/form-data body")
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == field:
            return part.get_payload(decode=True) or b""
    raise InputError(f"multipart/form-data body has no field {field!r}")


def decode_batch_json(body: bytes, max_images: int) -> list[bytes]:
    """`{"images": [base64, ...]}` -> raw image bytes; 400 if malformed, 413 if over `max_images`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InputError("malformed JSON body") from None
    except RecursionError:   # [[[[...]]]] nested past Python's recursion limit: not an image list
        raise InputError("malformed JSON body (nested too deeply)") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise InputError('body must be {"images": [base64 strings]}')
    if not images:
        raise InputError("no images given")
    if len(images) > max_images:
        raise InputError(f"too many images: {len(images)} > {max_images}", status=413)
    out = []
    for i, s in enumerate(images):
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise InputError(f"images[{i}]: malformed base64") from None
    return out


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True, eq=False)
class Predictor:
    """A loaded checkpoint ready to classify uint8 NHWC batches."""

    model: nn.Module
    ckpt: dict[str, Any]
    device: torch.device
    precision: Precision
    checkpoint_id: str        # first 12 hex digits of the checkpoint file's sha256

    @property
    def classes(self) -> list[str]:
        return list(self.ckpt["classes"])

    @property
    def version(self) -> str:
        """What a prediction names as its model: checkpoint id and the code version that trained it."""
        return f"{self.checkpoint_id}+{self.ckpt.get('code_version', 'unknown')}"

    def info(self) -> dict[str, Any]:
        """Model card: flavor, classes, test accuracy (None when not recorded), provenance."""
        metrics = self.ckpt.get("metrics") or {}
        test_acc = metrics.get("test_acc")   # written by jobs that evaluate on test; training records val only
        return {
            "flavor": self.ckpt["model_config"]["flavor"],
            "classes": self.classes,
            "test_accuracy": None if test_acc is None else float(test_acc),
            "val_accuracy": metrics.get("val_acc"),
            "checkpoint_id": self.checkpoint_id,
            "version": self.version,
            "data_fingerprint": self.ckpt.get("data_fingerprint"),
            "code_version": self.ckpt.get("code_version"),
            "epoch": self.ckpt.get("epoch"),
            "flip_tta": FLIP_TTA,
        }


def checkpoint_id(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_predictor(path: str | os.PathLike, device: torch.device | None = None) -> Predictor:
    """Resolve `path` (see `resolve_checkpoint`), load it with weights_only=True, pick precision
    the way offline evaluation does (fp32 on CPU, the run's AMP setting on CUDA)."""
    file = resolve_checkpoint(path)
    device = device or select_device()
    model, ckpt = load_model(file, device)
    precision = select_precision(RunConfig.from_dict(ckpt["run_config"]).train, device)
    return Predictor(model, ckpt, device, precision, checkpoint_id(file))


def predict_probs(p: Predictor, images: np.ndarray, flip_tta: bool = FLIP_TTA) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> softmax probabilities (N, classes), float32 on the CPU."""
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)).to(p.device), p.ckpt["mean"], p.ckpt["std"])
    if p.precision.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return torch.softmax(predict_logits(p.model, x, p.precision, flip_tta), dim=1).cpu()


def top_k(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per image, the k most probable classes as [{"class", "index", "probability"}], best first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"class": classes[i], "index": i, "probability": round(v, 6)}
             for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]


def predict_top_k(p: Predictor, images: np.ndarray, k: int, flip_tta: bool = FLIP_TTA) -> list[list[dict[str, Any]]]:
    """The batched predict function: uint8 NHWC batch -> top-k classes/probabilities per image."""
    return top_k(predict_probs(p, images, flip_tta), p.classes, k)


# --------------------------------------------------------------------------- checkpoint lookup


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint serving loads from `path`: a file; in a sweep or fine-tuning directory its
    fine-tuned model (finetuned.pt) before the selected trial's best.pt; a directory with
    checkpoint.pt; or a run directory's best.pt (resnet_dist.checkpoint.SERVING_ORDER)."""
    return _resolve(path, SERVING_ORDER)
