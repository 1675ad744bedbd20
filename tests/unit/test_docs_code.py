"""The plugin guide and the hook reference cannot rot: every ``python`` block of docs/ runs, in
order, one namespace per page; the ``test_*`` functions a page defines run too (with the kit's
``plugin_runner``; those that need a real Envoy are only compiled here, the scaffold's
end-to-end test runs the same shape). Every ``toml`` block parses, and its routes validate."""

from __future__ import annotations

import inspect
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from extproc_host.settings import RouteSettings
from extproc_host.testing import PluginRunner

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ["plugin-guide.md", "hooks.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(page: str, language: str) -> list[tuple[int, str]]:
    """(line number, code) of every ``language`` block of a page."""
    text = (DOCS / page).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page: str) -> None:
    found = blocks(page, "python")
    assert found, f"{page} has no python block"
    namespace: dict[str, Any] = {"__name__": f"docs_{page.replace('-', '_').removesuffix('.md')}"}
    runners: list[PluginRunner] = []

    def plugin_runner(*chain: Any, **options: Any) -> PluginRunner:
        runner = PluginRunner(*chain, **options)
        runners.append(runner)
        return runner

    fixtures: dict[str, Callable[..., Any]] = {"plugin_runner": plugin_runner}
    ran: list[str] = []
    try:
        for line, code in found:
            before = set(namespace)
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
            for name in [n for n in namespace if n not in before and n.startswith("test_")]:
                params = list(inspect.signature(namespace[name]).parameters)
                if all(p in fixtures for p in params):
                    namespace[name](*(fixtures[p] for p in params))
                    ran.append(name)
    finally:
        for runner in runners:
            runner.close()
    if page == "plugin-guide.md":
        assert ran == ["test_api_key", "test_json_wrap_in_every_mode_it_allows"]


@pytest.mark.parametrize("page", PAGES)
def test_toml_blocks_parse(page: str) -> None:
    for line, code in blocks(page, "toml"):
        data = tomllib.loads(code)
        for name, route in data.get("routes", {}).items():
            assert RouteSettings.model_validate(route).chain, f"{page}:{line}: route {name}"
