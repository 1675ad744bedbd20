"""Run a plugin chain over one HTTP exchange in-process, the way Envoy would, without gRPC.

:class:`PluginRunner` builds the route exactly as the host does (the same settings models,
validation, ext_proc modes and control options), hands real ``ProcessingRequest`` messages
to the host's own :class:`~extproc_host.processor.StreamProcessor` and applies its
``ProcessingResponse`` messages as Envoy does with the Envoy config ``envoy-config`` generates
for the same settings (:mod:`~extproc_host.testing.envoy_model`): header and trailer
mutations under the route's mutation rules, body mutations per body mode, full-duplex
streamed chunks, body replacement, mode overrides, route re-picking, the dynamic metadata
the route receives, local replies (gRPC ones too); it sends the attributes and forwarded
metadata the route asks for, and nothing more. What comes back (:class:`Exchange`) is what
Envoy would forward: the request the upstream sees, the response the client sees.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from pydantic import ValidationError

from ..errors import ConfigError, StreamFailed
from ..modes import RouteModes, ordered_routes
from ..plugin import Plugin
from ..processor import Router, StreamProcessor
from ..protocol import ATTRIBUTES_KEY, BUFFERED, FULL_DUPLEX, MODE_NAMES, NONE, plain_struct
from ..registry import LoadedHost, assemble_host
from ..routes import Route
from ..settings import RouteSettings, ServerSettings, Settings, describe_validation_error, load_settings
from .envoy_model import (
    MutationFailed,
    apply_mutation,
    is_grpc,
    local_reply_headers,
    pick_route,
    request_attributes,
    response_attributes,
)
from .splits import ENVOY_CHUNK, Splitter, chunks_of

#: Body modes by name, as settings spell them.
MODES: dict[str, int] = {name: value for value, name in MODE_NAMES.items()}
#: The body modes a route may ask for.
BodyMode = Literal["NONE", "STREAMED", "BUFFERED", "FULL_DUPLEX_STREAMED"]
#: Headers given as a mapping or as (name, value) pairs.
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]
#: ``buffer_limit_bytes`` the runner sets for a BUFFERED route that sets none.
DEFAULT_BUFFER_LIMIT = 64 * 1024 * 1024

_REPLACE = pb.CommonResponse.CONTINUE_AND_REPLACE
_PM = processing_mode_pb2.ProcessingMode


def _pairs(headers: HeadersLike | None) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    return [(name.lower(), value) for name, value in items]


@dataclass
class HttpMessage:
    """One side of an exchange: headers (pseudo-headers included), body and trailers."""

    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def trailer(self, name: str) -> str | None:
        """The first value of trailer ``name`` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.trailers or () if key == name), None)

    @property
    def status(self) -> int | None:
        """The ``:status`` of a response, as an int."""
        value = self.header(":status")
        return int(value) if value is not None else None

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode()


def request(
    body: bytes | str = b"",
    *,
    method: str = "POST",
    path: str = "/",
    headers: HeadersLike | None = None,
    trailers: HeadersLike | None = None,
    authority: str = "example.com",
) -> HttpMessage:
    """A client's request as Envoy hands it to ext_proc. ``content-length`` is added for a
    body without trailers unless ``headers`` set it (or ``transfer-encoding``)."""
    data = body.encode() if isinstance(body, str) else body
    given = _pairs(headers)
    names = {name for name, _ in given}
    pseudo = [(":method", method), (":path", path), (":authority", authority), (":scheme", "http")]
    if data and trailers is None and not names & {"content-length", "transfer-encoding"}:
        given.append(("content-length", str(len(data))))
    return HttpMessage(pseudo + given, data, _pairs(trailers) if trailers is not None else None)


def response(
    body: bytes | str = b"",
    *,
    status: int = 200,
    headers: HeadersLike | None = None,
    trailers: HeadersLike | None = None,
) -> HttpMessage:
    """An upstream's response as Envoy hands it to ext_proc; ``content-length`` as in :func:`request`."""
    data = body.encode() if isinstance(body, str) else body
    given = _pairs(headers)
    names = {name for name, _ in given}
    if data and trailers is None and not names & {"content-length", "transfer-encoding"}:
        given.append(("content-length", str(len(data))))
    return HttpMessage([(":status", str(status)), *given], data, _pairs(trailers) if trailers is not None else None)


