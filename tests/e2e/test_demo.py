"""`extproc-host demo` (what `make demo` runs) end to end, small: it succeeds, says what it
checked, and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.e2e


def _stack_processes() -> set[int]:
    """Pids of every Envoy, host and echo process on the machine."""
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "extproc-stack-" in cmdline or "extproc-host" in cmdline or "extproc_host" in cmdline:
            found.add(p.info["pid"])
    return found


def test_demo_runs_and_cleans_up():
    before = _stack_processes()
    proc = subprocess.run(
        [sys.executable, "-m", "extproc_host", "demo", "--size-mib", "2"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for mode in ("FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED", "headers only"):
        assert mode in out
    assert out.count("match") >= 5 and "MISMATCH" not in out
    assert "2 files, 2 identical to the uploaded body" in out
    assert "every body came back byte for byte" in out
    assert _stack_processes() - before == set()  # the demo's Envoy, host and echo are gone
