"""Bodies through Envoy, extproc-host (passthrough on every route) and the echo upstream come
back byte for byte, in every body mode the routes of envoy/full_duplex.yaml use:

    full-duplex-streamed  FULL_DUPLEX_STREAMED (the filter default)
    streamed              STREAMED (per-route override)
    buffered              BUFFERED (per-route override)
    headers-only          NONE: headers go to the host, bodies do not
    default               FULL_DUPLEX_STREAMED (catch-all route)

over HTTP/1.1 (content-length and chunked) and h2c (with and without content-length).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_clients import ROUTE_PATHS, KiB, MiB, h1_request, h2_request

from extproc_host.stack import Stack
from extproc_host.stack.echo_common import pattern

pytestmark = pytest.mark.e2e

ROUTES = list(ROUTE_PATHS)
SIZES = [0, 1, 64 * KiB, MiB + 1, 5 * MiB]
BIG = 70 * MiB


def _size_id(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB}MiB" + (f"+{size % MiB}" if size % MiB else "")
    if size >= KiB:
        return f"{size // KiB}KiB"
    return f"{size}B"


def _assert_echoed(echoed, body, route: str) -> None:
    assert echoed.status == 200, f"{route}: status {echoed.status}, headers {echoed.headers}"
    assert echoed.size == body.size, f"{route}: sent {body.size} bytes, got {echoed.size} back"
    assert echoed.sha256 == body.sha256, f"{route}: body came back with the same size but other bytes"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("route", ROUTES)
async def test_h1_upload_echoed(stack: Stack, payload, route: str, size: int, chunked: bool) -> None:
    body = payload(size)
    echoed = await h1_request(stack.url + ROUTE_PATHS[route], body=body, chunked=chunked)
    _assert_echoed(echoed, body, route)
    if route == "headers-only" and not chunked:
        # No body processing: Envoy keeps the upstream's content-length.
        assert echoed.headers.get("content-length") == str(size)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("route", ["full-duplex-streamed", "streamed"])
async def test_h1_70mib_upload_echoed(stack: Stack, payload, route: str, chunked: bool) -> None:
    body = payload(BIG)
    echoed = await h1_request(stack.url + ROUTE_PATHS[route], body=body, chunked=chunked)
    _assert_echoed(echoed, body, route)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "no-content-length"])
@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("route", ROUTES)
async def test_h2c_upload_echoed(stack: Stack, payload, route: str, size: int, chunked: bool) -> None:
    body = payload(size)
    echoed = await h2_request(stack.url + ROUTE_PATHS[route], body=body, chunked=chunked)
    _assert_echoed(echoed, body, route)


@pytest.mark.parametrize("h2", [False, True], ids=["h1", "h2c"])
@pytest.mark.parametrize("route", ROUTES)
async def test_get_without_body(stack: Stack, route: str, h2: bool) -> None:
    request = h2_request if h2 else h1_request
    echoed = await request(stack.url + ROUTE_PATHS[route], "GET")
    assert echoed.status == 200
    assert echoed.size == 0


@pytest.mark.parametrize("size", [0, MiB + 1, 5 * MiB], ids=_size_id)
@pytest.mark.parametrize("route", ROUTES)
async def test_response_only_body(stack: Stack, route: str, size: int) -> None:
    """A GET whose response has a body the request did not send (the echo's /bytes/<n>)."""
    expected = hashlib.sha256()
    for block in pattern(size):
        expected.update(block)
    echoed = await h1_request(f"{stack.url}{ROUTE_PATHS[route]}/bytes/{size}", "GET")
    assert echoed.status == 200
    assert echoed.size == size
    assert echoed.sha256 == expected.hexdigest()


async def test_ten_concurrent_70mib_full_duplex_uploads(stack: Stack, payload) -> None:
    """The Go proof of concept's experiment: 10 x 70 MiB uploads at once through
    FULL_DUPLEX_STREAMED, every one echoed byte for byte."""
    body = payload(BIG)
    url = stack.url + ROUTE_PATHS["full-duplex-streamed"]
    with stack.sampler() as rss:
        results = await asyncio.gather(*(h1_request(url, body=body) for _ in range(10)))
    for echoed in results:
        _assert_echoed(echoed, body, "full-duplex-streamed")
    print(f"peak RSS: envoy {rss.peak_envoy / MiB:.0f} MiB, host {rss.peak_host / MiB:.0f} MiB")
    # A host that held every body whole, both ways, would pass 1.4 GiB here. (A minimal
    # grpc.aio passthrough peaks anywhere from 200 to 650 MiB on this test: gRPC buffers.)
    assert rss.peak_host < 1200 * MiB, f"host peak RSS {rss.peak_host / MiB:.0f} MiB"


@pytest.fixture(scope="module")
def grpcio_stack(tee_directory) -> Iterator[Stack]:
    """The session stack's settings with ``[server] transport = "grpcio"`` (grpc.aio's server
    instead of the builtin one)."""
    env = {"EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": str(tee_directory), "EXTPROC_SERVER__TRANSPORT": "grpcio"}
    with Stack("envoy/full_duplex.yaml", "config/full_duplex.toml", host_env=env) as running:
        yield running


@pytest.mark.parametrize("size", [0, 64 * KiB, 5 * MiB], ids=_size_id)
@pytest.mark.parametrize("route", ROUTES)
async def test_grpcio_transport_upload_echoed(grpcio_stack: Stack, payload, route: str, size: int) -> None:
    """The grpc.aio transport, kept as an option, moves the same bytes in every mode."""
    body = payload(size)
    echoed = await h1_request(grpcio_stack.url + ROUTE_PATHS[route], body=body)
    _assert_echoed(echoed, body, route)
    assert "transport grpcio" in grpcio_stack.logs["host"].read_text()


def test_builtin_transport_leaves_grpc_unloaded(stack: Stack) -> None:
    """The default transport serves without grpcio's core library in memory (18 MiB resident)."""
    maps = Path(f"/proc/{stack.pids['host']}/maps")
    if not maps.exists():
        pytest.skip("no /proc on this system")
    assert "transport builtin" in stack.logs["host"].read_text()
    assert "cygrpc" not in maps.read_text()
