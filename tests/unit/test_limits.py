"""The host's documented limits, through the in-process fake Envoy: an answer larger than one
gRPC message (every body mode), the budget (streams admitted by their reservations, held bytes
holding Envoy back rather than failing anyone), the idle timeout, and the memory reclaimed after
streams ended abnormally."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import ClassVar

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

import extproc_host.upkeep as upkeep_module
from extproc_host import Plugin, hookimpl
from extproc_host.admission import STREAM_COST, Admission, Limits
from extproc_host.errors import AnswerTooLarge, IdleTimeout
from extproc_host.logs import CancelledSendFilter
from extproc_host.metrics import Metrics
from extproc_host.processor import Router
from extproc_host.reclaim import reclaim
from extproc_host.settings import Settings
from extproc_host.upkeep import RECLAIM_INTERVAL, Upkeep

from .fake_envoy import (
    BUFFERED,
    STREAMED,
    fake_envoy,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

MiB = 1024 * 1024
LIMIT = 4 * MiB  # [server] max_message_bytes at its minimum
EXPANSION = 5 * MiB  # what the expanding plugin makes of any chunk: over LIMIT

CLOSED: list[BaseException | None] = []  # the error each Recorder instance was closed with


class Expand(Plugin):
    """Turns every request or response chunk into EXPANSION bytes, handed on in 1 MiB pieces
    (like zstd's decompression) or, with ``as_bytes``, in one piece."""

    name = "expand"
    as_bytes = False

    def _expand(self, chunk: bytes) -> bytes | Iterator[bytes]:
        if self.as_bytes:
            return b"x" * EXPANSION
        return (b"x" * MiB for _ in range(EXPANSION // MiB))

    def on_request_body(self, chunk: bytes) -> bytes | Iterator[bytes]:
        return self._expand(chunk)

    def on_response_body(self, chunk: bytes) -> bytes | Iterator[bytes]:
        return self._expand(chunk)


class ExpandBytes(Expand):
    name = "expand_bytes"
    as_bytes = True


class Recorder(Plugin):
    """Records the error its close gets; touches request and response bodies."""

    name = "recorder"
    alive: ClassVar[weakref.WeakSet[Recorder]] = weakref.WeakSet()  # instances not yet collected

    def __init__(self, settings, stream) -> None:
        super().__init__(settings, stream)
        Recorder.alive.add(self)

    def on_request_body(self, chunk: bytes) -> bytes:
        return chunk

    def on_response_body(self, chunk: bytes) -> bytes:
        return chunk

    def close(self, error: BaseException | None) -> None:
        CLOSED.append(error)


@hookimpl
def register_plugins(register):
    register(Expand)
    register(ExpandBytes)
    register(Recorder)


SETTINGS = f"""
[server]
max_message_bytes = {LIMIT}
{{server}}

[routes.default]
chain = ["recorder", "passthrough"]

[routes.expand]
chain = ["recorder", "expand"]

[routes.expand-bytes]
chain = ["recorder", "expand_bytes"]
"""


@pytest.fixture
def make_envoy(tmp_path):
    """``make_envoy(server_lines)``: the fake Envoy with ``[server]`` extras, and its metrics."""

    def make(server: str = ""):
        path = tmp_path / "settings.toml"
        path.write_text(SETTINGS.format(server=server))
        return fake_envoy(str(path), __import__(__name__, fromlist=["_"]), metrics=Metrics())

    CLOSED.clear()
    return make


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_defaults_bound_streams_by_bytes_and_idle_time() -> None:
    server = Settings().server
    assert server.max_concurrent_streams == 0  # no count: the budget bounds them
    assert server.max_held_bytes == 256 * MiB
    assert server.idle_timeout_seconds == 300.0
    assert server.max_message_bytes == 128 * MiB
    limits = Limits.from_settings(server)
    assert limits.stream_reserve == STREAM_COST + 16 * 1024  # the stream and its first window
    assert server.max_held_bytes // limits.stream_reserve == 8192  # streams admitted, idle


@pytest.mark.parametrize("route", ["expand", "expand-bytes"])
@pytest.mark.parametrize("mode", [STREAMED, BUFFERED], ids=["STREAMED", "BUFFERED"])
async def test_request_output_over_one_message_is_a_413_and_a_failed_stream(make_envoy, route, mode) -> None:
    async with make_envoy() as fake:
        got = await fake.converse(
            [request_headers(route=route, request_mode=mode, response_mode=mode), request_body(b"tiny", end=True)]
        )
        metrics = fake.servicer.router.metrics
    immediate = got.of("immediate_response")
    assert len(immediate) == 1 and immediate[0].immediate_response.status.code == 413
    assert b"body too large" in immediate[0].immediate_response.body
    assert got.code == grpc.StatusCode.OK
    assert len(CLOSED) == 1 and isinstance(CLOSED[0], AnswerTooLarge)
    assert "max_message_bytes = 4194304" in str(CLOSED[0])
    assert value(metrics, "extproc_streams_total", route=route, outcome="failed") == 1
    assert value(metrics, "extproc_streams_total", route=route, outcome="ok") == 0
    assert value(metrics, "extproc_stream_limit_failures_total", limit="max_message_bytes") == 1


async def test_response_output_over_one_message_fails_the_stream_with_resource_exhausted(make_envoy) -> None:
    async with make_envoy() as fake:
        got = await fake.converse(
            [
                request_headers(route="expand", request_mode=STREAMED, response_mode=STREAMED, end_of_stream=True),
                response_headers(),
                response_body(b"tiny", end=True),
            ]
        )
        metrics = fake.servicer.router.metrics
    assert got.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_message_bytes" in got.details
    assert not got.of("immediate_response")
    assert len(CLOSED) == 1 and isinstance(CLOSED[0], AnswerTooLarge)
    assert value(metrics, "extproc_streams_total", route="expand", outcome="failed") == 1


async def test_full_duplex_sends_any_output_in_pieces(make_envoy) -> None:
    async with make_envoy() as fake:
        got = await fake.converse([request_headers(route="expand"), request_body(b"tiny", end=True)])
    assert got.code == grpc.StatusCode.OK
    body, ends = got.streamed("request_body")
    assert body == b"x" * EXPANSION and ends[-1] is True
    assert CLOSED == [None]


async def test_an_answer_over_the_budget_is_sent_and_fails_nobody(make_envoy) -> None:
    async with make_envoy(f"max_held_bytes = {2 * MiB}") as fake:
        got = await fake.converse([request_headers(route="default"), request_body(b"a" * (MiB + 1), end=True)])
        metrics = fake.servicer.router.metrics
        assert fake.servicer.admission.held == 0
    assert got.code == grpc.StatusCode.OK
    body, _ = got.streamed("request_body")
    assert body == b"a" * (MiB + 1)
    assert CLOSED == [None]
    assert value(metrics, "extproc_stream_limit_failures_total", limit="max_held_bytes") == 0


async def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _wait_for_steady(condition, what: str, steady: float = 0.5, timeout: float = 20.0) -> None:
    """Wait until ``condition`` has held for ``steady`` seconds in a row."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    since = None
    while True:
        now = loop.time()
        if condition():
            since = now if since is None else since
            if now - since >= steady:
                return
        else:
            since = None
        assert now < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _stalled(first: list[pb.ProcessingRequest], release: asyncio.Event) -> AsyncIterator[pb.ProcessingRequest]:
    """Envoy's side of a stream that sends ``first`` and then nothing until ``release``."""
    for message in first:
        yield message
    await release.wait()


async def test_held_bytes_past_the_budget_hold_envoy_back_and_refuse_nobody(make_envoy) -> None:
    """A stream whose answers Envoy does not read holds its bytes; past the budget the host gives
    that stream no more window (so the rest of its body waits on Envoy's side), and new streams
    are still taken: held bytes never refuse anyone."""
    async with make_envoy(f"max_held_bytes = {2 * MiB}") as fake:
        admission = fake.servicer.admission
        release = asyncio.Event()
        chunks = [request_body(b"s" * MiB) for _ in range(64)]
        stalled = fake.stub.Process(_stalled([request_headers(route="default"), *chunks], release))
        # Nobody reads `stalled`: once the transport's windows are full, the host waits to send.
        await _wait_for_steady(lambda: admission.held >= 2 * MiB, "a stalled answer holding the budget")
        held = admission.held
        await asyncio.sleep(0.3)
        assert admission.held <= held + MiB, "the host kept taking the stalled stream's body past the budget"
        served = await fake.converse([request_headers(route="default", end_of_stream=True)], settle=False)
        assert served.code == grpc.StatusCode.OK
        stalled.cancel()
        release.set()
        await _wait_for(lambda: admission.active == 0, "the stalled stream to end")
        assert admission.held == 0
        metrics = fake.servicer.router.metrics
        assert value(metrics, "extproc_streams_refused_total", reason="max_held_bytes") == 0


async def test_streams_are_refused_only_when_their_reservations_would_pass_the_budget(make_envoy) -> None:
    reserve = STREAM_COST + 16 * 1024
    async with make_envoy(f"max_held_bytes = {3 * reserve}") as fake:
        admission = fake.servicer.admission
        release = asyncio.Event()
        open_streams = [fake.stub.Process(_stalled([request_headers(route="default")], release)) for _ in range(3)]
        for call in open_streams:
            await call.__aiter__().__anext__()  # its answer to the headers: the stream is open
        assert admission.active == 3 and admission.budget.reserved == 3 * reserve
        refused = await fake.converse([request_headers(route="default", end_of_stream=True)], settle=False)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 open streams reserve" in refused.details and "[server] max_held_bytes" in refused.details
        for call in open_streams:
            call.cancel()
        release.set()
        await _wait_for(lambda: admission.active == 0, "the open streams to end")
        assert admission.budget.reserved == 0
        metrics = fake.servicer.router.metrics
        assert value(metrics, "extproc_streams_refused_total", reason="max_held_bytes") == 1
        served = await fake.converse([request_headers(route="default", end_of_stream=True)])
        assert served.code == grpc.StatusCode.OK


async def test_an_idle_stream_times_out_with_deadline_exceeded(make_envoy) -> None:
    async with make_envoy("idle_timeout_seconds = 0.3") as fake:
        release = asyncio.Event()
        call = fake.stub.Process(_stalled([request_headers(route="default"), request_body(b"a")], release))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
        release.set()
        await fake.servicer.drain(timeout=10)
        metrics = fake.servicer.router.metrics
        assert fake.servicer.active == 0
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "[server] idle_timeout_seconds" in raised.value.details()
    assert len(CLOSED) == 1 and isinstance(CLOSED[0], IdleTimeout)
    assert value(metrics, "extproc_stream_limit_failures_total", limit="idle_timeout_seconds") == 1
    assert value(metrics, "extproc_streams_total", route="default", outcome="failed") == 1


async def test_a_stream_blocked_on_an_unread_answer_times_out_too(make_envoy) -> None:
    async with make_envoy("idle_timeout_seconds = 0.3") as fake:
        admission = fake.servicer.admission
        release = asyncio.Event()
        chunks = [request_body(b"s" * MiB) for _ in range(64)]
        stalled = fake.stub.Process(_stalled([request_headers(route="default"), *chunks], release))
        await _wait_for(lambda: len(CLOSED) == 1, "the stalled stream to time out")
        assert isinstance(CLOSED[0], IdleTimeout)
        await _wait_for(lambda: admission.active == 0 and admission.held == 0, "its bytes to come back")
        stalled.cancel()
        release.set()


class _Holder:
    def __init__(self) -> None:
        self.me = self
        self.data = bytearray(MiB)


def test_reclaim_frees_cycles_that_only_a_full_collection_finds() -> None:
    holder = _Holder()
    gone = weakref.ref(holder)
    del holder
    assert gone() is not None
    assert reclaim() >= 1
    assert gone() is None
    gc.collect()


def test_upkeep_reclaims_after_abnormal_endings_at_most_once_per_interval(monkeypatch) -> None:
    found = [5, 0, 0]  # cycles each reclaim finds: the first one's finalizers get one more pass
    monkeypatch.setattr(upkeep_module, "reclaim", lambda: found.pop(0))
    metrics = Metrics()
    admission = Admission(Router({"default": _default_route()}), metrics, Limits())
    upkeep = Upkeep(admission)
    upkeep.check(100.0)
    assert metrics.reclaims == 0  # nothing ended abnormally
    admission.abnormal += 1
    upkeep.check(101.0)
    assert metrics.reclaims == 1
    admission.abnormal += 1
    upkeep.check(101.0 + RECLAIM_INTERVAL / 2)
    assert metrics.reclaims == 1  # too soon
    upkeep.check(101.0 + RECLAIM_INTERVAL)
    assert metrics.reclaims == 2
    upkeep.check(101.0 + 3 * RECLAIM_INTERVAL)
    assert metrics.reclaims == 2  # nothing new ended abnormally, the last pass found nothing
    assert found == [0]


def _default_route():
    from extproc_host.registry import build_routes, discover, make_plugin_manager

    return build_routes(Settings(), discover(make_plugin_manager()), "test")["default"]


class ExecuteBatchError(Exception):
    """Stands for grpc's exception of the same name (cygrpc does not export it)."""


def test_grpc_cancelled_send_reports_go_down_to_debug_without_traceback() -> None:
    try:
        raise ExecuteBatchError("Failed 'execute_batch': (<grpc._cython.cygrpc.SendMessageOperation>,)")
    except ExecuteBatchError as exc:
        info = (type(exc), exc, exc.__traceback__)
    record = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, "Unexpected error", None, info)
    kept = CancelledSendFilter().filter(record)
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert kept == logging.getLogger().isEnabledFor(logging.DEBUG)
    other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, "something else", None, None)
    assert CancelledSendFilter().filter(other) and other.levelno == logging.ERROR


async def test_the_upkeep_task_keeps_no_stream_alive(make_envoy) -> None:
    """The periodic task starts inside the first stream: it must not keep that stream's
    context (and so its StreamProcessor, plugins and buffers) alive."""
    async with make_envoy() as fake:
        await fake.converse([request_headers(route="default"), request_body(b"a", end=True)])
        assert fake.servicer.upkeep._task is not None
        # gRPC lets go of the finished call's task a moment later.
        await _wait_for(lambda: gc.collect() is not None and not Recorder.alive, "the stream's plugins to go")
