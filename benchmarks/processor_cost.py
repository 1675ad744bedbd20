"""The host's own CPU per exchange, in process: one ext_proc stream's messages handed to the
stream processor (no network, no Envoy), for this checkout and a baseline git revision,
alternating. The rest of a request's CPU (HTTP/2, the event loop) is the same code in both
unless the change touched it; this part is what a change of the processor, the chain or the
protocol adapters costs, measured without the machine's noise drowning it.

    .venv/bin/python benchmarks/processor_cost.py --baseline main
    .venv/bin/python benchmarks/processor_cost.py --baseline HEAD~3 --rounds 6

Exchanges: a 1 KiB POST on benchmarks/passthrough.toml's full-duplex route (request headers,
body, response headers, body) and on its headers-only route; the figure is the best (minimum)
microseconds per exchange of each measurement: the best of all (what the code costs when
nothing else takes the core) and the median of the rounds' best.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / "benchmarks" / "passthrough.toml"
ROUTES = ("full-duplex-streamed", "headers-only")


def measure(exchanges: int, repeats: int) -> dict[str, float]:
    """Best microseconds per exchange on each route, with the extproc_host on sys.path."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    from extproc_host.processor import Router, StreamProcessor
    from extproc_host.registry import load_host

    router = Router(load_host(SETTINGS).routes)
    body = b"x" * 1024

    def headers(items: dict[str, str]) -> base_pb2.HeaderMap:
        return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()])

    def messages(route: str) -> list[pb.ProcessingRequest]:
        mode = 4 if route == "full-duplex-streamed" else 0  # FULL_DUPLEX_STREAMED or NONE
        first = pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(
                headers=headers({":method": "POST", ":path": "/x", "content-length": "1024"})
            ),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=mode, response_body_mode=mode),
        )
        attrs = struct_pb2.Struct()
        attrs.update({"xds.route_name": route})
        first.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
        found = [first]
        if mode:
            found.append(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
        found.append(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers({":status": "200"}))))
        if mode:
            found.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True)))
        return found

    async def run(route: str, n: int) -> float:
        sent = messages(route)
        start = time.perf_counter()
        for i in range(n):
            stream = StreamProcessor(router, str(i))
            for message in sent:
                await stream.handle(message)
            await stream.finish(None)
        return (time.perf_counter() - start) / n * 1e6

    async def all_routes() -> dict[str, float]:
        found = {}
        for route in ROUTES:
            await run(route, exchanges // 4)  # warm up
            found[route] = min([await run(route, exchanges) for _ in range(repeats)])
        return found

    return asyncio.run(all_routes())


def child(args: argparse.Namespace) -> int:
    if args.code:  # before anything imports extproc_host
        sys.path.insert(0, args.code)
    print(json.dumps(measure(args.exchanges, args.repeats)))
    import extproc_host  # which code was measured: checked by the parent

    print(extproc_host.__file__)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/processor_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", metavar="REV", help="git revision to compare with (default main)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of both")
    parser.add_argument("--exchanges", type=int, default=4000, help="exchanges per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per round (the best counts)")
    parser.add_argument("--code", help=argparse.SUPPRESS)  # a child measuring this extracted code
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    from setups import extract_revision  # imports extproc_host: the parent only

    results: dict[str, dict[str, list[float]]] = {"this": {r: [] for r in ROUTES}, "base": {r: [] for r in ROUTES}}
    with tempfile.TemporaryDirectory(prefix="extproc-processor-cost-") as tmp:
        code = extract_revision(args.baseline, Path(tmp))
        for _ in range(args.rounds):
            for name, extra in (("base", ["--code", str(code)]), ("this", [])):
                command = [sys.executable, __file__, "--child", "--exchanges", str(args.exchanges)]
                command += ["--repeats", str(args.repeats), *extra]
                done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
                figures, measured = done.stdout.splitlines()[-2:]
                if measured.startswith(tmp) != (name == "base"):
                    raise SystemExit(f"the {name} run measured the wrong code: {measured}")
                for route, value in json.loads(figures).items():
                    results[name][route].append(value)
    print(f"processor CPU per exchange, us: best of all, median of {args.rounds} rounds' best")
    print(f"| route | {args.baseline} | this checkout | this - {args.baseline}, best |")
    print("| --- | --- | --- | --- |")
    for route in ROUTES:
        base, this = results["base"][route], results["this"][route]
        print(
            f"| {route} | {min(base):.2f}, {statistics.median(base):.2f} | {min(this):.2f}, "
            f"{statistics.median(this):.2f} | {min(this) - min(base):+.2f} us |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
