"""pluggy hook specifications: how a package tells the host about its plugins.

A distribution adds an entry point in the ``extproc_host.plugins`` group pointing at a module
that implements ``register_plugins``; the built-in plugins are registered the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .plugin import Plugin

PROJECT = "extproc_host"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_plugins(register: Callable[[type[Plugin]], None]) -> None:
    """Call ``register(PluginClass)`` for each stream plugin this module provides."""


@hookspec
def host_started(settings: Any) -> None:
    """The host has loaded its settings and plugins and is about to serve (broadcast)."""


@hookspec
def stream_finished(stream: Any, error: BaseException | None) -> None:
    """A stream ended (broadcast): ``stream`` is its StreamInfo, ``error`` why it failed."""
