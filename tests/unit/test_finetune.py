import json

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_dist.checkpoint import load_checkpoint, load_model
from resnet_dist.config import ConfigError, FinetuneConfig, RunConfig
from resnet_dist.engine import build_optimizer
from resnet_dist.finetune import prepare_finetune, set_train_mode
from resnet_dist.local import finetune_local, fit_local
from resnet_dist.prepare import prepare_dataset


def tiny_cfg(data_dir, batch_size=32):
    # 64 train images and no flip TTA: two steps per epoch keep every run well under a second.
    return RunConfig().replace(
        model={"flavor": "debug"}, data={"data_dir": str(data_dir), "train_subset": 64},
        optim={"lr": 0.05, "warmup_epochs": 0.5},
        train={"epochs": 1, "batch_size": batch_size, "eval_batch_size": 64, "eval_flip_tta": False},
    )


def tiny_ft(batch_size=32, **kw):
    """Fine-tuning at tiny_cfg's scale: one epoch of 64 images."""
    return FinetuneConfig(**{"epochs": 1, "subset": 64, "batch_size": batch_size, "lr": 0.05, **kw})


@pytest.fixture(scope="module")
def source_path(tiny_data_dir, tmp_path_factory):
    """best.pt of a debug model trained for one epoch on the 10-class tiny data set."""
    run_dir = tmp_path_factory.mktemp("source_run")
    fit_local(tiny_cfg(tiny_data_dir), run_dir)
    return run_dir / "best.pt"


