"""An Envoy bootstrap built from the host's settings (``extproc-host envoy-config``).

Built from envoy-data-plane's typed messages (a misspelt field is a Python error, not a config
Envoy rejects at start-up), turned into a dict and then YAML. One Envoy route per settings
route, matching its ``path_prefix`` (longest first, ``default`` last on ``/``); the ext_proc
filter sends ``xds.route_name``; each route gets the processing mode its chain needs
(:mod:`extproc_host.modes`) and its failure policy (``fail_open`` ->
``failure_mode_allow``). Two clusters: ``extproc`` (HTTP/2, the host) and ``upstream``. The
filter reaches the host through Envoy's own gRPC client and the ``extproc`` cluster
(``envoy_grpc``, the default), or through gRPC's C++ client straight to one address
(``google_grpc``, ``--grpc-client google``), which has no cluster, so no health checks.

envoy-data-plane takes a moment to import: only this command imports this module.
"""

from __future__ import annotations

import datetime
import ipaddress
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

# envoy-data-plane's generated models trip pydantic deprecation warnings on import: not ours to fix.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
    from envoy_data_plane.envoy.config.cluster.v3 import (
        CircuitBreakers,
        CircuitBreakersThresholds,
        Cluster,
        ClusterCommonLbConfig,
        ClusterDiscoveryType,
        ClusterDnsLookupFamily,
    )
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
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
        ExternalProcessor,
        ExtProcOverrides,
        ExtProcPerRoute,
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
    from envoy_data_plane.envoy.type.v3 import Percent
    from envoy_data_plane.google.protobuf import Any as AnyMessage

from .. import routes as host_routes
from ..drain import UNHEALTHY_THRESHOLD
from ..listeners import UNIX_PREFIX, parse_address
from ..modes import RouteModes, ordered_routes, route_modes
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


def _per_route(
    modes: RouteModes, fail_open: bool, filter_modes: RouteModes, filter_fail_open: bool
) -> ExtProcPerRoute | None:
    """The route's ExtProcPerRoute: disabled, overrides where it differs from the filter, or None."""
    if modes.disabled:
        return ExtProcPerRoute(disabled=True)
    overrides = ExtProcOverrides()
    changed = False
    if processing_mode(modes) != processing_mode(filter_modes):
        overrides.processing_mode = processing_mode(modes)
        changed = True
    if fail_open != filter_fail_open:
        overrides.failure_mode_allow = fail_open
        changed = True
    return ExtProcPerRoute(overrides=overrides) if changed else None


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


def build_bootstrap(
    settings: Settings, routes: dict[str, host_routes.Route], options: EnvoyOptions, source: str
) -> Bootstrap:
    """The whole Envoy bootstrap; ConfigError on settings Envoy cannot be configured for."""
    ordered = ordered_routes(routes, source)
    modes = {r.name: route_modes(r, settings.routes[r.name], source) for r in ordered}
    fail_open = {r.name: r.failure_policy == "fail_open" for r in ordered}
    default = modes["default"]
    filter_modes = default if not (default.disabled or default.observe) else RouteModes()
    # Observe-only routes go to a second filter in observability mode, whose default modes are
    # the first such route's (the default route's when it observes).
    observing = [modes[r.name] for r in reversed(ordered) if modes[r.name].observe]
    observe_modes = observing[0] if observing else None
    envoy_routes = []
    for route in ordered:
        envoy_route = Route(
            name=route.name,
            match=RouteMatch(prefix="/" if route.name == "default" else route.path_prefix),
            route=RouteAction(cluster="upstream", timeout=_seconds(0)),
        )
        if options.ext_proc:
            mine = modes[route.name]
            per_filter = {}
            per_route = (
                ExtProcPerRoute(disabled=True)
                if mine.observe
                else _per_route(mine, fail_open[route.name], filter_modes, fail_open["default"])
            )
            if per_route is not None:
                per_filter[EXT_PROC_FILTER] = AnyMessage.pack(per_route)
            if observe_modes is not None:
                observer = (
                    _per_route(mine, True, observe_modes, True) if mine.observe else ExtProcPerRoute(disabled=True)
                )
                if observer is not None:
                    per_filter[EXT_PROC_OBSERVE_FILTER] = AnyMessage.pack(observer)
            if per_filter:
                envoy_route.typed_per_filter_config = per_filter
            if modes[route.name].buffer_limit_bytes is not None:
                envoy_route.request_body_buffer_limit = modes[route.name].buffer_limit_bytes
        envoy_routes.append(envoy_route)
    http_filters = []
    if options.ext_proc:
        ext_proc = ExternalProcessor(
            grpc_service=_grpc_service(settings, options),
            failure_mode_allow=fail_open["default"],
            message_timeout=_seconds(options.message_timeout),
            request_attributes=["xds.route_name"],
            processing_mode=processing_mode(filter_modes),
        )
        http_filters.append(HttpFilter(name=EXT_PROC_FILTER, typed_config=AnyMessage.pack(ext_proc)))
        if observe_modes is not None:
            watcher = ExternalProcessor(
                grpc_service=_grpc_service(settings, options),
                # Observing never fails an exchange: a host that is down or refuses is skipped.
                failure_mode_allow=True,
                observability_mode=True,
                deferred_close_timeout=_seconds(options.observe_close_timeout),
                request_attributes=["xds.route_name"],
                processing_mode=processing_mode(observe_modes),
            )
            http_filters.append(HttpFilter(name=EXT_PROC_OBSERVE_FILTER, typed_config=AnyMessage.pack(watcher)))
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
        if options.extproc_window is not None:
            h2 = Http2ProtocolOptions(
                initial_stream_window_size=options.extproc_window,
                initial_connection_window_size=16 * options.extproc_window,
            )
            extproc.typed_extension_protocol_options = {
                HTTP_OPTIONS: AnyMessage.pack(
                    HttpProtocolOptions(
                        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=h2)
                    )
                )
            }
        extproc.per_connection_buffer_limit_bytes = options.extproc_buffer_limit
        clusters.append(extproc)
    clusters.append(_cluster("upstream", [options.upstream], http2=False))
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
