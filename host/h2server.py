"""The host's own gRPC server: HTTP/2 framed by hand on the asyncio event loop, HPACK by ``hpack``.

Why not grpc.aio (``[server] transport = "grpcio"`` keeps it): grpcio's asyncio server runs
HTTP/2 on its own threads and hands every completion event (a message in, a message out, a
stream's start and end) to the event loop through a socketpair, which made that hand-off most of
the ~600 us of CPU each small ext_proc exchange cost (benchmarks/README.md). Here the event
loop reads the socket itself: under load one read carries frames of many streams, the answers
of one loop pass leave in one write, and no thread is involved.

It serves what Envoy's gRPC client (and grpc's own clients, for ``extproc-host health``) send:

- bidirectional, unary and server-streaming methods over HTTP/2 with prior knowledge (h2c) or
  TLS with ALPN ``h2``; messages uncompressed (a compressed one fails its stream);
- flow control both ways: a stream's receive window is given back only as its handler takes
  messages, so a slow chain holds at most ``window_bytes`` per stream in the host;
- ``grpc-status`` / ``grpc-message`` trailers, Trailers-Only answers for errors before any
  message, RST_STREAM from the peer cancelling the handler's task, GOAWAY on shutdown.

Handlers see the part of ``grpc.aio.ServicerContext`` the host uses: ``abort()`` and ``write()``,
with this module's :class:`StatusCode` (grpc's names) in place of ``grpc.StatusCode``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import hpack

log = logging.getLogger("extproc_host.h2server")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9
# SETTINGS identifiers.
HEADER_TABLE_SIZE, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x1, 0x4, 0x5, 0x6

_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_MESSAGE_PREFIX = struct.Struct(">BL")  # gRPC's length-prefixed message: compressed flag, length
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
# What the host advertises: frames up to 256 KiB (fewer frames per body), a connection window
# of 1 GiB (each stream's own window is what bounds memory), header blocks up to 64 KiB.
OWN_MAX_FRAME = 1 << 18
CONNECTION_WINDOW = 1 << 30
MAX_HEADER_BLOCK = 64 * 1024
# A large answer's frames go to the socket every this many bytes (the socket's backpressure, and
# so the flow of the rest of the message, is checked in between): fewer writes than one per frame.
WRITE_BATCH = 256 * 1024

UNARY, SERVER_STREAM, BIDI = "unary", "server_stream", "bidi"


def _header(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    """A frame's 9-byte header."""
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _header(kind, flags, stream_id, len(payload)) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541 section 5.1); ``first`` holds the flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field "literal without indexing, new name": no state in either side's table."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


# ":status: 200" is static entry 8; "content-type" static entry 31, sent literal without indexing.
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + _hpack_int(16, 7, 0) + b"application/grpc"
TRAILERS_OK = _literal(b"grpc-status", b"0")


class StatusCode(enum.Enum):
    """gRPC's status codes, with grpc.StatusCode's names (the builtin server does not import grpc:
    18 MiB of resident memory)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def _percent_encode(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII other than ``%`` as is, other bytes as ``%XX``."""
    raw = text.encode("utf-8", "replace")
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def _status_block(code: StatusCode, details: str) -> bytes:
    block = _literal(b"grpc-status", str(code.value).encode())
    if details:
        block += _literal(b"grpc-message", _percent_encode(details))
    return block


class AbortError(Exception):
    """Raised by :meth:`Context.abort`: the handler ends its call with ``code``."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class PeerError(Exception):
    """The peer broke HTTP/2: the connection is closed with GOAWAY ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Method:
    """One RPC the server answers: its cardinality, handler and request message class."""

    kind: str
    handler: Callable[..., Any]
    request_type: Any


