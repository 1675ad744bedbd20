"""Thousands of long-lived streams through a real Envoy, bounded by bytes, not by a count.

5,000 uploads that trickle their bodies (three 4 KiB pieces a second apart) are open at once
through Envoy and the host (full duplex, passthrough), while an ordinary client sends a 1 KiB
POST every 100 ms. With the shipped budget no stream is refused, every body comes back byte for
byte, and the host's RSS stays within its idle size plus what the budget counts. With a budget
that barely holds the 5,000 streams' reservations, the host holds Envoy back through HTTP/2
flow control (Envoy's ext_proc cluster backs up) and still refuses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import aiohttp
import pytest
from ops_helpers import sample, scrape

from extproc_host.admission import STREAM_COST
from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

KiB = 1024
MiB = 1024 * KiB
UPLOADS = 5000
PIECE = 4 * KiB
PIECES = 3
RESERVE = STREAM_COST + 16 * KiB  # a stream's reservation: its objects and its first window
HOST_CONFIG = """\
[server]
log_level = "warning"
idle_timeout_seconds = 120
metrics_listen = "127.0.0.1:0"
{budget}
[routes.default]
chain = ["passthrough"]
body_mode = "FULL_DUPLEX_STREAMED"
"""


async def trickle(session: aiohttp.ClientSession, url: str, index: int, start: asyncio.Event) -> tuple[int, str, str]:
    body = bytes([index % 251]) * (PIECE * PIECES)

    async def pieces():
        await start.wait()
        for i in range(PIECES):
            yield body[i * PIECE : (i + 1) * PIECE]
            await asyncio.sleep(1.0)

    try:
        async with session.post(url, data=pieces(), headers={"content-type": "application/octet-stream"}) as response:
            echoed = await response.read()
    except aiohttp.ClientError as exc:  # a reset exchange
        return -1, repr(exc), ""
    return response.status, hashlib.sha256(echoed).hexdigest(), hashlib.sha256(body).hexdigest()


async def ordinary(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[tuple[int, float]]:
    results = []
    body = bytes(range(256)) * 4
    while not stop.is_set():
        started = time.monotonic()
        async with session.post(url, data=body) as response:
            echoed = await response.read()
        results.append((response.status if echoed == body else -1, time.monotonic() - started))
        await asyncio.sleep(0.1)
    return results


async def run(stack: Stack) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=240)
    peak = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start, stop = asyncio.Event(), asyncio.Event()
        uploads = [asyncio.ensure_future(trickle(session, f"{stack.url}/up/{i}", i, start)) for i in range(UPLOADS)]
        await asyncio.sleep(0.5)
        start.set()
        background = asyncio.ensure_future(ordinary(session, f"{stack.url}/ordinary", stop))
        while not all(u.done() for u in uploads):
            peak = max(peak, stack.host_rss())
            await asyncio.sleep(0.2)
        stop.set()
        done = [u.result() for u in uploads]
        calls = await background
    return {"uploads": done, "ordinary": calls, "peak": peak}


def serve(tmp_path: Path, budget: str) -> Stack:
    config = tmp_path / "host.toml"
    config.write_text(HOST_CONFIG.format(budget=budget))
    return Stack(None, config, concurrency=2, startup_timeout=60)


@pytest.mark.parametrize("budget", ["shipped", "tight"])
def test_5000_trickling_uploads_are_all_served(tmp_path: Path, budget: str) -> None:
    # "tight": the reservations of the 5,000 streams and 2 MiB more: the bytes in flight pass it.
    setting = "" if budget == "shipped" else f"max_held_bytes = {UPLOADS * RESERVE + 2 * MiB}"
    with serve(tmp_path, setting) as stack:
        idle = stack.host_rss()
        result = asyncio.run(run(stack))
        metrics = scrape(stack.metrics_url)
        ext_proc = {k: v for k, v in stack.envoy_stats("ext_proc").items() if v}
        connections = stack.envoy_stats("cluster.extproc.upstream_cx_total")["cluster.extproc.upstream_cx_total"]
    uploads = result["uploads"]
    ordinary = result["ordinary"]
    peak = result["peak"]
    held_back = sample(metrics, "extproc_windows_held_back_total")
    print(
        f"{budget}: {len(uploads)} uploads, host RSS idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB; "
        f"{len(ordinary)} ordinary requests; {connections} HTTP/2 connections from Envoy; "
        f"windows held back {held_back:.0f}"
    )
    failed = [(status, detail) for status, detail, _ in uploads if status != 200]
    assert not failed, f"{len(failed)} trickling uploads failed: {failed[:3]} {ext_proc}"
    assert all(got == sent for _, got, sent in uploads), "a body came back with other bytes"
    assert ordinary and all(status == 200 for status, _ in ordinary), ordinary[:5]
    assert sample(metrics, "extproc_streams_refused_total", reason="max_held_bytes") == 0
    assert sample(metrics, "extproc_held_bytes") == 0  # all given back
    budget_bytes = 256 * MiB if budget == "shipped" else UPLOADS * RESERVE + 2 * MiB
    assert peak - idle < budget_bytes, "the host held more than its budget"
    if budget == "tight":
        assert held_back > 0, "the budget never held a window back"
