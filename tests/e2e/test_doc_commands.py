"""The command blocks of README.md and docs/ run as a reader runs them, and do what the page says.

Each page's runnable blocks (``sh``, ``bash``, ``console``; tests/doc_recipes.py says how each
is run, tests/unit/test_doc_blocks.py that none is forgotten) run in page order, in one working
directory and one process group per block, with the servers they start kept up until the
page's last block ran, then killed. Every command runs in one ``bash`` per block, so ``cd``
carries over to the next command, and the next block starts where the last one ended. A
command must exit 0; a ``console`` command with output under it must print exactly that
output (``...`` on a line of its own stands for any lines), whatever its exit status.

What a reader does without thinking, the test does explicitly: ports already taken on a
shared machine are replaced by free ones (the well-known ports in commands, the ports of an
Envoy config before Envoy starts with it, ``EXTPROC_SERVER__LISTEN`` for a settings file's
``[server] listen``, the echo's default port), a server started with ``&`` logs to its own
file, and the next command waits until it listens (as a reader waits for its ``listening``
line).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from installed import Installed, clean_env

from extproc_host.stack import PROJECT_ROOT
from tests.doc_recipes import Ran, Recipe, recipe_for
from tests.docblocks import Block, code_blocks, command_blocks, console_commands, output_matches, runs_in_background

pytestmark = pytest.mark.e2e

#: Well-known port -> the name of the free port that replaces it.
PORTS = {
    "18080": "envoy",
    "9901": "admin",
    "9001": "host",
    "9002": "host2",
    "8080": "echo",
    "9464": "metrics",
    "9465": "metrics2",
}
_WELL_KNOWN = re.compile(r"(?<![\d.])(" + "|".join(PORTS) + r")(?!\d)")
_ENVOY = re.compile(r"^(?:\S*/)?envoy\s+-c\s+(\S+)")
_LISTEN = re.compile(r"--listen\s+\S*:(\d+)")
#: Files that a view of the checkout links (everything a block may read from the repository).
_CHECKOUT = [
    ".venv", "Makefile", "pyproject.toml", "README.md", "config", "envoy", "deploy", "docs",
    "host", "plugins", "examples", "benchmarks", "tests", "constraints.txt",
]  # fmt: skip

# Copies an Envoy bootstrap (YAML) with other ports: listener, admin, and the endpoints of the
# extproc and upstream clusters. argv: source copy envoy admin host echo.
_PORTS_SCRIPT = """\
import sys, yaml
path, copy, envoy, admin, host, echo = *sys.argv[1:3], *map(int, sys.argv[3:])
config = yaml.safe_load(open(path))
config["admin"]["address"]["socket_address"]["port_value"] = admin
for listener in config["static_resources"]["listeners"]:
    listener["address"]["socket_address"]["port_value"] = envoy
for cluster in config["static_resources"]["clusters"]:
    port = {"extproc": host, "upstream": echo}.get(cluster["name"])
    for group in cluster.get("load_assignment", {}).get("endpoints", []):
        for endpoint in group["lb_endpoints"]:
            address = endpoint["endpoint"]["address"].get("socket_address")
            if port and address:
                address["port_value"] = port
