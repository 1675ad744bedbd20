"""The gRPC side: the server (the builtin one in wire/, or grpc.aio) whose ExternalProcessor/Process
runs one StreamProcessor per stream."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pluggy
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError

from .admission import Admission, Limits
from .errors import ConfigError, IdleTimeout, LimitExceeded, ProtocolError, StreamAborted, StreamFailed
from .health import Health
from .listeners import ListenAddress, Listener, parse_address
from .logs import announce, current_stream
from .metrics import Metrics
from .observe import observe
from .processor import Router, StreamProcessor
from .registry import LoadedHost
from .reload import SettingsFile, describe, reload_host
from .settings import Settings, parse_listen
from .tracing import Tracing, trace_carrier
from .upkeep import Upkeep
from .wire import BIDI, Context, H2Server, LogLimiter, StatusCode
from .wire import Limits as Http2Limits

if TYPE_CHECKING:  # grpc is imported only with transport = "grpcio": 18 MiB resident
    import grpc

log = logging.getLogger("extproc_host.server")
#: Lines about one stream each, which a flood of bad streams must not multiply: at most 10 of a
#: kind per 10 s, then a count of those left out (the metrics count every one).
logged = LogLimiter(log)

PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# [server] stream_window_bytes = 0 ("automatic") with the builtin transport, which does not
# probe the link's bandwidth-delay product: the default window.
DEFAULT_STREAM_WINDOW = 1024 * 1024


def status_codes(context: Any) -> Any:
    """The status code enum ``context.abort`` takes: the builtin server's, or grpc.StatusCode for grpc.aio."""
    if isinstance(context, Context):
        return StatusCode
    import grpc  # loaded already: the context is grpc.aio's

    return grpc.StatusCode


