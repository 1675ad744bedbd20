"""The package's architecture, checked: the serving core imports only downward, no module of
the core imports a tool subpackage, and no two modules import each other (no cycles).

Every ``import`` and ``from ... import`` of every module under host/ is read with ``ast``,
including imports inside functions; imports under ``if TYPE_CHECKING:`` count too (a cycle for
the type checker is still a cycle for the reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "extproc_host"
ROOT = Path(__file__).resolve().parents[2] / "host"

#: The serving core, bottom to top: a module may import only modules of a lower layer (or of
#: its own layer when listed in ALLOWED_SAME_LAYER).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "wire"),
    ("listeners", "drain", "data", "mutation_rules"),
    ("plugin",),
    ("hookspecs", "routes", "settings"),
    ("chain", "protocol", "metrics", "modes", "logs", "health", "reclaim", "tracing"),
    ("control",),
    ("processor", "registry"),
    ("admission",),
    ("upkeep", "observe", "reload"),
    ("server", "workers", "starter"),
    ("cli",),
    ("__main__",),
]
#: The builtin gRPC server (the ``wire`` subpackage), bottom to top: frames, then header
#: fields, limits, connection state, I/O, then gRPC. It imports nothing of the host outside it.
WIRE_LAYERS: list[tuple[str, ...]] = [
    ("wire.http2", "wire.http2.frames", "wire.grpc"),
    ("wire.http2.fields", "wire.http2.limits", "wire.budget"),
    ("wire.http2.connection",),
    ("wire.transport", "wire.grpc.status"),
    ("wire.grpc.messages",),
    ("wire.grpc.call",),
    ("wire.grpc.server",),
    ("wire",),
]
WIRE_LAYER_OF = {module: index for index, layer in enumerate(WIRE_LAYERS) for module in layer}
#: Tool subpackages: built on the core, never imported by it (only cli may start them).
TOOLS = ("envoyconfig", "stack", "testing")
LAYER_OF = {module: index for index, layer in enumerate(LAYERS) for module in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def imports_of(path: Path) -> set[str]:
    """The extproc_host modules ``path`` imports (absolute names)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(
                alias.name for alias in node.names if alias.name.startswith(PACKAGE + ".") or alias.name == PACKAGE
            )
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:  # `from . import routes` imports the module routes
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_path(candidate) is not None else target)
    found.discard(name)
    return found


def module_path(name: str) -> Path | None:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def short(name: str) -> str:
    return "(package)" if name == PACKAGE else name.removeprefix(PACKAGE + ".")


def test_every_core_module_has_a_layer() -> None:
    core = {short(n) for n in MODULES} - {"(package)"}
    core = {n for n in core if n.split(".")[0] not in TOOLS}
    wire = {n for n in core if n.split(".")[0] == "wire"}
    assert core - wire | {"wire"} == set(LAYER_OF), "add new core modules to LAYERS (or move tools into a subpackage)"
    assert wire == set(WIRE_LAYER_OF), "add new modules of wire/ to WIRE_LAYERS"


@pytest.mark.parametrize("module", sorted(n for n in MODULES if short(n) in WIRE_LAYER_OF))
def test_wire_layers_import_only_downward_and_nothing_of_the_host(module: str) -> None:
    mine = WIRE_LAYER_OF[short(module)]
    bad = []
    for target in sorted(GRAPH[module]):
        name = short(target)
        if name.split(".")[0] != "wire":
            bad.append(f"{name} (outside wire/)")
        elif WIRE_LAYER_OF.get(name, -1) >= mine and name != short(module):
            bad.append(f"{name} (layer {WIRE_LAYER_OF.get(name)} >= {mine})")
    assert not bad, f"{short(module)} imports {', '.join(bad)}"


@pytest.mark.parametrize("module", sorted(n for n in MODULES if short(n) in LAYER_OF))
def test_core_imports_only_downward(module: str) -> None:
    mine = LAYER_OF[short(module)]
    bad = []
    for target in sorted(GRAPH[module]):
        top = short(target).split(".")[0]
        if top in TOOLS:
            if short(module) != "cli":
                bad.append(f"{short(target)} (a tool subpackage)")
        elif top != "(package)" and top != short(module) and LAYER_OF.get(top, -1) >= mine:
            bad.append(f"{short(target)} (layer {LAYER_OF.get(top)} >= {mine})")
    assert not bad, f"{short(module)} imports {', '.join(bad)}"


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycles.append([short(n) for n in stack[stack.index(target) :]] + [short(target)])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [])
    # The package __init__ re-exports the plugin API; modules importing `extproc_host` itself
    # (plugins do) are outside host/, so any cycle here is a real one.
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_layer_check_sees_imports() -> None:
    """The checker itself reads relative, absolute and function-level imports."""
    assert f"{PACKAGE}.errors" in GRAPH[f"{PACKAGE}.chain"]
    assert f"{PACKAGE}.stack.demo" in GRAPH[f"{PACKAGE}.cli"]  # imported inside a function
    assert f"{PACKAGE}.routes" in GRAPH[f"{PACKAGE}.envoyconfig.bootstrap"]  # `from .. import routes`
