"""One HTTP/2 server connection's state, with no I/O: bytes in through :meth:`Connection.receive`,
bytes out through ``Connection.out`` (the transport writes them), events up to the layer above
through the :class:`StreamHandler` each stream gets from the :class:`Application`.

What it enforces (RFC 9113): the preface and SETTINGS first (3.4); stream states and their
transitions, identifiers that only grow, the concurrency it advertises (5.1, 5.1.1, 5.1.2);
frame rules that depend on state, such as DATA or HEADERS on a closed stream, a WINDOW_UPDATE
or RST_STREAM on an idle one (6.1-6.10); header blocks whole and uninterrupted (4.3, 6.10);
flow control both ways (5.2, 6.9); content-length against the DATA received (8.1.1); graceful
shutdown as two GOAWAYs with a PING between (6.8). Frame layouts are ``frames.py``'s, header
fields ``fields.py``'s, and the flood counters and deadlines ``limits.py``'s.

How a stream is closed is remembered for the last ``CLOSED_MEMORY`` streams, because the RFC
asks different things of each: frames on a stream the server reset are ignored (they were
in flight), DATA or HEADERS after the peer's END_STREAM on a stream closed both ways is a
connection error, anything but PRIORITY after the peer's RST_STREAM a stream error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from .fields import TABLE_SIZE_ZERO, Decoder, Malformed, Request
from .frames import (
    ACK,
    CANCEL,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_HEADER,
    FRAME_NAMES,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ACK,
    SETTINGS_TIMEOUT,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    ConnectionFault,
    StreamFault,
    check_stream_id,
    error_name,
    frame_header,
    goaway_frame,
    header_frames,
    ping_frame,
    read_goaway,
    read_headers,
    read_ping,
    read_priority,
    read_rst_stream,
    read_settings,
    read_window_update,
    rst_stream_frame,
    settings_frame,
    unpad,
    window_update_frame,
)
from .limits import Bucket, Limits, LogLimiter

log = logging.getLogger("extproc_host.wire")
logged = LogLimiter(log)

#: Frames up to 256 KiB from the peer (fewer frames per body than 16 KiB).
OWN_MAX_FRAME = 1 << 18
#: The connection's receive window: 1 GiB (each stream's own window is what bounds memory);
#: given back once half of it is used.
CONNECTION_WINDOW = 1 << 30
HALF_CONNECTION_WINDOW = CONNECTION_WINDOW // 2  # given back whole once this much was received
#: DATA frames shorter than this that complete no message count as empty (limits.py).
TINY_DATA = 1024
#: How many closed streams' endings are remembered (see the module's docstring).
CLOSED_MEMORY = 1024
#: How long the first GOAWAY of a graceful shutdown waits for its PING's ACK before the second.
SHUTDOWN_PING_WAIT = 2.0
SHUTDOWN_PING = b"shutdown"
LAST_POSSIBLE_STREAM = (1 << 31) - 1

# How a stream was closed.
RESET_SENT, PEER_RESET, ENDED = 1, 2, 3


class StreamHandler(Protocol):
    """What the layer above attaches to a stream: the events of the stream's receive side."""

    def data(self, payload: memoryview) -> bool:
        """DATA's content (padding removed): True when it moved the request forward (completed
        a message), False for a fragment that completed nothing."""

    def trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The request's trailers (checked); ``remote_end`` follows."""

    def remote_end(self) -> None:
        """The peer ended its side of the stream (END_STREAM)."""

    def reset(self, code: int) -> None:
        """The stream ended from outside: the peer's RST_STREAM, a stream error, the connection
        closed or lost. Nothing more may be sent on it."""

    def window_opened(self) -> None:
        """Flow control or the socket let more bytes go: a send that waited may go on."""


class Application(Protocol):
    """The layer above: it gets every new stream."""

    def stream_opened(self, conn: Connection, stream: Stream, request: Request) -> StreamHandler:
        """A new stream with a valid request: its handler."""


