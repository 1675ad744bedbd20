"""A raw HTTP/2 peer for testing the builtin server: frames built here byte by byte (so that
invalid ones can be sent), header blocks encoded by ``hpack``'s own encoder, and everything the
server sends parsed by ``hyperframe``, which refuses malformed frames: a server frame it cannot
parse fails the test. Nothing here uses the server's own code to build or read frames.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
CODES = {
    "NO_ERROR": 0,
    "PROTOCOL_ERROR": 1,
    "INTERNAL_ERROR": 2,
    "FLOW_CONTROL_ERROR": 3,
    "STREAM_CLOSED": 5,
    "FRAME_SIZE_ERROR": 6,
    "REFUSED_STREAM": 7,
    "CANCEL": 8,
    "COMPRESSION_ERROR": 9,
    "ENHANCE_YOUR_CALM": 11,
}


def raw(kind: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A frame as bytes, whatever its content (``length`` may lie about the payload)."""
    size = len(payload) if length is None else length
    return struct.pack(">L", size)[1:] + bytes([kind, flags]) + struct.pack(">L", stream_id) + payload


def settings(*pairs: tuple[int, int], ack: bool = False) -> bytes:
    return raw(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def ping(opaque: bytes = b"pingpong", stream_id: int = 0, ack: bool = False) -> bytes:
    return raw(PING, ACK if ack else 0, stream_id, opaque)


def window_update(stream_id: int, increment: int) -> bytes:
    return raw(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", increment))


def rst_stream(stream_id: int, code: int = 8) -> bytes:
    return raw(RST_STREAM, 0, stream_id, struct.pack(">L", code))


def priority(stream_id: int, depends_on: int, weight: int = 15) -> bytes:
    return raw(PRIORITY, 0, stream_id, struct.pack(">LB", depends_on, weight))


def grpc_message(body: bytes, flag: int = 0) -> bytes:
    """A gRPC Length-Prefixed-Message."""
    return bytes([flag]) + struct.pack(">L", len(body)) + body


def data(stream_id: int, payload: bytes, end_stream: bool = False, pad: int | None = None) -> bytes:
    flags = END_STREAM if end_stream else 0
    if pad is not None:
        return raw(DATA, flags | PADDED, stream_id, bytes([pad]) + payload + b"\0" * min(pad, 255))
    return raw(DATA, flags, stream_id, payload)


def grpc_request(path: str = "/test.Echo/Echo", **extra: str) -> list[tuple[str, str]]:
    """The header fields of a gRPC request (Envoy's gRPC client sends these)."""
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "extproc"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    fields.extend((name.replace("_", "-"), value) for name, value in extra.items())
    return fields


@dataclass
class Received:
    """What the peer read: the frames in order."""

    frames: list[Frame] = field(default_factory=list)

    def of(self, kind: type[Frame], stream_id: int | None = None) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind) and (stream_id is None or f.stream_id == stream_id)]


