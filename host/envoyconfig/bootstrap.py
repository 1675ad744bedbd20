"""An Envoy bootstrap built from the host's settings (``extproc-host envoy-config``).

Built from envoy-data-plane's typed messages (a misspelt field is a Python error, not a config
Envoy rejects at start-up), turned into a dict and then YAML. One Envoy route per settings
route, matching its ``path_prefix`` and ``match_headers`` (longest prefix first, ``default``
last on ``/``), forwarding to its ``upstream`` cluster; each route gets the processing mode its
chain needs (:mod:`extproc_host.modes`), its failure policy (``fail_open`` ->
``failure_mode_allow``) and the dynamic metadata namespaces it forwards and receives
(:mod:`extproc_host.control`). Clusters: ``extproc`` (HTTP/2, the host), ``upstream`` and one
per other upstream the routes name.

Envoy takes some options only from the ext_proc filter, not per route: attributes, mutation
rules, route cache action, mode overrides (and the filter's own processing mode, which must not
be FULL_DUPLEX_STREAMED for them), message timeouts, observability mode. Routes that differ in
those get a filter each (as Envoy Gateway gives each ext_proc policy one), enabled on those
routes only: ``envoy.filters.http.ext_proc`` for the routes like ``default``,
``envoy.filters.http.ext_proc.observe`` for observe-only routes (``.observe.<route>`` for
observers with other options), ``envoy.filters.http.ext_proc.<route>`` for the others.

The filters reach the host through Envoy's own gRPC client and the ``extproc`` cluster
(``envoy_grpc``, the default), or through gRPC's C++ client straight to one address
(``google_grpc``, ``--grpc-client google``), which has no cluster, so no health checks.

envoy-data-plane takes a moment to import: only this command imports this module.
"""

from __future__ import annotations

import datetime
import ipaddress
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

# envoy-data-plane's generated models trip pydantic deprecation warnings on import: not ours to fix.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
    from envoy_data_plane.envoy.config.cluster.v3 import (
        CircuitBreakers,
        CircuitBreakersThresholds,
        Cluster,
        ClusterCommonLbConfig,
        ClusterDiscoveryType,
        ClusterDnsLookupFamily,
    )
    from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRules
    from envoy_data_plane.envoy.config.core.v3 import (
        Address,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        GrpcServiceGoogleGrpc,
        GrpcServiceGoogleGrpcChannelArgs,
        GrpcServiceGoogleGrpcChannelArgsValue,
        HealthCheck,
        HealthCheckGrpcHealthCheck,
        Http1ProtocolOptions,
        Http2ProtocolOptions,
        Pipe,
        SocketAddress,
        SubstitutionFormatString,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.route.v3 import (
        HeaderMatcher,
        Route,
        RouteAction,
        RouteConfiguration,
        RouteMatch,
        VirtualHost,
    )
    from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ExternalProcessor,
        ExternalProcessorRouteCacheAction,
        ExtProcOverrides,
        ExtProcPerRoute,
        MetadataOptions,
        MetadataOptionsMetadataNamespaces,
        ProcessingMode,
        ProcessingModeBodySendMode,
        ProcessingModeHeaderSendMode,
    )
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerCodecType,
        HttpFilter,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
    from envoy_data_plane.envoy.type.v3 import Percent
    from envoy_data_plane.google.protobuf import Any as AnyMessage
    from envoy_data_plane.google.protobuf import Struct

from .. import routes as host_routes
from ..drain import UNHEALTHY_THRESHOLD
from ..errors import ConfigError
from ..listeners import UNIX_PREFIX, parse_address
from ..modes import RouteModes, ordered_routes
from ..mutation_rules import MutationRules
from ..settings import Settings

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
#: The second ext_proc filter, in observability mode, for routes whose chain only observes.
EXT_PROC_OBSERVE_FILTER = "envoy.filters.http.ext_proc.observe"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's own default per-connection buffer limit is 1 MiB: streamed chunks stay that size.
H2_STREAM_WINDOW = 1024 * 1024
H2_CONNECTION_WINDOW = 16 * 1024 * 1024
MANY = 10_000  # circuit breaker thresholds: high enough for 10 x 70 MiB uploads and wrk -c50


