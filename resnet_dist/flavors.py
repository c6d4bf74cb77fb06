"""Named ResNet flavors: one line each, blocks per stage and widths.

Its own module, importing nothing of the project, so that the config (which checks a
flavor name) and the model (which builds one) both use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnknownFlavor(ValueError):
    """A flavor name that is not in FLAVORS; config.ConfigError subclasses nothing here, so
    callers turn it into their own error type."""


@dataclass(frozen=True)
class Flavor:
    block: str
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int
    stem: str = "cifar"
    conv_pool: bool = False     # stages open with conv + max-pool (see ResNet)
    pool: str = "avg"           # global pooling before the head


def _cifar(n: int) -> Flavor:
    """He et al. CIFAR ResNet of depth 6n+2: 3 stages at 16/32/64 channels."""
    return Flavor("basic", (n, n, n), (16, 32, 64), 16)


def _wrn(depth: int, k: int) -> Flavor:
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis), post-activation blocks."""
    n = (depth - 4) // 6
    return Flavor("basic", (n, n, n), (16 * k, 32 * k, 64 * k), 16)


FLAVORS: dict[str, Flavor] = {
    "debug": Flavor("basic", (1, 1), (8, 16), 8),
    "resnet20": _cifar(3),
    "resnet32": _cifar(5),
    "resnet44": _cifar(7),
    "resnet56": _cifar(9),
    "resnet110": _cifar(18),
    # Myrtle's ResNet-9 (Page 2018, DAWNBench): 64-128-256-512 channels, a residual block
    # after the first and last pooling stages; the GPU 94% preset (config.TRAIN_PRESETS["gpu94"]).
    "resnet9": Flavor("basic", (1, 0, 1), (128, 256, 512), 64, conv_pool=True, pool="max"),
    "resnet18": Flavor("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64),
    "resnet34": Flavor("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet50": Flavor("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "wrn16_4": _wrn(16, 4),
    "wrn28_10": _wrn(28, 10),
}


def check_flavor(name: str) -> "Flavor":
    """The flavor called `name`; the one place an unknown name is refused."""
    if name not in FLAVORS:
        raise UnknownFlavor(f"unknown model flavor {name!r}; choose from {', '.join(FLAVORS)}")
    return FLAVORS[name]