class Stream:
    """One stream's HTTP/2 state: windows, whether each side ended, the handler on it."""

    __slots__ = (
        "answered",
        "closed",
        "content_length",
        "handler",
        "id",
        "received",
        "recv_unacked",
        "remote_closed",
        "send_window",
        "window",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.handler: StreamHandler | None = None
        self.send_window = send_window
        self.window = recv_window  # the receive window the host keeps giving back (grows: credit)
        self.recv_unacked = 0  # received and not yet given back: the peer may send window - this
        self.remote_closed = False
        self.closed = False
        self.answered = False  # the server sent HEADERS on it
        self.content_length: int | None = None
        self.received = 0  # DATA bytes, for content-length


class Connection:
    """An HTTP/2 server connection's state machine (see the module's docstring)."""

    def __init__(self, app: Application, limits: Limits, *, peer: str = "") -> None:
        self.app = app
        self.limits = limits
        self.peer = peer
        self.out: list[bytes | memoryview] = []
        self.wants_flush: Callable[[], None] = nothing  # the transport: write ``out`` soon
        self.flush_now: Callable[[], None] = nothing  # the transport: write ``out`` now
        self.wants_close: Callable[[], None] = nothing  # the transport: close once written
        self.decoder = Decoder(limits.max_header_list_size)
        self.streams: dict[int, Stream] = {}
        self.closed_streams: dict[int, int] = {}  # stream id: how it closed (the last CLOSED_MEMORY)
        self.forgotten_below = 0  # closed streams up to this id may have been forgotten
        self.last_stream = 0
        # Reading.
        self.preface_done = False
        self.settings_received = False
        self.settings_acked = False  # the peer acknowledged the server's SETTINGS
        self.pending: list[bytes] = []  # the start of a frame, in the pieces reads brought
        self.pending_size = 0
        self.needed = 0
        self.block: bytearray | None = None  # a header block waiting for CONTINUATION
        self.block_stream = 0
        self.block_end_stream = False
        self.block_self_dependent = False
        self.recv_window = CONNECTION_WINDOW
        # A new stream's receive window: HTTP/2's default until the peer acknowledges the
        # server's SETTINGS (it may send before it has read them), the server's own after.
        self.recv_initial = DEFAULT_WINDOW
        # Writing.
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.peer_max_header_list: int | None = None
        self.send_window = DEFAULT_WINDOW
        self.table_update = False  # the next header block starts with TABLE_SIZE_ZERO
        self.paused = False  # the socket does not take more (the transport says)
        self.blocked: dict[int, Stream] = {}  # streams waiting for a window
        # Life.
        self.closed = False
        self.goaway_stage = 0  # 1: first GOAWAY of a graceful shutdown sent, 2: the last one
        self.goaway_last = LAST_POSSIBLE_STREAM
        now = time.monotonic()
        self.started = now
        self.idle_since: float | None = now
        self.partial_since: float | None = None
        self.blocked_since: float | None = None
        self.shutdown_at = 0.0
        self.control = Bucket(limits.flood_burst, limits.flood_rate)
        self.resets = Bucket(limits.flood_burst, limits.flood_rate)
        self.empty = Bucket(limits.flood_burst, limits.flood_rate)

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data`` for the socket; the transport writes everything queued in one pass."""
        out = self.out
        out.append(data)
        if len(out) == 1:
            self.wants_flush()

    def initiate(self) -> None:
        """The server's connection preface: SETTINGS, and the connection window opened."""
        limits = self.limits
        self.write(
            settings_frame(
                [
                    (MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
                    (INITIAL_WINDOW_SIZE, limits.initial_window),
                    (MAX_FRAME_SIZE, OWN_MAX_FRAME),
                    (MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
                ]
            )
        )
        self.write(window_update_frame(0, CONNECTION_WINDOW - DEFAULT_WINDOW))

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool = False) -> None:
        """A header block on ``stream`` (split into CONTINUATIONs past the peer's frame size);
        ``end_stream`` ends the server's side (and the stream: see :meth:`_local_end`)."""
        if stream.closed:
            return
        if self.table_update:
            block = TABLE_SIZE_ZERO + block
            self.table_update = False
        stream.answered = True
        if len(block) <= self.peer_max_frame:
            self.write(
                frame_header(HEADERS, END_HEADERS | END_STREAM if end_stream else END_HEADERS, stream.id, len(block))
            )
            self.write(block)
        else:
            for piece in header_frames(stream.id, block, end_stream, self.peer_max_frame):
                self.write(piece)
        if end_stream:
            self._local_end(stream)

    def data_frame(self, stream: Stream, size: int, end_stream: bool = False) -> None:
        """The header of a DATA frame of ``size`` bytes, taken from both send windows; the
        caller writes the ``size`` bytes of content right after (``window()`` said they fit),
        then, with ``end_stream``, calls :meth:`end_local`."""
        stream.send_window -= size
        self.send_window -= size
        self.write(frame_header(DATA, END_STREAM if end_stream else 0, stream.id, size))

    def end_local(self, stream: Stream) -> None:
        """The server's side of ``stream`` ended with the frame just written (END_STREAM)."""
        if not stream.closed:
            self._local_end(stream)

    def window(self, stream: Stream) -> int:
        """How many bytes of DATA may go on ``stream`` now, in one frame."""
        if self.paused or stream.closed:
            return 0
        return min(stream.send_window, self.send_window, self.peer_max_frame)

    def wait_for_window(self, stream: Stream) -> None:
        """``stream`` has bytes to send and no window: its handler's ``window_opened`` is called
        once there is some (or the socket drains)."""
        self.blocked[stream.id] = stream
        if self.blocked_since is None:
            self.blocked_since = time.monotonic()

    def reset_stream(self, stream: Stream, code: int) -> None:
        """End ``stream`` from the server's side with RST_STREAM ``code`` (its handler knows)."""
        if stream.closed:
            return
        self.write(rst_stream_frame(stream.id, code))
        self._forget(stream, RESET_SENT)

    def credit(self, stream: Stream, grow: int = 0) -> None:
        """Give the bytes received on ``stream`` back to the peer's window once they are worth a
        frame (a quarter of the window), and ``grow`` the window by that much more."""
        unacked = stream.recv_unacked
        if stream.remote_closed or stream.closed or not (grow or unacked >= stream.window >> 2):
            return
        increment = unacked + grow
        stream.recv_unacked = 0
        stream.window += grow
        self.write(window_update_frame(stream.id, increment))

    def close(self, code: int = NO_ERROR, message: str = "") -> None:
        """End the connection: GOAWAY ``code`` naming the last stream the server took, every
        open stream's handler reset, the socket closed once written."""
        if self.closed:
            return
        self.closed = True
        last = min(self.last_stream, self.goaway_last)
        self.write(goaway_frame(last, code, message.encode("utf-8", "replace")[:256]))
        self._reset_all(code)
        self.wants_close()

    def lost(self) -> None:
        """The socket is gone: every open stream's handler is reset."""
        self.closed = True
        self._reset_all(CANCEL)

    def shutdown(self) -> None:
        """Graceful shutdown, first step: GOAWAY with the highest stream id (streams already on
        their way are still taken) and a PING; its ACK (or ``SHUTDOWN_PING_WAIT``) brings the
        second GOAWAY, with the real last stream. The connection closes once its streams end."""
        if self.closed or self.goaway_stage:
            return
        self.goaway_stage = 1
        self.shutdown_at = time.monotonic()
        self.write(goaway_frame(LAST_POSSIBLE_STREAM, NO_ERROR))
        self.write(ping_frame(SHUTDOWN_PING))

    def check(self, now: float) -> None:
        """The deadlines (``limits.py``): called about once a second by the transport."""
        if self.closed:
            return
        limits = self.limits
        if not self.settings_received or not self.settings_acked:
            if now - self.started > limits.preface_timeout:
                if not self.settings_received:
                    self._give_up(
                        PROTOCOL_ERROR, f"no connection preface and SETTINGS within {limits.preface_timeout:g}s"
                    )
                else:  # section 6.5.3
                    self._give_up(SETTINGS_TIMEOUT, f"SETTINGS not acknowledged within {limits.preface_timeout:g}s")
                return
            if not self.settings_received:
                return
        if self.partial_since is not None and now - self.partial_since > limits.frame_timeout:
            self._give_up(ENHANCE_YOUR_CALM, f"a frame or header block incomplete for {limits.frame_timeout:g}s")
        elif (
            self.blocked_since is not None and limits.stall_timeout and now - self.blocked_since > limits.stall_timeout
        ):
            self._give_up(ENHANCE_YOUR_CALM, f"answers waited {limits.stall_timeout:g}s for the peer to take them")
        elif self.goaway_stage == 1 and now - self.shutdown_at > SHUTDOWN_PING_WAIT:
            self._final_goaway()
        elif (
            not self.streams
            and self.idle_since is not None
            and limits.idle_timeout
            and now - self.idle_since > limits.idle_timeout
        ):
            log.debug("HTTP/2 connection from %s idle for %gs: closing", self.peer, limits.idle_timeout)
            self.shutdown()

    def pause(self) -> None:
        """The socket's buffer is full: no DATA until :meth:`resume`."""
        self.paused = True
        if self.blocked_since is None:
            self.blocked_since = time.monotonic()

    def resume(self) -> None:
        """The socket takes bytes again."""
        self.paused = False
        self.blocked_since = None
        self._windows_opened()

    # -- reading ----------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes from the peer: every whole frame in them is acted on, the rest kept."""
        if self.pending:  # a frame the last reads cut: join the pieces once it is whole
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size < self.needed:
                return
            data = b"".join(self.pending)
            self.pending = []
            self.pending_size = 0
        if self.closed:
            return
        try:
            if not self.preface_done:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise ConnectionFault(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    self._keep(data, len(PREFACE))
                    return
                if not data.startswith(PREFACE):
                    raise ConnectionFault(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self.preface_done = True
                data = data[len(PREFACE) :]
            pos = 0
            end = len(data)
            needed = 9
            view = memoryview(data)  # over immutable bytes: frames are sliced without copies
            dispatch = self._frame
            while end - pos >= 9:
                hi, lo, kind, flags, stream_id = FRAME_HEADER.unpack_from(data, pos)
                length = hi << 8 | lo
                if length > OWN_MAX_FRAME:
                    raise ConnectionFault(FRAME_SIZE_ERROR, f"{_name(kind)} frame of {length} bytes")
                if end - pos < 9 + length:
                    needed = 9 + length
                    break
                start = pos + 9
                pos = start + length
                try:
                    dispatch(kind, flags, stream_id & 0x7FFFFFFF, view[start:pos])
                except StreamFault as fault:
                    self._stream_error(fault)
                if self.closed:
                    return
            if pos < end:
                self._keep(data[pos:], needed)
            elif self.block is None:
                self.partial_since = None
        except ConnectionFault as fault:
            self._give_up(fault.code, str(fault))

    def _keep(self, rest: bytes, needed: int) -> None:
        """Hold the start of a frame (or of the preface) until ``needed`` bytes are there."""
        self.pending = [rest]
        self.pending_size = len(rest)
        self.needed = needed
        if self.partial_since is None:
            self.partial_since = time.monotonic()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if self.block is not None and kind != CONTINUATION:
            raise ConnectionFault(PROTOCOL_ERROR, f"{_name(kind)} inside a header block (CONTINUATION expected)")
        if not self.settings_received:
            if kind != SETTINGS or flags & ACK:
                raise ConnectionFault(PROTOCOL_ERROR, f"{_name(kind)} before the peer's SETTINGS")
            self.settings_received = True
        check_stream_id(kind, stream_id)
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            fragment, self_dependent = read_headers(flags, stream_id, payload)
            if flags & END_HEADERS:
                self._header_block(stream_id, bytes(fragment), bool(flags & END_STREAM), self_dependent)
            else:
                self.decoder.check_size(len(fragment))
                self.block = bytearray(fragment)
                self.block_stream = stream_id
                self.block_end_stream = bool(flags & END_STREAM)
                self.block_self_dependent = self_dependent
                if self.partial_since is None:
                    self.partial_since = time.monotonic()
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, read_window_update(stream_id, payload))
        elif kind == RST_STREAM:
            self._rst_stream(stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, payload)
        elif kind == PING:
            opaque = read_ping(payload)
            if flags & ACK:
                if opaque == SHUTDOWN_PING and self.goaway_stage == 1:
                    self._final_goaway()
                return
            self._spend(self.control, "PING frames")
            self.write(ping_frame(opaque, ack=True))
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == PRIORITY:
            self._spend(self.control, "PRIORITY frames")
            read_priority(stream_id, payload)
        elif kind == GOAWAY:
            _, code, debug = read_goaway(payload)
            if code != NO_ERROR:
                log.debug("HTTP/2 peer %s sent GOAWAY %s: %r", self.peer, error_name(code), debug[:200])
        elif kind == PUSH_PROMISE:
            raise ConnectionFault(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:  # unknown frame types are ignored (section 5.5), and counted
            self._spend(self.control, "frames of unknown types")

    def _data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        size = len(payload)  # what flow control counts: padding included
        self.recv_window -= size
        if self.recv_window < 0:
            raise ConnectionFault(FLOW_CONTROL_ERROR, "the peer sent past the connection's flow-control window")
        if self.recv_window <= HALF_CONNECTION_WINDOW:
            self.write(window_update_frame(0, CONNECTION_WINDOW - self.recv_window))
            self.recv_window = CONNECTION_WINDOW
        stream = self.streams.get(stream_id)
        if stream is None:
            self._on_inactive_stream(DATA, stream_id)
            return
        if stream.remote_closed:
            raise StreamFault(stream_id, STREAM_CLOSED, "DATA after the peer's END_STREAM")
        if flags & PADDED:
            payload = unpad(payload, DATA)
        unacked = stream.recv_unacked + size
        stream.recv_unacked = unacked
        if unacked > stream.window:
            raise StreamFault(stream_id, FLOW_CONTROL_ERROR, "the peer sent past the stream's flow-control window")
        end = flags & END_STREAM
        if stream.content_length is not None:
            stream.received += len(payload)
            if stream.received > stream.content_length:
                raise StreamFault(stream_id, PROTOCOL_ERROR, "more DATA than its content-length")
        handler = stream.handler
        if payload:
            if handler is not None and not handler.data(payload) and len(payload) < TINY_DATA and not end:
                self._spend(self.empty, "tiny DATA frames")
        elif not end:
            self._spend(self.empty, "empty DATA frames")
        if end and not stream.closed:
            self._remote_end(stream)

    def _remote_end(self, stream: Stream) -> None:
        if stream.content_length is not None and stream.received != stream.content_length:
            raise StreamFault(stream.id, PROTOCOL_ERROR, "DATA shorter than its content-length")
        stream.remote_closed = True
        if stream.handler is not None:
            stream.handler.remote_end()

    def _continuation(self, flags: int, stream_id: int, payload: memoryview) -> None:
        block = self.block
        if block is None or stream_id != self.block_stream:
            raise ConnectionFault(PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        if not payload and not flags & END_HEADERS:
            self._spend(self.empty, "empty CONTINUATION frames")
        block += payload
        self.decoder.check_size(len(block))
        if flags & END_HEADERS:
            self.block = None
            self.partial_since = None
            self._header_block(stream_id, bytes(block), self.block_end_stream, self.block_self_dependent)

    def _header_block(self, stream_id: int, block: bytes, end_stream: bool, self_dependent: bool) -> None:
        fields = self.decoder.decode(block)  # always: the block updates the peer's table
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers
            if stream.remote_closed:
                raise StreamFault(stream_id, STREAM_CLOSED, "HEADERS after the peer's END_STREAM")
            if not end_stream:
                raise StreamFault(stream_id, PROTOCOL_ERROR, "a second HEADERS without END_STREAM")
            try:
                trailers = self.decoder.trailers(fields)
            except Malformed as exc:
                raise StreamFault(stream_id, PROTOCOL_ERROR, f"malformed trailers: {exc}") from None
            if stream.handler is not None:
                stream.handler.trailers(trailers)
            if not stream.closed:
                self._remote_end(stream)
            return
        if stream_id <= self.last_stream:
            self._on_inactive_stream(HEADERS, stream_id)
            return
        if not stream_id & 1:
            raise ConnectionFault(PROTOCOL_ERROR, f"stream {stream_id} opened by the client is even")
        self.last_stream = stream_id
        if stream_id > self.goaway_last:  # after the final GOAWAY: never taken (section 6.8)
            return
        if self_dependent:
            raise StreamFault(stream_id, PROTOCOL_ERROR, "HEADERS makes the stream depend on itself")
        limit = self.limits.max_concurrent_streams
        if not self.settings_acked:  # what the peer sent before it read the limit: twice the limit
            limit *= 2
        if len(self.streams) >= limit:
            self._spend(self.resets, "refused streams")
            self.write(rst_stream_frame(stream_id, REFUSED_STREAM))
            self._remember(stream_id, RESET_SENT)
            return
        try:
            request = self.decoder.request(fields)
        except Malformed as exc:
            raise StreamFault(stream_id, PROTOCOL_ERROR, f"malformed request: {exc}") from None
        stream = Stream(stream_id, self.peer_initial_window, self.recv_initial)
        stream.content_length = request.content_length
        stream.remote_closed = end_stream
        if end_stream and request.content_length:
            raise StreamFault(stream_id, PROTOCOL_ERROR, "END_STREAM with no DATA and a content-length")
        self.streams[stream_id] = stream
        self.idle_since = None
        handler = self.app.stream_opened(self, stream, request)
        if not stream.closed:  # ended at once (refused, or answered and done): nothing to hold
            stream.handler = handler

    def _on_inactive_stream(self, kind: int, stream_id: int) -> None:
        """DATA or HEADERS on a stream that is not open (section 5.1)."""
        if stream_id > self.last_stream:
            raise ConnectionFault(PROTOCOL_ERROR, f"{_name(kind)} on idle stream {stream_id}")
        how = self.closed_streams.get(stream_id)
        if how == RESET_SENT:
            return  # in flight when the server reset it: ignored
        if how == ENDED:
            raise ConnectionFault(STREAM_CLOSED, f"{_name(kind)} on stream {stream_id}, closed both ways")
        if how is None and kind == HEADERS and stream_id > self.forgotten_below:
            # Never opened: the peer went back to a lower stream id (section 5.1.1).
            raise ConnectionFault(PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} after stream {self.last_stream}")
        raise StreamFault(stream_id, STREAM_CLOSED, f"{_name(kind)} on closed stream {stream_id}")

    def _window_update(self, stream_id: int, increment: int) -> None:
        if not stream_id:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionFault(FLOW_CONTROL_ERROR, "the connection's send window above 2^31-1")
            self._windows_opened()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream:
                raise ConnectionFault(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # a closed stream: allowed for a while, ignored
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise StreamFault(stream_id, FLOW_CONTROL_ERROR, "the stream's send window above 2^31-1")
        if stream_id in self.blocked and not self.paused and self.send_window > 0:
            del self.blocked[stream_id]
            self.blocked_since = time.monotonic() if self.blocked else None
            if stream.handler is not None:
                stream.handler.window_opened()

    def _windows_opened(self) -> None:
        if self.paused or self.send_window <= 0 or not self.blocked:
            return
        blocked, self.blocked = self.blocked, {}
        self.blocked_since = None
        for stream in blocked.values():
            if stream.handler is not None and not stream.closed:
                stream.handler.window_opened()

    def _rst_stream(self, stream_id: int, payload: memoryview) -> None:
        code = read_rst_stream(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream:
                raise ConnectionFault(PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
            return  # already closed: ignored
        if not stream.answered:  # a reset before any answer: the rapid reset pattern when many
            self._spend(self.resets, "streams reset before their answer")
        handler = stream.handler
        self._forget(stream, PEER_RESET)
        if handler is not None:
            handler.reset(code)

    def _settings(self, flags: int, payload: memoryview) -> None:
        pairs = read_settings(flags, payload)
        if flags & ACK:  # the server's SETTINGS apply from now on (the server sends one only)
            self.settings_acked = True
            delta = self.limits.initial_window - self.recv_initial
            if delta:
                self.recv_initial = self.limits.initial_window
                for stream in self.streams.values():  # section 6.9.2: open windows move too
                    stream.window += delta
            return
        self._spend(self.control, "SETTINGS frames")
        initial: int | None = None
        for key, value in pairs:
            if key == INITIAL_WINDOW_SIZE:
                initial = value  # only the last one counts: the windows move once per frame
            elif key == MAX_FRAME_SIZE:
                self.peer_max_frame = value
            elif key == HEADER_TABLE_SIZE:
                self.table_update = True
            elif key == MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = value
        if initial is not None and initial != self.peer_initial_window:
            delta = initial - self.peer_initial_window
            self.peer_initial_window = initial
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise ConnectionFault(
                        FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE takes a window above 2^31-1"
                    )
        self.write(SETTINGS_ACK)
        if initial is not None:
            self._windows_opened()

    # -- endings ----------------------------------------------------------------------------

    def _local_end(self, stream: Stream) -> None:
        """The server ended its side: closed both ways, or the peer is told to stop sending
        with RST_STREAM NO_ERROR (section 8.1: a whole answer before the whole request)."""
        if stream.remote_closed:
            self._forget(stream, ENDED)
        else:
            self.write(rst_stream_frame(stream.id, NO_ERROR))
            self._forget(stream, RESET_SENT)

    def _forget(self, stream: Stream, how: int) -> None:
        stream.closed = True
        stream.handler = None  # the handler may keep its stream; the stream lets it go
        del self.streams[stream.id]
        self.blocked.pop(stream.id, None)
        self._remember(stream.id, how)
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.goaway_stage == 2:
                self.closed = True
                self.wants_close()

    def _remember(self, stream_id: int, how: int) -> None:
        closed = self.closed_streams
        closed[stream_id] = how
        if len(closed) > CLOSED_MEMORY:
            oldest = next(iter(closed))
            del closed[oldest]
            if oldest > self.forgotten_below:
                self.forgotten_below = oldest

    def _stream_error(self, fault: StreamFault) -> None:
        if fault.stream_id > self.last_stream:  # no RST_STREAM on an idle stream (section 6.4)
            raise ConnectionFault(fault.code, f"{fault} (stream {fault.stream_id}, idle)")
        logged.warning(
            "stream-error",
            "HTTP/2 stream %d from %s reset (%s): %s",
            fault.stream_id,
            self.peer,
            error_name(fault.code),
            fault,
        )
        stream = self.streams.get(fault.stream_id)
        self.write(rst_stream_frame(fault.stream_id, fault.code))
        if stream is None:
            self._remember(fault.stream_id, RESET_SENT)
        else:
            handler = stream.handler
            self._forget(stream, RESET_SENT)
            if handler is not None:
                handler.reset(fault.code)
        self._spend(self.resets, "streams reset for errors")

    def _final_goaway(self) -> None:
        self.goaway_stage = 2
        self.goaway_last = self.last_stream
        self.write(goaway_frame(self.last_stream, NO_ERROR))
        if not self.streams:
            self.closed = True
            self.wants_close()

    def _give_up(self, code: int, message: str) -> None:
        logged.warning(
            "connection-error", "HTTP/2 connection from %s closed (%s): %s", self.peer, error_name(code), message
        )
        self.close(code, message)

    def _reset_all(self, code: int) -> None:
        streams = list(self.streams.values())
        for stream in streams:
            handler = stream.handler
            self._forget(stream, RESET_SENT)
            if handler is not None:
                handler.reset(code)

    def _spend(self, bucket: Bucket, what: str) -> None:
        if not bucket.take():
            raise ConnectionFault(ENHANCE_YOUR_CALM, f"too many {what}")


def _name(kind: int) -> str:
    return FRAME_NAMES[kind] if kind < len(FRAME_NAMES) else f"frame type 0x{kind:x}"


def nothing() -> None:
    """What the connection calls while no transport is attached, or once it is gone."""
