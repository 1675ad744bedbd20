"""How the tests run each command block of README.md and docs/ (tests/e2e/test_doc_commands.py),
and what they check beyond the page's own output. Every command block is claimed by exactly one
recipe here or is marked ``<!-- not-run: why -->`` on its page (tests/unit/test_doc_blocks.py
keeps the two in step).

What every run does to a block, without a recipe asking (the test module says how):

- the well-known ports (Envoy's 18080 and admin 9901, the host's 9001 and 9002, the echo's 8080,
  metrics 9464 and 9465) become free ports, and so do the ports of an Envoy config the block
  starts Envoy with; the host's ``[server] listen`` comes from ``EXTPROC_SERVER__LISTEN``;
- a command run in the background (``&``) writes to a log of its own, and the next command
  waits until the server it started listens, as a reader waits for it;
- ``extproc-host echo`` without ``--listen`` gets the echo's free port.

A recipe adds: where the block runs (``checkout``: a directory that links the repository's
files, the checkout's .venv included; ``installed``: an empty directory in a fresh virtual
environment, the one the README's install block installs into), substitutions that scale a
block down (``70M`` -> ``2M``), and commands run after it whose output the test checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.docblocks import Block


@dataclass(frozen=True)
class Ran:
    """What a block's run printed: each command's output (stdout and stderr), in order, and
    the output of the recipe's ``after`` commands; the directory the block ended in."""

    outputs: list[str]
    after: list[str]
    cwd: Path


@dataclass(frozen=True)
class Recipe:
    """How to run one command block."""

    page: str
    #: Text only that block of the page contains: how the recipe finds its block.
    match: str
    #: "checkout" or "installed" (see the module docstring). Blocks of one page and place run
    #: in page order, in one working directory, and the servers they start stay up until the
    #: page's last block ran.
    place: str
    #: (text of the block, what it becomes): each text must occur in the block. ``{tmp}``,
    #: ``{repo}``, ``{venv}``, ``{wheel}`` (the installed environment's wheel) and
    #: ``{port[name]}`` are filled in.
    subs: tuple[tuple[str, str], ...] = ()
    #: Commands run after the block, in its shell; each must succeed. The test reads their
    #: output (``after`` results) in its checks.
    after: tuple[str, ...] = ()
    #: False: the test does not wait for the block's servers; the block waits for them itself,
    #: as it must when a reader pastes it whole into a shell.
    waits: bool = True
    #: Extra environment for the block's shell.
    env: dict[str, str] = field(default_factory=dict)
    #: Assertions on what the block and its ``after`` commands printed.
    check: Callable[[Ran], None] | None = None
    #: Why the block is changed or followed up the way it is: said in the report of a failure.
    why: str = ""
    timeout: float = 300

    def claims(self, block: Block) -> bool:
        return block.page == self.page and self.match in block.code


def _uploads_came_back(ran: Ran) -> None:
    """README's hand-run: every echo has the file's sha256, file_tee copied each body both ways."""
    echoes, (original,) = ran.outputs[-2].split(), ran.outputs[-1].split()[:1]
    assert echoes == [original, "-"] * 3, ran.outputs[-2:]
    copies = ran.after[0].split()
    assert len(copies) == 6 and all(name.endswith(".body") for name in copies), copies