@dataclass(frozen=True)
class EnvoyOptions:
    """Command-line choices that are not in the settings file."""

    listen: str = "0.0.0.0:18080"
    admin_port: int = 9901
    admin_address: str = "127.0.0.1"
    #: Where Envoy reaches the host: HOST:PORT or unix:PATH, one per host process (all of them
    #: endpoints of the one ``extproc`` cluster); empty: the settings' [server] listen.
    host_addresses: tuple[str, ...] = ()
    upstream: str = "127.0.0.1:8080"
    #: Other upstreams (clusters) routes may name: (name, HOST:PORT) pairs.
    upstreams: tuple[tuple[str, str], ...] = ()
    #: Where Envoy writes its access log (JSON lines, with the dynamic metadata namespaces the
    #: routes receive); None: no access log.
    access_log: str | None = None
    message_timeout: float = 5.0
    ext_proc: bool = True
    #: Seconds between gRPC health checks of each host endpoint; None: no active health check.
    health_check_interval: float | None = None
    #: Observe-only routes: how long Envoy keeps feeding the host an exchange that is already
    #: over for the client (observability mode's deferred_close_timeout; Envoy's default is 5).
    observe_close_timeout: float = 5.0
    #: Envoy's memory in FULL_DUPLEX_STREAMED (benchmarks/observe.py maps the trade-off):
    #: HTTP/2 stream window of the ext_proc cluster (its connection window is 16 times it), so
    #: how much of the host's answers Envoy takes ahead; None: Envoy's default (256 MiB).
    extproc_window: int | None = None
    #: per_connection_buffer_limit_bytes of the ext_proc cluster and of the listener; None:
    #: Envoy's default (1 MiB).
    extproc_buffer_limit: int | None = None
    listener_buffer_limit: int | None = None
    #: Envoy's gRPC client for the host: "envoy" (envoy_grpc, through the ``extproc`` cluster)
    #: or "google" (google_grpc: gRPC's C++ client, straight to the one host address).
    grpc_client: str = "envoy"


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _socket(address: str, connect: bool = True) -> tuple[Address, bool]:
    """An Envoy address for ``HOST:PORT`` or ``unix:PATH``, and whether it needs DNS.
    ``connect``: Envoy connects to it, so an unspecified address (0.0.0.0) means loopback."""
    if address.startswith(UNIX_PREFIX):
        return Address(pipe=Pipe(path=address.removeprefix(UNIX_PREFIX))), False
    parsed = parse_address(address)
    if connect:  # the host listens everywhere: reach it on loopback
        parsed = parsed.reachable()
    try:
        ipaddress.ip_address(parsed.host)
        dns = False
    except ValueError:
        dns = True
    return Address(socket_address=SocketAddress(address=parsed.host, port_value=parsed.port)), dns


def _cluster(name: str, addresses: Sequence[str], http2: bool) -> Cluster:
    """A cluster with one endpoint per address; STRICT_DNS when one is a hostname, else STATIC.

    A hostname's every address is an endpoint, re-resolved every 5 s, so replicas behind one
    name (compose ``--scale host=3``, a headless Kubernetes Service) join and leave the round
    robin; IPv4 only, as container networks' DNS names resolve to IPv4."""
    sockets = [_socket(address) for address in addresses]
    dns = any(needs_dns for _, needs_dns in sockets)
    dns_options: dict[str, Any] = {}
    if dns:
        dns_options = {"dns_lookup_family": ClusterDnsLookupFamily.V4_ONLY}  # re-resolved every 5 s (the default)
    if http2:
        protocol = HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
    else:
        protocol = HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS if dns else ClusterDiscoveryType.STATIC,
        connect_timeout=_seconds(5),
        **dns_options,
        typed_extension_protocol_options={
            HTTP_OPTIONS: AnyMessage.pack(HttpProtocolOptions(explicit_http_config=protocol))
        },
        circuit_breakers=CircuitBreakers(
            thresholds=[CircuitBreakersThresholds(max_connections=MANY, max_pending_requests=MANY, max_requests=MANY)]
        ),
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=a)) for a, _ in sockets])
            ],
        ),
    )


