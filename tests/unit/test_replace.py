"""The replace plugin through the in-process fake Envoy."""

from __future__ import annotations

import grpc
import pytest

from extproc_host.cli import main

from .fake_envoy import (
    BUFFERED,
    NONE,
    STREAMED,
    fake_envoy,
    request_body,
    request_headers,
    response_body,
    response_headers,
)


@pytest.fixture
def files(tmp_path):
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(range(256)) * 40 + b"!")  # 10 KiB + 1
    answer = tmp_path / "answer.bin"
    answer.write_bytes(b"answer " * 1000)
    config = tmp_path / "replace.toml"
    config.write_text(
        f"""
[routes.default]
chain = ["replace"]

[plugins.replace]
request_file = "{upload}"
request_content_type = "video/mp4"
response_file = "{answer}"
chunk_bytes = 4096
"""
    )
    return upload.read_bytes(), answer.read_bytes(), str(config)


async def test_full_duplex_replaces_both_bodies_in_pieces(files):
    upload, answer, config = files
    async with fake_envoy(config) as envoy:
        conv = await envoy.converse(
            [
                request_headers(),
                request_body(b"client data"),
                request_body(b"more", end=True),
                response_headers(),
                response_body(b"upstream data", end=True),
            ]
        )
    assert conv.code == grpc.StatusCode.OK
    body, flags = conv.streamed("request_body")
    assert body == upload and flags.count(True) == 1 and flags[-1]
    pieces = [r.request_body.response.body_mutation.streamed_response.body for r in conv.of("request_body")]
    assert max(map(len, pieces)) <= 4096  # streamed out in pieces, not in one message
    assert conv.streamed("response_body")[0] == answer
    (headers,) = conv.of("request_headers")
    set_headers = {
        h.header.key: h.header.raw_value for h in headers.request_headers.response.header_mutation.set_headers
    }
    assert set_headers == {"content-type": b"video/mp4"}


@pytest.mark.parametrize("mode", [STREAMED, BUFFERED])
async def test_streamed_and_buffered_answer_the_last_chunk_with_the_file(files, mode):
    upload, answer, config = files
    async with fake_envoy(config) as envoy:
        conv = await envoy.converse(
            [
                request_headers(request_mode=mode, response_mode=mode),
                request_body(b"a" * 10, end=True),
                response_headers(),
                response_body(b"b", end=True),
            ]
        )
    assert conv.code == grpc.StatusCode.OK
    (req,) = conv.of("request_body")
    assert req.request_body.response.body_mutation.body == upload
    (resp,) = conv.of("response_body")
    assert resp.response_body.response.body_mutation.body == answer


async def test_mode_none_is_an_error(files):
    _, _, config = files
    async with fake_envoy(config) as envoy:
        conv = await envoy.converse([request_headers(request_mode=NONE, response_mode=NONE, end_of_stream=True)])
    assert conv.code == grpc.StatusCode.INTERNAL
    assert "mode NONE" in conv.details


def test_missing_file_is_named_at_start_up(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(
        '[routes.default]\nchain = ["replace"]\n[plugins.replace]\nresponse_file = "/nonexistent/x.mp4"\n'
    )
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "key 'plugins.replace.response_file'" in err and "no such file" in err
