"""``extproc-host demo``: a live run of Envoy + echo upstream + host, one upload per body mode.

Starts the stack from envoy/full_duplex.yaml and config/full_duplex.toml on free ports, sends
the same generated body through every route (full-duplex, streamed, buffered, headers-only)
and straight to the echo, checks each echoed body by sha256, checks the copies file_tee made of
the full-duplex route's bodies, and prints what happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from .stack import Stack

CHUNK = 1024 * 1024
ROUTES = (
    ("FULL_DUPLEX_STREAMED", "/full-duplex-streamed"),
    ("STREAMED", "/streamed"),
    ("BUFFERED", "/buffered"),
    ("headers only", "/headers-only"),
)


@dataclass
class Upload:
    """One upload's outcome."""

    mode: str
    status: int
    seconds: float
    sent: int
    received: int
    verified: bool


def write_body(path: Path, size: int, seed: int = 7) -> str:
    """Deterministic pseudo-random bytes into ``path``; returns their sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            block = rng.randbytes(min(CHUNK, left))
            fh.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


async def read_blocks(path: Path):
    """The file in 1 MiB blocks (aiohttp then sends and reads the echo at the same time)."""
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            yield block


async def upload(session: aiohttp.ClientSession, url: str, path: Path, expected: str, mode: str) -> Upload:
    """POST ``path`` to ``url`` (content-length), hash the echoed body as it streams back."""
    digest = hashlib.sha256()
    received = 0
    start = time.perf_counter()
    size = path.stat().st_size
    headers = {"content-type": "application/octet-stream", "content-length": str(size)}
    async with session.post(url, data=read_blocks(path), headers=headers) as resp:
        async for block in resp.content.iter_chunked(CHUNK):
            digest.update(block)
            received += len(block)
        status = resp.status
    seconds = time.perf_counter() - start
    return Upload(mode, status, seconds, path.stat().st_size, received, digest.hexdigest() == expected)


async def _run(stack: Stack, body: Path, expected: str) -> list[Upload]:
    results = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for mode, path in ROUTES:
            results.append(await upload(session, stack.url + path, body, expected, mode))
        results.append(await upload(session, stack.echo_url + "/", body, expected, "echo alone (no Envoy)"))
    return results


def run(size_mib: int = 16, console: Console | None = None) -> int:
    """Run the demo; returns a process exit status (0 when every body came back exact)."""
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="extproc-demo-") as tmp:
        body = Path(tmp) / "body.bin"
        expected = write_body(body, size_mib * CHUNK)
        console.print(f"[bold]extproc-host demo[/]: a {size_mib} MiB body (sha256 {expected[:16]}...)")
        tee = Path(tmp) / "tee"
        with console.status("starting echo upstream, extproc-host and Envoy..."):
            # config/full_duplex.toml tees the full-duplex route's bodies: into our temp dir here.
            stack = Stack(
                "envoy/full_duplex.yaml",
                "config/full_duplex.toml",
                host_env={"EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": str(tee)},
            )
        with stack:
            console.print(f"Envoy on {stack.url}, host pid {stack.pids['host']}, echo on {stack.echo_url}")
            with console.status("uploading through every body mode..."):
                results = asyncio.run(_run(stack, body, expected))
            envoy_rss, host_rss = stack.envoy_rss(), stack.host_rss()
        teed = sorted(tee.glob("*")) if tee.is_dir() else []
        tee_ok = [f for f in teed if not f.name.startswith(".") and _sha256(f) == expected]
    table = Table(title="one upload per route: client -> Envoy -> extproc-host -> echo -> back")
    for column in ("body mode", "HTTP", "seconds", "MiB/s", "sent", "echoed", "sha256"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.mode,
            str(r.status),
            f"{r.seconds:.2f}",
            f"{r.sent / CHUNK / r.seconds:.0f}",
            f"{r.sent:,}",
            f"{r.received:,}",
            "[green]match[/]" if r.verified else "[red]MISMATCH[/]",
        )
    console.print(table)
    console.print(f"RSS after the run: Envoy {envoy_rss / CHUNK:.0f} MiB, host {host_rss / CHUNK:.0f} MiB")
    console.print(
        f"file_tee copied the full-duplex route's bodies to {len(teed)} files, "
        f"{len(tee_ok)} identical to the uploaded body: {', '.join(f.name for f in teed) or '(none)'}"
    )
    ok = all(r.verified and r.status == 200 for r in results) and len(teed) == 2 and len(tee_ok) == 2
    console.print("[green]every body came back byte for byte[/]" if ok else "[red]some bodies did not come back intact[/]")
    return 0 if ok else 1
