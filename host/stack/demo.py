"""``extproc-host demo``: the Go proof of concept's experiment as one command.

N concurrent uploads (default 10) of one file (default a generated 70 MiB file) go through a
real Envoy to the echo upstream and back, first through the host in FULL_DUPLEX_STREAMED, then
in STREAMED, then through Envoy alone (no ext_proc) as the reference. Each mode gets a fresh
stack (:class:`~extproc_host.stack.Stack`: Envoy, echo, host on free ports), so its memory
figures are its own. While the uploads run, Envoy's and the host's RSS are sampled every 0.1 s.
Every echoed body is hashed as it streams back and compared with the file's sha256; the copies
file_tee makes on the full-duplex route (the demo settings shipped with the package, the same as
config/full_duplex.toml) go to a temporary directory
and are checked too. :mod:`extproc_host.stack.demo_report` prints the table and writes the chart and
the raw samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from .demo_model import CHUNK, MODES, Body, DemoOptions, MiB, Mode, ModeResult, Upload
from .runner import Stack, StackError


def generate_body(path: Path, size: int, seed: int = 7) -> Body:
    """Write ``size`` pseudo-random bytes (fixed seed) to ``path``; return it with its sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            block = rng.randbytes(min(CHUNK, left))
            fh.write(block)
            digest.update(block)
            left -= len(block)
    return Body(path, size, digest.hexdigest(), generated=True)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path) -> Body:
    """The user's own file (``--file``) with its size and sha256."""
    return Body(path, path.stat().st_size, sha256_file(path))


async def _file_blocks(path: Path) -> AsyncIterator[bytes]:
    # An async generator rather than aiohttp's file payload, which stalls when the response
    # streams back during the upload, as the echo's does (aio-libs/aiohttp#10169).
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            yield block


async def upload(session: aiohttp.ClientSession, url: str, body: Body, on_bytes: Callable[[int], None]) -> Upload:
    """POST the file to ``url`` with its content-length, hashing the echo as it arrives
    (never holding it); ``on_bytes(n)`` is called for every piece received."""
    digest, result = hashlib.sha256(), Upload()
    headers = {"content-type": "application/octet-stream", "content-length": str(body.size)}
    try:
        async with session.post(url, data=_file_blocks(body.path), headers=headers) as resp:
            result.status = resp.status
            async for block in resp.content.iter_chunked(CHUNK):
                digest.update(block)
                result.received += len(block)
                on_bytes(len(block))
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.verified = result.received == body.size and digest.hexdigest() == body.sha256
    return result


async def _uploads(url: str, body: Body, concurrency: int, progress: Progress, label: str) -> list[Upload]:
    total = progress.add_task(f"{label}: {concurrency} x {body.size / MiB:.1f} MiB", total=concurrency * body.size)
    bars = [progress.add_task(f"  upload {i + 1}", total=body.size) for i in range(concurrency)]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False) as session:

        def advance(bar: TaskID) -> Callable[[int], None]:
            def on_bytes(n: int) -> None:
                progress.advance(bar, n)
                progress.advance(total, n)

            return on_bytes

        results = await asyncio.gather(*(upload(session, url, body, advance(bar)) for bar in bars))
    for bar in bars:
        progress.remove_task(bar)
    return list(results)


class MiBPerSecondColumn(ProgressColumn):
    """A progress bar's speed in MiB/s, the table's unit (rich's own column shows MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed / MiB:.1f} MiB/s", style="progress.data.speed")


@contextlib.contextmanager
def _blocked_signals() -> Iterator[None]:
    """SIGINT and SIGTERM held back (not lost) while the stack stops, so a second Ctrl-C
    cannot cut the stop short and leave a process behind."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def running_stack(mode: Mode, tee_dir: Path | None) -> Iterator[Stack]:
    """A fresh stack for ``mode``, stopped on the way out whatever happens (Ctrl-C included)."""
    env = {"EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": str(tee_dir)} if tee_dir is not None else {}
    stack = Stack(None, mode.host_config, host_env=env, start=False)
    try:
        stack.start()
        yield stack
    finally:
        with _blocked_signals():
            stack.stop()


def check_copies(tee_dir: Path, body: Body) -> tuple[int, int]:
    """(copies found, copies identical to the body) among file_tee's files in ``tee_dir``."""
    copies = [p for p in tee_dir.iterdir() if p.is_file() and not p.name.startswith(".")] if tee_dir.is_dir() else []
    return len(copies), sum(1 for p in copies if p.stat().st_size == body.size and sha256_file(p) == body.sha256)