def _grpc_service(settings: Settings, options: EnvoyOptions) -> GrpcService:
    """How the ext_proc filters reach the host (see the module's docstring)."""
    if options.grpc_client == "envoy":
        return GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="extproc"))
    (address,) = options.host_addresses or (settings.server.listen,)
    if address.startswith(UNIX_PREFIX):
        target = f"unix:{address.removeprefix(UNIX_PREFIX)}"
    else:
        target = parse_address(address).reachable().target()
    # gRPC's own limit on a message is 4 MiB: a BUFFERED body goes in one message.
    size = GrpcServiceGoogleGrpcChannelArgsValue(int_value=settings.server.max_message_bytes)
    limits = {"grpc.max_receive_message_length": size, "grpc.max_send_message_length": size}
    return GrpcService(
        google_grpc=GrpcServiceGoogleGrpc(
            target_uri=target, stat_prefix="extproc", channel_args=GrpcServiceGoogleGrpcChannelArgs(args=limits)
        )
    )


def processing_mode(modes: RouteModes) -> ProcessingMode:
    """The ext_proc ProcessingMode for a route's modes."""
    send, skip = ProcessingModeHeaderSendMode.SEND, ProcessingModeHeaderSendMode.SKIP
    return ProcessingMode(
        request_header_mode=send,
        response_header_mode=send if modes.response_headers else skip,
        request_body_mode=ProcessingModeBodySendMode[modes.request_body],
        response_body_mode=ProcessingModeBodySendMode[modes.response_body],
        request_trailer_mode=send if modes.request_trailers else skip,
        response_trailer_mode=send if modes.response_trailers else skip,
    )


@dataclass(frozen=True)
class FilterOptions:
    """What Envoy takes only from an ext_proc filter, not per route: routes that differ in it
    need a filter each."""

    observe: bool = False
    request_attributes: tuple[str, ...] = ("xds.route_name",)
    response_attributes: tuple[str, ...] = ()
    mutation_rules: MutationRules | None = None
    route_cache_action: str = "DEFAULT"
    #: With mode overrides: the route's modes (the filter's processing mode: Envoy fills an
    #: override's DEFAULT fields from it) and the modes an override may set.
    modes: RouteModes | None = None
    override_modes: tuple[RouteModes, ...] = ()
    message_timeout: float = 5.0
    max_message_timeout: float = 0.0

    @classmethod
    def of(cls, route: host_routes.Route, message_timeout: float) -> FilterOptions:
        control = route.control
        overrides = tuple(control.override_modes.values())
        return cls(
            observe=route.modes.observe,
            request_attributes=control.request_attributes,
            response_attributes=control.response_attributes,
            mutation_rules=control.mutation_rules,
            route_cache_action=control.route_cache_action,
            modes=route.modes if overrides else None,
            override_modes=overrides,
            message_timeout=control.message_timeout or message_timeout,
            max_message_timeout=control.max_message_timeout,
        )


@dataclass
class ExtProcFilter:
    """One ext_proc filter of the bootstrap and the routes it serves (the first one's
    processing mode and failure policy are the filter's; the others override what differs)."""

    name: str
    options: FilterOptions
    routes: list[host_routes.Route] = field(default_factory=list)

    @property
    def modes(self) -> RouteModes:
        first = self.routes[0].modes if self.routes else RouteModes()
        return first if not first.disabled else RouteModes()

    @property
    def fail_open(self) -> bool:
        return bool(self.routes) and (self.options.observe or self.routes[0].failure_policy == "fail_open")


