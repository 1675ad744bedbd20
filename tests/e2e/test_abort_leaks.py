"""200 uploads the client abandons mid-body, through a real Envoy, leak nothing in the host:
the same open file descriptors and asyncio tasks after as before, and RSS within a bound."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import psutil
import pytest
from e2e_clients import KiB, MiB
from fault_plugins import SLEEPY_HEADER, TASKS_HEADER

from extproc_host.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ABORTS = 200
CONCURRENT = 10
CHUNK = 256 * KiB  # each aborted upload sends 4 of these (1 MiB) of a body it never finishes
CHUNKS = 4
# Growth allowed after 200 aborts (the lowest RSS over 2 quiet seconds, before and after).
# Leaking what the aborted streams passed would cost 200 MiB, one 256 KiB chunk each 50 MiB.
# Measured on 2 cores, rounds of 200 aborts after a warm-up round move the quiet RSS by
# -21..+20 MiB with no trend over 1,000 aborts (allocator and grpc buffer pools that grow and
# shrink), so 40 MiB. The host runs with MALLOC_MMAP_THRESHOLD_=65536 (freed chunk buffers go
# back to the OS at once) and MALLOC_ARENA_MAX=2 (grpc's threads would each keep an arena:
# that alone spread the figures by another ~10 MiB). Leaked plugins are caught exactly by
# the live-instance count, leaked tasks and fds by their counts.
RSS_GROWTH_BOUND = 40 * MiB

CONFIG = """
[server]
plugin_modules = ["tests.e2e.fault_plugins"]

[routes.full-duplex-streamed]
chain = ["sleepy"]
[routes.full-duplex-streamed.plugins.sleepy]
delay_ms = 0

[routes.streamed]
chain = ["sleepy"]
[routes.streamed.plugins.sleepy]
delay_ms = 0

[routes.headers-only]
chain = ["task_count"]

[routes.default]
chain = ["passthrough"]
"""


@pytest.fixture(scope="module")
def leak_stack(tmp_path_factory):
    config = tmp_path_factory.mktemp("leaks") / "host.toml"
    config.write_text(CONFIG)
    env = {"PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    with Stack("envoy/full_duplex.yaml", config, host_env=env) as stack:
        yield stack


async def abandon(port: int, path: str, reset: bool) -> None:
    """Send headers and 1 MiB of a chunked body; once the response has started (so the host
    holds the stream), hang up: a FIN, or with ``reset`` an RST."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    for _ in range(CHUNKS):
        writer.write(b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n")
        await writer.drain()
    status = await asyncio.wait_for(reader.readline(), timeout=30)
    assert status.startswith(b"HTTP/1.1 200"), status
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def abandon_many(port: int, count: int) -> None:
    paths = ("/full-duplex-streamed", "/streamed")
    limit = asyncio.Semaphore(CONCURRENT)

    async def one(i: int) -> None:
        async with limit:
            await abandon(port, paths[i % 2], reset=bool(i // 2 % 2))

    await asyncio.gather(*(one(i) for i in range(count)))


def host_probe(stack: Stack) -> dict[str, int]:
    """The host's asyncio task count and live sleepy plugins, as task_count reports them."""
    sock = socket.create_connection(("127.0.0.1", stack.envoy_port), timeout=10)
    with sock:
        sock.sendall(b"GET /headers-only HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head = received.split(b"\r\n\r\n", 1)[0].decode()
    found = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    assert TASKS_HEADER in found and SLEEPY_HEADER in found, head
    return {"tasks": int(found[TASKS_HEADER]), "plugins": int(found[SLEEPY_HEADER])}


def measure(stack: Stack) -> dict[str, int]:
    host = psutil.Process(stack.pids["host"])
    return {"fds": host.num_fds(), **host_probe(stack), "rss": host.memory_info().rss}


def quiet_rss(stack: Stack, seconds: float = 2.0) -> int:
    """The host's lowest RSS over ``seconds`` of quiet: what it holds, not what it is still
    handing back (buffers of streams that just ended are freed over a moment)."""
    host = psutil.Process(stack.pids["host"])
    lowest = host.memory_info().rss
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        lowest = min(lowest, host.memory_info().rss)
    return lowest


def settled(stack: Stack, baseline: dict[str, int], timeout: float = 20.0) -> dict[str, int]:
    """Measure until fds, tasks and live plugins are back at ``baseline`` or ``timeout``
    passed (streams the client abandoned end a moment later in the host); returns the last
    measurement, with the host's RSS once quiet."""
    deadline = time.monotonic() + timeout
    while True:
        now = measure(stack)
        back = all(now[key] == baseline[key] for key in ("fds", "tasks", "plugins"))
        if back or time.monotonic() > deadline:
            now["rss"] = quiet_rss(stack)
            return now
        time.sleep(0.2)


def steady(stack: Stack, timeout: float = 20.0) -> dict[str, int]:
    """The host once the streams of the last round have ended: no live plugins and the same
    counts twice in a row (on a busy machine the last of them end a moment later)."""
    deadline = time.monotonic() + timeout
    last = measure(stack)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = measure(stack)
        if now["plugins"] == 0 and all(now[key] == last[key] for key in ("fds", "tasks")):
            break
        last = now
    return {**last, "plugins": 0}


def test_200_aborted_uploads_leak_no_fds_tasks_or_memory(leak_stack):
    stack = leak_stack
    asyncio.run(abandon_many(stack.envoy_port, ABORTS))  # warm-up: pools, caches, Envoy's connections
    before = settled(stack, steady(stack))
    asyncio.run(abandon_many(stack.envoy_port, ABORTS))
    after = settled(stack, before)
    growth = after["rss"] - before["rss"]
    print(
        f"\nhost before {ABORTS} aborted uploads: {before['fds']} fds, {before['tasks']} tasks, "
        f"{before['plugins']} plugins alive, RSS {before['rss'] / MiB:.1f} MiB; after: {after['fds']} fds, "
        f"{after['tasks']} tasks, {after['plugins']} plugins alive, RSS {after['rss'] / MiB:.1f} MiB "
        f"({growth / MiB:+.1f} MiB)"
    )
    assert before["plugins"] == after["plugins"] == 0, (before, after)  # no stream's state kept
    assert after["fds"] == before["fds"], (before, after)
    assert after["tasks"] == before["tasks"], (before, after)
    assert growth < RSS_GROWTH_BOUND, (before, after)
