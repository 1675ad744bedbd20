"""Observe-only routes against full-duplex routes, and Envoy-side memory settings, side by side.

N concurrent uploads (default 10 x 70 MiB) go through a real Envoy to the echo upstream and
back, on fresh stacks, in these setups (alternating over ``--runs``):

- ``direct``: Envoy alone, no ext_proc;
- ``fd``: file_tee in the data path (body_mode FULL_DUPLEX_STREAMED);
- ``observe``: file_tee alone, which only observes: Envoy's observability mode;
- ``fd-slow`` / ``observe-slow``: the same with a slow observer before file_tee (a plugin
  sleeping ``--delay-ms`` on every chunk);
- ``fd-window``, ``fd-window-listener``: ``fd`` with Envoy-side memory settings in the generated
  config (a 64 KiB HTTP/2 stream window and buffer limit on the ext_proc cluster; and a 64 KiB
  buffer limit on the listener too);
- ``fd-arena2``: ``fd`` with the host's glibc limited to two malloc arenas; ``fd-rwin2m`` with
  a 2 MiB receive window per stream (``[server] stream_window_bytes``), and both.

For each: aggregate client MiB/s, Envoy's and the host's peak RSS, and how many of file_tee's
copies are complete (``.body``, sha256 checked) or cut short (``.partial``: the part of an
exchange the host had not taken when Envoy's deferred-close timeout ended the side stream).

    python benchmarks/observe.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from extproc_host.stack import Stack
from extproc_host.stack.demo import check_copies, generate_body, upload
from extproc_host.stack.demo_model import Body, MiB

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("direct", "fd", "observe", "fd-slow", "observe-slow")
SMALL = "65536"
#: extra setups: (like, envoy-config options, host environment)
VARIANTS: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "fd-window": ("fd", ("--extproc-window", SMALL, "--extproc-buffer-limit", SMALL), {}),
    "fd-window-listener": (
        "fd",
        ("--extproc-window", SMALL, "--extproc-buffer-limit", SMALL, "--listener-buffer-limit", SMALL),
        {},
    ),
    "fd-arena2": ("fd", (), {"MALLOC_ARENA_MAX": "2"}),
    "fd-rwin2m": ("fd", (), {"EXTPROC_SERVER__STREAM_WINDOW_BYTES": "2097152"}),
    "fd-rwin2m-arena2": ("fd", (), {"EXTPROC_SERVER__STREAM_WINDOW_BYTES": "2097152", "MALLOC_ARENA_MAX": "2"}),
}


def settings_for(setup: str, tee: Path, delay_ms: float) -> str:
    chain = '["slow_watch", "file_tee"]' if setup.endswith("-slow") else '["file_tee"]'
    mode = 'body_mode = "FULL_DUPLEX_STREAMED"' if setup.startswith("fd") else ""
    return f"""
[server]
plugin_modules = ["benchmarks.observe_plugins"]

[plugins.file_tee]
directory = "{tee}"
request = true
response = true

[plugins.slow_watch]
delay_ms = {delay_ms}

[routes.default]
chain = {chain}
{mode}
"""


async def uploads(url: str, body: Body, n: int) -> list[bool]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        done = await asyncio.gather(*(upload(session, url, body, lambda _n: None) for _ in range(n)))
    return [u.verified and u.status == 200 for u in done]


def run_setup(setup: str, body: Body, n: int, delay_ms: float, work: Path) -> dict[str, float]:
    like, options, env = VARIANTS.get(setup, (setup, (), {}))
    tee = work / f"tee-{setup}"
    tee.mkdir(parents=True, exist_ok=True)
    settings = work / f"{setup}.toml"
    settings.write_text(settings_for(like, tee, delay_ms))
    host = None if like == "direct" else settings
    envoy: Path | None = None
    if options:
        envoy = work / f"{setup}.yaml"
        command = [str(Path(sys.executable).with_name("extproc-host")), "envoy-config", "--config", str(settings)]
        subprocess.run([*command, *options, "-o", str(envoy)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    host_env = {"PYTHONPATH": str(ROOT), **env}
    with Stack(envoy, host, host_env=host_env) as stack, stack.sampler(0.05) as rss:
        start = time.perf_counter()
        ok = asyncio.run(uploads(stack.url + "/upload", body, n))
        wall = time.perf_counter() - start
        if host is not None:  # the host may still be taking what Envoy holds for it
            deadline = time.monotonic() + 60
            while any(p.name.startswith(".") for p in tee.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.1)
            settle = time.perf_counter() - start
    complete, verified = check_copies(tee, body)
    partial = sum(1 for p in tee.iterdir() if p.name.endswith(".partial"))
    for p in tee.iterdir():
        p.unlink()
    return {
        "MiB/s": n * body.size / MiB / wall,
        "bodies ok": sum(ok),
        "Envoy peak MiB": rss.peak_envoy / MiB,
        "host peak MiB": rss.peak_host / MiB if host else 0.0,
        "copies ok": verified if host else 0,
        "copies partial": partial,
        "host done s": settle if host else wall,
        "client s": wall,
        "_complete": complete,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="concurrent uploads (default 10)")
    parser.add_argument("--size-mib", type=int, default=70)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the slow observer's sleep per chunk")
    parser.add_argument("--setups", default=",".join(SETUPS))
    args = parser.parse_args()
    setups = args.setups.split(",")
    results: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
    with tempfile.TemporaryDirectory(prefix="observe-bench-") as tmp:
        work = Path(tmp)
        body = generate_body(work / "body.bin", args.size_mib * MiB)
        for run in range(args.runs):
            for setup in setups:
                results[setup].append(run_setup(setup, body, args.n, args.delay_ms, work))
                print(f"run {run + 1} {setup}: {results[setup][-1]}", file=sys.stderr, flush=True)
    keys = [k for k in results[setups[0]][0] if not k.startswith("_")]
    print(
        f"\n{args.n} x {args.size_mib} MiB uploads, medians of {args.runs} runs (min-max), slow observer {args.delay_ms:g} ms/chunk"
    )
    print("| setup | " + " | ".join(keys) + " |")
    print("| --- " * (len(keys) + 1) + "|")
    for setup in setups:
        cells = []
        for key in keys:
            values = [r[key] for r in results[setup]]
            med = statistics.median(values)
            cells.append(f"{med:.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{med:.1f}")
        print(f"| {setup} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
