"""The builtin gRPC server: methods served on asyncio listeners (TCP, Unix socket, TLS), a call per
stream, and shutdown as gRPC servers do it.

What it checks of each request before a handler sees it (gRPC over HTTP/2): a content-type of
``application/grpc`` (else HTTP 415 with a plain-text body, as the gRPC spec asks, so that other
HTTP clients do not take an error for success), ``:method`` POST (else 405), a well-formed
``grpc-timeout`` (which becomes the call's deadline), a known ``:path`` (else UNIMPLEMENTED).

Handlers run as tasks, at most ``max_concurrent_streams`` of them per connection: a stream the
peer reset while its handler winds down still holds its slot, and streams that arrive meanwhile
wait for one. The tasks start once the whole read that opened their streams was taken, so a
stream opened and reset in one read (the rapid reset attack) never costs a task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from ..budget import Budget
from ..http2.connection import Connection, Stream, logged
from ..http2.fields import Request
from ..http2.limits import Limits
from ..transport import Sweeper, Transport
from .call import AbortError, Call, Context, Method, Requests, Windows, parse_timeout
from .messages import Messages
from .status import StatusCode

log = logging.getLogger("extproc_host.wire")

UNARY, SERVER_STREAM, BIDI = "unary", "server_stream", "bidi"

NOT_GRPC = b"This is a gRPC server (extproc-host): requests must be POST with content-type application/grpc.\n"


class Dispatcher:
    """The gRPC side of one HTTP/2 connection (its :class:`Application`): a :class:`Call` per
    stream, handlers started in turn."""

    __slots__ = ("queue", "running", "scheduled", "server", "windows")

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.windows = Windows(server.budget, server.window_bytes, server.loop)
        self.queue: deque[Call] = deque()  # calls waiting for their handler to start
        self.running = 0  # handler tasks not finished yet
        self.scheduled = False

    def stream_opened(self, conn: Connection, stream: Stream, request: Request) -> Call:
        server = self.server
        call = Call(
            conn,
            stream,
            request,
            Messages(server.budget, server.max_message_bytes, request.grpc_encoding),
            self.windows,
            server.loop,
        )
        content_type = request.content_type
        if not (
            content_type == b"application/grpc" or content_type.startswith((b"application/grpc+", b"application/grpc;"))
        ):
            call.plain = (415, NOT_GRPC)
        elif request.method != b"POST":
            call.plain = (405, NOT_GRPC)
        else:
            method = server.methods.get(request.path)
            if not server.serving:
                call.refuse()
                return call
            if request.grpc_timeout is not None:
                try:
                    timeout = parse_timeout(request.grpc_timeout)
                except ValueError as exc:
                    call.finish(StatusCode.INTERNAL, str(exc))
                    return call
                call.deadline = server.loop.time() + timeout
                call.timer = server.loop.call_at(call.deadline, call.expire)
            if method is None:
                call.finish(StatusCode.UNIMPLEMENTED, f"Method not found: {request.path.decode('latin-1')}")
                return call
            call.method = method
        self.queue.append(call)
        if not self.scheduled:
            self.scheduled = True
            server.loop.call_soon(self._start)
        return call

    def _start(self) -> None:
        self.scheduled = False
        server = self.server
        limit = server.limits.max_concurrent_streams
        queue = self.queue
        while queue and self.running < limit:
            call = queue.popleft()
            if call.ended:
                continue
            self.running += 1
            call.task = task = server.loop.create_task(server.run(call))
            server.calls.add(task)
            call.done_callback = self._done
            task.add_done_callback(call.finished)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running -= 1
        self.server.calls.discard(task)
        if self.queue and not self.scheduled:
            self.scheduled = True
            self.server.loop.call_soon(self._start)


class H2Server:
    """gRPC methods served on asyncio listeners (TCP, Unix socket, TLS)."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        window_bytes: int,
        limits: Limits | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.window_bytes = window_bytes  # what each stream's window grows to (Windows)
        limits = limits or Limits()
        if limits.initial_window > window_bytes:  # the first window is never the larger
            limits = dataclasses.replace(limits, initial_window=window_bytes)
        self.limits = limits
        self.budget = budget or Budget()
        self.methods: dict[bytes, Method] = {}
        self.connections: set[Transport] = set()
        self.listeners: list[asyncio.base_events.Server] = []
        self.serving = True
        self.calls: set[asyncio.Task[None]] = set()  # every call's task until it is done
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by listen()
        self.sweeper = Sweeper(self.connections, self.limits)

    def add_method(self, path: str, kind: str, handler: Callable[..., Any], request_type: Any) -> None:
        """Serve ``handler`` at ``/package.Service/Method`` ``path``."""
        self.methods[path.encode()] = Method(kind, handler, request_type)

    def _transport(self) -> Transport:
        return Transport(lambda: Dispatcher(self), self.limits, self.connections)

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
        loop = self.loop = asyncio.get_running_loop()
        self.sweeper.start()
        if path is not None:
            listener = await loop.create_unix_server(self._transport, path, ssl=ssl_context)
            self.listeners.append(listener)
            return 0
        listener = await loop.create_server(
            self._transport, host, port, ssl=ssl_context, reuse_port=reuse_port or None, reuse_address=True
        )
        self.listeners.append(listener)
        return int(listener.sockets[0].getsockname()[1])

    async def run(self, call: Call) -> None:
        """One call: the handler's answers out, then the trailers with its status."""
        method = call.method
        if method is None:  # not a gRPC request: a plain HTTP answer
            try:
                await call.reply_plain()
            except asyncio.CancelledError:
                call.cancel()
                raise
            return
        code: StatusCode | None = None
        details = ""
        try:
            parse = method.request_type.FromString
            context = Context(call)
            if method.kind == BIDI:
                answers = method.handler(Requests(call, parse), context)
                try:
                    async for answer in answers:
                        await call.send(answer.SerializeToString())
                        del answer  # not kept alive (its body) while the handler waits
                finally:
                    await answers.aclose()
            else:
                request = await self._only_request(call, parse)
                if method.kind == UNARY:
                    answer = await method.handler(request, context)
                    await call.send(answer.SerializeToString())
                else:
                    await method.handler(request, context)
        except AbortError as exc:
            code, details = exc.code, exc.details
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as exc:
            if call.undecodable:  # the handler let a request's parse error through
                code, details = StatusCode.INTERNAL, f"could not parse a request message: {exc}"
                logged.warning(
                    "undecodable", "gRPC call on stream %d from %s: %s", call.stream.id, call.conn.peer, details
                )
            else:  # a handler's bug: the call fails, the server goes on
                log.error("unexpected error in %s", method.handler, exc_info=True)
                code, details = StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}"
        call.finish(code, details)

    @staticmethod
    async def _only_request(call: Call, parse: Callable[[bytes | bytearray], Any]) -> Any:
        requests = Requests(call, parse)
        try:
            return await anext(requests)
        except StopAsyncIteration:
            raise AbortError(StatusCode.INTERNAL, "no request message") from None

    def shutdown(self) -> None:
        """Graceful shutdown of every connection: two GOAWAYs (the streams in flight are still
        taken, none after); each connection closes once its streams end."""
        for transport in list(self.connections):
            if transport.conn is not None:
                transport.conn.shutdown()

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
        for transport in list(self.connections):
            if transport.conn is not None:
                transport.conn.close()
        await self.sweeper.stop()
        for listener in self.listeners:
            await listener.wait_closed()
