"""A slow observer for benchmarks/observe.py, loaded by the host through
``[server] plugin_modules = ["benchmarks.observe_plugins"]`` with the repository root on its
``PYTHONPATH``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Plugin, hookimpl


class SlowWatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Milliseconds spent (asleep) on every body chunk: a slow disk or a remote audit log.
    delay_ms: float = Field(default=20.0, ge=0)


class SlowWatch(Plugin[SlowWatchSettings]):
    """Looks at every body chunk, slowly, and changes nothing."""

    name = "slow_watch"
    Settings = SlowWatchSettings
    observes_only = True

    async def on_request_body(self, chunk: bytes) -> bytes:
        await asyncio.sleep(self.settings.delay_ms / 1000)
        return chunk

    async def on_response_body(self, chunk: bytes) -> bytes:
        await asyncio.sleep(self.settings.delay_ms / 1000)
        return chunk


@hookimpl
def register_plugins(register: Callable[[type[Plugin[Any]]], None]) -> None:
    register(SlowWatch)
