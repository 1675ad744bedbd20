"""The builtin server held to RFC 9113 (HTTP/2), RFC 7541 (HPACK) and gRPC over HTTP/2, one test
per rule, the section in each test's name.

Violations are sent as raw frames (tests/unit/h2peer.py); what the server sends back is parsed by
hyperframe, which refuses malformed frames. The valid exchanges at the end are driven by
python-hyper's h2 as a client, which checks every frame and header block the server sends
(flow control, HPACK table size, stream states, header fields).
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from extproc_host.wire import BIDI, UNARY, Context, H2Server, Limits, StatusCode

from .h2peer import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    Peer,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    connect,
    data,
    field_value,
    grpc_message,
    grpc_request,
    messages_of,
    ping,
    priority,
    raw,
    rst_stream,
    settings,
    window_update,
)

ECHO = "/test.Echo/Echo"
HOLD = "/test.Echo/Hold"  # reads nothing, never answers: the stream stays open
UNARY_PATH = "/test.Echo/Digest"
WINDOW = 65535
MESSAGE = BytesValue(value=b"hello").SerializeToString()


class Handlers:
    def __init__(self) -> None:
        self.cancelled = 0
        self.started = 0

    async def echo(self, requests: AsyncIterator[BytesValue], context: Context) -> AsyncIterator[BytesValue]:
        async for request in requests:
            if request.value.startswith(b"abort:"):
                await context.abort(StatusCode.PERMISSION_DENIED, request.value[6:].decode() * 1000)
            yield request

    async def hold(self, requests: AsyncIterator[BytesValue], context: Context) -> AsyncIterator[BytesValue]:
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield BytesValue()

    async def digest(self, request: BytesValue, context: Context) -> BytesValue:
        return BytesValue(value=hashlib.sha256(request.value).digest())


async def start(limits: Limits | None = None, window: int = WINDOW) -> tuple[H2Server, Handlers, int]:
    handlers = Handlers()
    server = H2Server(max_message_bytes=1 << 20, window_bytes=window, limits=limits)
    server.add_method(ECHO, BIDI, handlers.echo, BytesValue)
    server.add_method(HOLD, BIDI, handlers.hold, BytesValue)
    server.add_method(UNARY_PATH, UNARY, handlers.digest, BytesValue)
    port = await server.listen("127.0.0.1", 0)
    return server, handlers, port


@pytest.fixture
async def served() -> AsyncIterator[tuple[H2Server, Handlers, int]]:
    server, handlers, port = await start()
    try:
        yield server, handlers, port
    finally:
        await server.stop()


@pytest.fixture
async def peer(served) -> AsyncIterator[Peer]:
    async with connect(served[2]) as p:
        await p.handshake()
        yield p


async def open_held_stream(peer: Peer, stream_id: int = 1, end_stream: bool = False) -> None:
    """A stream whose handler runs and never answers (open, or half-closed remote)."""
    peer.send(peer.headers(stream_id, grpc_request(HOLD), end_stream=end_stream))
    await peer.drain()
    await peer.alive()


async def finished_call(peer: Peer, stream_id: int = 1) -> None:
    """A call closed both ways: request and answer ended."""
    await peer.call(stream_id, ECHO, MESSAGE)
    await peer.response(stream_id)


# -- 3.4 the connection preface -----------------------------------------------------------------


async def test_rfc9113_3_4_an_invalid_preface_is_a_connection_error(served) -> None:
    async with connect(served[2]) as peer:
        peer.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + settings())
        await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_3_4_the_first_frame_must_be_settings(served) -> None:
    async with connect(served[2]) as peer:
        peer.send(PREFACE + ping())
        await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_3_4_the_server_sends_settings_first(served) -> None:
    async with connect(served[2]) as peer:
        peer.send(PREFACE + settings())
        first = await peer.next_frame()
        assert isinstance(first, SettingsFrame) and "ACK" not in first.flags
        assert first.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == Limits().max_concurrent_streams
        assert first.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == Limits().max_header_list_size


# -- 4 frames -----------------------------------------------------------------------------------


async def test_rfc9113_4_1_unknown_frame_types_are_ignored(peer: Peer) -> None:
    peer.send(raw(0xEE, 0xFF, 0, b"whatever"), raw(0xEE, 0, 3, b"x"))
    await peer.alive()


async def test_rfc9113_4_1_undefined_flags_are_ignored(peer: Peer) -> None:
    peer.send(raw(PING, 0xFE, 0, b"12345678"))
    await peer.until(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags)
    await peer.alive()


async def test_rfc9113_4_2_a_frame_over_max_frame_size_is_a_connection_error(peer: Peer) -> None:
    size = peer.server_settings[SettingsFrame.MAX_FRAME_SIZE] + 1
    peer.send(peer.headers(1, grpc_request(ECHO)), raw(DATA, 0, 1, b"\0" * size))
    await peer.connection_error("FRAME_SIZE_ERROR")


async def test_rfc9113_4_3_a_header_block_that_cannot_be_decoded_is_a_compression_error(peer: Peer) -> None:
    peer.send(raw(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"))  # an index past any table
    await peer.connection_error("COMPRESSION_ERROR")


# -- 5.1 stream states --------------------------------------------------------------------------


async def test_rfc9113_5_1_data_on_an_idle_stream_is_a_connection_error(peer: Peer) -> None:
    peer.send(data(1, grpc_message(MESSAGE)))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_5_1_rst_stream_on_an_idle_stream_is_a_connection_error(peer: Peer) -> None:
    peer.send(rst_stream(1))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_5_1_window_update_on_an_idle_stream_is_a_connection_error(peer: Peer) -> None:
    peer.send(window_update(1, 100))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_5_1_priority_on_an_idle_stream_is_allowed(peer: Peer) -> None:
    peer.send(priority(9, 0))
    await peer.alive()
    await finished_call(peer, 9)


async def test_rfc9113_5_1_data_on_a_half_closed_remote_stream_is_stream_closed(peer: Peer) -> None:
    await open_held_stream(peer, end_stream=True)
    peer.send(data(1, grpc_message(MESSAGE)))
    await peer.stream_error(1, "STREAM_CLOSED")


async def test_rfc9113_5_1_headers_on_a_half_closed_remote_stream_is_stream_closed(peer: Peer) -> None:
    await open_held_stream(peer, end_stream=True)
    peer.send(peer.headers(1, [("x-trailer", "1")], end_stream=True))
    await peer.stream_error(1, "STREAM_CLOSED")


async def test_rfc9113_5_1_window_update_priority_rst_on_a_half_closed_remote_stream_are_allowed(
    served, peer: Peer
) -> None:
    await open_held_stream(peer, end_stream=True)
    peer.send(window_update(1, 10), priority(1, 0))
    await peer.alive()
    peer.send(rst_stream(1))
    await peer.alive()
    await asyncio.sleep(0.05)
    assert served[1].cancelled == 1


async def test_rfc9113_5_1_data_on_a_stream_closed_both_ways_is_a_connection_error(peer: Peer) -> None:
    await finished_call(peer)
    peer.send(data(1, grpc_message(MESSAGE)))
    await peer.connection_error("STREAM_CLOSED")


async def test_rfc9113_5_1_headers_on_a_stream_closed_both_ways_is_a_connection_error(peer: Peer) -> None:
    await finished_call(peer)
    peer.send(peer.headers(1, grpc_request(ECHO), end_stream=True))
    await peer.connection_error("STREAM_CLOSED")


async def test_rfc9113_5_1_frames_after_the_peers_rst_stream_are_stream_closed(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(rst_stream(1))
    await peer.alive()
    peer.send(data(1, grpc_message(MESSAGE)))
    await peer.stream_error(1, "STREAM_CLOSED")


async def test_rfc9113_5_1_frames_in_flight_after_the_servers_rst_stream_are_ignored(peer: Peer) -> None:
    await peer.call(1, ECHO, BytesValue(value=b"abort:x").SerializeToString(), end=False)
    await peer.until(lambda f: f.stream_id == 1 and "END_STREAM" in f.flags)
    await peer.until(lambda f: f.stream_id == 1 and isinstance(f, RstStreamFrame))  # NO_ERROR: stop sending
    peer.send(data(1, grpc_message(MESSAGE)), window_update(1, 5), data(1, b"", end_stream=True))
    await peer.alive()


async def test_rfc9113_5_1_1_an_even_stream_id_is_a_connection_error(peer: Peer) -> None:
    peer.send(peer.headers(2, grpc_request(ECHO), end_stream=True))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_5_1_1_a_lower_stream_id_than_a_previous_one_is_a_connection_error(peer: Peer) -> None:
    await finished_call(peer, 5)
    peer.send(peer.headers(3, grpc_request(ECHO), end_stream=True))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_5_1_2_streams_past_the_advertised_limit_are_refused() -> None:
    server, handlers, port = await start(Limits(max_concurrent_streams=2))
    try:
        async with connect(port) as peer:
            await peer.handshake()
            assert peer.server_settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 2
            await open_held_stream(peer, 1)
            await open_held_stream(peer, 3)
            peer.send(peer.headers(5, grpc_request(HOLD)))
            await peer.stream_error(5, "REFUSED_STREAM")
            peer.send(rst_stream(1))
            await peer.alive()
            await open_held_stream(peer, 7)  # a slot is free again
            assert handlers.started == 3
    finally:
        await server.stop()


# -- 5.3 priority --------------------------------------------------------------------------------


async def test_rfc9113_5_3_1_headers_depending_on_itself_is_a_stream_error(peer: Peer) -> None:
    prefix = struct.pack(">LB", 1, 15)
    peer.send(peer.headers(1, grpc_request(ECHO), end_stream=True, flags=PRIORITY_FLAG, prefix=prefix))
    await peer.stream_error(1, "PROTOCOL_ERROR")


async def test_rfc9113_5_3_1_priority_depending_on_itself_is_an_error(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(priority(1, 1))
    await peer.stream_error(1, "PROTOCOL_ERROR")


# -- 5.5 extensions ------------------------------------------------------------------------------


async def test_rfc9113_5_5_an_unknown_frame_inside_a_header_block_is_a_connection_error(peer: Peer) -> None:
    block = peer.block(grpc_request(ECHO))
    peer.send(raw(HEADERS, 0, 1, block[:4]), raw(0xEE, 0, 0, b""), raw(CONTINUATION, END_HEADERS, 1, block[4:]))
    await peer.connection_error("PROTOCOL_ERROR")


# -- 6.1 DATA ----------------------------------------------------------------------------------


async def test_rfc9113_6_1_data_on_stream_0_is_a_connection_error(peer: Peer) -> None:
    peer.send(data(0, b"x"))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_1_padding_longer_than_the_payload_is_a_connection_error(peer: Peer) -> None:
    """Read as data, such a frame once produced a valid answer (a negative slice)."""
    message = grpc_message(MESSAGE)
    peer.send(peer.headers(1, grpc_request(ECHO)))
    peer.send(raw(DATA, PADDED, 1, bytes([len(message) + 1]) + message))
    await peer.connection_error("PROTOCOL_ERROR")
    assert not peer.received.of(DataFrame, 1), "an answer came from a frame of padding"


async def test_rfc9113_6_1_padded_data_is_read_without_its_padding(peer: Peer) -> None:
    peer.send(peer.headers(1, grpc_request(ECHO)), data(1, grpc_message(MESSAGE), end_stream=True, pad=40))
    _, body, trailers = await peer.response(1)
    assert messages_of(body) == [MESSAGE] and field_value(trailers, b"grpc-status") == b"0"


# -- 6.2 HEADERS ---------------------------------------------------------------------------------


async def test_rfc9113_6_2_headers_on_stream_0_is_a_connection_error(peer: Peer) -> None:
    peer.send(peer.headers(0, grpc_request(ECHO), end_stream=True))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_2_headers_padding_longer_than_the_payload_is_a_connection_error(peer: Peer) -> None:
    block = peer.block(grpc_request(ECHO))
    peer.send(raw(HEADERS, END_HEADERS | PADDED, 1, bytes([len(block) + 1]) + block))
    await peer.connection_error("PROTOCOL_ERROR")


# -- 6.3 PRIORITY ----------------------------------------------------------------------------


async def test_rfc9113_6_3_priority_on_stream_0_is_a_connection_error(peer: Peer) -> None:
    peer.send(priority(0, 1))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_3_priority_of_the_wrong_length_is_a_stream_error(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(raw(PRIORITY, 0, 1, b"\0\0\0\0"))
    await peer.stream_error(1, "FRAME_SIZE_ERROR")


# -- 6.4 RST_STREAM ------------------------------------------------------------------------------


async def test_rfc9113_6_4_rst_stream_on_stream_0_is_a_connection_error(peer: Peer) -> None:
    peer.send(rst_stream(0))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_4_rst_stream_of_the_wrong_length_is_a_connection_error(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(raw(RST_STREAM, 0, 1, b"\0\0\0\0\0"))
    await peer.connection_error("FRAME_SIZE_ERROR")


async def test_rfc9113_6_4_rst_stream_cancels_the_handler(served, peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(rst_stream(1, 8))
    await peer.alive()
    await asyncio.sleep(0.05)
    assert served[1].cancelled == 1 and not served[0].calls


# -- 6.5 SETTINGS --------------------------------------------------------------------------------


async def test_rfc9113_6_5_settings_ack_with_a_payload_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(SETTINGS, 1, 0, b"\0\x04\0\0\0\0"))
    await peer.connection_error("FRAME_SIZE_ERROR")


async def test_rfc9113_6_5_settings_on_a_stream_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(SETTINGS, 0, 1, b""))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_5_settings_not_a_multiple_of_6_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(SETTINGS, 0, 0, b"\0\x04\0\0\0"))
    await peer.connection_error("FRAME_SIZE_ERROR")


async def test_rfc9113_6_5_settings_are_acknowledged_and_unknown_ones_ignored(peer: Peer) -> None:
    peer.send(settings((0x99, 7), (SettingsFrame.ENABLE_PUSH, 0)))
    assert await peer.until(lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags)
    await peer.alive()


@pytest.mark.parametrize(
    ("setting", "value", "code"),
    [
        (SettingsFrame.ENABLE_PUSH, 2, "PROTOCOL_ERROR"),
        (SettingsFrame.INITIAL_WINDOW_SIZE, 1 << 31, "FLOW_CONTROL_ERROR"),
        (SettingsFrame.MAX_FRAME_SIZE, 16383, "PROTOCOL_ERROR"),
        (SettingsFrame.MAX_FRAME_SIZE, 1 << 24, "PROTOCOL_ERROR"),
        (SettingsFrame.ENABLE_CONNECT_PROTOCOL, 2, "PROTOCOL_ERROR"),
    ],
    ids=["enable-push-2", "initial-window-2^31", "max-frame-under-2^14", "max-frame-2^24", "connect-protocol-2"],
)
async def test_rfc9113_6_5_2_a_setting_out_of_range_is_a_connection_error(
    peer: Peer, setting: int, value: int, code: str
) -> None:
    peer.send(settings((setting, value)))
    await peer.connection_error(code)


async def test_rfc9113_6_5_3_only_the_last_initial_window_size_of_a_frame_counts(peer: Peer) -> None:
    peer.send(settings((SettingsFrame.INITIAL_WINDOW_SIZE, 0), (SettingsFrame.INITIAL_WINDOW_SIZE, 1 << 20)))
    await finished_call(peer)


# -- 6.7 PING ------------------------------------------------------------------------------------


async def test_rfc9113_6_7_ping_is_answered_with_its_payload(peer: Peer) -> None:
    peer.send(ping(b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    frame = await peer.until(lambda f: isinstance(f, PingFrame))
    assert "ACK" in frame.flags and frame.opaque_data == b"\x01\x02\x03\x04\x05\x06\x07\x08"


async def test_rfc9113_6_7_ping_on_a_stream_is_a_connection_error(peer: Peer) -> None:
    peer.send(ping(stream_id=1))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_7_ping_not_8_bytes_long_is_a_connection_error(peer: Peer) -> None:
    peer.send(ping(b"123456"))
    await peer.connection_error("FRAME_SIZE_ERROR")
    assert not peer.received.of(PingFrame), "a 6-byte PING was answered"


# -- 6.8 GOAWAY ----------------------------------------------------------------------------------


async def test_rfc9113_6_8_goaway_on_a_stream_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(GOAWAY, 0, 1, b"\0" * 8))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_8_goaway_too_short_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(GOAWAY, 0, 0, b"\0" * 7))
    await peer.connection_error("FRAME_SIZE_ERROR")


async def test_rfc9113_6_8_streams_open_at_the_peers_goaway_still_finish(peer: Peer) -> None:
    await peer.call(1, ECHO, MESSAGE, end=False)
    peer.send(raw(GOAWAY, 0, 0, struct.pack(">LL", 0, 0)), data(1, b"", end_stream=True))
    _, body, trailers = await peer.response(1)
    assert messages_of(body) == [MESSAGE] and field_value(trailers, b"grpc-status") == b"0"


# -- 6.9 WINDOW_UPDATE and flow control ------------------------------------------------------------


async def test_rfc9113_6_9_window_update_of_0_on_the_connection_is_a_connection_error(peer: Peer) -> None:
    peer.send(window_update(0, 0))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_9_window_update_of_0_on_a_stream_is_a_stream_error(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(window_update(1, 0))
    await peer.stream_error(1, "PROTOCOL_ERROR")


async def test_rfc9113_6_9_window_update_of_the_wrong_length_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(WINDOW_UPDATE, 0, 0, b"\0\0\x01"))
    await peer.connection_error("FRAME_SIZE_ERROR")


async def test_rfc9113_6_9_1_a_connection_window_above_2_31_is_a_connection_error(peer: Peer) -> None:
    peer.send(window_update(0, (1 << 31) - 1))
    await peer.connection_error("FLOW_CONTROL_ERROR")


async def test_rfc9113_6_9_1_a_stream_window_above_2_31_is_a_stream_error(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(window_update(1, (1 << 31) - 1))
    await peer.stream_error(1, "FLOW_CONTROL_ERROR")


async def test_rfc9113_6_9_1_data_past_the_stream_window_is_a_stream_error(served, peer: Peer) -> None:
    """The handler does not read: the peer may send one window and no more."""
    await open_held_stream(peer)
    peer.send(data(1, b"\0" * 16384) * 4 + data(1, b"\0" * 16384))  # 80 KiB against 64 KiB
    await peer.stream_error(1, "FLOW_CONTROL_ERROR")
    assert served[0].budget.held == 0


async def test_rfc9113_6_9_2_an_initial_window_change_past_2_31_is_a_connection_error(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(window_update(1, (1 << 31) - 1 - 65535))
    await peer.alive()
    peer.send(settings((SettingsFrame.INITIAL_WINDOW_SIZE, 65536)))
    await peer.connection_error("FLOW_CONTROL_ERROR")


async def test_rfc9113_6_9_2_answers_wait_for_window_and_go_on_when_it_opens(peer: Peer) -> None:
    peer.send(settings((SettingsFrame.INITIAL_WINDOW_SIZE, 0)))
    await peer.call(1, ECHO, MESSAGE)
    await asyncio.sleep(0.05)
    await peer.alive()
    assert not peer.received.of(DataFrame, 1), "DATA sent with no window"
    peer.send(window_update(1, 3))
    first = await peer.until(lambda f: isinstance(f, DataFrame))
    assert len(first.data) == 3
    peer.send(window_update(1, 1 << 20))
    _, body, trailers = await peer.response(1)
    assert messages_of(first.data + body) == [MESSAGE] and field_value(trailers, b"grpc-status") == b"0"


# -- 6.10 CONTINUATION ---------------------------------------------------------------------------


async def test_rfc9113_6_10_continuation_without_headers_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(CONTINUATION, END_HEADERS, 1, peer.block(grpc_request(ECHO))))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_10_continuation_on_another_stream_is_a_connection_error(peer: Peer) -> None:
    block = peer.block(grpc_request(ECHO))
    peer.send(raw(HEADERS, 0, 1, block[:3]), raw(CONTINUATION, END_HEADERS, 3, block[3:]))
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_10_another_frame_inside_a_header_block_is_a_connection_error(peer: Peer) -> None:
    block = peer.block(grpc_request(ECHO))
    peer.send(raw(HEADERS, 0, 1, block[:3]), ping())
    await peer.connection_error("PROTOCOL_ERROR")


async def test_rfc9113_6_10_a_header_block_split_over_continuations_is_read_whole(peer: Peer) -> None:
    block = peer.block(grpc_request(ECHO))
    peer.send(
        raw(HEADERS, 0, 1, block[:2]), raw(CONTINUATION, 0, 1, block[2:5]), raw(CONTINUATION, END_HEADERS, 1, block[5:])
    )
    peer.send(data(1, grpc_message(MESSAGE), end_stream=True))
    _, body, _ = await peer.response(1)
    assert messages_of(body) == [MESSAGE]


async def test_rfc9113_6_6_push_promise_from_a_client_is_a_connection_error(peer: Peer) -> None:
    peer.send(raw(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\x02" + peer.block(grpc_request(ECHO))))
    await peer.connection_error("PROTOCOL_ERROR")


# -- 8 HTTP semantics ------------------------------------------------------------------------------


async def test_rfc9113_8_1_a_second_headers_without_end_stream_is_a_stream_error(peer: Peer) -> None:
    await open_held_stream(peer)
    peer.send(peer.headers(1, [("x-more", "1")]))
    await peer.stream_error(1, "PROTOCOL_ERROR")


async def test_rfc9113_8_1_an_answer_before_the_request_ended_resets_with_no_error(peer: Peer) -> None:
    await peer.call(1, ECHO, BytesValue(value=b"abort:no").SerializeToString(), end=False)
    frame = await peer.until(lambda f: isinstance(f, RstStreamFrame))
    assert frame.error_code == 0
    assert [f for f in peer.received.of(HeadersFrame, 1) if "END_STREAM" in f.flags]


@pytest.mark.parametrize("declared", [1, 100])
async def test_rfc9113_8_1_1_data_that_differs_from_content_length_is_a_stream_error(peer: Peer, declared: int) -> None:
    message = grpc_message(MESSAGE)
    peer.send(peer.headers(1, [*grpc_request(ECHO), ("content-length", str(declared))]))
    peer.send(data(1, message, end_stream=True))
    await peer.stream_error(1, "PROTOCOL_ERROR")


MALFORMED = {
    "uppercase-name": [*grpc_request(ECHO), ("X-Upper", "1")],
    "space-in-name": [*grpc_request(ECHO), ("x upper", "1")],
    "colon-in-name": [*grpc_request(ECHO), ("x:y", "1")],
    "empty-name": [*grpc_request(ECHO), ("", "1")],
    "cr-in-value": [*grpc_request(ECHO), ("x-a", "a\rb")],
    "lf-in-value": [*grpc_request(ECHO), ("x-a", "a\nb")],
    "nul-in-value": [*grpc_request(ECHO), ("x-a", "a\0b")],
    "leading-space-in-value": [*grpc_request(ECHO), ("x-a", " a")],
    "trailing-tab-in-value": [*grpc_request(ECHO), ("x-a", "a\t")],
    "unknown-pseudo-header": [*grpc_request(ECHO)[:4], (":foo", "bar"), *grpc_request(ECHO)[4:]],
    "response-pseudo-header": [(":status", "200"), *grpc_request(ECHO)],
    "pseudo-header-after-regular": [*grpc_request(ECHO), (":authority", "late")],
    "duplicated-path": [(":path", ECHO), *grpc_request(ECHO)],
    "duplicated-method": [(":method", "POST"), *grpc_request(ECHO)],
    "duplicated-scheme": [(":scheme", "http"), *grpc_request(ECHO)],
    "no-method": [f for f in grpc_request(ECHO) if f[0] != ":method"],
    "no-scheme": [f for f in grpc_request(ECHO) if f[0] != ":scheme"],
    "no-path": [f for f in grpc_request(ECHO) if f[0] != ":path"],
    "empty-path": [(n, "" if n == ":path" else v) for n, v in grpc_request(ECHO)],
    "connection-header": [*grpc_request(ECHO), ("connection", "keep-alive")],
    "keep-alive-header": [*grpc_request(ECHO), ("keep-alive", "5")],
    "transfer-encoding-header": [*grpc_request(ECHO), ("transfer-encoding", "chunked")],
    "upgrade-header": [*grpc_request(ECHO), ("upgrade", "h2c")],
    "te-not-trailers": [(n, "gzip" if n == "te" else v) for n, v in grpc_request(ECHO)],
    "host-differs-from-authority": [*grpc_request(ECHO), ("host", "elsewhere")],
    "bad-content-length": [*grpc_request(ECHO), ("content-length", "1x")],
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
async def test_rfc9113_8_2_and_8_3_malformed_requests_are_stream_errors(served, peer: Peer, fields) -> None:
    peer.send(peer.headers(1, fields, end_stream=True))
    await peer.stream_error(1, "PROTOCOL_ERROR")
    assert not peer.received.of(HeadersFrame, 1), "a malformed request was answered"
    assert served[1].started == 0


@pytest.mark.parametrize(
    "trailers",
    [[(":path", "/x")], [("X-Upper", "1")], [("connection", "close")]],
    ids=["pseudo-header", "uppercase-name", "connection-header"],
)
async def test_rfc9113_8_1_malformed_trailers_are_stream_errors(peer: Peer, trailers) -> None:
    await open_held_stream(peer)
    peer.send(peer.headers(1, trailers, end_stream=True))
    await peer.stream_error(1, "PROTOCOL_ERROR")


async def test_rfc9113_8_1_request_trailers_are_taken(peer: Peer) -> None:
    peer.send(peer.headers(1, grpc_request(ECHO)), data(1, grpc_message(MESSAGE)))
    peer.send(peer.headers(1, [("x-checksum", "abc")], end_stream=True))
    _, body, trailers = await peer.response(1)
    assert messages_of(body) == [MESSAGE] and field_value(trailers, b"grpc-status") == b"0"


# -- RFC 7541 HPACK --------------------------------------------------------------------------------


async def test_rfc7541_4_2_a_table_size_update_over_the_servers_setting_is_a_compression_error(peer: Peer) -> None:
    block = b"\x3f\xe2\x1f" + peer.block(grpc_request(ECHO))  # a size update to 4097, over 4096
    peer.send(raw(HEADERS, END_HEADERS | 1, 1, block))
    await peer.connection_error("COMPRESSION_ERROR")


async def test_rfc7541_4_2_a_table_size_update_after_a_field_is_a_compression_error(peer: Peer) -> None:
    block = peer.block(grpc_request(ECHO)) + b"\x20"
    peer.send(raw(HEADERS, END_HEADERS | 1, 1, block))
    await peer.connection_error("COMPRESSION_ERROR")


async def test_rfc7541_4_2_the_first_answer_after_a_new_table_size_starts_with_an_update(peer: Peer) -> None:
    peer.send(settings((SettingsFrame.HEADER_TABLE_SIZE, 0)))
    await peer.call(1, ECHO, MESSAGE)
    frame = await peer.until(lambda f: isinstance(f, HeadersFrame))
    assert frame.data[:1] == b"\x20", "no dynamic table size update at the start of the block"
    peer.decoder.max_allowed_table_size = 0  # hpack's decoder checks the update came
    await peer.call(3, ECHO, MESSAGE)
    headers, _, trailers = await peer.response(3)
    assert field_value(headers, b":status") == b"200" and field_value(trailers, b"grpc-status") == b"0"


async def test_rfc7541_5_2_an_invalid_huffman_string_is_a_compression_error(peer: Peer) -> None:
    block = b"\x00\x81\xff\x01a"  # literal, huffman name of one byte 0xff: EOS padding longer than 7 bits
    peer.send(raw(HEADERS, END_HEADERS | 1, 1, block))
    await peer.connection_error("COMPRESSION_ERROR")


async def test_rfc7541_7_3_a_block_that_decodes_past_the_list_size_is_refused(peer: Peer) -> None:
    """An HPACK bomb: one large table entry, then a block that refers to it 100 times."""
    big = [("x-big", "v" * 3000)]
    peer.send(peer.headers(1, [*grpc_request(ECHO), *big], end_stream=True))
    await peer.response(1)
    bomb = peer.block(grpc_request(ECHO)) + bytes([0x80 | 62]) * 100  # the dynamic entry, 100 times
    assert len(bomb) < 200
    peer.send(raw(HEADERS, END_HEADERS | 1, 3, bomb))
    await peer.connection_error("ENHANCE_YOUR_CALM")


async def test_rfc9113_10_5_1_a_header_block_over_the_list_size_is_refused_before_decoding(peer: Peer) -> None:
    limit = peer.server_settings[SettingsFrame.MAX_HEADER_LIST_SIZE]
    peer.send(raw(HEADERS, 0, 1, b"\0" * (limit // 2)), raw(CONTINUATION, 0, 1, b"\0" * (limit // 2 + 1)))
    await peer.connection_error("ENHANCE_YOUR_CALM")


# -- gRPC over HTTP/2 ------------------------------------------------------------------------------


@pytest.mark.parametrize("end_stream", [True, False], ids=["whole-request", "request-still-open"])
async def test_grpc_a_request_that_is_not_grpc_gets_415_with_a_body(peer: Peer, end_stream: bool) -> None:
    fields = [(n, "text/plain" if n == "content-type" else v) for n, v in grpc_request(ECHO)]
    peer.send(peer.headers(1, fields, end_stream=end_stream))
    headers, body, _ = await peer.response(1)
    assert field_value(headers, b":status") == b"415" and body.startswith(b"This is a gRPC server")
    if not end_stream:  # the answer is whole before the request: the peer is told to stop
        reset = await peer.until(lambda f: isinstance(f, RstStreamFrame))
        assert reset.stream_id == 1 and reset.error_code == 0
    await peer.alive()


async def test_grpc_a_get_gets_405(peer: Peer) -> None:
    fields = [(n, "GET" if n == ":method" else v) for n, v in grpc_request(ECHO)]
    peer.send(peer.headers(1, fields, end_stream=True))
    headers, _, _ = await peer.response(1)
    assert field_value(headers, b":status") == b"405"


async def test_grpc_an_unknown_method_is_unimplemented(peer: Peer) -> None:
    await peer.call(1, "/test.Echo/Nope", MESSAGE)
    _, body, trailers = await peer.response(1)
    assert field_value(trailers, b"grpc-status") == b"12" and not body


async def test_grpc_the_grpc_timeout_is_the_calls_deadline(served, peer: Peer) -> None:
    await peer.call(1, HOLD, MESSAGE, end=False, grpc_timeout="50m")
    _, _, trailers = await peer.response(1)
    assert field_value(trailers, b"grpc-status") == b"4"  # DEADLINE_EXCEEDED
    await asyncio.sleep(0.05)
    assert served[1].cancelled == 1


async def test_grpc_a_malformed_grpc_timeout_is_internal(peer: Peer) -> None:
    await peer.call(1, ECHO, MESSAGE, grpc_timeout="soon")
    _, _, trailers = await peer.response(1)
    assert field_value(trailers, b"grpc-status") == b"13"


@pytest.mark.parametrize(("encoding", "status"), [(None, b"13"), ("gzip", b"12")], ids=["identity", "gzip"])
async def test_grpc_a_compressed_message_fails_its_call(peer: Peer, encoding: str | None, status: bytes) -> None:
    extra = {"grpc_encoding": encoding} if encoding else {}
    peer.send(peer.headers(1, grpc_request(ECHO, **extra)), data(1, grpc_message(MESSAGE, flag=1), end_stream=True))
    _, _, trailers = await peer.response(1)
    assert field_value(trailers, b"grpc-status") == status


async def test_grpc_end_stream_in_the_middle_of_a_message_is_internal(peer: Peer) -> None:
    message = grpc_message(MESSAGE)
    peer.send(peer.headers(1, grpc_request(ECHO)), data(1, message[:-2], end_stream=True))
    _, body, trailers = await peer.response(1)
    assert field_value(trailers, b"grpc-status") == b"13" and not body


async def test_grpc_a_message_over_the_limit_is_resource_exhausted(served, peer: Peer) -> None:
    peer.send(peer.headers(1, grpc_request(ECHO)), data(1, b"\0" + struct.pack(">L", (1 << 20) + 1)))
    _, _, trailers = await peer.response(1)
    assert field_value(trailers, b"grpc-status") == b"8"
    assert b"larger than max" in field_value(trailers, b"grpc-message")
    assert served[0].budget.held == 0


async def test_grpc_a_long_status_message_is_cut_to_fit(peer: Peer) -> None:
    await peer.call(1, ECHO, BytesValue(value=b"abort:" + "é".encode() * 20).SerializeToString())
    _, _, trailers = await peer.response(1)
    message = field_value(trailers, b"grpc-message")
    assert 3000 < len(message) <= 4096 and message.endswith(b"%E2%80%A6")
    assert b"%C3%A9" in message and not message[:-9].endswith((b"%", b"%C"))


async def test_grpc_graceful_shutdown_is_two_goaways_with_a_ping_between(served, peer: Peer) -> None:
    server = served[0]
    await open_held_stream(peer, 1)
    server.shutdown()
    first = await peer.until(lambda f: isinstance(f, GoAwayFrame))
    assert first.last_stream_id == (1 << 31) - 1 and first.error_code == 0
    probe = await peer.until(lambda f: isinstance(f, PingFrame))
    peer.send(peer.headers(3, grpc_request(ECHO)))  # in flight before the ACK: still taken
    peer.send(ping(probe.opaque_data, ack=True))
    second = await peer.until(lambda f: isinstance(f, GoAwayFrame))
    assert second.last_stream_id == 3 and second.error_code == 0
    peer.send(peer.headers(5, grpc_request(ECHO), end_stream=True))  # after it: ignored
    peer.send(data(3, grpc_message(MESSAGE), end_stream=True))
    _, body, _ = await peer.response(3)
    assert messages_of(body) == [MESSAGE]
    assert not peer.received.of(HeadersFrame, 5)
    peer.send(rst_stream(1))
    assert await peer.until(lambda f: False) is None, "the connection did not close once its streams ended"


# -- valid exchanges checked by h2 as a client -------------------------------------------------------


class StrictClient:
    """python-hyper's h2 as the client: every frame and header block of the server is checked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: dict[int, int]) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values=local)
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []

    async def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()

    async def read(self) -> None:
        chunk = await asyncio.wait_for(self.reader.read(65536), 5)
        assert chunk, "the server closed the connection"
        for event in self.h2.receive_data(chunk):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        await self.flush()

    async def exchange(self, stream_id: int, path: str, bodies: list[bytes]) -> tuple[bytes, dict[bytes, bytes]]:
        self.h2.send_headers(stream_id, grpc_request(path))
        for i, body in enumerate(bodies):
            payload = grpc_message(BytesValue(value=body).SerializeToString())
            sent = 0
            while sent < len(payload):
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                if window <= 0:
                    await self.flush()
                    await self.read()
                    continue
                self.h2.send_data(stream_id, payload[sent : sent + window])
                sent += window
            await self.flush()
            del i
        self.h2.end_stream(stream_id)
        await self.flush()
        received = b""
        while True:
            for event in self.events:
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    received += event.data
                if isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream_id:
                    self.events = []
                    return received, dict(event.headers)
            self.events = []
            await self.read()


LARGE = [b"a" * 10, b"b" * 200_000, b"", bytes(range(256)) * 400]


@pytest.mark.parametrize(
    ("local", "bodies"),
    [
        ({}, LARGE),
        ({"header_table_size": 0}, LARGE),
        ({"initial_window_size": 1}, [b"a" * 10, b"", b"b" * 300]),
        ({"max_frame_size": 16384, "initial_window_size": 70000}, LARGE),
    ],
    ids=["defaults", "header-table-0", "window-1", "small-frames"],
)
async def test_h2_client_sees_only_valid_frames_in_a_bidi_exchange(served, local: dict[str, int], bodies) -> None:
    settings_names = {"header_table_size": 1, "initial_window_size": 4, "max_frame_size": 5}
    reader, writer = await asyncio.open_connection("127.0.0.1", served[2])
    client = StrictClient(reader, writer, {settings_names[k]: v for k, v in local.items()})
    await client.flush()
    try:
        for stream_id in (1, 3):
            received, trailers = await client.exchange(stream_id, ECHO, bodies)
            assert trailers[b"grpc-status"] == b"0"
            assert [BytesValue.FromString(m).value for m in messages_of(received)] == bodies
    finally:
        writer.close()
