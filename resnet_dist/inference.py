"""Inference without Ray or HTTP: image decoding/validation, batched top-k prediction, checkpoint lookup.

Images are PNG or JPEG bytes. Their declared size is checked from the
header before any pixel is decoded (a tiny PNG can claim 20000x20000 and
expand to 1.2 GB), then they are converted to RGB and, when not already the
model's input size, resized to it with PIL bicubic -- the same policy as
`prepare_data.py --resize`: the aspect ratio is not kept, an alpha channel
is dropped (not composited). How a request carries the image (media types,
multipart, JSON batches, body limits, status codes) is the server's business:
cluster/http_requests.py.

Prediction normalises with the checkpoint's mean/std and runs WITHOUT flip
test-time augmentation (`FLIP_TTA = False`): one forward pass per image.
Offline evaluation that should match the server must use `flip_tta=False` too.
"""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from resnet_dist import storage
from resnet_dist.augment import normalize
from resnet_dist.checkpoint import SERVING_ORDER, load_model
from resnet_dist.checkpoint import resolve_checkpoint as _resolve
from resnet_dist.config import RunConfig
from resnet_dist.constants import IMAGE_SIZE
from resnet_dist.engine import Precision, predict_logits, select_device, select_precision

log = logging.getLogger(__name__)

FLIP_TTA = False                         # serving does one forward pass per image
IMAGE_FORMATS = ("PNG", "JPEG")          # what PIL may open; everything else is refused
# Declared width*height above this is refused before decoding: a 32x32 model gains nothing from
# more, and a 1 MP decode is ~3 MB of RGB and tens of ms on one core (16.8 MP was ~50 MB, ~0.5 s).
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024
# A server decodes an image this small (declared width x height) where the request is handled;
# larger ones off its event loop: a thread hand-off costs more than decoding a 32x32 PNG (~0.06 ms).
INLINE_DECODE_PIXELS = 64 * 64



class InputError(ValueError):
    """Image bytes that must not reach the model (not a PNG/JPEG, corrupt, too many pixels)."""


# --------------------------------------------------------------------------- image decoding


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """PNG/JPEG bytes -> a PIL image whose header is read and checked, no pixel decoded yet
    (microseconds); InputError for anything else or a declared width x height over `max_pixels`."""
    if not data:
        raise InputError("empty image")
    try:
        # Image.open parses only the header; pixels are decoded by .load() in decode_pixels.
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
    return img


