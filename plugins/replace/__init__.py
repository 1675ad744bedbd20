"""replace: swaps the request body and/or the response body for a file's contents.

The Go proof of concept's demo: one video goes upstream whatever the client sent, another comes
back whatever the upstream answered. The file is streamed out in chunks as it is read, never
read whole, so in FULL_DUPLEX_STREAMED a file of any size passes with flat memory. (STREAMED
and BUFFERED answer the body's last chunk with one message, which then holds the whole file.)

    [routes.default]
    chain = ["replace"]

    [plugins.replace]
    request_file = "media/upload.mp4"
    request_content_type = "video/mp4"
    response_file = "media/answer.mp4"
    response_content_type = "video/mp4"
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extproc_host import Headers, Needs, Plugin, hookimpl


class ReplaceSettings(BaseModel):
    """``[plugins.replace]``: which file replaces which body. Both files are checked at start-up."""

    model_config = ConfigDict(extra="forbid")

    #: File whose contents replace the request body (None: leave the request body alone).
    request_file: Path | None = None
    #: content-type sent upstream with the replaced request body (None: keep the client's).
    request_content_type: str | None = None
    #: File whose contents replace the response body (None: leave the response body alone).
    response_file: Path | None = None
    #: content-type sent to the client with the replaced response body (None: keep the upstream's).
    response_content_type: str | None = None
    #: Size of the pieces the file is read and sent in (Envoy's own chunks are 1 MiB at most).
    chunk_bytes: int = Field(default=1024 * 1024, ge=4096, le=1024 * 1024)

    @field_validator("request_file", "response_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        if not os.access(value, os.R_OK):
            raise ValueError(f"file is not readable: {value}")
        return value.resolve()


async def read_file(path: Path, chunk_bytes: int) -> AsyncIterator[bytes]:
    """``path`` in pieces of ``chunk_bytes``, each read in a worker thread (the loop never waits on disk)."""
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while block := await asyncio.to_thread(handle.read, chunk_bytes):
            yield block
    finally:
        handle.close()


class Replace(Plugin[ReplaceSettings]):
    """Drops the body it is given and answers, at the body's end, with a file streamed in pieces."""

    name = "replace"
    Settings = ReplaceSettings

    @classmethod
    def needs_for(cls, settings: ReplaceSettings) -> Needs:
        """Headers and body of each direction that has a file, bodies as they come."""
        needs = Needs()
        if settings.request_file is not None:
            needs = needs | Needs(request_headers=True, request_body="streamed")
        if settings.response_file is not None:
            needs = needs | Needs(response_headers=True, response_body="streamed")
        return needs

    def _check_mode(self, mode: str, key: str) -> None:
        if mode == "NONE":
            raise RuntimeError(f"{key} is set but Envoy sends this route's body in mode NONE: it cannot be replaced")

    def on_request_headers(self, headers: Headers) -> None:
        if self.settings.request_file is not None:
            self._check_mode(self.stream.request_body_mode, "request_file")
            if self.settings.request_content_type:
                headers.set("content-type", self.settings.request_content_type)

    def on_response_headers(self, headers: Headers) -> None:
        if self.settings.response_file is not None:
            self._check_mode(self.stream.response_body_mode, "response_file")
            if self.settings.response_content_type:
                headers.set("content-type", self.settings.response_content_type)
            headers.remove("content-encoding")  # the file goes out as it is on disk

    def on_request_body(self, chunk: bytes) -> bytes:
        return b"" if self.settings.request_file is not None else chunk

    def on_request_body_end(self) -> bytes | AsyncIterator[bytes]:
        if self.settings.request_file is None:
            return b""
        return read_file(self.settings.request_file, self.settings.chunk_bytes)

    def on_response_body(self, chunk: bytes) -> bytes:
        return b"" if self.settings.response_file is not None else chunk

    def on_response_body_end(self) -> bytes | AsyncIterator[bytes]:
        if self.settings.response_file is None:
            return b""
        return read_file(self.settings.response_file, self.settings.chunk_bytes)


@hookimpl
def register_plugins(register: Callable[[type[Plugin[Any]]], None]) -> None:
    register(Replace)
