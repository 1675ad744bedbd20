"""Test bodies on disk and streaming HTTP/1.1 and h2c clients for the end-to-end tests.

The bodies are deterministic (fixed seed) and live in files, uploads stream from those files
and responses are hashed chunk by chunk as they arrive, so the test process stays small even
when ten 70 MiB uploads are in flight.
"""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

KiB = 1024
MiB = 1024 * 1024

#: Envoy route name -> a path that the route matches (envoy/full_duplex.yaml).
ROUTE_PATHS = {
    "full-duplex-streamed": "/full-duplex-streamed",
    "streamed": "/streamed",
    "buffered": "/buffered",
    "headers-only": "/headers-only",
    "default": "/anything/else",
}

_SEED = 20240611
_READ = 1 * MiB


@dataclass(frozen=True)
class Payload:
    """A test body on disk and its digest."""

    path: Path
    size: int
    sha256: str

    def read(self) -> bytes:
        return self.path.read_bytes()

    async def chunks(self, chunk_size: int = 256 * KiB) -> AsyncIterator[bytes]:
        """The body as an async generator (sent without content-length)."""
        with self.path.open("rb") as f:
            while block := f.read(chunk_size):
                yield block


def write_payload(path: Path, size: int) -> Payload:
    # One random MiB from a fixed seed, rotated by a different offset for each MiB of the
    # body: reproducible, and any lost, repeated or reordered piece changes the digest.
    base = random.Random(_SEED).randbytes(MiB)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        written, index = 0, 0
        while written < size:
            shift = (index * 7919) % MiB
            block = (base[shift:] + base[:shift])[: size - written]
            f.write(block)
            digest.update(block)
            written += len(block)
            index += 1
    return Payload(path, size, digest.hexdigest())


@dataclass
class Echoed:
    """A response, with its body reduced to size and digest."""

    status: int
    headers: dict[str, str]
    size: int
    sha256: str


async def _hash_aiohttp(response: aiohttp.ClientResponse) -> Echoed:
    digest, size = hashlib.sha256(), 0
    async for chunk in response.content.iter_chunked(_READ):
        digest.update(chunk)
        size += len(chunk)
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Echoed(response.status, headers, size, digest.hexdigest())


async def _hash_httpx(response: httpx.Response) -> Echoed:
    digest, size = hashlib.sha256(), 0
    async for chunk in response.aiter_raw():
        digest.update(chunk)
        size += len(chunk)
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Echoed(response.status_code, headers, size, digest.hexdigest())


_TIMEOUT = aiohttp.ClientTimeout(total=240, sock_connect=10)


async def h1_request(
    url: str,
    method: str = "POST",
    body: Payload | None = None,
    *,
    chunked: bool = False,
    content: AsyncIterator[bytes] | None = None,
) -> Echoed:
    """One HTTP/1.1 request with aiohttp; the body streams from its file, with a
    content-length (``chunked=False``) or with chunked transfer encoding. ``content``, when
    given, is sent instead of ``body.chunks()`` (the test paces the upload itself)."""
    headers: dict[str, str] = {}
    data = None
    if body is not None:
        headers["content-type"] = "application/octet-stream"
        # An async generator, with the content-length set by hand when wanted. (aiohttp's own
        # file payload stalls part-way when the response streams back during the upload,
        # as the echo's does: aio-libs/aiohttp#10169.)
        data = body.chunks() if content is None else content
        if not chunked:
            headers["content-length"] = str(body.size)
    async with aiohttp.ClientSession(timeout=_TIMEOUT, auto_decompress=False) as session:
        async with session.request(method, url, data=data, headers=headers) as response:
            return await _hash_aiohttp(response)


async def h2_request(url: str, method: str = "POST", body: Payload | None = None, *, chunked: bool = False) -> Echoed:
    """One h2c request (HTTP/2 with prior knowledge) with httpx; the body is sent with a
    content-length, or (``chunked=True``) from an async generator without one."""
    async with httpx.AsyncClient(http1=False, http2=True, timeout=120) as client:
        if body is None:
            content = None
        elif chunked:
            content = body.chunks(64 * KiB)
        else:
            content = body.read()
        headers = {"content-type": "application/octet-stream"} if body is not None else {}
        async with client.stream(method, url, content=content, headers=headers) as response:
            assert response.http_version == "HTTP/2"
            return await _hash_httpx(response)


def abandon_upload(port: int, path: str, announced: int, sent: int) -> None:
    """Announce ``announced`` bytes of body, send ``sent`` of them, wait a little, hang up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {announced}\r\n\r\n".encode()
    sock.sendall(head + b"a" * sent)
    time.sleep(0.5)  # let Envoy pass the chunks on
    sock.close()
