"""Mixed traffic: what taking bodies only where a plugin needs them saves, side by side.

wrk sends POSTs through a real Envoy (config generated from each setup's settings) to the echo
upstream: 1 in ``--every`` (default 10) is JSON, the rest octet-stream (``benchmarks/mixed.lua``),
in each mix of ``--mix NAME=JSON_BYTES/OTHER_BYTES`` (default: ``api=1024/1024``, small requests
alike, and ``uploads=1024/1048576``, JSON calls among 1 MiB uploads). Setups, each on a fresh stack,
alternating over ``--runs``:

- ``json-override``: examples/extproc-jsonguard on a route with ``allow_mode_override``: for a
  non-JSON request the host answers the request headers with a mode override and Envoy never
  sends it the body; a JSON body comes whole (BUFFERED) and is parsed;
- ``json-every-body``: the same plugin without mode overrides: Envoy sends every body (BUFFERED),
  the host passes the ones it does not need through untouched;
- ``stream-every-body``: a plugin that streams every request body (FULL_DUPLEX_STREAMED), the
  usual route of a chain that touches request bodies.

Figures per mix and setup, medians with min-max: requests/s, the host's CPU per request,
Envoy's, both, and ext_proc messages per request; then the ratios to ``stream-every-body``.
Target (``uploads``): the host's CPU per request on ``json-override`` at most a third of
``stream-every-body``'s. What a skipped body saves grows with its size: every request still
costs the host a gRPC stream and its header message, which at 1 KiB (``api``) cost as much
as streaming the body too (Envoy pipelines a small full-duplex body with its headers).

    python benchmarks/mixed.py --runs 3                      # what make bench runs
    python benchmarks/mixed.py --runs 1 --duration 3 --mix big=1024/1048576
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from extproc_host.stack import Stack
from measure import CpuMeter, extproc_messages
from workloads import find_wrk, wrk_command, wrk_summary

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mixed.lua"
JSONGUARD = ROOT / "examples" / "extproc-jsonguard" / "src"

COMMON = """
[server]
plugin_modules = ["extproc_jsonguard", "benchmarks.mixed_plugins"]
"""
SETTINGS = {
    "json-override": '[routes.default]\nchain = ["jsonguard"]\nallow_mode_override = true\nbuffer_limit_bytes = 16777216\n',
    "json-every-body": '[routes.default]\nchain = ["jsonguard"]\nbuffer_limit_bytes = 16777216\n',
    "stream-every-body": '[routes.default]\nchain = ["request_bytes"]\n',
}
SETUPS = tuple(SETTINGS)
BASE = "stream-every-body"
#: Figures: (key, label, format).
FIGURES = (
    ("rps", "requests/s", "{:.0f}"),
    ("host_us", "host CPU us/req", "{:.0f}"),
    ("envoy_us", "Envoy CPU us/req", "{:.0f}"),
    ("both_us", "Envoy+host CPU us/req", "{:.0f}"),
    ("msgs", "ext_proc msgs/req", "{:.2f}"),
)


#: A mix: its name, the JSON requests' body size, the others' body size.
Mix = tuple[str, int, int]


def parse_mix(text: str) -> Mix:
    """``NAME=JSON_BYTES/OTHER_BYTES`` as (name, JSON body size, other body size)."""
    name, _, sizes = text.partition("=")
    json_bytes, _, other_bytes = sizes.partition("/")
    try:
        mix = (name.strip(), int(json_bytes), int(other_bytes))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON_BYTES/OTHER_BYTES, got {text!r}") from None
    if not mix[0] or mix[1] < 16 or mix[2] < 1:
        raise argparse.ArgumentTypeError(f"expected a name and sizes (JSON at least 16 bytes), got {text!r}")
    return mix


def wrk_run(wrk: str, url: str, args: argparse.Namespace, mix: Mix, seconds: int) -> dict[str, Any]:
    """wrk sending ``mix`` (mixed.lua) for ``seconds``: its summary."""
    _, json_bytes, other_bytes = mix
    env = {
        **os.environ,
        "MIXED_JSON_BYTES": str(json_bytes),
        "MIXED_BODY_BYTES": str(other_bytes),
        "MIXED_EVERY": str(args.every),
    }
    return wrk_summary(wrk_command(wrk, url, seconds, args, SCRIPT), env, seconds)[0]


def run_setup(setup: str, wrk: str, args: argparse.Namespace, mix: Mix, work: Path) -> dict[str, Any]:
    """One setup on a fresh stack: a warm-up, then the measured wrk run."""
    settings = work / f"{setup}.toml"
    settings.write_text(COMMON + SETTINGS[setup])
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(JSONGUARD)])}
    with Stack(None, settings, host_env=env, concurrency=args.envoy_concurrency) as stack:
        check = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
             "--data-binary", '{"ok": true}', stack.url + "/"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if check.stdout != "200":
            raise RuntimeError(f"{setup}: a JSON POST got {check.stdout}\n{stack.log_tails(20)}")
        if args.warmup:
            wrk_run(wrk, stack.url + "/", args, mix, args.warmup)
        time.sleep(0.5)
        messages = extproc_messages(stack)
        with CpuMeter(stack) as cpu:
            summary = wrk_run(wrk, stack.url + "/", args, mix, args.duration)
        messages = extproc_messages(stack) - messages
    requests = summary["requests"] or 1
    errors = {k: v for k, v in summary["errors"].items() if v}
    host = cpu.seconds.get("host", 0.0)
    envoy = cpu.seconds.get("envoy", 0.0)
    return {
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "host_us": 1e6 * host / requests,
        "envoy_us": 1e6 * envoy / requests,
        "both_us": 1e6 * (host + envoy) / requests,
        "msgs": messages / requests,
        "requests": summary["requests"],
        "errors": errors,
    }


def stat(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def report(
    name: str,
    json_bytes: int,
    other_bytes: int,
    results: dict[str, list[dict[str, Any]]],
    setups: list[str],
    args: argparse.Namespace,
) -> None:
    """One mix's table (medians, min-max) and its ratios to stream-every-body."""
    print(f"\nmix {name}: 1 in {args.every} requests JSON of {json_bytes} B, the others {other_bytes} B")
    print("| setup | " + " | ".join(label for _, label, _ in FIGURES) + " |")
    print("| --- |" + " --- |" * len(FIGURES))
    medians: dict[str, dict[str, float]] = {}
    for setup in setups:
        cells = []
        for key, _, fmt in FIGURES:
            middle, low, high = stat([r[key] for r in results[setup]])
            medians.setdefault(setup, {})[key] = middle
            cells.append(
                f"{fmt.format(middle)} ({fmt.format(low)}-{fmt.format(high)})" if args.runs > 1 else fmt.format(middle)
            )
        print(f"| {setup} | " + " | ".join(cells) + " |")
    if BASE not in medians:
        return
    for setup in setups:
        if setup != BASE:
            ratios = ", ".join(
                f"{label} {medians[setup][key] / medians[BASE][key]:.2f}x"
                for key, label, _ in FIGURES
                if medians[BASE][key]
            )
            print(f"{setup} / {BASE}: {ratios}")
    if "json-override" in medians and medians[BASE]["host_us"]:
        ratio = medians["json-override"]["host_us"] / medians[BASE]["host_us"]
        verdict = "met" if ratio <= 1 / 3 else "not met"
        print(f"json-override host CPU per request / {BASE}'s: {ratio:.2f}x (target at most 0.33x: {verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/mixed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS))
    parser.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load first")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--mix",
        type=parse_mix,
        action="append",
        metavar="NAME=JSON_BYTES/OTHER_BYTES",
        help="a mix of body sizes (repeatable; default api=1024/1024 and uploads=1024/1048576)",
    )
    parser.add_argument("--every", type=int, default=10, help="1 in EVERY requests is JSON")
    parser.add_argument("--envoy-concurrency", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not setups or any(s not in SETUPS for s in setups) or args.runs < 1 or args.every < 1:
        parser.error(f"--setups from {', '.join(SETUPS)}; --runs and --every at least 1")
    mixes = args.mix or [("api", 1024, 1024), ("uploads", 1024, 1024 * 1024)]
    wrk = find_wrk(allow_install=True)
    if wrk is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    print(
        f"mixed traffic: 1 in {args.every} requests JSON; mixes "
        + ", ".join(f"{name} (JSON {j} B, others {o} B)" for name, j, o in mixes)
        + f"; wrk -t{args.threads} -c{args.connections} -d{args.duration}s; {args.runs} run(s); "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[str, dict[str, list[dict[str, Any]]]] = {name: {s: [] for s in setups} for name, _, _ in mixes}
    failures = []
    with tempfile.TemporaryDirectory(prefix="extproc-bench-mixed-") as tmp:
        for run in range(args.runs):
            order = setups[run % len(setups) :] + setups[: run % len(setups)]
            for mix in mixes:
                for setup in order:
                    result = run_setup(setup, wrk, args, mix, Path(tmp))
                    results[mix[0]][setup].append(result)
                    if result["errors"]:
                        failures.append(f"{mix[0]} {setup} run {run + 1}: wrk errors {result['errors']}")
                    print(
                        f"run {run + 1}/{args.runs} {mix[0]:<8} {setup:<18} "
                        + "  ".join(f"{label} {fmt.format(result[key])}" for key, label, fmt in FIGURES),
                        flush=True,
                    )
    for name, json_bytes, other_bytes in mixes:
        report(name, json_bytes, other_bytes, results[name], setups, args)
    if args.json:
        plain = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"args": plain, "results": results}, indent=1))
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
