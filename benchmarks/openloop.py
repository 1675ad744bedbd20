"""Open-loop latency, the pure parts: Poisson arrival schedules, nearest-rank percentiles, and a
driver that starts each request at its scheduled time whatever the server does.

A closed-loop client (wrk, or hey with a rate limit) sends the next request when a previous one
has finished, so a slow server slows the client down and the requests that would have waited
are never measured. Here every request has a start time fixed in advance (a Poisson process of
the offered rate) and its latency is counted from that scheduled start, not from when it was
actually sent: time a request spent waiting for a late client, a busy event loop or a free
connection is latency the user would have seen.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any


def poisson_schedule(rate: float, duration: float, *, seed: int, max_requests: int) -> list[float]:
    """Start offsets in seconds of a Poisson process of ``rate`` arrivals per second over
    ``duration`` seconds (exponential gaps, seeded), at most ``max_requests`` of them."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    while len(offsets) < max_requests:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        offsets.append(t)
    return offsets


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) by nearest rank: the smallest value that at least
    ``q`` percent of the values are at or below."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is not in (0, 100]")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@dataclass
class Outcome:
    """One request of an open-loop run; times are seconds from the run's start."""

    scheduled: float
    sent: float | None = None
    done: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """It finished without an error."""
        return self.done is not None and self.error is None

    @property
    def latency(self) -> float:
        """From the scheduled start to the end of the response."""
        if self.done is None:
            raise ValueError("the request did not finish")
        return self.done - self.scheduled

    @property
    def lag(self) -> float:
        """How late the client started it: the load generator's own delay."""
        if self.sent is None:
            raise ValueError("the request was not sent")
        return self.sent - self.scheduled


async def run_open_loop(
    schedule: Sequence[float],
    send: Callable[[], Awaitable[None]],
    *,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    drain_timeout: float = 30.0,
) -> list[Outcome]:
    """Start ``send()`` at every offset of ``schedule`` (a request whose time has passed starts at
    once, without waiting for earlier ones to finish), then wait up to ``drain_timeout`` seconds
    for the stragglers. ``send`` raises on a wrong response; its message becomes the error."""
    t0 = clock()
    outcomes = [Outcome(offset) for offset in schedule]
    tasks: list[asyncio.Task[None]] = []

    async def one(outcome: Outcome) -> None:
        outcome.sent = clock() - t0
        try:
            await send()
        except Exception as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.done = clock() - t0

    for outcome in outcomes:
        delay = outcome.scheduled - (clock() - t0)
        if delay > 0:
            await sleep(delay)
        tasks.append(asyncio.create_task(one(outcome)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for outcome in outcomes:
        if outcome.done is None:
            outcome.error = f"no response within {drain_timeout:g} s after the last start"
    return outcomes


def latency_figures(outcomes: Sequence[Outcome], duration: float) -> dict[str, Any]:
    """Percentiles in ms of the finished requests' latency and of the client's lag, the offered
    and achieved rates, and the errors (the first few messages)."""
    finished = [o for o in outcomes if o.ok]
    errors = [o.error for o in outcomes if o.error]
    figures: dict[str, Any] = {
        "scheduled": len(outcomes),
        "completed": len(finished),
        "offered_rps": len(outcomes) / duration,
        "errors": len(errors),
        "error_samples": errors[:5],
    }
    if finished:
        latencies = [o.latency * 1000 for o in finished]
        lags = [o.lag * 1000 for o in finished]
        figures.update(
            {f"p{q}_ms": percentile(latencies, q) for q in (50, 90, 99)},
            max_ms=max(latencies),
            lag_p50_ms=percentile(lags, 50),
            lag_p99_ms=percentile(lags, 99),
        )
    return figures
