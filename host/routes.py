"""A route made ready to serve: its plugin chain, each plugin with the settings validated for it,
and what the route's Envoy filter is configured to do (its modes and its control options).

These are plain values built once at start-up by :mod:`extproc_host.registry`; the serving
core (chain, processor, metrics) reads them without knowing about pluggy or the settings file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel

from .mutation_rules import MutationRules
from .plugin import Plugin


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin class and where it came from."""

    name: str
    cls: type[Plugin]
    distribution: str
    version: str
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class ChainLink:
    """One plugin of a route's chain with the settings validated for that route."""

    info: PluginInfo
    settings: BaseModel


@dataclass(frozen=True)
class RouteModes:
    """The ext_proc processing mode of one route, plus its buffer limit (:mod:`~extproc_host.modes`)."""

    request_body: str = "NONE"
    response_body: str = "NONE"
    request_trailers: bool = False
    response_headers: bool = False
    response_trailers: bool = False
    buffer_limit_bytes: int | None = None
    #: True when the chain needs nothing: ext_proc is disabled on the route.
    disabled: bool = False
    #: True when every plugin of the chain only observes: Envoy sends the exchange in
    #: observability mode (bodies STREAMED, no answers awaited), off the data path.
    observe: bool = False


#: Which bodies a mode override skips: (request body, response body).
Skips = tuple[bool, bool]


@dataclass(frozen=True)
class RouteControl:
    """What the route's ext_proc filter exchanges with the host besides the messages, from
    the chain's needs and the route's settings (:mod:`~extproc_host.control`): attributes,
    dynamic metadata both ways, the header changes it accepts, when it picks the route again,
    mode overrides, message timeouts. ``envoy-config`` configures Envoy with exactly this."""

    request_attributes: tuple[str, ...] = ("xds.route_name",)
    response_attributes: tuple[str, ...] = ()
    forwarding_namespaces: tuple[str, ...] = ()
    receiving_namespaces: tuple[str, ...] = ()
    mutation_rules: MutationRules | None = None
    #: Envoy's route_cache_action: "DEFAULT" (when the host asks), "CLEAR", "RETAIN".
    route_cache_action: str = "DEFAULT"
    #: The chain re-routes: the host asks Envoy to pick the route again after it changed
    #: request headers (clear_route_cache).
    reroutes: bool = False
    #: The modes a mode override may set, by the bodies it skips; empty: no mode override.
    override_modes: Mapping[Skips, RouteModes] = field(default_factory=dict)
    #: Seconds Envoy waits for an answer (None: envoy-config's --message-timeout), and the
    #: most a plugin may ask for (0: none).
    message_timeout: float | None = None
    max_message_timeout: float = 0.0


@dataclass(frozen=True)
class Route:
    """A settings route made ready to serve: its chain with validated settings, what Envoy
    sends it (``modes``), what else it exchanges (``control``), and how Envoy matches it."""

    name: str
    chain: tuple[ChainLink, ...]
    failure_policy: str
    path_prefix: str | None = None
    modes: RouteModes = RouteModes()
    control: RouteControl = RouteControl()
    #: Request headers (name, exact value) Envoy's route match requires besides the prefix.
    match_headers: tuple[tuple[str, str], ...] = ()
    #: The Envoy cluster the route forwards to.
    upstream: str = "upstream"

    def matches(self, path: str, headers: Mapping[str, str]) -> bool:
        """Whether Envoy's match for this route (path prefix, headers) takes a request."""
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return all(headers.get(name) == value for name, value in self.match_headers)
