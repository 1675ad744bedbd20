"""``--workers N``: N server processes on one TCP port, so the host can use more than one core.

The supervisor (the process started by the user) checks that the port is free (picking one for
port 0), then starts N children, each running the ordinary server bound with SO_REUSEPORT: the
kernel spreads incoming connections across them. Envoy sends many streams over one HTTP/2
connection, so what is spread is connections (docs/scaling.md, on Envoy's side).

It prints ``extproc-host listening on HOST:PORT`` once every child is serving, forwards
SIGTERM and SIGINT to the children and waits for them. On SIGHUP (or when ``[server]
watch_config_seconds`` sees the settings file change) it checks the settings once and, when they
load, has every worker reload them (SIGHUP); when they do not, the workers keep theirs. It restarts nothing: a child that dies
unexpectedly makes the supervisor stop the others and exit 1, so whatever runs the host
(systemd, Kubernetes) restarts it as a whole. On Linux the children get SIGTERM if the
supervisor dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from .errors import ConfigError
from .listeners import ListenAddress, parse_address
from .logs import announce
from .registry import load_host
from .reload import SettingsFile

log = logging.getLogger("extproc_host.workers")

READY = b"ready\n"
_PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """A worker failed to start or died."""


def check_port_free(address: ListenAddress) -> ListenAddress:
    """Bind the address once without SO_REUSEPORT (so a port already taken, even by a group of
    reuseport sockets, is refused) and return it with the real port (for port 0). With
    SO_REUSEADDR, as the workers bind: connections of the previous run still in TIME_WAIT (Envoy
    was connected when it stopped) do not make the port look taken."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((address.host, address.port))
        port = probe.getsockname()[1]
    except OSError as exc:
        raise OSError(f"cannot listen on {address.target()}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    return address.with_port(port)


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes the child get SIGTERM when the supervisor dies (Linux), or
    None. libc and prctl are looked up here, in the parent: between fork and exec the child
    only makes the call."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before the call took effect
            os._exit(1)

    return hook


def worker_command(config: str | None, listen: str, ready_fd: int, log_level: str | None) -> list[str]:
    """The command line of one worker: the ordinary server, told to share the port."""
    cmd = [sys.executable, "-m", "extproc_host", "serve", "--listen", listen, "--ready-fd", str(ready_fd)]
    if config:
        cmd += ["--config", config]
    if log_level:
        cmd += ["--log-level", log_level]
    return cmd


class Supervisor:
    """Starts ``count`` workers on ``address`` and watches them until they have all exited."""

    def __init__(
        self,
        address: ListenAddress,
        count: int,
        *,
        config: str | None,
        log_level: str | None,
        metrics_listen: str | None = None,
        ready_timeout: float = 60.0,
        watch_seconds: float = 0.0,
    ) -> None:
        self.address = address
        self.watch_seconds = watch_seconds
        self.watched = SettingsFile(config) if config is not None and watch_seconds else None
        self.metrics_listen = metrics_listen
        self.count = count
        self.config = config
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def run(self) -> int:
        """Serve until a signal (exit 0 when every worker exited cleanly) or a worker's
        unexpected death (exit 1)."""
        self.address = check_port_free(self.address)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        signal.signal(signal.SIGHUP, self._reload)
        try:
            self._start_all()
        except WorkerError as exc:
            announce(f"extproc-host: {exc}", sys.stderr)
            self._stop_all(signal.SIGTERM)
            self._reap_all()
            return 1
        if not self.stopping:
            pids = ", ".join(str(pid) for pid in self.children)
            log.info("%d workers serving on %s (pids %s)", self.count, self.address.target(), pids)
            announce(f"extproc-host listening on {self.address.target()}")
        return self._reap_all()

    def _start_all(self) -> None:
        pipes: dict[int, int] = {}  # read end -> pid
        die_with_parent = _parent_death_signal()
        try:
            for index in range(self.count):
                if self.stopping:
                    return
                read_end, write_end = os.pipe()
                cmd = worker_command(self.config, self.address.target(), write_end, self.log_level)
                env = None
                if self.metrics_listen:
                    metrics = worker_metrics_listen(self.metrics_listen, index)
                    env = {**os.environ, "EXTPROC_SERVER__METRICS_LISTEN": metrics}
                child = subprocess.Popen(cmd, pass_fds=(write_end,), preexec_fn=die_with_parent, env=env)
                os.close(write_end)
                self.children[child.pid] = child
                pipes[read_end] = child.pid
            self._wait_ready(pipes)
        finally:
            for fd in pipes:
                os.close(fd)

    def _wait_ready(self, pipes: dict[int, int]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        waiting = dict(pipes)
        received: dict[int, bytes] = dict.fromkeys(pipes, b"")
        while waiting and not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"{len(waiting)} of {self.count} workers not ready within {self.ready_timeout:.0f}s")
            readable, _, _ = select.select(list(waiting), [], [], min(left, 0.5))
            for fd in readable:
                data = os.read(fd, 64)
                received[fd] += data
                if received[fd].startswith(READY):
                    del waiting[fd]
                elif not data:  # closed without a word: the worker exited during start-up
                    pid = waiting.pop(fd)
                    if self.stopping:
                        continue
                    code = self.children[pid].wait()
                    raise WorkerError(f"worker {pid} exited with code {code} during start-up")

    def _reload(self, _signum: int = signal.SIGHUP, _frame: object = None) -> None:
        """Check the settings once, then have every worker reload them (a reload refused here
        is refused for all, with one log line)."""
        if self.stopping:
            return
        try:
            load_host(self.config)
        except ConfigError as exc:
            log.error("reload of %s refused, the workers keep their settings:\n%s", self.config or "the settings", exc)
            return
        log.info("reloading %d workers", len(self.children))
        for child in self.children.values():
            if child.returncode is None:
                try:
                    child.send_signal(signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def _forward(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("stopping %d workers (%s)", len(self.children), signal.Signals(signum).name)
        self._stop_all(signum)

    def _stop_all(self, signum: int) -> None:
        self.stopping = True
        for child in self.children.values():
            if child.returncode is None:
                try:
                    child.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _reap_all(self) -> int:
        """Wait for every worker; 0 if all exited cleanly after a stop, else 1."""
        status = 0
        while any(child.returncode is None for child in self.children.values()):
            try:
                pid, raw = self._wait()
            except ChildProcessError:
                break
            if not pid:
                continue
            child = self.children.get(pid)
            if child is None:
                continue
            child.returncode = code = os.waitstatus_to_exitcode(raw)
            if not self.stopping:
                log.error("worker %d exited unexpectedly (code %d): stopping the others", pid, code)
                announce(f"extproc-host: worker {pid} exited unexpectedly with code {code}", sys.stderr)
                status = 1
                self._stop_all(signal.SIGTERM)
            elif code != 0:
                log.error("worker %d exited with code %d", pid, code)
                status = 1
        return status

    def _wait(self) -> tuple[int, int]:
        """The next worker that exits (pid, raw status); while the settings file is watched,
        (0, 0) every ``watch_seconds`` after looking at it."""
        if self.watched is None or self.stopping:
            return os.wait()
        deadline = time.monotonic() + self.watch_seconds
        while time.monotonic() < deadline:
            pid, raw = os.waitpid(-1, os.WNOHANG)
            if pid:
                return pid, raw
            time.sleep(min(0.2, self.watch_seconds))
        if self.watched.changed():
            log.info("%s changed: reloading it", self.config)
            self._reload()
        return 0, 0


def announce_ready(fd: int) -> None:
    """In a worker: tell the supervisor the server is serving, then close the pipe."""
    try:
        os.write(fd, READY)
    finally:
        os.close(fd)


def supervise(
    address: ListenAddress,
    count: int,
    *,
    config: str | None,
    log_level: str | None,
    metrics_listen: str | None = None,
    watch_seconds: float = 0.0,
) -> int:
    """Run ``count`` workers on ``address`` until stopped; the process's exit status."""
    return Supervisor(
        address, count, config=config, log_level=log_level, metrics_listen=metrics_listen, watch_seconds=watch_seconds
    ).run()


def worker_metrics_listen(metrics_listen: str, index: int) -> str:
    """Worker ``index``'s metrics address: each worker is its own Prometheus target, on the
    configured port plus its index (port 0: each picks a free port and prints it)."""
    address = parse_address(metrics_listen)
    return address.with_port(address.port + index if address.port else 0).target()