def run_mode(mode: Mode, body: Body, concurrency: int, copies: Path, console: Console, keep_copies: bool) -> ModeResult:
    """Start a stack for ``mode``, run the N uploads while sampling RSS, check bodies and the
    copies file_tee writes under ``copies`` (deleted once checked unless ``keep_copies``)."""
    tee_dir = copies / f"tee-{mode.key}" if mode.tees else None
    if tee_dir is not None:
        tee_dir.mkdir(parents=True, exist_ok=True)
    what = "Envoy and echo" if mode.host_config is None else "Envoy, echo and extproc-host"
    console.print(f"[bold]{mode.label}[/]: starting {what} on free ports...")
    with running_stack(mode, tee_dir) as stack:
        pids = ", ".join(f"{name} {pid}" for name, pid in stack.pids.items())
        console.print(f"  Envoy on {stack.url}{mode.path} (pids: {pids})")
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            MiBPerSecondColumn(),
            console=console,
            transient=not console.is_terminal,
        )
        with progress, stack.sampler(0.1) as rss:
            start = time.perf_counter()
            uploads = asyncio.run(_uploads(stack.url + mode.path, body, concurrency, progress, mode.label))
            wall = time.perf_counter() - start
    result = ModeResult(mode, concurrency, body.size, wall, uploads, list(rss.samples), rss.peak_envoy, rss.peak_host)
    for failed in (u for u in uploads if u.error):
        console.print(f"[red]{mode.label}: an upload failed: {failed.error}[/]")
    if tee_dir is not None:
        result.copies_expected = 2 * concurrency  # request and response body of each upload
        result.copies, result.copies_verified = check_copies(tee_dir, body)
        if keep_copies:
            console.print(f"file_tee's copies kept in {tee_dir}")
        else:
            for path in tee_dir.iterdir():
                path.unlink(missing_ok=True)
    return result


def default_results_dir() -> Path:
    """``demo-results/<UTC timestamp>`` under the working directory."""
    return Path("demo-results") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def keep_running(body: Body, tee_dir: Path, console: Console) -> None:
    """Leave a full-duplex stack up and print curl commands to try it by hand, until Ctrl-C."""
    mode = MODES["full-duplex"]
    with running_stack(mode, tee_dir) as stack:
        console.print(
            f"\n[bold]The stack is running[/] (Envoy {stack.url}, admin {stack.admin_url}, "
            f"pids {stack.pids}); file_tee copies go to {tee_dir}. Try:\n"
        )
        console.print(f"  sha256sum {body.path}", soft_wrap=True, highlight=False)
        for route in ("full-duplex-streamed", "streamed"):
            console.print(
                f"  for i in $(seq 10); do curl -s --data-binary @{body.path} {stack.url}/{route} | sha256sum & done; wait",
                soft_wrap=True,
                highlight=False,
            )
        console.print(f"  curl -s '{stack.admin_url}/stats?filter=ext_proc'", soft_wrap=True, highlight=False)
        console.print("\nCtrl-C stops Envoy, the host and the echo upstream.")
        while True:
            signal.pause()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo; returns 0 when every body (and every file_tee copy) came back exact."""
    from .demo_report import PLAIN_WIDTH, print_table, write_results

    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=PLAIN_WIDTH)
    # Ctrl-C and SIGTERM stop the stacks. SIGINT explicitly: a shell starting the demo in the
    # background (`make demo &`) hands it SIGINT ignored.
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="extproc-demo-") as tmp:
            work = Path(tmp)
            if options.file is not None:
                body = describe_file(options.file)
            else:
                with console.status(f"writing a {options.size_mib} MiB file..."):
                    body = generate_body(work / f"body-{options.size_mib}MiB.bin", options.size_mib * MiB)
            console.print(
                f"[bold]extproc-host demo[/]: {options.concurrency} concurrent uploads of {body.path.name} "
                f"({body.size / MiB:.1f} MiB, sha256 {body.sha256[:16]}...), each echoed back and checked",
                soft_wrap=True,
            )
            if "full-duplex" in options.modes:
                console.print(
                    "The FULL_DUPLEX_STREAMED route runs file_tee (the demo settings, config/full_duplex.toml): both bodies of "
                    "every upload are copied to files, which are checked too, then deleted.",
                    soft_wrap=True,
                )
            out = options.results or default_results_dir()
            copies = out if options.keep_copies else work
            try:
                results = [
                    run_mode(MODES[key], body, options.concurrency, copies, console, options.keep_copies)
                    for key in options.modes
                ]
            except StackError as exc:
                console.print(f"[red]the stack did not start:[/] {exc}", highlight=False)
                return 1
            print_table(results, console)
            written = write_results(results, body, out)
            console.print(
                f"chart {written['chart']}, raw samples {written['samples']}", soft_wrap=True, highlight=False
            )
            ok = all(r.ok for r in results)
            console.print(
                "[green]every body came back byte for byte[/]" if ok else "[red]some bodies did not come back intact[/]"
            )
            if options.keep_running:
                tee_dir = work / "tee-keep-running"
                tee_dir.mkdir()
                keep_running(body, tee_dir, console)
            return 0 if ok else 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_modes(text: str) -> list[str]:
    """``--modes full-duplex,streamed,direct`` as a list; ValueError naming an unknown mode."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODES]
    if unknown or not keys:
        raise ValueError(f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    return keys


__all__ = ["MODES", "DemoOptions", "ModeResult", "generate_body", "parse_modes", "run", "sha256_file"]
