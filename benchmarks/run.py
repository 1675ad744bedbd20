"""Side-by-side benchmark: Envoy alone, Envoy + a minimal Python passthrough, Envoy + extproc-host.

    .venv/bin/python benchmarks/run.py                  # 3 runs of everything (about 15 minutes)
    .venv/bin/python benchmarks/run.py --runs 1 --size-mib 8 --uploads 2 --duration 3 --latency-duration 2  # quick
    make bench ARGS="--only upload --setups minimal,host"
    make bench-plugins                                  # host vs host + file_tee / zstd / replace
    make bench-workers                                  # host with 1 worker vs --workers 2
    make bench ARGS="--baseline main --setups host"     # this checkout's host vs main's, same load

Setups (:mod:`setups`; each on its own fresh stack of echo upstream + ext_proc server + Envoy,
ephemeral ports):
  direct   envoy/direct.yaml: no ext_proc filter, Envoy -> echo.
  minimal  envoy/full_duplex.yaml -> benchmarks/minimal_passthrough.py (the baseline).
  host     envoy/full_duplex.yaml -> extproc-host --config benchmarks/passthrough.toml.
  NAME     (--plugin NAME=CONFIG, repeatable) envoy/full_duplex.yaml -> extproc-host --config
           CONFIG: a plugin setup, compared with `host` in a table of its own. What the config's
           chains use decides what the benchmark provides (see HostSetup): file_tee gets a
           fresh tee directory per stack, replace gets the upload file as its response_file.
  base     (--baseline REV) the host setup served by git revision REV's code (host/, plugins/),
           compared with `host`: what a change costs or saves, in one run.
  host-wN  (--host-workers N, comma-separated) the host setup's config run with --workers N,
           compared with `host`. Envoy keeps one HTTP/2 connection per worker thread to a
           cluster, and SO_REUSEPORT spreads connections, not streams: with --host-workers every
           host setup (`host` included) gets an ext_proc cluster limited to
           WORKER_STREAMS_PER_CONNECTION streams per connection, so Envoy opens several.

Workloads (:mod:`workloads`, :mod:`latency`):
  upload         N concurrent curl uploads of one file to /full-duplex-streamed, echoed back and
                 checked by SHA-256; aggregate MiB/s, Envoy and host peak RSS (psutil, 100 ms).
  small-fd       wrk POSTs of a 1 KiB body to /full-duplex-streamed (headers + FD bodies): req/s,
                 ext_proc server CPU per request.
  small-headers  the same to /headers-only (the ext_proc server sees headers only).
  latency        open loop: 1 KiB POSTs to /full-duplex-streamed, then to /headers-only, started
                 at Poisson arrival times at each --rates rate; p50/p99 from the scheduled start.

Within a run every setup does every workload; the setup order rotates from run to run so that
machine noise falls on all of them alike. The report (:mod:`report`) gives medians across runs
with min-max.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, ROOT, WORKLOADS, MiB, console
from extproc_host.stack import Stack, StackError
from extproc_host.stack.demo_model import Body
from latency import run_latency
from measure import directory_usage
from report import (
    METRICS,
    describe,
    latency_metrics,
    machine_info,
    plugin_ratios,
    ratios,
    report,
    summarize,
    targets,
    write_results,
)
from setups import (
    SETUPS,
    WORKER_STREAMS_PER_CONNECTION,
    HostSetup,
    extract_revision,
    generate_envoy_configs,
    make_stack,
)
from workloads import check_stack, find_wrk, run_upload, run_wrk, upload_file

# Workloads that need wrk.
WRK_WORKLOADS = ("small-fd", "small-headers")


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        bad = [name for name in names if name not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {text!r}")
        return names

    return parse


def _rates(text: str) -> list[int]:
    try:
        rates = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        rates = []
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"expected positive requests per second, comma-separated, got {text!r}")
    return rates


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, with the host setups loaded from their settings files."""
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
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of unmeasured load before each wrk or latency measurement (0: none)",
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--body-bytes", type=int, default=1024, help="wrk and latency request body size")
    parser.add_argument("--rates", type=_rates, default=[200, 800], help="latency: offered requests/s, comma-separated")
    parser.add_argument(
        "--latency-duration", type=float, default=5.0, help="latency: seconds of Poisson arrivals per route and rate"
    )
    parser.add_argument(
        "--latency-max-requests",
        type=int,
        default=20_000,
        help="latency: at most this many requests per route and rate",
    )
    parser.add_argument(
        "--latency-connections", type=int, default=64, help="latency: the client's pool of keep-alive connections"
    )
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
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="add a setup `base`: the host setup served by git revision REV's code, compared with `host`",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--no-install", action="store_true", help="do not try to apt-get install wrk when it is missing"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.uploads < 1 or args.duration < 1 or args.size_mib <= 0:
        parser.error("--runs, --uploads, --duration and --size-mib must be positive")
    if args.latency_duration <= 0 or args.latency_max_requests < 1 or args.latency_connections < 1:
        parser.error("--latency-duration, --latency-max-requests and --latency-connections must be positive")
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
            args.host_setups[name] = dataclasses.replace(base, name=name, workers=int(text))
            args.setups.append(name)
    if args.baseline:
        args.host_setups["base"] = dataclasses.replace(args.host_setups["host"], name="base")
        args.setups.append("base")
    args.split_connections = bool(args.host_workers.strip())
    args.plugin_setups = [name for name in args.setups if name not in SETUPS]
    if args.plugin_setups and "host" not in args.setups:
        console.print("[yellow]no `host` in --setups: the plugin setups' ratio table stays empty[/yellow]")
    return args


