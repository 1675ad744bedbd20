"""Header blocks (wire/http2/fields.py) held to the libraries: the decoder, which remembers the
blocks that leave HPACK's table unchanged, decodes any sequence of blocks exactly as a fresh
``hpack.Decoder`` does; and a request's fields are accepted or refused as python-hyper's h2
accepts or refuses them as a server (RFC 9113 section 8), but where this module follows the RFCs
where h2 is stricter (an absent :authority, which RFC 9113 allows when there is none to convey)
or more lenient (an empty :method or :scheme).
"""

from __future__ import annotations

import hpack
import pytest
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc_host.wire.http2.fields import Decoder, Malformed
from extproc_host.wire.http2.frames import ConnectionFault

NAMES = [
    ":method",
    ":scheme",
    ":path",
    ":authority",
    ":status",
    ":protocol",
    ":foo",
    ":",
    "content-type",
    "te",
    "host",
    "x-a",
    "X-Upper",
    "x y",
    "x:y",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "",
]
VALUES = [
    "POST",
    "GET",
    "CONNECT",
    "http",
    "/p",
    "",
    "trailers",
    "Trailers",
    "gzip",
    "a b",
    " lead",
    "trail\t",
    "a\rb",
    "a\nb",
    "a\0b",
    "h1",
]


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    base = [(":method", "POST"), (":scheme", "http"), (":path", "/p"), (":authority", "h1")]
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=4))
    position = draw(st.integers(0, len(base)))
    drop = draw(st.sets(st.integers(0, len(base) - 1), max_size=2))
    kept = [f for i, f in enumerate(base) if i not in drop]
    merged = kept[:position] + fields + kept[position:]
    return [(n.encode(), v.encode()) for n, v in merged]


def h2_accepts(fields: list[tuple[bytes, bytes]]) -> bool:
    flags = HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)
    try:
        list(validate_headers(fields, flags))
    except ProtocolError:
        return False
    return True


@settings(max_examples=1000, deadline=None)
@given(fields=header_lists())
def test_requests_are_refused_where_h2_refuses_them(fields: list[tuple[bytes, bytes]]) -> None:
    names = {name for name, _ in fields}
    if (b":method", b"") in fields or (b":scheme", b"") in fields:
        # A method is a token (RFC 9110), a scheme at least a letter (RFC 3986): an empty one is
        # refused here, h2 takes it.
        with pytest.raises(Malformed):
            Decoder(16384).request(fields)
        return
    if b":authority" not in names and b"host" not in names:
        fields = [*fields, (b"x-authority-absent", b"1")]
        reference = h2_accepts([*fields, (b"host", b"h1")]) if b":method" in names else h2_accepts(fields)
    else:
        reference = h2_accepts(fields)
    try:
        Decoder(16384).request(fields)
        mine = True
    except Malformed:
        mine = False
    assert mine == reference, f"h2 {'accepts' if reference else 'refuses'}: {fields}"


@pytest.mark.parametrize(
    "fields",
    [[(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p")]],
    ids=["no-authority"],
)
def test_a_request_without_authority_is_taken(fields: list[tuple[bytes, bytes]]) -> None:
    """RFC 9113 section 8.3.1: a client with no authority to convey sends no :authority (h2
    refuses such a request; gRPC clients always send one)."""
    assert Decoder(16384).request(fields).path == b"/p"


HEADER_SETS = [
    [(":method", "POST"), (":scheme", "http"), (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process")],
    [(":method", "POST"), (":path", "/a"), ("x-request-id", "0f3a")],
    [(":method", "GET"), (":path", "/b"), ("cookie", "c" * 300)],
    [("x-trace", "abc"), ("x-trace", "def"), ("grpc-timeout", "10S")],
]


@st.composite
def block_sequences(draw: st.DrawFn) -> list[tuple[int | None, list[tuple[str, str]], bool]]:
    """Header sets to encode one after another: a table size change first (or not), the fields,
    and whether the encoder indexes them (a literal without indexing otherwise)."""
    steps = []
    for _ in range(draw(st.integers(1, 30))):
        size = draw(st.one_of(st.none(), st.none(), st.sampled_from([0, 64, 256, 4096])))
        fields = draw(st.sampled_from(HEADER_SETS))
        extra = draw(st.lists(st.tuples(st.sampled_from(["x-a", "x-b"]), st.text("abc", max_size=5)), max_size=2))
        steps.append((size, fields + extra, draw(st.booleans())))
    return steps


@settings(max_examples=150, deadline=None)
@given(steps=block_sequences())
def test_remembered_blocks_decode_as_hpack_decodes_them(steps) -> None:
    encoder = hpack.Encoder()
    mine = Decoder(1 << 20)
    reference = hpack.Decoder(max_header_list_size=1 << 20)
    for size, fields, indexed in steps:
        if size is not None:
            encoder.header_table_size = size
        block = encoder.encode(fields if indexed else [hpack.NeverIndexedHeaderTuple(n, v) for n, v in fields])
        for _ in range(2):  # the same block twice: the second may come from what was remembered
            assert outcome(mine.decode, block) == outcome(
                lambda b: [tuple(f) for f in reference.decode(b, raw=True)], block
            )


def outcome(decode, block: bytes) -> object:
    """What decoding gives: the fields, or that it failed (a block that refers to entries its
    first decoding evicted fails the second time, in both decoders)."""
    try:
        return decode(block)
    except (ConnectionFault, hpack.HPACKError):
        return "undecodable"


def test_a_block_that_changes_the_table_is_decoded_every_time() -> None:
    encoder = hpack.Encoder()
    decoder = Decoder(1 << 20)
    block = encoder.encode([("x-new", "v")])  # literal with incremental indexing
    assert decoder.decode(block) == [(b"x-new", b"v")]
    version = decoder._table.version
    assert decoder.decode(block) == [(b"x-new", b"v")]  # inserted again: decoded, not remembered
    assert decoder._table.version == version + 1
    plain = hpack.Encoder().encode([(":method", "POST")])  # a static entry: nothing changes
    assert decoder.decode(plain) is decoder.decode(plain)
