"""Log set-up: text or JSON lines, with the stream id and route on every record about a stream.

The server puts the stream being served in :data:`current_stream` (a context variable, so
each gRPC stream's task and the tasks it starts see their own); :class:`StreamFilter` copies
its id and route onto every record logged there, whoever logs it (host or plugin).
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Protocol, TextIO


def announce(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` and its newline to ``stream`` (standard output) in one write, flushed.

    Workers share their supervisor's output: ``print`` writes the text and the newline
    separately, which, unbuffered (PYTHONUNBUFFERED, as containers often run), let two
    workers' ``metrics on`` lines run together. One write under the pipe's atomic size
    lands whole."""
    out = sys.stdout if stream is None else stream
    out.write(line + "\n")
    out.flush()


class _Stream(Protocol):
    stream_id: str

    @property
    def route_name(self) -> str: ...


#: The stream the current task serves (a StreamProcessor), or None outside any stream.
current_stream: ContextVar[_Stream | None] = ContextVar("extproc_current_stream", default=None)

#: ``process``: stream ids count per process, so with ``--workers`` two workers both have a stream 17.
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(stream_id)s %(route)s %(process)d"


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


#: Loggers through which grpc.aio reports a stream cancelled while the host was sending to it.
GRPC_LOGGERS = ("grpc._cython.cygrpc", "asyncio")


class CancelledSendFilter(logging.Filter):
    """Turns grpc.aio's report of a send cut by a cancelled stream (``ExecuteBatchError``,
    an ERROR with a traceback) into a DEBUG line without one: Envoy resetting a stream while an
    answer was on its way is an ordinary end of that stream, counted as aborted."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ != "ExecuteBatchError" and "ExecuteBatchError" not in str(record.msg):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = None
        record.exc_text = None
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_cancelled_sends() -> None:
    """Install :class:`CancelledSendFilter` on grpc.aio's loggers (once)."""
    for name in GRPC_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, CancelledSendFilter) for f in logger.filters):
            logger.addFilter(CancelledSendFilter())


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
    quiet_cancelled_sends()
