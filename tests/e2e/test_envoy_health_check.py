"""``envoy-config --health-check``: Envoy health-checks the host with grpc.health.v1, and marks
it unhealthy as soon as SIGTERM starts the host's shutdown, while an upload already in flight
still finishes byte for byte (with replicas, Envoy sends new streams to the others)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest
from e2e_clients import MiB, h1_request
from ops_helpers import PausedUpload, sample, scrape, wait_until

from extproc_host.cli import main
from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROUTE = "/full-duplex-streamed"
SETTINGS = f"""
[server]
grace_seconds = 60
metrics_listen = "127.0.0.1:0"

[routes.full-duplex-streamed]
chain = ["passthrough"]
path_prefix = "{ROUTE}"
body_mode = "FULL_DUPLEX_STREAMED"

[routes.default]
chain = ["passthrough"]
body_mode = "FULL_DUPLEX_STREAMED"
"""
HEALTHY = "cluster.extproc.membership_healthy"


async def test_envoy_stops_counting_a_host_that_is_shutting_down(tmp_path: Path, payload) -> None:
    config = tmp_path / "host.toml"
    config.write_text(SETTINGS)
    envoy = tmp_path / "envoy.yaml"
    assert main(["envoy-config", "--config", str(config), "--health-check", "0.3", "-o", str(envoy)]) == 0
    body = payload(8 * MiB)
    with Stack(envoy, config) as stack:

        def healthy() -> int:
            return stack.envoy_stats(r"cluster\.extproc\.membership_healthy").get(HEALTHY, -1)

        await asyncio.to_thread(wait_until, lambda: healthy() == 1, 15, "Envoy to find the host healthy")
        assert (
            stack.envoy_stats(r"cluster\.extproc\.health_check\.success")["cluster.extproc.health_check.success"] >= 1
        )

        upload = PausedUpload(body.path, pause_after=2 * MiB)
        task = asyncio.create_task(h1_request(stack.url + ROUTE, body=body, content=upload.chunks()))
        await asyncio.wait_for(upload.paused.wait(), 30)
        await asyncio.to_thread(
            wait_until, lambda: sample(scrape(stack.metrics_url), "extproc_active_streams") == 1, 15, "the open stream"
        )

        stack.send_signal("host", signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: healthy() == 0, 15, "Envoy to mark the host unhealthy")
        assert not task.done()
        async with httpx.AsyncClient(timeout=30) as client:  # a lone host: nowhere else to go
            assert (await client.post(stack.url + "/other", content=b"new")).status_code >= 500

        upload.release()
        echoed = await asyncio.wait_for(task, 60)
        assert (echoed.status, echoed.size, echoed.sha256) == (200, body.size, body.sha256)
        assert await asyncio.to_thread(stack.wait_exit, "host", 30) == 0
