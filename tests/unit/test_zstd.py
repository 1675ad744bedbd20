"""The zstd plugin: negotiation, skip rules, header changes, progressive compression and
bounded, checked decompression, replayed through the in-process fake Envoy in every body mode."""

from __future__ import annotations

import os
import struct

import grpc
import pytest
import zstandard

from extproc_host import Headers, StreamInfo
from extproc_host_plugins import zstd as plugin
from extproc_host_plugins.zstd import ZstdSettings, accepts_zstd, media_type, parse_accept_encoding, type_matches

from .fake_envoy import (
    BUFFERED,
    FD,
    STREAMED,
    fake_envoy,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    response_trailers,
)

ROUTES = """
[routes.default]
chain = ["zstd"]

[routes.small]
chain = ["zstd"]

[routes.small.plugins.zstd]
max_decompressed_bytes = 100000
min_bytes = 100
skip_content_types = ["text/csv", "application/vnd.ms-*"]

[routes.no-ratio]
chain = ["zstd"]

[routes.no-ratio.plugins.zstd]
max_ratio = 0

[routes.off]
chain = ["zstd"]

[routes.off.plugins.zstd]
compress_responses = false
decompress_requests = false
"""

MiB = 1024 * 1024
ACCEPT = {"accept-encoding": "gzip, zstd"}


@pytest.fixture
async def envoy(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text(ROUTES)
    async with fake_envoy(str(path)) as fake:
        yield fake


def _compressible(n: int, seed: int = 0) -> bytes:
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", bytes([97 + seed % 26]) * 5]
    out = bytearray()
    i = seed
    while len(out) < n:
        out += words[i % len(words)] + str(i).encode() + b"\n"
        i += 7
    return bytes(out[:n])


def _mixed_chunks() -> list[bytes]:
    return [_compressible(1000, 1), os.urandom(300 * 1024), _compressible(700 * 1024, 2), b"x", os.urandom(5)]


def _headers_of(response, kind) -> tuple[dict[str, str], list[str]]:
    mutation = getattr(response, kind).response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}, list(mutation.remove_headers)


def _stream_bodies(conv, kind: str, mode: int) -> list[bytes]:
    """The body bytes the host sent back, one entry per answer."""
    out = []
    for r in conv.of(kind):
        mutation = getattr(r, kind).response.body_mutation
        if mode == FD:
            out.append(mutation.streamed_response.body)
        else:
            out.append(mutation.body)
    return out


# ---- accept-encoding negotiation ----


@pytest.mark.parametrize(
    "values, accepted",
    [
        (["zstd"], True),
        (["ZSTD"], True),
        (["gzip, br, zstd"], True),
        (["gzip", "zstd;q=0.5"], True),
        (["zstd;q=0"], False),
        (["zstd;q=0.000"], False),
        (["zstd ; Q=0.001"], True),
        (["zstd;q=1.000"], True),
        (["*"], True),
        (["*;q=0"], False),
        (["*;q=0.2, zstd;q=0"], False),  # an explicit refusal beats the wildcard
        (["*;q=0, zstd"], True),
        (["gzip, br"], False),
        ([], False),
        ([""], False),
        (["zstd;q=2"], False),  # malformed q: the entry is ignored
        (["zstd;q=abc, gzip"], False),
        (["zstd;q=0.5.1"], False),
        (["zstd;q="], False),
        (["zst d"], False),
        (["zstd;level=3"], True),  # other parameters are allowed and ignored
        (["zstd, zstd;q=0"], False),  # named twice: the refusal wins
        ([",,, zstd;q=0.1 ,"], True),
        (["identity"], False),
    ],
)
def test_accept_encoding_negotiation(values, accepted):
    assert accepts_zstd(values) is accepted


def test_parse_accept_encoding_keeps_q_values():
    assert parse_accept_encoding(["gzip;q=0.8, ZSTD, br;q=0, bad;q=7, *;q=0.1"]) == {
        "gzip": 0.8,
        "zstd": 1.0,
        "br": 0.0,
        "*": 0.1,
    }


