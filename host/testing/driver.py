"""Run a plugin chain over one HTTP exchange in-process, the way Envoy would, without gRPC.

:class:`PluginRunner` builds the route exactly as the host does (the same settings models,
validation and ext_proc modes), hands real ``ProcessingRequest`` messages to the host's own
:class:`~extproc_host.processor.StreamProcessor` and applies its ``ProcessingResponse``
messages as Envoy does: header and trailer mutations, body mutations per body mode,
full-duplex streamed chunks, local replies. What comes back (:class:`Exchange`) is what
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
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from pydantic import ValidationError

from ..errors import ConfigError, StreamFailed
from ..modes import RouteModes
from ..plugin import Plugin
from ..processor import Router, StreamProcessor
from ..protocol import ATTRIBUTES_KEY, BUFFERED, FULL_DUPLEX, MODE_NAMES, NONE, ROUTE_ATTRIBUTE
from ..registry import LoadedHost, assemble_host
from ..settings import RouteSettings, ServerSettings, Settings, describe_validation_error, load_settings
from .splits import ENVOY_CHUNK, Splitter, chunks_of

#: Body modes by name, as settings spell them.
MODES: dict[str, int] = {name: value for value, name in MODE_NAMES.items()}
#: The body modes a route may ask for.
BodyMode = Literal["NONE", "STREAMED", "BUFFERED", "FULL_DUPLEX_STREAMED"]
#: Headers given as a mapping or as (name, value) pairs.
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]
#: ``buffer_limit_bytes`` the runner sets for a BUFFERED route that sets none.
DEFAULT_BUFFER_LIMIT = 64 * 1024 * 1024

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


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
    (``by == "plugin"``), or Envoy refusing a body over ``buffer_limit_bytes`` (``"envoy"``)."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]
    by: Literal["plugin", "envoy"] = "plugin"


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

    @property
    def rejected(self) -> bool:
        """Whether a plugin's ``Reject`` answered the client."""
        return self.local_reply is not None and self.local_reply.by == "plugin"


_request = request


class _LocalReplyStop(Exception):
    def __init__(self, reply: LocalReply) -> None:
        self.reply = reply


def _apply_mutation(headers: list[tuple[str, str]], mutation: pb.HeaderMutation) -> list[tuple[str, str]]:
    """``headers`` after a HeaderMutation, as Envoy applies it (removals, then sets and appends)."""
    removed = set(mutation.remove_headers)
    out = [(k, v) for k, v in headers if k not in removed]
    for option in mutation.set_headers:
        name = option.header.key.lower()
        raw = option.header.raw_value
        value = raw.decode("utf-8", "surrogateescape") if raw else option.header.value
        if option.append_action == _OVERWRITE:
            out = [(k, v) for k, v in out if k != name]
        out.append((name, value))
    return out


def _header_map(items: Sequence[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode("utf-8", "surrogateescape")) for k, v in items]
    )


