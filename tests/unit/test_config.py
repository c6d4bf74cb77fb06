import argparse
import dataclasses
import json

import pytest

from termui.cli import add_config_args, config_from_args
from resnet_dist.config import TRAIN_PRESETS, ConfigError, RunConfig


def test_round_trip_through_plain_json_dict():
    cfg = RunConfig().replace(model={"flavor": "resnet56", "width": 1.5}, optim={"step_milestones": [2, 3]})
    d = json.loads(json.dumps(cfg.to_dict()))
    back = RunConfig.from_dict(d)
    assert back == cfg
    assert back.optim.step_milestones == (2, 3)


@pytest.mark.parametrize("bad,match", [
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"optimizer": "lion"}}, "optim.optimizer"),
    ({"train": {"batch_size": 100, "grad_accum": 3}}, "grad_accum"),
    ({"model": {"block": "fancy"}}, "model.block"),
])
def test_invalid_values_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig().replace(**bad)


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown OptimConfig field"):
        RunConfig.from_dict({"optim": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match="unknown config section"):
        RunConfig.from_dict({"optimizer": {}})


def test_cli_flags_override_only_what_is_given():
    p = argparse.ArgumentParser()
    add_config_args(p)
    args = p.parse_args(["--model", "resnet32", "--lr", "0.05", "--no-nesterov", "--step-milestones", "3", "6"])
    base = RunConfig().replace(train={"epochs": 9})
    cfg = config_from_args(args, base)
    assert cfg.model.flavor == "resnet32" and cfg.optim.lr == 0.05 and cfg.optim.nesterov is False
    assert cfg.optim.step_milestones == (3, 6)
    assert cfg.train.epochs == 9   # from the base, untouched


def test_help_shows_the_entry_points_base_values():
    p = argparse.ArgumentParser()
    add_config_args(p, base=RunConfig().replace(optim={"lr": 0.6}, data={"pad": 2}))
    text = " ".join(p.format_help().split())
    assert "--lr OPTIM.LR (default: 0.6)" in text
    assert "--pad DATA.PAD (default: 2)" in text
    plain = argparse.ArgumentParser()
    add_config_args(plain)
    assert "--lr OPTIM.LR (default: 0.2)" in " ".join(plain.format_help().split())


def test_train_presets_share_the_four_epoch_recipe():
    default = RunConfig().replace(**TRAIN_PRESETS["default"])
    quick = RunConfig().replace(**TRAIN_PRESETS["quick"])
    assert (default.optim, default.model) == (quick.optim, quick.model)
    assert dataclasses.replace(quick.data, train_subset=0) == default.data
    assert (quick.data.train_subset, quick.train.epochs, default.train.epochs) == (5000, 1, 4)