def ext_proc_filters(ordered: Sequence[host_routes.Route], message_timeout: float) -> list[ExtProcFilter]:
    """The ext_proc filters the routes need, each with its routes: the first serves the routes
    whose filter options are ``default``'s (its processing mode and failure policy are
    ``default``'s), then observe-only routes, then one per other set of options."""
    default = ordered[-1]
    main = ExtProcFilter(EXT_PROC_FILTER, FilterOptions.of(default, message_timeout))
    if default.modes.observe:  # the main filter keeps the plain options; the observer takes default
        main = ExtProcFilter(EXT_PROC_FILTER, FilterOptions(message_timeout=message_timeout))
    filters = {main.options: main}
    for route in [default, *ordered[:-1]]:
        if route.modes.disabled:
            continue
        options = FilterOptions.of(route, message_timeout)
        found = filters.get(options)
        if found is None:
            base = EXT_PROC_OBSERVE_FILTER if options.observe else EXT_PROC_FILTER
            first = options.observe and not any(f.options.observe for f in filters.values())
            name = base if first else f"{base}.{route.name}"
            found = filters[options] = ExtProcFilter(name, options)
        found.routes.append(route)
    return list(filters.values())


def _namespaces(names: Sequence[str]) -> MetadataOptionsMetadataNamespaces:
    return MetadataOptionsMetadataNamespaces(untyped=list(names))


def _per_route(route: host_routes.Route, ext_proc: ExtProcFilter) -> ExtProcPerRoute | None:
    """The route's ExtProcPerRoute on the filter that serves it: overrides where the route
    differs from the filter (processing mode, failure policy) and its metadata namespaces."""
    overrides = ExtProcOverrides()
    changed = False
    if processing_mode(route.modes) != processing_mode(ext_proc.modes):
        overrides.processing_mode = processing_mode(route.modes)
        changed = True
    fail_open = route.modes.observe or route.failure_policy == "fail_open"
    if fail_open != ext_proc.fail_open:
        overrides.failure_mode_allow = fail_open
        changed = True
    control = route.control
    if control.forwarding_namespaces or control.receiving_namespaces:
        overrides.metadata_options = MetadataOptions(
            forwarding_namespaces=_namespaces(control.forwarding_namespaces),
            receiving_namespaces=_namespaces(control.receiving_namespaces),
        )
        changed = True
    return ExtProcPerRoute(overrides=overrides) if changed else None


def _mutation_rules(rules: MutationRules) -> HeaderMutationRules:
    """The route setting as Envoy's message (only the fields that are set)."""
    found = HeaderMutationRules()
    for name in ("allow_all_routing", "allow_envoy", "disallow_system", "disallow_all", "disallow_is_error"):
        if getattr(rules, name):
            setattr(found, name, True)
    if rules.allow_expression is not None:
        found.allow_expression = RegexMatcher(regex=rules.allow_expression)
    if rules.disallow_expression is not None:
        found.disallow_expression = RegexMatcher(regex=rules.disallow_expression)
    return found


def _filter_config(ext_proc: ExtProcFilter, grpc_service: GrpcService) -> ExternalProcessor:
    """The ExternalProcessor config of one filter, reaching the host through ``grpc_service``."""
    options = ext_proc.options
    config = ExternalProcessor(
        grpc_service=grpc_service,
        failure_mode_allow=ext_proc.fail_open,
        message_timeout=_seconds(options.message_timeout),
        request_attributes=list(options.request_attributes),
        processing_mode=processing_mode(options.modes or ext_proc.modes),
    )
    if options.response_attributes:
        config.response_attributes = list(options.response_attributes)
    if options.mutation_rules is not None:
        config.mutation_rules = _mutation_rules(options.mutation_rules)
    if options.route_cache_action != "DEFAULT":
        config.route_cache_action = ExternalProcessorRouteCacheAction[options.route_cache_action]
    if options.override_modes:
        config.allow_mode_override = True
        config.allowed_override_modes = [processing_mode(modes) for modes in options.override_modes]
    if options.max_message_timeout:
        config.max_message_timeout = _seconds(options.max_message_timeout)
    return config


