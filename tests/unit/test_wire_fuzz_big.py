"""Property-based fuzzing of the builtin server (hypothesis): random frame sequences, and random
corruptions of valid exchanges, sent to one server that lives through every example.

After each example: the server never crashed (a new connection still gets a valid answer),
never hung the connection (it answers a PING, or it has closed it), always ended a broken
connection with GOAWAY before closing it, and leaked nothing once the connection is gone (no
handler task, no byte charged to the budget, no connection left, no error logged).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc_host.wire import BIDI, UNARY, Context, H2Server, Limits

from .h2peer import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    grpc_message,
    grpc_request,
    ping,
    raw,
    rst_stream,
    window_update,
)
from .h2peer import (
    settings as settings_frame,
)

ECHO = "/test.Echo/Echo"
SLOW = "/test.Echo/Slow"
UNARY_PATH = "/test.Echo/Digest"


async def echo(requests: AsyncIterator[BytesValue], context: Context) -> AsyncIterator[BytesValue]:
    async for request in requests:
        yield request


async def slow(requests: AsyncIterator[BytesValue], context: Context) -> AsyncIterator[BytesValue]:
    async for request in requests:
        await asyncio.sleep(0.001)
        yield request


async def digest(request: BytesValue, context: Context) -> BytesValue:
    return BytesValue(value=request.value[::-1])


class ServerThread:
    """An H2Server on its own event loop in a thread, for a synchronous hypothesis test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[logging.LogRecord] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._start())
        self.port = self.server.listeners[0].sockets[0].getsockname()[1]

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> H2Server:
        # Short deadlines: an example that leaves a frame unfinished is closed (with GOAWAY) soon.
        limits = Limits(max_concurrent_streams=8, frame_timeout=0.2, preface_timeout=0.2)
        server = H2Server(max_message_bytes=1 << 16, window_bytes=65535, limits=limits)
        server.add_method(ECHO, BIDI, echo, BytesValue)
        server.add_method(SLOW, BIDI, slow, BytesValue)
        server.add_method(UNARY_PATH, UNARY, digest, BytesValue)
        await server.listen("127.0.0.1", 0)
        return server

    async def _state(self) -> tuple[int, int, int]:
        return len(self.server.calls), self.server.budget.held, len(self.server.connections)

    def settled(self) -> tuple[int, int, int]:
        """Handler tasks, budget bytes and connections, once what can end has ended."""
        state = (0, 0, 0)
        for _ in range(100):
            state = self.run(self._state())
            if state == (0, 0, 0):
                break
            self.run(asyncio.sleep(0.02))
        return state

    def stop(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class ErrorLog(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    thread = ServerThread()
    handler = ErrorLog(thread.errors)
    logging.getLogger("extproc_host").addHandler(handler)
    try:
        yield thread
    finally:
        logging.getLogger("extproc_host").removeHandler(handler)
        thread.stop()


# -- what a client sends ---------------------------------------------------------------------------

STREAMS = st.sampled_from([1, 3, 5, 7, 9, 2, 0])
PATHS = st.sampled_from([ECHO, SLOW, UNARY_PATH, "/nope"])


@st.composite
def valid_frame(draw: st.DrawFn) -> tuple[str, tuple]:
    return draw(
        st.one_of(
            st.tuples(st.just("headers"), STREAMS, PATHS, st.booleans()),
            st.tuples(st.just("message"), STREAMS, st.binary(max_size=300), st.booleans()),
            st.tuples(st.just("window"), STREAMS, st.integers(1, 1 << 20)),
            st.tuples(st.just("reset"), STREAMS, st.integers(0, 13)),
            st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
            st.tuples(st.just("settings"), st.lists(st.tuples(st.integers(1, 9), st.integers(0, 1 << 31)), max_size=3)),
            st.tuples(st.just("trailers"), STREAMS),
            st.tuples(st.just("split-headers"), STREAMS, PATHS, st.integers(1, 20)),
        )
    )


@st.composite
def random_frame(draw: st.DrawFn) -> tuple[str, tuple]:
    kind = draw(st.integers(0, 12))
    flags = draw(st.integers(0, 255))
    length = draw(st.one_of(st.none(), st.integers(0, 70)))
    return ("raw", (kind, flags, draw(STREAMS), draw(st.binary(max_size=64)), length))


ACTIONS = st.lists(st.one_of(valid_frame(), valid_frame(), random_frame()), max_size=25)


def encode(actions: list[tuple[str, tuple]]) -> bytes:
    encoder = hpack.Encoder()
    out = [PREFACE, settings_frame()]
    for action in actions:
        name, args = action[0], action[1:]
        if name == "headers":
            stream_id, path, end = args
            out.append(
                raw(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream_id, encoder.encode(grpc_request(path)))
            )
        elif name == "split-headers":
            stream_id, path, cut = args
            block = encoder.encode(grpc_request(path))
            out.append(raw(HEADERS, 0, stream_id, block[:cut]))
            out.append(raw(CONTINUATION, END_HEADERS, stream_id, block[cut:]))
        elif name == "message":
            stream_id, body, end = args
            out.append(
                raw(DATA, END_STREAM if end else 0, stream_id, grpc_message(BytesValue(value=body).SerializeToString()))
            )
        elif name == "window":
            out.append(window_update(*args))
        elif name == "reset":
            out.append(rst_stream(*args))
        elif name == "ping":
            out.append(ping(*args))
        elif name == "settings":
            out.append(settings_frame(*args[0]))
        elif name == "trailers":
            out.append(raw(HEADERS, END_HEADERS | END_STREAM, args[0], encoder.encode([("x-t", "1")])))
        else:
            kind, flags, stream_id, payload, length = args[0]
            out.append(raw(kind, flags, stream_id, payload, length))
    return b"".join(out)


# -- what the server answers -----------------------------------------------------------------------


def pinged(frames: list[tuple[int, int, bytes]]) -> bool:
    return frames[-1][0] == 6 and frames[-1][2] == b"fuzzdone"


def exchange(
    port: int, wire: bytes, until: Callable[[list[tuple[int, int, bytes]]], bool] = pinged
) -> tuple[list[tuple[int, int, bytes]], bool]:
    """Send ``wire``, a PING, then zero bytes (which complete any frame left partial and then are
    frames the server must refuse); read until ``until`` (by default: the PING's ACK) or the close.
    The frames read (type, stream, payload) and whether the socket closed."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    try:
        sock.sendall(wire + ping(b"fuzzdone"))
        if until is pinged:
            sock.sendall(bytes(300))
    except (BrokenPipeError, ConnectionResetError):
        pass
    buffer = b""
    frames: list[tuple[int, int, bytes]] = []
    try:
        while True:
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, stream_id = buffer[3], struct.unpack(">L", buffer[5:9])[0] & 0x7FFFFFFF
                frames.append((kind, stream_id, buffer[9 : 9 + length]))
                buffer = buffer[9 + length :]
                if until(frames):
                    return frames, False
            chunk = sock.recv(65536)
            if not chunk:
                return frames, True
            buffer += chunk
    except ConnectionResetError:
        return frames, True
    except TimeoutError:
        raise AssertionError(f"the server neither answered nor closed; last frames: {frames[-5:]}") from None
    finally:
        sock.close()


def ended(*stream_ids: int) -> Callable[[list[tuple[int, int, bytes]]], bool]:
    """Until the server's trailers came on each of ``stream_ids``."""

    def done(frames: list[tuple[int, int, bytes]]) -> bool:
        return {s for kind, s, payload in frames if kind == HEADERS and b"grpc-status" in payload} >= set(stream_ids)

    return done


def still_serving(port: int) -> None:
    """A new connection gets a whole valid answer."""
    encoder = hpack.Encoder()
    message = grpc_message(BytesValue(value=b"abc").SerializeToString())
    wire = (
        PREFACE
        + settings_frame()
        + raw(HEADERS, END_HEADERS, 1, encoder.encode(grpc_request(UNARY_PATH)))
        + raw(DATA, END_STREAM, 1, message)
    )
    frames, closed = exchange(port, wire, ended(1))
    data = b"".join(payload for kind, stream_id, payload in frames if kind == DATA and stream_id == 1)
    assert data == grpc_message(BytesValue(value=b"cba").SerializeToString()), frames
    assert not closed


def check(server: ServerThread, wire: bytes) -> None:
    frames, closed = exchange(server.port, wire)
    if closed:
        assert any(kind == 7 for kind, _, _ in frames), "the connection closed without a GOAWAY"
    goaways = [payload for kind, _, payload in frames if kind == 7]
    for payload in goaways:
        code = struct.unpack(">L", payload[4:8])[0]
        assert code != 2, f"GOAWAY INTERNAL_ERROR: {payload[8:]!r}"  # a bug, not the peer's fault
    assert server.settled() == (0, 0, 0), "a task, budget bytes or a connection left behind"
    assert not server.errors, server.errors[0].getMessage()


@settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(actions=ACTIONS)
def test_random_frame_sequences(server: ServerThread, actions: list[tuple[str, tuple]]) -> None:
    check(server, encode(actions))


VALID = encode(
    [
        ("settings", [(4, 1 << 20)]),
        ("headers", 1, ECHO, False),
        ("message", 1, b"one", False),
        ("split-headers", 3, SLOW, 4),
        ("message", 3, b"two" * 50, False),
        ("window", 0, 1 << 20),
        ("message", 1, b"three", True),
        ("ping", b"12345678"),
        ("message", 3, b"", True),
        ("headers", 5, UNARY_PATH, False),
        ("message", 5, b"four", True),
    ]
)


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete"]),
            st.integers(len(PREFACE), len(VALID) - 1),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_corrupted_valid_exchanges(server: ServerThread, edits: list[tuple[str, int, int]]) -> None:
    wire = bytearray(VALID)
    for op, position, value in edits:
        position = min(position, len(wire) - 1)
        if op == "flip":
            wire[position] ^= value or 1
        elif op == "insert":
            wire.insert(position, value)
        else:
            del wire[position]
    check(server, bytes(wire))


def test_the_valid_exchange_is_valid(server: ServerThread) -> None:
    """The exchange the corruptions start from is answered whole."""
    frames, closed = exchange(server.port, VALID, ended(1, 3, 5))
    assert not closed and not [f for f in frames if f[0] in (3, 7)], frames
    still_serving(server.port)


def test_the_server_still_serves_after_the_fuzzing(server: ServerThread) -> None:
    still_serving(server.port)
    assert server.settled() == (0, 0, 0)
