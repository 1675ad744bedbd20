"""Prometheus metrics and their HTTP exporter (``[server] metrics_listen``).

The hot path stays cheap: what is counted lives in plain ints and lists bound once per route
and per plugin hook (body bytes are summed on the stream and added once when it ends), and
prometheus-client only turns them into metric families when the endpoint is scraped, in the
exporter's thread. Only hooks that plugins implement are timed, so a chain that passes bodies
through untouched is never timed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .plugin import DIRECTIONS, TIMED_HOOKS, overridden_hooks
from .routes import Route
from .wire import Budget

OUTCOMES = ("ok", "rejected", "failed", "aborted", "refused")
WAYS = ("in", "out")  # in: received from Envoy; out: what the chain passed on
#: Seconds: from 10 µs (a passthrough hook) to 5 s (a plugin waiting on a slow disk).
HOOK_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class HookTimer:
    """A histogram of one plugin hook's call times: plain counts, read at scrape time."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(HOOK_BUCKETS) + 1)  # the last one: above every bucket
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(HOOK_BUCKETS, seconds)] += 1
        self.total += seconds


class RouteCounts:
    """One route's counters: ``streams[outcome]`` and ``bytes[(direction, way)]``."""

    __slots__ = ("bytes", "streams")

    def __init__(self) -> None:
        self.streams = dict.fromkeys(OUTCOMES, 0)
        self.bytes = {(d, w): 0 for d in DIRECTIONS for w in WAYS}


class Metrics(Collector):
    """The host's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteCounts] = {}
        self.timers: dict[tuple[str, str], HookTimer] = {}
        self.errors: dict[str, int] = {}
        self.active: Callable[[], float] = lambda: 0
        self.budget: Budget | None = None
        self.refused: dict[str, int] = {}  # reason -> new streams refused
        self.limit_failures: dict[str, int] = {}  # [server] setting -> streams failed by it
        self.reclaims = 0  # memory reclaims after streams ended abnormally
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def bind(self, routes: Iterable[Route]) -> dict[tuple[str, str], HookTimer]:
        """Make every route's counters up front; return the hook timers ``{(plugin, hook): timer}``
        for the hooks the routes' plugins implement."""
        for route in routes:
            self.route(route.name)
            for link in route.chain:
                for hook in set(TIMED_HOOKS) & set(overridden_hooks(link.info.cls)):
                    self.timers.setdefault((link.info.name, hook), HookTimer())
        return self.timers

    def route(self, name: str) -> RouteCounts:
        """The counters of route ``name`` (made on first use)."""
        found = self.routes.get(name)
        if found is None:
            found = self.routes[name] = RouteCounts()
        return found

    def plugin_failed(self, plugin: str) -> None:
        self.errors[plugin] = self.errors.get(plugin, 0) + 1

    def track_active(self, count: Callable[[], float], budget: Budget | None = None) -> None:
        """Read the open-stream gauge from ``count()`` (and the budget's gauges from ``budget``)
        at each scrape (nothing on the hot path)."""
        self.active = count
        self.budget = budget

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from the plain counts (called by the exporter at scrape)."""
        streams = CounterMetricFamily(
            "extproc_streams", "ext_proc streams by route and how they ended", labels=["route", "outcome"]
        )
        body = CounterMetricFamily(
            "extproc_body_bytes",
            "Body bytes by route and direction: received from Envoy (in) and passed on by the chain (out)",
            labels=["route", "direction", "way"],
        )
        for name, counts in list(self.routes.items()):
            for outcome, value in list(counts.streams.items()):
                streams.add_metric([name, outcome], value)
            for (direction, way), value in list(counts.bytes.items()):
                body.add_metric([name, direction, way], value)
        hooks = HistogramMetricFamily(
            "extproc_plugin_hook_seconds",
            "Time in one plugin hook call (per body chunk for body hooks)",
            labels=["plugin", "hook"],
        )
        for (plugin, hook), timer in list(self.timers.items()):
            bucket_counts, cumulative, buckets = list(timer.counts), 0, []
            for bound, count in zip((*map(str, HOOK_BUCKETS), "+Inf"), bucket_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            hooks.add_metric([plugin, hook], buckets, timer.total)
        errors = CounterMetricFamily(
            "extproc_plugin_errors", "Plugin hooks (close included) that raised, by plugin", labels=["plugin"]
        )
        for plugin, value in list(self.errors.items()):
            errors.add_metric([plugin], value)
        active = GaugeMetricFamily(
            "extproc_active_streams", "ext_proc streams open now (plugins not closed yet)", value=self.active()
        )
        budget = self.budget
        held = GaugeMetricFamily(
            "extproc_held_bytes",
            "Bytes the open streams reserve and hold now, against the budget ([server] max_held_bytes)",
            value=budget.total if budget is not None else 0,
        )
        reserved = GaugeMetricFamily(
            "extproc_reserved_bytes",
            "Of extproc_held_bytes, what open streams reserve (the stream and its first window)",
            value=budget.reserved if budget is not None else 0,
        )
        held_back = CounterMetricFamily(
            "extproc_windows_held_back",
            "Stream windows left at their first size because the budget had no room (Envoy held back)",
            value=budget.held_back if budget is not None else 0,
        )
        refused = CounterMetricFamily(
            "extproc_streams_refused",
            "New streams refused, by reason: shutting_down, max_concurrent_streams, max_held_bytes",
            labels=["reason"],
        )
        for reason, value in list(self.refused.items()):
            refused.add_metric([reason], value)
        limits = CounterMetricFamily(
            "extproc_stream_limit_failures",
            "Streams failed by a [server] limit: max_message_bytes, max_held_bytes, idle_timeout_seconds",
            labels=["limit"],
        )
        for limit, value in list(self.limit_failures.items()):
            limits.add_metric([limit], value)
        reclaims = CounterMetricFamily(
            "extproc_memory_reclaims", "Garbage collections run after streams ended abnormally", value=self.reclaims
        )
        return iter((streams, body, hooks, errors, active, held, reserved, held_back, refused, limits, reclaims))

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