class _Envoy:
    """Envoy's half of one ext_proc stream, for one exchange."""

    def __init__(self, runner: PluginRunner, processor: StreamProcessor, modes: RouteModes) -> None:
        self.runner = runner
        self.processor = processor
        self.modes = modes
        self.responses: list[pb.ProcessingResponse] = []
        self.first = True

    async def send(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        req.observability_mode = self.modes.observe  # Envoy sends, and awaits no answer
        if self.first:
            self.first = False
            req.protocol_config.request_body_mode = MODES[self.modes.request_body]
            req.protocol_config.response_body_mode = MODES[self.modes.response_body]
            attrs = struct_pb2.Struct()
            attrs.update({ROUTE_ATTRIBUTE: self.runner.route})
            req.attributes[ATTRIBUTES_KEY].CopyFrom(attrs)
        answer = await self.processor.handle(req)
        got = list(answer) if isinstance(answer, (list, tuple)) else [r async for r in answer]
        if req.observability_mode:
            got = []
        self.responses.extend(got)
        for r in got:
            if r.HasField("immediate_response"):
                ir = r.immediate_response
                reply_headers = _apply_mutation([], ir.headers)
                raise _LocalReplyStop(LocalReply(ir.status.code, ir.body, reply_headers))
        return got

    async def direction(
        self, name: str, message: HttpMessage, mode_name: str, send_headers: bool, send_trailers: bool, split: Splitter
    ) -> tuple[HttpMessage, list[int]]:
        """Send one direction's messages; the message as Envoy forwards it, and its chunk sizes."""
        mode = MODES[mode_name]
        headers = list(message.headers)
        trailers = list(message.trailers) if message.trailers is not None else None
        body = message.body
        sends_body = mode != NONE and bool(body or trailers is not None)
        limit = self.modes.buffer_limit_bytes
        if mode == BUFFERED and limit is not None and len(body) > limit:
            # Envoy buffers the body before ext_proc sees it, and gives up at the limit.
            status = 413 if name == "request" else 500
            text = b"Payload Too Large" if status == 413 else b"Internal Server Error"
            raise _LocalReplyStop(LocalReply(status, text, [("content-type", "text/plain")], by="envoy"))
        if send_headers:
            end = not body and trailers is None
            msg = pb.HttpHeaders(headers=_header_map(headers), end_of_stream=end)
            for r in await self.send(pb.ProcessingRequest(**{f"{name}_headers": msg})):
                mutation = getattr(r, f"{name}_headers").response.header_mutation
                headers = _apply_mutation(headers, mutation)
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
                got = await self.send(pb.ProcessingRequest(**{kind: msg}))
                headers = self._body_answers(got, kind, mode, pending, out, headers)
        elif not sends_body:
            out.append(body)
        if trailers is not None and send_trailers:
            got = await self.send(
                pb.ProcessingRequest(**{f"{name}_trailers": pb.HttpTrailers(trailers=_header_map(trailers))})
            )
            headers = self._body_answers(got, kind, mode, pending, out, headers)
            for r in got:
                if r.HasField(f"{name}_trailers"):
                    trailers = _apply_mutation(trailers, getattr(r, f"{name}_trailers").header_mutation)
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
            if mutation.HasField("body"):
                out.append(mutation.body)
            elif not mutation.clear_body:
                out.append(chunk)
            if mode == BUFFERED and common.HasField("header_mutation"):
                headers = _apply_mutation(headers, common.header_mutation)
        return headers


class PluginRunner:
    """Runs a plugin chain over HTTP exchanges in-process, as the host behind Envoy would.

    ``chain``: plugin classes or names of installed plugins, in route order. ``settings``:
    ``{plugin name: {key: value}}``, the ``[plugins.<name>]`` tables. ``mode``: the body
    mode of both directions (``request_mode``/``response_mode`` for one), else what the
    generated Envoy config would ask for (the chain's needs). Every other keyword is a
    ``[routes.<name>]`` key (``failure_policy``, ``send``, ``buffer_limit_bytes``).

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
        }
        if request_mode or response_mode:
            route["body_mode"] = {"request": request_mode or mode, "response": response_mode or mode}
        elif mode is not None:
            route["body_mode"] = mode
        data: dict[str, Any] = {
            "routes": {"default": route},
            "plugins": {k: dict(v) for k, v in (settings or {}).items()},
        }
        uses_installed = len(classes) < len(chain)
        try:
            host = _assemble(data, classes, uses_installed, buffer_limit_bytes)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("PluginRunner: key 'routes.default.", "PluginRunner: '")) from None
        self._setup(host, "default")

    @classmethod
    def from_settings(cls, settings: str | Path | Mapping[str, Any], route: str = "default") -> PluginRunner:
        """A runner for one route of a settings file (or of a dict shaped like one), loaded as
        ``extproc-host serve`` loads it: installed plugins, ``plugin_modules``, the environment."""
        if isinstance(settings, Mapping):
            source = "settings"
            try:
                loaded = Settings(**dict(settings))
            except ValidationError as exc:
                raise ConfigError(describe_validation_error(source, exc)) from None
        else:
            source = str(settings)
            loaded = load_settings(settings)
        host = assemble_host(loaded, source)
        if route not in host.routes:
            raise ConfigError(f"{source}: no route named '{route}'; routes: {', '.join(host.routes)}")
        runner = cls.__new__(cls)
        runner._setup(host, route)
        return runner

    def _setup(self, host: LoadedHost, route: str) -> None:
        self.host = host
        self.route = route
        self.modes: RouteModes = host.modes[route]
        self.router = Router({route: host.routes[route], "default": host.routes["default"]})
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
            request, response, splits=splits, request_splits=request_splits, response_splits=response_splits
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
    ) -> Exchange:
        """Run one exchange: ``request`` (default: an empty POST /) goes through the chain to
        the upstream, whose answer (``response``, a function of the request it received, or
        by default :func:`echo`) comes back through the chain to the client.

        Bodies are cut into chunks by ``splits`` (``request_splits``/``response_splits`` for
        one direction; default: Envoy's 1 MiB chunks). BUFFERED bodies go whole.
        """
        req = request if request is not None else _request()
        default = splits or chunks_of(ENVOY_CHUNK)
        modes = self.modes
        processor = StreamProcessor(self.router, str(next(self._ids)))
        envoy = _Envoy(self, processor, modes)
        upstream: HttpMessage | None = None
        client: HttpMessage
        reply: LocalReply | None = None
        failed: str | None = None
        error: BaseException | None = None
        sizes: dict[str, list[int]] = {"request": [], "response": []}
        if modes.disabled:  # ext_proc is off on this route: Envoy forwards everything as is
            upstream = req
            client = response(req) if callable(response) else (response or echo(req))
            return Exchange(upstream, client, None, None, None, "NONE", "NONE")
        try:
            sent, sizes["request"] = await envoy.direction(
                "request", req, modes.request_body, True, modes.request_trailers, request_splits or default
            )
            upstream = sent
            answer = response(sent) if callable(response) else (response or echo(sent))
            client, sizes["response"] = await envoy.direction(
                "response",
                answer,
                modes.response_body,
                modes.response_headers,
                modes.response_trailers,
                response_splits or default,
            )
        except _LocalReplyStop as stop:  # upstream stays None when the request never completed
            reply = stop.reply
            client = HttpMessage([(":status", str(reply.status)), *reply.headers], reply.body)
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
    return {"server": ServerSettings(), "routes": routes, "plugins": data["plugins"]}


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
