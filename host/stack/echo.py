"""The echo upstream behind ``extproc-host echo``: streams every request body straight back.

Any method, any path answers 200 with the request body, written out chunk by chunk as it
arrives, so bodies of any size pass with flat memory (aiohttp pauses reading the socket while
its read buffer holds more than a couple of MiB, and each write waits for the response to
drain). The response carries the request's content-length when it had one (content-length 0
for a request without a body, chunked otherwise) and echoes its content-type and
content-encoding. Bodies are echoed byte for byte: no decompression.

A GET of any path ending in ``/bytes/<n>`` (``/bytes/100``, ``/streamed/bytes/100``) answers n
deterministic bytes (see :func:`pattern`) with a content-length, so tests can check a response
body that has no request body behind it. Any request to a path ending in ``/inspect`` is
answered with a JSON report of what arrived: method, path, headers and body
(:func:`~extproc_host.stack.echo_common.inspect_report`), so tests can see what a chain and
Envoy made of a request. ``--tag NAME`` adds ``x-upstream: NAME`` to every answer, so a test
with two upstreams sees which one answered.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from ..settings import parse_listen
from .echo_common import (
    BYTES_PATH,
    CHUNK,
    INSPECT_PATH,
    TAG_HEADER,
    inspect_report,
    listening_line,
    pattern,
    stop_on_signal,
)

#: aiohttp's read buffer per connection. It stops reading the socket at twice this much
#: unread data. 1 MiB reads moved 10 x 70 MiB through Envoy at ~1.5x the rate of 64 KiB reads.
READ_BUFSIZE = 1024 * 1024

_ECHOED_HEADERS = ("Content-Type", "Content-Encoding")


async def _bytes(request: web.Request, n: int) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    response.content_type = "application/octet-stream"
    response.content_length = n
    try:
        await response.prepare(request)
        for block in pattern(n):
            await response.write(block)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client (Envoy) went away; nothing to answer
    return response


async def _inspect(request: web.Request) -> web.StreamResponse:
    body = await request.content.read()
    headers = [
        (name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in request.raw_headers
    ]
    report = inspect_report(request.method, request.path_qs, headers, body)
    return web.Response(body=report, content_type="application/json")


async def _echo(request: web.Request) -> web.StreamResponse:
    if request.method == "GET":
        match = BYTES_PATH.search(request.path)
        if match:
            return await _bytes(request, int(match.group(1)))
    if INSPECT_PATH.search(request.path):
        return await _inspect(request)

    response = web.StreamResponse(status=200)
    for name in _ECHOED_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            response.headers[name] = value
    length = request.content_length
    if length is None and not request.body_exists:
        length = 0
    if length is not None:
        response.content_length = length
    else:
        response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, web.RequestPayloadError):
        pass  # the client (Envoy) reset the request mid-body; nothing to answer
    return response


def make_app(tag: str | None = None) -> web.Application:
    """The echo application: one catch-all route for every method and path; ``tag``: the
    ``x-upstream`` header of every answer."""
    app = web.Application(
        # The body is never read whole, so the size limit for request.read() does not apply;
        # keep it small so a stray read() fails instead of buffering.
        client_max_size=CHUNK,
        handler_args={"read_bufsize": READ_BUFSIZE, "auto_decompress": False},
    )
    app.router.add_route("*", "/{tail:.*}", _echo)
    if tag is not None:

        async def tag_answer(request: web.Request, response: web.StreamResponse) -> None:
            response.headers[TAG_HEADER] = tag

        app.on_response_prepare.append(tag_answer)
    return app


async def _serve(listen: str, tag: str | None) -> None:
    host, port = parse_listen(listen)
    runner = web.AppRunner(make_app(tag), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    try:
        bound_host, bound_port = runner.addresses[0][:2]
        print(listening_line("echo", bound_host, bound_port), flush=True)
        await stop_on_signal().wait()
    finally:
        await runner.cleanup()


def serve(listen: str, http2: bool = False, tag: str | None = None) -> None:
    """Run the echo upstream on ``listen`` (HOST:PORT, port 0 picks one) until SIGTERM/SIGINT.

    Prints ``echo listening on http://HOST:PORT`` to stdout once bound. ``http2``: serve h2c
    (prior knowledge) as well as HTTP/1.1, with hypercorn (:mod:`extproc_host.stack.echo_h2`;
    no ``tag`` or ``/inspect`` there). ``tag``: the ``x-upstream`` header of every answer.
    """
    if http2:
        from .echo_h2 import serve as serve_h2

        serve_h2(listen)
        return
    asyncio.run(_serve(listen, tag))


if __name__ == "__main__":  # python -m extproc_host.stack.echo [HOST:PORT]
    serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080")
