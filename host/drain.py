"""How long a stopping host keeps serving before it refuses new streams (``[server] drain_seconds``).

A load balancer that health-checks the host needs a moment to see NOT_SERVING and take the
host out: until then it keeps sending new streams, and a host that already refuses them (or
has exited) turns each one into a client error. The host therefore stays up for a drain delay,
reporting NOT_SERVING and still serving, that covers the health checker's reaction time:
``interval x unhealthy_threshold`` plus a margin for the check in flight and for Envoy's
workers to get the news. The defaults are those of ``extproc-host envoy-config
--health-check``, so the default drain delay matches the generated Envoy config.
"""

from __future__ import annotations

#: Seconds between Envoy's health checks of each host endpoint in the shipped configs
#: (envoy/compose.yaml, deploy/envoy.yaml: ``envoy-config --health-check 2``).
HEALTH_CHECK_INTERVAL = 2.0
#: Failed checks in a row before Envoy marks an endpoint unhealthy (the generated config's value).
UNHEALTHY_THRESHOLD = 2
#: Added to interval x threshold: the check already in flight, the time for Envoy's workers to
#: see the new host set, scheduling delays on a busy machine.
MARGIN_SECONDS = 1.0


def drain_seconds_for(interval: float, unhealthy_threshold: int = UNHEALTHY_THRESHOLD) -> float:
    """The drain delay that lets a health checker with this ``interval`` (seconds) and
    ``unhealthy_threshold`` see a stopping host go before it refuses streams."""
    return interval * unhealthy_threshold + MARGIN_SECONDS


#: ``[server] drain_seconds`` when the settings do not say: 5 s for the shipped configs' checks.
DEFAULT_DRAIN_SECONDS = drain_seconds_for(HEALTH_CHECK_INTERVAL)
