"""Which streams the server takes, and how each one is counted when it ends.

A new stream is refused while the server shuts down (UNAVAILABLE) or when
``[server] max_concurrent_streams`` streams are already open (RESOURCE_EXHAUSTED). Envoy then
applies the route's failure policy: fail_closed answers the client 500, failure_mode_allow
lets the request through unprocessed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .errors import PluginError, StreamAborted
from .metrics import Metrics
from .plugin import Reject
from .processor import Router, StreamProcessor

log = logging.getLogger("extproc_host.server")

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


class Admission:
    """The server's door: how many streams are open, whether a new one may start, and the
    count of each one that ended (``metrics``, when on)."""

    def __init__(
        self, router: Router, metrics: Metrics | None = None, max_streams: int = 0, max_message_bytes: int = 0
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.max_streams = max_streams  # 0: no limit
        self.max_message_bytes = max_message_bytes  # for the error message when one is too large
        self.accepting = True  # False once shutdown starts: new streams are refused
        self.active = 0  # streams whose plugins are not closed yet

    def admits(self) -> bool:
        """Whether a new stream may start now."""
        return self.accepting and not (self.max_streams and self.active >= self.max_streams)

    async def refuse(
        self,
        requests: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> NoReturn:
        """End a new stream with UNAVAILABLE (shutting down) or RESOURCE_EXHAUSTED (at the
        limit), after logging why and counting it as ``refused`` on its route."""
        if not self.accepting:
            code = grpc.StatusCode.UNAVAILABLE
            message = "extproc-host is shutting down and takes no new streams"
        else:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            message = (
                f"extproc-host refused the stream: {self.active} streams are open, "
                f"the limit ([server] max_concurrent_streams) is {self.max_streams}"
            )
        route = "?"
        try:
            first = await asyncio.wait_for(anext(requests), FIRST_MESSAGE_WAIT)
            route = self.router.plan_for(first).route.name
        except (TimeoutError, StopAsyncIteration):
            pass
        log.warning("route %s: %s", route, message)
        if self.metrics is not None:
            self.metrics.route(route).streams["refused"] += 1
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    def cut_short_reason(self, cut: str) -> str:
        """Why Envoy's side of a stream ended with a body incomplete: what gRPC does with a
        message over the size limit (Envoy then fails the exchange and logs the sizes)."""
        return (
            f"{cut}: Envoy's messages stopped; gRPC refuses a message over [server] max_message_bytes "
            f"({self.max_message_bytes} bytes) with RESOURCE_EXHAUSTED, which Envoy logs as "
            "'Received message larger than max'"
        )

    def count(self, stream: StreamProcessor, error: BaseException | None) -> None:
        """Add an ended stream to the metrics: its outcome, its body bytes, the plugin that failed."""
        metrics = self.metrics
        if metrics is None:
            return
        if stream.error is not None:
            error = stream.error
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
