"""What one peer may make the server do: the limits of a connection, the flood counters that
end an abusive one with GOAWAY ENHANCE_YOUR_CALM, and log lines that a flood cannot multiply.

Floods are counted with token buckets per connection: each frame of a kind that costs the server
work without moving a request forward (a PING or SETTINGS to answer, a reset of a stream that
was never answered, an empty or tiny frame, a stream the server had to refuse or reset) takes a
token; tokens come back at a steady rate. A peer that runs a bucket dry is not a client any
more: its connection ends (RFC 9113 section 10.5). The capacities are far above what Envoy
sends (a keepalive PING a second at most, a reset per cancelled request, never an empty frame).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """One connection's limits (``[server.http2]``)."""

    #: SETTINGS_MAX_CONCURRENT_STREAMS, advertised and enforced (REFUSED_STREAM past it); also
    #: the most handlers that run at once for one connection (streams reset while their handler
    #: winds down wait for a slot: RFC 9113 section 10.5, the rapid reset attack).
    max_concurrent_streams: int = 1000
    #: SETTINGS_INITIAL_WINDOW_SIZE: what a new stream may send before the server gives window
    #: back (the layer above grows each stream's window from there as its budget allows).
    initial_window: int = 16 * 1024
    #: SETTINGS_MAX_HEADER_LIST_SIZE: larger header blocks end the connection before decoding.
    max_header_list_size: int = 16 * 1024
    #: Seconds for a new connection to send its preface and SETTINGS.
    preface_timeout: float = 10.0
    #: Seconds a frame, or a header block spread over CONTINUATIONs, may take to arrive whole.
    frame_timeout: float = 10.0
    #: Seconds a connection may stay open without streams before a graceful GOAWAY (0: never).
    idle_timeout: float = 300.0
    #: Seconds the server may wait on a peer that neither opens its flow-control window nor
    #: reads the socket, while answers wait to be sent, before the connection ends (0: never).
    stall_timeout: float = 60.0
    #: The capacity and the tokens per second of each of a connection's three token buckets:
    #: control frames (PING, SETTINGS, PRIORITY, unknown frame types), resets (of unanswered
    #: streams, refused streams, stream errors) and empty frames (DATA or CONTINUATION carrying
    #: nothing, tiny DATA that completes nothing).
    flood_burst: int = 1000
    flood_rate: float = 100.0


class Bucket:
    """A token bucket: :meth:`take` is False once the peer spent more than ``burst`` tokens
    faster than ``rate`` per second gives them back."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.level = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        level = self.level + (now - self.stamp) * self.rate
        self.stamp = now
        if level > self.burst:
            level = self.burst
        if level < 1.0:
            self.level = level
            return False
        self.level = level - 1.0
        return True


class LogLimiter:
    """At most ``per_interval`` lines per ``interval`` seconds for one kind of event; the lines
    left out are counted and said in the next line that goes out."""

    def __init__(self, logger: logging.Logger, per_interval: int = 10, interval: float = 10.0) -> None:
        self.logger = logger
        self.per_interval = per_interval
        self.interval = interval
        self._window: dict[str, tuple[float, int, int]] = {}  # kind: (start, lines, left out)

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` at WARNING unless ``kind`` had its share of lines lately."""
        if not self.logger.isEnabledFor(logging.WARNING):
            return
        now = time.monotonic()
        start, lines, left_out = self._window.get(kind, (now, 0, 0))
        if now - start >= self.interval:
            start, lines = now, 0
        if lines >= self.per_interval:
            self._window[kind] = (start, lines, left_out + 1)
            return
        if left_out:
            message += " (%d more like it not logged)"
            args = (*args, left_out)
        self._window[kind] = (start, lines + 1, 0)
        self.logger.warning(message, *args)
