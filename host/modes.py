"""What Envoy must send the host for each route: the chain's needs turned into ext_proc modes.

A route's needs are the union of its plugins' :class:`~extproc_host.plugin.Needs`, plus the
parts its ``send`` setting lists. ``body_mode`` forces a body mode; without it a body the
chain needs goes as FULL_DUPLEX_STREAMED (streamed) or BUFFERED (buffered), and a body it does
not need is not sent. Request headers are always sent (the host learns the route from them),
and each direction that sends a body sends its trailers too (FULL_DUPLEX_STREAMED requires it;
in STREAMED they tell the host where a body with trailers ends). A route needing nothing gets
ext_proc disabled. Contradictions are :class:`~extproc_host.settings.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .plugin import DIRECTIONS, Needs
from .routes import Route
from .settings import RouteSettings


@dataclass(frozen=True)
class RouteModes:
    """The ext_proc processing mode of one route, plus its buffer limit."""

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


def chain_needs(route: Route, settings: RouteSettings) -> Needs:
    """The union of what every plugin of the chain needs, plus the route's ``send`` list."""
    needs = Needs()
    for link in route.chain:
        needs = needs | link.info.cls.needs_for(link.settings)
    for part in settings.send:
        value: Any = "streamed" if part.endswith("_body") else True
        needs = needs | Needs(**{part: value})
    return needs


def _who_needs(route: Route, settings: RouteSettings, field: str) -> str:
    """Words naming what asks for ``field`` (plugins, or the route's ``send``)."""
    names = [link.info.name for link in route.chain if getattr(link.info.cls.needs_for(link.settings), field)]
    if field in settings.send:
        names.append("send")
    return ", ".join(f"'{name}'" for name in names)


def _body_mode(route: Route, settings: RouteSettings, needs: Needs, direction: str, source: str) -> str:
    """The body mode of ``direction``; ConfigError when ``body_mode`` contradicts the chain."""
    need = getattr(needs, f"{direction}_body")
    forced = settings.forced_body_mode(direction)
    key = f"{source}: key 'routes.{route.name}.body_mode'"
    if forced is None:
        return {None: "NONE", "streamed": "FULL_DUPLEX_STREAMED", "buffered": "BUFFERED"}[need]
    if forced == "NONE" and need is not None:
        who = _who_needs(route, settings, f"{direction}_body")
        raise ConfigError(f"{key}: NONE for the {direction} body, but {who} needs the {direction} body")
    if forced in ("STREAMED", "FULL_DUPLEX_STREAMED") and need == "buffered":
        who = _who_needs(route, settings, f"{direction}_body")
        raise ConfigError(
            f"{key}: {forced} for the {direction} body, but {who} needs the whole {direction} body at once (BUFFERED)"
        )
    return forced


def observes_only(route: Route, settings: RouteSettings) -> bool:
    """Whether the route can leave the data path: every plugin only observes, the route forces
    no body mode (a forced mode is a request to stay in the path) and needs no whole body."""
    needs = chain_needs(route, settings)
    return (
        bool(route.chain)
        and all(link.info.cls.observes_only for link in route.chain)
        and settings.body_mode is None
        and "buffered" not in (needs.request_body, needs.response_body)
        and needs.anything
    )


def route_modes(route: Route, settings: RouteSettings, source: str) -> RouteModes:
    """What Envoy sends the host for ``route``; ConfigError on contradictory settings."""
    needs = chain_needs(route, settings)
    bodies = {d: _body_mode(route, settings, needs, d, source) for d in DIRECTIONS}
    observe = observes_only(route, settings)
    if observe:  # observability mode sends bodies STREAMED only
        bodies = {d: "STREAMED" if mode != "NONE" else mode for d, mode in bodies.items()}
    limit = settings.buffer_limit_bytes
    buffered = [d for d in DIRECTIONS if bodies[d] == "BUFFERED"]
    if buffered and limit is None:
        raise ConfigError(
            f"{source}: key 'routes.{route.name}.buffer_limit_bytes': required: the {' and '.join(buffered)} "
            "body is BUFFERED, which Envoy holds whole; set the largest body it may hold (e.g. 67108864)"
        )
    if limit is not None and not buffered:
        raise ConfigError(
            f"{source}: key 'routes.{route.name}.buffer_limit_bytes': only applies to BUFFERED bodies, "
            "and this route sends none"
        )
    sends_body = {d: bodies[d] != "NONE" for d in DIRECTIONS}
    modes = RouteModes(
        request_body=bodies["request"],
        response_body=bodies["response"],
        request_trailers=needs.request_trailers or sends_body["request"],
        response_headers=needs.response_headers,
        response_trailers=needs.response_trailers or sends_body["response"],
        buffer_limit_bytes=limit,
        observe=observe,
    )
    if not (needs.anything or any(sends_body.values())):
        return RouteModes(disabled=True)
    return modes


def ordered_routes(routes: dict[str, Route], source: str) -> list[Route]:
    """Routes in Envoy's matching order: longest path prefix first, ``default`` last.
    ConfigError for a route other than ``default`` without a path prefix, or two with one."""
    problems = []
    by_prefix: dict[str, str] = {}
    for name, route in routes.items():
        if name == "default":
            continue
        if route.path_prefix is None:
            problems.append(
                f"{source}: key 'routes.{name}.path_prefix': required to generate the Envoy route "
                f"'{name}' (only 'default' may go without one: it matches everything else)"
            )
        elif route.path_prefix in by_prefix:
            problems.append(
                f"{source}: key 'routes.{name}.path_prefix': '{route.path_prefix}' is also route "
                f"'{by_prefix[route.path_prefix]}''s prefix: Envoy would never pick one of them"
            )
        else:
            by_prefix[route.path_prefix] = name
    if problems:
        raise ConfigError("\n".join(problems))
    named = sorted((r for n, r in routes.items() if n != "default"), key=lambda r: (-len(r.path_prefix or ""), r.name))
    return [*named, routes["default"]]
