"""Command-line options generated from the config dataclasses.

Every config field becomes a kebab-case flag (`--batch-size`, `--label-smoothing`)
whose default is "not given", so a preset supplies the base values and only
what the user typed overrides them. Entry points call `die()` for bad input:
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields
from typing import Any, NoReturn

from resnet_dist.config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from resnet_dist.constants import EXIT_BAD_INPUT

SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
ALIASES = {"flavor": ["--model"], "data_dir": ["--data"]}   # short names users expect


def die(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one line `error: ...` to stderr and exit (2 = bad input)."""
    print(f"error: {message}".splitlines()[0], file=sys.stderr)
    sys.exit(code)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad choice, wrong type) are one `die()` line too,
    not the usage block plus a message; --help still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        die(f"{message} (see --help)")


def job_parser(doc: str | None, ray: bool = False) -> argparse.ArgumentParser:
    """The parser of an entry point: its module docstring as the description, kept as written.
    `ray`: the job runs on Ray, and takes --verbose (cluster.runtime.set_verbose)."""
    p = OneLineErrorParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if ray:
        p.add_argument("--verbose", action="store_true",
                       help="show Ray's own logs too (workers, actors, raylet, Tune); by default they stay in Ray's log files")
    return p


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The replica and batching options that jobs/serve.py and bench/serve_load.py share
    (cluster.serve.ServeConfig fields; the batch wait in ms)."""
    p.add_argument("--replicas", type=int, default=1, help="replicas (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=16, help="images per model call; 1 = no batching (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill, ms (default: %(default)s)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per replica (0 = num-cpus)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--eager-model", action="store_true",
                   help="run the model as eager PyTorch, not as a frozen TorchScript graph (the default)")


def add_config_args(parser: argparse.ArgumentParser, skip: set[str] = frozenset(),
                    base: RunConfig | None = None) -> None:
    """Add one flag per config field (except those in `skip`), grouped by section.

    `--help` shows each field's value in `base` (the entry point's default preset),
    else the dataclass default."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in skip:
                continue
            flags = [f"--{f.name.replace('_', '-')}"] + ALIASES.get(f.name, [])
            kind = hints[f.name]
            shown = getattr(getattr(base, section), f.name) if base is not None else f.default
            kw: dict[str, Any] = {"default": None, "dest": f"{section}.{f.name}", "help": f"(default: {shown})"}
            if kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(kind) is tuple:
                kw.update(nargs="+", type=int, metavar="N")
            else:
                args = [a for a in typing.get_args(kind) if a is not type(None)]
                kw["type"] = args[0] if args else kind
            group.add_argument(*flags, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config values the user gave, as {section: {field: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """`base` (a preset) with the user's flags applied; ConfigError on a bad value."""
    base = base or RunConfig()
    try:
        return base.replace(**overrides_from_args(args))
    except TypeError as e:  # a wrong type that slipped past argparse
        raise ConfigError(str(e)) from e
