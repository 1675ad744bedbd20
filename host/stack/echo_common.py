"""What both echo upstreams share: the ``GET .../bytes/<n>`` pattern, the listening line, the
stop signal; and the ``.../inspect`` report of what a request looked like on arrival.

``pattern(n)`` is deterministic forever, so a test can check a response body that no request
body stands behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
from collections.abc import Iterator, Sequence

from ..listeners import ListenAddress

#: Size of the block :func:`pattern` repeats.
CHUNK = 64 * 1024

BYTES_PATH = re.compile(r"(?:^|/)bytes/(\d+)$")
#: A path (before any query) ending here is answered with :func:`inspect_report`.
INSPECT_PATH = re.compile(r"(?:^|/)inspect$")
#: The response header naming the upstream that answered (``extproc-host echo --tag NAME``).
TAG_HEADER = "x-upstream"


def inspect_report(method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """What the upstream received, as JSON: the method, the path, the headers (lower-case
    names, in order) and the body (text when it is UTF-8, else its size and SHA-256)."""
    try:
        text: str | None = body.decode()
    except UnicodeDecodeError:
        text = None
    report = {
        "method": method,
        "path": path,
        "headers": [[name.lower(), value] for name, value in headers],
        "body": text,
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return json.dumps(report).encode()


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
