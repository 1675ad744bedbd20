"""Envoy killed (SIGKILL) while three full-duplex uploads stream through the host: the host's
streams end as aborted, file_tee leaves only ``.partial`` files (nothing that looks complete),
no stream stays open, and the host keeps running and answering health checks."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import psutil
import pytest
from e2e_clients import MiB
from ops_helpers import SERVING, PausedUpload, health_status, sample, scrape, wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROUTE = "/full-duplex-streamed"  # config/full_duplex.toml: file_tee copies both bodies
UPLOADS = 3


async def upload(url: str, body: PausedUpload) -> object:
    """POST ``body``; the status, or the client error when the connection is cut."""
    try:
        async with aiohttp.ClientSession() as session, session.post(url, data=body.chunks()) as response:
            await response.read()
            return response.status
    except aiohttp.ClientError as exc:
        return exc


def test_envoy_killed_mid_upload_leaves_only_partial_files(tmp_path: Path, payload) -> None:
    tee = tmp_path / "tee"
    tee.mkdir()
    env = {"EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": str(tee), "EXTPROC_SERVER__METRICS_LISTEN": "127.0.0.1:0"}
    body = payload(16 * MiB)
    with Stack("envoy/full_duplex.yaml", "config/full_duplex.toml", host_env=env) as stack:
        assert stack.metrics_url is not None

        async def run() -> list[object]:
            bodies = [PausedUpload(body.path, pause_after=4 * MiB) for _ in range(UPLOADS)]
            tasks = [asyncio.create_task(upload(stack.url + ROUTE, b)) for b in bodies]
            await asyncio.wait_for(asyncio.gather(*(b.paused.wait() for b in bodies)), timeout=30)
            # Every upload is mid-body, its stream open in the host and its copy started (the
            # hidden temporary file exists): kill Envoy.
            await asyncio.to_thread(
                wait_until,
                lambda: sample(scrape(stack.metrics_url), "extproc_active_streams") == UPLOADS,
                10.0,
                f"{UPLOADS} open streams",
            )
            await asyncio.to_thread(
                wait_until,
                lambda: (
                    len([p for p in tee.iterdir() if p.name.startswith(".") and "-request.body." in p.name]) == UPLOADS
                ),
                10.0,
                f"{UPLOADS} request copies started",
            )
            stack.send_signal("envoy", signal.SIGKILL)
            stack.wait_exit("envoy", timeout=10)
            for b in bodies:
                b.release()
            return await asyncio.gather(*tasks)

        outcomes = asyncio.run(run())
        assert all(not isinstance(o, int) for o in outcomes), outcomes  # no client got a status

        def settled() -> dict:
            samples = scrape(stack.metrics_url)
            done = sample(samples, "extproc_streams_total", route="full-duplex-streamed", outcome="aborted")
            return samples if done == UPLOADS and sample(samples, "extproc_active_streams") == 0 else {}

        samples = wait_until(settled, timeout=15, what="the host to close every stream as aborted")
        assert sample(samples, "extproc_streams_total", route="full-duplex-streamed", outcome="ok") == 0
        files = sorted(p.name for p in tee.iterdir())
        assert files and all(name.endswith(".partial") for name in files), files
        assert len([n for n in files if "-request.body" in n]) == UPLOADS
        assert health_status(stack.host_port) == SERVING
        assert psutil.Process(stack.pids["host"]).status() != psutil.STATUS_ZOMBIE  # still running
