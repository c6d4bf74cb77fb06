"""The device paths of the training core, on every device this machine has: the CPU always,
and CUDA where a GPU is (bench/gpu_check.sh runs this file there, without Ray).

What "auto" picks per device, mixed precision with and without loss scaling, channels_last,
device-side batched augmentation, torch.compile, and checkpoints written from a model on the
device that load back on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from resnet_dist.checkpoint import build_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from resnet_dist.config import ModelConfig, RunConfig, TrainConfig
from resnet_dist.constants import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from resnet_dist.engine import (
    Precision, cpu_has_avx512, cpu_has_native_bf16, evaluate, select_device, select_precision, train_epoch,
)
from resnet_dist.loader import ArrayLoader
from resnet_dist.training import build_training

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batches(device: str, n: int = 64, classes: int = 4) -> ArrayLoader:
    """Learnable data on `device`: each class a brightness level under noise."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = (torch.randint(0, 40, (n, 32, 32, 3), generator=g) + 50 * labels[:, None, None, None]).to(torch.uint8)
    cfg = RunConfig().data
    return ArrayLoader(images.to(device), labels.to(device), 16, CIFAR10_MEAN, CIFAR10_STD, data=cfg, train=True)


def _run(device: str, amp: str, channels_last: str = "auto", compile: bool = False, steps_epochs: int = 3):
    cfg = RunConfig().replace(model={"flavor": "debug", "num_classes": 4},
                              train={"amp": amp, "channels_last": channels_last, "compile": compile,
                                     "epochs": steps_epochs}, optim={"lr": 0.05})
    dev = torch.device(device)
    loader = _batches(device)
    torch.manual_seed(0)
    state = build_training(cfg, cfg.model, len(loader), dev)
    stats = []
    for epoch in range(steps_epochs):
        loader.set_epoch(epoch)
        stats.append(train_epoch(state.model, loader, state.optimizer, state.scheduler, state.loss_fn, dev,
                                 state.precision, state.scaler))
    return cfg, state, stats


def test_auto_picks_cuda_with_amp_and_channels_last_on_a_gpu():
    device = select_device()
    p = select_precision(TrainConfig(), device)
    if torch.cuda.is_available():
        assert device.type == "cuda"
        assert p.channels_last and p.autocast_dtype in (torch.bfloat16, torch.float16)
    else:
        # This CPU's own probes decide (tests/unit/test_engine.py covers each answer).
        assert device.type == "cpu"
        assert p == Precision(torch.bfloat16 if cpu_has_native_bf16() else None, cpu_has_avx512())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_steps_learn_under_each_precision(device, amp):
    """fp16 comes with a GradScaler (loss scaling), bf16 and fp32 without; all three learn."""
    cfg, state, stats = _run(device, amp)
    assert (state.scaler is not None) == (amp == "fp16")
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    assert stats[-1].loss < stats[0].loss, [s.loss for s in stats]
    assert stats[-1].images == 64 and stats[-1].steps == 4   # 64 images at batch 16


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_matches_contiguous(device):
    """The same seeded run in channels_last and in the default layout gives the same model
    (up to float reassociation), so the layout is a speed choice only."""
    _, a, _ = _run(device, "off", channels_last="on", steps_epochs=1)
    _, b, _ = _run(device, "off", channels_last="off", steps_epochs=1)
    assert a.precision.channels_last and not b.precision.channels_last
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_device_side_augmentation_stays_on_the_device(device):
    loader = _batches(device)
    x, y = next(iter(loader))
    assert x.device.type == device and y.device.type == device
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    # Normalised: a uint8 image maps into about [-2.1, 2.2] with CIFAR's mean and std.
    assert -2.5 < float(x.min()) and float(x.max()) < 2.5


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_trains_and_its_checkpoint_loads_on_the_cpu(device, tmp_path, monkeypatch):
    """torch.compile wraps the model; the checkpoint holds the bare, CPU weights all the same.
    On the CPU the wrapper is traced by dynamo but not code-generated (backend "eager"): the
    inductor C++ build costs ~25 s here and is the GPU check's to exercise (bench/gpu_check.sh)."""
    if device == "cpu":
        import functools

        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg, state, stats = _run(device, "off", compile=True, steps_epochs=1)
    assert hasattr(state.model, "_orig_mod")
    ckpt = build_checkpoint(state.model, model_config=ModelConfig(**cfg.model.__dict__), run_config=cfg.to_dict(),
                            classes=CIFAR10_CLASSES[:4], mean=CIFAR10_MEAN, std=CIFAR10_STD, data_fingerprint="x",
                            epoch=1, metrics={}, optimizer=state.optimizer, scheduler=state.scheduler)
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "c.pt"))
    assert all(v.device.type == "cpu" for v in loaded["model_state"].values())
    assert not any(k.startswith("_orig_mod") for k in loaded["model_state"])
    model = model_from_checkpoint(loaded)
    x, y = next(iter(_batches("cpu")))
    with torch.no_grad():
        ref = state.model.eval()(x.to(device)).float().cpu()
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_under_autocast_counts_every_image(device):
    _, state, _ = _run(device, "bf16", steps_epochs=1)
    loader = _batches(device)
    val = ArrayLoader(loader.images, loader.labels, 24, CIFAR10_MEAN, CIFAR10_STD)   # 64 = 24 + 24 + 16
    result = evaluate(state.model, val, 4, torch.device(device), state.precision, flip_tta=True)
    assert result.images == 64 and result.confusion.sum() == 64 and 0 <= result.accuracy <= 1
