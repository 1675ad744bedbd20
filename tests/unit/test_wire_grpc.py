"""The builtin gRPC server (wire/) against grpc's own client: messages larger than a frame
and than a flow-control window both ways, errors as gRPC statuses, cancellation reaching the
handler, and bytes that are not HTTP/2 closing only their own connection."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from extproc_host.wire import BIDI, SERVER_STREAM, UNARY, Context, H2Server, Limits, StatusCode
from extproc_host.wire.http2.frames import GOAWAY

ECHO = "/test.Echo/Echo"
SIZE = "/test.Echo/Size"
COUNT = "/test.Echo/Count"
WINDOW = 65535


class Handlers:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def echo(self, requests: AsyncIterator[BytesValue], context: Context) -> AsyncIterator[BytesValue]:
        self.started.set()
        try:
            async for request in requests:
                if request.value == b"abort":
                    await context.abort(StatusCode.PERMISSION_DENIED, "no: 100% sure \u2713")
                if request.value == b"raise":
                    raise RuntimeError("handler bug")
                yield BytesValue(value=request.value)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def size(self, request: BytesValue, context: Context) -> BytesValue:
        return BytesValue(value=hashlib.sha256(request.value).digest())

    async def count(self, request: BytesValue, context: Context) -> None:
        for i in range(int(request.value)):
            await context.write(BytesValue(value=str(i).encode()))


@pytest.fixture
async def served() -> AsyncIterator[tuple[H2Server, Handlers, grpc.aio.Channel]]:
    handlers = Handlers()
    server = H2Server(max_message_bytes=8 * 1024 * 1024, window_bytes=WINDOW)
    server.add_method(ECHO, BIDI, handlers.echo, BytesValue)
    server.add_method(SIZE, UNARY, handlers.size, BytesValue)
    server.add_method(COUNT, SERVER_STREAM, handlers.count, BytesValue)
    port = await server.listen("127.0.0.1", 0)
    options = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    try:
        yield server, handlers, channel
    finally:
        await channel.close()
        await server.stop()


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in ``data`` (a server's bytes, which start with frames)."""
    types, pos = [], 0
    while pos + 9 <= len(data):
        types.append(data[pos + 3])
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
    return types


