"""One ext_proc stream: Envoy's ProcessingRequests in, ProcessingResponses out, per body mode.

- FULL_DUPLEX_STREAMED: body chunks are answered M:N with ``streamed_response`` chunks; a chunk
  the chain swallows is not answered at all; ``end_of_stream`` is sent exactly once.
- STREAMED (and BUFFERED_PARTIAL): every chunk gets exactly one BodyResponse.
- BUFFERED: the one body message is answered with the whole new body, and ``content-length``
  is set when the size changed.
- Headers and trailers: one answer each, carrying the plugins' changes; a header answer may
  also replace the body that follows (CONTINUE_AND_REPLACE), tell Envoy to skip bodies the
  chain no longer needs (``mode_override``, where the route allows it) and, on a route whose
  chain re-routes, ask Envoy to pick the route again (``clear_route_cache``).
- Besides: Envoy's attributes and forwarded dynamic metadata go into the stream's
  :class:`~extproc_host.plugin.StreamInfo` from every message that carries them; metadata the
  plugins set goes out with the next answer; a plugin's request for more time goes out at
  once (``override_message_timeout``, on routes with a ``max_message_timeout``).

STREAMED and BUFFERED answer a message with one message, so the chain's output for it must fit
in one gRPC message (``[server] max_message_bytes``): a larger output fails the stream with
:class:`~extproc_host.errors.AnswerTooLarge` (a 413 local reply while the response has not
started) instead of reaching gRPC, which would refuse to send it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .chain import Chain, ChainPlan
from .errors import AnswerTooLarge, PluginError, ProtocolError, StreamAborted, StreamFailed
from .plugin import Headers, Plugin, Reject, StreamInfo
from .protocol import (
    BUFFERED,
    CONTINUE,
    FULL_DUPLEX,
    MAX_STREAMED_CHUNK,
    MODE_NAMES,
    NONE,
    NOTHING,
    attributes_of,
    duration,
    header_items,
    header_mutation,
    immediate_response,
    metadata_of,
    metadata_struct,
    processing_mode,
    replacing,
    request_path,
    route_attribute,
    streamed,
    streamed_pieces,
)
from .routes import Route, RouteControl, Skips
from .tracing import trace_carrier

if TYPE_CHECKING:
    from .metrics import HookTimer, Metrics
    from .tracing import StreamTrace, Tracing

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


def request_trace_context(req: pb.ProcessingRequest | None) -> dict[str, str]:
    """The W3C trace context (``traceparent``) the request headers in ``req`` carry; empty
    when ``req`` is not a request headers message."""
    if req is None or not req.HasField("request_headers"):
        return {}
    return trace_carrier(header_items(req.request_headers.headers))


class Router:
    """Picks a route's chain plan: by Envoy route name, else by path prefix, else ``default``.

    With ``metrics``, every plugin hook the routes use is timed (``hook_timers``).
    ``max_message_bytes``: the largest gRPC message the server sends (0: no limit); the body of
    a STREAMED or BUFFERED answer may take all of it but ``ANSWER_OVERHEAD``.
    """

    def __init__(
        self,
        routes: dict[str, Route],
        metrics: Metrics | None = None,
        max_message_bytes: int = 0,
        tracing: Tracing | None = None,
    ) -> None:
        self.metrics = metrics
        self.tracing = tracing  # a span per stream and per hook call when set
        self.max_message_bytes = max_message_bytes
        self.max_answer_bytes = max_message_bytes - ANSWER_OVERHEAD if max_message_bytes else UNLIMITED
        self.hook_timers: dict[tuple[str, str], HookTimer] | None = (
            metrics.bind(routes.values()) if metrics is not None else None
        )
        self.plans = {name: ChainPlan.for_route(route) for name, route in routes.items()}
        self.default = self.plans["default"]
        # Envoy's order: longest prefix first, then the most match_headers (modes.ordered_routes).
        self.matching = sorted(
            (self.plans[name] for name, route in routes.items() if route.path_prefix or route.match_headers),
            key=lambda plan: (-len(plan.route.path_prefix or "/"), -len(plan.route.match_headers)),
        )
        self.match_headers = any(route.match_headers for route in routes.values())

    def select(self, route_name: str | None, path: str | None, headers: dict[str, str] | None = None) -> ChainPlan:
        if route_name:
            plan = self.plans.get(route_name)
            if plan is not None:
                return plan
        if path is not None:
            for plan in self.matching:
                if plan.route.matches(path, headers or {}):
                    return plan
        return self.default

    def plan_for(self, req: pb.ProcessingRequest) -> ChainPlan:
        """The plan for a stream, from its first request (route attribute, else Envoy's match:
        ``:path`` and ``match_headers``)."""
        route_name = route_attribute(req)
        plan = self.plans.get(route_name) if route_name else None
        if plan is None:
            if not self.matching:
                return self.default
            headers = None
            if self.match_headers and req.HasField("request_headers"):
                headers = dict(reversed(header_items(req.request_headers.headers)))  # the first value wins
            plan = self.select(None, request_path(req), headers)
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
    skipped: bool = False  # a mode override told Envoy not to send this body
    replacement: bytes | None = None  # FULL_DUPLEX_STREAMED: the body a header hook replaced this one with


#: What a route without control options exchanges: nothing besides the messages.
NO_CONTROL = RouteControl()


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
    control: RouteControl = NO_CONTROL  # the route's
    forwards: bool = False  # the route forwards dynamic metadata: read it from every message
    extends: bool = False  # plugins may ask for more time: answers go through _answer_extended
    pending_metadata: dict[str, dict[str, Any]] | None = None  # for the next answer
    skips: Skips = (False, False)  # the bodies a mode override sent so far skips
    skip_changed: bool = False  # a plugin skipped a body since the last header answer
    early: asyncio.Queue[pb.ProcessingResponse] | None = None  # override_message_timeout to send now
    trace_context: dict[str, str] | None = None  # the ext_proc call's traceparent (when tracing)
    trace: StreamTrace | None = None  # the stream's span (when tracing)

    @property
    def route_name(self) -> str:
        return self.plan.route.name if self.plan else "?"

    async def handle(self, req: pb.ProcessingRequest) -> Responses:
        """The responses for one request: none, one, several, or (full-duplex output too large
        to hold at once, or a route where plugins may ask for more time) an async iterator of them."""
        self.messages += 1
        self.held = 0
        if self.plan is None:
            self._start(req)
        elif self.info is not None:
            if req.attributes:  # the response attributes come with the first response message
                self.info.attributes.update(attributes_of(req))
            if self.forwards:
                self.info.metadata.update(metadata_of(req))
        kind = req.WhichOneof("request")
        self._check_order(kind)
        if self.extends and not req.observability_mode:
            return self._answer_extended(kind, req)
        # _answer's body, inline: one coroutine less per message on the hot path.
        try:
            answers = await self._dispatch(kind, req)
        except PluginError as exc:
            answers = await self._plugin_failed(kind, req, exc)
        if self.pending_metadata:
            answers = self._with_metadata(kind, answers)
        return answers

    async def _answer(self, kind: str | None, req: pb.ProcessingRequest) -> Responses:
        """The answers to ``req`` (what ``handle`` does inline)."""
        try:
            answers = await self._dispatch(kind, req)
        except PluginError as exc:
            answers = await self._plugin_failed(kind, req, exc)
        if self.pending_metadata:
            answers = self._with_metadata(kind, answers)
        return answers

    async def _answer_extended(
        self, kind: str | None, req: pb.ProcessingRequest
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """The answers to ``req``, after any ``override_message_timeout`` a plugin asks for
        while the chain works on it (sent at once, so Envoy waits longer)."""
        early: asyncio.Queue[pb.ProcessingResponse] = asyncio.Queue()
        self.early = early
        work = asyncio.ensure_future(self._answer(kind, req))
        try:
            while not work.done():
                waiting = asyncio.ensure_future(early.get())
                await asyncio.wait((work, waiting), return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield waiting.result()
                else:
                    waiting.cancel()
            while not early.empty():
                yield early.get_nowait()
            answers = work.result()
        finally:
            self.early = None
            if not work.done():
                work.cancel()
        if isinstance(answers, (tuple, list)):
            for answer in answers:
                yield answer
        else:
            async for answer in answers:
                yield answer

    def _with_metadata(self, kind: str | None, answers: Responses) -> Responses:
        """``answers`` with the pending dynamic metadata on the first one (kept for the next
        answer when there is none)."""
        if isinstance(answers, (tuple, list)):
            if not answers:
                return answers
            first = answers[0]
            if kind is not None and first is CONTINUE[kind][0]:  # shared: answer with a fresh one
                first = pb.ProcessingResponse()
                getattr(first, kind).SetInParent()
            first.dynamic_metadata.CopyFrom(metadata_struct(self.pending_metadata or {}))
            self.pending_metadata = None
            return (first, *answers[1:])
        return self._stream_with_metadata(answers)

    async def _stream_with_metadata(
        self, answers: AsyncIterator[pb.ProcessingResponse]
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for answer in answers:
            if self.pending_metadata:
                answer.dynamic_metadata.CopyFrom(metadata_struct(self.pending_metadata))
                self.pending_metadata = None
            yield answer

    # -- what plugins ask of the host (StreamControl) -----------------------------------

    def skip_body(self, plugin: Plugin, direction: str) -> None:
        """``plugin`` needs no more of this exchange's ``direction`` body."""
        if self.chain is not None:
            self.chain.skip(plugin, direction)
            self.skip_changed = True

    def set_metadata(self, namespace: str, values: dict[str, Any]) -> None:
        """Send ``values`` under ``namespace`` with the next answer; ValueError when the route
        does not receive that namespace (Envoy would drop it)."""
        if namespace not in self.control.receiving_namespaces:
            route = self.route_name
            raise ValueError(
                f"route '{route}' does not receive dynamic metadata namespace '{namespace}' (Envoy would drop "
                f"it): declare it in the plugin's Needs(writes_metadata=...) or add it to "
                f"routes.{route}.receiving_namespaces"
            )
        if self.pending_metadata is None:
            self.pending_metadata = {}
        self.pending_metadata.setdefault(namespace, {}).update(values)

    def extend_timeout(self, seconds: float) -> None:
        """Ask Envoy, now, to wait up to ``seconds`` for the answer being worked on."""
        limit = self.control.max_message_timeout
        if not 0.001 <= seconds <= limit:
            route = self.route_name
            raise ValueError(
                f"extend_timeout({seconds:g}): route '{route}' lets plugins ask for 0.001 to {limit:g} s "
                f"(routes.{route}.max_message_timeout); Envoy ignores anything else"
            )
        if self.early is not None:
            self.early.put_nowait(pb.ProcessingResponse(override_message_timeout=duration(seconds)))

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
                attributes=attributes_of(first) if first is not None and first.attributes else {},
                metadata=metadata_of(first) if first is not None and self.forwards else {},
                control=self,
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
        self.control = control = plan.route.control
        self.forwards = bool(control.forwarding_namespaces)
        if plan.has_any_hook:  # a chain that does nothing needs no StreamInfo and no instances
            self.extends = control.max_message_timeout > 0
            try:
                self.chain = Chain(plan, self.stream_info(req), self.router.hook_timers, self._trace(req))
            except PluginError as exc:
                self._log_failure(exc)
                self.error = exc
                self.bypass = True  # nothing to close: no plugin was fully built
                if self.plan.route.failure_policy != "fail_open":
                    raise StreamFailed(str(exc)) from exc
        elif self.router.tracing is not None:  # no hook to trace, but the stream has its span
            self._trace(req)

    def _trace(self, req: pb.ProcessingRequest) -> StreamTrace | None:
        """The stream's span when tracing: in the trace of Envoy's call (its metadata), else of
        the request (its headers)."""
        tracing = self.router.tracing
        if tracing is None:
            return None
        carrier = self.trace_context or request_trace_context(req)
        self.trace = tracing.stream(
            self.route_name,
            self.stream_id,
            carrier,
            {
                "extproc.request_body_mode": MODE_NAMES.get(self.request.mode, "NONE"),
                "extproc.response_body_mode": MODE_NAMES.get(self.response.mode, "NONE"),
            },
        )
        return self.trace

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
        d.body_expected = not msg.end_of_stream and d.mode != NONE and not d.skipped
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
        replaced = await chain.headers(hook, headers) if chain.plan.touches(hook) else None
        mutation = header_mutation(headers)
        override = self._mode_override() if self.skip_changed else None
        if replaced is not None:
            return await self._replace(d, kind, msg, mutation, override, replaced)
        if mutation is None and override is None:
            return CONTINUE[kind]
        response = pb.ProcessingResponse()
        common = getattr(response, kind).response  # built in place, see protocol.streamed
        getattr(response, kind).SetInParent()
        if mutation is not None:
            self.altered = True
            common.header_mutation.CopyFrom(mutation)
            headers.clear_changes()  # a BUFFERED body answer carries what changes after this
            if self.control.reroutes and d is self.request:
                common.clear_route_cache = True
        if override is not None:
            response.mode_override.CopyFrom(override)
        return (response,)

    def _mode_override(self) -> Any:
        """The ProcessingMode that skips the bodies every plugin with hooks for them skipped,
        when the route allows that override; None when nothing changes."""
        self.skip_changed = False
        chain = self.chain
        if chain is None or not self.control.override_modes:
            return None
        plan = chain.plan
        wanted = (
            self.skips[0] or (plan.touches_body("request") and not chain.stages["request"]),
            self.skips[1] or (plan.touches_body("response") and not chain.stages["response"]),
        )
        choices = self.control.override_modes
        for skips in (wanted, (wanted[0], self.skips[1]), (self.skips[0], wanted[1])):
            if skips != self.skips and skips in choices:
                self.skips = skips
                self.request.skipped, self.response.skipped = skips
                if skips[0] and not self.request.body_seen:
                    self.request.body_expected = False
                return processing_mode(choices[skips])
        return None

    async def _replace(
        self, d: Direction, kind: str, msg: pb.HttpHeaders, mutation: Any, override: Any, replaced: tuple[int, bytes]
    ) -> Answers:
        """Answer a header message whose hook returned a new body: CONTINUE_AND_REPLACE, Envoy
        then sends nothing more of that body. Envoy refuses it once it streams the body in
        FULL_DUPLEX_STREAMED: there the body that comes is dropped and the new one sent at its end."""
        assert self.chain is not None
        body = await self.chain.replacement(d.name, *replaced)
        self.altered = True
        if d.mode == FULL_DUPLEX and not msg.end_of_stream:
            d.replacement = body
            response = pb.ProcessingResponse()
            getattr(response, kind).SetInParent()
            if mutation is not None:
                getattr(response, kind).response.header_mutation.CopyFrom(mutation)
        else:
            if len(body) > self.router.max_answer_bytes:
                return self._too_large(d)
            d.ended = True
            d.body_expected = False
            d.bytes_out += len(body)
            response = replacing(kind, body, mutation)
        if mutation is not None and self.control.reroutes and d is self.request:
            getattr(response, kind).response.clear_route_cache = True
        if override is not None:
            response.mode_override.CopyFrom(override)
        return (response,)

    async def _body(self, d: Direction, kind: str, msg: pb.HttpBody, req: pb.ProcessingRequest) -> Responses:
        chunk: bytes = msg.body
        mode = d.mode
        # BUFFERED sends the whole body in one message, even when trailers follow.
        end = msg.end_of_stream or mode == BUFFERED
        d.body_seen = True
        d.bytes_in += len(chunk)
        if d.replacement is not None:  # FULL_DUPLEX_STREAMED: the new body goes at the end
            if end:
                d.ended = True
            return self._replacement_at(kind, d, end)
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
        headers = None
        if mode == BUFFERED and chain is not None:  # Envoy holds the headers for this answer
            headers = chain.info.request_headers if d is self.request else chain.info.response_headers
        if out is chunk and not (headers is not None and headers.changed):
            return CONTINUE[kind]
        self.altered = True
        response = pb.ProcessingResponse()
        common = getattr(response, kind).response  # built in place, see _streamed
        getattr(response, kind).SetInParent()
        if out is not chunk:
            if out:
                common.body_mutation.body = out
            else:
                common.body_mutation.clear_body = True
        if mode == BUFFERED:
            size = {"content-length": str(len(out))} if len(out) != len(chunk) else None
            mutation = header_mutation(headers if headers is not None else Headers(), size)
            if mutation is not None:
                common.header_mutation.CopyFrom(mutation)
                if headers is not None:
                    headers.clear_changes()
        return (response,)

    def _replacement_at(self, kind: str, d: Direction, end: bool) -> Answers:
        """A FULL_DUPLEX_STREAMED chunk of a body a header hook replaced: dropped; at the end
        of the body, the new body goes in its place."""
        if not end:
            return NOTHING
        body, d.replacement = d.replacement or b"", None
        d.bytes_out += len(body)
        if len(body) > MAX_STREAMED_CHUNK:
            return streamed_pieces(kind, body, True)
        return (streamed(kind, body, True),)

    async def _trailers(self, d: Direction, kind: str, trailer_map: base_pb2.HeaderMap) -> Answers:
        chain = self._active()
        out: list[pb.ProcessingResponse] = []
        if not d.ended:
            # Trailers end the body: flush what the plugins hold back.
            d.ended = True
            tail = b""
            if d.replacement is not None:
                tail, d.replacement = d.replacement, None
            elif chain is not None and chain.plan.touches_body(d.name):
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
            returned = await chain.headers(hook, trailers)
            if returned is not None:
                error = TypeError("returned bytes: a trailers hook returns nothing (it changes the trailers in place)")
                raise PluginError(chain.plugins[returned[0]].name, hook, error)
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
        if self.trace is not None:
            self.trace.end(
                error,
                {
                    "extproc.request_body_bytes": self.request.bytes_in,
                    "extproc.response_body_bytes": self.response.bytes_in,
                },
            )
        return error