def echo(upstream_request: HttpMessage) -> HttpMessage:
    """The default upstream: answers 200 with the request body it received (like
    ``extproc-host echo``), keeping its ``content-type``."""
    kept = [(k, v) for k, v in upstream_request.headers if k == "content-type"]
    return response(upstream_request.body, headers=kept)


@dataclass(frozen=True)
class LocalReply:
    """A reply Envoy makes itself instead of forwarding: a plugin's ``Reject``
    (``by == "plugin"``), or Envoy refusing a body over ``buffer_limit_bytes`` or an answer
    it cannot apply (``"envoy"``). ``status``, ``body`` and ``headers`` are what was asked for;
    :attr:`Exchange.client` is what the client gets (for a gRPC request, gRPC's form)."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]
    by: Literal["plugin", "envoy"] = "plugin"
    grpc_status: int | None = None
    #: Envoy's %RESPONSE_CODE_DETAILS% for it.
    details: str = ""


@dataclass
class Exchange:
    """What Envoy forwarded for one exchange, and how the plugins' stream ended."""

    #: The request as the upstream received it; None when the exchange ended before the
    #: request was complete (a Reject, a failed stream, Envoy's 413).
    upstream: HttpMessage | None
    #: The response as the client received it (a local reply included).
    client: HttpMessage
    #: Set when Envoy answered the client itself.
    local_reply: LocalReply | None
    #: Set when the ext_proc stream failed (fail_closed plugin error): Envoy answers 500 if
    #: the response had not started, else resets it.
    failed: str | None
    #: What every plugin's ``close`` was given (None: the exchange went well).
    close_error: BaseException | None
    #: The body modes Envoy used.
    request_mode: str
    response_mode: str
    #: Sizes of the chunks each body was sent in (to reproduce a failing split).
    request_chunks: list[int] = field(default_factory=list)
    response_chunks: list[int] = field(default_factory=list)
    #: Every ProcessingResponse the host answered, in order.
    responses: list[pb.ProcessingResponse] = field(default_factory=list)
    #: Envoy's dynamic metadata at the end, by namespace (what an access log prints): what
    #: earlier filters set (``metadata=``) and what the route received from the host.
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The route Envoy forwarded the request on (another one when the chain re-routed), and
    #: its upstream (cluster).
    route: str = "default"
    upstream_cluster: str = "upstream"
    #: The answer timeouts Envoy accepted from ``StreamInfo.extend_timeout``, in seconds.
    timeout_extensions: list[float] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        """Whether a plugin's ``Reject`` answered the client."""
        return self.local_reply is not None and self.local_reply.by == "plugin"


_request = request


class _LocalReplyStop(Exception):
    def __init__(self, reply: LocalReply) -> None:
        self.reply = reply


def _header_map(items: Sequence[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode("utf-8", "surrogateescape")) for k, v in items]
    )


def _modes_of(mode: Any, filter_modes: RouteModes) -> RouteModes:
    """A mode override as Envoy takes it: header and trailer modes left DEFAULT are the
    filter's (``filter_modes``), body modes are what the override says."""

    def send(value: int, default: bool) -> bool:
        return default if value == _PM.DEFAULT else value == _PM.SEND

    return RouteModes(
        request_body=MODE_NAMES[mode.request_body_mode],
        response_body=MODE_NAMES[mode.response_body_mode],
        request_trailers=send(mode.request_trailer_mode, filter_modes.request_trailers),
        response_headers=send(mode.response_header_mode, filter_modes.response_headers),
        response_trailers=send(mode.response_trailer_mode, filter_modes.response_trailers),
        buffer_limit_bytes=filter_modes.buffer_limit_bytes,
    )


