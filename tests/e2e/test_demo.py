"""`extproc-host demo` (what `make demo` runs) end to end, small: the table has a row per mode
with its figures, every body verified, the chart and samples written, and no process left
behind, after a normal run and after Ctrl-C in the middle of one.

Only processes descended from the demo process are watched (other Envoys run on this machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

ROW = re.compile(
    r"^│ (FULL_DUPLEX_STREAMED|STREAMED|Envoy alone \(no ext_proc\))\s*│\s*([\d.]+) │\s*([\d.]+) │\s*(\d+) │\s*(\d+|-) │\s*(.+?) │$",
    re.MULTILINE,
)


class Descendants:
    """Records every process descended from ``pid`` (polled in a thread) until stopped."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {}
        # Re-read while alive: a child seen between fork and exec still shows the parent's.
        self.commands: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for child in self.root.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
                    try:
                        self.commands[child.pid] = " ".join(child.cmdline())
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def alive(self) -> list[str]:
        """The recorded processes still running (psutil checks pid and start time)."""
        left = []
        for proc in self.seen.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                pass
        return left

    def names(self) -> list[str]:
        """Command lines of the recorded processes."""
        return list(self.commands.values())


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def demo() -> Iterator[Callable[[list[str]], subprocess.Popen[str]]]:
    """``demo(args)`` starts ``extproc-host demo args``; a demo still running when the test
    ends (a failed assertion) gets Ctrl-C, so it stops its stacks, and is killed if it hangs."""
    started: list[subprocess.Popen[str]] = []

    def start(args: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc_host", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_demo_table_chart_samples_and_cleanup(demo, tmp_path: Path):
    results = tmp_path / "results"
    proc = demo(["-n", "2", "--size-mib", "4", "--results", str(results)])
    watcher = Descendants(proc.pid)
    out, _ = proc.communicate(timeout=180)
    watcher.stop()
    assert proc.returncode == 0, out

    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(out)}
    assert set(rows) == {"FULL_DUPLEX_STREAMED", "STREAMED", "Envoy alone (no ext_proc)"}, out
    for mode, (wall, rate, envoy_peak, host_peak, verified) in rows.items():
        assert float(wall) > 0 and float(rate) > 0, out
        assert int(envoy_peak) > 0, out
        assert (host_peak == "-") == (mode == "Envoy alone (no ext_proc)"), out
        if host_peak != "-":
            assert int(host_peak) > 0, out
        assert verified.startswith("2/2"), out
    assert "tee copies 4/4" in rows["FULL_DUPLEX_STREAMED"][4], out
    assert "every body came back byte for byte" in out

    chart = results / "rss.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((results / "samples.json").read_text())
    assert [m["key"] for m in document["modes"]] == ["full-duplex", "streamed", "direct"]
    for mode in document["modes"]:
        assert mode["bodies_verified"] == 2 and mode["samples"], mode["key"]
        assert all(s["envoy_rss_bytes"] > 0 for s in mode["samples"][:-1]), mode["key"]
    assert document["body_bytes"] == 4 * 1024 * 1024

    # The demo ran three stacks (it prints their pids) as its children, and none is left.
    printed = [dict(re.findall(r"(echo|host|envoy) (\d+)", line)) for line in out.splitlines() if "(pids: " in line]
    assert [sorted(p) for p in printed] == [["echo", "envoy", "host"]] * 2 + [["echo", "envoy"]], out
    pids = {int(pid) for p in printed for pid in p.values()}
    assert [pid for pid in pids if _running(pid)] == []
    assert watcher.alive() == []


def test_demo_checks_a_users_file(demo, tmp_path: Path):
    own = tmp_path / "video.mp4"
    own.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # not a whole number of MiB
    results = tmp_path / "r"
    args = ["-n", "3", "--file", str(own), "--modes", "full-duplex", "--keep-copies", "--results", str(results)]
    proc = demo(args)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "video.mp4" in out and "3/3, tee copies 6/6" in out, out
    assert len(ROW.findall(out)) == 1, out
    kept = sorted(p.name for p in (results / "tee-full-duplex").iterdir())
    assert len(kept) == 6 and all(p.endswith(("-request.body", "-response.body")) for p in kept), kept
    assert own.exists()  # the user's file is never touched


def test_demo_bad_options_exit_2(demo, tmp_path: Path):
    proc = demo(["--modes", "full-duplex,sideways"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--modes" in out and "sideways" in out, out
    proc = demo(["--file", str(tmp_path / "missing.mp4")])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "missing.mp4" in out, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_leaves_no_process(demo, tmp_path: Path, sig: signal.Signals):
    # Large enough that the uploads are still running when the signal comes.
    proc = demo(["-n", "4", "--size-mib", "64", "--results", str(tmp_path / "r")])
    watcher = Descendants(proc.pid)
    deadline = time.monotonic() + 60
    while not any("envoy" in c for c in watcher.names()):
        assert proc.poll() is None and time.monotonic() < deadline, "the demo never started Envoy"
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the demo ended before it could be interrupted"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    watcher.stop()
    assert proc.returncode != 0, out
    assert watcher.alive() == [], out
    assert not (tmp_path / "r" / "rss.png").exists()


def test_keep_running_serves_the_printed_commands_until_ctrl_c(demo, tmp_path: Path):
    proc = demo(["-n", "1", "--size-mib", "1", "--modes", "direct", "--keep-running", "--results", str(tmp_path / "r")])
    watcher = Descendants(proc.pid)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C stops"):
            break
    out = "".join(lines)
    match = re.search(r"curl -s --data-binary @(\S+) (http://127\.0\.0\.1:\d+/full-duplex-streamed)", out)
    assert match, out
    body = Path(match.group(1)).read_bytes()
    request = urllib.request.Request(match.group(2), data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        echoed = response.read()
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(body).hexdigest()
    assert any("envoy" in c for c in watcher.names())
    assert watcher.alive(), "the stack should still be up"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    watcher.stop()
    assert watcher.alive() == []
    assert not Path(match.group(1)).exists()  # the generated file went with the temporary directory