@pytest.fixture(scope="module")
def three_class_dir(tmp_path_factory):
    """A 3-class image folder (16 train / 4 test PNGs per class), prepared to Parquet."""
    root = tmp_path_factory.mktemp("three_source")
    rng = np.random.default_rng(1)
    for split, per_class in (("train", 16), ("test", 4)):
        for c, name in enumerate(("cat", "fox", "owl")):
            class_dir = root / split / name
            class_dir.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.normal(60 + 60 * c, 15, size=(32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(class_dir / f"{i:02d}.png")
    out = tmp_path_factory.mktemp("three_data") / "prepared"
    prepare_dataset(root, out, val_size=6, seed=0)
    return out


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def assert_same_test_set(summary, n_images):
    before, after = summary["before"], summary["after"]
    assert before["classes"] == after["classes"]
    assert ({c: v["support"] for c, v in before["per_class"].items()}
            == {c: v["support"] for c, v in after["per_class"].items()})
    assert sum(map(sum, before["confusion_matrix"])) == sum(map(sum, after["confusion_matrix"])) == n_images


def test_head_mode_keeps_backbone_and_bn_stats_bit_identical(source_path, tiny_data_dir, tmp_path):
    source = load_checkpoint(source_path)
    model, model_cfg, _ = prepare_finetune(source, 10, FinetuneConfig(mode="head"))
    assert trainable(model) == {"fc.weight", "fc.bias"} and model_cfg.num_classes == 10

    # reset_head=False: the head starts from the source weights, so any change is training's.
    summary = finetune_local(source_path, tiny_data_dir, tmp_path, tiny_ft(mode="head", reset_head=False))
    tuned = load_checkpoint(tmp_path / "finetuned.pt")["model_state"]
    before, after = source["model_state"], tuned
    backbone = [k for k in before if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone) and any("num_batches_tracked" in k for k in backbone)
    for k in backbone:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert_same_test_set(summary, 60)
    assert json.loads((tmp_path / "finetune.json").read_text()) == summary
    assert summary["finetune"]["mode"] == "head" and len(summary["history"]) == 1
    # Same data as the source (model selection is done): train + val, and the last epoch delivered.
    assert summary["finetune"]["train_splits"] == ["train", "val"]


def test_full_mode_trains_everything_with_a_slower_backbone(source_path):
    ft = FinetuneConfig(mode="full", backbone_lr_scale=0.25)
    model, _, lr_scale = prepare_finetune(load_checkpoint(source_path), 10, ft)
    assert trainable(model) == {name for name, _ in model.named_parameters()}
    assert lr_scale("stages.0.0.conv1.weight") == 0.25 and lr_scale("fc.weight") == 1.0
    optim = RunConfig().optim
    optimizer = build_optimizer(model, optim, lr_scale)
    head = {id(model.fc.weight), id(model.fc.bias)}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1   # no group mixes head and backbone
        assert group["lr"] == pytest.approx(optim.lr * (1.0 if in_head.pop() else 0.25))
    set_train_mode(model)
    assert all(m.training for m in model.modules())


def test_last_stage_mode_trains_only_the_last_stage_and_head(source_path, tiny_data_dir, tmp_path):
    source = load_checkpoint(source_path)
    model, _, _ = prepare_finetune(source, 10, FinetuneConfig(mode="last-stage"))
    last = f"stages.{len(model.stages) - 1}."
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith((last, "fc."))}
    set_train_mode(model)
    assert not model.stem[1].training and not model.stages[0][0].bn1.training
    assert model.stages[-1][0].bn1.training

    finetune_local(source_path, tiny_data_dir, tmp_path, tiny_ft(mode="last-stage"))
    tuned = load_checkpoint(tmp_path / "finetuned.pt")["model_state"]
    for k, v in source["model_state"].items():
        if not k.startswith((last, "fc.")):
            assert torch.equal(v, tuned[k]), k
    assert not torch.equal(source["model_state"][f"{last}0.conv1.weight"], tuned[f"{last}0.conv1.weight"])
    assert not torch.equal(source["model_state"][f"{last}0.bn1.running_mean"], tuned[f"{last}0.bn1.running_mean"])


def test_new_class_count_resizes_head_and_checkpoint_reloads(source_path, three_class_dir, tmp_path):
    source = load_checkpoint(source_path)
    model, model_cfg, _ = prepare_finetune(source, 3, FinetuneConfig(reset_head=False))
    assert model.fc.out_features == 3 and model_cfg.num_classes == 3

    summary = finetune_local(source_path, three_class_dir, tmp_path, tiny_ft(batch_size=16, mode="full"))
    tuned, ckpt = load_model(tmp_path / "finetuned.pt")
    assert tuned(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert ckpt["classes"] == ["cat", "fox", "owl"] and ckpt["model_config"]["num_classes"] == 3
    assert ckpt["mean"] == source["mean"]   # inputs normalised as the backbone was trained
    info = ckpt["extra"]["finetune"]
    assert info["source_checkpoint"] == str(source_path)
    assert info["source_code_version"] == source["code_version"]
    assert info["source_data_fingerprint"] == source["data_fingerprint"]
    assert_same_test_set(summary, 12)
    assert summary["before"]["classes"] == ["cat", "fox", "owl"]


@pytest.mark.parametrize("kwargs, field", [({"mode": "all"}, "finetune.mode"),
                                           ({"backbone_lr_scale": 0.0}, "finetune.backbone_lr_scale"),
                                           ({"backbone_lr_scale": float("nan")}, "finetune.backbone_lr_scale"),
                                           ({"lr": 0.0}, "finetune.lr"), ({"epochs": -1}, "finetune.epochs")])
def test_bad_finetune_config_is_a_one_line_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field) as err:
        FinetuneConfig(**kwargs).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        prepare_finetune({}, 10, FinetuneConfig(**kwargs))


def _finetune_job(args):
    from jobs.finetune import main

    main([str(a) for a in args])


def test_finetune_job_local_on_an_image_folder_writes_a_servable_checkpoint(source_path, tmp_path, capsys):
    """jobs/finetune.py --local: a user's raw image folder is prepared, the head is resized to
    its classes, and the output directory holds what serving looks for."""
    from resnet_dist.inference import resolve_checkpoint

    folder = tmp_path / "photos"
    for split, n in (("train", 12), ("test", 3)):
        for c, name in enumerate(("a", "b")):
            (folder / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), 60 + 120 * c, np.uint8)).save(folder / split / name / f"{i}.png")
    out = tmp_path / "out"
    _finetune_job(["--local", "--checkpoint", source_path, "--data", folder, "--mode", "full", "--epochs", "1",
                   "--batch-size", 8, "--optimizer", "adamw", "--lr", 0.003, "--out", out])
    tuned = load_checkpoint(resolve_checkpoint(out))
    assert tuned["classes"] == ["a", "b"] and tuned["model_config"]["num_classes"] == 2
    optim = tuned["run_config"]["optim"]
    assert (optim["optimizer"], optim["lr"]) == ("adamw", 0.003)   # fine-tuning's own, not the source's
    assert resolve_checkpoint(out) == out / "finetuned.pt"   # the same layout as the Ray path
    summary = json.loads((out / "finetune.json").read_text())
    assert sum(map(sum, summary["after"]["confusion_matrix"])) == 6
    assert "after fine-tuning" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/no/such.pt"], "no checkpoint at /no/such.pt"),
    (["--data", "/no/such/data"], "fine-tuning data /no/such/data does not exist"),
    (["--epochs", "-1"], "finetune.epochs, finetune.subset and finetune.batch_size must be >= 0"),
    (["--backbone-lr-scale", "0"], "finetune.backbone_lr_scale must be > 0"),
])
def test_finetune_job_bad_options_are_one_line_and_write_nothing(args, message, source_path, tiny_data_dir,
                                                                  tmp_path, capsys):
    base = {"--checkpoint": source_path, "--data": tiny_data_dir}
    base.update(dict(zip(args[::2], args[1::2])))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        _finetune_job(["--local", "--out", out, *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_finetune_job_refuses_a_corrupt_checkpoint(tiny_data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        _finetune_job(["--local", "--checkpoint", bad, "--data", tiny_data_dir, "--out", tmp_path / "out"])
    assert exit_.value.code == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_finetune_job_refuses_a_corrupt_image_folder_and_leaves_no_prepared_data(source_path, tmp_path, capsys):
    folder = tmp_path / "photos"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (folder / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / split / name / f"{i}.png")
    (folder / "train" / "a" / "1.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        _finetune_job(["--local", "--checkpoint", source_path, "--data", folder, "--out", out])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "1.png" in err
    assert not (out / "finetune-data").exists() and not (out / "finetuned").exists()
