"""Header blocks: decoding the peer's with limits (RFC 7541 by ``hpack``), checking the fields of
a request and of trailers (RFC 9113 sections 8.2 and 8.3), and encoding the server's own.

A malformed request or trailers block raises :class:`Malformed`, a stream error of type
PROTOCOL_ERROR (section 8.1.1). A block the decoder cannot read, or one larger than the
advertised SETTINGS_MAX_HEADER_LIST_SIZE, is a connection error: HPACK's dynamic table is shared
by the whole connection, so once one block is not followed the next ones cannot be either.

The server's blocks use no dynamic table: every field it sends is indexed from the static
table or a literal "without indexing", so the peer's SETTINGS_HEADER_TABLE_SIZE only ever needs
the table-size update to 0 that ``TABLE_SIZE_ZERO`` is (section 4.2 of RFC 7541).
"""

from __future__ import annotations

import re
from typing import Any

import hpack
from hpack.table import HeaderTable

from .frames import COMPRESSION_ERROR, ENHANCE_YOUR_CALM, ConnectionFault

#: A dynamic table size update to 0 (RFC 7541 section 6.3): the first bytes of the first header
#: block the server sends after the peer changed SETTINGS_HEADER_TABLE_SIZE.
TABLE_SIZE_ZERO = b"\x20"

