"""The architecture as a test.

- The machines and the wire are pure: no module of `peer/wire/` or `peer/roles/` (nor the pure parts of
  `peer/learning/`) imports paho, TensorFlow/Keras, threads, the clock or the I/O packages of the peer, and none calls
  open(), print() or reads the clock. The node carries out what they decide (`peer/node/`).
- Data flows one way: settings -> node -> machines -> actions -> wire. Each package imports only from the packages
  below it in LAYERS, never from one above, and no two modules import each other, however indirectly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "peer"

# Lowest first: a module may import from its own layer and the ones before it.
LAYERS = [
    "peer.wire",
    "peer.learning",
    "peer.roles",
    "peer.records",
    "peer.config",
    "peer.node",
    "peer.host",
    "peer.__main__",
]
PURE_PACKAGES = ["wire", "roles"]
PURE_MODULES = [
    "learning/aggregation.py",
    "learning/metrics.py",
    "learning/partition.py",
    "learning/server_optimizers.py",
    "learning/privacy.py",
] + sorted(str(path.relative_to(PEER)) for path in (PEER / "learning" / "secagg").glob("*.py"))
FORBIDDEN_IMPORTS = {
    "paho",
    "tensorflow",
    "keras",
    "threading",
    "socket",
    "subprocess",
    "time",
    "os",
    "pathlib",
    "peer.node",
    "peer.records",
    "peer.config",
    "peer.host",
    "peer.learning.learner",
    "peer.learning.models",
    "peer.learning.data",
    "peer.learning.idx",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval"}
FORBIDDEN_METHODS = {
    "time",
    "monotonic",
    "perf_counter",
    "time_ns",
    "sleep",
    "publish",
    "write_text",
    "read_text",
    "write_bytes",
    "read_bytes",
    "submit",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str = "peer.x") -> set[str]:
    """Every module name `tree` imports, relative imports resolved against `module`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level]
                base = ".".join([*package, *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from peer.wire import envelope`
    return names


def peer_modules() -> dict[str, set[str]]:
    """Every module of the peer and the peer modules it imports."""
    modules = {module_name(path): path for path in PEER.rglob("*.py")}
    return {
        name: {n for n in imported(ast.parse(path.read_text()), name) if n in modules} for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    return (
        max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))
        if any(module == p or module.startswith(p + ".") for p in LAYERS)
        else -1
    )


def pure_files() -> list[Path]:
    files = [path for package in PURE_PACKAGES for path in sorted((PEER / package).glob("*.py"))]
    return files + [PEER / module for module in PURE_MODULES]


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(PEER)))
def test_a_pure_module_imports_no_io(path):
    names = imported(ast.parse(path.read_text()), module_name(path))
    bad = {
        n
        for n in names
        if n.split(".")[0] in FORBIDDEN_IMPORTS or any(n == f or n.startswith(f + ".") for f in FORBIDDEN_IMPORTS)
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(PEER)))
def test_a_pure_module_calls_no_io(path):
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                calls.append(f"{func.id}() at line {node.lineno}")
            elif isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_METHODS:
                calls.append(f".{func.attr}() at line {node.lineno}")
    assert not calls, f"{path.relative_to(ROOT)} calls {calls}"


def test_every_peer_module_has_a_layer():
    assert {m for m in peer_modules() if layer_of(m) < 0} <= {"peer"}


def test_no_import_runs_back_up():
    upward = [
        f"{module} (layer {LAYERS[layer_of(module)]}) imports {target} (layer {LAYERS[layer_of(target)]})"
        for module, targets in peer_modules().items()
        if layer_of(module) >= 0
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = peer_modules()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]) if target in path else target)
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_checkers_catch_a_forbidden_import_a_call_and_an_upward_import():
    tree = ast.parse("import time\nfrom .. import node\nfrom peer.node.loop import Peer\nopen('x')\nt = time.time()\n")
    names = imported(tree, "peer.roles.election")
    assert {"time", "peer.node", "peer.node.loop"} <= names
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert {c.func.id for c in calls if isinstance(c.func, ast.Name)} == {"open"}
    assert layer_of("peer.node.loop") > layer_of("peer.roles.election") > layer_of("peer.wire.messages")
