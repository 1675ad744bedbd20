"""A storm of streams whose answers are never read, then cancelled: the host's memory budget
and what it gives back afterwards, in one command.

    .venv/bin/python benchmarks/storm.py            # the shipped limits
    .venv/bin/python benchmarks/storm.py --unbounded  # max_concurrent_streams = max_held_bytes = 0
    .venv/bin/python benchmarks/storm.py --transport grpcio  # grpc.aio serves instead

It starts ``extproc-host`` (passthrough on every route, metrics on) on free loopback ports and
opens ``--streams`` gRPC Process streams at once, as Envoy would in FULL_DUPLEX_STREAMED: each
sends its headers and ``--chunks`` body chunks of 1 MiB and never reads an answer, so the host
blocks sending. Once every stream is open or refused, the client cancels them all. Printed:
the host's RSS idle, at its peak, right after the storm and after ``--settle`` seconds (the
host reclaims the memory cancelled streams leave on its own), the streams served and refused
(and why), the bytes held at the peak, and the ERROR lines the host logged. Loopback only; the
default run takes well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc_host.stack.runner import extproc_host_command

MiB = 1024 * 1024
FD = processing_mode_pb2.ProcessingMode.BodySendMode.FULL_DUPLEX_STREAMED
CHUNK = b"s" * MiB
SETTINGS = (
    '[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:0"\n[routes.default]\nchain = ["passthrough"]\n'
)


def scrape(url: str) -> dict[str, float]:
    """Every sample of the host's /metrics as ``name{labels}`` -> value."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def one_stream(
    stub: pb_grpc.ExternalProcessorStub, chunks: int, stop: asyncio.Event
) -> grpc.aio.StreamStreamCall:
    async def requests():
        yield pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=FD, response_body_mode=FD),
        )
        for _ in range(chunks):
            yield pb.ProcessingRequest(request_body=pb.HttpBody(body=CHUNK))
        await stop.wait()

    return stub.Process(requests())


class Sampler(threading.Thread):
    """The host's RSS every 20 ms; the peak."""

    def __init__(self, process: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)


async def storm(args: argparse.Namespace, metrics_url: str, port: int, host: psutil.Process) -> dict[str, object]:
    idle = host.memory_info().rss
    sampler = Sampler(host)
    sampler.start()
    stop = asyncio.Event()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        calls = [await one_stream(stub, args.chunks, stop) for _ in range(args.streams)]
        # Wait until every stream is open in the host or refused, and the held bytes settle.
        deadline = time.monotonic() + args.fill
        last, held_peak = None, 0.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            samples = scrape(metrics_url)
            held_peak = max(held_peak, samples.get("extproc_held_bytes", 0.0))
            refused = sum(1 for c in calls if c.done())
            now = (samples.get("extproc_active_streams"), samples.get("extproc_held_bytes"), refused)
            if now == last and now[0] is not None and now[0] + refused >= args.streams:
                break
            last = now
        open_streams = samples.get("extproc_active_streams", 0.0)
        codes: dict[str, int] = {}
        for call in calls:
            if call.done():
                code = (await call.code()).name
                codes[code] = codes.get(code, 0) + 1
        for call in calls:
            call.cancel()
        stop.set()
    deadline = time.monotonic() + 30
    while scrape(metrics_url).get("extproc_active_streams", 1) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    after = host.memory_info().rss
    left = scrape(metrics_url).get("extproc_active_streams", 0.0)
    await asyncio.sleep(args.settle)
    settled = host.memory_info().rss
    sampler.running = False
    sampler.join()
    samples = scrape(metrics_url)
    return {
        "idle": idle,
        "peak": sampler.peak,
        "after": after,
        "settled": settled,
        "left": left,
        "open": open_streams,
        "ended_early": codes,
        "held_peak": held_peak,
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300, help="streams opened at once (default 300)")
    parser.add_argument("--chunks", type=int, default=8, help="1 MiB body chunks each stream sends (default 8)")
    parser.add_argument("--fill", type=float, default=20.0, help="longest wait for the streams to fill (s)")
    parser.add_argument("--settle", type=float, default=12.0, help="seconds to wait after the storm (default 12)")
    parser.add_argument(
        "--unbounded", action="store_true", help="max_concurrent_streams = max_held_bytes = 0 (no limits)"
    )
    parser.add_argument(
        "--transport", choices=("builtin", "grpcio"), default="builtin", help="[server] transport (default builtin)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
        config = Path(tmp) / "storm.toml"
        config.write_text(SETTINGS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
        env["EXTPROC_SERVER__TRANSPORT"] = args.transport
        if args.unbounded:
            env |= {"EXTPROC_SERVER__MAX_CONCURRENT_STREAMS": "0", "EXTPROC_SERVER__MAX_HELD_BYTES": "0"}
        stderr_path = Path(tmp) / "host.stderr.log"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [*extproc_host_command(), "--config", str(config)], stdout=subprocess.PIPE, stderr=stderr, env=env
            )
            try:
                port = metrics_url = None
                assert proc.stdout is not None
                while port is None or metrics_url is None:
                    line = proc.stdout.readline().decode()
                    if not line:
                        raise SystemExit(f"the host exited: {stderr_path.read_text()}")
                    if found := re.search(r"metrics on (http://\S+)", line):
                        metrics_url = found.group(1)
                    if found := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                        port = int(found.group(1))
                time.sleep(0.5)
                result = asyncio.run(storm(args, metrics_url, port, psutil.Process(proc.pid)))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        errors = [line for line in stderr_path.read_text().splitlines() if " ERROR " in line or "Traceback" in line]
    samples = result["samples"]
    refused = {k.split('"')[1]: int(v) for k, v in samples.items() if k.startswith("extproc_streams_refused_total")}
    limits = {
        k.split('"')[1]: int(v) for k, v in samples.items() if k.startswith("extproc_stream_limit_failures_total")
    }
    print(f"storm: {args.streams} streams x {args.chunks} MiB sent, answers never read, then cancelled")
    print(f"limits: {'none (--unbounded)' if args.unbounded else 'shipped defaults'}; transport {args.transport}")
    print(f"host RSS idle              {result['idle'] / MiB:8.0f} MiB")
    print(f"host RSS peak              {result['peak'] / MiB:8.0f} MiB")
    print(f"host RSS after the storm   {result['after'] / MiB:8.0f} MiB ({result['left']:.0f} streams still open)")
    print(f"host RSS {args.settle:.0f} s later         {result['settled'] / MiB:8.0f} MiB")
    print(f"streams open at the peak   {result['open']:8.0f}")
    print(f"bytes held at the peak     {result['held_peak'] / MiB:8.0f} MiB")
    print(f"streams refused            {refused or 0}")
    print(f"streams failed by a limit  {limits or 0}")
    print(f"streams ended before cancel, by status: {result['ended_early'] or 0}")
    print(f"memory reclaims            {int(samples.get('extproc_memory_reclaims_total', 0)):8d}")
    print(f"ERROR lines / tracebacks in the host's log: {len(errors)}")
    for line in errors[:5]:
        print("   ", line[:200])
    return 0


if __name__ == "__main__":
    sys.exit(main())