class Context:
    """What a handler may do to its call besides yielding answers (grpc.aio's names)."""

    __slots__ = ("_code", "_details", "_stream")

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._code: StatusCode | None = None
        self._details: str | None = None

    async def abort(self, code: StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        """End the call with ``code`` and ``details`` (raises)."""
        self._code, self._details = code, details
        raise AbortError(code, details)

    def code(self) -> StatusCode | None:
        """The status :meth:`abort` set (None: not aborted)."""
        return self._code

    def details(self) -> str | None:
        """The details :meth:`abort` set."""
        return self._details

    async def write(self, message: Any) -> None:
        """Send one answer (server-streaming handlers)."""
        await self._stream.send(message.SerializeToString())

    def peer(self) -> str:
        return self._stream.conn.peer


class Requests:
    """A call's request messages as an async iterator; taking one gives its bytes back to the
    peer's send window."""

    __slots__ = ("_parse", "_stream")

    def __init__(self, stream: Stream, parse: Callable[[bytes | bytearray], Any]) -> None:
        self._stream = stream
        self._parse = parse

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        stream = self._stream
        inbox = stream.inbox
        while not inbox:
            if stream.remote_closed:
                raise StopAsyncIteration
            waiter = stream.waiter = stream.conn.loop.create_future()
            await waiter
        message = inbox.popleft()
        if not inbox:
            stream.credit()
        return self._parse(message)


class Stream:
    """One HTTP/2 stream: a call's received messages and its send side."""

    __slots__ = (
        "body",
        "conn",
        "filled",
        "headers_sent",
        "id",
        "inbox",
        "partial",
        "remote_closed",
        "reset",
        "send_window",
        "task",
        "uncredited",
        "waiter",
        "window_waiter",
    )

    def __init__(self, stream_id: int, conn: Connection) -> None:
        self.id = stream_id
        self.conn = conn
        self.inbox: deque[bytes | bytearray] = deque()
        self.partial = bytearray()
        self.body: bytearray | None = None  # a message that spans frames, as it fills
        self.filled = 0
        self.waiter: asyncio.Future[None] | None = None
        self.remote_closed = False
        self.reset = False
        self.headers_sent = False
        self.send_window = conn.peer_initial_window
        self.uncredited = 0
        self.task: asyncio.Task[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def received(self, payload: bytes | memoryview) -> None:
        """DATA for this stream: split it into gRPC messages. A message that spans frames is
        copied once, into a buffer of its announced size, and parsed from there."""
        size = len(payload)
        self.uncredited += size
        if self.uncredited > self.conn.server.window_bytes:  # past the window the host gave
            self.fail(StatusCode.RESOURCE_EXHAUSTED, "the peer sent past the stream's flow-control window")
            return
        pos = 0
        while pos < size:
            body = self.body
            if body is not None:  # filling a message that spans frames
                take = min(size - pos, len(body) - self.filled)
                body[self.filled : self.filled + take] = payload[pos : pos + take]  # same length: in place
                self.filled += take
                pos += take
                if self.filled == len(body):
                    self.inbox.append(body)
                    self.body = None
                continue
            partial = self.partial  # a message prefix cut between frames (rare)
            if partial or size - pos < 5:
                take = min(5 - len(partial), size - pos)
                partial += payload[pos : pos + take]
                pos += take
                if len(partial) < 5:
                    break
                flag, length = _MESSAGE_PREFIX.unpack(partial)
                partial.clear()
            else:
                flag, length = _MESSAGE_PREFIX.unpack_from(payload, pos)
                pos += 5
            if flag:
                self.fail(StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
                return
            if length > self.conn.server.max_message_bytes:
                limit = self.conn.server.max_message_bytes
                self.fail(StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max ({length} vs. {limit})")
                return
            if size - pos >= length:  # the usual case: the whole message in this frame
                self.inbox.append(bytes(payload[pos : pos + length]))
                pos += length
            else:
                self.body = bytearray(length)
                self.filled = 0
        if self.inbox:
            self.wake()
        self.credit()

    def credit(self) -> None:
        """Give received bytes back to the peer's send window."""
        # Bytes go back to the peer only while nothing waits unread, a quarter window at a time:
        # what the host holds per stream stays within the window plus one message.
        if self.inbox or self.uncredited < self.conn.server.window_update_at or self.remote_closed:
            return
        self.conn.write(_frame(WINDOW_UPDATE, 0, self.id, _U32.pack(self.uncredited)))
        self.uncredited = 0

    def fail(self, code: StatusCode, details: str) -> None:
        """End the call from the transport's side with ``code``: the handler's requests end (as
        grpc.aio ends them) and what it sends from now on is dropped."""
        if self.reset:
            return
        log.warning("HTTP/2 stream %d from %s: %s", self.id, self.conn.peer, details)
        self.conn.finish(self, code, details)
        self.inbox.clear()
        self.wake()

    async def send(self, message: bytes) -> None:
        """Send one message; waits only when flow control or the socket says so."""
        if self.reset:
            raise asyncio.CancelledError("stream reset")
        conn = self.conn
        if not self.headers_sent:
            self.headers_sent = True
            conn.write(_frame(HEADERS, END_HEADERS, self.id, RESPONSE_HEADERS))
        size = len(message) + 5
        if size <= conn.peer_max_frame and size <= self.send_window and size <= conn.send_window and not conn.paused:
            self.send_window -= size
            conn.send_window -= size
            conn.write(_header(DATA, 0, self.id, size))
            conn.write(_MESSAGE_PREFIX.pack(0, len(message)))
            conn.write(message)
            return
        await self._send_slowly(message)

    async def _send_slowly(self, message: bytes) -> None:
        """A message that must wait for windows or the socket, or spans frames: frame by frame,
        the message's bytes written as slices of it (no copy)."""
        conn = self.conn
        prefix = _MESSAGE_PREFIX.pack(0, len(message))
        body = memoryview(message)
        total = len(message) + 5
        sent = flushed = 0
        while sent < total:
            if self.reset:
                raise asyncio.CancelledError("stream reset")
            n = min(total - sent, conn.peer_max_frame, self.send_window, conn.send_window)
            if n <= 0 or conn.paused:
                self.window_waiter = conn.loop.create_future()
                conn.blocked.add(self)
                try:
                    await self.window_waiter
                finally:
                    conn.blocked.discard(self)
                continue
            self.send_window -= n
            conn.send_window -= n
            conn.write(_header(DATA, 0, self.id, n))
            end = sent + n
            if sent < 5:
                conn.write(prefix[sent : min(end, 5)])
            if end > 5:
                conn.write(body[max(sent, 5) - 5 : end - 5])
            sent = end
            if sent - flushed >= WRITE_BATCH:
                conn.flush()
                flushed = sent

    def cut(self) -> None:
        """The peer reset the stream (or the connection went): the handler is cancelled."""
        self.reset = True
        self.remote_closed = True
        self.wake()
        self.unblock()
        if self.task is not None:
            self.task.cancel()

    def unblock(self) -> None:
        waiter = self.window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection (from one Envoy worker, typically): frames in, frames out."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # the start of a frame, in the pieces reads brought
        self.pending_size = 0
        self.needed = 0  # bytes the pending frame needs before it can be parsed
        self.preface = False
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.decoder = hpack.Decoder()
        self.header_block: bytearray | None = None  # a HEADERS frame waiting for CONTINUATION
        self.header_stream = 0
        self.header_end_stream = False
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.send_window = DEFAULT_WINDOW
        self.received_unacked = 0
        self.out: list[bytes | memoryview] = []
        self.flush_scheduled = False
        self.paused = False
        self.blocked: set[Stream] = set()
        self.closing = False
        self.peer = ""

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data``; everything queued in one loop pass leaves in one write."""
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        out, self.out = self.out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)  # uvloop: one writev, no joined copy

    def pause_writing(self) -> None:
        # The peer does not read what the host writes: stop reading what it sends until it
        # does, so that a flood of PINGs or SETTINGS cannot queue answers without bound.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._unblock_all()

    def _unblock_all(self) -> None:
        for stream in list(self.blocked):
            stream.unblock()

    # -- connection life -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        server = self.server
        settings = b"".join(
            struct.pack(">HL", key, value)
            for key, value in (
                (INITIAL_WINDOW_SIZE, server.window_bytes),
                (MAX_FRAME_SIZE, OWN_MAX_FRAME),
                (MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK),
            )
        )
        self.write(_frame(SETTINGS, 0, 0, settings))
        self.write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.cut()
        self.streams.clear()
        self.transport = None

    def close(self, code: int = NO_ERROR, message: str = "") -> None:
        """GOAWAY and close once written."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        self.write(_frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(code) + message.encode()))
        self.flush()
        self.transport.close()

    # -- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.pending:  # a frame the last reads cut: join the pieces once it is whole
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size < self.needed:
                return
            data = b"".join(self.pending)
            self.pending = []
            self.pending_size = 0
        try:
            if not self.preface:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise PeerError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    self._keep(data, len(PREFACE))
                    return
                if not data.startswith(PREFACE):
                    raise PeerError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self.preface = True
                data = data[len(PREFACE) :]
            pos = 0
            end = len(data)
            needed = 9
            view = memoryview(data)  # over immutable bytes: frames are sliced without copies
            while end - pos >= 9:
                hi, lo, kind, flags, stream_id = _FRAME_HEADER.unpack_from(data, pos)
                length = hi << 8 | lo
                if length > OWN_MAX_FRAME:
                    raise PeerError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos < 9 + length:
                    needed = 9 + length
                    break
                start = pos + 9
                pos = start + length
                self._frame_received(kind, flags, stream_id & 0x7FFFFFFF, view[start:pos])
            if pos < end:
                self._keep(data[pos:], needed)
        except PeerError as exc:
            log.warning("HTTP/2 connection from %s closed: %s", self.peer, exc)
            self.close(exc.code, str(exc))
        except hpack.HPACKError as exc:
            log.warning("HTTP/2 connection from %s closed: bad header block: %s", self.peer, exc)
            self.close(COMPRESSION_ERROR, "bad header block")
        except Exception:
            log.exception("HTTP/2 connection from %s closed: unexpected error", self.peer)
            self.close(INTERNAL_ERROR, "internal error")

    def _keep(self, rest: bytes, needed: int) -> None:
        """Hold the start of a frame (or of the preface) until ``needed`` bytes are there."""
        self.pending = [rest]
        self.pending_size = len(rest)
        self.needed = needed

    def _frame_received(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if self.header_block is not None and kind != CONTINUATION:
            raise PeerError(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0:
                raise PeerError(PROTOCOL_ERROR, "HEADERS on stream 0")
            block = payload
            if flags & PADDED:
                pad = block[0]
                block = block[1 : len(block) - pad]
            if flags & PRIORITY_FLAG:
                block = block[5:]
            if flags & END_HEADERS:
                self._headers(stream_id, bytes(block), bool(flags & END_STREAM))
            else:
                self.header_block = bytearray(block)
                self.header_stream = stream_id
                self.header_end_stream = bool(flags & END_STREAM)
        elif kind == CONTINUATION:
            if self.header_block is None or stream_id != self.header_stream:
                raise PeerError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.header_block += payload
            if len(self.header_block) > MAX_HEADER_BLOCK:
                raise PeerError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                whole, self.header_block = bytes(self.header_block), None
                self._headers(stream_id, whole, self.header_end_stream)
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise PeerError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong size")
            increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
            if stream_id == 0:
                self.send_window += increment
                self._unblock_all()
            else:
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.send_window += increment
                    stream.unblock()
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self.write(_frame(PING, ACK, 0, bytes(payload)))
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream.cut()
        elif kind == GOAWAY:
            self.closing = True  # the peer opens no new streams; open ones run to their end
        elif kind == PUSH_PROMISE:
            raise PeerError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _settings(self, payload: memoryview) -> None:
        if len(payload) % 6:
            raise PeerError(FRAME_SIZE_ERROR, "SETTINGS of wrong size")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > 0x7FFFFFFF:
                    raise PeerError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                self._unblock_all()
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 0xFFFFFF:
                    raise PeerError(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == HEADER_TABLE_SIZE:
                pass  # the host's header blocks never use the dynamic table
        self.write(_frame(SETTINGS, ACK, 0))

    def _data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise PeerError(PROTOCOL_ERROR, "DATA on stream 0")
        self.received_unacked += len(payload)
        if self.received_unacked > CONNECTION_WINDOW:
            raise PeerError(FLOW_CONTROL_ERROR, "the peer sent past the connection's flow-control window")
        if self.received_unacked >= CONNECTION_WINDOW // 2:
            self.write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.received_unacked)))
            self.received_unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # a stream the host already ended: its bytes count for the connection only
        if flags & PADDED:  # the padding counts against the stream's window too
            pad = payload[0]
            payload = payload[1 : len(payload) - pad]
            stream.uncredited += pad + 1
        if payload:
            stream.received(payload)
        if flags & END_STREAM and not stream.reset:
            stream.remote_closed = True
            stream.wake()

    def _headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        headers = self.decoder.decode(block, raw=True)  # always decoded: it updates the peer's table
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers
            if end_stream:
                stream.remote_closed = True
                stream.wake()
            return
        if stream_id <= self.last_stream:
            return  # trailers of a stream the host already ended
        if stream_id % 2 == 0:
            raise PeerError(PROTOCOL_ERROR, "even stream id from a client")
        self.last_stream = stream_id
        if self.closing or not self.server.serving:
            self.write(_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        stream = Stream(stream_id, self)
        stream.remote_closed = end_stream
        self.streams[stream_id] = stream
        path = ""
        for name, value in headers:
            if name == b":path":
                path = value.decode("latin-1")
        method = self.server.methods.get(path)
        if method is None:
            self.finish(stream, StatusCode.UNIMPLEMENTED, f"Method not found: {path}")
            return
        calls = self.server.calls
        stream.task = task = self.loop.create_task(self.server.run(stream, method))
        calls.add(task)
        task.add_done_callback(calls.discard)

    def finish(self, stream: Stream, code: StatusCode | None, details: str = "") -> None:
        """Send the call's trailers (Trailers-Only when no message went out) and forget it."""
        if stream.reset:
            return
        block = TRAILERS_OK if code is None or code is StatusCode.OK else _status_block(code, details)
        if not stream.headers_sent:
            block = RESPONSE_HEADERS + block
        self.write(_frame(HEADERS, END_STREAM | END_HEADERS, stream.id, block))
        if not stream.remote_closed:  # the peer still sends: tell it to stop (RFC 9113 8.1)
            self.write(_frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
        stream.reset = True
        stream.remote_closed = True
        self.streams.pop(stream.id, None)

    def cancel(self, stream: Stream) -> None:
        """End a call the server gave up on (shutdown): RST_STREAM CANCEL."""
        if stream.reset:
            return
        self.write(_frame(RST_STREAM, 0, stream.id, _U32.pack(CANCEL)))
        stream.reset = True
        self.streams.pop(stream.id, None)


class H2Server:
    """gRPC methods served on asyncio listeners (TCP, Unix socket, TLS)."""

    def __init__(self, *, max_message_bytes: int, window_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.window_bytes = window_bytes
        self.window_update_at = max(window_bytes // 4, 1)
        self.methods: dict[str, Method] = {}
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.base_events.Server] = []
        self.serving = True
        self.calls: set[asyncio.Task[None]] = set()  # every call's task until it is done

    def add_method(self, path: str, kind: str, handler: Callable[..., Any], request_type: Any) -> None:
        """Serve ``handler`` at ``/package.Service/Method`` ``path``."""
        self.methods[path] = Method(kind, handler, request_type)

    async def listen(
        self,
        host: str | None,
        port: int,
        *,
        path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> int:
        """Listen on ``host:port`` (or the Unix socket ``path``); returns the bound port."""
        loop = asyncio.get_running_loop()
        if path is not None:
            listener = await loop.create_unix_server(lambda: Connection(self), path, ssl=ssl_context)
            self.listeners.append(listener)
            return 0
        listener = await loop.create_server(
            lambda: Connection(self), host, port, ssl=ssl_context, reuse_port=reuse_port or None, reuse_address=True
        )
        self.listeners.append(listener)
        return int(listener.sockets[0].getsockname()[1])

    async def run(self, stream: Stream, method: Method) -> None:
        """One call: the handler's answers out, then the trailers with its status."""
        conn = stream.conn
        code: StatusCode | None = None
        details = ""
        try:
            parse = method.request_type.FromString
            context = Context(stream)
            if method.kind == BIDI:
                answers = method.handler(Requests(stream, parse), context)
                try:
                    async for answer in answers:
                        await stream.send(answer.SerializeToString())
                finally:
                    await answers.aclose()
            else:
                request = await self._only_request(stream, parse)
                if method.kind == UNARY:
                    answer = await method.handler(request, context)
                    await stream.send(answer.SerializeToString())
                else:
                    await method.handler(request, context)
        except AbortError as exc:
            code, details = exc.code, exc.details
        except asyncio.CancelledError:
            conn.cancel(stream)
            raise
        except Exception as exc:  # a handler's bug: the call fails, the server goes on
            log.error("unexpected error in %s", method.handler, exc_info=True)
            code, details = StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}"
        conn.finish(stream, code, details)

    @staticmethod
    async def _only_request(stream: Stream, parse: Callable[[bytes | bytearray], Any]) -> Any:
        requests = Requests(stream, parse)
        try:
            return await anext(requests)
        except StopAsyncIteration:
            raise AbortError(StatusCode.INTERNAL, "no request message") from None

    async def stop(self, grace: float | None = None) -> None:
        """Close the listeners, cancel every open call, and close the connections with GOAWAY
        (``grace`` is accepted for grpc.aio's signature: the host waits for calls itself)."""
        self.serving = False
        for listener in self.listeners:
            listener.close()
        calls = list(self.calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls, timeout=5.0)
        for conn in list(self.connections):
            conn.close()
        for listener in self.listeners:
            await listener.wait_closed()
