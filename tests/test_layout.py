"""The code base held to its own rules: no import cycle, short functions, one table of run
status changes that every change goes through, and a package that imports nothing heavy until
it is used. (The Alembic migrations are compared with the table definitions in
tests/test_audit_integrity.py.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fillgate import connect, init_target
from fillgate.errors import RunStateError
from fillgate.ledger import Run, new_run_id, utcnow
from fillgate.runs import FINISHED, TRANSITIONS, RunKind, RunStatus, check_transition, sources_of

from conftest import SRC, TestDB

PACKAGE = SRC / "fillgate"
LONGEST_FUNCTION = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fillgate modules ``name`` imports when it is imported (not inside functions, not
    under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return {m for m in found if m in known and m != name}


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _module_level_imports(name, path, set(modules)) for name, path in modules.items()}
    for name in graph:  # a package imports its parent packages' __init__ first
        parent = name.rpartition(".")[0]
        while parent:
            graph[name].add(parent)
            parent = parent.rpartition(".")[0]
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                if not all(m.startswith(nxt + ".") or m == nxt for m in cycle):  # a package and its own modules
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_no_long_function() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_importing_fillgate_loads_no_database_library_and_installs_no_listener() -> None:
    code = (
        "import sys, fillgate\n"
        "assert 'sqlalchemy' not in sys.modules, 'import fillgate loaded sqlalchemy'\n"
        "from fillgate import Job, make_plan\n"
        "import fillgate.context as context\n"
        "from sqlalchemy import event\n"
        "from sqlalchemy.engine import Engine\n"
        "assert not event.contains(Engine, 'do_connect', context._guard_do_connect)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC)}, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(RunStatus)
    assert {RunStatus.PLANNED, RunStatus.SUCCEEDED, RunStatus.CANCELLED} == FINISHED
    assert sources_of(RunStatus.RUNNING) == {RunStatus.PAUSED, RunStatus.FAILED}
    check_transition("R", RunStatus.RUNNING, RunStatus.PAUSED)
    for before, after in ((RunStatus.SUCCEEDED, RunStatus.RUNNING), (RunStatus.CANCELLED, RunStatus.RUNNING),
                          (RunStatus.PLANNED, RunStatus.RUNNING), (RunStatus.PAUSED, RunStatus.SUCCEEDED)):
        with pytest.raises(RunStateError, match=f"is {before}; it cannot become {after}"):
            check_transition("R", before, after)


def test_every_status_change_is_a_compare_and_set(db: TestDB) -> None:
    """Ledger.transition moves a run only along the table and only from the status it has:
    of two processes moving one run, the second is refused and changes nothing."""
    init_target(db.target())
    ledger = connect(db.target()).ledger
    run = ledger.create_run(Run(run_id=new_run_id(), kind=RunKind.APPLY, target="staging", environment="staging",
                                operator="me", status=RunStatus.RUNNING, started_at=utcnow()))
    ledger.transition(run.run_id, RunStatus.PAUSED, message="first")
    with pytest.raises(RunStateError, match="is paused; it cannot become succeeded"):
        ledger.transition(run.run_id, RunStatus.SUCCEEDED)  # paused -> succeeded is not in the table
    ledger.transition(run.run_id, RunStatus.RUNNING)
    ledger.transition(run.run_id, RunStatus.SUCCEEDED, finished_at=utcnow())
    with pytest.raises(RunStateError, match="is succeeded; it cannot become paused"):
        ledger.transition(run.run_id, RunStatus.PAUSED, message="second")  # a racing pause, too late
    after = ledger.get_run(run.run_id)
    assert (after.status, after.message) == ("succeeded", "first")
    with pytest.raises(TypeError, match=r"only through Ledger\.transition"):
        ledger.update_run(run.run_id, status="running")
