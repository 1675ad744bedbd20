"""What metrics (``[server] metrics_listen``) cost the host, in process, without Envoy.

    .venv/bin/python benchmarks/hook_timing.py [--calls 200000] [--plugins 1]

Per hook call: runs a chain of ``--plugins`` plugins whose request-body hook returns its
chunk, ``--calls`` times, once without hook timers and once with the histograms the host binds
when metrics are on, and prints the time per chain call of each and the difference per hook
call. Per stream: the time to add one ended stream (outcome and body bytes of both
directions) to the counters. Best of 5 rounds each, alternating, so that noise from other work
on the machine falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pydantic import BaseModel

from extproc_host.admission import Admission
from extproc_host.chain import Chain, ChainPlan
from extproc_host.metrics import Metrics
from extproc_host.plugin import Plugin, StreamInfo
from extproc_host.processor import Router, StreamProcessor
from extproc_host.routes import ChainLink, PluginInfo, Route


class NoSettings(BaseModel):
    """The plugin takes no settings."""


class Same(Plugin):
    """Returns every request-body chunk as it came."""

    name = "same"

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk


def make_route(plugins: int) -> Route:
    info = PluginInfo("same", Same, "benchmarks", "0", ("on_request_body",))
    return Route("bench", tuple(ChainLink(info, NoSettings()) for _ in range(plugins)), "fail_closed")


async def per_call(chain: Chain, calls: int) -> float:
    chunk = b"x" * 1024
    start = time.perf_counter()
    for _ in range(calls):
        await chain.body("request", chunk, False)
    return (time.perf_counter() - start) / calls


def per_stream(metrics: Metrics, route: Route, calls: int) -> float:
    """Seconds to count one ended stream that carried bodies both ways."""
    router = Router({"default": route}, metrics)
    admission = Admission(router, metrics)
    stream = StreamProcessor(router, "1", plan=ChainPlan.for_route(route))
    for d in (stream.request, stream.response):
        d.bytes_in = d.bytes_out = 1024
    start = time.perf_counter()
    for _ in range(calls):
        admission.count(stream, None)
    return (time.perf_counter() - start) / calls


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--plugins", type=int, default=1)
    args = parser.parse_args()
    route = make_route(args.plugins)
    plan = ChainPlan.for_route(route)
    metrics = Metrics()
    timers = metrics.bind([route])
    plain = Chain(plan, StreamInfo("1", "bench"))
    timed = Chain(plan, StreamInfo("2", "bench"), timers)
    best_plain = best_timed = float("inf")
    for _ in range(5):
        best_plain = min(best_plain, await per_call(plain, args.calls))
        best_timed = min(best_timed, await per_call(timed, args.calls))
    extra = (best_timed - best_plain) / args.plugins
    print(f"chain of {args.plugins} plugin(s), {args.calls} calls, best of 5:")
    print(f"  without timers {best_plain * 1e6:.2f} µs per chain call")
    print(f"  with timers    {best_timed * 1e6:.2f} µs per chain call")
    print(f"  timing costs   {extra * 1e6:.2f} µs per hook call")
    counting = min(per_stream(metrics, route, args.calls) for _ in range(5))
    print(f"counting an ended stream (outcome, bytes both ways): {counting * 1e6:.2f} µs per stream")


if __name__ == "__main__":
    asyncio.run(main())
