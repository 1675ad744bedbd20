"""The plugin guide and the hook reference cannot rot: every ``python`` block of docs/ runs, in
order, one namespace per page, or per file for blocks that name theirs (``title="..."``: a
``src/<module>/__init__.py`` block runs as that module, importable by the page's test file);
the ``test_*`` functions a page defines run too (with the kit's ``plugin_runner``; those that
need a real Envoy are only compiled here: tests/e2e/test_doc_commands.py runs the whole guide,
Envoy included). Every ``toml`` block parses, and its routes validate."""

from __future__ import annotations

import inspect
import re
import sys
import tomllib
import types
from collections.abc import Callable
from typing import Any

import pytest

from extproc_host.settings import RouteSettings
from extproc_host.testing import PluginRunner
from tests.docblocks import code_blocks

PAGES = ["plugin-guide.md", "hooks.md"]
_MODULE_FILE = re.compile(r"^src/(\w+)/__init__\.py$")


def blocks(page: str, language: str) -> list[tuple[int, str, str]]:
    """(line number, code, title) of every ``language`` block of a page."""
    return [
        (block.line, block.code, block.attributes.get("title", ""))
        for block in code_blocks(f"docs/{page}")
        if block.language == language
    ]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    found = blocks(page, "python")
    assert found, f"{page} has no python block"
    namespaces: dict[str, dict[str, Any]] = {}
    runners: list[PluginRunner] = []

    def plugin_runner(*chain: Any, **options: Any) -> PluginRunner:
        runner = PluginRunner(*chain, **options)
        runners.append(runner)
        return runner

    fixtures: dict[str, Callable[..., Any]] = {"plugin_runner": plugin_runner}
    ran: list[str] = []
    try:
        for line, code, title in found:
            module = _MODULE_FILE.match(title)
            if module:
                if module.group(1) not in namespaces:
                    made = types.ModuleType(module.group(1))
                    monkeypatch.setitem(sys.modules, made.__name__, made)
                    namespaces[module.group(1)] = made.__dict__
                exec(compile(code, f"{page}:{line}", "exec"), namespaces[module.group(1)])
                continue
            name = f"docs_{page.replace('-', '_').removesuffix('.md')}{'_' + title if title else ''}"
            namespace = namespaces.setdefault(title or page, {"__name__": name})
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
        assert ran == [
            "test_a_number_cut_in_two",
            "test_random_cuts",
            "test_every_cut",
            "test_api_key",
            "test_json_wrap_in_every_mode_it_allows",
        ]


@pytest.mark.parametrize("page", PAGES)
def test_toml_blocks_parse(page: str) -> None:
    for line, code, _ in blocks(page, "toml"):
        data = tomllib.loads(code)
        for name, route in data.get("routes", {}).items():
            assert RouteSettings.model_validate(route).chain, f"{page}:{line}: route {name}"
