"""Plugins that fail on purpose, for the failure-policy tests through a real Envoy.

Not installed: the host loads this module through ``[server] plugin_modules =
["tests.e2e.failing_plugins"]`` with the repository root on its ``PYTHONPATH``. Each plugin
acts only on requests that carry its trigger header, so one chain serves the failing requests
and the normal ones. Error messages carry the stream id the plugin was given and the request's
``x-test-id``, so a test can find the host's log line for its own request.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Headers, Plugin, Reject, hookimpl


class _Tripwire(Plugin):
    trigger = ""  # the request header that arms the plugin
    armed: str | None = None
    test_id = "-"

    def on_request_headers(self, headers: Headers) -> None:
        self.armed = headers.get(self.trigger)
        self.test_id = headers.get("x-test-id", "-")

    def _fail(self, where: str) -> None:
        stream_id = self.stream.stream_id
        raise RuntimeError(f"{self.name} tripped in {where} (stream {stream_id}, x-test-id {self.test_id})")


class FailOnChunkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunk: int = Field(default=3, ge=1)  # raise on this request-body chunk (1-based)


class FailOnChunk(_Tripwire):
    """Passes request-body chunks untouched, then raises on chunk ``x-fail-on-chunk`` (or the setting)."""

    name = "fail_on_chunk"
    trigger = "x-fail-on-chunk"
    Settings = FailOnChunkSettings
    seen = 0

    def on_request_headers(self, headers: Headers) -> None:
        super().on_request_headers(headers)
        if self.armed:
            self.fail_at = int(self.armed) if self.armed.isdigit() else self.settings.chunk

    def on_request_body(self, chunk: bytes) -> bytes:
        self.seen += 1
        if self.armed and self.seen >= self.fail_at:
            self._fail(f"request body chunk {self.seen}")
        return chunk


class FailInHeaders(_Tripwire):
    """Raises in on_request_headers, before it has changed anything."""

    name = "fail_in_headers"
    trigger = "x-fail-in-headers"

    def on_request_headers(self, headers: Headers) -> None:
        super().on_request_headers(headers)
        if self.armed:
            self._fail("request headers")


class RejectTooLarge(_Tripwire):
    """Answers 413 itself (an Envoy local reply) when asked to."""

    name = "reject_413"
    trigger = "x-reject"

    def on_request_headers(self, headers: Headers) -> None:
        super().on_request_headers(headers)
        if self.armed:
            raise Reject(413, f"rejected: {self.armed}\n", {"x-rejected-by": self.name})


@hookimpl
def register_plugins(register):
    for cls in (FailOnChunk, FailInHeaders, RejectTooLarge):
        register(cls)
