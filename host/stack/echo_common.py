"""What both echo upstreams share: the ``GET .../bytes/<n>`` pattern, the listening line, the
stop signal.

``pattern(n)`` is deterministic forever, so a test can check a response body that no request
body stands behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
from collections.abc import Iterator

from ..listeners import ListenAddress

#: Size of the block :func:`pattern` repeats.
CHUNK = 64 * 1024

BYTES_PATH = re.compile(r"(?:^|/)bytes/(\d+)$")


def _pattern_block() -> bytes:
    # 64 KiB that do not repeat within the block (a counter through SHA-256), fixed forever.
    out = bytearray()
    counter = 0
    while len(out) < CHUNK:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:CHUNK])


_BLOCK = _pattern_block()


def pattern(n: int) -> Iterator[bytes]:
    """The n bytes ``GET .../bytes/<n>`` answers, in chunks of at most 64 KiB.

    The bytes are a fixed 64 KiB block repeated and cut at n.
    """
    full, rest = divmod(n, CHUNK)
    for _ in range(full):
        yield _BLOCK
    if rest:
        yield _BLOCK[:rest]


def stop_on_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the echo servers run until then)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def listening_line(label: str, host: str, port: int) -> str:
    """``echo listening on http://HOST:PORT`` (the line Stack waits for)."""
    return f"{label} listening on http://{ListenAddress(host, port).target()}"
