"""What Envoy must send the host for each route: the chain's needs turned into ext_proc modes.

A route's needs are the union of its plugins' :class:`~extproc_host.plugin.Needs`, plus the
parts its ``send`` setting lists. ``body_mode`` forces a body mode; without it a body the
chain needs goes as FULL_DUPLEX_STREAMED (streamed; STREAMED on a route that allows mode
overrides, which Envoy ignores in FULL_DUPLEX_STREAMED) or BUFFERED (buffered), and a body it
does not need is not sent. Request headers are always sent (the host learns the route from them),
and each direction that sends a body sends its trailers too (FULL_DUPLEX_STREAMED requires it;
in STREAMED they tell the host where a body with trailers ends). A route needing nothing gets
ext_proc disabled. Contradictions are :class:`~extproc_host.settings.ConfigError`.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .plugin import DIRECTIONS, Needs
from .routes import Route, RouteModes
from .settings import RouteSettings

__all__ = ["RouteModes", "chain_needs", "ordered_routes", "route_modes", "who_needs"]


def chain_needs(route: Route, settings: RouteSettings) -> Needs:
    """The union of what every plugin of the chain needs, plus the route's ``send`` list."""
    needs = Needs()
    for link in route.chain:
        needs = needs | link.info.cls.needs_for(link.settings)
    for part in settings.send:
        value: Any = "streamed" if part.endswith("_body") else True
        needs = needs | Needs(**{part: value})
    return needs


def who_needs(route: Route, settings: RouteSettings, field: str) -> str:
    """Words naming what asks for ``field`` of :class:`Needs` (plugins, or the route's ``send``)."""
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
        streamed = "STREAMED" if settings.allow_mode_override else "FULL_DUPLEX_STREAMED"
        return {None: "NONE", "streamed": streamed, "buffered": "BUFFERED"}[need]
    if forced == "FULL_DUPLEX_STREAMED" and settings.allow_mode_override:
        raise ConfigError(
            f"{key}: FULL_DUPLEX_STREAMED for the {direction} body, but the route sets allow_mode_override, "
            "which Envoy ignores in FULL_DUPLEX_STREAMED: force STREAMED, or leave body_mode out"
        )
    if forced == "NONE" and need is not None:
        who = who_needs(route, settings, f"{direction}_body")
        raise ConfigError(f"{key}: NONE for the {direction} body, but {who} needs the {direction} body")
    if forced in ("STREAMED", "FULL_DUPLEX_STREAMED") and need == "buffered":
        who = who_needs(route, settings, f"{direction}_body")
        raise ConfigError(
            f"{key}: {forced} for the {direction} body, but {who} needs the whole {direction} body at once (BUFFERED)"
        )
    return forced


def answers_needed(needs: Needs, settings: RouteSettings) -> bool:
    """Whether the route relies on Envoy reading the host's answers beyond body and header
    changes: metadata it receives, re-routing, header mutation rules, mode overrides."""
    return bool(
        needs.writes_metadata
        or needs.reroutes
        or needs.routing_headers
        or needs.envoy_headers
        or settings.receiving_namespaces
        or settings.mutation_rules is not None
        or settings.allow_mode_override
        or settings.route_cache_action is not None
    )


def observes_only(route: Route, settings: RouteSettings) -> bool:
    """Whether the route can leave the data path: every plugin only observes, the route forces
    no body mode (a forced mode is a request to stay in the path), needs no whole body and
    nothing that only answers carry (metadata it writes, re-routing, mode overrides)."""
    needs = chain_needs(route, settings)
    return (
        bool(route.chain)
        and all(link.info.cls.observes_only for link in route.chain)
        and settings.body_mode is None
        and "buffered" not in (needs.request_body, needs.response_body)
        and not answers_needed(needs, settings)
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
    """Routes in Envoy's matching order (Gateway API's precedence): longest path prefix first,
    then the most ``match_headers``, ``default`` last. ConfigError for a route other than
    ``default`` that matches nothing of its own (no path prefix, no headers), two routes that
    match the same requests, or a ``default`` that matches headers (it must take the rest)."""
    problems = []
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    for name, route in routes.items():
        if name == "default":
            if route.match_headers:
                problems.append(
                    f"{source}: key 'routes.default.match_headers': 'default' takes every request no other route "
                    "matches: it cannot require headers"
                )
            continue
        if route.path_prefix is None and not route.match_headers:
            problems.append(
                f"{source}: key 'routes.{name}.path_prefix': required to generate the Envoy route "
                f"'{name}' (only 'default' may go without one: it matches everything else; or set match_headers)"
            )
            continue
        key = (route.path_prefix or "/", tuple(sorted(route.match_headers)))
        if key in seen:
            what = f"'{key[0]}'" + (" with the same match_headers" if route.match_headers else "")
            problems.append(
                f"{source}: key 'routes.{name}.path_prefix': {what} is also route "
                f"'{seen[key]}''s match: Envoy would never pick one of them"
            )
        else:
            seen[key] = name
    if problems:
        raise ConfigError("\n".join(problems))
    named = sorted(
        (r for n, r in routes.items() if n != "default"),
        key=lambda r: (-len(r.path_prefix or "/"), -len(r.match_headers), r.name),
    )
    return [*named, routes["default"]]
