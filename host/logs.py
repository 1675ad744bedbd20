"""Log set-up: text or JSON lines, with the stream id and route on every record about a stream.

The server puts the stream being served in :data:`current_stream` (a context variable, so
each gRPC stream's task and the tasks it starts see their own); :class:`StreamFilter` copies
its id and route onto every record logged there, whoever logs it (host or plugin).
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Protocol


class _Stream(Protocol):
    stream_id: str

    @property
    def route_name(self) -> str: ...


#: The stream the current task serves (a StreamProcessor), or None outside any stream.
current_stream: ContextVar[_Stream | None] = ContextVar("extproc_current_stream", default=None)

JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(stream_id)s %(route)s"


class StreamFilter(logging.Filter):
    """Adds ``stream_id`` and ``route`` (None outside a stream) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        stream = current_stream.get()
        if stream is None:
            record.stream_id = record.route = None
        else:
            record.stream_id = stream.stream_id
            record.route = stream.route_name
        return True


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE`` plus `` [stream=ID route=NAME]`` on records about a stream."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        stream_id = getattr(record, "stream_id", None)
        if stream_id is None:
            return line
        return f"{line} [stream={stream_id} route={getattr(record, 'route', '?')}]"


def json_formatter() -> logging.Formatter:
    """One JSON object per record: time, level, logger, message, stream_id, route (+ exc_info)."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        JSON_FIELDS,
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure(level: str, fmt: str = "text", stream: Any = None) -> None:
    """Send the root logger's records to stderr (or ``stream``) as ``fmt`` lines at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(StreamFilter())
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
