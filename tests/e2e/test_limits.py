"""The host's limits seen from the client, through a real Envoy (envoy/full_duplex.yaml with
config/zstd.toml):

- a small zstd upload whose decoded body is larger than one gRPC message: on the STREAMED and
  BUFFERED routes the client gets the documented 413 and the stream counts as failed (no
  gRPC "larger than max" error, no traceback in the host's log); on the FULL_DUPLEX_STREAMED
  route the decoded body reaches the upstream whole and comes back byte for byte;
- a zstd bomb (a 1 GiB body of zeros, 33 KB compressed) sent by a client that does not read
  its response: the default ratio limit answers 413 before Envoy holds more than a few MiB of
  the decoded body.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from pathlib import Path

import aiohttp
import pytest
import zstandard
from e2e_clients import ROUTE_PATHS, MiB
from ops_helpers import sample, scrape, wait_until

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MESSAGE_LIMIT = 8 * MiB  # [server] max_message_bytes for the oversized-answer stack
DECODED = 32 * MiB  # what the small upload decodes to: over MESSAGE_LIMIT


def _zeros_compressed(size: int) -> bytes:
    """``size`` zero bytes as one zstd frame (tiny: zeros compress ~30,000x)."""
    compressor = zstandard.ZstdCompressor().compressobj()
    block = bytes(16 * MiB)
    out = [compressor.compress(block) for _ in range(size // len(block))]
    out.append(compressor.flush())
    return b"".join(out)


@pytest.fixture(scope="module")
def no_ratio_stack(tmp_path_factory):
    """config/zstd.toml without the ratio limit, max_message_bytes 8 MiB, metrics on."""
    text = (ROOT / "config" / "zstd.toml").read_text()
    assert "max_ratio = 100" in text
    config = tmp_path_factory.mktemp("limits") / "zstd.toml"
    config.write_text(text.replace("max_ratio = 100", "max_ratio = 0"))
    env = {
        "EXTPROC_SERVER__MAX_MESSAGE_BYTES": str(MESSAGE_LIMIT),
        "EXTPROC_SERVER__METRICS_LISTEN": "127.0.0.1:0",
    }
    with Stack("envoy/full_duplex.yaml", host_config=config, host_env=env) as running:
        yield running


async def _post(url: str, body: bytes) -> tuple[int, bytes]:
    headers = {"content-encoding": "zstd", "content-type": "application/octet-stream"}
    async with (
        aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.post(url, data=body, headers=headers, skip_auto_headers=["Accept-Encoding"]) as response,
    ):
        return response.status, await response.read()


@pytest.mark.parametrize("route", ["streamed", "buffered"])
async def test_decoded_body_over_one_message_is_a_413_in_streamed_and_buffered(no_ratio_stack, route):
    stack = no_ratio_stack
    bomb = _zeros_compressed(DECODED)
    assert len(bomb) < 4096
    status, body = await _post(stack.url + ROUTE_PATHS[route], bomb)
    assert status == 413, body[:200]
    assert b"body too large" in body

    def counted() -> dict:
        samples = scrape(stack.metrics_url)
        return samples if sample(samples, "extproc_streams_total", route=route, outcome="failed") == 1 else {}

    samples = wait_until(counted, 15.0, f"the {route} stream counted as failed")
    assert sample(samples, "extproc_streams_total", route=route, outcome="ok") == 0
    assert sample(samples, "extproc_stream_limit_failures_total", limit="max_message_bytes") >= 1
    stderr = _host_stderr(stack)
    assert "[server] max_message_bytes" in stderr
    assert "Traceback" not in stderr and "larger than max" not in stderr


def test_decoded_body_over_one_message_reaches_the_upstream_whole_in_full_duplex(no_ratio_stack):
    status, body = asyncio.run(
        _post(no_ratio_stack.url + ROUTE_PATHS["full-duplex-streamed"], _zeros_compressed(DECODED))
    )
    assert status == 200
    assert len(body) == DECODED and hashlib.sha256(body).digest() == hashlib.sha256(bytes(DECODED)).digest()
    assert "Traceback" not in _host_stderr(no_ratio_stack)


def _host_stderr(stack: Stack) -> str:
    return stack.logs["host"].read_text()


@pytest.fixture(scope="module")
def default_zstd_stack():
    """config/zstd.toml as shipped (1 GiB size limit, ratio limit 100), metrics on."""
    with Stack(
        "envoy/full_duplex.yaml",
        host_config="config/zstd.toml",
        host_env={"EXTPROC_SERVER__METRICS_LISTEN": "127.0.0.1:0"},
    ) as running:
        yield running


class _Peak:
    """Samples a process's RSS every 10 ms on a thread, keeping the highest."""

    def __init__(self, read) -> None:
        self.read = read
        self.peak = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@pytest.mark.parametrize("route", ["full-duplex-streamed", "streamed"])
def test_a_zstd_bomb_from_a_client_that_does_not_read_is_stopped_by_the_ratio_limit(default_zstd_stack, route):
    stack = default_zstd_stack
    bomb = _zeros_compressed(1024 * MiB)
    assert len(bomb) < 64 * 1024
    before = sample(scrape(stack.metrics_url), "extproc_streams_total", route=route, outcome="rejected")
    baseline = stack.envoy_rss()
    peak = _Peak(stack.envoy_rss)
    request = (
        f"POST {ROUTE_PATHS[route]} HTTP/1.1\r\nhost: test\r\ncontent-encoding: zstd\r\n"
        f"content-type: application/octet-stream\r\ncontent-length: {len(bomb)}\r\n\r\n"
    ).encode() + bomb
    with socket.create_connection(("127.0.0.1", int(stack.url.rsplit(":", 1)[1]))) as client:
        client.sendall(request)
        # The client reads nothing until the host has answered the stream (413 by ratio).
        wait_until(
            lambda: (
                sample(scrape(stack.metrics_url), "extproc_streams_total", route=route, outcome="rejected")
                == before + 1
            ),
            30.0,
            "the bomb to be rejected",
        )
        envoy_peak = peak.stop()
        client.settimeout(30)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = client.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    grown = (envoy_peak - baseline) / MiB
    print(f"{route}: Envoy RSS {baseline / MiB:.0f} MiB before, peak {envoy_peak / MiB:.0f} MiB (+{grown:.0f})")
    # Without the ratio limit Envoy held the decoded body: +970 MiB. With it, a few MiB pass.
    assert grown < 64, f"Envoy grew by {grown:.0f} MiB"
