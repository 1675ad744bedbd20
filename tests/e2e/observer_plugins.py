"""An observe-only plugin for tests/e2e/test_observe.py, loaded by the host through
``[server] plugin_modules = ["tests.e2e.observer_plugins"]`` with the repository root on its
``PYTHONPATH``."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from extproc_host import Plugin, StreamInfo, hookimpl


class GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The plugin holds every request chunk until this file exists.
    gate: str
    #: Where it writes "<bytes> <sha256>" of the request body it saw, once complete.
    report: str


class GatedObserver(Plugin[GateSettings]):
    """Only looks at the request body, and not before its gate file exists: a stand-in for
    an observer slower than the traffic (a slow disk, a remote audit log)."""

    name = "gated_observer"
    Settings = GateSettings
    observes_only = True

    def __init__(self, settings: GateSettings, stream: StreamInfo) -> None:
        super().__init__(settings, stream)
        self.digest = hashlib.sha256()
        self.size = 0

    async def on_request_body(self, chunk: bytes) -> bytes:
        while not os.path.exists(self.settings.gate):
            await asyncio.sleep(0.01)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def on_request_body_end(self) -> bytes:
        self._report(f"{self.size} {self.digest.hexdigest()}")
        return b""

    def close(self, error: BaseException | None) -> None:
        if error is not None:
            self._report(f"closed with {type(error).__name__}: {error}")

    def _report(self, text: str) -> None:
        # Whole or not at all: the test reads the file as soon as it exists.
        partial = Path(self.settings.report + ".partial")
        partial.write_text(text)
        partial.rename(self.settings.report)


@hookimpl
def register_plugins(register: Callable[[type[Plugin[Any]]], None]) -> None:
    register(GatedObserver)
