"""The closed-loop workloads and the check before them: each takes a running stack and returns
its figures as a dict (``failures`` lists what went wrong).

- ``check_stack``: one 100 kB POST per route, the response must be the request body;
- ``upload``: N concurrent curl uploads of one file, echoed back and checked by SHA-256;
- ``small-fd`` / ``small-headers``: wrk POSTs of a small body to the full-duplex route or the
  headers-only route.

The open-loop latency workload is in :mod:`latency`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import ACCEPT_ENCODING, BENCH_DIR, WORKLOAD_PATHS, MiB, WorkloadError, console
from extproc_host.stack import Stack
from extproc_host.stack.demo import generate_body
from extproc_host.stack.demo_model import Body
from measure import CpuMeter, extproc_messages
from setups import HostSetup

WRK_SCRIPT = BENCH_DIR / "post.lua"
# The ext_proc server's CPU per request: result key per wrk workload.
SERVER_CPU_KEYS = {"small-fd": "fd_server_cpu_us_per_request", "small-headers": "headers_server_cpu_us_per_request"}


def find_wrk(allow_install: bool) -> str | None:
    """wrk's path; when missing and running as root, try apt-get once."""
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        console.print("wrk not found: running apt-get install -y wrk")
        for cmd in (
            ["apt-get", "install", "-y", "-q", "wrk"],
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "wrk"],
        ):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            found = shutil.which("wrk")
            if found:
                return found
    return None


