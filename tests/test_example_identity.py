"""Example 3 (examples/run_identity): run identity and persistence, without and with fillgate.

First the incident (before.py): a run id taken once per process makes a second run replace
the first run's outputs; a hidden ``sqlite3.connect()`` writes a file of its own whatever
``DATABASE_URL`` says; ``ON CONFLICT (topic)`` matches no constraint and fails mid-run. Then
fillgate (jobs.py, buggy_jobs.py): runs started at once in two processes get distinct ULIDs
and keep their own outputs and audit rows; a hidden ``create_engine`` is refused (exit 3) and
``fillgate lint`` finds the hidden ``sqlite3.connect``; a conflict key that matches no
constraint is an error before anything runs (exit 2), while ``(run_timestamp, topic)`` works.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from fillgate import connect, make_plan
from fillgate.values import encode_key

from conftest import TestDB, fillgate_subprocess, load_module, run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "run_identity"

JOBS = f"{EXAMPLE / 'jobs.py'}"
BUGGY = f"{EXAMPLE / 'buggy_jobs.py'}"


def _load(name: str) -> ModuleType:
    """A fresh copy of an example module (a new "process" for before.py's RUN_ID)."""
    return load_module(EXAMPLE / f"{name}.py", f"run_identity_{name}")


# the example's shared module, under the name its jobs.py and before.py import it by, without
# putting the example folder (its generic before.py, jobs.py) on sys.path
world = load_module(EXAMPLE / "digest_world.py", "digest_world", shared=True)
N = len(world.TOPICS)


def test_before_a_run_id_per_process_makes_each_run_overwrite_the_last(db: TestDB) -> None:
    world.seed(db.engine)
    before = _load("before")  # the scheduler process imports the job once
    first = before.run_digest(db.engine)
    run1 = world.digest_rows(db.engine)
    assert [count for _, _, count in run1] == [5] * N
    world.add_articles(db.engine, 2, hour=6)  # the news of the next hour
    second = before.run_digest(db.engine)  # the next scheduled run, same process
    run2 = world.digest_rows(db.engine)
    assert first["run_id"] == second["run_id"] == before.RUN_ID
    assert [count for _, _, count in run2] == [7] * N
    assert not set(run1) & set(run2)  # run 1's outputs are gone: replaced by run 2's
    assert db.scalar("SELECT count(*) FROM digests") == N


def test_before_a_hidden_sqlite_connect_bypasses_database_url(db: TestDB, tmp_path: Path) -> None:
    world.seed(db.engine)
    _load("before").run_digest(db.engine)
    cache = tmp_path / "summary_cache.db"  # the working folder, whatever DATABASE_URL says
    with sqlite3.connect(cache) as conn:
        assert conn.execute("SELECT count(*) FROM summaries").fetchone() == (N,)
    assert "summaries" not in sa.inspect(db.engine).get_table_names()


def test_before_on_conflict_names_a_column_set_that_matches_no_constraint(db: TestDB) -> None:
    if db.backend == "mysql":
        pytest.skip("MySQL/MariaDB have no ON CONFLICT (their ON DUPLICATE KEY UPDATE takes no column list)")
    world.seed(db.engine)
    before = _load("before")
    before.run_digest(db.engine)
    written = world.digest_rows(db.engine)
    with pytest.raises(sa.exc.DBAPIError) as failure:
        before.refresh_digest(db.engine, "rust", 8, "late news")
    expected = {"sqlite": "ON CONFLICT clause does not match any PRIMARY KEY or UNIQUE constraint",
                "postgresql": "there is no unique or exclusion constraint matching the ON CONFLICT specification"}
    assert expected[db.backend] in str(failure.value.orig)
    assert world.digest_rows(db.engine) == written  # the late article is simply lost


def test_concurrent_runs_get_distinct_ids_and_keep_their_own_outputs(db: TestDB, tmp_path: Path) -> None:
    world.seed(db.engine)
    cfg = db.config()
    assert run_cli(CliRunner(), cfg, "init").exit_code == 0
    procs = [fillgate_subprocess(["--config", str(cfg), "plan", f"{JOBS}:WriteDigests", "-o", f"{name}.plan",
                                  "--json"], cwd=tmp_path) for name in ("a", "b")]  # both at once
    plans = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        plans.append(json.loads(out))
    ids = [p["run_id"] for p in plans]
    assert len(set(ids)) == 2 and all(len(i) == 26 for i in ids)  # two ULIDs
    applies = {}
    for name, plan in zip(("a", "b"), plans, strict=True):
        result = run_cli(CliRunner(), cfg, "apply", f"{name}.plan", "--json")
        assert result.exit_code == 0, result.output
        applies[plan["run_id"]] = json.loads(result.stdout)["run_id"]

    rows = world.digest_rows(db.engine)
    assert sorted({run for run, _, _ in rows}) == sorted(ids)
    assert sorted(rows) == sorted((run, topic, 5) for run in ids for topic in world.TOPICS)
    for plan_id, apply_id in applies.items():  # each run's audit rows are its own
        audited = db.rows("SELECT row_key, op FROM fillgate_changes WHERE run_id = :r", {"r": apply_id})
        assert sorted(audited) == sorted((encode_key([plan_id, topic]), "insert") for topic in world.TOPICS)
    history = run_cli(CliRunner(), cfg, "history", "digests", f"{ids[0]},rust", "--json")
    assert [e["run_id"] for e in json.loads(history.stdout)] == [applies[ids[0]]]

    # and two runs in one process: two more ids, never the process's
    conn = connect(db.target("staging"))
    write_digests = _load("jobs").WriteDigests
    again = [make_plan(conn, write_digests).run.run_id for _ in range(2)]
    assert len(set(again + ids)) == 4


def test_a_job_reaches_only_its_target(db: TestDB, tmp_path: Path) -> None:
    world.seed(db.engine)
    cfg = db.config()
    assert run_cli(CliRunner(), cfg, "init").exit_code == 0
    refused = run_cli(CliRunner(), cfg, "run", f"{BUGGY}:DigestsWithHiddenEngine")
    assert refused.exit_code == 3, refused.output
    message = " ".join(refused.stderr.split())
    assert "job digest.write-with-hidden-engine" in message
    assert "tried to open a database other than its target 'staging'" in message and "hidden_cache.db" in message
    with sqlite3.connect(tmp_path / "hidden_cache.db") as hidden:  # (sqlite creates the file on connect)
        assert hidden.execute("SELECT name FROM sqlite_master").fetchall() == []  # nothing written
    assert world.digest_rows(db.engine) == []
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0


def test_lint_finds_the_hidden_connections(cli: CliRunner) -> None:
    result = run_cli(cli, None, "lint", BUGGY, "--json")
    assert result.exit_code == 1, result.output
    found = {(f["code"], f["found"]) for f in json.loads(result.stdout)["findings"]}
    assert ("FG005", "sqlite3.connect('summary_cache.db')") in found
    assert ("FG005", "sa.create_engine('sqlite:///hidden_cache.db')") in found
    before = run_cli(cli, None, "lint", str(EXAMPLE / "before.py"))
    assert before.exit_code == 1 and "sqlite3.connect('summary_cache.db')" in before.stdout
    clean = run_cli(cli, None, "lint", JOBS)
    assert clean.exit_code == 0, clean.output


def test_the_conflict_key_is_verified_before_anything_runs(db: TestDB) -> None:
    world.seed(db.engine)
    cfg = db.config()
    assert run_cli(CliRunner(), cfg, "init").exit_code == 0
    runs = db.scalar("SELECT count(*) FROM fillgate_runs")
    for command in ("plan", "run"):
        wrong = run_cli(CliRunner(), cfg, command, f"{BUGGY}:DigestsOnTopic")
        assert wrong.exit_code == 2, wrong.output
        assert ("key (topic) of table 'digests' matches no primary key or unique constraint"
                in " ".join(wrong.stderr.split()))
    assert db.scalar("SELECT count(*) FROM fillgate_runs") == runs  # nothing ran, not even a plan
    right = run_cli(CliRunner(), cfg, "run", f"{JOBS}:WriteDigests", "--json")
    assert right.exit_code == 0, right.output
    assert json.loads(right.stdout)["counts"]["applied"] == N
    assert len(world.digest_rows(db.engine)) == N