class _Envoy:
    """Envoy's half of one ext_proc stream, for one exchange."""

    def __init__(
        self,
        runner: PluginRunner,
        processor: StreamProcessor,
        route: Route,
        attributes: Mapping[str, Any],
        metadata: Mapping[str, Mapping[str, Any]],
    ) -> None:
        self.runner = runner
        self.processor = processor
        self.route = route
        self.routed = route  # where Envoy forwards the request (another route after a re-pick)
        self.modes: RouteModes = route.modes  # a mode override may change them
        self.control = route.control
        self.given = attributes
        self.metadata: dict[str, dict[str, Any]] = {ns: dict(values) for ns, values in metadata.items()}
        self.responses: list[pb.ProcessingResponse] = []
        self.extensions: list[float] = []
        self.first = True
        self.attributes_sent = {"request": False, "response": False}
        self.request_headers: list[tuple[str, str]] = []
        self.response_headers: list[tuple[str, str]] = []

    async def send(self, req: pb.ProcessingRequest, direction: str) -> list[pb.ProcessingResponse]:
        """Send one message as Envoy does (attributes, forwarded metadata); the answers to it,
        with what Envoy takes from them on the way (metadata, mode override, local replies)."""
        req.observability_mode = self.modes.observe  # Envoy sends, and awaits no answer
        if self.first:
            self.first = False
            req.protocol_config.request_body_mode = MODES[self.modes.request_body]
            req.protocol_config.response_body_mode = MODES[self.modes.response_body]
        self._attributes(req, direction)
        for namespace in self.control.forwarding_namespaces:
            if namespace in self.metadata:
                req.metadata_context.filter_metadata[namespace].update(self.metadata[namespace])
        answer = await self.processor.handle(req)
        got = list(answer) if isinstance(answer, (list, tuple)) else [r async for r in answer]
        if req.observability_mode:
            got = []
        self.responses.extend(got)
        answers = []
        extended = False
        for r in got:
            if r.WhichOneof("response") is None and r.HasField("override_message_timeout"):
                seconds = r.override_message_timeout.ToMilliseconds() / 1000
                if not extended and 0.001 <= seconds <= self.control.max_message_timeout:
                    self.extensions.append(seconds)
                    extended = True
                continue
            answers.append(r)
            self._take_metadata(r)
            if r.HasField("mode_override") and req.WhichOneof("request") in ("request_headers", "response_headers"):
                self._override(r.mode_override)
            if r.HasField("immediate_response"):
                raise _LocalReplyStop(self._local_reply(r.immediate_response))
        return answers

    def _attributes(self, req: pb.ProcessingRequest, direction: str) -> None:
        """The route's attributes of ``direction``, with its first message."""
        if self.attributes_sent[direction]:
            return
        self.attributes_sent[direction] = True
        if direction == "request":
            names = self.control.request_attributes
            found = request_attributes(names, self.route, self.request_headers, self.given)
        else:
            found = response_attributes(self.control.response_attributes, self.response_headers, self.given)
        if found:
            attrs = struct_pb2.Struct()
            attrs.update(found)
            req.attributes[ATTRIBUTES_KEY].CopyFrom(attrs)

    def _take_metadata(self, r: pb.ProcessingResponse) -> None:
        """Dynamic metadata of the namespaces the route receives; the rest is dropped."""
        if not r.HasField("dynamic_metadata"):
            return
        for namespace, value in r.dynamic_metadata.fields.items():
            if namespace in self.control.receiving_namespaces and value.HasField("struct_value"):
                self.metadata.setdefault(namespace, {}).update(plain_struct(value.struct_value))

    def _override(self, mode: Any) -> None:
        """A mode override in an answer to a header message: taken when the route allows it
        and it is one of the modes the filter allows (``allowed_override_modes``)."""
        allowed = self.control.override_modes.values()
        wanted = _modes_of(mode, self.route.modes)
        if any(wanted == candidate for candidate in allowed):
            self.modes = wanted

    def _local_reply(self, immediate: pb.ImmediateResponse) -> LocalReply:
        headers = apply_mutation([], immediate.headers, None) if immediate.HasField("headers") else []
        status = immediate.status.code if immediate.HasField("status") and immediate.status.code >= 200 else 200
        grpc_status = immediate.grpc_status.status if immediate.HasField("grpc_status") else None
        return LocalReply(status, immediate.body, headers, "plugin", grpc_status, immediate.details)

    def _apply(self, headers: list[tuple[str, str]], mutation: pb.HeaderMutation, replacing: bool = False) -> Any:
        try:
            return apply_mutation(headers, mutation, self.control.mutation_rules, replacing=replacing)
        except MutationFailed as exc:
            raise _LocalReplyStop(LocalReply(500, b"", [], "envoy", details=exc.details)) from None

    def _repick(self, common: pb.CommonResponse, headers: list[tuple[str, str]]) -> None:
        """Envoy picks the route again after a request answer that changed headers, as the
        route's route_cache_action says."""
        action = self.control.route_cache_action
        if common.HasField("header_mutation") and (
            action == "CLEAR" or (action == "DEFAULT" and common.clear_route_cache)
        ):
            self.routed = pick_route(self.runner.envoy_routes, headers)

    async def direction(self, name: str, message: HttpMessage, split: Splitter) -> tuple[HttpMessage, list[int]]:
        """Send one direction's messages; the message as Envoy forwards it, and its chunk sizes."""
        headers = list(message.headers)
        trailers = list(message.trailers) if message.trailers is not None else None
        body = message.body
        if name == "request":
            self.request_headers = headers
        else:
            self.response_headers = headers
        mode = MODES[getattr(self.modes, f"{name}_body")]
        limit = self.modes.buffer_limit_bytes
        if mode == BUFFERED and limit is not None and len(body) > limit:
            # Envoy buffers the body before ext_proc sees it, and gives up at the limit.
            status = 413 if name == "request" else 500
            text = b"Payload Too Large" if status == 413 else b"Internal Server Error"
            raise _LocalReplyStop(LocalReply(status, text, [("content-type", "text/plain")], by="envoy"))
        if name == "request" or self.modes.response_headers:
            end = not body and trailers is None
            msg = pb.HttpHeaders(headers=_header_map(headers), end_of_stream=end)
            for r in await self.send(pb.ProcessingRequest(**{f"{name}_headers": msg}), name):
                common = getattr(r, f"{name}_headers").response
                if common.status == _REPLACE:
                    # Envoy takes the new body, sends nothing more of this body, forwards the trailers.
                    headers = self._apply(headers, common.header_mutation, replacing=True)
                    headers = [(k, v) for k, v in headers if k != "content-length"]
                    if name == "request":
                        self._repick(common, headers)
                    return HttpMessage(headers, common.body_mutation.body, trailers), []
                headers = self._apply(headers, common.header_mutation)
                if name == "request":
                    self._repick(common, headers)
        mode = MODES[getattr(self.modes, f"{name}_body")]  # after a mode override
        send_trailers = getattr(self.modes, f"{name}_trailers")
        sends_body = mode != NONE and bool(body or trailers is not None)
        if mode != NONE and mode != BUFFERED and sends_body:
            # Envoy streams the body: a length it cannot know in advance goes.
            headers = [(k, v) for k, v in headers if k != "content-length"]
        chunks = [body] if mode == BUFFERED else split(body)
        out: list[bytes] = []
        pending: deque[bytes] = deque()
        kind = f"{name}_body"
        if sends_body and (chunks or mode == BUFFERED or trailers is None):
            if not chunks:
                chunks = [b""]
            for index, chunk in enumerate(chunks):
                last = index == len(chunks) - 1
                msg = pb.HttpBody(body=chunk, end_of_stream=last and trailers is None)
                pending.append(chunk)
                got = await self.send(pb.ProcessingRequest(**{kind: msg}), name)
                headers = self._body_answers(got, kind, mode, pending, out, headers)
        elif not sends_body:
            out.append(body)
        if trailers is not None and send_trailers:
            got = await self.send(
                pb.ProcessingRequest(**{f"{name}_trailers": pb.HttpTrailers(trailers=_header_map(trailers))}), name
            )
            headers = self._body_answers(got, kind, mode, pending, out, headers)
            for r in got:
                if r.HasField(f"{name}_trailers"):
                    trailers = self._apply(trailers, getattr(r, f"{name}_trailers").header_mutation)
        sizes = [len(c) for c in chunks] if sends_body else []
        if self.modes.observe:  # observability mode: what the plugins saw went on unchanged
            return HttpMessage(list(message.headers), body, message.trailers), sizes
        return HttpMessage(headers, b"".join(out), trailers), sizes

    def _body_answers(
        self,
        got: list[pb.ProcessingResponse],
        kind: str,
        mode: int,
        pending: deque[bytes],
        out: list[bytes],
        headers: list[tuple[str, str]],
    ) -> list[tuple[str, str]]:
        """Apply the body answers among ``got``: the bytes Envoy forwards, and (BUFFERED) header changes."""
        for r in got:
            if not r.HasField(kind):
                continue
            common = getattr(r, kind).response
            mutation = common.body_mutation
            if mode == FULL_DUPLEX:
                out.append(mutation.streamed_response.body)
                continue
            chunk = pending.popleft() if pending else b""
            if mode == BUFFERED and common.HasField("header_mutation"):
                headers = self._apply(headers, common.header_mutation)
                if kind == "request_body":
                    self._repick(common, headers)
            if mutation.HasField("body"):
                length = next((v for k, v in headers if k == "content-length"), None)
                if mode == BUFFERED and length is not None and length != str(len(mutation.body)):
                    details = "mismatch between content length and the length of the mutated body"
                    raise _LocalReplyStop(LocalReply(500, b"", [], "envoy", details=details))
                out.append(mutation.body)
            elif not mutation.clear_body:
                out.append(chunk)
        return headers


