"""zstd: compresses response bodies for clients that accept zstd, and decompresses request
bodies sent with ``content-encoding: zstd`` before they reach the upstream.

Both directions stream with bounded memory, whatever the body size:

- Responses: every chunk goes through one streaming compressor and is flushed as a complete
  zstd block (``FLUSH_BLOCK``), so every byte sent on can be decoded as soon as it arrives (a
  client reading a long stream sees data progressively); the frame is ended at the end of the
  body. Whether to compress is decided in the response header hook, where streamed modes
  require header changes to be made.
- Requests: the decompressor is asked for at most 1 MiB at a time and each piece is handed on
  before the next is made, so a small body that expands hugely (a "zip bomb") never sits in
  memory whole, not even for one call: 4 bytes of zstd can stand for 128 KiB. A body
  that decompresses past ``max_decompressed_bytes``, or to more than ``max_ratio`` times its
  compressed size (once past ``RATIO_FREE_BYTES``), is not valid zstd, or ends in the middle
  of a frame is answered with a 413 or 400 local reply (Envoy resets the upstream request), so
  the upstream never gets a truncated body that looks complete. The ratio limit bounds what a
  small request can make Envoy hold on its way to the upstream.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from backports import zstd
from pydantic import BaseModel, ConfigDict, Field

from extproc_host import Headers, Needs, Plugin, Reject, StreamInfo, hookimpl

#: Media types that are compressed already: compressing them again costs CPU for nothing.
DEFAULT_SKIP_CONTENT_TYPES = [
    "image/*",
    "video/*",
    "audio/*",
    "font/woff",
    "font/woff2",
    "application/zip",
    "application/gzip",
    "application/x-gzip",
    "application/zstd",
    "application/x-zstd",
    "application/x-bzip2",
    "application/x-xz",
    "application/x-7z-compressed",
    "application/x-rar-compressed",
    "application/vnd.rar",
    "application/pdf",
    "application/octet-stream+zstd",
]

MiB = 1024 * 1024
GiB = 1024 * MiB

#: Largest piece of decompressed output made and handed on at once (the decompressor's
#: ``max_length``).
OUTPUT_PIECE = 1 * MiB
#: Decompressed bytes a request body may reach whatever its ratio (small, very repetitive
#: bodies compress far beyond any sensible ratio limit).
RATIO_FREE_BYTES = 1 * MiB

#: RFC 9110 token characters (a content-coding name).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
#: RFC 9110 qvalue.
_QVALUE = re.compile(r"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")
#: Statuses whose responses have no body.
_NO_BODY_STATUSES = {204, 205, 304}


class ZstdSettings(BaseModel):
    """``[plugins.zstd]`` (and ``[routes.<route>.plugins.zstd]``)."""

    model_config = ConfigDict(extra="forbid")

    compress_responses: bool = True
    """Compress response bodies for clients whose ``accept-encoding`` accepts zstd."""

    decompress_requests: bool = True
    """Decompress request bodies sent with ``content-encoding: zstd`` before the upstream."""

    level: int = Field(3, ge=1, le=19)
    """Compression level, 1 (fastest) to 19 (smallest). Levels 20-22 are refused: they use
    windows larger than the 8 MiB that HTTP clients must support (RFC 8878)."""

    min_bytes: int = Field(0, ge=0)
    """Leave responses whose ``content-length`` is below this uncompressed (0: compress any
    size). Responses without a content-length are always compressed."""

    skip_content_types: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP_CONTENT_TYPES))
    """Media types never compressed: ``type/subtype``, ``type/*``, or a prefix ending in
    ``*`` (``application/vnd.ms-*``); case-insensitive, parameters ignored."""

    max_decompressed_bytes: int = Field(GiB, ge=1)
    """Largest request body accepted after decompression; past it the client gets a 413."""

    max_ratio: float = Field(100.0, ge=0)
    """Largest ratio of decompressed to compressed bytes accepted in a request body, checked as
    it decompresses once past 1 MiB of output; past it the client gets a 413 (0: no ratio
    limit). Real data compresses 3-10x, logs and JSON up to ~50x; a body of zeros 30,000x."""

    max_window_bytes: int = Field(8 * MiB, ge=1024, le=2 * GiB)
    """Largest zstd window accepted in a request body (the decompressor's memory per stream),
    rounded down to a power of two. 8 MiB is what RFC 8878 asks every HTTP zstd decoder to
    support; larger windows get a 400."""

    checksum: bool = True
    """Write a content checksum at the end of each compressed response (clients verify it)."""


def parse_accept_encoding(values: list[str]) -> dict[str, float]:
    """``accept-encoding`` header values as {coding: q}, lower-cased; malformed entries are
    left out. A coding named more than once keeps its lowest q (a refusal is never undone)."""
    accepted: dict[str, float] = {}
    for value in values:
        for entry in value.split(","):
            parts = entry.split(";")
            coding = parts[0].strip().lower()
            if not coding or not _TOKEN.match(coding):
                continue
            q = 1.0
            malformed = False
            for param in parts[1:]:
                name, eq, raw = param.partition("=")
                name = name.strip().lower()
                if name != "q":
                    if not name or not _TOKEN.match(name):
                        malformed = True
                    continue
                raw = raw.strip()
                if not eq or not _QVALUE.match(raw):
                    malformed = True
                    break
                q = float(raw)
            if malformed:
                continue
            accepted[coding] = min(q, accepted.get(coding, q))
    return accepted


def accepts_zstd(values: list[str]) -> bool:
    """Whether ``accept-encoding`` values accept zstd: its own q, else ``*``'s, must be > 0."""
    accepted = parse_accept_encoding(values)
    if "zstd" in accepted:
        return accepted["zstd"] > 0
    return accepted.get("*", 0.0) > 0


def media_type(content_type: str | None) -> str | None:
    """The media type of a content-type value, lower-case, without parameters."""
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def type_matches(media: str, patterns: list[str]) -> bool:
    """Whether ``media`` matches one of ``patterns`` (exact, ``type/*``, or ``prefix*``)."""
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern.endswith("*"):
            if media.startswith(pattern[:-1]):
                return True
        elif media == pattern:
            return True
    return False


def _codings(values: list[str]) -> list[str]:
    """A content-encoding header's codings, in order, lower-case."""
    return [c.strip().lower() for value in values for c in value.split(",") if c.strip()]


def _status(headers: Headers) -> int:
    try:
        return int(headers.get(":status") or "200")
    except ValueError:
        return 200


class Zstd(Plugin[ZstdSettings]):
    """One instance per HTTP exchange; ``self.settings`` is a :class:`ZstdSettings`."""

    name = "zstd"
    Settings = ZstdSettings

    @classmethod
    def needs_for(cls, settings: ZstdSettings) -> Needs:
        """Headers and body of each direction it works on, bodies as they come."""
        needs = Needs()
        if settings.decompress_requests:
            needs = needs | Needs(request_headers=True, request_body="streamed")
        if settings.compress_responses:
            needs = needs | Needs(request_headers=True, response_headers=True, response_body="streamed")
        return needs

    def __init__(self, settings: ZstdSettings, stream: StreamInfo) -> None:
        super().__init__(settings, stream)
        self._compressor: zstd.ZstdCompressor | None = None  # set when compressing this response
        self._decompressing = False
        self._dobj: zstd.ZstdDecompressor | None = None  # of the current frame
        self._decompressed = 0
        self._compressed = 0  # compressed request bytes fed to the decompressor

    # ---- requests ----

    def on_request_headers(self, headers: Headers) -> None:
        if not self.settings.decompress_requests:
            return
        codings = _codings(headers.get_all("content-encoding"))
        if not codings or codings[-1] != "zstd":
            return
        codings.pop()
        if codings:
            headers.set("content-encoding", ", ".join(codings))
        else:
            headers.remove("content-encoding")
        headers.remove("content-length")
        self._decompressing = True

    def on_request_body(self, chunk: bytes) -> bytes | Iterator[bytes]:
        if not self._decompressing:
            return chunk
        return self._decompress(chunk)

    def on_request_body_end(self) -> bytes:
        if self._decompressing and self._dobj is not None:
            raise Reject(400, "zstd request body is truncated: it ends in the middle of a frame\n", _TEXT)
        return b""

    def _decompress(self, chunk: bytes) -> Iterator[bytes]:
        """Decompressed pieces of ``chunk`` (at most OUTPUT_PIECE each, each made only once the
        one before was taken), frame after frame."""
        limit = self.settings.max_decompressed_bytes
        ratio = self.settings.max_ratio
        self._compressed += len(chunk)
        data: bytes = chunk
        while True:
            if self._dobj is None:
                if not data:
                    return
                self._dobj = zstd.ZstdDecompressor(
                    options={zstd.DecompressionParameter.window_log_max: self._window_log}
                )
            dobj = self._dobj
            try:
                out = dobj.decompress(data, max_length=OUTPUT_PIECE)
            except zstd.ZstdError as exc:
                raise Reject(400, f"zstd request body is not valid zstd: {exc}\n", _TEXT) from None
            data = b""
            if dobj.eof:  # the frame is complete; what follows starts the next one
                data = dobj.unused_data
                self._dobj = None
            if out:
                self._decompressed += len(out)
                if self._decompressed > limit:
                    raise Reject(
                        413,
                        f"zstd request body decompresses to more than {limit} bytes, the limit\n",
                        _TEXT,
                    )
                if ratio and self._decompressed > RATIO_FREE_BYTES and self._decompressed > ratio * self._compressed:
                    raise Reject(
                        413,
                        f"zstd request body decompresses to more than {ratio:g} times its compressed size, the limit\n",
                        _TEXT,
                    )
                yield out
            elif self._dobj is not None and dobj.needs_input:
                return  # all of ``chunk`` taken: the frame goes on in the next one

    @property
    def _window_log(self) -> int:
        """zstd's window_log_max for ``max_window_bytes`` (a power of two, rounded down)."""
        return max(self.settings.max_window_bytes.bit_length() - 1, 10)

    # ---- responses ----

    def on_response_headers(self, headers: Headers) -> None:
        if not self.settings.compress_responses or not self._compressible(headers):
            return
        self._add_vary(headers)
        request = self.stream.request_headers
        if request is None or not accepts_zstd(request.get_all("accept-encoding")):
            return
        headers.set("content-encoding", "zstd")
        headers.remove("content-length")
        etag = headers.get("etag")
        if etag is not None and not etag.startswith("W/"):
            headers.set("etag", "W/" + etag)  # same meaning, different bytes: no longer strong
        self._compressor = zstd.ZstdCompressor(
            options={
                zstd.CompressionParameter.compression_level: self.settings.level,
                zstd.CompressionParameter.checksum_flag: int(self.settings.checksum),
            }
        )

    def _compressible(self, headers: Headers) -> bool:
        """Whether this response may be compressed at all (the client's wishes aside)."""
        if self.stream.response_has_body is False:  # the headers ended the response
            return False
        request = self.stream.request_headers
        if request is not None and (request.get(":method") or "").upper() == "HEAD":
            return False
        status = _status(headers)
        if status < 200 or status in _NO_BODY_STATUSES or status == 206 or "content-range" in headers:
            return False
        if any(c != "identity" for c in _codings(headers.get_all("content-encoding"))):
            return False
        cache_control = ",".join(headers.get_all("cache-control")).lower()
        if "no-transform" in (d.strip() for d in cache_control.split(",")):
            return False
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit():
            size = int(length)
            if size == 0 or size < self.settings.min_bytes:
                return False
        media = media_type(headers.get("content-type"))
        return not (media is not None and type_matches(media, self.settings.skip_content_types))

    @staticmethod
    def _add_vary(headers: Headers) -> None:
        values = headers.get_all("vary")
        names = {v.strip().lower() for value in values for v in value.split(",")}
        if "*" in names or "accept-encoding" in names:
            return
        values = [v.strip() for v in values if v.strip()]
        headers.set("vary", ", ".join([*values, "accept-encoding"]))

    def on_response_body(self, chunk: bytes) -> bytes:
        if self._compressor is None:
            return chunk
        return self._compressor.compress(chunk, mode=zstd.ZstdCompressor.FLUSH_BLOCK)

    def on_response_body_end(self) -> bytes:
        if self._compressor is None:
            return b""
        compressor, self._compressor = self._compressor, None
        return compressor.flush(mode=zstd.ZstdCompressor.FLUSH_FRAME)

    def close(self, error: BaseException | None) -> None:
        self._compressor = None
        self._dobj = None


_TEXT = {"content-type": "text/plain; charset=utf-8"}


@hookimpl
def register_plugins(register: Callable[[type[Plugin[Any]]], None]) -> None:
    register(Zstd)
