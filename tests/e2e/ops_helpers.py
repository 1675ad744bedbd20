"""Helpers for the operations tests: the host's health and metrics, uploads paused on demand."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(port: int, service: str = EXT_PROC_SERVICE) -> int:
    """grpc.health.v1 Check against the host on ``port``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus endpoint: ``{(name, frozenset(labels.items())): value}``."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class PausedUpload:
    """A file's bytes as an async body that stops after ``pause_after`` bytes until released.

    ``paused`` is set once that many bytes were handed to the client; ``release()`` lets the
    rest go.
    """

    def __init__(self, path: Path, pause_after: int, piece: int = 256 * 1024) -> None:
        self.path = path
        self.pause_after = pause_after
        self.piece = piece
        self.paused = asyncio.Event()
        self._go = asyncio.Event()

    def release(self) -> None:
        self._go.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        sent = 0
        with self.path.open("rb") as f:
            while block := f.read(self.piece):
                yield block
                sent += len(block)
                if sent >= self.pause_after and not self._go.is_set():
                    self.paused.set()
                    await self._go.wait()
