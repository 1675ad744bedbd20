"""The plugin API: what a plugin class implements and what it is handed.

One instance of a plugin class is built for every gRPC ``Process`` stream (that is, for every
HTTP exchange) whose route lists the plugin in its chain. Every hook is optional; the defaults
pass data through untouched. A hook may be a plain method or an ``async def``.

Body hooks take the bytes that reached this plugin (the output of the plugin before it in the
chain) and return the bytes to hand to the next one: the same bytes, different ones, more,
fewer or none. ``*_body_end`` is called once when the body is complete and returns whatever the
plugin still holds back (a flush). Header and trailer hooks change the :class:`Headers` they
are given in place; a header hook may also return bytes, which replace the body that follows
those headers (a mock answer, a request synthesized from headers).

Beyond headers and bodies a plugin reaches the rest of the ext_proc protocol through
:class:`StreamInfo` (``self.stream``): Envoy attributes, dynamic metadata both ways, more time
for a slow hook; and through :meth:`Plugin.skip_body` (this exchange's body is not needed).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, Literal, Protocol

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypeVar


class NoSettings(BaseModel):
    """Settings model of a plugin that takes no settings (any key is an error)."""

    model_config = ConfigDict(extra="forbid")


class Headers:
    """HTTP headers (or trailers) of one message, with the changes a plugin makes to them.

    Names are case-insensitive (Envoy sends them lower-case). Values are ``str``; bytes that
    are not UTF-8 survive a round trip unchanged (surrogateescape).
    """

    __slots__ = ("_items", "appended", "removed", "set_headers")

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        # Envoy's names are lower-case already; names given by hand (tests, Reject) may not be.
        self._items: list[tuple[str, str]] = (
            [(k if k.islower() else k.lower(), v) for k, v in items] if items is not None else []
        )
        self.set_headers: dict[str, str] = {}
        self.appended: list[tuple[str, str]] = []
        self.removed: set[str] = set()

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def items(self) -> Iterator[tuple[str, str]]:
        """All (name, value) pairs as they stand now, in order."""
        return iter(self._items)

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with ``value``."""
        name = name.lower()
        self._items = [(k, v) for k, v in self._items if k != name]
        self._items.append((name, value))
        self.removed.discard(name)
        self.appended = [(k, v) for k, v in self.appended if k != name]
        self.set_headers[name] = value

    def add(self, name: str, value: str) -> None:
        """Add one more value of ``name``, keeping the ones there are."""
        name = name.lower()
        self._items.append((name, value))
        self.appended.append((name, value))

    def remove(self, name: str) -> None:
        """Remove every value of ``name``."""
        name = name.lower()
        self._items = [(k, v) for k, v in self._items if k != name]
        self.set_headers.pop(name, None)
        self.appended = [(k, v) for k, v in self.appended if k != name]
        self.removed.add(name)

    def setdefault(self, name: str, value: str) -> str:
        """The first value of ``name``; when it has none, ``value``, set first (as ``dict``
        does: Envoy's ADD_IF_ABSENT)."""
        current = self.get(name)
        if current is not None:
            return current
        self.set(name, value)
        return value

    def replace(self, name: str, value: str) -> bool:
        """Replace every value of ``name`` with ``value`` only when ``name`` is present (Envoy's
        OVERWRITE_IF_EXISTS); whether it was."""
        if name not in self:
            return False
        self.set(name, value)
        return True

    @property
    def changed(self) -> bool:
        """Whether any plugin changed these headers (since the host last sent the changes)."""
        return bool(self.set_headers or self.appended or self.removed)

    def clear_changes(self) -> None:
        """Forget the changes so far (the host sent them to Envoy); the values stay."""
        self.set_headers = {}
        self.appended = []
        self.removed = set()

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class StreamControl(Protocol):
    """What a stream's plugins can ask of the host beyond their hooks' return values
    (implemented by the host's stream processor and by the test kit's)."""

    def skip_body(self, plugin: Plugin[Any], direction: str) -> None:
        """``plugin`` needs no more of this exchange's ``direction`` body."""

    def set_metadata(self, namespace: str, values: dict[str, Any]) -> None:
        """Send ``values`` to Envoy's dynamic metadata under ``namespace`` with the next answer."""

    def extend_timeout(self, seconds: float) -> None:
        """Ask Envoy to wait ``seconds`` for the answer being worked on."""


#: A value dynamic metadata may hold (what JSON holds).
MetadataValue = None | bool | int | float | str | list[Any] | dict[str, Any]