def _route_match(route: host_routes.Route) -> RouteMatch:
    match = RouteMatch(prefix="/" if route.name == "default" else (route.path_prefix or "/"))
    if route.match_headers:
        match.headers = [
            HeaderMatcher(name=name, string_match=StringMatcher(exact=value)) for name, value in route.match_headers
        ]
    return match


def _access_log(path: str, routes: Sequence[host_routes.Route]) -> AccessLog:
    """Envoy's access log as JSON lines: the request, the route and upstream it went to, the
    status and its details, and every dynamic metadata namespace a route receives."""
    fields: dict[str, Any] = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "route": "%ROUTE_NAME%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "duration_ms": "%DURATION%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "request_id": "%REQ(X-REQUEST-ID)%",
    }
    namespaces = sorted({ns for route in routes for ns in route.control.receiving_namespaces})
    if namespaces:
        fields["metadata"] = {ns: f"%DYNAMIC_METADATA({ns})%" for ns in namespaces}
    log_format = SubstitutionFormatString(json_format=Struct.from_dict(fields))
    return AccessLog(
        name="envoy.access_loggers.file", typed_config=AnyMessage.pack(FileAccessLog(path=path, log_format=log_format))
    )


def _health_check(interval: float) -> HealthCheck:
    """Active gRPC health checks of every host endpoint (grpc.health.v1, service ""): a replica
    that reports NOT_SERVING, as the host does from the moment its shutdown starts, gets no new
    streams while its open ones finish. Envoy sees it within interval x UNHEALTHY_THRESHOLD:
    the host's drain delay (drain.drain_seconds_for) covers that."""
    return HealthCheck(
        timeout=_seconds(min(2.0, interval)),
        interval=_seconds(interval),
        no_traffic_interval=_seconds(interval),  # Envoy's default, 60 s, applies until traffic flows
        unhealthy_threshold=UNHEALTHY_THRESHOLD,  # one slow answer from a busy host is not a verdict
        healthy_threshold=1,
        grpc_health_check=HealthCheckGrpcHealthCheck(service_name=""),
    )


def _upstream_clusters(ordered: Sequence[host_routes.Route], options: EnvoyOptions, source: str) -> list[Cluster]:
    """``upstream`` and a cluster for every other upstream a route names; ConfigError for one
    with no address."""
    addresses = {"upstream": options.upstream, **dict(options.upstreams)}
    problems = [
        f"{source}: key 'routes.{route.name}.upstream': '{route.upstream}' has no address: "
        f"envoy-config --upstream {route.upstream}=HOST:PORT"
        for route in ordered
        if route.upstream not in addresses
    ]
    if problems:
        raise ConfigError("\n".join(problems))
    return [_cluster(name, [address], http2=False) for name, address in addresses.items()]


