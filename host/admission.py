"""Which streams the server takes, the memory they hold, and how each one is counted when it ends.

Admission is by bytes, against one budget (``[server] max_held_bytes``, a
:class:`~extproc_host.wire.Budget` shared with the builtin gRPC server): every open stream
reserves ``stream_reserve`` bytes (its own objects, measured at about 7 KiB with a passthrough
chain, counted as ``STREAM_COST``, and the first window Envoy may fill), and the bytes streams
hold are charged as they come: request messages not yet taken, the answers on their way out,
observers' queues, windows grown past the first. A new stream is refused only when the
reservations alone would pass the budget, or while the server shuts down (UNAVAILABLE), or past
an explicit ``[server] max_concurrent_streams`` (RESOURCE_EXHAUSTED; 0, the default, counts no
streams). Held bytes past the budget refuse nobody: the builtin server stops giving Envoy window
until they are released, so Envoy holds back instead. Envoy then applies the route's failure
policy to a refused stream: fail_closed answers the client 500, failure_mode_allow lets the
request through unprocessed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .errors import LimitExceeded, PluginError, StreamAborted
from .metrics import Metrics
from .plugin import Reject
from .processor import Router, StreamProcessor, request_trace_context
from .settings import ServerSettings
from .wire import Budget, LogLimiter

log = logging.getLogger("extproc_host.server")
logged = LogLimiter(log)  # refusals come in floods: at most 10 lines per 10 s, then a count

#: How long a refused stream may take to send its first message (for the route it was on).
FIRST_MESSAGE_WAIT = 1.0


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of a stream that ended with ``error``."""
    if error is None:
        return "ok"
    if isinstance(error, Reject):
        return "rejected"
    if isinstance(error, (StreamAborted, asyncio.CancelledError)):
        return "aborted"
    return "failed"


#: What an open stream costs the host before it holds any body: its objects with a passthrough
#: chain measured about 7 KiB; this leaves room for plugins' own.
STREAM_COST = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """The server's limits (``[server]``); 0 turns one off."""

    max_streams: int = 0  # max_concurrent_streams
    max_message_bytes: int = 0  # for the error message when a message is too large
    max_held_bytes: int = 0  # the budget
    idle_timeout: float = 0.0  # idle_timeout_seconds: longest wait for Envoy's next message
    observe_buffer_bytes: int = 16 * 1024 * 1024  # how far an observe-only chain may fall behind
    stream_reserve: int = STREAM_COST  # what each open stream reserves in the budget

    @classmethod
    def from_settings(cls, server: ServerSettings) -> Limits:
        """The limits ``[server]`` sets. A stream reserves STREAM_COST and its first window:
        ``[server.http2] initial_window_bytes`` with the builtin server, the whole stream window
        with grpc.aio (which fills it at once, 4 MiB when automatic)."""
        if server.transport == "builtin":
            window = server.http2.initial_window_bytes
        else:
            window = server.stream_window_bytes or 4 * 1024 * 1024
        return cls(
            max_streams=server.max_concurrent_streams,
            max_message_bytes=server.max_message_bytes,
            max_held_bytes=server.max_held_bytes,
            idle_timeout=server.idle_timeout_seconds,
            observe_buffer_bytes=server.observe_buffer_bytes,
            stream_reserve=STREAM_COST + window,
        )