def _installed_run(ran: Ran) -> None:
    """README's installed run: the host served, the upload came back, and file_tee copied it
    both ways (an observe-only route: the copies may end a moment after the client's answer)."""
    assert ran.outputs[-3].strip() == "SERVING", ran.outputs[-3]
    assert ran.outputs[-1] == "hello", ran.outputs[-1]
    deadline = time.monotonic() + 20
    while True:
        copies = sorted(path.name.rsplit("-", 1)[-1] for path in (ran.cwd / "tee").glob("*.body"))
        if copies == ["request.body", "response.body"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert copies == ["request.body", "response.body"], copies


def _zstd_round_trips(ran: Ran) -> None:
    readme = (ran.cwd / "README.md").read_text()
    assert ran.outputs[-2] == readme, "the compressed response did not decompress to README.md"
    assert ran.outputs[-1] == readme, "the compressed request did not arrive decoded"


def _serving(ran: Ran) -> None:
    assert [out.strip() for out in ran.after[:2]] == ["SERVING"] * len(ran.after[:2]), ran.after


def _both_hosts(ran: Ran) -> None:
    _serving(ran)
    assert ran.after[2].strip() == "1", "the second host is not an endpoint of the generated cluster"


def _live(ran: Ran) -> None:
    assert ran.after[0].strip() == "LIVE", ran.after


def _demo_results(ran: Ran) -> None:
    assert "every body came back byte for byte" in ran.outputs[-1], ran.outputs[-1][-2000:]
    (results,) = (ran.cwd / "demo-results").iterdir()
    assert (results / "rss.png").is_file() and (results / "samples.json").is_file()


def _make_demo(ran: Ran) -> None:
    assert "every body came back byte for byte" in ran.outputs[0], ran.outputs[0][-2000:]
    assert "pytest" in ran.outputs[1], "make --dry-run test plans no pytest run"


def _built(ran: Ran) -> None:
    names = ran.after[0].split()
    assert any(n.endswith(".whl") for n in names) and any(n.endswith(".tar.gz") for n in names), names


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "README.md",
        match="make demo   #",
        place="checkout",
        subs=(
            ("make demo   #", "make demo ARGS='-n 2 --size-mib 2 --results {tmp}/demo-results'   #"),
            ("make test   #", "make --dry-run test   #"),
        ),
        check=_make_demo,
        why="the demo scaled down to 2 uploads of 2 MiB; make test is this very run, so only planned (--dry-run)",
    ),
    Recipe(
        "README.md",
        match="head -c 70M /dev/urandom > /tmp/video.bin",
        place="checkout",
        subs=(
            ("/tmp/", "{tmp}/"),
            ("head -c 70M", "head -c 2M"),
            ("$(seq 10)", "$(seq 3)"),
        ),
        after=("ls temp",),
        check=_uploads_came_back,
        why="3 uploads of 2 MiB instead of 10 of 70 MiB; every echo's sha256 must be the file's, and "
        "file_tee must have copied each body both ways into ./temp",
    ),
    Recipe(
        "README.md",
        match="pip install './extproc-host[stack]'",
        place="installed",
        subs=(
            ("python3.11 -m venv venv && . venv/bin/activate", ". {venv}/bin/activate"),
            ("./extproc-host[", "{repo}["),
        ),
        why="the fresh environment the test made the same way is activated; the clone is this checkout",
    ),
    Recipe(
        "README.md",
        match="extproc-host init --envoy",
        place="installed",
        waits=False,
        check=_installed_run,
        why="pasted whole (the block waits for its servers itself); file_tee must copy the upload into ./tee",
    ),
    Recipe("docs/configuration.md", match="key 'routes.default.chain[0]'", place="installed"),
    Recipe("docs/configuration.md", match="$ sed -i", place="installed"),
    Recipe(
        "docs/configuration.md",
        match="EXTPROC_SERVER__WORKERS=0 extproc-host check",
        place="checkout",
        subs=(("extproc-host check", ".venv/bin/extproc-host check"),),
        why="config/full_duplex.toml is the checkout's; the checkout's own install runs it",
    ),
    Recipe(
        "docs/demo.md",
        match="extproc-host demo",
        place="installed",
        subs=(
            ("python3.11 -m venv venv && . venv/bin/activate", ". {venv}/bin/activate"),
            ("./extproc-host[", "{wheel}["),
            ("extproc-host demo ", "extproc-host demo -n 2 --size-mib 2 "),
        ),
        check=_demo_results,
        why="the fresh environment is activated, the clone is the wheel built from this checkout (README's block "
        "installs from the directory itself); 2 uploads of 2 MiB",
    ),
    Recipe("docs/envoy-config.md", match="extproc-host envoy-config --config bad.toml", place="installed"),
    Recipe(
        "docs/envoy-config.md",
        match="envoy-config --config config/full_duplex.toml > envoy.yaml",
        place="checkout",
        subs=(("--disable-hot-restart", "--disable-hot-restart &"),),
        after=("curl -sf localhost:{port[admin]}/ready",),
        check=_live,
        why="Envoy runs in the background, not in the foreground, until its admin interface says LIVE",
    ),
    Recipe(
        "docs/plugin-guide.md",
        match="extproc-host new-plugin card-redact",
        place="installed",
        subs=(("pip install './extproc-host[testing]'", "pip install '{wheel}[testing]'"),),
        why="the clone is the wheel built from this checkout (README's block installs from the directory itself)",
    ),
    Recipe("docs/plugin-guide.md", match="$ pytest", place="installed"),
    Recipe("docs/plugin-guide.md", match="extproc-host check --config host.toml", place="installed"),
    Recipe(
        "docs/plugin-guide.md",
        match="python -m build",
        place="installed",
        subs=(("twine upload dist/*", "twine check dist/*"),),
        after=("ls dist",),
        check=_built,
        why="nothing is uploaded: twine checks what it would upload",
    ),
    Recipe(
        "docs/plugins.md",
        match="config/zstd.toml",
        place="checkout",
        check=_zstd_round_trips,
        why="the zstd round trips must give README.md back",
    ),
    Recipe(
        "docs/scaling.md",
        match="--workers 4",
        place="checkout",
        subs=(("--workers 4", "--workers 2 &"),),
        after=(".venv/bin/extproc-host health 127.0.0.1:{port[host]}",),
        env={"EXTPROC_PLUGINS__FILE_TEE__DIRECTORY": "{tmp}/tee"},
        check=_serving,
        why="two workers, in the background, until the health check answers SERVING",
    ),
    Recipe(
        "docs/scaling.md",
        match="--host-address 127.0.0.1:9001 --host-address 127.0.0.1:9002",
        place="installed",
        after=(
            "extproc-host health 127.0.0.1:{port[host]}",
            "extproc-host health 127.0.0.1:{port[host2]}",
            "grep -c 'port_value: {port[host2]}' envoy.yaml",
        ),
        check=_both_hosts,
        why="both hosts must answer SERVING and be endpoints of the generated cluster",
    ),
)


def recipe_for(block: Block) -> Recipe | None:
    """The one recipe that claims ``block``, or None."""
    found = [recipe for recipe in RECIPES if recipe.claims(block)]
    assert len(found) <= 1, f"{block.where}: claimed by {len(found)} recipes"
    return found[0] if found else None