@pytest.mark.parametrize(
    "content_type, skipped",
    [
        ("image/png", True),
        ("IMAGE/PNG; charset=binary", True),
        ("video/mp4", True),
        ("audio/ogg", True),
        ("application/zip", True),
        ("application/gzip", True),
        ("application/zstd", True),
        ("text/html; charset=utf-8", False),
        ("application/json", False),
        ("application/zipper", False),
        ("imagex/png", False),
    ],
)
def test_default_skip_content_types(content_type, skipped):
    assert type_matches(media_type(content_type), ZstdSettings().skip_content_types) is skipped


def test_settings_are_validated():
    with pytest.raises(ValueError):
        ZstdSettings(level=20)
    with pytest.raises(ValueError):
        ZstdSettings(level=0)
    with pytest.raises(ValueError):
        ZstdSettings(lvl=3)
    assert ZstdSettings().level == 3
    assert ZstdSettings().max_decompressed_bytes == 1024**3


# ---- response compression ----


async def _response_exchange(envoy, req_extra, resp_extra, chunks, mode=FD, route="default", method="POST"):
    extra = {**req_extra, ":method": method}
    msgs = [request_headers(route=route, request_mode=mode, response_mode=mode, end_of_stream=True, extra=extra)]
    msgs.append(response_headers(extra=resp_extra))
    if mode == BUFFERED:
        msgs.append(response_body(b"".join(chunks), end=True))
    else:
        msgs += [response_body(c) for c in chunks]
        msgs.append(response_body(b"", end=True))
    conv = await envoy.converse(msgs)
    assert conv.code == grpc.StatusCode.OK, conv.details
    return conv


@pytest.mark.parametrize("mode", [FD, STREAMED, BUFFERED], ids=["fd", "streamed", "buffered"])
async def test_compresses_for_a_client_that_accepts_zstd(envoy, mode):
    chunks = _mixed_chunks()
    conv = await _response_exchange(
        envoy,
        ACCEPT,
        {"content-type": "text/plain", "content-length": "9", "vary": "origin", "etag": '"v1"'},
        chunks,
        mode,
    )
    (headers_answer,) = conv.of("response_headers")
    set_headers, removed = _headers_of(headers_answer, "response_headers")
    assert set_headers["content-encoding"] == "zstd"
    assert set_headers["vary"] == "origin, accept-encoding"
    assert set_headers["etag"] == 'W/"v1"'
    assert "content-length" in removed
    body = b"".join(_stream_bodies(conv, "response_body", mode))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == b"".join(chunks)
    if mode == BUFFERED:
        (answer,) = conv.of("response_body")
        set_headers, _ = _headers_of(answer, "response_body")
        assert set_headers["content-length"] == str(len(body))


@pytest.mark.parametrize("mode", [FD, STREAMED], ids=["fd", "streamed"])
async def test_every_answer_decodes_as_it_arrives(envoy, mode):
    # One answer per input chunk (each well under 1 MiB compressed): after each one, the bytes
    # sent so far must decode to exactly the input so far.
    chunks = [_compressible(50_000, i) if i % 2 else os.urandom(20_000 + i) for i in range(12)]
    conv = await _response_exchange(envoy, ACCEPT, {"content-type": "text/plain"}, chunks, mode)
    bodies = _stream_bodies(conv, "response_body", mode)
    assert len(bodies) == len(chunks) + 1  # plus the end of the frame
    decoder = zstandard.ZstdDecompressor().decompressobj()
    decoded = b""
    for i, piece in enumerate(bodies[:-1]):
        assert piece, f"answer {i} is empty"
        decoded += decoder.decompress(piece)
        assert decoded == b"".join(chunks[: i + 1]), f"answer {i} does not decode to the input so far"
    assert not decoder.eof
    decoded += decoder.decompress(bodies[-1])
    assert decoder.eof and decoded == b"".join(chunks)