def run_all(args: argparse.Namespace, wrk: str | None, upload: Body | None) -> list[dict[str, Any]]:
    """Every run: every setup on a fresh stack, in an order that rotates from run to run."""
    workloads = [w for w in args.only if w not in WRK_WORKLOADS or wrk]
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
                    stack = make_stack(
                        setup,
                        host,
                        envoy_concurrency=args.envoy_concurrency,
                        split_connections=args.split_connections,
                        upload_file=upload.path if upload else None,
                        tee_dir=tee_dir,
                    )
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


def run_workload(
    stack: Stack, workload: str, args: argparse.Namespace, wrk: str | None, upload: Body | None
) -> dict[str, Any]:
    """One workload's figures on a running stack."""
    if workload == "upload":
        assert upload is not None
        return run_upload(stack, upload, args)
    if workload == "latency":
        return run_latency(stack, args)
    assert wrk is not None
    return run_wrk(stack, wrk, workload, args)


def run_setup(
    stack: Stack,
    setup: str,
    host: HostSetup | None,
    workloads: list[str],
    run: dict[str, Any],
    label: str,
    args: argparse.Namespace,
    wrk: str | None,
    upload: Body | None,
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
            result = run_workload(stack, workload, args, wrk, upload)
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
        console.print(f"{label} {workload:<13} {describe(workload, result)}{status}", soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report, write the JSON results; 1 when anything failed."""
    args = parse_args(argv)
    started = dt.datetime.now().astimezone()
    if shutil.which("curl") is None and "upload" in args.only:
        console.print("[red]curl is needed for the upload workload: apt-get install -y curl[/red]")
        return 2
    wrk = None
    if any(w in WRK_WORKLOADS for w in args.only):
        wrk = find_wrk(allow_install=not args.no_install)
        if wrk is None:
            console.print(
                "[yellow]wrk is not installed: skipping small-fd and small-headers. "
                "Install it with: apt-get install -y wrk[/yellow]"
            )
    runnable = [w for w in args.only if w not in WRK_WORKLOADS or wrk]
    if not runnable:
        console.print("[red]nothing to run: every chosen workload needs wrk[/red]")
        return 2
    info = machine_info(wrk)
    size = int(args.size_mib * MiB)
    console.print(
        f"setups {', '.join(args.setups)}; workloads {', '.join(runnable)}; "
        f"{args.runs} run(s); upload {args.uploads} x {size / MiB:.1f} MiB; "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s {args.body_bytes} B POST; "
        f"Envoy --concurrency {args.envoy_concurrency}; {info['cpus']} CPUs, load {info['load_average_at_start'][0]:.2f}",
        soft_wrap=True,
    )
    if "latency" in runnable:
        console.print(
            f"  latency: open loop, Poisson arrivals at {', '.join(map(str, args.rates))} req/s, "
            f"{args.latency_duration:g} s per route and rate, {args.body_bytes} B POST, "
            f"{args.latency_connections} keep-alive connections",
            soft_wrap=True,
        )
    used_hosts = {name: host for name, host in args.host_setups.items() if name in args.setups}
    for name, host in used_hosts.items():
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
        needs_file = "upload" in args.only or any(h.replaces_with_upload for h in used_hosts.values())
        upload = upload_file(tmp, size) if needs_file else None
        if args.generate_envoy:
            generate_envoy_configs(used_hosts, tmp)
        if args.baseline:
            used_hosts["base"].code = extract_revision(args.baseline, tmp / "baseline")
        runs = run_all(args, wrk, upload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    metrics = (*METRICS, *latency_metrics(args.rates))
    summary = summarize(runs, args.setups, metrics)
    ratio = ratios(summary, metrics)
    verdicts = targets(ratio)
    plugin_ratio = plugin_ratios(summary, args.plugin_setups, metrics)
    console.print()
    report(args, runs, summary, ratio, verdicts, plugin_ratio, metrics)
    errors = [e for run in runs for e in run["errors"]]
    for error in errors:
        console.print(f"[red]error: {error}[/red]")

    info["load_average_at_end"] = os.getloadavg()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "host_setups"},
        "host_setups": {name: host.describe() for name, host in used_hosts.items()},
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
    write_results(results, paths)
    console.print(f"raw results: {', '.join(str(p) for p in paths)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
