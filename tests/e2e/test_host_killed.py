"""The host killed (SIGKILL) in the middle of a 70 MiB full-duplex upload, through a real Envoy:
the client gets a 5xx or a reset, never a 200 with a body; while the host is down Envoy answers
5xx; once the host is back on its port, the next uploads come back byte for byte. A killed
host's temporary file_tee copy is removed when it restarts."""

from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import pytest
from e2e_clients import MiB, Payload, h1_request
from ops_helpers import PausedUpload, wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROUTE = "/anything/else"  # envoy/full_duplex.yaml's default route: FULL_DUPLEX_STREAMED
KILL_AFTER = 4  # ext_proc messages Envoy has sent the host for the upload (headers + chunks)
SENT = "http.ingress.ext_proc.stream_msgs_sent"


@pytest.fixture
def killable_stack(tmp_path):
    """A stack of its own (its host gets killed): passthrough on every route."""
    config = tmp_path / "host.toml"
    config.write_text('[routes.default]\nchain = ["passthrough"]\n')
    with Stack("envoy/full_duplex.yaml", config) as stack:
        yield stack


async def upload_and_kill(stack: Stack, body: Payload) -> tuple[int | None, int, str, BaseException | None]:
    """Upload ``body``; once Envoy has sent the host the headers and some body chunks of it,
    SIGKILL the host. Returns the status (None if none arrived), the bytes received, their
    sha256, and the client error if any."""
    baseline = stack.envoy_stats(SENT).get(SENT, 0)

    def kill_mid_stream() -> int:
        deadline = time.monotonic() + 30
        while (sent := stack.envoy_stats(SENT).get(SENT, 0) - baseline) < KILL_AFTER:
            assert time.monotonic() < deadline, f"Envoy sent the host only {sent} messages"
            time.sleep(0.005)
        stack.kill_host()
        return sent

    kill = asyncio.ensure_future(asyncio.to_thread(kill_mid_stream))
    status, size, digest, error = None, 0, hashlib.sha256(), None
    headers = {"content-type": "application/octet-stream", "content-length": str(body.size)}
    try:
        timeout = aiohttp.ClientTimeout(total=60, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            async with session.post(stack.url + ROUTE, data=body.chunks(), headers=headers) as response:
                status = response.status
                async for block in response.content.iter_chunked(MiB):
                    digest.update(block)
                    size += len(block)
    except (aiohttp.ClientError, ConnectionError) as exc:  # a reset mid-exchange
        error = exc
    sent = await asyncio.wait_for(kill, timeout=60)  # the host was killed, whatever the client saw
    print(f"host killed after Envoy sent it {sent} messages of the upload")
    return status, size, digest.hexdigest(), error


async def eventually_ok(stack: Stack, body: Payload, attempts: int = 40) -> tuple[int, float]:
    """Repeat one upload until it comes back whole (Envoy reconnects to the restarted host);
    returns how many attempts and seconds that took."""
    start = time.monotonic()
    last = None
    for attempt in range(1, attempts + 1):
        try:
            echoed = await h1_request(stack.url + ROUTE, body=body)
            if echoed.status == 200 and echoed.sha256 == body.sha256:
                return attempt, time.monotonic() - start
            last = (echoed.status, echoed.size)
        except aiohttp.ClientError as exc:
            last = exc
        await asyncio.sleep(0.25)
    raise AssertionError(f"no upload succeeded in {attempts} attempts after the restart; last: {last!r}")


async def test_host_killed_mid_upload_then_restarted(killable_stack, payload):
    stack = killable_stack
    big, small = payload(70 * MiB), payload(64 * 1024)
    first = await h1_request(stack.url + ROUTE, body=small)
    assert (first.status, first.sha256) == (200, small.sha256)

    status, size, digest, error = await upload_and_kill(stack, big)
    print(f"killed mid-upload: status {status}, {size} bytes back, client error {error!r}")
    assert stack.host_rss() == 0, "the host was not killed"  # 0: not running
    # A 5xx, or the exchange reset (after a 200 header went out, since the echo answers at
    # once): never a complete 200.
    if error is None:
        assert status is not None and status >= 500, (status, size)
    assert not (status == 200 and error is None and digest == big.sha256)

    # Host down: Envoy answers 5xx by itself (fail closed).
    down = await h1_request(stack.url + ROUTE, body=small)
    assert down.status >= 500, down

    await asyncio.to_thread(stack.restart_host)
    attempts, seconds = await eventually_ok(stack, small)
    print(f"first request through the restarted host succeeded after {attempts} attempt(s), {seconds:.2f}s")
    for _ in range(5):
        echoed = await h1_request(stack.url + ROUTE, body=big)
        assert (echoed.status, echoed.size, echoed.sha256) == (200, big.size, big.sha256)


async def test_temporary_copies_left_by_a_killed_host_are_removed_at_restart(tmp_path, payload):
    """SIGKILL leaves file_tee's hidden temporary file behind; the restarted host removes it
    before it serves (it can never become a complete copy)."""
    tee = tmp_path / "tee"
    config = tmp_path / "host.toml"
    config.write_text(f'[plugins.file_tee]\ndirectory = "{tee}"\n[routes.default]\nchain = ["file_tee"]\n')
    body = payload(8 * MiB)
    with Stack(None, config) as stack:  # Envoy's config generated from these settings
        paused = PausedUpload(body.path, pause_after=2 * MiB)

        async def upload() -> None:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(stack.url + ROUTE, data=paused.chunks()) as response,
                ):
                    await response.read()
            except aiohttp.ClientError:
                pass

        task = asyncio.create_task(upload())
        await asyncio.wait_for(paused.paused.wait(), timeout=30)

        def temporaries() -> list[str]:
            return [p.name for p in tee.iterdir() if p.name.endswith(".tmp")] if tee.exists() else []

        await asyncio.to_thread(wait_until, temporaries, 15.0, "the request copy to start")
        stack.kill_host()
        paused.release()
        await asyncio.wait_for(task, timeout=30)
        left = temporaries()
        assert left and all(name.startswith(".") for name in left), left
        await asyncio.to_thread(stack.restart_host)
        assert temporaries() == []
        echoed = await h1_request(stack.url + ROUTE, body=payload(64 * 1024))
        assert echoed.status == 200
