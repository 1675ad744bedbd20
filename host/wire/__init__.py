"""The host's own gRPC server, in layers (each only imports the ones before it):

- ``http2/frames.py``: HTTP/2 frames as bytes, each type's rules (RFC 9113 sections 4, 6);
- ``http2/fields.py``: header blocks: HPACK decoding with limits, field rules (RFC 9113 section
  8, RFC 7541), the server's own blocks;
- ``http2/limits.py``: a connection's limits, flood counters, rate-limited log lines;
- ``http2/connection.py``: connection and stream state, flow control, no I/O;
- ``budget.py``: one count of the bytes streams hold;
- ``transport.py``: the asyncio protocol between a socket and a connection, deadlines' clock;
- ``grpc/``: gRPC over HTTP/2: status codes and trailers, length-prefixed messages, a call
  per stream, the server with its methods, listeners and shutdown.

Why not grpc.aio (``[server] transport = "grpcio"`` keeps it): grpcio's asyncio server runs
HTTP/2 on its own threads and hands every completion event to the event loop through a
socketpair, which made that hand-off most of the CPU each small ext_proc exchange cost
(benchmarks/README.md). Here the event loop reads the socket itself: under load one read
carries frames of many streams, and the answers of one loop pass leave in one write.
"""

from .budget import Budget
from .grpc.call import AbortError, Context, Method
from .grpc.server import BIDI, SERVER_STREAM, UNARY, H2Server
from .grpc.status import StatusCode
from .http2.limits import Limits, LogLimiter

__all__ = [
    "BIDI",
    "SERVER_STREAM",
    "UNARY",
    "AbortError",
    "Budget",
    "Context",
    "H2Server",
    "Limits",
    "LogLimiter",
    "Method",
    "StatusCode",
]
