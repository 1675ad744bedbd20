"""A stream's plugin chain: the plugin instances of one stream and the calls that link them.

Body bytes go through the plugins in the route's order, each one's output feeding the next
(as httpx chains its decoders). At the end of a body each plugin's flush is fed through the
plugins after it before they flush in turn. Only plugins that override a hook are called for
it, so a chain of plugins that leave bodies alone moves bytes without touching them. A plugin
that skipped a body (``Plugin.skip_body``) is left out of that body's stages for its stream.

A header hook that returns bytes replaces the body after those headers: the new body goes
through the body hooks of the plugins after it, as one whole body.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from .errors import PluginError
from .plugin import BODY_HOOKS, Headers, Plugin, StreamInfo, overridden_hooks
from .routes import Route


@dataclass(frozen=True)
class ChainPlan:
    """Per route, computed once: for every hook, which links implement it and whether async."""

    route: Route
    calls: dict[str, tuple[tuple[int, bool], ...]]
    # direction -> ((link index, body hook async?|None, end hook async?|None), ...)
    body_stages: dict[str, tuple[tuple[int, bool | None, bool | None], ...]]
    has_any_hook: bool

    @classmethod
    def for_route(cls, route: Route) -> ChainPlan:
        calls: dict[str, list[tuple[int, bool]]] = {}
        for index, link in enumerate(route.chain):
            for hook in overridden_hooks(link.info.cls):
                is_async = inspect.iscoroutinefunction(getattr(link.info.cls, hook))
                calls.setdefault(hook, []).append((index, is_async))
        stages = {}
        for direction, (body_hook, end_hook) in BODY_HOOKS.items():
            body_calls, end_calls = dict(calls.get(body_hook, ())), dict(calls.get(end_hook, ()))
            stages[direction] = tuple(
                (index, body_calls.get(index), end_calls.get(index))
                for index in range(len(route.chain))
                if index in body_calls or index in end_calls
            )
        return cls(route, {k: tuple(v) for k, v in calls.items()}, stages, bool(calls))

    def touches_body(self, direction: str) -> bool:
        body, end = BODY_HOOKS[direction]
        return body in self.calls or end in self.calls

    def touches(self, hook: str) -> bool:
        return hook in self.calls


async def _call(fn: Callable[..., Any], is_async: bool, *args: Any) -> Any:
    result = fn(*args)
    if is_async:
        result = await result
    return result


def _is_stream(value: Any) -> bool:
    """An iterator of pieces (sync or async) rather than one bytes-like value."""
    return hasattr(value, "__aiter__") or (
        hasattr(value, "__iter__") and not isinstance(value, (bytes, bytearray, memoryview, str))
    )


async def _pieces(value: Any, plugin: str, hook: str) -> AsyncIterator[bytes]:
    """A hook's answer (bytes, or a sync or async iterator of bytes) as non-empty pieces."""
    try:
        if hasattr(value, "__aiter__"):
            async for piece in value:
                piece = _as_bytes(piece, plugin, hook)
                if piece:
                    yield piece
        elif _is_stream(value):
            for piece in value:
                piece = _as_bytes(piece, plugin, hook)
                if piece:
                    yield piece
        else:
            piece = _as_bytes(value, plugin, hook)
            if piece:
                yield piece
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(plugin, hook, exc) from exc


