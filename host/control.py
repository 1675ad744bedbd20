"""What each route's Envoy filter exchanges with the host besides the messages: the chain's
needs and the route's settings turned into a :class:`~extproc_host.routes.RouteControl`.

- attributes: ``xds.route_name`` (the host picks the chain by it), plus what the plugins ask
  for (``Needs.request_attributes``, ``response_attributes``) and the route lists;
- dynamic metadata: the namespaces Envoy forwards (``Needs.reads_metadata`` and the route's
  ``forwarding_namespaces``) and accepts (``Needs.writes_metadata``, ``receiving_namespaces``);
- header changes: a plugin that changes routing headers (``Needs.routing_headers``) or
  ``x-envoy-*`` headers (``Needs.envoy_headers``) runs only where the route allows it
  (``mutation_rules``), since Envoy drops those changes otherwise: the operator opts in;
- re-routing: a chain that re-routes (``Needs.reroutes``) gets ``route_cache_action = CLEAR``;
- mode overrides: with ``allow_mode_override``, the modes an override may set (each body the
  route sends may be skipped, with its trailers unless a plugin needs them);
- message timeouts.

Contradictions are :class:`~extproc_host.errors.ConfigError` naming the key to set.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import ConfigError
from .modes import chain_needs, who_needs
from .plugin import Needs
from .protocol import ROUTE_ATTRIBUTE
from .routes import Route, RouteControl, RouteModes, Skips
from .settings import RouteSettings


def _union(*names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Names in the order first given, once each."""
    return tuple(dict.fromkeys(name for group in names for name in group))


def override_modes(modes: RouteModes, needs: Needs, settings: RouteSettings) -> dict[Skips, RouteModes]:
    """The modes a mode override may set on a route in ``modes``, by the bodies it skips: a
    body the route sends may be skipped (not one its ``send`` forces), and then its trailers
    too unless a plugin needs them. Empty when the route does not allow mode overrides."""
    if not settings.allow_mode_override or modes.disabled or modes.observe:
        return {}
    can_skip = {
        direction: getattr(modes, f"{direction}_body") != "NONE" and f"{direction}_body" not in settings.send
        for direction in ("request", "response")
    }
    found: dict[Skips, RouteModes] = {}
    for skip_request in (False, True) if can_skip["request"] else (False,):
        for skip_response in (False, True) if can_skip["response"] else (False,):
            found[skip_request, skip_response] = replace(
                modes,
                request_body="NONE" if skip_request else modes.request_body,
                request_trailers=modes.request_trailers and not (skip_request and not needs.request_trailers),
                response_body="NONE" if skip_response else modes.response_body,
                response_trailers=modes.response_trailers and not (skip_response and not needs.response_trailers),
            )
    return found


def route_control(route: Route, settings: RouteSettings, modes: RouteModes, source: str) -> RouteControl:
    """The route's :class:`RouteControl`; ConfigError when the chain needs a header change the
    route does not allow, or re-routes where the route keeps its route cache."""
    needs = chain_needs(route, settings)
    key = f"{source}: key 'routes.{route.name}"
    rules = settings.mutation_rules
    problems = []
    if needs.routing_headers and not (rules is not None and rules.allow_all_routing):
        problems.append(
            f"{key}.mutation_rules': {who_needs(route, settings, 'routing_headers')} changes routing headers "
            "(:authority, host, :method, :scheme), which Envoy drops unless the route allows them: "
            "mutation_rules = { allow_all_routing = true }"
        )
    if needs.envoy_headers and not (rules is not None and rules.allow_envoy):
        problems.append(
            f"{key}.mutation_rules': {who_needs(route, settings, 'envoy_headers')} changes x-envoy-* headers, "
            "which Envoy drops unless the route allows them: mutation_rules = { allow_envoy = true }"
        )
    if needs.reroutes and settings.route_cache_action == "RETAIN":
        problems.append(
            f"{key}.route_cache_action': RETAIN, but {who_needs(route, settings, 'reroutes')} re-routes "
            "(Envoy must pick the route again after it changed request headers)"
        )
    if (
        settings.max_message_timeout
        and settings.message_timeout
        and settings.max_message_timeout < settings.message_timeout
    ):
        problems.append(
            f"{key}.max_message_timeout': {settings.max_message_timeout:g} s is shorter than the route's "
            f"message_timeout ({settings.message_timeout:g} s): a plugin could only ask for less time than it has"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    return RouteControl(
        request_attributes=_union([ROUTE_ATTRIBUTE], needs.request_attributes, settings.request_attributes),
        response_attributes=_union(needs.response_attributes, settings.response_attributes),
        forwarding_namespaces=_union(needs.reads_metadata, settings.forwarding_namespaces),
        receiving_namespaces=_union(needs.writes_metadata, settings.receiving_namespaces),
        mutation_rules=rules,
        route_cache_action=settings.route_cache_action or ("CLEAR" if needs.reroutes else "DEFAULT"),
        reroutes=needs.reroutes,
        override_modes=override_modes(modes, needs, settings),
        message_timeout=settings.message_timeout,
        max_message_timeout=settings.max_message_timeout,
    )
