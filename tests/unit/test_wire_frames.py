"""The frame layer (wire/http2/frames.py) held to python-hyper's hyperframe: for any bytes,
both read the same frame, or both refuse it. hyperframe is the library the hand-written reader
replaced for speed (pyproject.toml); here it is the reference.

hyperframe checks a frame's own layout (lengths, padding, stream 0 or not); it leaves to the
connection what RFC 9113 makes a stream-state or value rule (a zero WINDOW_UPDATE, a PRIORITY
on its own stream, SETTINGS values), which the frame layer checks too: those cases are written
out after the comparison.
"""

from __future__ import annotations

import struct

import pytest
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc_host.wire.http2 import frames
from extproc_host.wire.http2.frames import ConnectionFault, StreamFault


def ours(kind: int, flags: int, stream_id: int, payload: bytes) -> object:
    """What the frame layer reads of one frame: its fields, or the error it raises."""
    view = memoryview(payload)
    try:
        frames.check_stream_id(kind, stream_id)
        if kind == frames.DATA:
            return bytes(frames.unpad(view, kind)) if flags & frames.PADDED else payload
        if kind == frames.HEADERS:
            return bytes(frames.read_headers(flags, stream_id, view)[0])
        if kind == frames.PRIORITY:
            frames.read_priority(stream_id, view)
            return None
        if kind == frames.RST_STREAM:
            return frames.read_rst_stream(view)
        if kind == frames.SETTINGS:
            return frames.read_settings(flags, view)
        if kind == frames.PING:
            return frames.read_ping(view)
        if kind == frames.GOAWAY:
            return frames.read_goaway(view)
        if kind == frames.WINDOW_UPDATE:
            return frames.read_window_update(stream_id, view)
    except (ConnectionFault, StreamFault) as exc:
        return exc
    raise AssertionError(kind)


def theirs(data: bytes) -> object:
    """hyperframe's reading of the same frame, in the same shape as :func:`ours`."""
    try:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
    except (HyperframeError, ValueError, struct.error) as exc:
        return exc
    if isinstance(frame, DataFrame):
        return bytes(frame.data)
    if isinstance(frame, HeadersFrame):
        return bytes(frame.data)
    if isinstance(frame, PriorityFrame):
        return None
    if isinstance(frame, RstStreamFrame):
        return frame.error_code
    if isinstance(frame, SettingsFrame):
        return list(frame.settings.items())
    if isinstance(frame, PingFrame):
        return bytes(frame.opaque_data)
    if isinstance(frame, GoAwayFrame):
        return (frame.last_stream_id, frame.error_code, bytes(frame.additional_data))
    if isinstance(frame, WindowUpdateFrame):
        return frame.window_increment
    raise AssertionError(frame)


KINDS = [
    frames.DATA,
    frames.HEADERS,
    frames.PRIORITY,
    frames.RST_STREAM,
    frames.SETTINGS,
    frames.PING,
    frames.GOAWAY,
    frames.WINDOW_UPDATE,
]


def layout_only(kind: int, flags: int, stream_id: int, payload: bytes) -> bool:
    """Frames whose only fault would be one hyperframe leaves to the connection."""
    if kind == frames.WINDOW_UPDATE and len(payload) == 4 and not struct.unpack(">L", payload)[0] & 0x7FFFFFFF:
        return False  # a zero increment
    if kind == frames.PRIORITY and len(payload) == 5 and struct.unpack(">L", payload[:4])[0] & 0x7FFFFFFF == stream_id:
        return False  # depends on itself
    if kind == frames.HEADERS and flags & frames.PRIORITY_FLAG:
        return False  # hyperframe reads a self-dependency without complaint; we report it later
    if kind == frames.HEADERS and flags & frames.PADDED and payload and payload[0] == len(payload) - 1:
        return False  # padding exactly as long as what remains: see the test below
    return kind != frames.SETTINGS or flags & frames.ACK or len(payload) % 6 != 0


@settings(max_examples=2000, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    flags=st.integers(0, 255),
    stream_id=st.sampled_from([0, 1, 3, 0x7FFFFFFF]),
    payload=st.one_of(st.binary(max_size=40), st.binary(min_size=4, max_size=9)),
)
def test_the_frame_layer_reads_what_hyperframe_reads(kind: int, flags: int, stream_id: int, payload: bytes) -> None:
    if not layout_only(kind, flags, stream_id, payload):
        return
    if kind in (frames.WINDOW_UPDATE, frames.GOAWAY) and payload:
        # RFC 9113 (6.8, 6.9): the reserved bit is ignored; hyperframe reads it as part of the
        # number (and refuses an increment over 2^31-1 for it), so it gets the bit cleared.
        reference_payload = bytes([payload[0] & 0x7F]) + payload[1:]
    else:
        reference_payload = payload
    data = struct.pack(">L", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">L", stream_id) + reference_payload
    mine, reference = ours(kind, flags, stream_id, payload), theirs(data)
    if isinstance(reference, Exception):
        assert isinstance(mine, (ConnectionFault, StreamFault)), f"hyperframe refused ({reference}), we read {mine!r}"
    else:
        assert mine == reference