async def test_compressed_frame_carries_a_checksum(envoy):
    conv = await _response_exchange(envoy, ACCEPT, {}, [b"hello " * 100])
    body = b"".join(_stream_bodies(conv, "response_body", FD))
    params = zstandard.get_frame_parameters(body)
    assert params.has_checksum


async def test_empty_response_body_is_an_empty_frame(envoy):
    conv = await _response_exchange(envoy, ACCEPT, {}, [])
    body = b"".join(_stream_bodies(conv, "response_body", FD))
    decoder = zstandard.ZstdDecompressor().decompressobj()
    assert decoder.decompress(body) == b"" and decoder.eof


async def test_full_duplex_response_trailers_end_the_frame(envoy):
    msgs = [
        request_headers(end_of_stream=True, extra=ACCEPT),
        response_headers(),
        response_body(b"abc" * 1000),
        response_trailers({"x-t": "1"}),
    ]
    conv = await envoy.converse(msgs)
    assert conv.code == grpc.StatusCode.OK
    body, _flags = conv.streamed("response_body")
    decoder = zstandard.ZstdDecompressor().decompressobj()
    assert decoder.decompress(body) == b"abc" * 1000 and decoder.eof


@pytest.mark.parametrize(
    "req_extra, resp_extra, method, why",
    [
        ({}, {}, "POST", "no accept-encoding"),
        ({"accept-encoding": "gzip, br"}, {}, "POST", "zstd not accepted"),
        ({"accept-encoding": "zstd;q=0, *"}, {}, "POST", "zstd refused"),
        (ACCEPT, {"content-encoding": "gzip"}, "POST", "already encoded"),
        (ACCEPT, {"content-type": "image/png"}, "POST", "skipped type"),
        (ACCEPT, {"content-type": "Video/MP4; codecs=avc1"}, "POST", "skipped type with parameters"),
        (ACCEPT, {":status": "204"}, "POST", "204"),
        (ACCEPT, {":status": "304"}, "POST", "304"),
        (ACCEPT, {":status": "206", "content-range": "bytes 0-9/100"}, "POST", "partial content"),
        (ACCEPT, {"content-length": "0"}, "POST", "empty body"),
        (ACCEPT, {"cache-control": "public, no-transform"}, "POST", "no-transform"),
        (ACCEPT, {}, "HEAD", "HEAD"),
    ],
)
async def test_responses_left_alone(envoy, req_extra, resp_extra, method, why):
    chunks = [b"some text " * 100]
    conv = await _response_exchange(envoy, req_extra, resp_extra, chunks, method=method)
    (headers_answer,) = conv.of("response_headers")
    set_headers, removed = _headers_of(headers_answer, "response_headers")
    assert "content-encoding" not in set_headers, why
    assert "content-length" not in removed, why
    assert b"".join(_stream_bodies(conv, "response_body", FD)) == b"".join(chunks), why


async def test_vary_is_added_for_a_client_that_does_not_accept_zstd(envoy):
    conv = await _response_exchange(envoy, {"accept-encoding": "gzip"}, {"content-type": "text/plain"}, [b"x" * 100])
    set_headers, _ = _headers_of(conv.of("response_headers")[0], "response_headers")
    assert set_headers == {"vary": "accept-encoding"}


@pytest.mark.parametrize("vary", ["Accept-Encoding", "origin, accept-encoding", "*"])
async def test_vary_is_not_repeated(envoy, vary):
    conv = await _response_exchange(envoy, ACCEPT, {"vary": vary}, [b"x" * 100])
    set_headers, _ = _headers_of(conv.of("response_headers")[0], "response_headers")
    assert "vary" not in set_headers
    assert set_headers["content-encoding"] == "zstd"


async def test_identity_content_encoding_is_replaced(envoy):
    conv = await _response_exchange(envoy, ACCEPT, {"content-encoding": "identity"}, [b"x" * 100])
    set_headers, _ = _headers_of(conv.of("response_headers")[0], "response_headers")
    assert set_headers["content-encoding"] == "zstd"


