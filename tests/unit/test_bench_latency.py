"""The open-loop latency workload's pure parts (benchmarks/openloop.py): Poisson schedules,
nearest-rank percentiles, and latency counted from each request's scheduled start, driven by a
fake clock; and the report's added latency (p50 minus direct Envoy's at the same rate)."""

from __future__ import annotations

import asyncio
import statistics
import sys
from pathlib import Path

import pytest

# benchmarks/ is a directory of scripts, not a package: its modules import each other by name.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from openloop import Outcome, latency_figures, percentile, poisson_schedule, run_open_loop
from report import added_latency


def test_poisson_schedule_has_the_offered_rate_and_exponential_gaps() -> None:
    rate, duration = 800, 100.0
    offsets = poisson_schedule(rate, duration, seed=42, max_requests=1_000_000)
    assert abs(len(offsets) - rate * duration) < 0.02 * rate * duration
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.02)
    # Exponential gaps: their standard deviation equals their mean (evenly spaced ones have 0).
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert all(g > 0 for g in gaps) and offsets[-1] < duration


def test_poisson_schedule_is_seeded_and_bounded() -> None:
    first = poisson_schedule(200, 5.0, seed=1, max_requests=10_000)
    assert first == poisson_schedule(200, 5.0, seed=1, max_requests=10_000)
    assert first != poisson_schedule(200, 5.0, seed=2, max_requests=10_000)
    assert poisson_schedule(200, 5.0, seed=1, max_requests=50) == first[:50]
    with pytest.raises(ValueError):
        poisson_schedule(0, 5.0, seed=1, max_requests=10)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    assert percentile([7.5], 99) == 7.5
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 0)


class FakeClock:
    """A clock that moves only when told: sleeping wakes ``late`` seconds after the target
    (a busy client), a request takes ``service`` seconds of the server's time."""

    def __init__(self, late: float, service: float) -> None:
        self.now = 100.0
        self.late = late
        self.service = service

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        target = self.now + delay
        await asyncio.sleep(0)  # let the requests already started run first
        self.now = max(self.now, target) + self.late

    async def send(self) -> None:
        self.now += self.service


async def test_latency_counts_from_the_scheduled_start_not_from_the_send() -> None:
    clock = FakeClock(late=0.003, service=0.001)
    outcomes = await run_open_loop([0.010, 0.020, 0.030], clock.send, clock=clock, sleep=clock.sleep)
    assert [o.scheduled for o in outcomes] == [0.010, 0.020, 0.030]
    for outcome in outcomes:
        assert outcome.ok
        assert outcome.lag == pytest.approx(0.003)  # the client started it 3 ms late...
        assert outcome.latency == pytest.approx(0.004)  # ...and that counts: 3 + 1 ms, not 1 ms
    figures = latency_figures(outcomes, duration=1.0)
    assert figures["p50_ms"] == pytest.approx(4.0) and figures["p99_ms"] == pytest.approx(4.0)
    assert figures["lag_p99_ms"] == pytest.approx(3.0)
    assert figures["completed"] == figures["scheduled"] == 3 and figures["errors"] == 0


async def test_a_stalled_request_does_not_hold_back_the_next_ones() -> None:
    clock = FakeClock(late=0.0, service=0.001)
    release = asyncio.Event()
    calls = 0

    async def send() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()  # the first response takes until the third request is sent
            clock.now += 0.050
        elif calls == 3:
            release.set()
        await clock.send()

    outcomes = await run_open_loop([0.0, 0.010, 0.020], send, clock=clock, sleep=clock.sleep)
    first, second, third = outcomes
    assert second.sent == pytest.approx(0.010) and third.sent == pytest.approx(0.020)
    assert first.done is not None and third.sent is not None and first.done > third.sent
    assert first.latency > 0.050 and second.latency == pytest.approx(0.001)


async def test_failures_and_stragglers_are_errors_not_latencies() -> None:
    clock = FakeClock(late=0.0, service=0.001)
    calls = 0

    async def send() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("status 503")
        if calls == 2:
            await asyncio.Event().wait()  # never answered
        await clock.send()

    outcomes = await run_open_loop([0.0, 0.001, 0.002], send, clock=clock, sleep=clock.sleep, drain_timeout=0.05)
    assert [o.ok for o in outcomes] == [False, False, True]
    assert "status 503" in (outcomes[0].error or "") and "no response" in (outcomes[1].error or "")
    figures = latency_figures(outcomes, duration=1.0)
    assert figures["errors"] == 2 and figures["completed"] == 1
    assert figures["p99_ms"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        _ = Outcome(0.0).latency


def test_added_latency_is_p50_minus_direct_at_the_same_rate() -> None:
    def p50(value: float) -> dict[str, float]:
        return {"median": value}

    summary = {
        "direct": {"lat_fd_800_p50_ms": p50(1.0), "lat_headers_800_p50_ms": p50(0.5)},
        "minimal": {"lat_fd_800_p50_ms": p50(5.0), "lat_headers_800_p50_ms": p50(2.5)},
        "host": {"lat_fd_800_p50_ms": p50(5.5)},
    }
    added = added_latency(summary, [800])
    assert added["lat_fd_800_p50_ms"]["minimal"] == pytest.approx(4.0)
    assert added["lat_fd_800_p50_ms"]["host"] == pytest.approx(4.5)
    assert added["lat_fd_800_p50_ms"]["direct"] == pytest.approx(0.0)
    assert added["lat_headers_800_p50_ms"]["host"] is None  # host did not measure it
