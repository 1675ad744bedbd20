"""What a workload measures besides its own figures: CPU time per process, Envoy's ext_proc
message counter, and what file_tee wrote."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import psutil

from extproc_host.stack import Stack


class CpuMeter:
    """CPU seconds used by Envoy, the ext_proc server (with children), the echo upstream and the
    client side (curl or wrk processes plus this process: hashing threads, the latency client)
    over a workload."""

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
        self.seconds = {role: round(end[role] - self.start.get(role, 0.0), 6) for role in end}

    def cores(self) -> dict[str, float]:
        """Average cores busy per role over the workload."""
        return {role: round(sec / self.wall, 2) for role, sec in self.seconds.items()} if self.wall else {}

    def per_request_us(self, role: str, requests: int) -> float | None:
        """Microseconds of CPU ``role`` used per request (None when it did not run or nothing
        was served)."""
        if role not in self.seconds or requests <= 0:
            return None
        return 1e6 * self.seconds[role] / requests


def extproc_messages(stack: Stack) -> int:
    """Messages Envoy's ext_proc filter has sent the ext_proc server so far (0 without one)."""
    return sum(stack.envoy_stats(r"ext_proc\.stream_msgs_sent$").values())


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
