"""gRPC's status codes and the header blocks that carry them (gRPC over HTTP/2: Response-Headers,
Trailers, Trailers-Only), encoded with static entries and literals only (``fields.py``)."""

from __future__ import annotations

import enum

from ..http2.fields import literal, status


class StatusCode(enum.Enum):
    """gRPC's status codes, with grpc.StatusCode's names (the builtin server does not import grpc:
    18 MiB of resident memory)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: ``grpc-message`` is cut to this many bytes once percent-encoded: a long error text (a plugin's
#: exception, say) must not make a trailers block a peer refuses, which would end the whole
#: connection and every stream on it.
MAX_MESSAGE = 4096
CUT = b"%E2%80%A6"  # "…", said where the message was cut

# ":status: 200" is static entry 8; "content-type" is static entry 31 (a literal without
# indexing with that name index: 0x0f 0x10).
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + bytes([16]) + b"application/grpc"
TRAILERS_OK = literal(b"grpc-status", b"0")


def percent_encode(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII other than ``%`` as is, other bytes as ``%XX``."""
    raw = text.encode("utf-8", "replace")
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def status_block(code: StatusCode, details: str, limit: int = MAX_MESSAGE) -> bytes:
    """``grpc-status`` and ``grpc-message`` fields; the message cut to ``limit`` bytes (never
    inside a ``%XX`` escape) with an ellipsis."""
    block = literal(b"grpc-status", str(code.value).encode())
    if details:
        message = percent_encode(details)
        if len(message) > limit:
            cut = max(limit - len(CUT), 0)
            escape = message.rfind(b"%", max(cut - 2, 0), cut)
            if escape != -1:
                cut = escape
            message = message[:cut] + CUT
        block += literal(b"grpc-message", message)
    return block


def plain_response_headers(code: int, content_type: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """The header block of a plain HTTP answer (to a request that is not gRPC)."""
    return status(code) + literal(b"content-type", content_type) + b"".join(literal(n, v) for n, v in extra)
