"""Ordinary traffic costs no memory reclaim: Envoy ending each stream as it takes the last
answer (which gRPC reports to the handler as a cancel or a closed generator) is the ordinary end
of an exchange, not an abnormal one, so the upkeep never runs a full collection for it (a
collection every few seconds under load stalls every stream in the process: p99 latency).
Through a real Envoy, on the full-duplex and headers-only routes."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from ops_helpers import sample, scrape, wait_until

from extproc_host.stack import Stack
from extproc_host.upkeep import TICK

pytestmark = pytest.mark.e2e

REQUESTS = 600
CONCURRENCY = 12


async def load(url: str) -> list[int]:
    body = b"x" * 1024
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:

        async def one(i: int) -> int:
            path = "/headers-only/x" if i % 2 else "/"
            async with session.post(url + path, data=body) as response:
                assert await response.read() == body
                return response.status

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def test_ordinary_exchanges_trigger_no_memory_reclaim(tmp_path) -> None:
    env = {"EXTPROC_SERVER__METRICS_LISTEN": "127.0.0.1:0", "EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": str(tmp_path)}
    with Stack("envoy/full_duplex.yaml", "config/full_duplex.toml", host_env=env) as stack:
        assert stack.metrics_url is not None
        statuses = asyncio.run(load(stack.url))
        assert statuses == [200] * REQUESTS

        def counted() -> dict:
            # A stream is counted once the host closed it, which may be just after its client
            # had the answer.
            samples = scrape(stack.metrics_url)
            ok = sum(
                sample(samples, "extproc_streams_total", route=r, outcome="ok") for r in ("default", "headers-only")
            )
            return samples if ok == REQUESTS else {}

        wait_until(counted, 10, f"{REQUESTS} streams counted ok")
        time.sleep(2 * TICK)  # let the upkeep look at least once after the last stream
        assert sample(scrape(stack.metrics_url), "extproc_memory_reclaims_total") == 0
