import pytest
import torch

from resnet_dist.checkpoint import (
    CheckpointError, build_checkpoint, load_checkpoint, load_model, save_checkpoint, unwrap,
)
from resnet_dist.config import ModelConfig, RunConfig
from resnet_dist.constants import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from resnet_dist.engine import build_optimizer, build_scheduler
from resnet_dist.models import build_model


def make_ckpt(model, optimizer=None, scheduler=None):
    cfg = RunConfig().replace(model={"flavor": "debug"})
    return build_checkpoint(
        model, model_config=cfg.model, run_config=cfg.to_dict(), classes=CIFAR10_CLASSES,
        mean=CIFAR10_MEAN, std=CIFAR10_STD, data_fingerprint="abc", epoch=3, metrics={"val_acc": 0.5},
        optimizer=optimizer, scheduler=scheduler,
    )


def test_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(flavor="debug"))
    opt = build_optimizer(model, RunConfig().optim)
    sched = build_scheduler(opt, RunConfig().optim, 10, 2)
    # Train a step so BN running stats and optimizer state are non-trivial.
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    sched.step()
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    expected = model(x)
    path = save_checkpoint(make_ckpt(model, opt, sched), tmp_path / "c" / "checkpoint.pt")
    loaded, ckpt = load_model(path.parent)   # a directory with checkpoint.pt works too
    torch.testing.assert_close(loaded(x), expected)
    assert ckpt["classes"] == list(CIFAR10_CLASSES) and ckpt["epoch"] == 3
    assert ckpt["data_fingerprint"] == "abc" and ckpt["code_version"]
    assert ckpt["optimizer_state"]["state"] and ckpt["scheduler_state"]["last_epoch"] == 1
    assert not list(tmp_path.glob("c/*.tmp"))   # nothing left from the atomic write


def test_weights_are_unwrapped_from_ddp_and_compile_wrappers():
    model = build_model(ModelConfig(flavor="debug"))

    class Wrapper(torch.nn.Module):   # torch.compile's OptimizedModule keeps the model in _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert unwrap(Wrapper(model)) is model
    ckpt = make_ckpt(Wrapper(model))
    assert not any(k.startswith("_orig_mod") for k in ckpt["model_state"])


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a resnet-dist checkpoint"):
        load_checkpoint(foreign)
    # A truncated real checkpoint.
    good = save_checkpoint(make_ckpt(build_model(ModelConfig(flavor="debug"))), tmp_path / "good.pt")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(good)


def test_checkpoints_and_json_get_the_umask_mode_and_json_has_no_nan(tmp_path):
    """Shared storage: another user id can read best.pt and summary.json (not mkstemp's 0600);
    NaN is written as null, and a failed write leaves the old file and no temp file."""
    import json
    import os

    from resnet_dist.checkpoint import default_file_mode
    from resnet_dist.outputs import write_json

    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        path = save_checkpoint({"format_version": 1, "x": torch.zeros(2)}, tmp_path / "best.pt")
        write_json(tmp_path / "s.json", {"before": float("nan"), "after": [0.5, float("inf")]})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and (tmp_path / "s.json").stat().st_mode & 0o777 == 0o644
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and json.loads(text) == {"before": None, "after": [0.5, None]}
    with pytest.raises(TypeError):
        write_json(tmp_path / "s.json", {"bad": object()})
    assert json.loads((tmp_path / "s.json").read_text())["after"] == [0.5, None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "s.json"]
