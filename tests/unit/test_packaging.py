"""pyproject.toml: every module the code imports at run time is a declared runtime
dependency (the image installs the package without extras), and the license is an SPDX string."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCAL = {"cluster", "resnet_dist", "jobs", "bench", "tests"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def runtime_imports() -> set[str]:
    """Top-level modules imported anywhere in the runtime packages and entry points."""
    found = set()
    for folder in ("cluster", "resnet_dist", "jobs"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - LOCAL - set(sys.stdlib_module_names) - {"__future__"}


def test_every_runtime_import_is_a_declared_dependency():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    dists = md.packages_distributions()
    missing = {m: dists.get(m) for m in runtime_imports()
               if not {d.lower().replace("_", "-") for d in dists.get(m, [])} & declared}
    assert not missing, f"imported at run time but not in [project] dependencies: {missing}"


def test_test_only_packages_stay_out_of_the_runtime_code():
    test_only = {_name(r) for r in PROJECT["optional-dependencies"]["test"]} - {_name(r) for r in PROJECT["dependencies"]}
    dists = md.packages_distributions()
    leaked = [m for m in runtime_imports() if {d.lower() for d in dists.get(m, [])} & test_only]
    assert not leaked, leaked


def test_license_is_an_spdx_expression():
    assert PROJECT["license"] == "Apache-2.0"