@pytest.mark.parametrize(
    ("kind", "flags", "stream_id", "payload", "fault", "code"),
    [
        (frames.WINDOW_UPDATE, 0, 0, b"\0\0\0\0", ConnectionFault, frames.PROTOCOL_ERROR),
        (frames.WINDOW_UPDATE, 0, 1, b"\x80\0\0\0", StreamFault, frames.PROTOCOL_ERROR),
        (frames.PRIORITY, 0, 3, b"\0\0\0\x03\x10", StreamFault, frames.PROTOCOL_ERROR),
        (frames.PRIORITY, 0, 3, b"\0\0\0\x01", StreamFault, frames.FRAME_SIZE_ERROR),
        (frames.SETTINGS, 0, 0, b"\0\x02\0\0\0\x02", ConnectionFault, frames.PROTOCOL_ERROR),
        (frames.SETTINGS, 0, 0, b"\0\x04\x80\0\0\0", ConnectionFault, frames.FLOW_CONTROL_ERROR),
        (frames.SETTINGS, 0, 0, b"\0\x05\0\0\x3f\xff", ConnectionFault, frames.PROTOCOL_ERROR),
        (frames.SETTINGS, 0, 0, b"\0\x05\x01\0\0\0", ConnectionFault, frames.PROTOCOL_ERROR),
        (frames.SETTINGS, 1, 0, b"\0\x01\0\0\0\0", ConnectionFault, frames.FRAME_SIZE_ERROR),
        (frames.DATA, frames.PADDED, 1, b"\x05abcd", ConnectionFault, frames.PROTOCOL_ERROR),
        (frames.DATA, frames.PADDED, 1, b"", ConnectionFault, frames.FRAME_SIZE_ERROR),
        (frames.PING, 0, 0, b"123456", ConnectionFault, frames.FRAME_SIZE_ERROR),
        (frames.GOAWAY, 0, 0, b"1234567", ConnectionFault, frames.FRAME_SIZE_ERROR),
        (frames.RST_STREAM, 0, 1, b"12345", ConnectionFault, frames.FRAME_SIZE_ERROR),
    ],
    ids=[
        "rfc9113-6.9-window-update-0-on-connection",
        "rfc9113-6.9-window-update-0-on-stream",
        "rfc9113-5.3.1-priority-on-itself",
        "rfc9113-6.3-priority-of-4-bytes",
        "rfc9113-6.5.2-enable-push-2",
        "rfc9113-6.5.2-initial-window-2^31",
        "rfc9113-6.5.2-max-frame-under-2^14",
        "rfc9113-6.5.2-max-frame-2^24",
        "rfc9113-6.5-ack-with-payload",
        "rfc9113-6.1-padding-past-payload",
        "rfc9113-6.1-padded-without-pad-length",
        "rfc9113-6.7-ping-of-6-bytes",
        "rfc9113-6.8-goaway-of-7-bytes",
        "rfc9113-6.4-rst-stream-of-5-bytes",
    ],
)
def test_rules_beyond_the_layout_raise_the_code_the_rfc_names(
    kind: int, flags: int, stream_id: int, payload: bytes, fault: type[Exception], code: int
) -> None:
    error = ours(kind, flags, stream_id, payload)
    assert isinstance(error, fault) and error.code == code  # type: ignore[attr-defined]


def test_headers_padding_as_long_as_what_remains_leaves_an_empty_fragment() -> None:
    """RFC 9113 section 6.2: padding that *exceeds* what remains is an error; padding exactly as
    long leaves an empty header block fragment (hyperframe refuses it too)."""
    fragment, _ = frames.read_headers(frames.PADDED, 1, memoryview(b"\x0c" + bytes(12)))
    assert bytes(fragment) == b""
    with pytest.raises(ConnectionFault):
        frames.read_headers(frames.PADDED, 1, memoryview(b"\x0d" + bytes(12)))


def test_header_blocks_are_split_at_the_peers_frame_size_and_read_back_by_hyperframe() -> None:
    block = bytes(range(256)) * 200  # 51,200 bytes
    pieces = frames.header_frames(7, block, True, 16384)
    parsed = []
    for piece in pieces:
        frame, length = Frame.parse_frame_header(memoryview(piece[:9]))
        frame.parse_body(memoryview(piece[9 : 9 + length]))
        assert length <= 16384 and frame.stream_id == 7
        parsed.append(frame)
    assert type(parsed[0]).__name__ == "HeadersFrame" and "END_STREAM" in parsed[0].flags
    assert all(type(f).__name__ == "ContinuationFrame" for f in parsed[1:])
    assert ["END_HEADERS" in f.flags for f in parsed] == [False] * (len(parsed) - 1) + [True]
    assert b"".join(f.data for f in parsed) == block
