"""Plugins that exercise the chain in unit tests; registered in-process, not installed."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict

from extproc_host import Plugin, Reject, hookimpl

EVENTS: list[tuple] = []


class Upper(Plugin):
    """Upper-cases body bytes chunk by chunk."""

    name = "upper"

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk.upper()

    def on_response_body(self, chunk: bytes) -> bytes:
        return chunk.upper()


class AsyncUpper(Upper):
    """Upper-cases, through async hooks."""

    name = "async_upper"

    async def on_request_body(self, chunk: bytes) -> bytes:
        await asyncio.sleep(0)
        return chunk.upper()

    async def on_response_body(self, chunk: bytes) -> bytes:
        await asyncio.sleep(0)
        return chunk.upper()


class Hold(Plugin):
    """Holds the whole body back and emits it, wrapped, at the end (zero bytes per chunk)."""

    name = "hold"

    def __init__(self, settings, stream):
        super().__init__(settings, stream)
        self.held = {"request": [], "response": []}

    def on_request_body(self, chunk: bytes) -> bytes:
        self.held["request"].append(chunk)
        return b""

    def on_request_body_end(self) -> bytes:
        return b"<" + b"".join(self.held["request"]) + b">"

    def on_response_body(self, chunk: bytes) -> bytes:
        self.held["response"].append(chunk)
        return b""

    def on_response_body_end(self) -> bytes:
        return b"<" + b"".join(self.held["response"]) + b">"


class SplitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    marker: str = "|"


class Split(Plugin):
    """Emits more bytes than it gets: each chunk followed by a marker (a setting)."""

    name = "split"
    Settings = SplitSettings

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk + self.settings.marker.encode()

    def on_response_body(self, chunk: bytes) -> bytes:
        return chunk + self.settings.marker.encode()


class Headers_(Plugin):
    """Sets, adds and removes headers and trailers."""

    name = "headers"

    def on_request_headers(self, headers) -> None:
        headers.set("x-route", self.stream.route)
        headers.remove("x-secret")

    def on_response_headers(self, headers) -> None:
        headers.add("x-added", "1")

    def on_request_trailers(self, trailers) -> None:
        trailers.set("x-trailer-seen", trailers.get("x-checksum", "none"))

    def on_response_trailers(self, trailers) -> None:
        trailers.remove("x-internal")


class FailSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_on: str = "request_body"
    after_chunks: int = 0


class Fail(Plugin):
    """Raises in a chosen hook after some chunks."""

    name = "fail"
    Settings = FailSettings

    def __init__(self, settings, stream):
        super().__init__(settings, stream)
        self.seen = 0

    def _maybe(self, where: str) -> None:
        if where == self.settings.fail_on:
            if self.seen >= self.settings.after_chunks:
                raise RuntimeError(f"boom in {where}")
            self.seen += 1

    def on_request_headers(self, headers) -> None:
        self._maybe("request_headers")

    def on_request_body(self, chunk: bytes) -> bytes:
        self._maybe("request_body")
        return chunk

    def on_response_body(self, chunk: bytes) -> bytes:
        self._maybe("response_body")
        return chunk


class RejectLarge(Plugin):
    """Rejects requests whose header says so, with a 413."""

    name = "reject"

    def on_request_headers(self, headers) -> None:
        if headers.get("x-reject"):
            raise Reject(413, "too large", {"x-why": "test"})


class Record(Plugin):
    """Records every call, and the close error, in EVENTS."""

    name = "record"

    def on_request_body(self, chunk: bytes) -> bytes:
        EVENTS.append((self.stream.stream_id, "request_body", len(chunk)))
        return chunk

    def on_request_body_end(self) -> bytes:
        EVENTS.append((self.stream.stream_id, "request_body_end"))
        return b""

    def on_response_body_end(self) -> bytes:
        EVENTS.append((self.stream.stream_id, "response_body_end"))
        return b""

    def close(self, error) -> None:
        EVENTS.append((self.stream.stream_id, "close", type(error).__name__ if error else None))


class NotBytes(Plugin):
    """A buggy plugin that forgets to return its chunk."""

    name = "not_bytes"

    def on_request_body(self, chunk: bytes):
        pass


class Burst(Plugin):
    """Emits 3 MiB + 1 byte at the end of the request body (a plugin flushing a lot at once)."""

    name = "burst"

    def on_request_body_end(self) -> bytes:
        return b"z" * (3 * 1024 * 1024 + 1)


class EchoHeader(Plugin):
    """Has no header hooks, yet reads the request headers from StreamInfo in a body hook."""

    name = "echo_header"

    def on_response_body(self, chunk: bytes) -> bytes:
        return self.stream.request_headers.get("x-tag", "?").encode() + chunk


class Pieces(Plugin):
    """Answers with iterators: each request chunk as an async stream of two halves, and a
    sync generator of three pieces at the end (or a failure after the first, if asked)."""

    name = "pieces"

    async def on_request_body(self, chunk: bytes):
        async def halves():
            middle = len(chunk) // 2
            yield chunk[:middle]
            yield chunk[middle:]

        return halves()

    def on_request_body_end(self):
        def tail():
            yield b"x"
            if self.stream.request_headers.get("x-break"):
                raise ValueError("broken stream")
            yield b""
            yield b"y"
            yield b"z" * (2 * 1024 * 1024)

        return tail()


@hookimpl
def register_plugins(register):
    for cls in (
        Upper,
        AsyncUpper,
        Hold,
        Split,
        Headers_,
        Fail,
        RejectLarge,
        Record,
        NotBytes,
        Burst,
        EchoHeader,
        Pieces,
    ):
        register(cls)
