"""The echo upstream over HTTP/2 as well: ``extproc-host echo --http2``.

The same behaviour as :mod:`extproc_host.stack.echo` (every request body streamed straight back, the
request's content-type and content-encoding echoed, its content-length kept when it had one;
``GET .../bytes/<n>`` answers n deterministic bytes) as an ASGI application served by hypercorn,
which speaks HTTP/2 with prior knowledge (h2c) and HTTP/1.1 on the same port. Bodies stream
with flow control both ways: hypercorn hands the application a bounded queue of request
chunks and each response chunk waits for the peer's window, so memory stays flat whatever the
body size, for clients that read the response while they send (Envoy, curl). A client that
sends its whole request before reading (httpx) makes hypercorn hold the echoed bytes it cannot
send yet.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from ..settings import parse_listen
from .echo_common import BYTES_PATH, listening_line, pattern, stop_on_signal

_ECHOED_HEADERS = (b"content-type", b"content-encoding")

#: ASGI callables (hypercorn ships no types for them).
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _send_pattern(send: Send, n: int) -> None:
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(n).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for block in pattern(n):
        await send({"type": "http.response.body", "body": block, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def echo_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """ASGI application: stream the request body back (see the module docstring)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":
        match = BYTES_PATH.search(scope["path"])
        if match:
            await _send_pattern(send, int(match.group(1)))
            return
    request_headers = scope["headers"]
    headers = [(name, value) for name, value in request_headers if name in _ECHOED_HEADERS]
    length = next((value for name, value in request_headers if name == b"content-length"), None)
    if length is not None:
        headers.append((b"content-length", length))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return  # the client (Envoy) went away mid-body
        body = message.get("body", b"")
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _bound_socket(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve(listen: str) -> None:
    # Bind here (port 0 picks one) so the real port can be printed, then hand hypercorn the fd.
    sock = _bound_socket(listen)
    bound_host, bound_port = sock.getsockname()[:2]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket from here
    config.accesslog = None
    config.errorlog = None
    config.h2_max_concurrent_streams = 1000
    config.keep_alive_timeout = 300
    print(listening_line("echo (HTTP/1.1 and h2c)", bound_host, bound_port), flush=True)
    stop = stop_on_signal()
    app: Any = echo_app  # a plain-dict ASGI app; hypercorn types scopes as TypedDicts
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait, mode="asgi")


def serve(listen: str) -> None:
    """Run the HTTP/2 + HTTP/1.1 echo on ``listen`` (HOST:PORT) until SIGTERM/SIGINT."""
    asyncio.run(_serve(listen))