def decode_pixels(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """An image from `open_image` -> uint8 (size, size, 3). A JPEG is decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) still at least `size` on each side (PIL's `draft`): a 1024x1024
    JPEG is decoded as 128x128, 64x fewer pixels."""
    try:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))   # only ever scales down to >= size; a no-op at 32x32
        img.load()
        rgb = img.convert("RGB")
    except Exception as e:   # truncated or corrupt pixel data
        raise InputError(f"corrupt image data ({type(e).__name__})") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def decode_image(data: bytes, size: int = IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (size, size, 3); InputError for anything else. The declared
    width x height is checked from the header before any pixel is decoded (`open_image`)."""
    return decode_pixels(open_image(data, max_pixels), size)


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True, eq=False)
class Predictor:
    """A loaded checkpoint ready to classify uint8 NHWC batches."""

    model: nn.Module
    ckpt: dict[str, Any]
    device: torch.device
    precision: Precision
    checkpoint_id: str        # first 12 hex digits of the checkpoint file's sha256
    # `model` is a frozen TorchScript graph from uint8 NHWC to fp32 logits, with the normalisation
    # and autocast's casts in it (freeze_predictor); otherwise the eager model, normalised NCHW in.
    frozen: bool = False

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
            "graph": "torchscript" if self.frozen else "eager",
        }


def checkpoint_id(path: str | os.PathLike) -> str:
    if storage.is_uri(path):
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:12]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


# A server's model thread needs the GIL back after every op of the forward pass, and waits up to
# Python's switch interval (5 ms by default) for an event loop that is running Python. Under load
# that convoy starves the model, and open-loop serving tipped into a queue it did not leave;
# at 0.5 ms bench/serve_load.py's soak p50 went from 296 to 16.5 ms (docs/benchmarks.md).
SERVER_SWITCH_INTERVAL_S = 0.0005


def share_gil_with_model_thread() -> None:
    """Set this process's GIL switch interval for a server whose model runs in a thread beside
    an event loop (SERVER_SWITCH_INTERVAL_S says why). Process-wide, so only servers call it."""
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL_S)


def freeze_startup_heap() -> int:
    """Move every object alive now (imported modules: torch, Ray, FastAPI; the loaded model)
    out of the garbage collector's reach, and return how many there were. Call it once a
    server has started. A full collection, which Python runs by itself every so often, then
    walks only what the server made since. Unfrozen, it walks every startup object while every
    thread waits: 307,000 objects and 129-157 ms in a process with a replica's imports and model
    (bench/gc_pause.py), a stall that lands in the p99 of every request in flight. The cost:
    a reference cycle among those objects that becomes garbage later is never freed."""
    gc.collect()   # free what startup left behind first, so it is not kept forever
    gc.freeze()
    return gc.get_freeze_count()


def load_predictor(path: str | os.PathLike, device: torch.device | None = None) -> Predictor:
    """Resolve `path` (see `resolve_checkpoint`), load it with weights_only=True, pick precision
    the way offline evaluation does: the run's settings, "auto" resolved on this device
    (resnet_dist.engine.select_precision: bf16 on CUDA and on CPUs with native bf16)."""
    file = resolve_checkpoint(path)
    device = device or select_device()
    model, ckpt = load_model(file, device)
    precision = select_precision(RunConfig.from_dict(ckpt["run_config"]).train, device)
    return Predictor(model, ckpt, device, precision, checkpoint_id(file))


def predict_probs(p: Predictor, images: np.ndarray, flip_tta: bool = FLIP_TTA) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> softmax probabilities (N, classes), float32 on the CPU."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(p.device)
    if p.frozen:   # normalisation, casts and the model in one call: the GIL is let go once
        logits = p.model(x)
        if flip_tta:
            logits = 0.5 * (logits + p.model(x.flip(2)))   # NHWC: dim 2 is the width
    else:
        logits = predict_logits(p.model, _model_input(x, p.ckpt["mean"], p.ckpt["std"], p.precision.channels_last),
                                p.precision, flip_tta)
    return torch.softmax(logits, dim=1).cpu()


def _model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> the model's normalised NCHW input, in channels_last memory when asked."""
    x = normalize(images, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _FromPixels(nn.Module):
    """uint8 NHWC -> fp32 logits: what predict_probs does before softmax, as one module to trace."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], channels_last: bool) -> None:
        super().__init__()
        self.model, self.mean, self.std, self.channels_last = model, tuple(mean), tuple(std), channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_model_input(images, self.mean, self.std, self.channels_last)).float()


# Servers run the model as a frozen TorchScript graph, with the input's normalisation in it. A
# batch then runs in C++ and takes the GIL back once per call; eager PyTorch takes it back after
# each of its ops (the normalisation's too), and a model thread beside an event loop that is
# running Python waits for it each time (a GIL convoy).
# Alone it is faster too (conv + BN folded, no Python dispatch per op). bench/serve_load.py's (c)
# measures both models, alone and beside a thread running Python. torch.jit is deprecated in
# favour of torch.compile and torch.export, which need a C++ toolchain and seconds to minutes of
# compiling on each replica; tracing takes a fraction of a second. Any failure, or outputs that
# differ from the eager model's, keeps the eager model.
FREEZE_EXAMPLE_BATCH = 16      # images in the example batch traced and checked
# Largest |softmax difference| frozen vs eager on that batch: well above bf16's rounding (about 3
# significant digits, and folding BN reorders the sums), well below a different model's.
FREEZE_MAX_PROB_DIFF = 0.02


def freeze_predictor(p: Predictor) -> Predictor:
    """`p` with its model traced and frozen (torch.jit.trace + freeze, eval mode, under the
    predictor's autocast so the casts are recorded in the graph), checked against the eager model
    on a random batch; `p` itself, with a warning, when tracing fails or the outputs differ."""
    if p.frozen:
        return p
    module = _FromPixels(p.model.eval(), p.ckpt["mean"], p.ckpt["std"], p.precision.channels_last).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (FREEZE_EXAMPLE_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), generator=gen,
                      dtype=torch.uint8).to(p.device)
    try:
        # Off while tracing, so the trace records autocast's casts rather than leaving them to a
        # pass at call time; the setter returns the previous value, restored after.
        previous = torch._C._jit_set_autocast_mode(False)
        try:
            with warnings.catch_warnings(), torch.no_grad(), p.precision.autocast(p.device):
                warnings.simplefilter("ignore", FutureWarning)   # torch.jit's deprecation notice
                # normalize's mean/std tensors become constants of the graph: the checkpoint's, as meant.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                graph = torch.jit.freeze(torch.jit.trace(module, x, check_trace=False))
        finally:
            torch._C._jit_set_autocast_mode(previous)
        frozen = replace(p, model=graph, frozen=True)
        with torch.no_grad():
            images = x.cpu().numpy()
            diff = (predict_probs(p, images, False) - predict_probs(frozen, images, False)).abs().max().item()
    except Exception as e:   # an op or device TorchScript cannot trace: serve eagerly
        log.warning("serving the eager model: tracing it failed (%s: %s)", type(e).__name__, e)
        return p
    if not diff <= FREEZE_MAX_PROB_DIFF:
        log.warning("serving the eager model: the frozen graph's probabilities differ from it by %.4f", diff)
        return p
    return frozen


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