def build_bootstrap(
    settings: Settings, routes: dict[str, host_routes.Route], options: EnvoyOptions, source: str
) -> Bootstrap:
    """The whole Envoy bootstrap; ConfigError on settings Envoy cannot be configured for."""
    ordered = ordered_routes(routes, source)
    filters = ext_proc_filters(ordered, options.message_timeout) if options.ext_proc else []
    serving = {route.name: ext_proc for ext_proc in filters for route in ext_proc.routes}
    envoy_routes = []
    for route in ordered:
        envoy_route = Route(
            name=route.name,
            match=_route_match(route),
            route=RouteAction(cluster=route.upstream, timeout=_seconds(0)),
        )
        per_filter = {}
        for ext_proc in filters:
            per_route = (
                _per_route(route, ext_proc) if serving.get(route.name) is ext_proc else ExtProcPerRoute(disabled=True)
            )
            if per_route is not None:
                per_filter[ext_proc.name] = AnyMessage.pack(per_route)
        if per_filter:
            envoy_route.typed_per_filter_config = per_filter
        if options.ext_proc and route.modes.buffer_limit_bytes is not None:
            envoy_route.request_body_buffer_limit = route.modes.buffer_limit_bytes
        envoy_routes.append(envoy_route)
    http_filters = []
    grpc_service = _grpc_service(settings, options)  # one host for every filter
    for ext_proc in filters:
        config = _filter_config(ext_proc, grpc_service)
        if ext_proc.options.observe:
            # Observing never fails an exchange: a host that is down or refuses is skipped.
            config.failure_mode_allow = True
            config.observability_mode = True
            config.deferred_close_timeout = _seconds(options.observe_close_timeout)
        http_filters.append(HttpFilter(name=ext_proc.name, typed_config=AnyMessage.pack(config)))
    http_filters.append(HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(Router())))
    manager = HttpConnectionManager(
        stat_prefix="ingress",
        codec_type=HttpConnectionManagerCodecType.AUTO,  # HTTP/1.1 and h2c on one port
        request_timeout=_seconds(0),  # large uploads take a while
        stream_idle_timeout=_seconds(300),
        http2_protocol_options=Http2ProtocolOptions(
            initial_stream_window_size=H2_STREAM_WINDOW, initial_connection_window_size=H2_CONNECTION_WINDOW
        ),
        route_config=RouteConfiguration(
            name="routes", virtual_hosts=[VirtualHost(name="all", domains=["*"], routes=envoy_routes)]
        ),
        http_filters=http_filters,
    )
    if options.access_log is not None:
        manager.access_log = [_access_log(options.access_log, ordered)]
    listen_address, _ = _socket(options.listen, connect=False)
    listener = Listener(
        name="ingress",
        address=listen_address,
        per_connection_buffer_limit_bytes=options.listener_buffer_limit,
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(name="envoy.filters.network.http_connection_manager", typed_config=AnyMessage.pack(manager))
                ]
            )
        ],
    )
    clusters = []
    if options.ext_proc and options.grpc_client == "envoy":
        extproc = _cluster("extproc", options.host_addresses or [settings.server.listen], http2=True)
        if options.health_check_interval is not None:
            extproc.health_checks = [_health_check(options.health_check_interval)]
            # No panic mode: with fewer than half the replicas healthy (scaling 3 -> 1), Envoy
            # would otherwise spread streams over the stopping ones too, which refuse them.
            extproc.common_lb_config = ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0))
        # Envoy opens no more streams on a connection than the host takes: without it, Envoy's
        # first burst on a new connection, before the host's SETTINGS arrive, may pass the limit
        # and the streams over it are refused (Envoy's gRPC client does not retry them).
        h2 = Http2ProtocolOptions(max_concurrent_streams=settings.server.http2.max_concurrent_streams)
        if options.extproc_window is not None:
            h2.initial_stream_window_size = options.extproc_window
            h2.initial_connection_window_size = 16 * options.extproc_window
        extproc.typed_extension_protocol_options = {
            HTTP_OPTIONS: AnyMessage.pack(
                HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=h2)
                )
            )
        }
        extproc.per_connection_buffer_limit_bytes = options.extproc_buffer_limit
        clusters.append(extproc)
    clusters.extend(_upstream_clusters(ordered, options, source))
    admin = Admin(
        address=Address(socket_address=SocketAddress(address=options.admin_address, port_value=options.admin_port))
    )
    return Bootstrap(admin=admin, static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters))


def to_plain(bootstrap: Bootstrap) -> dict[str, Any]:
    """The bootstrap as plain dicts with Envoy's snake_case field names."""
    from betterproto2 import Casing

    plain = bootstrap.to_dict(casing=Casing.SNAKE)
    return {"admin": plain.pop("admin"), **plain}  # admin first, as people write it


def render_yaml(bootstrap: Bootstrap, header: str) -> str:
    """YAML text: ``header`` as comment lines, then the bootstrap."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + "\n" + yaml.safe_dump(to_plain(bootstrap), sort_keys=False, width=120)
