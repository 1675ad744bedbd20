"""The gRPC side: a grpc.aio server whose ExternalProcessor/Process runs one StreamProcessor per stream."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import signal
from collections.abc import AsyncIterator, Callable

import grpc
import pluggy
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError

from .listeners import Listener, parse_address
from .processor import ProtocolError, Router, StreamAborted, StreamFailed, StreamProcessor
from .settings import Settings

log = logging.getLogger("extproc_host.server")


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor``: one Process call per HTTP exchange."""

    def __init__(self, router: Router, pm: pluggy.PluginManager | None = None) -> None:
        self.router = router
        self.pm = pm
        self._ids = itertools.count(1)
        self._announce = pm is not None and bool(pm.hook.stream_finished.get_hookimpls())
        self._finishing: set[asyncio.Future[None]] = set()
        self.active = 0  # streams whose plugins are not closed yet

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stream = StreamProcessor(self.router, str(next(self._ids)))
        error: BaseException | None = None
        self.active += 1
        try:
            async for request in request_iterator:
                responses = await stream.handle(request)
                if type(responses) is tuple or type(responses) is list:
                    if not request.observability_mode:
                        for response in responses:
                            yield response
                else:  # a plugin's output streamed piece by piece
                    async for response in responses:
                        if not request.observability_mode:
                            yield response
                if stream.finished:
                    break
        except ProtocolError as exc:
            error = exc
            log.warning("stream %s: ext_proc protocol error: %s", stream.stream_id, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except DecodeError as exc:  # bytes that are not a ProcessingRequest
            error = ProtocolError(f"undecodable ProcessingRequest: {exc}")
            log.warning("stream %s: %s", stream.stream_id, error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StreamFailed as exc:
            error = exc
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except asyncio.CancelledError:
            # Envoy resets the stream when it is done with it, too: only a cut body is an error.
            cut = stream.incomplete()
            error = StreamAborted(f"{cut}: Envoy cancelled the stream (client or upstream went away)") if cut else None
            raise
        finally:
            if stream.chain is None and not self._announce:
                self.active -= 1  # no plugin instance to close and nobody to tell
            else:
                # Shielded: a second cancel (server shutdown) must not cut the plugins' close short.
                finishing = asyncio.ensure_future(self._finish(stream, error))
                self._finishing.add(finishing)
                finishing.add_done_callback(self._finishing.discard)
                await asyncio.shield(finishing)

    async def _finish(self, stream: StreamProcessor, error: BaseException | None) -> None:
        try:
            error = await stream.finish(error)
            if error is not None and not isinstance(error, StreamFailed):
                log.debug("stream %s route %s ended: %s", stream.stream_id, stream.route_name, error)
            if self._announce and stream.plan is not None:
                self.pm.hook.stream_finished(stream=stream.stream_info(), error=error)
        finally:
            self.active -= 1

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every stream that started has closed its plugins (or ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active and loop.time() < deadline:
            if self._finishing:
                await asyncio.wait(list(self._finishing), timeout=deadline - loop.time())
            else:
                await asyncio.sleep(0.005)


def server_options(settings: Settings, reuse_port: bool = False) -> list[tuple[str, int]]:
    limit = settings.server.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # One process: fail loudly when the port is taken instead of silently sharing it.
        # Workers (workers.py) share the port their supervisor checked was free.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


async def serve(
    settings: Settings,
    router: Router,
    pm: pluggy.PluginManager,
    listen: str | None = None,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; prints ``extproc-host listening on ADDRESS`` once bound, or,
    as a worker, calls ``on_ready(ADDRESS)`` instead (its supervisor prints the line)."""
    listener = Listener(parse_address(listen or settings.server.listen), settings.server.tls)
    server = grpc.aio.server(options=server_options(settings, reuse_port))
    servicer = ExternalProcessor(router, pm)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    shown = listener.bind(server)  # a Unix socket file is removed at exit
    await server.start()
    pm.hook.host_started(settings=settings)
    # Everything loaded so far lives as long as the process: keep it out of every collection.
    gc.collect()
    gc.freeze()
    if on_ready is None:
        print(f"extproc-host listening on {shown}", flush=True)
    else:
        on_ready(shown)
    log.info("serving routes %s on %s%s", ", ".join(router.plans), shown, " (TLS)" if listener.tls else "")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", settings.server.grace_seconds)
    await server.stop(settings.server.grace_seconds)
    await servicer.drain()  # streams cut by the stop still close their plugins (files finished)
