"""The I/O under an HTTP/2 connection: an asyncio protocol that feeds the socket's bytes to a
:class:`~extproc_host.wire.http2.connection.Connection` and writes what it queues, and the
sweep that gives every connection's deadlines a clock.

Everything one loop pass queues leaves in one ``writelines`` (uvloop: one writev). When the
socket's buffer fills (the peer does not read), the connection stops sending DATA and the
transport stops reading, so that a flood of frames that want answers (PING, SETTINGS) cannot
queue answers without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .http2.connection import Application, Connection, nothing
from .http2.frames import INTERNAL_ERROR
from .http2.limits import Limits

log = logging.getLogger("extproc_host.wire")

#: How often the deadlines of every connection are looked at (seconds).
SWEEP_INTERVAL = 1.0
#: How long, and how many bytes, a closing connection goes on reading (and dropping) what the
#: peer sends.
LINGER = 1.0
LINGER_BYTES = 256 * 1024


class Transport(asyncio.Protocol):
    """One socket carrying one HTTP/2 connection."""

    def __init__(
        self,
        application: Callable[[], Application],
        limits: Limits,
        registry: set[Transport],
    ) -> None:
        self.application = application
        self.limits = limits
        self.registry = registry
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.scheduled = False
        self.closing = False
        self.lingered = 0  # bytes read and dropped since closing
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        peer = transport.get_extra_info("peername")
        conn = self.conn = Connection(
            self.application(),
            self.limits,
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix",
        )
        conn.wants_flush = self._schedule_flush
        conn.flush_now = self.flush
        conn.wants_close = self._close
        conn.initiate()
        self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.closing:  # dropped; a peer that goes on sending is not waited for
            self.lingered += len(data)
            if self.lingered > LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        try:
            conn.receive(data)
        except Exception:  # a bug here or above: this connection ends, the server goes on
            log.exception("HTTP/2 connection from %s closed: unexpected error", conn.peer)
            conn.close(INTERNAL_ERROR, "internal error")

    def _schedule_flush(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what the connection queued."""
        self.scheduled = False
        conn = self.conn
        if conn is None or not conn.out:
            return
        out, conn.out = conn.out, []
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(out)

    def _close(self) -> None:
        """Close once what is queued is written (the GOAWAY last). Where the socket allows, only
        its sending side closes at first, and what the peer still sends is read and dropped for
        ``LINGER`` seconds (or ``LINGER_BYTES``): closing with unread bytes would make the kernel reset the connection,
        and a peer that sees a reset may never read the GOAWAY."""
        self.flush()
        transport = self.transport
        if transport is None or self.closing:
            return
        self.closing = True
        if transport.is_closing():
            return
        try:
            if not transport.can_write_eof():
                raise OSError("no half-close on this transport")
            transport.write_eof()
            transport.resume_reading()
        except OSError:  # not half-closable (TLS), or the peer is gone already
            transport.close()
        else:
            self.loop.call_later(LINGER, transport.close)

    def eof_received(self) -> bool:
        return False  # the peer is done sending: close

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause()
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
        if self.conn is not None:
            self.conn.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        conn = self.conn
        if conn is not None:
            conn.lost()
            # What ties the connection, its application and this transport to each other.
            conn.wants_flush = conn.flush_now = conn.wants_close = nothing
            conn.out = []
        self.transport = None

    def check(self, now: float) -> None:
        """The connection's deadlines, at ``now`` (time.monotonic())."""
        if self.conn is not None:
            self.conn.check(now)


class Sweeper:
    """Looks at every connection's deadlines once per ``SWEEP_INTERVAL``, or a quarter of the
    shortest deadline when that is shorter."""

    def __init__(self, transports: set[Transport], limits: Limits) -> None:
        self.transports = transports
        deadlines = [limits.preface_timeout, limits.frame_timeout, limits.idle_timeout, limits.stall_timeout]
        self.interval = min([SWEEP_INTERVAL, *(d / 4 for d in deadlines if d > 0)])
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="extproc-host HTTP/2 deadlines")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            for transport in list(self.transports):
                transport.check(now)
