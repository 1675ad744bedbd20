"""Observe-only streams (Envoy's observability mode): off the data path, never back-pressuring.

In observability mode Envoy does not wait for answers (none are sent), but it does wait for
the host to take its messages: gRPC's flow control lets Envoy send only what the host has
read, and past its own buffer Envoy stops reading from the client. A chain slower than the
traffic (a plugin on a slow disk) would so slow the client down to its own pace. Here the
stream reads Envoy's messages as they come and the chain works through them in a task of its
own, behind a queue; the queue may hold ``[server] observe_buffer_bytes`` (and what
``max_held_bytes`` leaves). A chain that falls further behind stops observing the exchange:
the stream ends with :class:`~extproc_host.errors.ObserverBehind` (RESOURCE_EXHAUSTED), its
plugins are closed with it (file_tee leaves a ``.partial`` file), and Envoy, whose observing
filter fails open, carries on with the exchange without the host.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .admission import Admission
from .errors import ObserverBehind
from .processor import StreamProcessor


async def observe(
    stream: StreamProcessor,
    first: pb.ProcessingRequest,
    requests: AsyncIterator[pb.ProcessingRequest],
    admission: Admission,
) -> None:
    """Feed ``first`` and the rest of ``requests`` to ``stream`` through a bounded queue, until
    Envoy's side ends; raises what the chain raised, or ObserverBehind."""
    limit = admission.limits.observe_buffer_bytes
    budget = admission.max_held_bytes
    queue: asyncio.Queue[tuple[pb.ProcessingRequest, int] | None] = asyncio.Queue()
    backlog = 0  # bytes queued for the chain, also counted in admission.held

    async def run_chain() -> None:
        nonlocal backlog
        while (item := await queue.get()) is not None:
            request, size = item
            backlog -= size
            admission.budget.give(size)
            await stream.handle(request)  # the answers are not sent: Envoy does not read them

    chain = asyncio.ensure_future(run_chain())
    try:
        request: pb.ProcessingRequest | None = first
        while request is not None:
            if chain.done():  # the chain failed: its error ends the stream
                chain.result()
            size = request.ByteSize()
            if backlog + size > limit or (budget and admission.held + size > budget):
                setting = "observe_buffer_bytes" if backlog + size > limit else "max_held_bytes"
                raise ObserverBehind(
                    setting,
                    f"stream {stream.stream_id} route {stream.route_name}: the observing chain fell "
                    f"{backlog + size} bytes behind Envoy ([server] {setting}); the host stopped observing "
                    "this exchange, which went on for the client untouched",
                )
            backlog += size
            admission.budget.take(size)
            queue.put_nowait((request, size))
            request = await anext(requests, None)
        queue.put_nowait(None)
        await chain
    finally:
        if not chain.done():
            chain.cancel()
        admission.budget.give(backlog)
