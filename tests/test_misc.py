"""Run identity (ULIDs, no collisions across processes, one plan file per run), the demo,
the append-only audit log, and keyset paging over a composite key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner
from ulid import ULID

from fillgate.demo import create_demo_database
from fillgate.ledger import new_run_id
from fillgate.plan import file_sha256

from conftest import SRC, TestDB, fillgate_subprocess, run_cli

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")  # Crockford base32, 48-bit time + 80 random bits


# --- run ids ---------------------------------------------------------------------------


def test_run_ids_are_time_ordered_ulids() -> None:
    before = time.time()
    first = new_run_id()
    time.sleep(0.003)
    second = new_run_id()
    after = time.time()
    for run_id in (first, second):
        assert ULID_RE.match(run_id), run_id
        assert str(ULID.from_str(run_id)) == run_id
        assert before - 0.002 <= ULID.from_str(run_id).timestamp <= after + 0.002
    assert first < second  # sorting by id sorts by creation time
    batch = [new_run_id() for _ in range(2000)]
    assert len(set(batch)) == len(batch)


GENERATE = """
import os, sys
from fillgate.ledger import new_run_id
ready, go, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(ready, "w").close()
while not os.path.exists(go):  # spin: every process starts at the same instant
    pass
ids = [new_run_id() for _ in range(n)]
sys.stdout.write("\\n".join(ids))
"""


def test_run_ids_from_concurrent_processes_never_collide(tmp_path: Path) -> None:
    processes, per_process = 3, 20000
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [
        subprocess.Popen([sys.executable, "-c", GENERATE, str(tmp_path / f"ready{i}"), str(go), str(per_process)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(processes)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(processes)):
        assert time.monotonic() < deadline, "the generator processes did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        outputs.append(stdout.split())
    all_ids = [run_id for ids in outputs for run_id in ids]
    assert len(all_ids) == processes * per_process
    assert all(ULID_RE.match(run_id) for run_id in all_ids)
    assert len(set(all_ids)) == len(all_ids)
    # the processes really did generate during the same milliseconds (same ULID time
    # prefix), so only the random part kept their ids apart
    per_process_ms = [{run_id[:10] for run_id in ids} for ids in outputs]
    overlapping = sum(
        bool(per_process_ms[i] & per_process_ms[j]) for i in range(processes) for j in range(i + 1, processes)
    )
    assert overlapping, "the processes never overlapped in time; the test proved nothing"


def test_concurrent_plan_processes_get_distinct_runs_and_files(
    sqlite_db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    db = sqlite_db
    db.create_people(30)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    procs = [
        fillgate_subprocess(["--config", str(cfg), "plan", f"{jobs_file}:FillEmail", "-o", "plans/", "--json"],
                            cwd=db.tmp_path)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout))
    run_ids = [r["run_id"] for r in results]
    assert len(set(run_ids)) == 2
    assert sorted(run_ids) == [r[0] for r in db.rows("SELECT run_id FROM fillgate_runs WHERE kind = 'plan' "
                                                     "ORDER BY run_id")]
    paths = {Path(r["path"]) for r in results}
    assert paths == {db.tmp_path / "plans" / f"{run_id}.plan" for run_id in run_ids}
    for result in results:
        header = json.loads(Path(result["path"]).read_text().splitlines()[0])
        assert header["plan_id"] == result["run_id"]
        assert header["changes"] == 15


def test_each_run_keeps_its_own_plan_file(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """Two `fillgate run` with the default --output: neither overwrites the other's plan,
    so each apply stays verifiable (and resumable) from its own file."""
    db = sqlite_db
    db.create_people(10)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    first = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--json")
    assert first.exit_code == 0, first.output
    second = run_cli(cli, cfg, "run", f"{jobs_file}:OverwriteEmail", "--json", "-p", "domain=corp.test")
    assert second.exit_code == 0, second.output
    applies = db.rows("SELECT run_id, plan_id, plan_path, plan_sha256 FROM fillgate_runs "
                      "WHERE kind = 'apply' ORDER BY run_id")
    assert len(applies) == 2
    assert applies[0][2] != applies[1][2]
    for _, plan_id, plan_path, sha in applies:
        path = Path(plan_path)
        assert path.parent == db.tmp_path / ".fillgate" / "plans"
        assert path.name == f"{plan_id}.plan"
        assert file_sha256(path) == sha


# --- the demo ---------------------------------------------------------------------------


def test_demo(tmp_path: Path, cli: CliRunner) -> None:
    path = tmp_path / "tour" / "demo.db"
    result = run_cli(cli, None, "demo", "--path", str(path))
    assert result.exit_code == 0, result.output
    text = result.stdout
    for step, command in enumerate(
        ["fillgate init", "fillgate plan", "fillgate apply", "--target live", "fillgate apply",
         "fillgate history customers", "fillgate revert"],
        start=1,
    ):
        assert f"step {step}" in text
        assert command in text
    assert "refused: plan demo.plan has" in text and "--max-changes 25" in text  # the gate
    assert "stamped 'demo'" in text  # the stamp
    assert "history of customers" in text

    fresh = tmp_path / "fresh.db"
    create_demo_database(fresh, 5000)
    demo_engine, fresh_engine = sa.create_engine(f"sqlite:///{path}"), sa.create_engine(f"sqlite:///{fresh}")
    try:
        with demo_engine.connect() as conn, fresh_engine.connect() as original:
            query = sa.text("SELECT * FROM customers ORDER BY id")
            assert conn.execute(query).all() == original.execute(query).all()
            missing = original.execute(sa.text("SELECT count(*) FROM customers WHERE email IS NULL")).scalar()
            assert conn.execute(sa.text("SELECT count(*) FROM customers WHERE email IS NULL")).scalar() == missing
            runs = {kind: json.loads(counts) for kind, counts in conn.execute(
                sa.text("SELECT kind, counts FROM fillgate_runs WHERE kind IN ('apply', 'revert')"))}
            applied = runs["apply"]["applied"]
            assert 0 < applied < missing
            assert runs["revert"]["applied"] == applied
            assert conn.execute(sa.text("SELECT count(*) FROM fillgate_changes")).scalar() == 2 * applied
    finally:
        demo_engine.dispose()
        fresh_engine.dispose()
    assert f"{missing} customers without email again" in text


# --- the audit log is append-only in the database itself -----------------------------------


def test_audit_log_is_append_only(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db.create_people(10)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail").exit_code == 0
    before = db.rows("SELECT * FROM fillgate_changes ORDER BY id")
    assert len(before) == 5
    packed = db.rows("SELECT * FROM fillgate_audit_batches ORDER BY id")
    # the view takes no writes at all; the table under it refuses them
    for statement in (
        "UPDATE fillgate_changes SET new_value = '\"forged\"' WHERE id = (SELECT min_id FROM "
        "(SELECT min(id) AS min_id FROM fillgate_changes) m)",
        "UPDATE fillgate_changes SET source = 'nobody'",
        "DELETE FROM fillgate_changes WHERE row_key = '[1]'",
        "DELETE FROM fillgate_changes",
    ):
        with pytest.raises(sa.exc.DBAPIError):
            db.execute(statement)
    attempts = [
        "UPDATE fillgate_audit_batches SET changes = '[]'",
        "UPDATE fillgate_audit_batches SET source = 'nobody'",
        "DELETE FROM fillgate_audit_batches",
    ]
    if db.backend == "postgresql":
        attempts.append("TRUNCATE fillgate_audit_batches")
    for statement in attempts:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            db.execute(statement)
    assert db.rows("SELECT * FROM fillgate_audit_batches ORDER BY id") == packed
    assert db.rows("SELECT * FROM fillgate_changes ORDER BY id") == before
    # appending still works: a revert adds its own rows
    run_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
    assert run_cli(cli, cfg, "revert", run_id).exit_code == 0
    assert db.rows("SELECT * FROM fillgate_changes ORDER BY id")[:5] == before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 10


# --- composite keys ------------------------------------------------------------------------

PAIR_JOBS = '''
from fillgate import Job, FillMissing

VISITS = []


class FillPair(Job):
    table = "pairs"
    key = ("a", "b")
    columns = {"val": FillMissing()}
    source = "SELECT a, b, val FROM pairs"
    page_size = 7

    def compute(self, row, ctx):
        VISITS.append((row["a"], row["b"]))
        return {"val": f"{row['a']}/{row['b']}"}
'''


def test_composite_key_paging_visits_every_row_once(db: TestDB, cli: CliRunner) -> None:
    db.execute("CREATE TABLE pairs (a INTEGER NOT NULL, b INTEGER NOT NULL, val VARCHAR(20), PRIMARY KEY (a, b))")
    # uneven groups (1, 2, ... 13 rows per a), b crossing 9 -> 10 and negative values, so pages
    # of 7 split groups at every possible offset
    keys = [(a, b) for a in range(-2, 11) for b in range(-1, a + 1)]
    rows = [{"a": a, "b": b, "val": "keep" if (a * 7 + b) % 5 == 0 else None} for a, b in reversed(keys)]
    db.execute("INSERT INTO pairs (a, b, val) VALUES (:a, :b, :val)", rows)
    kept = {(r["a"], r["b"]) for r in rows if r["val"] == "keep"}
    assert 0 < len(kept) < len(keys) and len(keys) > 10 * 7
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    jobs = db.tmp_path / "pair_jobs.py"
    jobs.write_text(PAIR_JOBS)

    result = run_cli(cli, cfg, "plan", f"{jobs}:FillPair", "--json", "-o", "pairs.plan")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)["counts"]
    assert counts["rows"] == len(keys)
    assert counts["writes"] == len(keys) - len(kept)
    assert counts["skipped"] == len(kept)
    visits = sys.modules["pair_jobs"].VISITS
    assert sorted(visits) == sorted(keys)  # every row exactly once ...
    assert visits == sorted(keys)  # ... in key order

    result = run_cli(cli, cfg, "apply", "pairs.plan", "--batch-size", "10")
    assert result.exit_code == 0, result.output
    stored = dict(((a, b), v) for a, b, v in db.rows("SELECT a, b, val FROM pairs"))
    assert stored == {k: "keep" if k in kept else f"{k[0]}/{k[1]}" for k in keys}
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == len(keys) - len(kept)
    history = run_cli(cli, cfg, "history", "pairs", "10,-1", "--json")
    assert history.exit_code == 0, history.output
    assert [(e["old_value"], e["new_value"]) for e in json.loads(history.stdout)] == [(None, "10/-1")]


def test_demo_never_deletes_a_file_that_is_not_an_earlier_demo(tmp_path: Path, cli: CliRunner) -> None:
    """`fillgate demo --path FILE` deleted whatever FILE was (a database of yours, a text file; as
    root even a device such as /dev/null) to create its own. It replaces only an earlier demo's."""
    import os
    import sqlite3

    mine = tmp_path / "mine.db"
    with sqlite3.connect(mine) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")  # even with a customers table
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    def untouched(path: Path) -> tuple[int, ...]:  # not the access time: the check reads the file
        st = path.stat()
        return st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    for path in (mine, notes, fifo):
        before = untouched(path)
        result = run_cli(cli, None, "demo", "--path", str(path), "--rows", "100")
        assert result.exit_code == 2, result.output
        assert "is not a database an earlier fillgate demo made" in result.stderr
        assert untouched(path) == before
    assert notes.read_text() == "keep me"
    again = tmp_path / "demo" / "demo.db"
    for _ in range(2):  # an earlier demo's database is replaced
        assert run_cli(cli, None, "demo", "--path", str(again), "--rows", "100").exit_code == 0