@pytest.mark.parametrize(
    "resp_extra, compressed",
    [
        ({"content-length": "99"}, False),
        ({"content-length": "100"}, True),
        ({}, True),
        ({"content-type": "text/csv"}, False),
        ({"content-type": "application/vnd.ms-excel"}, False),
        ({"content-type": "image/png"}, True),  # the route's own list replaces the default one
    ],
)
async def test_route_settings_min_bytes_and_skip_list(envoy, resp_extra, compressed):
    conv = await _response_exchange(envoy, ACCEPT, resp_extra, [b"y" * 100], route="small")
    set_headers, _ = _headers_of(conv.of("response_headers")[0], "response_headers")
    assert (set_headers.get("content-encoding") == "zstd") is compressed


async def test_route_with_both_directions_off(envoy):
    data = zstandard.ZstdCompressor().compress(b"payload")
    msgs = [
        request_headers(route="off", extra={"content-encoding": "zstd", **ACCEPT}),
        request_body(data, end=True),
        response_headers(),
        response_body(b"plain", end=True),
    ]
    conv = await envoy.converse(msgs)
    assert conv.streamed("request_body")[0] == data
    assert conv.streamed("response_body")[0] == b"plain"


# ---- request decompression ----


async def _upload(envoy, chunks, mode=FD, route="default", encoding="zstd", trailers=None):
    extra = {"content-encoding": encoding, "content-length": "7"}
    msgs = [request_headers(route=route, request_mode=mode, response_mode=mode, extra=extra)]
    if mode == BUFFERED:
        msgs.append(request_body(b"".join(chunks), end=True))
    elif trailers is not None:
        msgs += [request_body(c) for c in chunks]
        msgs.append(request_trailers(trailers))
    else:
        msgs += [request_body(c) for c in chunks]
        msgs.append(request_body(b"", end=True))
    return await envoy.converse(msgs)


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("mode", [FD, STREAMED, BUFFERED], ids=["fd", "streamed", "buffered"])
async def test_request_body_is_decompressed(envoy, mode):
    plain = b"".join(_mixed_chunks()) * 3
    compressed = zstandard.ZstdCompressor(level=5).compress(plain)
    conv = await _upload(envoy, _split(compressed, 100_000), mode)
    assert conv.code == grpc.StatusCode.OK, conv.details
    set_headers, removed = _headers_of(conv.of("request_headers")[0], "request_headers")
    assert set(removed) == {"content-encoding", "content-length"}
    assert b"".join(_stream_bodies(conv, "request_body", mode)) == plain
    if mode == BUFFERED:
        set_headers, _ = _headers_of(conv.of("request_body")[0], "request_body")
        assert set_headers["content-length"] == str(len(plain))


async def test_concatenated_frames_and_streamed_compressor_output(envoy):
    # Several frames back to back (one from a streaming compressor, without content size).
    parts = [b"first " * 1000, os.urandom(10_000), b"third " * 50_000]
    cobj = zstandard.ZstdCompressor().compressobj()
    streamed = cobj.compress(parts[2]) + cobj.flush()
    data = zstandard.ZstdCompressor().compress(parts[0]) + zstandard.ZstdCompressor().compress(parts[1]) + streamed
    conv = await _upload(envoy, _split(data, 777))
    assert conv.code == grpc.StatusCode.OK, conv.details
    body, flags = conv.streamed("request_body")
    assert body == b"".join(parts) and flags[-1] is True


async def test_skippable_frames_are_skipped(envoy):
    skippable = struct.pack("<II", 0x184D2A50, 5) + b"hello"
    data = skippable + zstandard.ZstdCompressor().compress(b"payload") + skippable
    conv = await _upload(envoy, _split(data, 3))
    assert conv.code == grpc.StatusCode.OK, conv.details
    assert conv.streamed("request_body")[0] == b"payload"


async def test_a_bomb_comes_out_in_bounded_pieces(envoy):
    plain = bytes(64 * MiB)
    data = zstandard.ZstdCompressor().compress(plain)
    assert len(data) < 64 * 1024
    conv = await _upload(envoy, [data], route="no-ratio")
    assert conv.code == grpc.StatusCode.OK, conv.details
    pieces = _stream_bodies(conv, "request_body", FD)
    assert max(len(p) for p in pieces) <= plugin.OUTPUT_PIECE
    assert sum(len(p) for p in pieces) == len(plain) and not any(b"".join(pieces))


