"""Prometheus metrics and their HTTP exporter (``[server] metrics_listen``).

The hot path stays cheap: body bytes are summed in plain ints on the stream and added to the
counters once when the stream ends, label children are bound once per route and per plugin
hook, and only plugins that have a hook are timed (a chain that passes bodies through
untouched is never timed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from .chain import BODY_HOOKS, HEADER_HOOKS
from .plugin import overridden_hooks
from .registry import Route

OUTCOMES = ("ok", "rejected", "failed", "aborted", "refused")
DIRECTIONS = ("request", "response")
WAYS = ("in", "out")  # in: received from Envoy; out: what the chain passed on
#: Seconds: from 10 µs (a passthrough hook) to 5 s (a plugin waiting on a slow disk).
HOOK_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
TIMED_HOOKS = (*(hook for pair in BODY_HOOKS.values() for hook in pair), *HEADER_HOOKS.values())


@dataclass
class RouteMetrics:
    """One route's label children, bound once: ``streams[outcome]``, ``bytes[(direction, way)]``."""

    streams: dict[str, Counter]
    bytes: dict[tuple[str, str], Counter]


class Metrics:
    """The host's metrics in a registry of their own."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: one per label set, of no use here
        self.registry = CollectorRegistry()
        self.streams = Counter(
            "extproc_streams", "ext_proc streams by route and how they ended", ["route", "outcome"], registry=self.registry
        )
        self.body_bytes = Counter(
            "extproc_body_bytes",
            "Body bytes by route and direction: received from Envoy (in) and passed on by the chain (out)",
            ["route", "direction", "way"],
            registry=self.registry,
        )
        self.hook_seconds = Histogram(
            "extproc_plugin_hook_seconds",
            "Time in one plugin hook call (per body chunk for body hooks)",
            ["plugin", "hook"],
            buckets=HOOK_BUCKETS,
            registry=self.registry,
        )
        self.plugin_errors = Counter(
            "extproc_plugin_errors", "Plugin hooks (close included) that raised, by plugin", ["plugin"], registry=self.registry
        )
        self.active_streams = Gauge(
            "extproc_active_streams", "ext_proc streams open now (plugins not closed yet)", registry=self.registry
        )
        self._routes: dict[str, RouteMetrics] = {}
        self._errors: dict[str, Counter] = {}

    def bind(self, routes: Iterable[Route]) -> dict[tuple[str, str], Histogram]:
        """Bind every route's children up front; return the hook timers ``{(plugin, hook): child}``."""
        timers = {}
        for route in routes:
            self.route(route.name)
            for link in route.chain:
                for hook in set(TIMED_HOOKS) & set(overridden_hooks(link.info.cls)):
                    timers[link.info.name, hook] = self.hook_seconds.labels(link.info.name, hook)
        return timers

    def route(self, name: str) -> RouteMetrics:
        """The label children of route ``name`` (bound on first use)."""
        found = self._routes.get(name)
        if found is None:
            found = RouteMetrics(
                {outcome: self.streams.labels(name, outcome) for outcome in OUTCOMES},
                {(d, w): self.body_bytes.labels(name, d, w) for d in DIRECTIONS for w in WAYS},
            )
            self._routes[name] = found
        return found

    def plugin_failed(self, plugin: str) -> None:
        counter = self._errors.get(plugin)
        if counter is None:
            counter = self._errors[plugin] = self.plugin_errors.labels(plugin)
        counter.inc()

    def track_active(self, count: Callable[[], float]) -> None:
        """Read the open-stream gauge from ``count()`` at each scrape (nothing on the hot path)."""
        self.active_streams.set_function(count)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter (a daemon thread) on ``host:port``; return the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_port

    def close(self) -> None:
        """Stop the HTTP exporter, if started."""
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
