"""The server's periodic chores while it serves: idle streams and memory left by failed ones.

- Idle timeout (``[server] idle_timeout_seconds``): a stream that has received no message from
  Envoy for that long (waiting for it, or blocked because Envoy does not take the answers) is
  failed with DEADLINE_EXCEEDED, its plugins closed with :class:`~extproc_host.errors.IdleTimeout`.
  The hot path only counts messages (``StreamProcessor.messages``); this task compares counts
  once per tick.
- Memory: once streams ended abnormally since the last time, a full collection and
  ``malloc_trim`` (:func:`~extproc_host.reclaim.reclaim`), at most every ``RECLAIM_INTERVAL``,
  and once more after a collection that found cycles (what their finalizers released). A
  stream gRPC abandoned while it waited to send (its task is done, its handler never resumed)
  is only finalized by a collection: one runs at the next tick, so its plugins are closed and
  its slot freed without waiting for the interval.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass

from .admission import Admission
from .errors import IdleTimeout
from .processor import StreamProcessor
from .reclaim import reclaim

log = logging.getLogger("extproc_host.server")

#: Longest time between two ticks (seconds); shorter when the idle timeout is short.
TICK = 1.0
#: Least time between two memory reclaims (seconds): a storm of failing streams costs a full
#: collection at most this often.
RECLAIM_INTERVAL = 5.0


@dataclass
class _Watched:
    stream: StreamProcessor
    task: asyncio.Task[object] | None
    seen: int  # the stream's message count at the last tick that saw it move
    since: float  # when that was


class Upkeep:
    """Watches the open streams and the admission's count of abnormal endings."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.idle_timeout = admission.limits.idle_timeout
        self.tick = min(TICK, self.idle_timeout / 4) if self.idle_timeout else TICK
        self.streams: dict[str, _Watched] = {}
        self.reclaimed = 0  # admission.abnormal at the last reclaim
        self.last_reclaim = 0.0
        self.again = False  # the last reclaim found cycles: their finalizers may free more
        self._task: asyncio.Task[None] | None = None

    def watch(self, stream: StreamProcessor) -> None:
        """Follow ``stream`` (served by the current task) until :meth:`forget`."""
        if self._task is None:
            # A context of its own: the stream's (its current_stream, for logs) would keep that
            # stream, its plugins and their buffers alive as long as the task runs.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="extproc-host upkeep", context=contextvars.Context()
            )
        self.streams[stream.stream_id] = _Watched(stream, asyncio.current_task(), stream.messages, time.monotonic())

    def forget(self, stream: StreamProcessor) -> None:
        self.streams.pop(stream.stream_id, None)

    def stop(self) -> None:
        """Stop the periodic task (shutdown)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.check(time.monotonic())
            except Exception:  # a chore that fails must not end the chores
                log.exception("upkeep failed")

    def check(self, now: float) -> None:
        """One tick: time out idle streams, reclaim memory when streams ended abnormally."""
        admission = self.admission
        orphaned = 0
        for watched in list(self.streams.values()):
            if watched.task is not None and watched.task.done():
                # gRPC gave up on the stream while it waited to send (Envoy cancelled it): its
                # handler is suspended for good and only a collection finalizes it (then it
                # closes the plugins and leaves self.streams).
                watched.task = None
                orphaned += 1
                continue
            if not self.idle_timeout or watched.task is None:
                continue
            stream = watched.stream
            if stream.messages != watched.seen:
                watched.seen, watched.since = stream.messages, now
            elif now - watched.since >= self.idle_timeout and not isinstance(stream.error, IdleTimeout):
                self._time_out(watched, now - watched.since)
        admission.abnormal += orphaned
        due = now - self.last_reclaim >= (RECLAIM_INTERVAL if not orphaned else self.tick)
        if (admission.abnormal != self.reclaimed or self.again) and due:
            follow_up = admission.abnormal == self.reclaimed  # the one extra pass, not a new cause
            self.reclaimed = admission.abnormal
            self.last_reclaim = now
            started = time.perf_counter()
            found = reclaim()
            # One more pass for what the finalizers of the cycles found released; never a
            # standing one (a busy server always has some cycles: that is gc's ordinary work).
            self.again = found > 0 and not follow_up
            log.debug("reclaimed memory: %d objects in cycles, %.1f ms", found, (time.perf_counter() - started) * 1e3)
            if admission.metrics is not None:
                admission.metrics.reclaims += 1

    def _time_out(self, watched: _Watched, idle: float) -> None:
        stream = watched.stream
        error = IdleTimeout(
            "idle_timeout_seconds",
            f"stream {stream.stream_id} route {stream.route_name}: no message from Envoy for {idle:.1f}s "
            f"(the limit, [server] idle_timeout_seconds, is {self.idle_timeout:g}s)",
        )
        log.warning("%s", error)
        stream.error = error
        if watched.task is not None:
            watched.task.cancel()
