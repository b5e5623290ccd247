"""The machines are pure: no role module imports paho, TensorFlow/Keras or the I/O modules of the peer, and none
calls open(), print() or reads the clock. The node carries out what they decide (see peer/node.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PEER = Path(__file__).resolve().parent.parent / "peer"
PURE = ["election.py", "controller.py", "follower.py", "admission.py", "rounds.py", "actions.py", "chunks.py"]
FORBIDDEN_IMPORTS = {"paho", "tensorflow", "keras", "threading", "socket", "subprocess", "time", "os",
                     "peer.transport", "peer.learner", "peer.jobs", "peer.node", "peer.records"}
FORBIDDEN_RELATIVE = {"transport", "learner", "jobs", "node", "records"}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval"}


def imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names |= {f"relative:{node.module or ''}"} | {f"relative:{a.name}" for a in node.names if not node.module}
            else:
                names.add(node.module or "")
    return names


@pytest.mark.parametrize("module", PURE)
def test_a_machine_module_imports_no_io(module):
    names = imported(ast.parse((PEER / module).read_text()))
    bad = {n for n in names if n.split(".")[0] in FORBIDDEN_IMPORTS or n in FORBIDDEN_IMPORTS
           or n.removeprefix("relative:") in FORBIDDEN_RELATIVE}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", PURE)
def test_a_machine_module_calls_no_io(module):
    calls = []
    for node in ast.walk(ast.parse((PEER / module).read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                calls.append(f"{func.id}() at line {node.lineno}")
            elif isinstance(func, ast.Attribute) and func.attr in {"time", "monotonic", "perf_counter", "sleep",
                                                                     "publish", "write_text", "submit"}:
                calls.append(f".{func.attr}() at line {node.lineno}")
    assert not calls, f"{module} calls {calls}"


def test_the_checker_itself_catches_a_forbidden_import_and_call(tmp_path):
    tree = ast.parse("import time\nfrom . import transport\nopen('x')\nprint(1)\nt = time.time()\n")
    assert "time" in imported(tree) and "relative:transport" in imported(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert {c.func.id for c in calls if isinstance(c.func, ast.Name)} == {"open", "print"}
