import pytest
import torch

from resnet_dist.config import ConfigError, ModelConfig
from resnet_dist.models import FLAVORS, build_model, count_parameters

# Published parameter counts for 10 classes (He et al. 2016; Myrtle.ai ResNet-9, 2018; torchvision's ResNet-18 with a CIFAR stem).
PUBLISHED = {"resnet9": 6.5e6, "resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.7e6, "resnet18": 11.2e6}


@pytest.mark.parametrize("flavor,expected", PUBLISHED.items())
def test_parameter_counts_match_published(flavor, expected):
    n = count_parameters(build_model(ModelConfig(flavor=flavor)))
    assert abs(n - expected) / expected < 0.02, n


# The big ImageNet-width flavors are slow on CPU; their forward/backward is the same code path.
CHEAP = [f for f in FLAVORS if f not in ("wrn28_10", "resnet50", "resnet34")]


@pytest.mark.parametrize("flavor", CHEAP)
def test_forward_backward_every_flavor(flavor):
    model = build_model(ModelConfig(flavor=flavor, num_classes=7))
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("flavor", ["resnet50", "resnet34", "wrn28_10"])
def test_large_flavors_build_and_run(flavor):
    model = build_model(ModelConfig(flavor=flavor, width=0.25))
    out = model(torch.randn(1, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (1, 10)


def test_features_and_head_are_separate():
    model = build_model(ModelConfig(flavor="resnet20"))
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, model.num_features) == (3, 64)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_head(4)
    assert model(x).shape == (3, 4)


def test_width_block_and_stem_overrides():
    wide = build_model(ModelConfig(flavor="resnet20", width=2.0))
    assert wide.num_features == 128
    bottleneck = build_model(ModelConfig(flavor="resnet20", block="bottleneck"))
    assert bottleneck.num_features == 256
    imagenet = build_model(ModelConfig(flavor="resnet18", stem="imagenet"))
    assert imagenet(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_zero_init_residual_makes_blocks_identity_at_init():
    model = build_model(ModelConfig(flavor="resnet20", zero_init_residual=True))
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for stage in model.stages for b in stage)
    model = build_model(ModelConfig(flavor="resnet20", zero_init_residual=False))
    assert all(float(b.bn2.weight.detach().abs().sum()) > 0 for stage in model.stages for b in stage)


def test_unknown_flavor_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model flavor 'resnet7'"):
        build_model(ModelConfig(flavor="resnet7"))
