"""The replace plugin through a real Envoy: the upstream gets the request file, the client gets
the response file, byte for byte, and a large file streams out without being held in memory."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
from e2e_clients import MiB, h1_request, h2_request, write_payload

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replace")
    upload = write_payload(tmp / "upload.bin", 5 * MiB + 3)
    answer = write_payload(tmp / "answer.bin", 3 * MiB + 7)
    big = tmp / "big.bin"
    with big.open("wb") as fh:  # 160 MiB: far more than the host may hold at once
        for _ in range(160):
            fh.write(os.urandom(MiB))
    config = tmp / "host.toml"
    config.write_text(
        f"""
# both bodies replaced
[routes.full-duplex-streamed]
chain = ["replace"]
[routes.full-duplex-streamed.plugins.replace]
request_file = "{upload.path}"
request_content_type = "video/mp4"
response_file = "{answer.path}"
response_content_type = "video/webm"

# only the request: the echo returns the request file
[routes.streamed]
chain = ["replace"]
[routes.streamed.plugins.replace]
request_file = "{upload.path}"

# only the response, in BUFFERED mode
[routes.buffered]
chain = ["replace"]
[routes.buffered.plugins.replace]
response_file = "{answer.path}"

# a large response file in FULL_DUPLEX_STREAMED
[routes.default]
chain = ["replace"]
[routes.default.plugins.replace]
response_file = "{big}"
"""
    )
    with Stack("envoy/full_duplex.yaml", config) as stack:
        yield stack, upload, answer, big


@pytest.mark.parametrize("client", [h1_request, h2_request], ids=["h1", "h2c"])
async def test_both_bodies_replaced(setup, payload, client):
    stack, _, answer, _ = setup
    echoed = await client(stack.url + "/full-duplex-streamed", body=payload(12345))
    assert echoed.status == 200
    assert echoed.headers["content-type"] == "video/webm"
    assert (echoed.size, echoed.sha256) == (answer.size, answer.sha256)


async def test_upstream_receives_the_request_file(setup, payload):
    stack, upload, _, _ = setup
    echoed = await h1_request(stack.url + "/streamed", body=payload(MiB + 1))
    assert echoed.status == 200
    assert (echoed.size, echoed.sha256) == (upload.size, upload.sha256)


async def test_buffered_response_replaced_with_content_length(setup, payload):
    stack, _, answer, _ = setup
    echoed = await h1_request(stack.url + "/buffered", body=payload(1000))
    assert echoed.status == 200
    assert echoed.headers.get("content-length") == str(answer.size)
    assert (echoed.size, echoed.sha256) == (answer.size, answer.sha256)


def test_large_file_streams_with_flat_host_memory(setup):
    stack, _, _, big = setup
    expected = hashlib.sha256(big.read_bytes()).hexdigest()
    baseline = stack.host_rss()
    digest, size = hashlib.sha256(), 0
    with stack.sampler() as rss:
        with httpx.stream("POST", stack.url + "/anything", content=b"tiny", timeout=120) as response:
            assert response.status_code == 200
            for block in response.iter_raw(MiB):
                digest.update(block)
                size += len(block)
    assert (size, digest.hexdigest()) == (big.stat().st_size, expected)
    print(f"host RSS: baseline {baseline / MiB:.0f} MiB, peak {rss.peak_host / MiB:.0f} MiB")
    # Reading the file whole would add 160 MiB at least.
    assert rss.peak_host - baseline < 96 * MiB, f"host RSS grew {(rss.peak_host - baseline) / MiB:.0f} MiB"