def metadata_values(values: Mapping[str, Any], where: str = "metadata") -> dict[str, Any]:
    """``values`` as a plain dict of JSON-like values; TypeError naming the first that is not."""

    def check(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, Mapping):
            return {str(k): check(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [check(v, f"{path}[{i}]") for i, v in enumerate(value)]
        raise TypeError(
            f"{path} is a {type(value).__name__}: dynamic metadata holds None, bool, numbers, str, lists, dicts"
        )

    if not isinstance(values, Mapping):
        raise TypeError(f"{where} must be a mapping of names to values, not {type(values).__name__}")
    return {str(k): check(v, f"{where}.{k}") for k, v in values.items()}


@dataclass
class StreamInfo:
    """What a plugin instance knows of its stream; shared by every plugin in the chain.

    ``state`` is a dict for plugins of one chain to pass values to each other (key it by
    something unique to your plugin).
    """

    stream_id: str
    route: str
    request_body_mode: str = "NONE"
    response_body_mode: str = "NONE"
    #: Envoy attributes by name (``"source.address"``, ``"response.code"``): the request ones
    #: arrive with the request headers, the response ones with the response headers. Whole
    #: numbers are ``int``. Only what the route asks for (``Needs``, ``request_attributes``).
    attributes: dict[str, Any] = field(default_factory=dict)
    request_headers: Headers | None = None
    response_headers: Headers | None = None
    #: False once the headers said no body follows (GET, 204...); None before they arrived.
    request_has_body: bool | None = None
    response_has_body: bool | None = None
    state: dict[str, Any] = field(default_factory=dict)
    #: Dynamic metadata earlier Envoy filters set, by namespace (only the namespaces the route
    #: forwards: ``Needs(reads_metadata=...)``, ``forwarding_namespaces``); updated with every
    #: message Envoy sends.
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What the chain set with :meth:`set_metadata`, by namespace, merged as Envoy merges it.
    metadata_set: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The host's side of the stream (None for a StreamInfo built by hand).
    control: StreamControl | None = field(default=None, repr=False, compare=False)

    def set_metadata(self, namespace: str, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into Envoy's dynamic metadata under ``namespace`` (access logs,
        rate limits, later filters read it): sent with the host's next answer, so set it in a
        hook before the last answer (``close`` is too late). The route must receive the
        namespace (``Needs(writes_metadata=...)``); ValueError when it does not."""
        plain = metadata_values(values, namespace)
        if self.control is not None:
            self.control.set_metadata(namespace, plain)
        self.metadata_set.setdefault(namespace, {}).update(plain)

    def extend_timeout(self, seconds: float) -> None:
        """Ask Envoy to wait up to ``seconds`` for the answer the current hook works on
        (ext_proc's ``override_message_timeout``, once per message): for a hook that calls a
        slow service. At most the route's ``max_message_timeout``; ValueError past it."""
        if self.control is not None:
            self.control.extend_timeout(seconds)


#: How a plugin needs a body: as it comes (any streamed mode) or whole (BUFFERED).
BodyNeed = Literal["streamed", "buffered"] | None


def _names(value: Iterable[str] | str) -> tuple[str, ...]:
    """Names given as one string or any iterable, as a sorted tuple without repeats."""
    return (value,) if isinstance(value, str) else tuple(sorted(set(value)))


@dataclass(frozen=True)
class Needs:
    """What a plugin (or a whole chain) needs from Envoy: the ``envoy-config`` command asks
    Envoy for exactly this. Body needs: ``None`` (not needed), ``"streamed"`` (chunks as they
    come) or ``"buffered"`` (the whole body in one piece). ``a | b`` is what both need.

    Beyond the messages: the Envoy attributes the plugin reads, the dynamic metadata
    namespaces it reads (Envoy's forwarding namespaces) and writes (receiving namespaces),
    and whether it re-routes (Envoy picks the route again after the request headers answer),
    changes routing headers (``:authority``, ``host``, ``:method``, ``:scheme``) or
    ``x-envoy-*`` headers; the last two the route must allow (``mutation_rules``)."""

    request_headers: bool = False
    request_body: BodyNeed = None
    request_trailers: bool = False
    response_headers: bool = False
    response_body: BodyNeed = None
    response_trailers: bool = False
    request_attributes: tuple[str, ...] = ()
    response_attributes: tuple[str, ...] = ()
    reads_metadata: tuple[str, ...] = ()
    writes_metadata: tuple[str, ...] = ()
    reroutes: bool = False
    routing_headers: bool = False
    envoy_headers: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "tuple[str, ...]":
                object.__setattr__(self, f.name, _names(getattr(self, f.name)))

    def __or__(self, other: Needs) -> Needs:
        merged: dict[str, Any] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name.endswith("_body"):
                merged[f.name] = "buffered" if "buffered" in (mine, theirs) else (mine or theirs)
            elif isinstance(mine, tuple):
                merged[f.name] = (*mine, *theirs)
            else:
                merged[f.name] = mine or theirs
        return Needs(**merged)

    @property
    def anything(self) -> bool:
        """Whether anything at all is needed."""
        return any(getattr(self, f.name) for f in fields(self))


def inferred_needs(cls: type[Plugin[Any]]) -> Needs:
    """What ``cls`` needs, judged by the hooks it implements (only response body hooks ->
    the response body, streamed)."""
    needs = Needs()
    for name in overridden_hooks(cls):
        needs = needs | HOOKS[name].needs
    return needs


#: gRPC status codes by name, for ``Reject(grpc_status=...)``.
GRPC_STATUS: dict[str, int] = {
    name: code
    for code, name in enumerate(
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
    )
}


class Reject(Exception):
    """Raise from a hook to answer the client directly (an Envoy local reply).

    Works while the response has not started (request headers, request body, request
    trailers and response headers hooks); later, the stream fails like any other error.
    ``grpc_status`` (a code or its name, ``"PERMISSION_DENIED"``) is what a gRPC client gets
    (the HTTP status is then 200 with ``grpc-status``, and ``grpc-message`` carries ``body``);
    without it Envoy maps ``status`` to one. ``details`` goes to Envoy's
    ``%RESPONSE_CODE_DETAILS%`` (spaces become underscores).
    """

    def __init__(
        self,
        status: int = 400,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        *,
        grpc_status: int | str | None = None,
        details: str = "",
    ):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = dict(headers or {})
        if isinstance(grpc_status, str):
            if grpc_status.upper() not in GRPC_STATUS:
                raise ValueError(f"grpc_status {grpc_status!r}: not a gRPC status name ({', '.join(GRPC_STATUS)})")
            grpc_status = GRPC_STATUS[grpc_status.upper()]
        if grpc_status is not None and not 0 <= grpc_status <= 16:
            raise ValueError(f"grpc_status {grpc_status}: gRPC status codes are 0 to 16")
        self.grpc_status = grpc_status
        self.details = details
        super().__init__(f"{status} {self.body[:200]!r}")


#: What a body hook returns: the bytes to pass on (any bytes-like value), or an iterator or
#: async iterator of pieces when the output is too large to hold at once.
BodyOutput = bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes]
#: A body hook's return value; an ``async def`` hook returns it from a coroutine.
BodyResult = BodyOutput | Awaitable[BodyOutput]
#: A trailer or close hook's return value (nothing, or a coroutine of nothing).
HookResult = None | Awaitable[None]
#: A header hook's return value: nothing, or the bytes that replace the body after these
#: headers (Envoy's CONTINUE_AND_REPLACE); or a coroutine of either.
HeaderResult = None | bytes | Awaitable[bytes | None]

#: The type of a plugin's settings model (``Plugin[MySettings]`` types ``self.settings``).
SettingsT = TypeVar("SettingsT", bound=BaseModel, default=BaseModel)


class Plugin(Generic[SettingsT]):
    """Base class of a stream plugin. Subclass it, set ``name``, override the hooks you need.

    ``Settings`` is the plugin's pydantic model: the host validates ``[plugins.<name>]``
    (merged with a route's ``[routes.<route>.plugins.<name>]``) against it at start-up and
    hands the instance to ``__init__``. Subclass ``Plugin[MySettings]`` to have
    ``self.settings`` typed as ``MySettings``.

    Hooks may be plain methods or ``async def``; body hooks may return bytes or an (async)
    iterator of pieces (see :data:`BodyOutput`).
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel]] = NoSettings
    #: What the plugin needs Envoy to send; None: inferred from the hooks it implements.
    needs: ClassVar[Needs | None] = None
    #: True for a plugin that only looks (a copy, an audit log, metrics): it never changes
    #: headers, bodies or trailers and never rejects. A route whose whole chain only observes
    #: is taken out of the data path: Envoy sends it the exchange without waiting for answers
    #: (ext_proc's observability mode), so clients never wait for the host.
    observes_only: ClassVar[bool] = False

    @classmethod
    def needs_for(cls, settings: SettingsT) -> Needs:
        """What the plugin needs with these settings: ``needs``, else inferred from its hooks.
        Override it when the settings decide (a plugin that may copy only one body)."""
        return cls.needs if cls.needs is not None else inferred_needs(cls)

    def __init__(self, settings: SettingsT, stream: StreamInfo) -> None:
        self.settings = settings
        self.stream = stream

    def on_request_headers(self, headers: Headers) -> HeaderResult:
        """Request headers arrived; change them in place. Returning bytes replaces the request
        body (the upstream gets them instead of what the client sends, if anything)."""

    def on_request_body(self, chunk: bytes) -> BodyResult:
        """One piece of the request body; return what goes on down the chain."""
        return chunk

    def on_request_body_end(self) -> BodyResult:
        """The request body is complete; return anything still held back."""
        return b""

    def on_request_trailers(self, trailers: Headers) -> HookResult:
        """Request trailers arrived; change them in place."""

    def on_response_headers(self, headers: Headers) -> HeaderResult:
        """Response headers arrived; change them in place. Returning bytes replaces the
        response body (a mock answer)."""

    def on_response_body(self, chunk: bytes) -> BodyResult:
        """One piece of the response body; return what goes on down the chain."""
        return chunk

    def on_response_body_end(self) -> BodyResult:
        """The response body is complete; return anything still held back."""
        return b""

    def on_response_trailers(self, trailers: Headers) -> HookResult:
        """Response trailers arrived; change them in place."""

    def close(self, error: BaseException | None) -> HookResult:
        """The stream is over: called exactly once, with the error if it failed."""

    def skip_body(self, direction: Literal["request", "response"] = "request") -> None:
        """This plugin needs no more of this exchange's request (or response) body: its body
        hooks (``*_body_end`` too) are not called for it, the bytes pass it unchanged. Once
        every plugin with hooks for that body skipped it, and the route allows it
        (``allow_mode_override``), Envoy is told not to send it at all when the host answers
        a header message (ext_proc's ``mode_override``)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"skip_body: direction must be 'request' or 'response', not {direction!r}")
        if self.stream.control is not None:
            self.stream.control.skip_body(self, direction)


@dataclass(frozen=True)
class Hook:
    """One stream hook of :class:`Plugin`: the part of the exchange it handles and the
    :class:`Needs` a plugin implementing it has (``close`` needs nothing)."""

    name: str
    #: "request" or "response"; None for ``close``.
    direction: str | None
    #: "headers", "body", "body_end", "trailers" or "close".
    part: str
    needs: Needs


def _hook(name: str, direction: str | None, part: str, **needs: Any) -> Hook:
    return Hook(name, direction, part, Needs(**needs))


#: Every stream hook, in the order of an exchange; the tables below are derived from it.
HOOKS: dict[str, Hook] = {
    hook.name: hook
    for hook in (
        _hook("on_request_headers", "request", "headers", request_headers=True),
        _hook("on_request_body", "request", "body", request_body="streamed"),
        _hook("on_request_body_end", "request", "body_end", request_body="streamed"),
        _hook("on_request_trailers", "request", "trailers", request_trailers=True),
        _hook("on_response_headers", "response", "headers", response_headers=True),
        _hook("on_response_body", "response", "body", response_body="streamed"),
        _hook("on_response_body_end", "response", "body_end", response_body="streamed"),
        _hook("on_response_trailers", "response", "trailers", response_trailers=True),
        _hook("close", None, "close"),
    )
}
HOOK_NAMES: tuple[str, ...] = tuple(HOOKS)
DIRECTIONS = ("request", "response")


def _hook_named(direction: str, part: str) -> str:
    return next(h.name for h in HOOKS.values() if h.direction == direction and h.part == part)


#: direction -> (body hook, body-end hook)
BODY_HOOKS: dict[str, tuple[str, str]] = {d: (_hook_named(d, "body"), _hook_named(d, "body_end")) for d in DIRECTIONS}
#: direction -> headers hook, and "<direction>_trailers" -> trailers hook
HEADER_HOOKS: dict[str, str] = {
    **{d: _hook_named(d, "headers") for d in DIRECTIONS},
    **{f"{d}_trailers": _hook_named(d, "trailers") for d in DIRECTIONS},
}
#: The hooks called once per body chunk or header block: the ones worth timing.
TIMED_HOOKS: tuple[str, ...] = tuple(h.name for h in HOOKS.values() if h.part != "close")


def overridden_hooks(cls: type[Plugin[Any]]) -> list[str]:
    """The hooks ``cls`` implements itself (not inherited from :class:`Plugin`)."""
    return [name for name in HOOK_NAMES if getattr(cls, name) is not getattr(Plugin, name)]
