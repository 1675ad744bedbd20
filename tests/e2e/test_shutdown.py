"""Health and graceful shutdown through a real Envoy: SIGTERM reports NOT_SERVING at once,
refuses new streams, lets an in-flight 70 MiB upload finish byte-exact and exits 0; a stream
still open when the grace period ends (or at a second signal) is cut, its plugins closed, and
the host still exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from e2e_clients import MiB, h1_request
from ops_helpers import NOT_SERVING, SERVING, PausedUpload, health_status, sample, scrape, wait_until

from extproc_host.stack import Stack, extproc_host_command

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ROUTE = "/full-duplex-streamed"


def _host_config(directory: Path, grace: float) -> tuple[Path, Path]:
    record = directory / "closes.jsonl"
    config = directory / "host.toml"
    config.write_text(
        f"""
[server]
grace_seconds = {grace}
metrics_listen = "127.0.0.1:0"
plugin_modules = ["tests.e2e.recording_plugins"]

[plugins.close_recorder]
path = "{record}"

[routes.full-duplex-streamed]
chain = ["close_recorder"]
path_prefix = "{ROUTE}"

[routes.default]
chain = ["passthrough"]
"""
    )
    return config, record


def _closes(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


async def _wait_stream_open(stack: Stack) -> None:
    """Until the host counts one open stream (the paused upload reached it)."""
    await asyncio.to_thread(
        wait_until, lambda: sample(scrape(stack.metrics_url), "extproc_active_streams") == 1, 20, "the open stream"
    )


async def test_sigterm_mid_upload_finishes_it_and_exits_0(tmp_path, payload):
    body = payload(70 * MiB)
    config, record = _host_config(tmp_path, grace=60)
    with Stack("envoy/full_duplex.yaml", config, host_env={"PYTHONPATH": str(ROOT)}) as stack:
        assert health_status(stack.host_port) == SERVING
        assert health_status(stack.host_port, "") == SERVING

        upload = PausedUpload(body.path, pause_after=16 * MiB)
        task = asyncio.create_task(h1_request(stack.url + ROUTE, body=body, content=upload.chunks()))
        await asyncio.wait_for(upload.paused.wait(), 60)
        await _wait_stream_open(stack)

        stack.send_signal("host", signal.SIGTERM)
        # NOT_SERVING during the grace period, while the upload is still in flight.
        await asyncio.to_thread(wait_until, lambda: health_status(stack.host_port) == NOT_SERVING, 10, "NOT_SERVING")
        assert health_status(stack.host_port, "") == NOT_SERVING
        # The container health check command says so too, with a failing exit status.
        probe = subprocess.run(
            [*extproc_host_command(), "health", f"127.0.0.1:{stack.host_port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (probe.returncode, probe.stdout.strip()) == (1, "NOT_SERVING")
        assert not task.done()

        # A new exchange is refused by the host; Envoy's fail-closed policy answers 500.
        async with httpx.AsyncClient(timeout=30) as client:
            refused = await client.post(stack.url + "/anything/else", content=b"new request")
        assert refused.status_code == 500
        host_log = stack.logs["host"].read_text()
        assert "shutting down and takes no new streams" in host_log

        upload.release()
        echoed = await asyncio.wait_for(task, 120)
        assert (echoed.status, echoed.size, echoed.sha256) == (200, body.size, body.sha256)
        assert await asyncio.to_thread(stack.wait_exit, "host", 30) == 0

    (closed,) = _closes(record)
    assert (closed["error"], closed["request_bytes"], closed["request_complete"]) == (None, body.size, True)


@pytest.mark.parametrize(
    ("grace", "signals", "reason"),
    [(1, 1, "grace period of 1.0s over"), (120, 2, "second signal")],
    ids=["grace-expires", "second-signal"],
)
async def test_stalled_stream_is_cut_and_the_host_exits_0(tmp_path, payload, grace, signals, reason):
    body = payload(4 * MiB)
    config, record = _host_config(tmp_path, grace=grace)
    with Stack("envoy/full_duplex.yaml", config, host_env={"PYTHONPATH": str(ROOT)}) as stack:
        upload = PausedUpload(body.path, pause_after=1 * MiB)
        task = asyncio.create_task(h1_request(stack.url + ROUTE, body=body, content=upload.chunks()))
        try:
            await asyncio.wait_for(upload.paused.wait(), 60)
            await _wait_stream_open(stack)
            stack.send_signal("host", signal.SIGTERM)
            if signals == 2:
                await asyncio.to_thread(
                    wait_until, lambda: "shutting down" in stack.logs["host"].read_text(), 10, "shutdown to start"
                )
                stack.send_signal("host", signal.SIGINT)
            # The upload stays stalled: the host gives up on it after the grace, or at once on a
            # second signal (the 120 s grace would outlast this wait).
            assert await asyncio.to_thread(stack.wait_exit, "host", 20) == 0
        finally:
            upload.release()
            try:
                echoed = await asyncio.wait_for(task, 30)
            except Exception as exc:  # the client saw the stream cut: fine, it could not finish
                echoed = exc
        assert getattr(echoed, "sha256", None) != body.sha256, "the cut upload cannot have completed"
        host_log = stack.logs["host"].read_text()
        assert f"{reason}: cancelling 1 open streams" in host_log

    (closed,) = _closes(record)  # the cut stream's plugins were still closed, once, with the error
    assert closed["error"] in ("StreamAborted", "CancelledError"), closed
    assert closed["request_complete"] is False
    assert 0 < closed["request_bytes"] < body.size
