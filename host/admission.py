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
from typing import TYPE_CHECKING, NoReturn

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .chain import PluginError
from .plugin import Reject
from .processor import StreamAborted, StreamProcessor

if TYPE_CHECKING:
    from .metrics import Metrics
    from .server import ExternalProcessor

log = logging.getLogger("extproc_host.server")

#: How long a refused stream may take to send its first message (for the route it was on).
FIRST_MESSAGE_WAIT = 1.0


async def refuse_stream(
    servicer: ExternalProcessor, requests: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
) -> NoReturn:
    """End a new stream with UNAVAILABLE (shutting down) or RESOURCE_EXHAUSTED (at the limit),
    after logging why and counting it as ``refused`` on its route."""
    if not servicer.accepting:
        code = grpc.StatusCode.UNAVAILABLE
        message = "extproc-host is shutting down and takes no new streams"
    else:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        message = (
            f"extproc-host refused the stream: {servicer.active} streams are open, "
            f"the limit ([server] max_concurrent_streams) is {servicer.max_streams}"
        )
    route = "?"
    try:
        first = await asyncio.wait_for(anext(requests), FIRST_MESSAGE_WAIT)
        route = servicer.router.plan_for(first).route.name
    except (asyncio.TimeoutError, StopAsyncIteration):
        pass
    log.warning("route %s: %s", route, message)
    if servicer.metrics is not None:
        servicer.metrics.route(route).streams["refused"] += 1
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def cut_short_reason(cut: str, max_message_bytes: int) -> str:
    """Why Envoy's side of a stream ended with a body incomplete: what gRPC does with a message
    over the size limit (Envoy then fails the exchange and logs the sizes)."""
    return (
        f"{cut}: Envoy's messages stopped; gRPC refuses a message over [server] max_message_bytes "
        f"({max_message_bytes} bytes) with RESOURCE_EXHAUSTED, which Envoy logs as "
        "'Received message larger than max'"
    )


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of a stream that ended with ``error``."""
    if error is None:
        return "ok"
    if isinstance(error, Reject):
        return "rejected"
    if isinstance(error, (StreamAborted, asyncio.CancelledError)):
        return "aborted"
    return "failed"


def count_stream(metrics: Metrics, stream: StreamProcessor, error: BaseException | None) -> None:
    """Add an ended stream to the metrics: its outcome, its body bytes, the plugin that failed."""
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