def echo_call(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(ECHO, BytesValue.SerializeToString, BytesValue.FromString)


async def test_messages_larger_than_frames_and_windows_come_back_whole(served) -> None:
    _, _, channel = served
    bodies = [b"", b"x", bytes(range(256)) * 1000, b"\x07" * (5 * 1024 * 1024 + 3)]  # 5 MiB > 64 KiB window
    call = echo_call(channel)()
    for body in bodies:
        await call.write(BytesValue(value=body))
        answer = await call.read()
        assert hashlib.sha256(answer.value).hexdigest() == hashlib.sha256(body).hexdigest()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


async def test_many_concurrent_streams_each_get_their_own_answers(served) -> None:
    _, _, channel = served

    async def one(i: int) -> list[bytes]:
        call = echo_call(channel)()
        out = []
        for j in range(3):
            await call.write(BytesValue(value=f"{i}-{j}".encode() * (i + 1)))
            out.append((await call.read()).value)
        await call.done_writing()
        return out

    results = await asyncio.gather(*(one(i) for i in range(50)))
    for i, got in enumerate(results):
        assert got == [f"{i}-{j}".encode() * (i + 1) for j in range(3)]


async def test_unary_and_server_streaming(served) -> None:
    _, _, channel = served
    body = b"y" * 300_000
    digest = await channel.unary_unary(SIZE, BytesValue.SerializeToString, BytesValue.FromString)(
        BytesValue(value=body)
    )
    assert digest.value == hashlib.sha256(body).digest()
    stream = channel.unary_stream(COUNT, BytesValue.SerializeToString, BytesValue.FromString)(BytesValue(value=b"5"))
    assert [m.value async for m in stream] == [b"0", b"1", b"2", b"3", b"4"]


async def test_abort_and_handler_errors_become_statuses(served) -> None:
    _, _, channel = served
    call = echo_call(channel)()
    await call.write(BytesValue(value=b"abort"))
    assert await call.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await call.details() == "no: 100% sure \u2713"
    call = echo_call(channel)()
    await call.write(BytesValue(value=b"raise"))
    assert await call.code() is grpc.StatusCode.UNKNOWN
    assert "handler bug" in await call.details()


async def test_unknown_method_is_unimplemented(served) -> None:
    _, _, channel = served
    call = channel.unary_unary("/test.Echo/Nope", BytesValue.SerializeToString, BytesValue.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(BytesValue(value=b"x"))
    assert error.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_message_over_the_limit_is_resource_exhausted(served) -> None:
    server, _, channel = served
    server.max_message_bytes = 1000
    call = echo_call(channel)()
    await call.write(BytesValue(value=b"z" * 2000))
    assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in await call.details()


async def test_client_cancel_cancels_the_handler(served) -> None:
    _, handlers, channel = served
    call = echo_call(channel)()
    await call.write(BytesValue(value=b"hello"))
    assert (await call.read()).value == b"hello"
    call.cancel()
    await asyncio.wait_for(handlers.cancelled.wait(), 5)


async def test_garbage_closes_only_its_connection(served) -> None:
    server, _, channel = served
    port = server.listeners[0].sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        await loop.sock_sendall(sock, garbage)
        received = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
            received += chunk
        sock.close()
        assert GOAWAY in frame_types(received)
    answer = await channel.unary_unary(SIZE, BytesValue.SerializeToString, BytesValue.FromString)(
        BytesValue(value=b"still serving")
    )
    assert answer.value == hashlib.sha256(b"still serving").digest()


async def test_a_peer_that_does_not_read_is_not_read_either() -> None:
    """A client that sends and never reads the answers (with windows wide open): the server
    stops reading once its answers back up, so what it holds for that connection stays bounded."""
    server = H2Server(max_message_bytes=1 << 20, window_bytes=WINDOW, limits=Limits(initial_window=WINDOW))
    server.add_method(ECHO, BIDI, Handlers().echo, BytesValue)
    port = await server.listen("127.0.0.1", 0)
    message = BytesValue(value=b"q" * 60000).SerializeToString()  # within each stream's window
    frame = len(message) + 5
    block = _request_block(ECHO)
    pieces = [_raw_call(ECHO, b"")]
    for stream_id in range(1, 1600, 2):  # 48 MB of echo requests: more than both kernels buffer
        if stream_id > 1:
            pieces.append(len(block).to_bytes(3, "big") + bytes([1, 4]) + stream_id.to_bytes(4, "big") + block)
        pieces.append(frame.to_bytes(3, "big") + bytes([0, 0]) + stream_id.to_bytes(4, "big"))
        pieces.append(len(message).to_bytes(5, "big") + message)
    flood = b"".join(pieces)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    sent = 0
    stalled = 0.0
    while sent < len(flood) and stalled < 1.0:
        try:
            sent += sock.send(flood[sent : sent + 65536])
            stalled = 0.0
        except BlockingIOError:
            await asyncio.sleep(0.05)
            stalled += 0.05
    (transport,) = server.connections
    held = transport.transport.get_write_buffer_size() + sum(map(len, transport.conn.out)) + server.budget.held
    sock.close()
    await server.stop()
    assert sent < len(flood) / 2, "the server read the requests although its answers were not taken"
    assert held < 4 * 1024 * 1024, f"the server holds {held} bytes for the connection"


async def test_health_watch_follows_the_host_through_start_and_shutdown() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from extproc_host.health import EXT_PROC_SERVICE, Health

    server = H2Server(max_message_bytes=1024 * 1024, window_bytes=WINDOW)
    health = Health(server)
    await health.starting()
    port = await server.listen("127.0.0.1", 0)
    Status = health_pb2.HealthCheckResponse
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE))
        assert (await watch.read()).status == Status.NOT_SERVING
        await health.serving()
        assert (await watch.read()).status == Status.SERVING
        assert (await stub.Check(health_pb2.HealthCheckRequest())).status == Status.SERVING
        await health.shutting_down()
        assert (await watch.read()).status == Status.NOT_SERVING
        await health.serving()  # too late: shutdown is for good
        assert (await stub.Check(health_pb2.HealthCheckRequest())).status == Status.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert error.value.code() is grpc.StatusCode.NOT_FOUND
        watch.cancel()
    await server.stop()


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 6, 16384, 70000])
async def test_messages_cut_anywhere_across_frames_and_reads(cut: int) -> None:
    """Raw frames: messages whose prefix and body are cut at every kind of boundary (inside the
    5-byte prefix, right after it, mid-body), several messages in one frame, an empty message.
    A cut under 16384 bytes is made ``cut`` bytes into each message (the rest of the message in
    one frame), so that no flood of tiny frames is needed to hit each boundary."""
    handlers = Handlers()
    # The raw client sends without waiting for window: the first one is the whole 1 MiB.
    server = H2Server(max_message_bytes=8 * 1024 * 1024, window_bytes=1 << 20, limits=Limits(initial_window=1 << 20))
    server.add_method(ECHO, BIDI, handlers.echo, BytesValue)
    port = await server.listen("127.0.0.1", 0)
    bodies = [b"a" * 100_000, b"", b"b" * 7, bytes(range(256)) * 300]
    wire = b"".join(
        len(m).to_bytes(5, "big") + m for m in (BytesValue(value=body).SerializeToString() for body in bodies)
    )
    if cut < 16384:
        pieces = []
        for body in bodies:
            message = BytesValue(value=body).SerializeToString()
            whole = len(message).to_bytes(5, "big") + message
            pieces += [whole[:cut], whole[cut:]] if cut < len(whole) else [whole]
    else:
        pieces = [wire[start : start + cut] for start in range(0, len(wire), cut)]
    frames = b""
    for piece in pieces:
        frames += len(piece).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big") + piece
    frames += bytes([0, 0, 0, 0, 1]) + (1).to_bytes(4, "big")  # empty DATA, END_STREAM
    request = _raw_call(ECHO, frames)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for start in range(0, len(request), 4099):  # reads cut frames too
        writer.write(request[start : start + 4099])
        await writer.drain()
    received = b""
    while GOAWAY not in frame_types(received) and not _ends_stream(received):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "connection closed early"
        received += chunk
    writer.close()
    await server.stop()
    payload = b"".join(data for kind, data in _frames(received) if kind == 0)
    messages = []
    while payload:
        length = int.from_bytes(payload[1:5], "big")
        messages.append(BytesValue.FromString(payload[5 : 5 + length]).value)
        payload = payload[5 + length :]
    assert messages == bodies


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        out.append((data[pos + 3], data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


def _ends_stream(data: bytes) -> bool:
    """The server's trailers (HEADERS with END_STREAM) came."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if pos + 9 + length > len(data):
            return False
        if data[pos + 3] == 1 and data[pos + 4] & 1:
            return True
        pos += 9 + length
    return False


def _request_block(path: str) -> bytes:
    """POST, http, :path and content-type: static entries and literals without indexing."""
    return b"\x83\x86" + bytes([0x04, len(path)]) + path.encode() + b"\x0f\x10" + bytes([16]) + b"application/grpc"


def _raw_call(path: str, frames: bytes) -> bytes:
    """A client's bytes for one call on stream 1: preface, SETTINGS (1 GiB initial window), the
    server's SETTINGS acknowledged (without reading them), a connection WINDOW_UPDATE of 1 GiB,
    HEADERS for ``path``, then ``frames``."""
    headers = _request_block(path)
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + bytes([0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4])
        + (1 << 30).to_bytes(4, "big")
        + bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])  # SETTINGS ACK: the server's window applies at once
        + bytes([0, 0, 4, 8, 0, 0, 0, 0, 0])
        + (1 << 30).to_bytes(4, "big")
        + len(headers).to_bytes(3, "big")
        + bytes([1, 4])
        + (1).to_bytes(4, "big")
        + headers
        + frames
    )


async def test_a_peer_past_the_window_fails_its_stream() -> None:
    """A client that ignores the window while the handler does not read: the stream is reset
    with FLOW_CONTROL_ERROR instead of the server queueing whatever comes."""
    stalled = asyncio.Event()

    async def stall(requests, context):
        stalled.set()
        await asyncio.Event().wait()  # never reads
        yield BytesValue()

    server = H2Server(max_message_bytes=1 << 20, window_bytes=WINDOW)
    server.add_method(ECHO, BIDI, stall, BytesValue)
    port = await server.listen("127.0.0.1", 0)
    message = BytesValue(value=b"m" * 1000).SerializeToString()
    frame = len(message) + 5
    data = (
        frame.to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big") + len(message).to_bytes(5, "big") + message
    ) * 100
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_raw_call(ECHO, data))  # 100 KB against a 64 KiB window
    received = b""
    while 3 not in frame_types(received):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "connection closed early"
        received += chunk
    writer.close()
    await server.stop()
    (reset,) = [data for kind, data in _frames(received) if kind == 3]
    assert reset == (3).to_bytes(4, "big")  # RST_STREAM FLOW_CONTROL_ERROR
    assert server.budget.held == 0


async def test_past_the_budget_one_message_per_connection_fills_and_the_rest_wait_for_room() -> None:
    """A message larger than its stream's window gets the window back as it arrives while the
    budget has room. Past it one call of the connection at a time goes on until its message is
    whole (so a connection never stalls on messages none can finish); the others get no window
    until the finisher is done or bytes are released, then go on; every answer comes back whole."""
    from extproc_host.wire import Budget

    from .h2peer import DataFrame, HeadersFrame, WindowUpdateFrame, connect, data, grpc_request, messages_of

    window = 16 * 1024
    budget = Budget(128 * 1024)
    budget.take(128 * 1024)  # the budget is full: other streams' answers, say
    release = asyncio.Event()

    async def digest(requests, context):
        await release.wait()
        async for request in requests:
            yield BytesValue(value=hashlib.sha256(request.value).digest())

    server = H2Server(
        max_message_bytes=1 << 20, window_bytes=window, limits=Limits(initial_window=window), budget=budget
    )
    server.add_method(ECHO, BIDI, digest, BytesValue)
    port = await server.listen("127.0.0.1", 0)
    # Each message is exactly three windows on the wire: 5 + 1 + 3 + 49143 bytes.
    values = {sid: bytes([sid]) * 49143 for sid in (1, 3, 5)}
    wire = {
        sid: (b"\0" + (49152 - 5).to_bytes(4, "big") + BytesValue(value=v).SerializeToString())
        for sid, v in values.items()
    }
    assert all(len(w) == 3 * window for w in wire.values())
    pieces = {sid: [w[i : i + window] for i in range(0, len(w), window)] for sid, w in wire.items()}

    def updates(sid: int) -> int:
        return len(peer.received.of(WindowUpdateFrame, sid))

    async def granted(sid: int, count: int) -> None:
        await peer.until(lambda f: isinstance(f, WindowUpdateFrame) and updates(sid) >= count)

    try:
        async with connect(port) as peer:
            await peer.handshake()
            await peer.alive()  # the server's 16 KiB window applies from here
            for sid in (1, 3):
                peer.send(peer.headers(sid, grpc_request(ECHO)), data(sid, pieces[sid][0]))
            await peer.drain()
            await granted(1, 1)  # over the budget: stream 1 asked first and may finish
            await peer.alive()
            assert updates(3) == 0, "a second stream got window past the budget"
            peer.send(data(1, pieces[1][1]))
            await granted(1, 2)
            peer.send(data(1, pieces[1][2]))  # stream 1's message is whole: stream 3's turn
            await granted(3, 1)
            peer.send(peer.headers(5, grpc_request(ECHO)), data(5, pieces[5][0]))
            await peer.alive()
            assert updates(5) == 0, "a stream got window while another finishes past the budget"
            budget.give(128 * 1024)  # room again: the waiting stream goes on
            await granted(5, 1)
            peer.send(data(3, pieces[3][1]), data(5, pieces[5][1]))
            await granted(3, 2)
            await granted(5, 2)
            for sid in (1, 3, 5):
                peer.send(data(sid, pieces[sid][2] if sid != 1 else b"", end_stream=True))
            release.set()
            ended: set[int] = set()
            while len(ended) < 3:
                frame = await peer.next_frame()
                assert frame is not None, "the connection closed before every answer"
                if isinstance(frame, HeadersFrame) and "END_STREAM" in frame.flags:
                    assert (b"grpc-status", b"0") in frame.fields
                    ended.add(frame.stream_id)
            for sid in (1, 3, 5):
                body = b"".join(f.data for f in peer.received.of(DataFrame, sid))
                assert messages_of(body) == [BytesValue(value=hashlib.sha256(values[sid]).digest()).SerializeToString()]
    finally:
        await server.stop()
    assert budget.held == 0 and not budget.waiting


async def test_a_message_stays_charged_while_its_handler_works_on_it(served) -> None:
    """The budget counts a request message until its handler asks for the next one: its parsed
    copy and what the handler makes of it live that long."""
    server, _handlers, channel = served
    seen: list[int] = []

    async def note(requests, context):
        async for request in requests:
            seen.append(server.budget.held - len(request.value))  # what else is counted
            yield BytesValue()

    server.add_method("/test.Echo/Note", BIDI, note, BytesValue)
    call = channel.stream_stream("/test.Echo/Note", BytesValue.SerializeToString, BytesValue.FromString)()
    for size in (100_000, 50_000):
        await call.write(BytesValue(value=b"n" * size))
        await call.read()
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    # Each time the message's own bytes and the same rest (the stream's grown window, a few bytes
    # of protobuf framing): nothing of the message before.
    assert seen[0] == seen[1] and 0 < seen[0] < WINDOW, seen
    assert server.budget.held == 0


def test_a_stream_ended_while_it_opens_keeps_no_handler() -> None:
    """A stream its application ends at once (a refusal, an unknown method, a plain answer to a
    request that has ended) is forgotten with no Stream <-> handler reference left: nothing for
    the garbage collector to find, however many a flood opens."""
    import hpack

    from extproc_host.wire.http2.connection import Connection
    from extproc_host.wire.http2.frames import REFUSED_STREAM
    from extproc_host.wire.http2.limits import Limits as ConnectionLimits

    from .h2peer import END_HEADERS, END_STREAM, HEADERS, PREFACE, grpc_request, raw, settings

    opened = []

    class Handler:  # holds its stream, as a Call does
        def __init__(self, stream) -> None:
            self.stream = stream

    class Refusing:
        def stream_opened(self, conn, stream, request):
            handler = Handler(stream)
            conn.reset_stream(stream, REFUSED_STREAM)
            opened.append(stream)
            return handler

    conn = Connection(Refusing(), ConnectionLimits())
    block = hpack.Encoder().encode(grpc_request())
    conn.receive(PREFACE + settings() + raw(HEADERS, END_HEADERS | END_STREAM, 1, block))
    (stream,) = opened
    assert stream.closed and stream.handler is None