class Peer:
    """One client connection made of raw frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.received = Received()
        self.server_settings: dict[int, int] = {}

    # -- sending ------------------------------------------------------------------------------

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.writer.write(chunk)

    async def drain(self) -> None:
        await self.writer.drain()

    def block(self, fields: Sequence[tuple[str, str]]) -> bytes:
        """A header block from hpack's encoder (the peer's table follows it)."""
        return self.encoder.encode(list(fields))

    def headers(
        self,
        stream_id: int,
        fields: Sequence[tuple[str, str]] | bytes,
        end_stream: bool = False,
        end_headers: bool = True,
        flags: int = 0,
        prefix: bytes = b"",
    ) -> bytes:
        block = fields if isinstance(fields, bytes) else self.block(fields)
        flags |= (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        return raw(HEADERS, flags, stream_id, prefix + block)

    async def handshake(self, *pairs: tuple[int, int]) -> None:
        """Preface and SETTINGS; the server's SETTINGS read and acknowledged."""
        self.send(PREFACE, settings(*pairs))
        while True:
            frame = await self.next_frame()
            assert frame is not None, "the server closed the connection during the handshake"
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                self.server_settings = dict(frame.settings)
                self.send(settings(ack=True))
                return

    async def call(self, stream_id: int, path: str, *bodies: bytes, end: bool = True, **extra: str) -> None:
        """A gRPC call's request: HEADERS, then each body as one message in its own DATA."""
        self.send(self.headers(stream_id, grpc_request(path, **extra), end_stream=not bodies and end))
        for i, body in enumerate(bodies):
            self.send(data(stream_id, grpc_message(body), end_stream=end and i == len(bodies) - 1))
        await self.drain()

    # -- reading ------------------------------------------------------------------------------

    async def next_frame(self, timeout: float = 5.0) -> Frame | None:
        """The server's next frame (None: the socket closed). hyperframe checks it."""
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                    self.buffer = self.buffer[9 + length :]
                    self.received.frames.append(frame)
                    if isinstance(frame, HeadersFrame):
                        frame.fields = self.decoder.decode(frame.data, raw=True)  # type: ignore[attr-defined]
                    return frame
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                return None
            self.buffer += chunk

    async def until(self, done: Callable[[Frame], bool], timeout: float = 5.0) -> Frame | None:
        """Read frames until one for which ``done`` is true (returned), or the socket closes."""
        while True:
            frame = await self.next_frame(timeout)
            if frame is None or done(frame):
                return frame

    async def connection_error(self, code: str, timeout: float = 5.0) -> GoAwayFrame:
        """The server ends the connection with GOAWAY ``code`` and closes the socket."""
        frame = await self.until(lambda f: isinstance(f, GoAwayFrame), timeout)
        assert isinstance(frame, GoAwayFrame), f"no GOAWAY; got {self.received.frames}"
        assert frame.error_code == CODES[code], f"GOAWAY {frame.error_code}, not {code}: {frame.additional_data!r}"
        assert await self.until(lambda f: False, timeout) is None, "the socket stayed open after GOAWAY"
        return frame

    async def stream_error(self, stream_id: int, code: str, timeout: float = 5.0) -> RstStreamFrame:
        """The server resets ``stream_id`` with ``code``; the connection stays usable."""
        frame = await self.until(lambda f: isinstance(f, (RstStreamFrame, GoAwayFrame)), timeout)
        assert isinstance(frame, RstStreamFrame), f"no RST_STREAM; got {self.received.frames}"
        assert frame.stream_id == stream_id and frame.error_code == CODES[code], frame
        await self.alive()
        return frame

    async def alive(self) -> None:
        """The connection still works: a PING comes back, with no GOAWAY before it."""
        self.send(ping(b"stillok!"))
        await self.drain()
        frame = await self.until(
            lambda f: isinstance(f, GoAwayFrame) or (isinstance(f, PingFrame) and "ACK" in f.flags)
        )
        assert isinstance(frame, PingFrame) and frame.opaque_data == b"stillok!", f"connection not alive: {frame}"

    async def response(
        self, stream_id: int, timeout: float = 5.0
    ) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:
        """The headers, body and trailers of the server's answer on ``stream_id``."""
        headers: list[tuple[bytes, bytes]] | None = None
        trailers: list[tuple[bytes, bytes]] = []
        body = b""
        while True:
            frame = await self.next_frame(timeout)
            assert frame is not None, "the socket closed before the answer ended"
            assert not isinstance(frame, GoAwayFrame), f"GOAWAY instead of an answer: {frame}"
            if frame.stream_id != stream_id:
                continue
            assert not isinstance(frame, RstStreamFrame) or headers is not None, f"reset: {frame}"
            if isinstance(frame, HeadersFrame):
                if headers is None:
                    headers = frame.fields  # type: ignore[attr-defined]
                else:
                    trailers = frame.fields  # type: ignore[attr-defined]
            elif isinstance(frame, DataFrame):
                body += frame.data
                if frame.flow_controlled_length:
                    self.send(window_update(0, frame.flow_controlled_length))
            if "END_STREAM" in frame.flags or isinstance(frame, RstStreamFrame):
                assert headers is not None
                if not trailers and "END_STREAM" in frame.flags and isinstance(frame, HeadersFrame):
                    trailers = headers  # Trailers-Only
                return headers, body, trailers


def field_value(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in fields:
        if key == name:
            return value
    return None


def messages_of(body: bytes) -> list[bytes]:
    """The gRPC messages in a response body."""
    out = []
    while body:
        length = struct.unpack(">L", body[1:5])[0]
        out.append(body[5 : 5 + length])
        body = body[5 + length :]
    return out


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Peer]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = Peer(reader, writer)
    try:
        yield peer
    finally:
        writer.close()


__all__ = [
    "DataFrame",
    "GoAwayFrame",
    "HeadersFrame",
    "PingFrame",
    "RstStreamFrame",
    "SettingsFrame",
    "WindowUpdateFrame",
]
