"""One ext_proc stream: Envoy's ProcessingRequests in, ProcessingResponses out, per body mode.

- FULL_DUPLEX_STREAMED: body chunks are answered M:N with ``streamed_response`` chunks; a chunk
  the chain swallows is not answered at all; ``end_of_stream`` is sent exactly once.
- STREAMED (and BUFFERED_PARTIAL): every chunk gets exactly one BodyResponse.
- BUFFERED: the one body message is answered with the whole new body, and ``content-length``
  is set when the size changed.
- Headers and trailers: one answer each, carrying the plugins' changes.

STREAMED and BUFFERED answer a message with one message, so the chain's output for it must fit
in one gRPC message (``[server] max_message_bytes``): a larger output fails the stream with
:class:`~extproc_host.errors.AnswerTooLarge` (a 413 local reply while the response has not
started) instead of reaching gRPC, which would refuse to send it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .chain import Chain, ChainPlan
from .errors import AnswerTooLarge, PluginError, ProtocolError, StreamAborted, StreamFailed
from .plugin import Headers, Reject, StreamInfo
from .protocol import (
    BUFFERED,
    CONTINUE,
    FULL_DUPLEX,
    MAX_STREAMED_CHUNK,
    MODE_NAMES,
    NONE,
    NOTHING,
    header_items,
    header_mutation,
    immediate_response,
    request_path,
    route_attribute,
    streamed,
    streamed_pieces,
)
from .routes import Route

if TYPE_CHECKING:
    from .metrics import HookTimer, Metrics

log = logging.getLogger("extproc_host.stream")


#: What one ProcessingRequest is answered with: none, one or several responses, or (full-duplex
#: output too large to hold at once) an async iterator of them.
Answers = tuple[pb.ProcessingResponse, ...] | list[pb.ProcessingResponse]
Responses = Answers | AsyncIterator[pb.ProcessingResponse]


#: Room left in a message for what surrounds the body (the message's framing, the
#: content-length header BUFFERED answers set).
ANSWER_OVERHEAD = 64 * 1024
#: No size limit on an answer (a byte count no body reaches).
UNLIMITED = 2**62


async def _join(pieces: AsyncIterator[bytes], limit: int) -> bytes | None:
    """The pieces joined, or None (the rest left unread) once they pass ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    async for piece in pieces:
        size += len(piece)
        if size > limit:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()
            return None
        parts.append(piece)
    return b"".join(parts)


# ProcessingRequest kind -> (direction attribute, part of the exchange it carries).
_PARTS = {
    "request_headers": ("request", "headers"),
    "response_headers": ("response", "headers"),
    "request_body": ("request", "body"),
    "response_body": ("response", "body"),
    "request_trailers": ("request", "trailers"),
    "response_trailers": ("response", "trailers"),
}


class Router:
    """Picks a route's chain plan: by Envoy route name, else by path prefix, else ``default``.

    With ``metrics``, every plugin hook the routes use is timed (``hook_timers``).
    ``max_message_bytes``: the largest gRPC message the server sends (0: no limit); the body of
    a STREAMED or BUFFERED answer may take all of it but ``ANSWER_OVERHEAD``.
    """

    def __init__(self, routes: dict[str, Route], metrics: Metrics | None = None, max_message_bytes: int = 0) -> None:
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_answer_bytes = max_message_bytes - ANSWER_OVERHEAD if max_message_bytes else UNLIMITED
        self.hook_timers: dict[tuple[str, str], HookTimer] | None = (
            metrics.bind(routes.values()) if metrics is not None else None
        )
        self.plans = {name: ChainPlan.for_route(route) for name, route in routes.items()}
        self.default = self.plans["default"]
        self.prefixes = sorted(
            ((route.path_prefix, self.plans[name]) for name, route in routes.items() if route.path_prefix),
            key=lambda item: len(item[0]),
            reverse=True,
        )

    def select(self, route_name: str | None, path: str | None) -> ChainPlan:
        if route_name:
            plan = self.plans.get(route_name)
            if plan is not None:
                return plan
        if path is not None:
            for prefix, plan in self.prefixes:
                if path.startswith(prefix):
                    return plan
        return self.default

    def plan_for(self, req: pb.ProcessingRequest) -> ChainPlan:
        """The plan for a stream, from its first request (route attribute, else ``:path``)."""
        route_name = route_attribute(req)
        plan = self.plans.get(route_name) if route_name else None
        if plan is None:
            plan = self.select(None, request_path(req) if self.prefixes else None)
        return plan