class PluginRunner:
    """Runs a plugin chain over HTTP exchanges in-process, as the host behind Envoy would.

    ``chain``: plugin classes or names of installed plugins, in route order. ``settings``:
    ``{plugin name: {key: value}}``, the ``[plugins.<name>]`` tables. ``mode``: the body
    mode of both directions (``request_mode``/``response_mode`` for one), else what the
    generated Envoy config would ask for (the chain's needs). ``server``: ``[server]`` keys the
    exchange depends on (``max_message_bytes``). Every other keyword is a ``[routes.<name>]``
    key (``failure_policy``, ``send``, ``buffer_limit_bytes``, ``allow_mode_override``,
    ``mutation_rules``, ``receiving_namespaces``...).

    Use :meth:`from_settings` to run a route of a settings file instead. Exchanges run on a
    private event loop (:meth:`exchange`) or on the caller's (``await`` :meth:`aexchange`).
    """

    def __init__(
        self,
        *chain: type[Plugin] | str,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        mode: BodyMode | None = None,
        request_mode: BodyMode | None = None,
        response_mode: BodyMode | None = None,
        failure_policy: Literal["fail_closed", "fail_open"] = "fail_closed",
        send: Sequence[str] = (),
        buffer_limit_bytes: int | None = None,
        server: Mapping[str, Any] | None = None,
        **route_keys: Any,
    ) -> None:
        if not chain:
            raise ValueError("PluginRunner needs at least one plugin in its chain")
        classes = [p for p in chain if not isinstance(p, str)]
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                raise TypeError(f"{cls!r} is neither a Plugin subclass nor the name of an installed plugin")
        route: dict[str, Any] = {
            "chain": [p if isinstance(p, str) else p.name for p in chain],
            "failure_policy": failure_policy,
            "send": list(send),
            **route_keys,
        }
        if request_mode or response_mode:
            route["body_mode"] = {"request": request_mode or mode, "response": response_mode or mode}
        elif mode is not None:
            route["body_mode"] = mode
        data: dict[str, Any] = {
            "routes": {"default": route},
            "plugins": {k: dict(v) for k, v in (settings or {}).items()},
        }
        if server:  # [server] keys the exchange depends on, e.g. max_message_bytes
            data["server"] = dict(server)
        uses_installed = len(classes) < len(chain)
        try:
            host = _assemble(data, classes, uses_installed, buffer_limit_bytes)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("PluginRunner: key 'routes.default.", "PluginRunner: '")) from None
        self._setup(host, "default")

    @classmethod
    def from_settings(
        cls, settings: str | Path | Mapping[str, Any], route: str = "default", *, plugins: Sequence[type[Plugin]] = ()
    ) -> PluginRunner:
        """A runner for one route of a settings file (or of a dict shaped like one), loaded as
        ``extproc-host serve`` loads it: installed plugins, ``plugin_modules``, the environment;
        ``plugins``: more plugin classes, as if installed. With the whole route table: a chain
        that re-routes ends on the route Envoy would pick (:attr:`Exchange.route`)."""
        if isinstance(settings, Mapping):
            source = "settings"
            try:
                loaded = Settings(**dict(settings))
            except ValidationError as exc:
                raise ConfigError(describe_validation_error(source, exc)) from None
        else:
            source = str(settings)
            loaded = load_settings(settings)
        host = assemble_host(loaded, source, extra=plugins)
        if route not in host.routes:
            raise ConfigError(f"{source}: no route named '{route}'; routes: {', '.join(host.routes)}")
        runner = cls.__new__(cls)
        runner._setup(host, route)
        return runner

    def _setup(self, host: LoadedHost, route: str) -> None:
        self.host = host
        self.route = route
        self.modes: RouteModes = host.modes[route]
        # The server's own message limit, so an answer too large for one gRPC message gets the
        # same 413 (or failed stream) here as behind a real Envoy.
        self.router = Router(
            {route: host.routes[route], "default": host.routes["default"]},
            max_message_bytes=host.settings.server.max_message_bytes,
        )
        #: Envoy's routes in its matching order, for a chain that makes Envoy pick again.
        self.envoy_routes = (
            ordered_routes(host.routes, host.source) if len(host.routes) > 1 else [*host.routes.values()]
        )
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def exchange(
        self,
        request: HttpMessage | None = None,
        response: HttpMessage | Callable[[HttpMessage], HttpMessage] | None = None,
        *,
        splits: Splitter | None = None,
        request_splits: Splitter | None = None,
        response_splits: Splitter | None = None,
        attributes: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
        upstreams: Mapping[str, HttpMessage | Callable[[HttpMessage], HttpMessage]] | None = None,
    ) -> Exchange:
        """Run one exchange; see :meth:`aexchange`. Not from inside a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("PluginRunner.exchange() inside a running event loop: use 'await runner.aexchange(...)'")
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._finalizer = weakref.finalize(self, self._loop.close)
        coro = self.aexchange(
            request,
            response,
            splits=splits,
            request_splits=request_splits,
            response_splits=response_splits,
            attributes=attributes,
            metadata=metadata,
            upstreams=upstreams,
        )
        return self._loop.run_until_complete(coro)

    async def aexchange(
        self,
        request: HttpMessage | None = None,
        response: HttpMessage | Callable[[HttpMessage], HttpMessage] | None = None,
        *,
        splits: Splitter | None = None,
        request_splits: Splitter | None = None,
        response_splits: Splitter | None = None,
        attributes: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
        upstreams: Mapping[str, HttpMessage | Callable[[HttpMessage], HttpMessage]] | None = None,
    ) -> Exchange:
        """Run one exchange: ``request`` (default: an empty POST /) goes through the chain to
        the upstream, whose answer (``response``, a function of the request it received, or
        by default :func:`echo`) comes back through the chain to the client.

        Bodies are cut into chunks by ``splits`` (``request_splits``/``response_splits`` for
        one direction; default: Envoy's 1 MiB chunks). BUFFERED bodies go whole.

        What Envoy knows that a request does not say: ``attributes``, Envoy attribute values
        (``{"source.address": "203.0.113.9:5555"}``; the kit's defaults are a client on
        127.0.0.1), of which the plugins get only those the route asks for; ``metadata``,
        dynamic metadata earlier Envoy filters set (``{"envoy.filters.http.jwt_authn":
        {...}}``), of which they get only the namespaces the route forwards. ``upstreams``:
        the answer of each upstream (cluster) by name, for a chain that re-routes (``response``
        is the default for the rest).
        """
        req = request if request is not None else _request()
        default = splits or chunks_of(ENVOY_CHUNK)
        modes = self.modes
        route = self.host.routes[self.route]
        processor = StreamProcessor(self.router, str(next(self._ids)))
        envoy = _Envoy(self, processor, route, attributes or {}, metadata or {})
        upstream: HttpMessage | None = None
        client: HttpMessage
        reply: LocalReply | None = None
        failed: str | None = None
        error: BaseException | None = None
        sizes: dict[str, list[int]] = {"request": [], "response": []}

        def answer_of(sent: HttpMessage, cluster: str) -> HttpMessage:
            found = (upstreams or {}).get(cluster, response)
            return found(sent) if callable(found) else (found or echo(sent))

        if modes.disabled:  # ext_proc is off on this route: Envoy forwards everything as is
            return Exchange(
                req,
                answer_of(req, route.upstream),
                None,
                None,
                None,
                "NONE",
                "NONE",
                route=route.name,
                upstream_cluster=route.upstream,
                metadata=envoy.metadata,
            )
        try:
            sent, sizes["request"] = await envoy.direction("request", req, request_splits or default)
            upstream = sent
            answer = answer_of(sent, envoy.routed.upstream)
            client, sizes["response"] = await envoy.direction("response", answer, response_splits or default)
        except _LocalReplyStop as stop:  # upstream stays None when the request never completed
            reply = stop.reply
            reply_headers, reply_body = local_reply_headers(
                reply.status, reply.body, reply.headers, reply.grpc_status, is_grpc(req.headers)
            )
            client = HttpMessage(reply_headers, reply_body)
        except StreamFailed as exc:
            failed = str(exc)
            error = exc
            client = HttpMessage([(":status", "500")], b"")
        close_error = await processor.finish(error)
        pm = self.host.pm
        if processor.plan is not None and pm.hook.stream_finished.get_hookimpls():
            pm.hook.stream_finished(stream=processor.stream_info(), error=close_error)
        return Exchange(
            upstream,
            client,
            reply,
            failed,
            close_error,
            modes.request_body,
            modes.response_body,
            sizes["request"],
            sizes["response"],
            envoy.responses,
            envoy.metadata,
            envoy.routed.name,
            envoy.routed.upstream,
            envoy.extensions,
        )

    def close(self) -> None:
        """Close the private event loop (also done when the runner is garbage-collected)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> PluginRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _assemble(
    data: dict[str, Any], classes: list[type[Plugin]], uses_installed: bool, buffer_limit: int | None
) -> LoadedHost:
    """The route of a PluginRunner, built and checked as the host builds a settings file's."""
    route = data["routes"]["default"]
    if buffer_limit is not None:
        route["buffer_limit_bytes"] = buffer_limit
    settings = Settings.model_construct(**_validated(data))
    try:
        return assemble_host(settings, "PluginRunner", extra=classes, load_entry_points=uses_installed)
    except ConfigError as exc:
        if buffer_limit is not None or "buffer_limit_bytes': required" not in str(exc):
            raise
    # A BUFFERED body and no limit: take a generous one rather than make every test set it.
    route["buffer_limit_bytes"] = DEFAULT_BUFFER_LIMIT
    settings = Settings.model_construct(**_validated(data))
    return assemble_host(settings, "PluginRunner", extra=classes, load_entry_points=uses_installed)


def _validated(data: dict[str, Any]) -> dict[str, Any]:
    """Routes validated with the settings models, without reading the environment."""
    routes = {}
    for name, route in data["routes"].items():
        try:
            routes[name] = RouteSettings.model_validate(route)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error("PluginRunner", exc, ("routes", name))) from None
    try:
        server = ServerSettings.model_validate(data.get("server", {}))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error("PluginRunner", exc, ("server",))) from None
    return {"server": server, "routes": routes, "plugins": data["plugins"]}


__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "Exchange",
    "HttpMessage",
    "LocalReply",
    "PluginRunner",
    "echo",
    "request",
    "response",
]