class Admission:
    """The server's door: how many streams are open, whether a new one may start, the bytes
    the open ones hold, and the count of each one that ended (``metrics``, when on)."""

    def __init__(self, router: Router, metrics: Metrics | None = None, limits: Limits | None = None) -> None:
        self.router = router
        self.metrics = metrics
        self.limits = limits = limits or Limits()
        self.max_streams = limits.max_streams
        self.max_held_bytes = limits.max_held_bytes
        self.max_message_bytes = limits.max_message_bytes
        self.accepting = True  # False once shutdown starts: new streams are refused
        self.active = 0  # streams whose plugins are not closed yet
        self.budget = Budget(limits.max_held_bytes)  # bytes the open streams hold
        self.abnormal = 0  # streams that did not run to their end (the upkeep reclaims their memory)

    @property
    def held(self) -> int:
        """Bytes the open streams hold and reserve now."""
        return self.budget.total

    def admits(self) -> bool:
        """Whether a new stream may start now: when it may, it is counted open and its
        reservation made (:meth:`closed` returns them)."""
        if not self.accepting or (self.max_streams and self.active >= self.max_streams):
            return False
        if not self.budget.reserve(self.limits.stream_reserve):
            return False
        self.active += 1
        return True

    def closed(self) -> None:
        """A stream admitted by :meth:`admits` has closed its plugins."""
        self.active -= 1
        self.budget.unreserve(self.limits.stream_reserve)

    def charge(self, stream: StreamProcessor) -> None:
        """Count the bytes ``stream``'s answer holds (``stream.held``) until :meth:`release`.
        Past the budget nothing fails: the builtin server holds Envoy back instead."""
        held = stream.held
        self.budget.take(held)
        stream.charged = held

    def release(self, stream: StreamProcessor) -> None:
        """Return what :meth:`charge` counted for ``stream``."""
        self.budget.give(stream.charged)
        stream.charged = 0

    async def refuse(
        self,
        requests: AsyncIterator[pb.ProcessingRequest],
        context: Any,
        codes: Any,
    ) -> NoReturn:
        """End a new stream with UNAVAILABLE (shutting down) or RESOURCE_EXHAUSTED (at the
        limit), after logging why and counting it as ``refused`` on its route. ``codes``: the
        transport's status code enum."""
        if not self.accepting:
            code, reason = codes.UNAVAILABLE, "shutting_down"
            message = "extproc-host is shutting down and takes no new streams"
        elif self.max_streams and self.active >= self.max_streams:
            code, reason = codes.RESOURCE_EXHAUSTED, "max_concurrent_streams"
            message = (
                f"extproc-host refused the stream: {self.active} streams are open, "
                f"the limit ([server] max_concurrent_streams) is {self.max_streams}"
            )
        else:
            code, reason = codes.RESOURCE_EXHAUSTED, "max_held_bytes"
            reserve = self.limits.stream_reserve
            message = (
                f"extproc-host refused the stream: {self.active} open streams reserve {self.budget.reserved} bytes "
                f"({reserve} each: the stream and its first window), one more would pass the budget "
                f"([server] max_held_bytes) of {self.max_held_bytes}"
            )
        route = "?"
        first = None
        try:
            first = await asyncio.wait_for(anext(requests), FIRST_MESSAGE_WAIT)
            route = self.router.plan_for(first).route.name
        except (TimeoutError, StopAsyncIteration):
            pass
        if self.router.tracing is not None:
            self.router.tracing.refused(route, reason, message, request_trace_context(first))
        logged.warning("refused", "route %s: %s", route, message)
        if self.metrics is not None:
            self.metrics.route(route).streams["refused"] += 1
            self.metrics.refused[reason] = self.metrics.refused.get(reason, 0) + 1
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    def cut_short_reason(self, cut: str) -> str:
        """Why Envoy's side of a stream ended with a body incomplete, as far as the host can know.

        grpc.aio ends the request stream the same way when Envoy half-closes it, resets it, or
        gRPC drops a message over the size limit, so the reason lists what it may be rather than
        guess one: a client or upstream that went away, a body Envoy refused itself (413, or a
        response over its buffer limit), a message over ``[server] max_message_bytes``.
        """
        return (
            f"{cut}: Envoy's messages stopped; the client or upstream went away, Envoy refused the body itself "
            "(413 or a response over the route's buffer limit), or a message was over [server] max_message_bytes "
            f"({self.max_message_bytes} bytes), which gRPC refuses with RESOURCE_EXHAUSTED and Envoy logs as "
            "'Received message larger than max'"
        )

    def cancelled_reason(self, cut: str) -> str:
        """Why a stream with a body incomplete was cancelled: the host's shutdown (grace period
        over) or Envoy resetting it (the client or upstream went away)."""
        if not self.accepting:
            return f"{cut}: the host cancelled the stream at the end of its shutdown grace period"
        return f"{cut}: Envoy cancelled the stream (the client or upstream went away)"

    def count(self, stream: StreamProcessor, error: BaseException | None) -> None:
        """Add an ended stream to the metrics: its outcome, its body bytes, the plugin that
        failed, the limit it crossed."""
        if stream.error is not None:
            error = stream.error
        metrics = self.metrics
        if metrics is None:
            return
        route = metrics.route(stream.route_name)
        route.streams[outcome_of(error)] += 1
        counts = route.bytes
        for d in (stream.request, stream.response):
            if d.bytes_in:
                counts[d.name, "in"] += d.bytes_in
            if d.bytes_out:
                counts[d.name, "out"] += d.bytes_out
        if isinstance(error, PluginError):
            metrics.plugin_failed(error.plugin)
        elif isinstance(error, LimitExceeded):
            metrics.limit_failures[error.setting] = metrics.limit_failures.get(error.setting, 0) + 1
