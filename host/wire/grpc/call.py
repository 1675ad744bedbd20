"""One gRPC call on one HTTP/2 stream: its request messages in, its answers out (flow control
waited on as needed), its status at the end, its deadline (``grpc-timeout``).

Handlers see the part of ``grpc.aio`` they use: the request messages as an async iterator
(:class:`Requests`) and a :class:`Context` with ``abort()``, ``write()``, ``peer()``,
``invocation_metadata()`` and ``time_remaining()``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from ..budget import Budget
from ..http2.connection import Connection, Stream, logged
from ..http2.fields import Request
from ..http2.frames import CANCEL, REFUSED_STREAM
from .messages import PREFIX, MessageError, Messages
from .status import MAX_MESSAGE, RESPONSE_HEADERS, TRAILERS_OK, StatusCode, plain_response_headers, status_block

log = logging.getLogger("extproc_host.wire")

#: A large answer's frames go to the socket every this many bytes (the socket's backpressure, and
#: so the flow of the rest of the message, is checked in between): fewer writes than one per frame.
WRITE_BATCH = 256 * 1024
# gRPC over HTTP/2: Timeout → 1-8 digits and a unit.
_TIMEOUT = re.compile(rb"(\d{1,8})([HMSmun])")
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout``'s value in seconds; ValueError when it is not one."""
    found = _TIMEOUT.fullmatch(value)
    if found is None:
        raise ValueError(f"malformed grpc-timeout: {value[:32]!r}")
    return int(found[1]) * _UNITS[found[2]]


@dataclass(frozen=True)
class Method:
    """One RPC the server answers: its cardinality, handler and request message class."""

    kind: str
    handler: Callable[..., Any]
    request_type: Any


class Windows:
    """The receive windows of one connection's calls: each stream starts with the connection's
    first window and grows to ``target`` once its handler takes what arrived, if the budget has
    room and the connection's grown windows stay within an eighth of it. A grown window lets a
    whole message in without asking, and a message costs about three times its size while it is
    answered (the message, its parsed copy, the answer), counted only once there: the eighth
    keeps what grown windows can let in within half the budget. What a window grew by counts in
    the budget until the call ends.

    A message larger than its stream's window gets the window back as its bytes arrive, while
    the budget has room. Past it, one call of the connection at a time (the ``finisher``) goes
    on filling its message, so some message always completes and the connection never stalls
    on messages none can finish; the others wait (``stalled``) for room, in the order they
    stopped."""

    __slots__ = ("budget", "finisher", "granted", "loop", "stalled", "target")

    def __init__(self, budget: Budget, target: int, loop: asyncio.AbstractEventLoop) -> None:
        self.budget = budget
        self.target = target
        self.loop = loop
        self.granted = 0
        self.finisher: Call | None = None
        self.stalled: dict[Call, None] = {}

    def grant(self, stream: Stream) -> int:
        """How much ``stream``'s window grows now (0: it stays as it is)."""
        grow = self.target - stream.window
        if grow <= 0:
            return 0
        budget = self.budget
        if budget.limit and (budget.total + grow > budget.limit or self.granted + grow > budget.limit >> 3):
            budget.held_back += 1
            return 0
        budget.take(grow)
        self.granted += grow
        return grow

    def give_back(self, size: int) -> None:
        self.budget.give(size)
        self.granted -= size

    def may_fill(self, call: Call) -> bool:
        """Whether ``call``, in the middle of a message, gets its window back now; when not, it
        is credited once the budget has room (or its turn to finish comes)."""
        if not self.budget.over or self.finisher is call:
            return True
        if self.finisher is None:
            self.finisher = call
            return True
        if call not in self.stalled:
            self.stalled[call] = None
            self.budget.held_back += 1
            self.budget.wait(self, self._room)
        return False

    def filled(self, call: Call) -> None:
        """``call``'s message is complete, or the call ended: the next stalled call may finish
        its message."""
        self.stalled.pop(call, None)
        if self.finisher is call:
            self.finisher = None
            if self.stalled:
                self.loop.call_soon(self._next)
        if not self.stalled:
            self.budget.unwait(self)

    def _next(self) -> None:
        if self.finisher is None and self.stalled:
            call = next(iter(self.stalled))
            del self.stalled[call]
            call.credit()

    def _room(self) -> None:
        self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        stalled, self.stalled = self.stalled, {}
        for call in stalled:
            call.credit()


