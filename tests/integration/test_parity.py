"""One training path: the same seeded spec trained in this process and as one Ray Train
worker on the device data path gives the same per-report history and the same final
weights, for training from scratch and for fine-tuning. This keeps the paths from drifting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet_dist.config import FinetuneConfig, RunConfig
from resnet_dist.finetune import plan_finetune
from resnet_dist.local import fit_local, train_local
from resnet_dist.parquet import read_manifest
from resnet_dist.spec import RunSpec

pytestmark = pytest.mark.integration
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "param_checksum", "step")


def tiny_cfg(data_dir) -> RunConfig:
    return RunConfig().replace(
        model={"flavor": "debug"}, data={"data_dir": str(data_dir)},
        optim={"lr": 0.05, "warmup_epochs": 0.5},
        train={"epochs": 2, "batch_size": 32, "eval_batch_size": 20, "eval_flip_tta": False,
               "report_every_images": 96},   # 6 steps an epoch: reports after steps 3 and 6
    )


def on_ray(spec: RunSpec, tmp_path: Path, name: str):
    """`spec` as one Ray Train worker, one torch thread, the device data path."""
    from cluster.resources import Resources
    from cluster.train import WorkerJob, run_train

    job = WorkerJob(spec, threads=1, data_path="device")
    res = Resources(workers=1, use_gpu=False, cpus_per_worker=0.5, threads=1, max_concurrent=1, data_path="device")
    delivered, last, history = run_train(job, res, tmp_path / name, 0, lambda report: None)
    return delivered, last, history


def in_process(spec: RunSpec, run_dir: Path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the Ray worker: float sums then add up in the same order
    try:
        return train_local(spec, run_dir, resume=False)
    finally:
        torch.set_num_threads(threads)


def assert_same(local_history, ray_history, local_ckpt, ray_ckpt, reports):
    assert len(local_history) == len(ray_history) == reports
    for a, b in zip(local_history, ray_history):
        assert a["epoch"] == pytest.approx(b["epoch"])
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key, a[key], b[key])
    assert local_ckpt["epoch"] == ray_ckpt["epoch"]
    for k, v in local_ckpt["model_state"].items():
        assert torch.allclose(v.float(), ray_ckpt["model_state"][k].float(), rtol=1e-4, atol=1e-6), k


def test_training_locally_and_on_ray_train_is_the_same_run(ray_driver, tiny_data_dir, tmp_path):
    spec = RunSpec.from_manifest(tiny_cfg(tiny_data_dir), read_manifest(tiny_data_dir))
    local_best, local_history = in_process(spec, tmp_path / "local")
    ray_best, _, ray_history = on_ray(spec, tmp_path, "ray")
    assert_same(local_history, ray_history, local_best, ray_best, 4)


def test_finetuning_locally_and_on_ray_train_is_the_same_run(ray_driver, tiny_data_dir, tmp_path):
    source_dir = tmp_path / "source"
    fit_local(tiny_cfg(tiny_data_dir).replace(train={"epochs": 1, "report_every_images": 0}), source_dir)
    # The last stage at a scaled rate: the frozen-part and per-group-rate paths both run.
    ft = FinetuneConfig(mode="last-stage", backbone_lr_scale=0.5, epochs=2, lr=0.05, batch_size=32)
    plan = plan_finetune(source_dir / "best.pt", tiny_data_dir, tmp_path / "out", ft)
    assert plan.spec.train_splits == ("train", "val") and plan.spec.selects_last
    local_last, local_history = in_process(plan.spec, tmp_path / "ft-local")
    ray_last, _, ray_history = on_ray(plan.spec, tmp_path, "ft-ray")
    assert_same(local_history, ray_history, local_last, ray_last, 2)   # one report an epoch
    # "lr" is the head's peak-relative rate on both paths, not a scaled group's.
    assert local_history[0]["lr"] == pytest.approx(ray_history[0]["lr"])
