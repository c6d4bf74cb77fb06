import argparse
import json

import pytest

from resnet_dist.cli import add_config_args, config_from_args
from resnet_dist.config import ConfigError, RunConfig


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
