"""The zstd plugin behind a real Envoy (envoy/full_duplex.yaml, config/zstd.toml): compressed
responses that decode to the exact upstream body, compressed uploads that reach the upstream
decoded and exact, 4xx local replies for bad uploads with nothing complete upstream, and a
1 GiB body compressed on the way back with flat host memory.

The echo upstream answers with the request body it received (and its content-type), so what
the client gets back is what the upstream was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import zstandard
from e2e_clients import ROUTE_PATHS, KiB, MiB

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ROUTES = ["full-duplex-streamed", "streamed", "buffered"]
#: config/zstd.toml with a smaller decompression limit, so a bomb trips it quickly.
LIMIT = 16 * MiB

UPSTREAM_RESETS = "cluster.upstream.upstream_cx_destroy_local_with_active_rq"
UPSTREAM_CANCELLED = "cluster.upstream.upstream_rq_cancelled"
UPSTREAM_REQUESTS = "cluster.upstream.upstream_rq_total"
UPSTREAM_PENDING = "cluster.upstream.upstream_rq_pending_total"


@pytest.fixture(scope="module")
def zstd_stack(tmp_path_factory):
    text = (ROOT / "config" / "zstd.toml").read_text()
    default_limit = "max_decompressed_bytes = 1073741824"
    assert default_limit in text
    config = tmp_path_factory.mktemp("zstd-config") / "zstd.toml"
    default_ratio = "max_ratio = 100"
    assert default_ratio in text
    # No ratio limit here: the size limit is what these tests trip (tests/e2e/test_limits.py
    # covers the ratio).
    config.write_text(
        text.replace(default_limit, f"max_decompressed_bytes = {LIMIT}").replace(default_ratio, "max_ratio = 0")
    )
    with Stack("envoy/full_duplex.yaml", host_config=config) as running:
        yield running


@dataclass
class Got:
    status: int
    headers: dict[str, str]
    raw: bytes  # the body as it came on the wire
    body: bytes  # decoded when content-encoding is zstd


def _decode(headers: dict[str, str], raw: bytes) -> bytes:
    if headers.get("content-encoding") != "zstd":
        return raw
    decoder = zstandard.ZstdDecompressor().decompressobj()
    body = decoder.decompress(raw)
    assert decoder.eof, "the zstd frame was not ended"
    return body


async def _h1(url: str, content: bytes, headers: dict[str, str]) -> Got:
    # Only the accept-encoding the test gives: none at all when it gives none.
    async with (
        aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120), skip_auto_headers=["Accept-Encoding"]
        ) as session,
        session.post(url, data=content, headers=headers) as response,
    ):
        raw = await response.read()
        got = {k.lower(): v for k, v in response.headers.items()}
        return Got(response.status, got, raw, _decode(got, raw))


async def _h2(url: str, content: bytes, headers: dict[str, str]) -> Got:
    async with httpx.AsyncClient(http1=False, http2=True, timeout=120) as client:
        del client.headers["accept-encoding"]  # only the one the test gives, if any
        async with client.stream("POST", url, content=content, headers=headers) as response:
            assert response.http_version == "HTTP/2"
            raw = b"".join([piece async for piece in response.aiter_raw()])
            got = {k.lower(): v for k, v in response.headers.items()}
            return Got(response.status_code, got, raw, _decode(got, raw))


CLIENTS = {"h1": _h1, "h2c": _h2}


async def _h2_one_frame(url: str, content: bytes, headers: dict[str, str]) -> Got:
    """An h2c request whose whole body goes in the DATA frame that ends the stream (bodies up to
    16 KiB), read to the end even when Envoy resets the stream after answering. httpx ends the
    stream with a separate empty frame; a local reply that comes in between is followed by a
    reset that httpx reports instead of the response."""
    assert len(content) <= 16 * KiB
    parsed = httpx.URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    request = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", parsed.netloc.decode()),
        (":path", parsed.raw_path.decode()),
    ]
    conn.send_headers(1, request + list(headers.items()), end_stream=not content)
    if content:
        conn.send_data(1, content, end_stream=True)
    writer.write(conn.data_to_send())
    status, got, raw = 0, {}, bytearray()
    try:
        done = False
        while not done:
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    got = {k.lower(): v for k, v in event.headers}
                    status = int(got.pop(":status"))
                elif isinstance(event, h2.events.DataReceived):
                    raw += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return Got(status, got, bytes(raw), _decode(got, bytes(raw)))


def _body(size: int) -> bytes:
    """Half text (compressible), half random bytes, interleaved in 64 KiB blocks."""
    rng = random.Random(size)
    out = bytearray()
    i = 0
    while len(out) < size:
        if i % 2:
            out += rng.randbytes(64 * KiB)
        else:
            out += b"".join(b"line %d of some very compressible text\n" % (i * 1000 + j) for j in range(1600))[
                : 64 * KiB
            ]
        i += 1
    return bytes(out[:size])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("size", [10, 3 * MiB + 17])
@pytest.mark.parametrize("route", ROUTES)
async def test_response_is_compressed_and_decodes_to_the_upstream_body(zstd_stack, route, size, client):
    body = _body(size)
    got = await CLIENTS[client](
        zstd_stack.url + ROUTE_PATHS[route], body, {"accept-encoding": "gzip, zstd", "content-type": "text/plain"}
    )
    assert got.status == 200
    assert got.headers["content-encoding"] == "zstd"
    assert "accept-encoding" in got.headers["vary"].lower()
    assert _sha(got.body) == _sha(body)
    if size > MiB:
        assert len(got.raw) < len(body)
    if route == "buffered":
        assert got.headers["content-length"] == str(len(got.raw))
    else:
        assert "content-length" not in got.headers


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("route", ROUTES)
async def test_response_left_alone_without_zstd_in_accept_encoding(zstd_stack, route, client):
    body = _body(300 * KiB)
    for accept in (None, "gzip", "zstd;q=0, *"):
        headers = {"content-type": "text/plain"} | ({"accept-encoding": accept} if accept else {})
        got = await CLIENTS[client](zstd_stack.url + ROUTE_PATHS[route], body, headers)
        assert got.status == 200
        assert "content-encoding" not in got.headers, accept
        assert got.raw == body, accept


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("route", ROUTES)
async def test_empty_response_decodes_to_nothing(zstd_stack, route, client):
    # A response with content-length: 0 is left alone (the echo answers that to an HTTP/1.1
    # upload that had one); a chunked one that turns out empty is an empty zstd frame.
    got = await CLIENTS[client](zstd_stack.url + ROUTE_PATHS[route], b"", {"accept-encoding": "zstd"})
    assert got.status == 200
    assert got.body == b""
    if got.headers.get("content-encoding") == "zstd":
        assert got.raw  # a whole (empty) frame, never zero bytes labelled zstd


async def test_already_compressed_types_are_left_alone(zstd_stack):
    body = _body(100 * KiB)
    got = await _h1(
        zstd_stack.url + ROUTE_PATHS["full-duplex-streamed"],
        body,
        {"accept-encoding": "zstd", "content-type": "image/png"},
    )
    assert got.status == 200 and "content-encoding" not in got.headers and got.raw == body


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("size", [0, 10, 3 * MiB + 17])
@pytest.mark.parametrize("route", ROUTES)
async def test_zstd_upload_reaches_the_upstream_decoded(zstd_stack, route, size, client):
    body = _body(size)
    compressed = zstandard.ZstdCompressor(level=3).compress(body)
    got = await CLIENTS[client](
        zstd_stack.url + ROUTE_PATHS[route], compressed, {"content-encoding": "zstd", "content-type": "text/plain"}
    )
    # No accept-encoding: the echo's answer (what the upstream got) comes back as it is.
    assert got.status == 200
    assert "content-encoding" not in got.headers  # the upstream was not told of zstd
    assert len(got.raw) == size
    assert _sha(got.raw) == _sha(body)


async def test_zstd_upload_and_zstd_response(zstd_stack):
    body = _body(5 * MiB)
    compressed = zstandard.ZstdCompressor(level=1).compress(body)
    got = await _h2(
        zstd_stack.url + ROUTE_PATHS["full-duplex-streamed"],
        compressed,
        {"content-encoding": "zstd", "accept-encoding": "zstd"},
    )
    assert got.status == 200 and got.headers["content-encoding"] == "zstd"
    assert _sha(got.body) == _sha(body)


# ---- bad uploads ----


def _stats(stack: Stack) -> dict[str, int]:
    return stack.envoy_stats(r"^cluster\.upstream\.")


def _delta(before: dict[str, int], after: dict[str, int], *keys: str) -> int:
    return sum(after.get(k, 0) - before.get(k, 0) for k in keys)


def _assert_nothing_complete_upstream(stack: Stack, before: dict[str, int]) -> str:
    """The upstream never got a whole request: Envoy did not send it at all, or cut it off."""
    deadline = time.monotonic() + 5
    while True:
        after = _stats(stack)
        # A request that waited for a connection counts in both: pending_total, then total.
        attempts = max(_delta(before, after, UPSTREAM_REQUESTS), _delta(before, after, UPSTREAM_PENDING))
        cut = _delta(before, after, UPSTREAM_RESETS, UPSTREAM_CANCELLED)
        if attempts == 0:
            return "never sent upstream"
        if cut >= attempts:
            return "upstream request cut off"
        if time.monotonic() > deadline:
            changed = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            pytest.fail(f"an upstream request was neither avoided nor cut off: {changed}")
        time.sleep(0.05)


def _corrupt() -> bytes:
    """A valid frame header followed by a block of the reserved type: the decoder stops at once."""
    good = zstandard.ZstdCompressor(write_checksum=True).compress(_body(64 * KiB))
    header = zstandard.frame_header_size(good)
    return good[:header] + b"\x06\x00\x00" + good[header + 3 :]


# Every bad upload is small (a few KiB): the client has sent all of it when the local reply
# comes, and on h2c it fits the one DATA frame that ends the request stream.
BAD_UPLOADS = {
    "corrupt": (_corrupt, 400, "not valid zstd"),
    "truncated": (lambda: zstandard.ZstdCompressor().compress(_body(64 * KiB))[:-10], 400, "truncated"),
    "not-zstd": (lambda: b"this is not zstd at all" * 100, 400, "not valid zstd"),
    # 64 MiB of zeros in ~2 KiB: past the limit within the first chunk.
    "oversized": (lambda: zstandard.ZstdCompressor().compress(bytes(64 * MiB)), 413, f"more than {LIMIT} bytes"),
}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case", BAD_UPLOADS)
@pytest.mark.parametrize("route", ROUTES)
async def test_bad_upload_gets_a_4xx_and_nothing_whole_goes_upstream(zstd_stack, route, case, client):
    make, status, words = BAD_UPLOADS[case]
    before = _stats(zstd_stack)
    send = _h1 if client == "h1" else _h2_one_frame
    got = await send(zstd_stack.url + ROUTE_PATHS[route], make(), {"content-encoding": "zstd"})
    assert got.status == status, got.raw[:300]
    assert words in got.raw.decode(errors="replace")
    how = _assert_nothing_complete_upstream(zstd_stack, before)
    print(f"{route} {case} {client}: {got.status} {got.raw.decode(errors='replace').strip()!r}; {how}")


# ---- 1 GiB through zstd with flat host memory ----

BIG = 1024 * MiB
BLOCK = 1 * MiB


async def _big_body(digest) -> AsyncIterator[bytes]:
    """BIG bytes made on the fly: alternating compressible and random-looking 1 MiB blocks."""
    noise = random.Random(7).randbytes(BLOCK)
    text = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i for i in range(BLOCK // 50))[:BLOCK]
    assert len(noise) == len(text) == BLOCK
    for index in range(BIG // BLOCK):
        shift = (index * 7919) % BLOCK
        source = noise if index % 2 else text
        block = source[shift:] + source[:shift]
        digest.update(block)
        yield block


async def test_one_gib_response_compressed_with_flat_host_memory(zstd_stack):
    sent = hashlib.sha256()
    received = hashlib.sha256()
    decoder = zstandard.ZstdDecompressor().decompressobj()
    size = wire = 0
    baseline = zstd_stack.host_rss()
    started = time.monotonic()
    with zstd_stack.sampler(interval=0.2) as rss:
        async with aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=300)) as session:
            async with session.post(
                zstd_stack.url + ROUTE_PATHS["full-duplex-streamed"],
                data=_big_body(sent),
                headers={"accept-encoding": "zstd", "content-type": "application/octet-stream"},
            ) as response:
                assert response.status == 200
                assert response.headers["content-encoding"] == "zstd"
                async for piece in response.content.iter_chunked(1 * MiB):
                    wire += len(piece)
                    out = decoder.decompress(piece)
                    size += len(out)
                    received.update(out)
    seconds = time.monotonic() - started
    print(
        f"1 GiB through zstd (FD): {seconds:.1f} s, {BIG / MiB / seconds:.0f} MiB/s, {wire / MiB:.0f} MiB on the wire; "
        f"host RSS baseline {baseline / MiB:.0f} MiB, peak {rss.peak_host / MiB:.0f} MiB; "
        f"Envoy peak {rss.peak_envoy / MiB:.0f} MiB"
    )
    assert decoder.eof and not decoder.unused_data, len(decoder.unused_data)
    assert size == BIG
    assert received.hexdigest() == sent.hexdigest()
    assert wire < 0.8 * BIG
    assert rss.peak_host < 400 * MiB, f"host peak RSS {rss.peak_host / MiB:.0f} MiB"
