"""One `ResNet` class, parameterised by block, blocks per stage and widths.

Named flavors are one-line table entries. This file holds architecture only:
no training, no I/O.
"""

from __future__ import annotations

import torch
from torch import nn

from resnet_dist.config import ConfigError, ModelConfig, check_model_flavor
from resnet_dist.flavors import FLAVORS


class BasicBlock(nn.Module):
    """Two 3x3 convs (He et al. 2016); output channels = `width`."""

    expansion = 1
    last_bn = "bn2"    # the BN closing the residual branch (zero-init residual)

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(in_ch, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand; output channels = 4 * `width`."""

    expansion = 4
    last_bn = "bn3"

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    # Projection (1x1 conv + BN) only where the shape changes ("option B").
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """A ResNet with `len(layers)` stages; stage i has `layers[i]` blocks of width `widths[i]`.

    stem "cifar": 3x3 stride-1 conv for 32px inputs; "imagenet": 7x7 stride-2 conv
    and a 3x3 max-pool for 224px inputs. Every stage after the first halves the
    spatial size with a stride-2 first block; with `conv_pool`, every stage instead
    opens with a 3x3 conv to its width, BN, ReLU and a 2x2 max-pool, and its blocks
    keep the size (Myrtle's ResNet-9, the DAWNBench CIFAR-10 net). `pool` is the
    global pooling before the head: "avg" or "max".
    """

    def __init__(
        self,
        block: str,
        layers: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        stem: str = "cifar",
        num_classes: int = 10,
        dropout: float = 0.0,
        zero_init_residual: bool = True,
        conv_pool: bool = False,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ConfigError(f"layers {layers} and widths {widths} must have the same length")
        block_cls = BLOCKS[block]
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        stages, in_ch = [], stem_width
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks: list[nn.Module] = []
            if conv_pool:
                blocks.append(nn.Sequential(nn.Conv2d(in_ch, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                            nn.ReLU(inplace=True), nn.MaxPool2d(2)))
                in_ch = w
            for j in range(n):
                stride = 2 if (i > 0 and j == 0 and not conv_pool) else 1
                blocks.append(block_cls(in_ch, w, stride=stride))
                in_ch = w * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        if pool not in ("avg", "max"):
            raise ConfigError(f"pool must be avg|max, got {pool!r}")
        self.pool = pool
        self.num_features = in_ch
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(getattr(m, m.last_bn).weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone: images (N, 3, H, W) -> pooled features (N, num_features)."""
        x = self.stages(self.stem(x))
        pooled = nn.functional.adaptive_max_pool2d(x, 1) if self.pool == "max" else nn.functional.adaptive_avg_pool2d(x, 1)
        return torch.flatten(pooled, 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def parameter_groups(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefixes of the model's parts, timm's `group_matcher` idea: "head"
        (the classifier), "last_stage", and "backbone" (everything before the head). Fine-tuning
        picks what trains and at which rate from these, not from names typed elsewhere."""
        return {"head": ("fc.",), "last_stage": (f"stages.{len(self.stages) - 1}.",), "backbone": ("stem.", "stages.")}

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes`."""
        self.fc = nn.Linear(self.num_features, num_classes).to(self.fc.weight.device)


def build_model(cfg: ModelConfig) -> ResNet:
    """Build the network a `ModelConfig` describes (flavor plus overrides)."""
    check_model_flavor(cfg.flavor)
    f = FLAVORS[cfg.flavor]

    def scale(c: int) -> int:
        return max(1, round(c * cfg.width))

    return ResNet(
        block=cfg.block or f.block,
        layers=f.layers,
        widths=tuple(scale(w) for w in f.widths),
        stem_width=scale(f.stem_width),
        stem=cfg.stem or f.stem,
        num_classes=cfg.num_classes,
        dropout=cfg.dropout,
        zero_init_residual=cfg.zero_init_residual,
        conv_pool=f.conv_pool,
        pool=f.pool,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
