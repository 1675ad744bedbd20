"""Plugins for the fault tests through a real Envoy.

Not installed: the host loads this module through ``[server] plugin_modules =
["tests.e2e.fault_plugins"]`` with the repository root on its ``PYTHONPATH``.

- ``task_count`` answers every response with ``x-host-tasks``: how many asyncio tasks the
  host has at that moment (a cheap probe for leaked tasks, read with one small request).
- ``sleepy`` sleeps (``asyncio.sleep``) on every body chunk before passing it on unchanged: a
  chain slower than the traffic.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Headers, Plugin, hookimpl

TASKS_HEADER = "x-host-tasks"


class TaskCount(Plugin):
    """Sets ``x-host-tasks`` on the response to the host's current asyncio task count."""

    name = "task_count"

    def on_response_headers(self, headers: Headers) -> None:
        headers.set(TASKS_HEADER, str(len(asyncio.all_tasks())))


class SleepySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay_ms: float = Field(default=5.0, ge=0)  # sleep before each body chunk goes on


class Sleepy(Plugin):
    """Passes every body chunk unchanged, ``delay_ms`` after it arrived."""

    name = "sleepy"
    Settings = SleepySettings

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