async def _concat(*streams: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for stream in streams:
        async for piece in stream:
            yield piece


def _as_bytes(value: Any, plugin: str, hook: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise PluginError(plugin, hook, TypeError(f"returned {type(value).__name__}, expected bytes"))


#: Body stages of one direction: (link index, body hook async?|None, end hook async?|None).
Stages = tuple[tuple[int, bool | None, bool | None], ...]


class Chain:
    """The plugin instances of one stream, in route order."""

    __slots__ = ("_closed", "info", "plan", "plugins", "stages", "timers", "trace")

    def __init__(
        self,
        plan: ChainPlan,
        info: StreamInfo,
        timers: dict[tuple[str, str], Any] | None = None,
        trace: Any = None,
    ) -> None:
        """``timers``: ``{(plugin name, hook): metrics.HookTimer}`` to time every hook call, or
        None; ``trace``: the stream's :class:`~extproc_host.tracing.StreamTrace`, for a span per
        hook call, or None."""
        self.plan = plan
        self.info = info
        self.timers = timers
        self.trace = trace
        #: Body stages per direction for this stream: the plan's, less the skipped plugins.
        self.stages: dict[str, Stages] = plan.body_stages
        self.plugins: list[Plugin] = []
        self._closed = False
        for link in plan.route.chain:
            try:
                self.plugins.append(link.info.cls(link.settings, info))
            except Exception as exc:
                raise PluginError(link.info.name, "__init__", exc) from exc

    async def headers(self, hook: str, headers: Headers) -> tuple[int, bytes] | None:
        """Run a header or trailer hook of every plugin that has it, in order. Returns the
        last body a header hook returned, with the index of its plugin, or None."""
        replaced: tuple[int, bytes] | None = None
        for index, is_async in self.plan.calls.get(hook, ()):
            result = await self._invoke(self.plugins[index], hook, is_async, headers)
            if result is not None:
                replaced = (index, _as_bytes(result, self.plugins[index].name, hook))
        return replaced

    def skip(self, plugin: Plugin, direction: str) -> bool:
        """Leave ``plugin`` out of this stream's ``direction`` body; whether any plugin with
        hooks for that body is left."""
        index = next(i for i, p in enumerate(self.plugins) if p is plugin)
        kept = tuple(stage for stage in self.stages[direction] if stage[0] != index)
        self.stages = {**self.stages, direction: kept}
        return bool(kept)

    async def replacement(self, direction: str, after: int, body: bytes) -> bytes:
        """A body a header hook of link ``after`` returned, fed as one whole body through the
        ``direction`` body hooks of the plugins after it; their output, joined."""
        stages = self.stages[direction]
        later = {**self.stages, direction: tuple(stage for stage in stages if stage[0] > after)}
        kept, self.stages = self.stages, later
        try:
            out = await self.body(direction, body, True)
        finally:
            self.stages = kept
        if isinstance(out, bytes):
            return out
        return b"".join([piece async for piece in out])

    async def _invoke(self, plugin: Plugin, hook: str, is_async: bool, *args: Any) -> Any:
        """Call one hook (timed when the chain has timers, in a span when it has a trace); its
        error becomes a PluginError."""
        if self.trace is not None:
            return await self._traced(plugin, hook, is_async, *args)
        timers = self.timers
        start = perf_counter() if timers is not None else 0.0
        try:
            result = await _call(getattr(plugin, hook), is_async, *args)
        except Exception as exc:
            raise PluginError(plugin.name, hook, exc) from exc
        if timers is not None:
            timers[plugin.name, hook].observe(perf_counter() - start)
        return result

    async def _traced(self, plugin: Plugin, hook: str, is_async: bool, *args: Any) -> Any:
        span = self.trace.hook(plugin.name, hook)
        start = perf_counter()
        try:
            result = await _call(getattr(plugin, hook), is_async, *args)
        except Exception as exc:
            self.trace.failed_hook(span, exc)
            raise PluginError(plugin.name, hook, exc) from exc
        finally:
            span.end()
        if self.timers is not None:
            self.timers[plugin.name, hook].observe(perf_counter() - start)
        return result

    async def body(self, direction: str, chunk: bytes, end: bool) -> bytes | AsyncIterator[bytes]:
        """Feed one chunk (and, when ``end``, the flushes) through the chain; return its output.

        The output is ``bytes``, or an async iterator of pieces once a plugin answered with an
        iterator (output too large to hold at once); later plugins then get it piece by piece.
        """
        body_hook, end_hook = BODY_HOOKS[direction]
        data = chunk
        stages = self.stages[direction]
        for position, (index, body_async, end_async) in enumerate(stages):
            plugin = self.plugins[index]
            if data and body_async is not None:
                result = await self._invoke(plugin, body_hook, body_async, data)
                if type(result) is not bytes:
                    if _is_stream(result):
                        return self._stream(direction, position, _pieces(result, plugin.name, body_hook), end)
                    result = _as_bytes(result, plugin.name, body_hook)
                data = result
            if end and end_async is not None:
                tail = await self._invoke(plugin, end_hook, end_async)
                if type(tail) is not bytes:
                    if _is_stream(tail):
                        head = _pieces(data, plugin.name, body_hook)
                        pieces = _concat(head, _pieces(tail, plugin.name, end_hook))
                        return self._stream(direction, position, pieces, end, ended=True)
                    tail = _as_bytes(tail, plugin.name, end_hook)
                if tail:
                    data = data + tail if data else tail
        return data

    def _stream(
        self, direction: str, position: int, pieces: AsyncIterator[bytes], end: bool, ended: bool = False
    ) -> AsyncIterator[bytes]:
        """The rest of the chain from stage ``position`` on, as generators fed piece by piece."""
        stages = self.stages[direction]
        index, _, end_async = stages[position]
        stream = self._stage(direction, self.plugins[index], None, None if ended else end_async, pieces, end)
        for index, body_async, end_async in stages[position + 1 :]:
            stream = self._stage(direction, self.plugins[index], body_async, end_async, stream, end)
        return stream

    async def _stage(
        self,
        direction: str,
        plugin: Plugin,
        body_async: bool | None,
        end_async: bool | None,
        upstream: AsyncIterator[bytes],
        end: bool,
    ) -> AsyncIterator[bytes]:
        body_hook, end_hook = BODY_HOOKS[direction]
        async for data in upstream:
            if body_async is None:
                yield data
                continue
            async for piece in _pieces(await self._invoke(plugin, body_hook, body_async, data), plugin.name, body_hook):
                yield piece
        if end and end_async is not None:
            async for piece in _pieces(await self._invoke(plugin, end_hook, end_async), plugin.name, end_hook):
                yield piece

    async def close(self, error: BaseException | None, on_error: Callable[[str, BaseException], None]) -> None:
        """Call every plugin's ``close`` exactly once; a failing close is reported, not raised."""
        if self._closed:
            return
        self._closed = True
        async_close = dict(self.plan.calls.get("close", ()))
        for index, plugin in enumerate(self.plugins):
            if index not in async_close:
                continue
            span = self.trace.hook(plugin.name, "close") if self.trace is not None else None
            try:
                await _call(plugin.close, async_close[index], error)
            except Exception as exc:  # a failing close must not stop the others
                if span is not None:
                    self.trace.failed_hook(span, exc)
                on_error(plugin.name, exc)
            finally:
                if span is not None:
                    span.end()
