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
LOCAL = {"cluster", "resnet_dist", "termui", "jobs", "bench", "tests"}
# What the core library may import besides the standard library and itself (issue 12).
LIBRARY_DEPENDENCIES = {"torch", "numpy", "pyarrow", "PIL", "matplotlib"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imports_of(path: Path) -> set[str]:
    """Full names of the modules a file imports (`from a.b import c` gives a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def runtime_imports() -> set[str]:
    """Top-level modules imported anywhere in the runtime packages and entry points."""
    found = {m.split(".")[0] for folder in ("cluster", "resnet_dist", "termui", "jobs")
             for path in (REPO / folder).rglob("*.py") for m in imports_of(path)}
    return found - LOCAL - set(sys.stdlib_module_names) - {"__future__"}


def test_the_core_is_a_library():
    """resnet_dist: torch, numpy, pyarrow, PIL and matplotlib only (no ray, rich, argparse,
    fastapi, starlette), no sys.exit, and no import cycle between its modules."""
    graph = {}
    for path in (REPO / "resnet_dist").glob("*.py"):
        mods = imports_of(path)
        top = {m.split(".")[0] for m in mods} - set(sys.stdlib_module_names) - {"__future__", "resnet_dist"}
        assert top <= LIBRARY_DEPENDENCIES, f"{path.name} imports {sorted(top - LIBRARY_DEPENDENCIES)}"
        assert "argparse" not in mods, f"{path.name} parses command lines"
        assert "sys.exit" not in path.read_text() and "SystemExit" not in path.read_text(), f"{path.name} exits"
        graph[f"resnet_dist.{path.stem}"] = {m for m in mods if m.startswith("resnet_dist.")}

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for module in graph:
        visit(module, [])


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
