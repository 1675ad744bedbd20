"""A plugin for benchmarks/mixed.py: streams every request body through the host (counts its
bytes, hands every chunk on unchanged), the cost a route pays without mode overrides. Loaded
through [server] plugin_modules = ["benchmarks.mixed_plugins"]."""

from __future__ import annotations

from extproc_host import Plugin, hookimpl


class RequestBytes(Plugin):
    """Counts each request body's bytes and hands every chunk on unchanged."""

    name = "request_bytes"

    def __init__(self, settings, stream) -> None:
        super().__init__(settings, stream)
        self.count = 0

    def on_request_body(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        return chunk


@hookimpl
def register_plugins(register):
    register(RequestBytes)