def test_a_bomb_is_never_more_than_one_piece_in_memory():
    """4 bytes of zstd stand for 128 KiB: the decompressor is asked for one piece at a time, and
    the next one is made only when the host takes this one (a 2 KiB slice of this bomb once
    made 64 MiB at once)."""
    import tracemalloc

    data = zstandard.ZstdCompressor().compress(bytes(64 * MiB))
    settings = ZstdSettings(max_ratio=0)
    zstd = plugin.Zstd(settings, StreamInfo(stream_id="1", route="default"))
    zstd.on_request_headers(Headers([("content-encoding", "zstd")]))
    tracemalloc.start()
    try:
        pieces = zstd.on_request_body(data)
        taken = 0
        peak = 0
        for piece in pieces:
            assert len(piece) <= plugin.OUTPUT_PIECE
            taken += len(piece)
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            tracemalloc.reset_peak()
            del piece
    finally:
        tracemalloc.stop()
    assert taken == 64 * MiB
    assert peak < 4 * plugin.OUTPUT_PIECE, f"{peak} bytes at once"  # the piece, and the decompressor's buffer


async def test_other_codings_stay_in_content_encoding(envoy):
    data = zstandard.ZstdCompressor().compress(b"inner gzip bytes")
    conv = await _upload(envoy, [data], encoding="gzip, ZSTD")
    set_headers, removed = _headers_of(conv.of("request_headers")[0], "request_headers")
    assert set_headers["content-encoding"] == "gzip" and removed == ["content-length"]
    assert conv.streamed("request_body")[0] == b"inner gzip bytes"


async def test_requests_in_other_codings_are_left_alone(envoy):
    conv = await _upload(envoy, [b"\x1f\x8bnot ours"], encoding="gzip")
    assert not conv.of("request_headers")[0].request_headers.response.HasField("header_mutation")
    assert conv.streamed("request_body")[0] == b"\x1f\x8bnot ours"


async def test_full_duplex_request_trailers_end_the_body(envoy):
    data = zstandard.ZstdCompressor().compress(b"t" * 5000)
    conv = await _upload(envoy, _split(data, 5), trailers={"x-t": "1"})
    assert conv.code == grpc.StatusCode.OK, conv.details
    assert conv.streamed("request_body")[0] == b"t" * 5000


def _rejected(conv, status: int, words: str) -> None:
    # The host ends the stream with the local reply while this client may still be writing the
    # body: grpc's Python client then reports its own cut write as "Internal error from Core"
    # (with either server; Envoy does not). The reply itself must have come.
    client_cut = (conv.code, conv.details) == (grpc.StatusCode.INTERNAL, "Internal error from Core")
    assert conv.code == grpc.StatusCode.OK or client_cut, conv.details
    (imm,) = conv.of("immediate_response")
    assert imm.immediate_response.status.code == status
    assert words in imm.immediate_response.body.decode()
    headers = {h.header.key: h.header.raw_value for h in imm.immediate_response.headers.set_headers}
    assert headers["content-type"].startswith(b"text/plain")


@pytest.mark.parametrize("mode", [FD, STREAMED, BUFFERED], ids=["fd", "streamed", "buffered"])
async def test_too_large_after_decompression_is_413(envoy, mode):
    data = zstandard.ZstdCompressor().compress(b"z" * 100_001)
    conv = await _upload(envoy, _split(data, 10), mode, route="small")
    _rejected(conv, 413, "more than 100000 bytes")
    # Nothing past the limit went on, and the body was never ended.
    if mode == FD:
        body, flags = conv.streamed("request_body")
        assert len(body) <= 100_000 and True not in flags