# Section 8.2.1: a name holds none of 0x00-0x20, A-Z, 0x7f-0xff, nor a colon but a pseudo-header's
# first; a value holds no NUL, CR or LF and neither starts nor ends with a space or a tab.
_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]")
_BAD_VALUE = re.compile(rb"[\x00\n\r]|\A[ \t]|[ \t]\Z")
# Section 8.2.2: connection-specific fields.
CONNECTION_SPECIFIC = frozenset((b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"))
REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
#: Fields already found valid on a connection are not checked again (Envoy sends the same ones on
#: every stream); the memo is cleared when it reaches this many.
MEMO_SIZE = 512


class Malformed(Exception):
    """A request or trailers block that breaks section 8: the stream ends with PROTOCOL_ERROR."""


class Request:
    """The fields of a request a server acts on, read from its header block."""

    __slots__ = (
        "authority",
        "content_length",
        "content_type",
        "fields",
        "grpc_encoding",
        "grpc_timeout",
        "method",
        "path",
        "scheme",
    )

    def __init__(self) -> None:
        self.method = b""
        self.scheme = b""
        self.path = b""
        self.authority: bytes | None = None
        self.content_type = b""
        self.content_length: int | None = None
        self.grpc_timeout: bytes | None = None
        self.grpc_encoding: bytes | None = None
        self.fields: list[tuple[bytes, bytes]] = []  # the regular fields, in order

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The regular fields as (name, value) strings, grpc.aio's ``invocation_metadata()``."""
        return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in self.fields)


class _VersionedTable(HeaderTable):
    """HPACK's dynamic table, counting every change (an entry added, the size changed)."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    def _set_maxsize(self, size: int) -> None:
        self.version += 1
        HeaderTable.maxsize.fset(self, size)  # type: ignore[attr-defined]

    maxsize = property(HeaderTable.maxsize.fget, _set_maxsize)  # type: ignore[attr-defined]


class Decoder:
    """The connection's HPACK decoder, refusing blocks over ``max_header_list_size`` before
    decoding them and decoded lists over it while decoding (HPACK's own bombs: a short block
    that refers to a large table entry many times).

    Envoy sends the same header block for every stream of a connection (indexed fields and a
    ``:path`` literal that is not indexed), and ``hpack`` decodes in pure Python: a block that
    left the dynamic table unchanged decodes to the same fields as long as the table stays as it
    was, so such blocks are remembered with the table's version and not decoded again (nor their
    request checked again).
    """

    def __init__(self, max_header_list_size: int) -> None:
        self.limit = max_header_list_size
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._table = self._decoder.header_table = _VersionedTable()
        self._valid: set[Any] = set()  # (name, value) pairs found valid, see MEMO_SIZE
        self._decoded: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}  # block: (table version, fields)
        self._requests: tuple[list[tuple[bytes, bytes]], Request] | None = None  # the last request read

    def check_size(self, size: int) -> None:
        """A header block (or the part of one received so far) of ``size`` bytes is refused
        before decoding when over the limit: no encoder makes a block longer than its list."""
        if size > self.limit:
            raise ConnectionFault(
                ENHANCE_YOUR_CALM, f"header block of {size} bytes, over SETTINGS_MAX_HEADER_LIST_SIZE {self.limit}"
            )

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of one whole header block; ConnectionFault when it cannot be taken."""
        self.check_size(len(block))
        version = self._table.version
        known = self._decoded.get(block)
        if known is not None and known[0] == version:
            return known[1]
        fields = self._decode(block)
        if self._table.version == version:  # the table is as it was: this block decodes alike again
            if len(self._decoded) >= MEMO_SIZE:
                self._decoded.clear()
            self._decoded[block] = (version, fields)
        return fields

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            fields: list[tuple[bytes, bytes]] = self._decoder.decode(block, raw=True)  # type: ignore[assignment]
        except hpack.OversizedHeaderListError:
            raise ConnectionFault(
                ENHANCE_YOUR_CALM, f"header list over SETTINGS_MAX_HEADER_LIST_SIZE {self.limit}"
            ) from None
        except Exception as exc:  # hpack's errors, and whatever else garbage makes it raise
            raise ConnectionFault(COMPRESSION_ERROR, f"undecodable header block: {exc}") from None
        return fields

    def check(self, name: bytes, value: bytes) -> None:
        """Section 8.2.1's rules for one field (pseudo-header names are checked by the callers)."""
        pair = (name, value)
        valid = self._valid
        if pair in valid:
            return
        if not name or _BAD_NAME.search(name, 1 if name[0] == 0x3A else 0):
            raise Malformed(f"invalid field name {name[:64]!r}")
        if _BAD_VALUE.search(value):
            raise Malformed(f"invalid value for field {name[:64]!r}")
        if len(valid) >= MEMO_SIZE:
            valid.clear()
        valid.add(pair)

    def request(self, fields: list[tuple[bytes, bytes]]) -> Request:
        """A request's fields checked (sections 8.2, 8.3.1) and read (the same Request for the
        same remembered block: it is not changed once read)."""
        last = self._requests
        if last is not None and last[0] is fields:
            return last[1]
        request = self._read_request(fields)
        self._requests = (fields, request)
        return request

    def _read_request(self, fields: list[tuple[bytes, bytes]]) -> Request:
        request = Request()
        seen: set[bytes] = set()
        regular = request.fields
        check = self.check
        host: bytes | None = None
        for name, value in fields:
            check(name, value)
            if name[0] == 0x3A:  # a pseudo-header
                if regular:
                    raise Malformed(f"pseudo-header {name!r} after a regular field")
                if name not in REQUEST_PSEUDO:
                    raise Malformed(f"pseudo-header {name[:64]!r} is not one of a request")
                if name in seen:
                    raise Malformed(f"pseudo-header {name!r} repeated")
                seen.add(name)
                if name == b":path":
                    request.path = value
                elif name == b":method":
                    request.method = value
                elif name == b":scheme":
                    request.scheme = value
                else:
                    request.authority = value
                continue
            regular.append((name, value))
            if name in CONNECTION_SPECIFIC:
                raise Malformed(f"connection-specific field {name!r}")
            if name == b"content-type":
                request.content_type = value
            elif name == b"te":
                if value.lower() != b"trailers":
                    raise Malformed(f"te: {value[:64]!r}, only 'trailers' is allowed")
            elif name == b"grpc-timeout":
                request.grpc_timeout = value
            elif name == b"grpc-encoding":
                request.grpc_encoding = value
            elif name == b"content-length":
                if not value.isdigit() or (request.content_length is not None and int(value) != request.content_length):
                    raise Malformed(f"content-length: {value[:64]!r}")
                request.content_length = int(value)
            elif name == b"host":
                if host is not None:
                    raise Malformed("host repeated")
                host = value
        if not request.method:
            raise Malformed("no :method")
        if request.method == b"CONNECT":
            if request.scheme or request.path or request.authority is None:
                raise Malformed("CONNECT takes :authority and neither :scheme nor :path")
        elif not request.scheme or not request.path:
            raise Malformed("no :scheme" if not request.scheme else "no :path, or an empty one")
        if host is not None and request.authority is not None and host != request.authority:
            raise Malformed("host differs from :authority")
        return request

    def trailers(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Trailers checked: section 8.2's field rules, and no pseudo-headers (section 8.1)."""
        for name, value in fields:
            self.check(name, value)
            if name[0] == 0x3A:
                raise Malformed(f"pseudo-header {name[:64]!r} in trailers")
            if name in CONNECTION_SPECIFIC:
                raise Malformed(f"connection-specific field {name!r} in trailers")
        return fields


# -- encoding the server's blocks ---------------------------------------------------------------


def hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541 section 5.1); ``first`` holds the flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A field as "literal without indexing, new name" (RFC 7541 section 6.2.2): no state in
    either side's table."""
    return b"\x00" + hpack_int(len(name), 7, 0) + name + hpack_int(len(value), 7, 0) + value


def status(code: int) -> bytes:
    """``:status`` (static entries 8-14 where one matches, else a literal with name index 8)."""
    indexed = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}.get(code)
    if indexed is not None:
        return bytes([0x80 | indexed])
    text = str(code).encode()
    return b"\x08" + hpack_int(len(text), 7, 0) + text  # literal without indexing, name index 8
