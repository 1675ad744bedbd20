"""The open-loop latency workload: small POSTs at Poisson arrival times, per route and rate.

For each route (``fd``: 1 KiB POSTs to the full-duplex route; ``headers``: the same to the
headers-only route) and each offered rate, an unmeasured warm-up at that rate (``--warmup``
seconds, which also opens the pool's connections), then ``--latency-duration`` seconds of
requests started at the times :func:`openloop.poisson_schedule` fixes in advance (the same seeds
for every setup), latency counted from each scheduled start (see :mod:`openloop`).

The client is one asyncio event loop (uvloop) in this process with an aiohttp pool of
keep-alive connections, so each request costs the client a fraction of what it costs Envoy; its
own cost is measured, not assumed: ``client_cpu_us_per_request`` (this process's CPU per
request) and the lag between each scheduled start and the moment the request actually went out.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiohttp
import uvloop

from common import ACCEPT_ENCODING, FD_PATH, HEADERS_PATH, WorkloadError
from extproc_host.stack import Stack
from measure import CpuMeter
from openloop import latency_figures, poisson_schedule, run_open_loop
from workloads import decode_body

#: Route label and request path of each latency pass, in the order they run.
LATENCY_ROUTES = (("fd", FD_PATH), ("headers", HEADERS_PATH))
#: Seconds a single request may take before it counts as an error.
REQUEST_TIMEOUT = 10.0


def latency_key(route: str, rate: int, stat: str) -> str:
    """The flat result key of one figure, e.g. ``lat_fd_800_p99_ms``."""
    return f"lat_{route}_{rate}_{stat}"


async def _open_loop_pass(
    url: str, body: bytes, rate: int, seed: int, args: argparse.Namespace, stack: Stack
) -> dict[str, Any]:
    """One warm-up and one measured open-loop run at ``rate`` on a fresh connection pool."""
    connector = aiohttp.TCPConnector(limit=args.latency_connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    headers = {"content-type": "application/octet-stream", "accept-encoding": ACCEPT_ENCODING}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers, auto_decompress=False
    ) as session:

        async def send() -> None:
            async with session.post(url, data=body) as response:
                raw = await response.read()
                status, encoding = response.status, response.headers.get("content-encoding", "")
            if status != 200 or decode_body(raw, encoding) != body:
                raise WorkloadError(f"status {status}, {len(raw)} bytes back, expected the {len(body)}-byte body")

        limit = args.latency_max_requests
        if args.warmup > 0:
            warmup = poisson_schedule(rate, args.warmup, seed=seed + 1, max_requests=limit)
            await run_open_loop(warmup, send, drain_timeout=REQUEST_TIMEOUT)
        schedule = poisson_schedule(rate, args.latency_duration, seed=seed, max_requests=limit)
        with CpuMeter(stack) as cpu:
            outcomes = await run_open_loop(schedule, send, drain_timeout=REQUEST_TIMEOUT)
    figures = latency_figures(outcomes, args.latency_duration)
    served = figures["completed"]
    figures["client_cpu_us_per_request"] = cpu.per_request_us("client", served)
    figures["server_cpu_us_per_request"] = cpu.per_request_us("host", served) if stack.runs_host else None
    figures["cpu_cores"] = cpu.cores()
    return figures


def run_latency(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """Every route at every rate in ``args.rates``; flat ``lat_*`` keys for the report, the
    figures of each pass under ``passes``."""
    body = b"x" * args.body_bytes  # what wrk's post.lua sends
    result: dict[str, Any] = {"passes": [], "failures": []}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner, CpuMeter(stack) as cpu:
        for index, (route, path) in enumerate(LATENCY_ROUTES):
            for rate in args.rates:
                seed = 1000 * rate + 10 * index
                figures = runner.run(_open_loop_pass(stack.url + path, body, rate, seed, args, stack))
                result["passes"].append({"route": route, "path": path, "rate": rate, **figures})
                for stat in ("p50_ms", "p99_ms", "lag_p99_ms", "client_cpu_us_per_request"):
                    if figures.get(stat) is not None:
                        result[latency_key(route, rate, stat)] = figures[stat]
                if figures["errors"]:
                    result["failures"].append(
                        f"latency {route} {rate}/s: {figures['errors']} of {figures['scheduled']} requests failed, "
                        f"e.g. {figures['error_samples'][0]}"
                    )
    result["cpu_seconds"] = cpu.seconds
    result["cpu_cores"] = cpu.cores()
    return result
