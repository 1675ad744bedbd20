"""A plugin for `make bench-modes`: touches response bodies only (counts their bytes), so
`extproc-host envoy-config` asks Envoy for the response body alone. Loaded through
[server] plugin_modules = ["benchmarks.response_plugins"]."""

from __future__ import annotations

from extproc_host import Plugin, hookimpl


class ResponseBytes(Plugin):
    """Counts each response body's bytes and hands every chunk on unchanged."""

    name = "response_bytes"

    def __init__(self, settings, stream) -> None:
        super().__init__(settings, stream)
        self.count = 0

    def on_response_body(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        return chunk


@hookimpl
def register_plugins(register):
    register(ResponseBytes)
