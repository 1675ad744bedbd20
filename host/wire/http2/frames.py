"""HTTP/2 frames (RFC 9113 sections 4 and 6): the 9-byte header, each frame type's payload read
and checked, and the frames the server writes.

No state here: a payload that breaks its frame type's own rules (length, padding, stream 0 or
not, a zero increment, a setting out of range) raises :class:`ConnectionFault` or
:class:`StreamFault` with the error code the RFC names. What depends on the connection's state
(which streams exist, windows, what came before) is ``connection.py``'s.

Frames are read with :mod:`struct` rather than ``hyperframe``: one frame object per frame cost
about 2.3 us to parse and 2.1 to write (``hyperframe`` 6.1), against 0.3 and 0.15 here, and
the server 1.28x its CPU per full-duplex exchange through Envoy (pyproject.toml says how it
was measured). ``tests/unit/test_wire_frames.py`` holds this module to ``hyperframe``'s
reading of the same bytes.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = (
    "DATA",
    "HEADERS",
    "PRIORITY",
    "RST_STREAM",
    "SETTINGS",
    "PUSH_PROMISE",
    "PING",
    "GOAWAY",
    "WINDOW_UPDATE",
    "CONTINUATION",
)
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD
ERROR_NAMES = (
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
)

# SETTINGS identifiers (section 6.5.2, RFC 8441 section 3).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6
ENABLE_CONNECT_PROTOCOL = 0x8

DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
MAX_FRAME = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1

FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_PRIORITY = struct.Struct(">LB")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


def error_name(code: int) -> str:
    """``PROTOCOL_ERROR`` for 1; unknown codes as hex."""
    return ERROR_NAMES[code] if 0 <= code < len(ERROR_NAMES) else f"0x{code:x}"


class ConnectionFault(Exception):
    """A connection error (section 5.4.1): the connection ends with GOAWAY ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamFault(Exception):
    """A stream error (section 5.4.2): the stream ends with RST_STREAM ``code``; the
    connection goes on."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code


# -- reading ----------------------------------------------------------------------------------

#: Frame types that only exist on stream 0, and those that never do (sections 6.1-6.10).
CONNECTION_ONLY = frozenset((SETTINGS, PING, GOAWAY))
STREAM_ONLY = frozenset((DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, CONTINUATION))


def check_stream_id(kind: int, stream_id: int) -> None:
    """Section 6: SETTINGS, PING and GOAWAY only on stream 0; the stream frames never on it."""
    if stream_id:
        if kind in CONNECTION_ONLY:
            raise ConnectionFault(PROTOCOL_ERROR, f"{FRAME_NAMES[kind]} on stream {stream_id}")
    elif kind in STREAM_ONLY:
        raise ConnectionFault(PROTOCOL_ERROR, f"{FRAME_NAMES[kind]} on stream 0")


def unpad(payload: memoryview, kind: int) -> memoryview:
    """A PADDED frame's content without its pad length octet and padding (sections 6.1, 6.2):
    padding as long as the payload or longer is a connection error."""
    if not payload:
        raise ConnectionFault(FRAME_SIZE_ERROR, f"PADDED {FRAME_NAMES[kind]} without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionFault(PROTOCOL_ERROR, f"{FRAME_NAMES[kind]} padding of {pad} exceeds its payload")
    return payload[1 : len(payload) - pad]


def read_headers(flags: int, stream_id: int, payload: memoryview) -> tuple[memoryview, bool]:
    """A HEADERS frame's header block fragment (section 6.2), padding and priority fields
    removed, and whether it makes its stream depend on itself (a stream error, section 5.3.1,
    raised by the caller once the block is decoded: HPACK's state must follow every block)."""
    if flags & PADDED:
        payload = unpad(payload, HEADERS)
    if flags & PRIORITY_FLAG:
        if len(payload) < 5:
            raise ConnectionFault(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
        return payload[5:], _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id
    return payload, False


def read_priority(stream_id: int, payload: memoryview) -> None:
    """A PRIORITY frame (section 6.3): 5 bytes, not depending on its own stream. The host
    schedules no priorities (RFC 9113 deprecates the scheme); it only checks the frame."""
    if len(payload) != 5:
        raise StreamFault(stream_id, FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")
    if _PRIORITY.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
        raise StreamFault(stream_id, PROTOCOL_ERROR, "PRIORITY makes the stream depend on itself")


def read_rst_stream(payload: memoryview) -> int:
    """A RST_STREAM frame's error code (section 6.4)."""
    if len(payload) != 4:
        raise ConnectionFault(FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")
    code: int = _U32.unpack_from(payload)[0]
    return code


def read_settings(flags: int, payload: memoryview) -> list[tuple[int, int]]:
    """A SETTINGS frame's (identifier, value) pairs, each value checked (sections 6.5, 6.5.2);
    an ACK carries none. Unknown identifiers are returned as they came (the caller ignores
    them, as section 6.5.2 asks)."""
    if flags & ACK:
        if payload:
            raise ConnectionFault(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        return []
    if len(payload) % 6:
        raise ConnectionFault(FRAME_SIZE_ERROR, f"SETTINGS of {len(payload)} bytes, not a multiple of 6")
    pairs = [_SETTING.unpack_from(payload, offset) for offset in range(0, len(payload), 6)]
    for key, value in pairs:
        if key in (ENABLE_PUSH, ENABLE_CONNECT_PROTOCOL) and value > 1:
            raise ConnectionFault(PROTOCOL_ERROR, f"SETTINGS 0x{key:x} = {value}, not 0 or 1")
        if key == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ConnectionFault(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE = {value}, above 2^31-1")
        if key == MAX_FRAME_SIZE and not DEFAULT_FRAME <= value <= MAX_FRAME:
            raise ConnectionFault(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE = {value}, outside 2^14..2^24-1")
    return pairs


def read_ping(payload: memoryview) -> bytes:
    """A PING frame's 8 opaque bytes (section 6.7)."""
    if len(payload) != 8:
        raise ConnectionFault(FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")
    return bytes(payload)


def read_goaway(payload: memoryview) -> tuple[int, int, bytes]:
    """A GOAWAY frame's last stream id, error code and debug data (section 6.8)."""
    if len(payload) < 8:
        raise ConnectionFault(FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")
    last, code = _GOAWAY.unpack_from(payload)
    return last & 0x7FFFFFFF, code, bytes(payload[8:])


def read_window_update(stream_id: int, payload: memoryview) -> int:
    """A WINDOW_UPDATE frame's increment (section 6.9): 0 is a stream error on a stream and a
    connection error on the connection."""
    if len(payload) != 4:
        raise ConnectionFault(FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes")
    increment: int = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
    if not increment:
        if stream_id:
            raise StreamFault(stream_id, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        raise ConnectionFault(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
    return increment


# -- writing ----------------------------------------------------------------------------------


def frame_header(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    """A frame's 9-byte header."""
    return FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A whole frame."""
    return frame_header(kind, flags, stream_id, len(payload)) + payload


def settings_frame(pairs: list[tuple[int, int]]) -> bytes:
    """SETTINGS with these (identifier, value) pairs."""
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(key, value) for key, value in pairs))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def ping_frame(opaque: bytes, ack: bool = False) -> bytes:
    """PING (or its ACK) carrying ``opaque``."""
    return frame(PING, ACK if ack else 0, 0, opaque)


def rst_stream_frame(stream_id: int, code: int) -> bytes:
    """RST_STREAM ``code`` on ``stream_id``."""
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def window_update_frame(stream_id: int, increment: int) -> bytes:
    """WINDOW_UPDATE of ``increment`` on ``stream_id`` (0: the connection)."""
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    """GOAWAY naming the last stream the server took, with ``code`` and debug data."""
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + debug)


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> list[bytes]:
    """A header block longer than ``max_frame`` as HEADERS then CONTINUATION frames of at most
    ``max_frame`` bytes each (section 4.3: nothing else may come between them on the
    connection); a block that fits goes out as one HEADERS frame (Connection.send_headers)."""
    flags = END_STREAM if end_stream else 0
    pieces = [block[start : start + max_frame] for start in range(0, len(block), max_frame)]
    out = [frame(HEADERS, flags, stream_id, pieces[0])]
    out.extend(frame(CONTINUATION, 0, stream_id, piece) for piece in pieces[1:-1])
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1]))
    return out
