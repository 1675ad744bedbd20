"""The echo upstream streams: a 32 MiB body comes back byte for byte over HTTP/1.1 (aiohttp,
the default) and over h2c (``extproc-host echo --http2``, hypercorn), while the echo's RSS
grows by well under the body's size. Both echoes also serve Envoy (envoy/direct.yaml).

The large h2c upload uses curl, which reads the response while it sends the request, as Envoy
does; httpx sends the whole request body before reading the response, and hypercorn then holds
the echoed bytes it cannot send yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import threading

import psutil
import pytest
from e2e_clients import Echoed, MiB, Payload, h1_request, h2_request

from extproc_host.stack import Stack, extproc_host_command
from extproc_host.stack.echo_common import pattern

pytestmark = pytest.mark.e2e

BODY = 32 * MiB


class PeakRss:
    """Samples one process's RSS every 20 ms in a thread; ``growth`` is peak minus the first."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.first = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def growth(self) -> int:
        return self.peak - self.first


def curl_h2c_upload(url: str, body: Payload) -> Echoed:
    """POST ``body`` over h2c (prior knowledge) with curl, hashing the response as it streams."""
    cmd = [
        "curl",
        "-sS",
        "--fail",
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-T",
        str(body.path),
        "-w",
        "%{stderr}HTTP/%{http_version}",
        url,
    ]
    digest, size = hashlib.sha256(), 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as curl:
        assert curl.stdout is not None and curl.stderr is not None
        while block := curl.stdout.read(MiB):
            digest.update(block)
            size += len(block)
        version = curl.stderr.read().decode()
    assert curl.returncode == 0 and version == "HTTP/2", (curl.returncode, version)
    return Echoed(200, {}, size, digest.hexdigest())


def _echo(http2: bool) -> list[str]:
    return [*extproc_host_command(), "echo", "--listen", "127.0.0.1:0", *(["--http2"] if http2 else [])]


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "hypercorn-h2"])
def test_echo_streams_32mib_with_flat_memory(payload, http2: bool) -> None:
    if http2 and shutil.which("curl") is None:
        pytest.skip("curl is needed for the streaming h2c upload")
    body = payload(BODY)
    with Stack("envoy/direct.yaml", None, echo_command=_echo(http2)) as stack:
        # Warm up (imports, first connection) so the baseline is the idle server.
        asyncio.run(h1_request(stack.echo_url + "/warm-up", body=payload(64 * 1024)))
        with PeakRss(stack.pids["echo"]) as rss:
            echoed = [asyncio.run(h1_request(stack.echo_url + "/upload", body=body, chunked=True))]
            if http2:
                echoed.append(curl_h2c_upload(stack.echo_url + "/upload", body))
        through_envoy = asyncio.run(h1_request(stack.url + "/upload", body=body))
    for response in (*echoed, through_envoy):
        assert (response.status, response.size, response.sha256) == (200, BODY, body.sha256)
    assert rss.growth < BODY // 2, f"echo RSS grew {rss.growth / MiB:.1f} MiB for a 32 MiB body"


def test_echo_h2_answers_bytes_and_keeps_content_length(payload) -> None:
    with Stack("envoy/direct.yaml", None, echo_command=_echo(True)) as stack:
        small = payload(1000)
        sized = asyncio.run(h2_request(stack.echo_url + "/x", body=small))
        generated = asyncio.run(h2_request(stack.echo_url + "/a/bytes/100000", method="GET"))
        empty = asyncio.run(h2_request(stack.echo_url + "/x", method="GET"))
    assert (sized.status, sized.sha256, sized.headers.get("content-length")) == (200, small.sha256, "1000")
    assert sized.headers.get("content-type") == "application/octet-stream"
    assert generated.size == 100000
    assert generated.sha256 == hashlib.sha256(b"".join(pattern(100000))).hexdigest()
    assert (empty.status, empty.size) == (200, 0)
