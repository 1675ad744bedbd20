"""Which streams the server takes, the bytes they hold, and how each one is counted when it ends.

A new stream is refused while the server shuts down (UNAVAILABLE), when
``[server] max_concurrent_streams`` streams are already open, or when the bytes the open streams
hold have reached ``[server] max_held_bytes`` (RESOURCE_EXHAUSTED). Envoy then applies the
route's failure policy: fail_closed answers the client 500, failure_mode_allow lets the request
through unprocessed.

Held bytes: while a stream answers a body message, the chunk it received and the body it sends
back are in the host's memory (and stay there while Envoy does not read the answer). Each
stream's share is charged before its answer is sent and released once gRPC took it; an answer
that would take the total past ``max_held_bytes`` fails its stream with RESOURCE_EXHAUSTED.
The count is one :class:`~extproc_host.wire.Budget` shared with the builtin gRPC server, which
charges the request messages it holds until the servicer takes them (and past the limit stops
giving Envoy window until they are taken).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .errors import LimitExceeded, OverBudget, PluginError, StreamAborted
from .metrics import Metrics
from .plugin import Reject
from .processor import Router, StreamProcessor
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


@dataclass(frozen=True)
class Limits:
    """The server's limits (``[server]``); 0 turns one off."""

    max_streams: int = 0  # max_concurrent_streams
    max_message_bytes: int = 0  # for the error message when a message is too large
    max_held_bytes: int = 0  # body bytes held by the answers of every open stream
    idle_timeout: float = 0.0  # idle_timeout_seconds: longest wait for Envoy's next message
    observe_buffer_bytes: int = 16 * 1024 * 1024  # how far an observe-only chain may fall behind

    @classmethod
    def from_settings(cls, server: ServerSettings) -> Limits:
        """The limits ``[server]`` sets."""
        return cls(
            max_streams=server.max_concurrent_streams,
            max_message_bytes=server.max_message_bytes,
            max_held_bytes=server.max_held_bytes,
            idle_timeout=server.idle_timeout_seconds,
            observe_buffer_bytes=server.observe_buffer_bytes,
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
        """Bytes the open streams hold now (answers, and the builtin server's request messages)."""
        return self.budget.held

    def admits(self) -> bool:
        """Whether a new stream may start now."""
        return (
            self.accepting
            and not (self.max_streams and self.active >= self.max_streams)
            and not (self.max_held_bytes and self.held >= self.max_held_bytes)
        )

    def charge(self, stream: StreamProcessor) -> None:
        """Count the bytes ``stream``'s answer holds (``stream.held``) until :meth:`release`;
        OverBudget when they would take the total past ``max_held_bytes``."""
        held = stream.held
        if self.max_held_bytes and self.held + held > self.max_held_bytes:
            raise OverBudget(
                "max_held_bytes",
                f"stream {stream.stream_id} route {stream.route_name}: answering would hold {held} more bytes "
                f"while open streams hold {self.held}, over the limit ([server] max_held_bytes) of "
                f"{self.max_held_bytes}",
            )
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
            message = (
                f"extproc-host refused the stream: open streams hold {self.held} bytes, "
                f"the limit ([server] max_held_bytes) is {self.max_held_bytes}"
            )
        route = "?"
        try:
            first = await asyncio.wait_for(anext(requests), FIRST_MESSAGE_WAIT)
            route = self.router.plan_for(first).route.name
        except (TimeoutError, StopAsyncIteration):
            pass
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
