"""A plugin for end-to-end tests that records how each stream ended, one JSON line per close.

Loaded by the host through ``[server] plugin_modules``; ``[plugins.close_recorder] path`` is
the file it appends to.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from extproc_host import Plugin, hookimpl


class RecorderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


class CloseRecorder(Plugin):
    """Counts request body bytes and writes them, with the close error, when the stream ends."""

    name = "close_recorder"
    Settings = RecorderSettings

    def __init__(self, settings, stream):
        super().__init__(settings, stream)
        self.request_bytes = 0
        self.request_complete = False

    def on_request_body(self, chunk: bytes) -> bytes:
        self.request_bytes += len(chunk)
        return chunk

    def on_request_body_end(self) -> bytes:
        self.request_complete = True
        return b""

    def close(self, error) -> None:
        record = {
            "stream": self.stream.stream_id,
            "route": self.stream.route,
            "error": type(error).__name__ if error else None,
            "detail": str(error) if error else None,
            "request_bytes": self.request_bytes,
            "request_complete": self.request_complete,
        }
        with open(self.settings.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


@hookimpl
def register_plugins(register):
    register(CloseRecorder)