class AbortError(Exception):
    """Raised by :meth:`Context.abort`: the handler ends its call with ``code``."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Call:
    """A call: the :class:`~extproc_host.wire.http2.connection.StreamHandler` of its stream."""

    __slots__ = (
        "conn",
        "deadline",
        "done_callback",
        "ended",
        "grown",
        "loop",
        "messages",
        "method",
        "plain",
        "request",
        "stream",
        "task",
        "timer",
        "undecodable",
        "waiter",
        "window_waiter",
        "windows",
    )

    def __init__(
        self,
        conn: Connection,
        stream: Stream,
        request: Request,
        messages: Messages,
        windows: Windows,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.conn = conn
        self.windows = windows
        self.grown = 0  # what this call's window grew by (counted in the budget)
        self.stream = stream
        self.request = request
        self.messages = messages
        self.loop = loop
        self.method: Method | None = None
        self.plain: tuple[int, bytes] | None = None  # an HTTP status and body instead of a call
        self.waiter: asyncio.Future[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.ended = False  # the call's status went out, or the stream was reset
        self.undecodable = False  # a request message could not be parsed
        self.done_callback: Callable[[asyncio.Task[None]], None] | None = None

    def finished(self, task: asyncio.Task[None]) -> None:
        """The handler's task ended: nothing ties the call and the task any more (a cancelled
        task keeps its CancelledError, whose traceback holds the call's frames)."""
        self.task = None
        callback, self.done_callback = self.done_callback, None
        if callback is not None:
            callback(task)

    # -- the stream's events (StreamHandler) -------------------------------------------------

    def data(self, payload: memoryview) -> bool:
        if self.ended:
            return True
        messages = self.messages
        try:
            done = messages.feed(payload)
        except MessageError as exc:
            self.fail(exc.code, exc.details)
            return True
        if done:
            windows = self.windows
            if windows.finisher is self or self in windows.stalled:
                windows.filled(self)
            self.wake()
        elif not messages.inbox:
            self.credit()
        return bool(done)

    def trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        pass  # gRPC requests carry none; the stream's end follows

    def remote_end(self) -> None:
        if self.messages.cut and not self.ended:
            self.fail(StatusCode.INTERNAL, "the request ended in the middle of a message")
        self.wake()

    def reset(self, code: int) -> None:
        """The stream was reset (by the peer, for an error, or with its connection): the
        handler is cancelled."""
        if not self.ended:
            self.ended = True
            self._release()
        self.wake()
        self.window_opened()
        if self.task is not None:
            self.task.cancel()

    def window_opened(self) -> None:
        waiter = self.window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- receiving ---------------------------------------------------------------------------

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def credit(self) -> None:
        """Give the bytes the handler took back to the peer's window, and grow the window as
        :class:`Windows` allows. Giving back never waits on the budget: a window only holds what
        its reservation or its growth already counted; past the budget windows stop growing, so
        every stream goes on at its first window's pace. A message that spans more than the
        window gets it back past the budget only when :meth:`Windows.may_fill` says so."""
        stream = self.stream
        if stream.closed or stream.remote_closed or self.ended:
            return
        if self.messages.cut and not self.windows.may_fill(self):
            return
        grow = self.windows.grant(stream)
        self.grown += grow
        self.conn.credit(stream, grow)

    # -- sending -----------------------------------------------------------------------------

    async def send(self, message: bytes) -> None:
        """Send one message; waits only when flow control or the socket says so."""
        if self.ended:
            raise asyncio.CancelledError("stream reset")
        conn = self.conn
        stream = self.stream
        if not stream.answered:
            conn.send_headers(stream, RESPONSE_HEADERS)
        size = len(message) + 5
        if size <= conn.peer_max_frame and size <= stream.send_window and size <= conn.send_window and not conn.paused:
            conn.data_frame(stream, size)
            conn.write(PREFIX.pack(0, len(message)))
            conn.write(message)
            return
        await self._send_slowly(PREFIX.pack(0, len(message)), message)

    async def _send_slowly(self, prefix: bytes, message: bytes, end_stream: bool = False) -> None:
        """Bytes that must wait for windows or the socket, or span frames: frame by frame, the
        message written as slices of it (no copy). ``end_stream``: the last frame ends the stream."""
        conn = self.conn
        stream = self.stream
        body = memoryview(message)
        head = len(prefix)
        total = len(message) + head
        sent = flushed = 0
        while sent < total:
            if self.ended or stream.closed:
                raise asyncio.CancelledError("stream reset")
            n = min(total - sent, conn.window(stream))
            if n <= 0:
                self.window_waiter = waiter = self.loop.create_future()
                conn.wait_for_window(stream)
                try:
                    await waiter
                finally:
                    self.window_waiter = None
                continue
            end = sent + n
            conn.data_frame(stream, n, end_stream and end == total)
            if sent < head:
                conn.write(prefix[sent : min(end, head)])
            if end > head:
                conn.write(body[max(sent, head) - head : end - head])
            if end_stream and end == total:
                conn.end_local(stream)
            sent = end
            if sent - flushed >= WRITE_BATCH:
                conn.flush_now()
                flushed = sent

    async def reply_plain(self) -> None:
        """The plain HTTP answer of a request that is not gRPC: headers, then the body."""
        assert self.plain is not None
        code, body = self.plain
        self.conn.send_headers(self.stream, plain_response_headers(code, b"text/plain; charset=utf-8"))
        await self._send_slowly(b"", body, end_stream=True)
        self.ended = True
        self._release()

    def finish(self, code: StatusCode | None, details: str = "") -> None:
        """The call's status as trailers (Trailers-Only when no message went out); the stream
        ends."""
        if self.ended:
            return
        self.ended = True
        if code is None or code is StatusCode.OK:
            block = TRAILERS_OK
        else:
            limit = MAX_MESSAGE
            if self.conn.peer_max_header_list is not None:  # the peer's own limit, if smaller
                limit = min(limit, max(self.conn.peer_max_header_list - 512, 64))
            block = status_block(code, details, limit)
        if not self.stream.answered:
            block = RESPONSE_HEADERS + block
        self.conn.send_headers(self.stream, block, end_stream=True)
        self._release()

    def fail(self, code: StatusCode, details: str) -> None:
        """End the call from the transport's side with ``code``: the handler's requests end (as
        grpc.aio ends them) and what it sends from now on is dropped."""
        if self.ended:
            return
        logged.warning(
            "call-failed", "gRPC call on stream %d from %s failed: %s", self.stream.id, self.conn.peer, details
        )
        self.finish(code, details)
        self.wake()
        self.window_opened()

    def cancel(self) -> None:
        """The server gave up on the call (shutdown, or its handler was cancelled): RST_STREAM
        CANCEL."""
        if self.ended:
            return
        self.ended = True
        self.conn.reset_stream(self.stream, CANCEL)
        self._release()

    def refuse(self) -> None:
        """Not taken at all (the server is stopping): RST_STREAM REFUSED_STREAM, which a client
        may retry elsewhere."""
        self.ended = True
        self.conn.reset_stream(self.stream, REFUSED_STREAM)
        self._release()

    def expire(self) -> None:
        """The deadline the client gave (``grpc-timeout``) passed."""
        self.timer = None
        self.fail(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if self.task is not None:
            self.task.cancel()

    def _release(self) -> None:
        self.messages.release()
        self.windows.filled(self)
        if self.grown:
            self.windows.give_back(self.grown)
            self.grown = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Requests:
    """A call's request messages as an async iterator; taking the last one waiting gives the
    bytes back to the peer's window, asking for the next one ends the budget's charge for the
    last."""

    __slots__ = ("_call", "_parse")

    def __init__(self, call: Call, parse: Callable[[bytes | bytearray], Any]) -> None:
        self._call = call
        self._parse = parse

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        call = self._call
        messages = call.messages
        if messages.taken:
            messages.done()
        inbox = messages.inbox
        while not inbox:
            if call.ended or call.stream.remote_closed:
                raise StopAsyncIteration
            waiter = call.waiter = call.loop.create_future()
            await waiter
        message = messages.take()
        if not inbox:
            call.credit()
        try:
            return self._parse(message)
        except Exception:
            call.undecodable = True  # the request's fault, not the handler's
            raise


class Context:
    """What a handler may do to its call besides yielding answers (grpc.aio's names)."""

    __slots__ = ("_call", "_code", "_details")

    def __init__(self, call: Call) -> None:
        self._call = call
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
        await self._call.send(message.SerializeToString())

    def peer(self) -> str:
        """The peer's address, ``HOST:PORT``."""
        return self._call.conn.peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request's metadata (its regular header fields)."""
        return self._call.request.metadata()

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: the client set none)."""
        deadline = self._call.deadline
        return None if deadline is None else max(deadline - self._call.loop.time(), 0.0)
