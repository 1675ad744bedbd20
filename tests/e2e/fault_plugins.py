"""Plugins for the fault tests through a real Envoy.

Not installed: the host loads this module through ``[server] plugin_modules =
["tests.e2e.fault_plugins"]`` with the repository root on its ``PYTHONPATH``.

- ``task_count`` answers every response with ``x-host-tasks``: how many asyncio tasks the
  host has at that moment, and ``x-host-sleepy``: how many ``sleepy`` instances are still
  alive after a garbage collection (probes for leaked tasks and leaked per-stream state, read
  with one small request).
- ``sleepy`` sleeps (``asyncio.sleep``) on every body chunk before passing it on unchanged: a
  chain slower than the traffic.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Headers, Plugin, hookimpl

TASKS_HEADER = "x-host-tasks"
SLEEPY_HEADER = "x-host-sleepy"


class TaskCount(Plugin):
    """Sets ``x-host-tasks`` (asyncio tasks now) and ``x-host-sleepy`` (sleepy instances
    alive after a collection) on the response."""

    name = "task_count"

    def on_response_headers(self, headers: Headers) -> None:
        headers.set(TASKS_HEADER, str(len(asyncio.all_tasks())))
        gc.collect()
        headers.set(SLEEPY_HEADER, str(len(Sleepy.alive)))


class SleepySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay_ms: float = Field(default=5.0, ge=0)  # sleep before each body chunk goes on


class Sleepy(Plugin):
    """Passes every body chunk unchanged, ``delay_ms`` after it arrived."""

    name = "sleepy"
    Settings = SleepySettings
    alive: ClassVar[weakref.WeakSet[Sleepy]] = weakref.WeakSet()  # every instance not yet collected

    def __init__(self, settings, stream):
        super().__init__(settings, stream)
        Sleepy.alive.add(self)

    async def on_request_body(self, chunk: bytes) -> bytes:
        await asyncio.sleep(self.settings.delay_ms / 1000)
        return chunk

    async def on_response_body(self, chunk: bytes) -> bytes:
        await asyncio.sleep(self.settings.delay_ms / 1000)
        return chunk


@hookimpl
def register_plugins(register):
    for cls in (TaskCount, Sleepy):
        register(cls)
