"""What every benchmark module shares: where things are, the routes the workloads use, the
console, and the error a workload raises when its responses are wrong."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from extproc_host.stack.demo_model import MiB

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# The Envoy route (envoy/full_duplex.yaml) each request path lands on: the host's [routes.NAME].
FD_PATH = "/full-duplex-streamed"
HEADERS_PATH = "/headers-only"
ROUTES = {FD_PATH: "full-duplex-streamed", HEADERS_PATH: "headers-only"}
# The request paths each workload sends to, in the order it sends them.
WORKLOAD_PATHS = {
    "upload": (FD_PATH,),
    "small-fd": (FD_PATH,),
    "small-headers": (HEADERS_PATH,),
    "latency": (FD_PATH, HEADERS_PATH),
}
WORKLOADS = tuple(WORKLOAD_PATHS)
# What `curl --compressed` sends with this curl (built with zstd, brotli and zlib); the sanity
# check, wrk and the latency client send the same, so every setup sees the same requests.
ACCEPT_ENCODING = "deflate, gzip, br, zstd"

console = Console(width=None if sys.stdout.isatty() else 150, highlight=False)

__all__ = [
    "ACCEPT_ENCODING",
    "BENCH_DIR",
    "FD_PATH",
    "HEADERS_PATH",
    "RESULTS_DIR",
    "ROOT",
    "ROUTES",
    "WORKLOADS",
    "WORKLOAD_PATHS",
    "MiB",
    "WorkloadError",
    "console",
]


class WorkloadError(RuntimeError):
    """A workload ran but its responses were wrong (bad status, bad body, socket errors)."""