@pytest.mark.parametrize("mode", [FD, STREAMED, BUFFERED], ids=["fd", "streamed", "buffered"])
async def test_expansion_past_max_ratio_is_413_with_little_sent_on(envoy, mode):
    plain = bytes(64 * MiB)
    data = zstandard.ZstdCompressor().compress(plain)
    conv = await _upload(envoy, _split(data, 1024), mode)
    _rejected(conv, 413, "more than 100 times its compressed size")
    if mode == FD:  # what went on before the limit: about max_ratio times the input so far
        body, flags = conv.streamed("request_body")
        assert len(body) <= plugin.RATIO_FREE_BYTES + 100 * len(data) and True not in flags


async def test_a_ratio_under_max_ratio_or_a_body_under_the_free_bytes_passes(envoy):
    text = _compressible(4 * MiB)
    data = zstandard.ZstdCompressor().compress(text)
    assert len(text) / len(data) < 100
    conv = await _upload(envoy, _split(data, 4096))
    assert conv.streamed("request_body")[0] == text
    small = bytes(plugin.RATIO_FREE_BYTES)  # compresses thousands of times, but is small
    conv = await _upload(envoy, [zstandard.ZstdCompressor().compress(small)])
    assert conv.streamed("request_body")[0] == small


async def test_exactly_the_limit_passes(envoy):
    data = zstandard.ZstdCompressor().compress(b"z" * 100_000)
    conv = await _upload(envoy, [data], route="small")
    assert conv.streamed("request_body")[0] == b"z" * 100_000


@pytest.mark.parametrize("mode", [FD, STREAMED, BUFFERED], ids=["fd", "streamed", "buffered"])
async def test_corrupt_input_is_400(envoy, mode):
    good = zstandard.ZstdCompressor(write_checksum=True).compress(_compressible(500_000))
    bad = good[:1000] + bytes(b ^ 0x5A for b in good[1000:2000]) + good[2000:]
    conv = await _upload(envoy, _split(bad, 4096), mode)
    _rejected(conv, 400, "not valid zstd")


async def test_checksum_mismatch_is_400(envoy):
    good = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(50_000))
    bad = good[:1000] + bytes([good[1000] ^ 1]) + good[1001:]  # inside a raw block: only the checksum tells
    conv = await _upload(envoy, [bad])
    _rejected(conv, 400, "not valid zstd")


async def test_not_zstd_at_all_is_400(envoy):
    conv = await _upload(envoy, [b"plain text pretending to be zstd"])
    _rejected(conv, 400, "not valid zstd")


async def test_trailing_garbage_after_a_frame_is_400(envoy):
    data = zstandard.ZstdCompressor().compress(b"ok" * 100) + b"garbage!"
    conv = await _upload(envoy, [data])
    _rejected(conv, 400, "not valid zstd")


@pytest.mark.parametrize("mode", [FD, STREAMED, BUFFERED], ids=["fd", "streamed", "buffered"])
async def test_truncated_input_is_400(envoy, mode):
    data = zstandard.ZstdCompressor().compress(_compressible(200_000))
    conv = await _upload(envoy, _split(data[:-3], 1000), mode)
    _rejected(conv, 400, "truncated")


async def test_window_larger_than_allowed_is_400(envoy):
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=24)  # 16 MiB window
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()  # no content size
    data = cobj.compress(b"w" * 100) + cobj.flush()
    assert zstandard.get_frame_parameters(data).window_size == 16 * MiB
    conv = await _upload(envoy, [data])
    _rejected(conv, 400, "not valid zstd")


async def test_empty_zstd_body_is_an_empty_body(envoy):
    conv = await _upload(envoy, [])
    assert conv.code == grpc.StatusCode.OK
    assert conv.streamed("request_body") == (b"", [True])


async def test_response_whose_headers_end_the_stream_is_left_alone(envoy):
    # 200 with no content-length and no body (an HTTP/2 upstream may answer so).
    conv = await envoy.converse(
        [request_headers(end_of_stream=True, extra=ACCEPT), response_headers(end_of_stream=True)]
    )
    set_headers, _ = _headers_of(conv.of("response_headers")[0], "response_headers")
    assert "content-encoding" not in set_headers
