"""``extproc-host new-plugin NAME``: write a new plugin package, ready to test and install.

The package gets a pyproject.toml with the ``extproc_host.plugins`` entry point, the plugin
module (a settings model and a plugin that replaces a word in response bodies wherever the
chunks are cut), tests written with :mod:`extproc_host.testing` (in-process and behind a real
Envoy) and a README. Templates are ``string.Template`` texts (``$name``).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

#: A plugin name: what routes list in their chain and ``[plugins.<name>]`` configures.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginNames:
    """The names a new plugin package needs, derived from the plugin name."""

    plugin: str
    distribution: str
    module: str
    cls: str

    @classmethod
    def derive(cls, name: str) -> PluginNames:
        """Names for plugin ``name``; ValueError when it is not a valid plugin name."""
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"'{name}' is not a valid plugin name: use lower-case letters, digits, and single '-' or '_' "
                "between them, starting with a letter (e.g. 'card-redact')"
            )
        words = re.split(r"[-_]", name)
        return cls(
            plugin=name,
            distribution=f"extproc-{'-'.join(words)}",
            module=f"extproc_{'_'.join(words)}",
            cls="".join(w.capitalize() for w in words),
        )


PYPROJECT = Template("""[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "extproc-host plugin '$plugin'"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["extproc-host"]

[project.optional-dependencies]
# The test kit: pytest, its extproc-host fixtures and a real Envoy for the end-to-end test.
test = ["extproc-host[testing]"]

# How extproc-host finds the plugin: this module implements register_plugins.
[project.entry-points."extproc_host.plugins"]
$plugin = "$module"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
""")

MODULE = Template('''"""$plugin: replaces a word in response bodies, wherever Envoy cuts them into chunks.

    [routes.default]
    chain = ["$plugin"]

    [plugins.$plugin]
    find = "hello"
    replace = "howdy"
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Headers, Plugin, hookimpl


class ${cls}Settings(BaseModel):
    """``[plugins.$plugin]``, validated by the host at start-up."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    find: str = Field(default="hello", min_length=1)
    replace: str = "howdy"
    #: Response header naming the plugin ("" for none).
    header: str = "x-$plugin"


class $cls(Plugin):
    """One instance per HTTP exchange; ``self.settings`` is a ${cls}Settings."""

    name = "$plugin"
    Settings = ${cls}Settings

    def __init__(self, settings: ${cls}Settings, stream) -> None:
        super().__init__(settings, stream)
        self.find = settings.find.encode()
        self.replace = settings.replace.encode()
        self.held = b""  # the end of the last chunk: it may be the start of a match

    def on_response_headers(self, headers: Headers) -> None:
        # Streamed modes decide headers before the first body chunk.
        if self.settings.header:
            headers.set(self.settings.header, self.name)

    def on_response_body(self, chunk: bytes) -> bytes:
        data = (self.held + chunk).replace(self.find, self.replace)
        # Hold back what could be the start of a match cut by the next chunk boundary.
        keep = len(self.find) - 1
        self.held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def on_response_body_end(self) -> bytes:
        tail, self.held = self.held, b""
        return tail


@hookimpl
def register_plugins(register):
    register($cls)
''')

TESTS = Template('''"""Tests for $plugin, written with extproc-host's kit (extproc_host.testing)."""

from __future__ import annotations

import httpx
import pytest

from extproc_host.testing import random_splits, request
from $module import $cls

BODY = b"hello world, " * 100 + b"hello"
EXPECTED = BODY.replace(b"hello", b"howdy")


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED"])
def test_replaces_in_every_body_mode(plugin_runner, mode):
    runner = plugin_runner($cls, mode=mode)
    result = runner.exchange(request(BODY))
    assert result.client.body == EXPECTED
    assert result.client.header("x-$plugin") == "$plugin"
    assert result.upstream.body == BODY  # the request is left alone


def test_replaces_across_chunk_boundaries(plugin_runner):
    runner = plugin_runner($cls, mode="FULL_DUPLEX_STREAMED")
    split = random_splits(seed=7, max_chunks=40, empty_chunks=True)
    for _ in range(200):
        result = runner.exchange(request(BODY), splits=split)
        assert result.client.body == EXPECTED, result.response_chunks


def test_settings(plugin_runner):
    runner = plugin_runner($cls, settings={"$plugin": {"find": "world", "replace": "there", "header": ""}})
    result = runner.exchange(request(b"hello world"))
    assert result.client.body == b"hello there"
    assert result.client.header("x-$plugin") is None


def test_behind_a_real_envoy(envoy_stack):
    stack = envoy_stack(\'\'\'
[routes.default]
chain = ["$plugin"]
\'\'\')
    reply = httpx.post(stack.url + "/", content=BODY, timeout=30)
    assert reply.status_code == 200
    assert reply.content == EXPECTED
    assert reply.headers["x-$plugin"] == "$plugin"
''')

README = Template("""# $distribution

An extproc-host plugin, `$plugin`: replaces a word in response bodies as they stream through
Envoy, wherever the chunks are cut.

## Use it

In the environment where extproc-host is installed, from this directory (or, once it is
published, by its name, `$distribution`):

    pip install .
    extproc-host plugins          # lists $plugin

```toml
[routes.default]
chain = ["$plugin"]

[plugins.$plugin]
find = "hello"
replace = "howdy"
```

Settings can also come from the environment: `EXTPROC_PLUGINS__${env}__FIND=hello`.

## Develop it

    pip install -e '.[test]'
    pytest                        # in-process tests, and one behind a real Envoy

`tests/` uses extproc-host's kit: the `plugin_runner` fixture runs the plugin over HTTP
exchanges in every body mode without Envoy; `envoy_stack` runs it behind a real one.
""")


def write_package(name: str, parent: Path) -> Path:
    """Write the package for plugin ``name`` under ``parent``; its directory. ValueError for a
    bad name; FileExistsError when the directory exists (nothing is overwritten)."""
    names = PluginNames.derive(name)
    root = parent / names.distribution
    if root.exists():
        raise FileExistsError(f"{root} already exists: not overwriting it")
    values = {
        "plugin": names.plugin,
        "distribution": names.distribution,
        "module": names.module,
        "cls": names.cls,
        "env": names.plugin.upper().replace("-", "_"),
    }
    files = {
        Path("pyproject.toml"): PYPROJECT,
        Path("README.md"): README,
        Path("src", names.module, "__init__.py"): MODULE,
        Path("tests", f"test_{names.module.removeprefix('extproc_')}.py"): TESTS,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.substitute(values))
    return root


def run_new_plugin(args: argparse.Namespace) -> int:
    """Handler of ``extproc-host new-plugin NAME [--directory DIR]``."""
    try:
        root = write_package(args.name, Path(args.directory))
    except (ValueError, FileExistsError) as exc:
        print(f"extproc-host new-plugin: {exc}", file=sys.stderr)
        return 2
    names = PluginNames.derive(args.name)
    print(f"wrote {root}: plugin '{names.plugin}' in module {names.module} (distribution {names.distribution})")
    print(f"next: cd {root} && pip install -e '.[test]' && pytest")
    return 0
