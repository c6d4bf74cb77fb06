import numpy as np
import pytest
import torch

from resnet_dist.config import ModelConfig, OptimConfig, RunConfig, TrainConfig
from resnet_dist.engine import (
    Precision, build_optimizer, evaluate, lr_factor, select_precision, train_epoch,
)
from resnet_dist.loader import ArrayLoader
from resnet_dist.models import build_model

CPU = torch.device("cpu")
FP32 = Precision(None, False)


def toy_data(n=256, seed=0):
    """Class k = a bright square in colour channel k (k = 3: all channels): learnable in a
    few steps, and unchanged by horizontal flips and small crops."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 40, size=(n, 32, 32, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        channels = slice(None) if k == 3 else int(k)
        images[i, 8:24, 8:24, channels] = 230
    return images, labels


def test_weight_decay_skips_bn_and_bias_and_scales_lr():
    model = build_model(ModelConfig(flavor="debug"))
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=1e-3), lr_scale=lambda n: 1.0 if n.startswith("fc") else 0.1)
    by_key = sorted((round(g["lr"], 6), g["weight_decay"]) for g in opt.param_groups)
    assert by_key == [(0.01, 0.0), (0.01, 1e-3), (0.1, 0.0), (0.1, 1e-3)]
    for g in opt.param_groups:
        assert all((p.ndim <= 1) == (g["weight_decay"] == 0.0) for p in g["params"])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    assert isinstance(build_optimizer(model, OptimConfig(optimizer="adamw")), torch.optim.AdamW)


def test_frozen_parameters_are_left_out():
    model = build_model(ModelConfig(flavor="debug"))
    for p in model.parameters():
        p.requires_grad = False
    model.fc.weight.requires_grad = True
    opt = build_optimizer(model, OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == 1


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_warmup_then_decay(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_epochs=1, final_lr_fraction=0.0)
    f = [lr_factor(cfg, s, 10, 4) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))   # non-increasing after warm-up
    assert f[-1] < 0.05


def test_step_schedule():
    cfg = OptimConfig(schedule="step", step_milestones=(2, 3), step_gamma=0.1)
    assert [lr_factor(cfg, e * 10, 10, 4) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.01])


@pytest.mark.parametrize("bf16, avx512", [(False, False), (False, True), (True, True)])
def test_cpu_precision_auto_follows_the_cpu_and_explicit_settings_win(monkeypatch, bf16, avx512):
    """auto: bf16 only with native bf16 instructions (emulated bf16 is slower than fp32), channels_last on AVX-512."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    assert select_precision(TrainConfig(), CPU) == Precision(torch.bfloat16 if bf16 else None, avx512)
    assert select_precision(TrainConfig(amp="off", channels_last="off"), CPU) == Precision(None, False)
    assert select_precision(TrainConfig(amp="bf16", channels_last="on"), CPU) == Precision(torch.bfloat16, True)


def test_training_learns_toy_task_and_evaluate_counts_everything():
    torch.manual_seed(0)
    images, labels = toy_data()
    cfg = RunConfig().replace(model={"flavor": "debug", "num_classes": 4}, optim={"lr": 0.05, "schedule": "constant"})
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    loader = ArrayLoader.from_numpy(images, labels, batch_size=32, mean=(0.1,) * 3, std=(0.3,) * 3, data=cfg.data, train=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    first = train_epoch(model, loader, opt, None, loss_fn, CPU, FP32)
    for epoch in range(1, 4):
        loader.set_epoch(epoch)
        last = train_epoch(model, loader, opt, None, loss_fn, CPU, FP32, grad_accum=2)
    assert last.loss < first.loss
    assert first.images == 256 and first.steps == 8 and first.data_wait_seconds >= 0
    eval_loader = ArrayLoader.from_numpy(images[:250], labels[:250], batch_size=64, mean=(0.1,) * 3, std=(0.3,) * 3)
    res = evaluate(model, eval_loader, 4, CPU, FP32, flip_tta=True)
    assert res.images == 250 and res.confusion.sum() == 250
    assert res.accuracy > 0.6