def decode_body(raw: bytes, encoding: str) -> bytes:
    """A response body as the client's application sees it (curl --compressed does the same)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding == "zstd":
        import zstandard  # only needed when a plugin compresses

        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as reader:
            return reader.read()
    raise WorkloadError(f"unexpected content-encoding {encoding!r}")


def check_stack(stack: Stack, host: HostSetup | None, upload: Body | None) -> list[str]:
    """One small request per route the workloads use, before any load: the response, decoded,
    must be the request body (or, where the setup replaces responses with it, the upload file).
    Returns a note per route with the response's content-encoding."""
    body = random.Random(1).randbytes(100_000)
    notes = []
    for path in sorted({p for paths in WORKLOAD_PATHS.values() for p in paths}):
        request = urllib.request.Request(
            stack.url + path,
            data=body,
            method="POST",
            headers={"content-type": "application/octet-stream", "accept-encoding": ACCEPT_ENCODING},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            status = response.status
            encoding = response.headers.get("content-encoding", "")
        got = decode_body(raw, encoding)
        if host is not None and host.response_is_upload(path):
            assert upload is not None
            ok = hashlib.sha256(got).hexdigest() == upload.sha256
            want = f"the {upload.size}-byte upload file"
        else:
            ok = got == body
            want = f"the {len(body)}-byte request body"
        if status != 200 or not ok:
            raise WorkloadError(
                f"sanity check {path}: status {status}, {len(got)} bytes back ({len(raw)} on the wire), expected {want}"
            )
        notes.append(f"{path} {encoding or 'identity'} {len(raw)} B")
    return notes


def run_upload(stack: Stack, upload: Body, args: argparse.Namespace) -> dict[str, Any]:
    """``args.uploads`` concurrent curl uploads of the file, each echo hashed and checked."""
    (url,) = (stack.url + path for path in WORKLOAD_PATHS["upload"])
    size, digest = upload.size, upload.sha256
    cmd = [
        "curl", "-sS", "--max-time", "600", "--compressed",
        "--data-binary", f"@{upload.path}",
        "-H", "content-type: application/octet-stream",
        "-w", "%{stderr}HTTP %{http_code} %{size_download} %header{content-encoding}\n",
        url,
    ]  # fmt: skip
    outcomes: list[dict[str, Any]] = [{} for _ in range(args.uploads)]

    def drain(proc: subprocess.Popen[bytes], out: dict[str, Any]) -> None:
        h = hashlib.sha256()  # OpenSSL, releases the GIL for large updates
        n = 0
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while chunk := os.read(fd, MiB):
            h.update(chunk)
            n += len(chunk)
        proc.wait()
        out.update(
            digest=h.hexdigest(),
            bytes=n,
            exit=proc.returncode,
            stderr=proc.stderr.read().decode(errors="replace").strip(),  # type: ignore[union-attr]
        )

    msgs_before = extproc_messages(stack)
    with stack.sampler(0.1) as rss, CpuMeter(stack) as cpu:
        t0 = time.perf_counter()
        threads = []
        for out in outcomes:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            thread = threading.Thread(target=drain, args=(proc, out), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0

    failures = []
    received = 0  # bytes on the wire (compressed when the response was), from curl's size_download
    encodings: dict[str, int] = {}
    for i, out in enumerate(outcomes):
        status = [line.split() for line in out.get("stderr", "").splitlines() if line.startswith("HTTP ")]
        if status:
            received += int(status[-1][2]) if len(status[-1]) > 2 and status[-1][2].isdigit() else 0
            encoding = status[-1][3] if len(status[-1]) > 3 else "identity"
            encodings[encoding] = encodings.get(encoding, 0) + 1
        if out.get("exit") != 0 or out.get("digest") != digest or not status or status[-1][1] != "200":
            failures.append(
                f"upload {i}: curl exit {out.get('exit')}, {out.get('stderr', '')!r}, "
                f"{out.get('bytes', 0)} of {size} bytes back, sha256 {'ok' if out.get('digest') == digest else 'MISMATCH'}"
            )
    return {
        "upload_mib_s": size * args.uploads / wall / MiB,
        "bytes_received": received,
        "received_ratio": received / (size * args.uploads),
        "content_encodings": encodings,
        "wall_s": round(wall, 3),
        "bytes_sent": size * args.uploads,
        "uploads": args.uploads,
        "verified": args.uploads - len(failures),
        "failures": failures,
        "envoy_peak_rss_mib": rss.peak_envoy / MiB,
        "host_peak_rss_mib": rss.peak_host / MiB if stack.runs_host else None,
        "cpu_seconds": cpu.seconds,
        "cpu_cores": cpu.cores(),
        "cpu_s_per_gib": (cpu.seconds.get("envoy", 0.0) + cpu.seconds.get("host", 0.0)) / (size * args.uploads / 2**30),
        "extproc_msgs_per_upload": (extproc_messages(stack) - msgs_before) / args.uploads if stack.runs_host else None,
        # [seconds, Envoy MiB, host MiB] every 100 ms: peaks are noisy, the series shows why.
        "rss_series": [[round(x.t, 2), round(x.envoy / MiB), round(x.host / MiB)] for x in rss.samples],
    }


def wrk_command(wrk: str, url: str, seconds: int, args: argparse.Namespace, script: Path = WRK_SCRIPT) -> list[str]:
    """wrk with ``args``' threads and connections for ``seconds``, running ``script``."""
    return [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]


def wrk_summary(command: list[str], env: dict[str, str], seconds: float) -> tuple[dict[str, Any], str]:
    """Run ``command`` (a wrk of ``seconds``): the ``WRK_RESULT`` its script prints, and its output."""
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise WorkloadError(f"wrk failed (exit {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    summary: dict[str, Any] = json.loads(lines[-1].removeprefix("WRK_RESULT "))
    return summary, proc.stdout


def run_wrk(stack: Stack, wrk: str, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """``small-fd`` or ``small-headers``: wrk POSTs after ``args.warmup`` seconds of the same."""
    (url,) = (stack.url + path for path in WORKLOAD_PATHS[workload])
    env = {**os.environ, "WRK_BODY_BYTES": str(args.body_bytes)}
    if args.warmup > 0:
        subprocess.run(wrk_command(wrk, url, args.warmup, args), env=env, capture_output=True, timeout=args.warmup + 60)
    msgs_before = extproc_messages(stack)
    with stack.sampler(0.1) as rss, CpuMeter(stack) as cpu:
        summary, output = wrk_summary(wrk_command(wrk, url, args.duration, args), env, args.duration)
    seconds = summary["duration_us"] / 1e6
    errors = {k: v for k, v in summary["errors"].items() if v}
    key = "fd_rps" if workload == "small-fd" else "headers_rps"
    requests = summary["requests"] or 1
    per_request: dict[str, float | None] = {}
    if workload == "small-fd":
        per_request["fd_cpu_ms_per_request"] = (
            1000 * (cpu.seconds.get("envoy", 0.0) + cpu.seconds.get("host", 0.0)) / requests
        )
        if stack.runs_host:
            per_request["fd_extproc_msgs_per_request"] = (extproc_messages(stack) - msgs_before) / requests
    if stack.runs_host:
        per_request[SERVER_CPU_KEYS[workload]] = cpu.per_request_us("host", requests)
    return {
        **per_request,
        key: summary["requests"] / seconds,
        "requests": summary["requests"],
        "duration_s": round(seconds, 3),
        "errors": errors,
        "failures": [f"{workload}: wrk errors {errors} in {summary['requests']} requests"] if errors else [],
        "latency_ms": {k: round(v / 1000, 2) for k, v in summary["latency_us"].items()},
        "envoy_peak_rss_mib": rss.peak_envoy / MiB,
        "host_peak_rss_mib": rss.peak_host / MiB if stack.runs_host else None,
        "cpu_seconds": cpu.seconds,
        "cpu_cores": cpu.cores(),
        "wrk_output": output.strip(),
    }


def upload_file(directory: Path, size: int) -> Body:
    """The file the uploads send: ``size`` pseudo-random bytes (fixed seed) with its SHA-256."""
    return generate_body(directory / f"upload-{size}.bin", size)
