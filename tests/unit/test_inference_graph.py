"""The serving model as a frozen TorchScript graph, normalisation included (resnet_dist.inference.freeze_predictor)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from resnet_dist.checkpoint import build_checkpoint, save_checkpoint
from resnet_dist.config import ModelConfig, RunConfig
from resnet_dist.engine import Precision
from resnet_dist.inference import freeze_predictor, load_predictor, predict_probs
from resnet_dist.models import build_model


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    mc = ModelConfig(flavor="debug")
    torch.manual_seed(0)
    model = build_model(mc)
    # Trained-looking BN statistics, so that folding them into the convs is exercised.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(build_checkpoint(model, model_config=mc, run_config=RunConfig().to_dict(),
                                     classes=[str(i) for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3,
                                     data_fingerprint="fp", epoch=1, metrics={}), path)
    return load_predictor(path, torch.device("cpu"))


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("precision", [Precision(None, False), Precision(None, True), Precision(torch.bfloat16, True)],
                         ids=["fp32", "fp32-channels_last", "bf16-channels_last"])
def test_the_frozen_graph_predicts_what_the_eager_model_does_at_any_batch_size(predictor, precision) -> None:
    eager = replace(predictor, precision=precision)
    frozen = freeze_predictor(eager)
    assert frozen.frozen and isinstance(frozen.model, torch.jit.ScriptModule)
    assert frozen.info()["graph"] == "torchscript" and eager.info()["graph"] == "eager"
    assert frozen.checkpoint_id == eager.checkpoint_id and frozen.classes == eager.classes
    tol = 1e-5 if precision.autocast_dtype is None else 2e-2   # bf16 rounds to ~3 significant digits
    for n in (1, 7, 64):   # traced at 16: the batch dimension stays free
        x = images(n, seed=n)
        a, b = predict_probs(eager, x), predict_probs(frozen, x)
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (n, 10)
        assert (a - b).abs().max().item() <= tol
    # Flip TTA (offline evaluation's): the mirrored batch through the same graph.
    x = images(5, seed=99)
    assert (predict_probs(eager, x, flip_tta=True) - predict_probs(frozen, x, flip_tta=True)).abs().max().item() <= tol
    if precision.autocast_dtype is None:   # a mirror changes this random model's outputs by ~4e-3
        assert (predict_probs(frozen, x, flip_tta=True) - predict_probs(frozen, x)).abs().max().item() > tol
    assert freeze_predictor(frozen) is frozen


class Noisy(nn.Module):
    """A model whose outputs change with every call: a trace of it cannot match it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], 10) * 100


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor):
        return {"logits": x.mean()}, "not a tensor"


@pytest.mark.parametrize("model, message", [(Noisy(), "differ from it"), (Untraceable(), "tracing it failed")])
def test_a_model_it_cannot_freeze_faithfully_is_served_eagerly(predictor, model, message, caplog) -> None:
    eager = replace(predictor, model=model)
    with caplog.at_level(logging.WARNING, logger="resnet_dist.inference"):
        assert freeze_predictor(eager) is eager
    assert "serving the eager model" in caplog.text and message in caplog.text
    assert torch._C._jit_set_autocast_mode(True) is True   # the tracing switch was restored