yaml.safe_dump(config, open(copy, "w"), sort_keys=False)
"""

_PRELUDE = """\
wait_port() {{  # wait_port PORT: until something listens on 127.0.0.1:PORT (60 s at most)
  local i
  for i in $(seq 600); do
    (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1 after 60 s" >&2
  return 1
}}
test_ports() {{ {python} {script} "$1" "$2" {envoy} {admin} {host} {echo}; }}  # test_ports CONFIG COPY
"""


def free_ports(names: list[str]) -> dict[str, int]:
    sockets = []
    for _ in names:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = {name: s.getsockname()[1] for name, s in zip(names, sockets, strict=True)}
    for s in sockets:
        s.close()
    return ports


@dataclass
class Step:
    """One command of a block as it runs: the text a reader types, what the test runs."""

    shown: str
    command: str
    expected: str | None  # output shown under it (console), None when none is shown
    background: bool = False
    wait_for: int | None = None


@dataclass
class Page:
    """The runnable blocks of one page in one place, and what they leave running."""

    name: str
    place: str
    cwd: Path
    tmp: Path
    env: dict[str, str]
    ports: dict[str, int]
    values: dict[str, object]
    groups: list[int] = field(default_factory=list)
    written: set[Path] = field(default_factory=set)  # files written from titled blocks

    def fill(self, text: str) -> str:
        return text.format_map(self.values)

    def steps(self, block: Block, recipe: Recipe) -> list[Step]:
        code = block.code
        for old, new in recipe.subs:
            assert old in code, f"{block.where}: the recipe's text {old!r} is no longer in the block"
            code = code.replace(old, self.fill(new))
        if block.language == "console":
            shown = [(c.command, c.output) for c in console_commands(code)]
        else:
            joined = re.sub(r"\\\n", " ", code)
            shown = [(line, "") for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        steps = []
        for text, output in shown:
            command = _WELL_KNOWN.sub(lambda m: str(self.ports[PORTS[m.group(1)]]), text)
            if re.search(r"\bextproc-host echo\b", command) and "--listen" not in command:
                command = command.replace(
                    "extproc-host echo", f"extproc-host echo --listen 127.0.0.1:{self.ports['echo']}"
                )
            envoy = _ENVOY.match(command.strip())
            if envoy:  # Envoy runs a copy on the test's ports; the page's file is left as it is
                copy = self.tmp / f"envoy-{block.line}-{len(steps)}.yaml"
                command = command.replace(f"-c {envoy.group(1)}", f"-c {copy}", 1)
                command = f"test_ports {envoy.group(1)} {copy} && {command}"
            background = runs_in_background(command)
            wait_for = self._listens_on(command) if background and recipe.waits else None
            steps.append(Step(text, command, output or None, background, wait_for))
        return steps

    def _listens_on(self, command: str) -> int | None:
        """The port a server started in the background listens on."""
        listen = _LISTEN.search(command)
        if listen:
            return int(listen.group(1))
        if _ENVOY.search(command.split("&& ", 1)[-1].strip()):
            return self.ports["envoy"]
        if re.search(r"\bextproc-host\b", command):
            return self.ports["host"]
        return None

    def script(self, steps: list[Step], after: list[str], out: Path) -> str:
        lines = [
            _PRELUDE.format(
                python=shlex.quote(sys.executable),
                script=shlex.quote(str(self.tmp / "test_ports.py")),
                **self.ports,
            ),
            f"cd {shlex.quote(str(self.cwd))}",
        ]
        for i, step in enumerate([*steps, *(Step(a, a, None) for a in after)]):
            lines += [
                "{",
                step.command,
                f"}} > {out}/{i}.out 2>&1 < /dev/null",
                f"s=$?; echo $s > {out}/{i}.status",
            ]
            if step.expected is None and not step.background:
                lines.append("[ $s = 0 ] || exit 100")
            if step.wait_for:
                lines.append(f"wait_port {step.wait_for} > {out}/{i}.wait 2>&1 || exit 101")
        lines.append(f"pwd > {out}/pwd")
        return "\n".join(lines) + "\n"

    def run(self, block: Block, recipe: Recipe) -> None:
        steps = self.steps(block, recipe)
        after = [self.fill(a) for a in recipe.after]
        out = self.tmp / f"block-{block.line}"
        out.mkdir()
        env = {**self.env, **{k: self.fill(v) for k, v in recipe.env.items()}}
        proc = subprocess.Popen(
            ["bash", "-c", self.script(steps, after, out)], env=env, start_new_session=True, stdin=subprocess.DEVNULL
        )
        self.groups.append(proc.pid)
        try:
            status = proc.wait(timeout=recipe.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
        everything = [*steps, *(Step(a, a, None) for a in after)]
        outputs = [_read(out / f"{i}.out") for i in range(len(everything))]
        report = _report(block, recipe, everything, outputs, out)
        assert status == 0, f"{block.where}: the block stopped (bash exit {status})\n{report}"
        for i, step in enumerate(steps):
            if step.expected is not None:
                assert output_matches(step.expected, outputs[i]), (
                    f"{block.where}: `{step.shown}` printed something else than the page shows\n"
                    f"--- shown\n{step.expected}--- printed\n{outputs[i]}"
                )
        self.cwd = Path(_read(out / "pwd").strip())
        if recipe.check:
            ran = Ran(outputs[: len(steps)], outputs[len(steps) :], self.cwd)
            try:
                recipe.check(ran)
            except AssertionError as exc:
                raise AssertionError(f"{block.where}: {exc}\n{report}") from None

    def stop(self) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _report(block: Block, recipe: Recipe, steps: list[Step], outputs: list[str], out: Path) -> str:
    lines = [f"recipe: {recipe.why}" if recipe.why else "recipe: run as written"]
    for i, (step, output) in enumerate(zip(steps, outputs, strict=True)):
        status = _read(out / f"{i}.status").strip() or "not run"
        lines.append(f"$ {step.command}   [exit {status}]")
        lines += [f"    {line}" for line in output[-3000:].splitlines()[-40:]]
        lines += [f"    (waiting) {line}" for line in _read(out / f"{i}.wait").splitlines()]
    return "\n".join(lines)


def _sessions() -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for block in command_blocks():
        recipe = recipe_for(block)
        if recipe is not None and block.not_run is None:
            seen[(block.page, recipe.place)] = None
    return list(seen)


@pytest.fixture
def page_factory() -> Iterator[list[Page]]:
    """Pages a test runs; what their blocks left running is killed at the end."""
    pages: list[Page] = []
    yield pages
    for page in pages:
        page.stop()


def _checkout_view(directory: Path) -> Path:
    """A directory with the checkout's files: blocks read the repository, and what they write
    (./temp, envoy.yaml) lands here. Directories are links; files are copies, with their times
    (some tools refuse a link: ``zstd -c README.md``; make compares pyproject.toml's time)."""
    directory.mkdir()
    for name in _CHECKOUT:
        source = PROJECT_ROOT / name
        if source.is_dir():
            (directory / name).symlink_to(source)
        elif source.exists():
            shutil.copy2(source, directory / name)
    return directory


@pytest.mark.parametrize(("page", "place"), _sessions(), ids=lambda v: v)
def test_page_commands_run_as_written(
    page: str, place: str, tmp_path: Path, page_factory: list[Page], request: pytest.FixtureRequest
) -> None:
    ports = free_ports(sorted(set(PORTS.values())))
    (tmp_path / "test_ports.py").write_text(_PORTS_SCRIPT)
    if place == "installed":
        installed: Installed = request.getfixturevalue("installed")
        cwd = tmp_path / "reader"
        cwd.mkdir()
        env = {**installed.env, "VIRTUAL_ENV": str(installed.venv)}
        venv, wheel = installed.venv, installed.wheel
    else:
        cwd = _checkout_view(tmp_path / "checkout")
        env = clean_env(PROJECT_ROOT / ".venv")
        env["PATH"] = env["PATH"].split(os.pathsep, 1)[1]  # the checkout's commands are run as .venv/bin/...
        venv, wheel = PROJECT_ROOT / ".venv", None
    env["EXTPROC_SERVER__LISTEN"] = f"127.0.0.1:{ports['host']}"
    current = Page(
        page,
        place,
        cwd,
        tmp_path,
        env,
        ports,
        {"tmp": tmp_path, "repo": PROJECT_ROOT, "venv": venv, "wheel": wheel, "port": ports},
    )
    page_factory.append(current)
    before = _checkout_status()
    ran = 0
    for block in code_blocks(page):
        if "title" in block.attributes:
            _write_titled(current, block)
            continue
        if not block.is_command or block.not_run is not None:
            continue
        recipe = recipe_for(block)
        if recipe is None or recipe.place != place:
            continue
        current.run(block, recipe)
        ran += 1
    assert ran, f"no block of {page} ran in {place}"
    if place == "checkout":  # the view links the checkout: what a block writes must land beside it
        assert _checkout_status() == before, "the blocks changed files of the checkout"


def _checkout_status() -> str:
    """``git status`` of the checkout (the blocks must leave it as it was)."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    return status.stdout if status.returncode == 0 else "(not a git checkout)"


def _write_titled(page: Page, block: Block) -> None:
    """Write a block that names its file (``title="..."``) where the reader stands: the first
    block of a name replaces the file, the next ones of the same name add to it."""
    path = page.cwd / block.attributes["title"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path in page.written:
        path.write_text(path.read_text() + "\n\n" + block.code)
    else:
        path.write_text(block.code)
        page.written.add(path)