@dataclass
class Direction:
    """Where one direction (request or response) of the exchange stands."""

    name: str
    mode: int = NONE
    body_expected: bool = False
    body_seen: bool = False
    ended: bool = False
    headers_seen: bool = False
    trailers_seen: bool = False
    bytes_in: int = 0  # body bytes received from Envoy
    bytes_out: int = 0  # body bytes the chain passed on


@dataclass
class StreamProcessor:
    """The state of one gRPC Process stream; ``handle`` answers each ProcessingRequest."""

    router: Router
    stream_id: str
    plan: ChainPlan | None = None
    chain: Chain | None = None
    info: StreamInfo | None = None
    request: Direction = field(default_factory=lambda: Direction("request"))
    response: Direction = field(default_factory=lambda: Direction("response"))
    altered: bool = False  # something the chain produced reached Envoy
    bypass: bool = False  # failed open: the rest of the stream passes untouched
    finished: bool = False  # an ImmediateResponse ended the exchange
    error: BaseException | None = None
    messages: int = 0  # messages received from Envoy (the idle timeout watches it move)
    held: int = 0  # body bytes the current answer holds: the chunk received plus the one sent
    charged: int = 0  # of those, what the server's byte budget counts for this stream now

    @property
    def route_name(self) -> str:
        return self.plan.route.name if self.plan else "?"

    async def handle(self, req: pb.ProcessingRequest) -> Responses:
        """The responses for one request: none, one, several, or (full-duplex output too large
        to hold at once) an async iterator of them."""
        self.messages += 1
        self.held = 0
        if self.plan is None:
            self._start(req)
        kind = req.WhichOneof("request")
        self._check_order(kind)
        try:
            return await self._dispatch(kind, req)
        except PluginError as exc:
            return await self._plugin_failed(kind, req, exc)

    def _check_order(self, kind: str | None) -> None:
        """Raise ProtocolError for a message Envoy never sends at this point of the exchange.

        Allowed: any direction first (header messages may be skipped by the processing mode),
        the response while the request body still streams (full duplex). Refused: a message
        with no kind, headers twice or after their body started, a body chunk after its body
        ended (end_of_stream, trailers, or headers that ended the stream), trailers twice.
        """
        part = _PARTS.get(kind)  # type: ignore[arg-type]
        if part is None:
            raise ProtocolError(f"ProcessingRequest carries no known message ({kind!r})")
        d = self.request if part[0] == "request" else self.response
        what = part[1]
        if what == "body":
            if d.ended:
                why = "trailers" if d.trailers_seen else "end_of_stream"
                raise ProtocolError(f"{d.name} body chunk after the {d.name} body ended ({why})")
        elif what == "headers":
            if d.headers_seen:
                raise ProtocolError(f"{d.name} headers sent twice")
            if d.body_seen or d.trailers_seen:
                raise ProtocolError(f"{d.name} headers after the {d.name} body or trailers")
            d.headers_seen = True
        else:
            if d.trailers_seen:
                raise ProtocolError(f"{d.name} trailers sent twice")
            d.trailers_seen = True

    def stream_info(self, first: pb.ProcessingRequest | None = None) -> StreamInfo:
        """The StreamInfo plugins see, built on first use."""
        if self.info is None:
            self.info = StreamInfo(
                stream_id=self.stream_id,
                route=self.route_name,
                request_body_mode=MODE_NAMES.get(self.request.mode, "NONE"),
                response_body_mode=MODE_NAMES.get(self.response.mode, "NONE"),
                attributes=dict(first.attributes) if first is not None and first.attributes else {},
            )
        return self.info

    def _start(self, req: pb.ProcessingRequest) -> None:
        if req.HasField("protocol_config"):
            self.request.mode = req.protocol_config.request_body_mode
            self.response.mode = req.protocol_config.response_body_mode
            for d in (self.request, self.response):
                if d.mode not in MODE_NAMES:
                    bad, d.mode = d.mode, NONE
                    self.plan = self.router.default  # nothing is built for a stream refused here
                    raise ProtocolError(f"protocol_config: unknown {d.name} body mode {bad}")
        self.plan = plan = self.router.plan_for(req)
        if plan.has_any_hook:  # a chain that does nothing needs no StreamInfo and no instances
            try:
                self.chain = Chain(plan, self.stream_info(req), self.router.hook_timers)
            except PluginError as exc:
                self._log_failure(exc)
                self.error = exc
                self.bypass = True  # nothing to close: no plugin was fully built
                if self.plan.route.failure_policy != "fail_open":
                    raise StreamFailed(str(exc)) from exc

    async def _dispatch(self, kind: str | None, req: pb.ProcessingRequest) -> Responses:
        if kind == "request_body":
            return await self._body(self.request, kind, req.request_body, req)
        if kind == "response_body":
            return await self._body(self.response, kind, req.response_body, req)
        if kind == "request_headers":
            return await self._headers(self.request, kind, req.request_headers)
        if kind == "response_headers":
            return await self._headers(self.response, kind, req.response_headers)
        if kind == "request_trailers":
            return await self._trailers(self.request, kind, req.request_trailers.trailers)
        if kind == "response_trailers":
            return await self._trailers(self.response, kind, req.response_trailers.trailers)
        raise ProtocolError(f"ProcessingRequest carries no known message ({kind!r})")

    def _active(self) -> Chain | None:
        return None if self.bypass else self.chain

    async def _headers(self, d: Direction, kind: str, msg: pb.HttpHeaders) -> Answers:
        d.ended = msg.end_of_stream
        d.body_expected = not msg.end_of_stream and d.mode != NONE
        chain = self._active()
        if chain is None:
            return CONTINUE[kind]
        # Plugins with hooks see both header blocks in StreamInfo, whichever hooks they have.
        headers = Headers(header_items(msg.headers))
        info = chain.info
        if d is self.request:
            info.request_headers = headers
            info.request_has_body = not msg.end_of_stream
        else:
            info.response_headers = headers
            info.response_has_body = not msg.end_of_stream
        hook = "on_request_headers" if d is self.request else "on_response_headers"
        if not chain.plan.touches(hook):
            return CONTINUE[kind]
        await chain.headers(hook, headers)
        mutation = header_mutation(headers)
        if mutation is None:
            return CONTINUE[kind]
        self.altered = True
        return (
            pb.ProcessingResponse(**{kind: pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))}),
        )

    async def _body(self, d: Direction, kind: str, msg: pb.HttpBody, req: pb.ProcessingRequest) -> Responses:
        chunk: bytes = msg.body
        mode = d.mode
        # BUFFERED sends the whole body in one message, even when trailers follow.
        end = msg.end_of_stream or mode == BUFFERED
        d.body_seen = True
        d.bytes_in += len(chunk)
        chain = self._active()
        out: bytes | AsyncIterator[bytes] = chunk
        if chain is not None and chain.plan.touches_body(d.name):
            out = await chain.body(d.name, chunk, end)
        if end:
            d.ended = True
        if not isinstance(out, bytes):  # a plugin answered with a stream of pieces
            self.altered = True
            if mode == FULL_DUPLEX:
                return self._streamed_from(kind, req, out, end, d)
            # The other modes answer a chunk with one message.
            joined = await _join(out, self.router.max_answer_bytes)
            if joined is None:
                return self._too_large(d)
            out = joined
        elif mode != FULL_DUPLEX and len(out) > self.router.max_answer_bytes:
            return self._too_large(d)
        d.bytes_out += len(out)
        self.held = len(chunk) + (len(out) if out is not chunk or mode == FULL_DUPLEX else 0)
        if mode == FULL_DUPLEX:
            if out is not chunk:
                self.altered = True
            if len(out) > MAX_STREAMED_CHUNK:
                return streamed_pieces(kind, out, end)
            if not out and not end:
                return NOTHING
            return (streamed(kind, out, end),)
        if out is chunk:
            return CONTINUE[kind]
        self.altered = True
        response = pb.ProcessingResponse()
        common = getattr(response, kind).response  # built in place, see _streamed
        if out:
            common.body_mutation.body = out
        else:
            common.body_mutation.clear_body = True
        if mode == BUFFERED and len(out) != len(chunk):
            common.header_mutation.CopyFrom(header_mutation(Headers(), {"content-length": str(len(out))}))
        return (response,)

    async def _trailers(self, d: Direction, kind: str, trailer_map: base_pb2.HeaderMap) -> Answers:
        chain = self._active()
        out: list[pb.ProcessingResponse] = []
        if not d.ended:
            # Trailers end the body: flush what the plugins hold back.
            d.ended = True
            tail = b""
            if chain is not None and chain.plan.touches_body(d.name):
                flushed = await chain.body(d.name, b"", True)
                if isinstance(flushed, bytes):
                    tail = flushed
                else:
                    fits = self.router.max_answer_bytes if d.mode != FULL_DUPLEX else UNLIMITED  # FD splits it
                    joined = await _join(flushed, fits)
                    if joined is None:
                        return self._too_large(d)
                    tail = joined
                d.bytes_out += len(tail)
            if d.mode == FULL_DUPLEX:
                if tail:
                    self.altered = True
                    out.extend(streamed_pieces(f"{d.name}_body", tail, False))
            elif tail:
                raise PluginError(
                    "(host)",
                    f"{d.name} trailers",
                    RuntimeError(
                        f"plugins flushed {len(tail)} bytes after the last {MODE_NAMES.get(d.mode)} chunk; "
                        "use FULL_DUPLEX_STREAMED for bodies with trailers"
                    ),
                )
        hook = "on_request_trailers" if d is self.request else "on_response_trailers"
        mutation = None
        if chain is not None and chain.plan.touches(hook):
            trailers = Headers(header_items(trailer_map))
            await chain.headers(hook, trailers)
            mutation = header_mutation(trailers)
        if mutation is None:
            out.extend(CONTINUE[kind])
        else:
            self.altered = True
            out.append(pb.ProcessingResponse(**{kind: pb.TrailersResponse(header_mutation=mutation)}))
        return out

    async def _streamed_from(
        self, kind: str, req: pb.ProcessingRequest, pieces: AsyncIterator[bytes], end: bool, d: Direction
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Full-duplex answers for a stream of pieces, sent as they come (bounded memory)."""
        try:
            async for piece in pieces:
                d.bytes_out += len(piece)
                self.held = len(piece)
                for response in streamed_pieces(kind, piece, False):
                    yield response
        except PluginError as exc:
            answer = await self._plugin_failed(kind, req, exc)
            if isinstance(answer, (tuple, list)):
                for response in answer:
                    yield response
            else:
                async for response in answer:
                    yield response
            return
        if end:
            yield streamed(kind, b"", True)

    def _too_large(self, d: Direction) -> Answers:
        """Fail the stream: the chain's output for one STREAMED or BUFFERED message does not fit
        in one gRPC message. A 413 local reply while the response has not started (the client
        sees why), else a gRPC error (Envoy resets the exchange)."""
        limit = self.router.max_message_bytes
        mode = MODE_NAMES.get(d.mode, "?")
        exc = AnswerTooLarge(
            "max_message_bytes",
            f"stream {self.stream_id} route {self.route_name}: the chain's output for one {mode} {d.name} body "
            f"message is over {self.router.max_answer_bytes} bytes, more than one gRPC message may carry "
            f"([server] max_message_bytes = {limit}); FULL_DUPLEX_STREAMED sends any output in pieces",
        )
        log.warning("%s", exc)
        self.error = exc
        if not self.response.body_seen:
            self.finished = True
            reject = Reject(413, f"body too large: {d.name} body output exceeds the host's message limit\n")
            return (immediate_response(reject),)
        raise exc

    def _log_failure(self, exc: PluginError) -> None:
        log.error(
            "stream %s route %s: %s (policy %s)",
            self.stream_id,
            self.route_name,
            exc,
            self.plan.route.failure_policy if self.plan else "?",
            exc_info=exc.error,
        )

    async def _plugin_failed(self, kind: str | None, req: pb.ProcessingRequest, exc: PluginError) -> Responses:
        if isinstance(exc.error, Reject) and not self.response.body_seen:
            self.error = exc.error
            self.finished = True
            return (immediate_response(exc.error),)
        self._log_failure(exc)
        self.error = exc
        if self.plan is not None and self.plan.route.failure_policy == "fail_open" and not self.altered:
            # Nothing the chain made has reached Envoy yet: let the rest through untouched.
            self.bypass = True
            await self.close_plugins(exc)
            return await self._dispatch(kind, req)
        raise StreamFailed(str(exc)) from exc

    def incomplete(self) -> str | None:
        """Which body was cut short, if any."""
        for d in (self.request, self.response):
            if (d.body_expected or d.body_seen) and not d.ended:
                return f"the {d.name} body ended before it was complete"
        return None

    async def close_plugins(self, error: BaseException | None) -> None:
        """Close every plugin exactly once (safe to call again)."""
        if self.chain is None:
            return

        def report(plugin: str, close_error: BaseException) -> None:
            if self.router.metrics is not None:
                self.router.metrics.plugin_failed(plugin)
            log.error(
                "stream %s route %s: plugin '%s' failed in close: %s",
                self.stream_id,
                self.route_name,
                plugin,
                close_error,
                exc_info=close_error,
            )

        await self.chain.close(error, report)

    async def finish(self, error: BaseException | None) -> BaseException | None:
        """The gRPC stream is over: decide how it ended and close the plugins. Returns the error."""
        if self.error is not None:  # the plugin error behind a StreamFailed, or a Reject
            error = self.error
        if error is None and not self.finished:
            cut = self.incomplete()
            if cut:
                error = StreamAborted(cut)
        await self.close_plugins(error)
        return error