class ExternalProcessor:
    """``envoy.service.ext_proc.v3.ExternalProcessor``: one Process call per HTTP exchange."""

    def __init__(
        self,
        router: Router,
        pm: pluggy.PluginManager | None = None,
        *,
        limits: Limits | None = None,
    ) -> None:
        self.router = router
        self.pm = pm
        self.admission = Admission(router, router.metrics, limits)
        self.upkeep = Upkeep(self.admission)
        self._ids = itertools.count(1)
        self._announce = pm is not None and bool(pm.hook.stream_finished.get_hookimpls())
        self._finishing: set[asyncio.Future[None]] = set()

    @property
    def active(self) -> int:
        """Streams whose plugins are not closed yet."""
        return self.admission.active

    def switch(self, router: Router, pm: pluggy.PluginManager) -> None:
        """New streams get ``router``'s routes and ``pm``'s broadcast hooks (a reload); the
        streams already open keep the router they started with."""
        self.router = self.admission.router = router
        self.pm = pm
        self._announce = bool(pm.hook.stream_finished.get_hookimpls())

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: Any,  # wire.Context, or grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        admission = self.admission
        codes = status_codes(context)
        if not admission.admits():  # counted open from here: admission.closed() at the end
            await admission.refuse(request_iterator, context, codes)
        stream = StreamProcessor(self.router, str(next(self._ids)))
        if stream.router.tracing is not None:  # Envoy's own trace of the call, when it has one
            stream.trace_context = trace_carrier(context.invocation_metadata() or ())
        current_stream.set(stream)
        error: BaseException | None = None
        upkeep = self.upkeep
        upkeep.watch(stream)
        completed = False  # the stream ran to its end (else: failed, cancelled, or closed mid-send)
        response: pb.ProcessingResponse | None = None
        try:
            async for request in request_iterator:
                if request.observability_mode:  # off the data path: no answers, no waiting
                    await observe(stream, request, request_iterator, admission)
                    cut = stream.incomplete()
                    if cut:
                        error = StreamAborted(admission.cut_short_reason(cut))
                    break
                responses = await stream.handle(request)
                if stream.held:
                    admission.charge(stream)
                if isinstance(responses, (tuple, list)):
                    for response in responses:
                        yield response
                else:  # a plugin's output streamed piece by piece
                    async for response in responses:
                        yield response
                if stream.charged:
                    admission.release(stream)
                if stream.finished:
                    break
                # Waiting for Envoy's next message must not keep this one alive: a parsed message
                # holds its whole body (its arena), and the budget no longer counts it.
                del request, responses
                response = None
            else:
                cut = stream.incomplete()
                if cut:  # Envoy's side ended early: the reason lists what it may have been
                    error = StreamAborted(admission.cut_short_reason(cut))
                    logged.warning("cut-short", "%s", error)
            completed = True
        except (ProtocolError, DecodeError) as exc:  # DecodeError: bytes that are not a ProcessingRequest
            error = exc if isinstance(exc, ProtocolError) else ProtocolError(f"undecodable ProcessingRequest: {exc}")
            logged.warning("protocol-error", "stream %s: ext_proc protocol error: %s", stream.stream_id, error)
            await context.abort(codes.INVALID_ARGUMENT, str(error))
        except LimitExceeded as exc:
            error = stream.error = exc
            if not isinstance(exc, IdleTimeout):  # the upkeep logged that one
                logged.warning(exc.setting, "%s", exc)
            await context.abort(getattr(codes, exc.status), str(exc))
        except StreamFailed as exc:
            error = exc
            await context.abort(codes.INTERNAL, str(exc))
        except asyncio.CancelledError:
            if isinstance(stream.error, IdleTimeout):  # the upkeep cancelled it: say why
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                error = stream.error
                await context.abort(codes.DEADLINE_EXCEEDED, str(error))
            # Envoy resets the stream when it is done with it, too: only a cut body is an error,
            # and only a stream cut short or cut while it waited to send leaves memory to reclaim.
            cut = stream.incomplete()
            error = StreamAborted(admission.cancelled_reason(cut)) if cut else None
            completed = not cut and not stream.charged
            raise
        except GeneratorExit:
            # gRPC closed the handler while an answer was being handed over: Envoy ended the
            # stream, most often right as it took the last answer. Only an exchange cut short
            # leaves memory to reclaim (a reclaim per ordinary exchange would stall the server).
            completed = stream.incomplete() is None
            raise
        finally:
            upkeep.forget(stream)
            if not completed or error is not None:
                admission.abnormal += 1  # grpc.aio may leave its buffers in cycles: reclaim them
            if stream.charged:
                admission.release(stream)
            if stream.chain is None and stream.trace is None and not self._announce:
                admission.closed()  # no plugin instance to close and nobody to tell
                admission.count(stream, error)
            else:
                # Shielded: a second cancel (server shutdown) must not cut the plugins' close short.
                finishing = asyncio.ensure_future(self._finish(stream, error))
                self._finishing.add(finishing)
                finishing.add_done_callback(self._finishing.discard)
                await asyncio.shield(finishing)

    async def _finish(self, stream: StreamProcessor, error: BaseException | None) -> None:
        try:
            error = await stream.finish(error)
            self.admission.count(stream, error)
            if error is not None and not isinstance(error, StreamFailed):
                log.debug("stream %s route %s ended: %s", stream.stream_id, stream.route_name, error)
            if self._announce and self.pm is not None and stream.plan is not None:
                self.pm.hook.stream_finished(stream=stream.stream_info(), error=error)
        finally:
            self.admission.closed()

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
    """grpc.aio server options from ``[server]``: message limits, port sharing, stream window."""
    limit = settings.server.max_message_bytes
    window = settings.server.stream_window_bytes
    # A fixed per-stream receive window bounds what gRPC reads ahead of a slow chain; BDP
    # probing would grow it (and the host's memory) with the link's bandwidth-delay product.
    flow = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)] if window else []
    return [
        *flow,
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # One process: fail loudly when the port is taken instead of silently sharing it.
        # Workers (workers.py) share the port their supervisor checked was free.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


def make_server(
    settings: Settings, servicer: ExternalProcessor, reuse_port: bool = False
) -> grpc.aio.Server | H2Server:
    """The gRPC server ``[server] transport`` names, serving ``servicer``'s Process (not yet
    listening: :meth:`Listener.start`)."""
    if settings.server.transport == "grpcio":
        import grpc
        from envoy.service.ext_proc.v3.external_processor_pb2_grpc import add_ExternalProcessorServicer_to_server

        server = grpc.aio.server(options=server_options(settings, reuse_port))
        add_ExternalProcessorServicer_to_server(servicer, server)
        return server
    window = settings.server.stream_window_bytes or DEFAULT_STREAM_WINDOW
    builtin = H2Server(
        max_message_bytes=settings.server.max_message_bytes,
        window_bytes=window,
        limits=http2_limits(settings),
        budget=servicer.admission.budget,
    )
    builtin.add_method(PROCESS_METHOD, BIDI, servicer.Process, pb.ProcessingRequest)
    return builtin


def http2_limits(settings: Settings) -> Http2Limits:
    """The builtin server's per-connection limits from ``[server.http2]``."""
    http2 = settings.server.http2
    return Http2Limits(
        max_concurrent_streams=http2.max_concurrent_streams,
        initial_window=http2.initial_window_bytes,
        max_header_list_size=http2.max_header_list_size,
        preface_timeout=http2.preface_timeout_seconds,
        frame_timeout=http2.frame_timeout_seconds,
        idle_timeout=http2.idle_timeout_seconds,
        stall_timeout=http2.stall_timeout_seconds,
        flood_burst=http2.flood_burst,
        flood_rate=http2.flood_rate,
    )


async def serve(
    host: LoadedHost,
    listen: str | None = None,
    *,
    config: str | None = None,
    reuse_port: bool = False,
    on_ready: Callable[[str], None] | None = None,
    watch: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT; prints ``extproc-host listening on ADDRESS`` once bound, or,
    as a worker, calls ``on_ready(ADDRESS)`` instead (its supervisor prints the line). SIGHUP
    reloads ``config`` (reload.py), as does a change of its content when ``[server]
    watch_config_seconds`` is set and ``watch`` (a worker's supervisor watches instead)."""
    settings, routes, pm = host.settings, host.routes, host.pm
    listener = Listener(parse_address(listen or settings.server.listen), settings.server.tls)
    metrics = start_metrics(settings)
    tracing = Tracing(settings.server.tracing) if settings.server.tracing.enabled else None
    router = Router(routes, metrics, settings.server.max_message_bytes, tracing)
    servicer = ExternalProcessor(router, pm, limits=Limits.from_settings(settings.server))
    server = make_server(settings, servicer, reuse_port)
    health = Health(server)
    await health.starting()
    shown = await listener.start(server, reuse_port=reuse_port)  # a Unix socket file is removed at exit
    pm.hook.host_started(settings=settings)
    await health.serving()
    if metrics is not None:
        metrics.track_active(lambda: servicer.active, servicer.admission.budget)
    # Everything loaded so far lives as long as the process: keep it out of every collection.
    gc.collect()
    gc.freeze()
    if on_ready is None:
        announce(f"extproc-host listening on {shown}")
    else:
        on_ready(shown)
    log.info(
        "serving routes %s on %s%s, transport %s",
        ", ".join(router.plans),
        shown,
        " (TLS)" if listener.tls else "",
        settings.server.transport,
    )

    stopped_by: list[int] = []  # the first signal
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        stopped_by.append(signum)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    current = [host]  # what the last reload loaded

    def reload() -> None:
        current[0] = reload_servicer(servicer, config, current[0], metrics)

    loop.add_signal_handler(signal.SIGHUP, reload)
    watcher = None
    if watch and config is not None and settings.server.watch_config_seconds:
        watcher = loop.create_task(watch_config(config, settings.server.watch_config_seconds, reload))
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    loop.remove_signal_handler(signal.SIGHUP)
    hurry = asyncio.Event()  # a second signal ends the drain delay and the grace period at once
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry.set)
    # SIGTERM comes from an orchestrator whose load balancer must see the host go first;
    # Ctrl-C (SIGINT) comes from a terminal: no drain delay.
    stopping = current[0].settings.server  # drain_seconds and grace_seconds as last reloaded
    drain = stopping.drain_seconds if stopped_by[0] == signal.SIGTERM else 0.0
    await graceful_stop(server, servicer, health, stopping.grace_seconds, hurry, drain=drain)
    if metrics is not None:
        metrics.close()
    if tracing is not None:
        tracing.shutdown()


def reload_servicer(
    servicer: ExternalProcessor, config: str | None, current: LoadedHost, metrics: Metrics | None
) -> LoadedHost:
    """Load ``config`` again and give new streams its routes (reload.py); the host now served,
    or ``current`` when the new settings do not load."""
    try:
        reloaded = reload_host(config, current)
    except ConfigError as exc:
        log.error("reload of %s refused, the running settings stay:\n%s", config or "the settings", exc)
        return current
    host = reloaded.host
    router = Router(host.routes, metrics, current.settings.server.max_message_bytes, servicer.router.tracing)
    servicer.switch(router, host.pm)
    host.pm.hook.host_started(settings=host.settings)
    first, *notes = describe(reloaded, config)
    log.info("%s", first)
    for note in notes:
        log.warning("%s", note)
    return host


async def watch_config(config: str, interval: float, reload: Callable[[], None]) -> None:
    """Reload when ``config``'s content changes, looked at every ``interval`` seconds."""
    watched = SettingsFile(config)
    while True:
        await asyncio.sleep(interval)
        if watched.changed():
            log.info("%s changed: reloading it", config)
            reload()


def start_metrics(settings: Settings) -> Metrics | None:
    """The metrics and their exporter when ``[server] metrics_listen`` is set; prints
    ``extproc-host metrics on http://HOST:PORT/metrics`` once bound."""
    address = settings.server.metrics_listen
    if address is None:
        return None
    metrics = Metrics()
    host, port = parse_listen(address)
    try:
        bound = metrics.serve(host, port)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    announce(f"extproc-host metrics on http://{ListenAddress(host, bound).target()}/metrics")
    return metrics


async def graceful_stop(
    server: grpc.aio.Server | H2Server,
    servicer: ExternalProcessor,
    health: Health,
    grace: float,
    hurry: asyncio.Event,
    *,
    drain: float = 0.0,
) -> None:
    """Shutdown: NOT_SERVING at once; for ``drain`` seconds keep serving new streams while
    health checkers take the host out (drain.py); then refuse new streams and let open ones
    finish for up to ``grace`` seconds; then cancel the rest (their plugins are still closed).
    ``hurry`` (a second signal) ends the drain delay and the grace period at once.

    The server keeps running throughout, so health checks are answered (NOT_SERVING) rather
    than refused: grpc's own ``server.stop(grace)`` would refuse every new call, health checks
    included, and then cancel open streams at the end of the grace.
    """
    await health.shutting_down()
    loop = asyncio.get_running_loop()
    if drain > 0:
        log.info("shutting down: NOT_SERVING, still taking new streams for %.1fs (drain_seconds)", drain)
        try:
            await asyncio.wait_for(hurry.wait(), drain)
        except TimeoutError:
            pass
    servicer.admission.accepting = False
    if isinstance(server, H2Server):  # GOAWAY, twice: Envoy sends new streams elsewhere
        server.shutdown()
    log.info("shutting down: new streams refused, waiting up to %.1fs for %d open streams", grace, servicer.active)
    deadline = loop.time() + grace
    while servicer.active and loop.time() < deadline and not hurry.is_set():
        await asyncio.sleep(0.05)
    if servicer.active:
        why = "second signal" if hurry.is_set() else f"grace period of {grace:.1f}s over"
        log.warning("%s: cancelling %d open streams", why, servicer.active)
    await server.stop(0)  # cancels whatever is still open
    await servicer.drain()  # streams cut by the stop still close their plugins (files finished)
    servicer.upkeep.stop()
    log.info("stopped")
