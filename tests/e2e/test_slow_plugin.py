"""A chain slower than the traffic: a plugin sleeping on every chunk of a 70 MiB full-duplex
upload, through a real Envoy. The host takes chunks only as fast as its chain handles them,
so its memory stays bounded well below the body size; Envoy holds what the host has not
taken yet (envoyproxy/envoy#39514: no flow control on the full-duplex side stream), which
is reported, not asserted."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from e2e_clients import MiB, h1_request

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BODY = 70 * MiB
# Envoy sends this upload in chunks of about 1 MiB (~75 per direction): 20 ms per chunk
# makes the chain a few times slower than the same upload without it (10-17 MiB/s here).
DELAY_MS = 20
# Peak host RSS growth allowed during the upload, over its RSS before. A host that read ahead
# of its chain without limit would hold a large part of the 70 MiB body (plus the echo
# coming back); one that keeps pace holds a few chunks of up to 1 MiB per direction and
# grpc's receive window. Runs on 2 shared cores measured +10..+14 MiB (+4 MiB with grpc's
# BDP probing off, which keeps the receive window from growing).
HOST_GROWTH_BOUND = 35 * MiB

CONFIG = f"""
[server]
plugin_modules = ["tests.e2e.fault_plugins"]

[routes.default]
chain = ["sleepy"]
[routes.default.plugins.sleepy]
delay_ms = {DELAY_MS}
"""


@pytest.fixture
def slow_stack(tmp_path):
    config = tmp_path / "host.toml"
    config.write_text(CONFIG)
    env = {"PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    with Stack("envoy/full_duplex.yaml", config, host_env=env) as stack:
        yield stack


async def test_sleeping_plugin_keeps_host_memory_bounded(slow_stack, payload):
    stack = slow_stack
    body = payload(BODY)
    warm = await h1_request(stack.url + "/anything", body=payload(64 * 1024))
    assert warm.status == 200
    host_before, envoy_before = stack.host_rss(), stack.envoy_rss()
    with stack.sampler(interval=0.05) as rss:
        echoed = await h1_request(stack.url + "/anything", body=body)
    assert (echoed.status, echoed.size, echoed.sha256) == (200, body.size, body.sha256)
    samples = len(rss.samples)
    duration = rss.samples[-1].t if rss.samples else 0.0
    msgs = stack.envoy_stats(r"ext_proc.stream_msgs")  # for the report only
    growth = rss.peak_host - host_before
    print(
        f"\n{BODY // MiB} MiB through a chain sleeping {DELAY_MS} ms per chunk: {duration:.1f}s, {samples} samples; "
        f"host RSS {host_before / MiB:.0f} -> peak {rss.peak_host / MiB:.0f} MiB ({growth / MiB:+.0f} MiB); "
        f"Envoy RSS {envoy_before / MiB:.0f} -> peak {rss.peak_envoy / MiB:.0f} MiB; ext_proc messages {msgs}"
    )
    assert psutil.pid_exists(stack.pids["host"])
    assert growth < HOST_GROWTH_BOUND, (host_before, rss.peak_host)
