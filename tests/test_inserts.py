"""Insert and upsert jobs, end to end on every backend.

An insert job's ``compute`` returns the row(s) that must exist in its table; ``key`` is the
conflict key, verified against the table's real primary key or unique constraints before
anything runs. Inserts are planned (kind ``insert`` lines), applied compare-and-set (a key
taken since the plan is a conflict), audited (op ``insert``, column ``*``, the row as JSON),
idempotent, reverted only while the row still holds what was inserted, and applied exactly
once after ``kill -9``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from fillgate.values import encode_key

from conftest import TestDB, current_apply, finish_apply, kill_when, run_cli, start_apply

TS = "2024-05-01T06:00"

JOBS = f'''
from fillgate import FillMissing, Job, Overwrite


class WriteDigests(Job):
    """One digest per topic for the run at TS, keyed by (run_timestamp, topic)."""
    table = "digests"
    writes = "insert"
    key = ("run_timestamp", "topic")
    source_key = ("id",)
    columns = {{"summary": FillMissing(), "score": Overwrite()}}
    source = "SELECT id, name, articles FROM topics"

    def compute(self, row, ctx):
        if row["name"] == "boom":
            raise RuntimeError("no feed for topic boom")
        return {{"run_timestamp": "{TS}", "topic": row["name"],
                "summary": f"{{row['articles']}} articles about {{row['name']}}", "score": row["articles"]}}


class UpsertDigests(WriteDigests):
    writes = "upsert"


class TopicOnlyKey(WriteDigests):
    key = ("topic",)                       # only part of the UNIQUE (run_timestamp, topic)


class SummaryKey(WriteDigests):
    key = ("run_timestamp", "summary")     # no constraint at all
    columns = {{"topic": FillMissing()}}
'''

TOPICS = ["rust", "sql", "python", "go", "zig", "ocaml"]


def _create_digests(db: TestDB) -> None:
    auto = {"sqlite": "INTEGER PRIMARY KEY", "postgresql": "SERIAL PRIMARY KEY",
            "mysql": "INTEGER AUTO_INCREMENT PRIMARY KEY"}[db.backend]
    db.execute(
        f"CREATE TABLE digests (id {auto}, run_timestamp VARCHAR(32) NOT NULL, topic VARCHAR(64) NOT NULL, "
        "summary VARCHAR(200), score INTEGER, CONSTRAINT uq_digest UNIQUE (run_timestamp, topic))"
    )


def _setup(db: TestDB, tmp_path: Path, topics: list[str] = TOPICS) -> Path:
    db.execute("CREATE TABLE topics (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(64) NOT NULL, articles INTEGER)")
    db.execute("INSERT INTO topics (id, name, articles) VALUES (:id, :name, :a)",
               [{"id": i, "name": n, "a": 10 * i} for i, n in enumerate(topics, start=1)])
    _create_digests(db)
    (tmp_path / "digest_jobs.py").write_text(JOBS)
    cfg = db.config()
    assert run_cli(CliRunner(), cfg, "init").exit_code == 0
    return cfg


def _job(tmp_path: Path, name: str = "WriteDigests") -> str:
    return f"{tmp_path / 'digest_jobs.py'}:{name}"


def _digests(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT run_timestamp, topic, summary, score FROM digests ORDER BY topic")


def _expected(topics: list[str] = TOPICS) -> list[tuple[Any, ...]]:
    return sorted(((TS, n, f"{10 * i} articles about {n}", 10 * i) for i, n in enumerate(topics, start=1)),
                  key=lambda r: r[1])


def _plan(cfg: Path, job: str, out: str, expect: int = 0) -> dict[str, Any]:
    result = run_cli(CliRunner(), cfg, "plan", job, "-o", out, "--json")
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


def _apply(cfg: Path, plan: str, expect: int = 0) -> dict[str, Any]:
    result = run_cli(CliRunner(), cfg, "apply", plan, "--json")
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


def _audit(db: TestDB, run_id: str) -> list[tuple[Any, ...]]:
    return db.rows("SELECT row_key, column_name, op, old_value, new_value FROM fillgate_changes "
                   "WHERE run_id = :r ORDER BY row_key", {"r": run_id})


def test_insert_on_a_composite_unique_key_is_planned_applied_audited_and_idempotent(
    db: TestDB, tmp_path: Path
) -> None:
    cfg = _setup(db, tmp_path)
    planned = _plan(cfg, _job(tmp_path), "digests.plan")
    assert planned["counts"]["writes"] == planned["counts"]["inserts"] == len(TOPICS)
    assert planned["changes"] == len(TOPICS)
    assert _digests(db) == []  # a plan writes nothing

    header, *lines = (json.loads(line) for line in Path("digests.plan").read_text().splitlines())
    assert header["key"] == ["run_timestamp", "topic"]
    assert {line["kind"] for line in lines} == {"insert"}
    rust = next(line for line in lines if line["key"] == [TS, "rust"])
    assert rust["values"] == {"run_timestamp": TS, "topic": "rust", "summary": "10 articles about rust", "score": 10}

    applied = _apply(cfg, "digests.plan")
    assert applied["counts"] == {"applied": len(TOPICS), "conflicts": 0, "errors": 0}
    assert _digests(db) == _expected()

    audit = _audit(db, applied["run_id"])
    assert len(audit) == len(TOPICS)
    assert {(op, column) for _, column, op, _, _ in audit} == {("insert", "*")}
    by_key = {key: (old, new) for key, _, _, old, new in audit}
    old, new = by_key[encode_key([TS, "rust"])]
    assert old is None or json.loads(old) is None
    assert json.loads(new) == rust["values"]

    history = run_cli(CliRunner(), cfg, "history", "digests", f"{TS},rust", "--json")
    assert history.exit_code == 0, history.output
    (entry,) = json.loads(history.stdout)
    assert (entry["run_id"], entry["op"], entry["column_name"]) == (applied["run_id"], "insert", "*")
    assert entry["new_value"] == rust["values"]
    human = run_cli(CliRunner(), cfg, "history", "digests", f"{TS},rust")
    assert human.exit_code == 0 and "history of digests 2024-05-01T06:00,rust" in human.stdout

    again = _plan(cfg, _job(tmp_path), "again.plan")
    assert again["changes"] == again["counts"]["writes"] == again["counts"]["inserts"] == 0
    assert again["counts"]["unchanged"] == len(TOPICS)
    rerun = run_cli(CliRunner(), cfg, "run", _job(tmp_path), "--json")
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["counts"]["applied"] == 0
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == len(TOPICS)


def test_a_conflict_key_that_matches_no_constraint_is_an_error_before_anything_runs(
    db: TestDB, tmp_path: Path
) -> None:
    cfg = _setup(db, tmp_path)
    runs_before = db.scalar("SELECT count(*) FROM fillgate_runs")
    for name, columns in (("TopicOnlyKey", "topic"), ("SummaryKey", "run_timestamp, summary")):
        for command in ("plan", "run"):
            result = run_cli(CliRunner(), cfg, command, _job(tmp_path, name))
            assert result.exit_code == 2, (name, command, result.output)
            assert f"key ({columns}) of table 'digests' matches no primary key or unique constraint" in result.stderr
    assert db.scalar("SELECT count(*) FROM fillgate_runs") == runs_before  # not even a plan run
    assert _digests(db) == []


def test_an_insert_whose_key_was_taken_since_the_plan_is_a_conflict(db: TestDB, tmp_path: Path) -> None:
    cfg = _setup(db, tmp_path)
    _plan(cfg, _job(tmp_path), "digests.plan")
    # another writer gets there first
    db.execute("INSERT INTO digests (run_timestamp, topic, summary, score) VALUES (:ts, 'sql', 'written by hand', 7)",
               {"ts": TS})
    applied = _apply(cfg, "digests.plan", expect=1)
    assert applied["counts"] == {"applied": len(TOPICS) - 1, "conflicts": 1, "errors": 0}
    (conflict,) = applied["conflicts"]
    assert conflict["key"] == [TS, "sql"] and conflict["column"] == "*" and conflict["row_exists"]
    expected = [r if r[1] != "sql" else (TS, "sql", "written by hand", 7) for r in _expected()]
    assert _digests(db) == expected  # the existing row is untouched
    errors = db.rows("SELECT row_key, error_type, message FROM fillgate_errors WHERE run_id = :r",
                     {"r": applied["run_id"]})
    assert [(k, t) for k, t, _ in errors] == [(encode_key([TS, "sql"]), "Conflict")]
    assert "already exists" in errors[0][2] and "not inserted" in errors[0][2]
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": applied["run_id"]}) == 5


def test_upsert_updates_existing_rows_under_their_policies_and_inserts_missing_ones(
    db: TestDB, tmp_path: Path
) -> None:
    cfg = _setup(db, tmp_path)
    db.execute(
        "INSERT INTO digests (run_timestamp, topic, summary, score) VALUES (:ts, :t, :s, :score)",
        [{"ts": TS, "t": "rust", "s": None, "score": 1},              # summary missing, score stale
         {"ts": TS, "t": "sql", "s": "kept summary", "score": 20},     # summary kept (FillMissing), score same
         {"ts": "2023-01-01T00:00", "t": "go", "s": "old run", "score": 5}],  # another run: not this key
    )
    planned = _plan(cfg, _job(tmp_path, "UpsertDigests"), "upsert.plan")
    c = planned["counts"]
    assert (c["inserts"], c["writes"]) == (4, 6)  # 4 new rows + rust's summary and score
    assert c["skipped"] == 1  # sql's summary: FillMissing does not replace a stored value
    lines = [json.loads(line) for line in Path("upsert.plan").read_text().splitlines()[1:]]
    changes = sorted((tuple(line["key"]), line["column"], line["old"], line["new"])
                     for line in lines if line["kind"] == "change")
    assert changes == [((TS, "rust"), "score", 1, 10), ((TS, "rust"), "summary", None, "10 articles about rust")]
    assert sorted(line["key"][1] for line in lines if line["kind"] == "insert") == ["go", "ocaml", "python", "zig"]

    applied = _apply(cfg, "upsert.plan")
    assert applied["counts"]["applied"] == 6
    rows = {r[1]: r for r in _digests(db) if r[0] == TS}
    assert rows["rust"] == (TS, "rust", "10 articles about rust", 10)
    assert rows["sql"] == (TS, "sql", "kept summary", 20)
    assert rows["zig"] == (TS, "zig", "50 articles about zig", 50)
    assert ("2023-01-01T00:00", "go", "old run", 5) in _digests(db)
    ops = sorted((op, column) for _, column, op, _, _ in _audit(db, applied["run_id"]))
    assert ops == [("insert", "*")] * 4 + [("update", "score"), ("update", "summary")]
    assert _plan(cfg, _job(tmp_path, "UpsertDigests"), "again.plan")["changes"] == 0


def test_revert_deletes_only_inserted_rows_that_still_hold_what_was_inserted(db: TestDB, tmp_path: Path) -> None:
    cfg = _setup(db, tmp_path)
    _plan(cfg, _job(tmp_path), "digests.plan")
    applied = _apply(cfg, "digests.plan")
    db.execute("UPDATE digests SET summary = 'edited by an analyst' WHERE topic = 'go'")

    preview = run_cli(CliRunner(), cfg, "revert", applied["run_id"], "--dry-run", "--json")
    assert preview.exit_code == 0, preview.output
    assert (json.loads(preview.stdout)["revertible"], json.loads(preview.stdout)["conflicts"]) == (5, 1)

    reverted = run_cli(CliRunner(), cfg, "revert", applied["run_id"], "--json")
    assert reverted.exit_code == 1, reverted.output  # a conflict: the edited row stays
    undo = json.loads(reverted.stdout)
    assert undo["counts"] == {"applied": 5, "conflicts": 1, "errors": 0}
    assert _digests(db) == [(TS, "go", "edited by an analyst", 40)]
    assert {(op, column) for _, column, op, _, _ in _audit(db, undo["run_id"])} == {("delete", "*")}
    (conflict,) = db.rows("SELECT row_key, message FROM fillgate_errors WHERE run_id = :r", {"r": undo["run_id"]})
    assert conflict[0] == encode_key([TS, "go"]) and "changed since it was inserted" in conflict[1]

    redo = run_cli(CliRunner(), cfg, "revert", undo["run_id"], "--json")  # revert the revert
    assert redo.exit_code == 0, redo.output
    assert json.loads(redo.stdout)["counts"] == {"applied": 5, "conflicts": 0, "errors": 0}
    expected = [r if r[1] != "go" else (TS, "go", "edited by an analyst", 40) for r in _expected()]
    assert _digests(db) == expected
    history = json.loads(run_cli(CliRunner(), cfg, "history", "digests", f"{TS},rust", "--json").stdout)
    assert [e["op"] for e in history] == ["insert", "delete", "insert"]


def test_row_errors_of_an_insert_job_name_the_source_row(db: TestDB, tmp_path: Path) -> None:
    cfg = _setup(db, tmp_path, topics=["rust", "boom", "sql"])
    planned = _plan(cfg, _job(tmp_path), "digests.plan", expect=1)
    assert (planned["counts"]["errors"], planned["counts"]["inserts"]) == (1, 2)
    (error,) = db.rows("SELECT row_key, error_type, message FROM fillgate_errors WHERE run_id = :r",
                       {"r": planned["run_id"]})
    assert error == (encode_key([2]), "RuntimeError", "no feed for topic boom")  # topics.id 2, the source key
    line = next(json.loads(raw) for raw in Path("digests.plan").read_text().splitlines()[1:]
                if json.loads(raw)["kind"] == "error")
    assert line["key"] == [2]
    _apply(cfg, "digests.plan")
    assert [r[1] for r in _digests(db)] == ["rust", "sql"]


# --- kill -9 in the middle of an insert plan ----------------------------------------------------

CRASH_ROWS = 600
PACE = ("--batch-size", "15", "--pause-between-batches", "5")


def test_kill_and_resume_inserts_every_row_exactly_once(db: TestDB, tmp_path: Path) -> None:
    seed = int(os.environ.get("FILLGATE_CRASH_SEED") or random.randrange(2**32))
    print(f"insert crash test seed: {seed} (rerun with FILLGATE_CRASH_SEED={seed})")
    rng = random.Random(seed)
    topics = [f"topic{i:04d}" for i in range(1, CRASH_ROWS + 1)]
    cfg = _setup(db, tmp_path, topics=topics)
    planned = _plan(cfg, _job(tmp_path), "crash.plan")
    assert planned["changes"] == CRASH_ROWS

    def current() -> tuple[str, str, int] | None:
        return current_apply(db)

    def start(run_id: str | None) -> subprocess.Popen[str]:
        return start_apply(cfg, tmp_path, "crash.plan", run_id, PACE)

    def reached(target: int) -> Any:
        def check() -> bool:
            r = current()
            return r is not None and r[2] >= target
        return check

    # kill the apply, then a resume of it, each at a random point of progress (inside a batch
    # transaction or between two)
    log = []
    first = rng.randint(0, CRASH_ROWS // 3)
    log.append(f"apply killed past {first}: " + kill_when(start(None), reached(first), rng))
    run = current()
    assert run is not None and run[1] != "succeeded", (seed, log, run)
    done = run[2]
    second = rng.randint(done + 1, done + max(1, (CRASH_ROWS - done) // 2))
    log.append(f"resume from {done} killed past {second}: " + kill_when(start(run[0]), reached(second), rng))
    print("; ".join(log))

    finish_apply(db, cfg, "crash.plan", ("--batch-size", "50"), (seed, log))

    assert _digests(db) == _expected(topics), (seed, log)
    assert db.scalar("SELECT count(*) FROM digests") == CRASH_ROWS
    ((run_id, status, checkpoint),) = db.rows(
        "SELECT run_id, status, checkpoint FROM fillgate_runs WHERE kind = 'apply'")
    assert (status, checkpoint) == ("succeeded", CRASH_ROWS), (seed, log)
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE op = 'insert'") == CRASH_ROWS, (seed, log)
    assert db.rows("SELECT row_key FROM fillgate_changes GROUP BY row_key HAVING count(*) > 1") == [], (seed, log)
    counts = json.loads(db.scalar("SELECT counts FROM fillgate_runs WHERE run_id = :r", {"r": run_id}))
    assert counts == {"applied": CRASH_ROWS, "conflicts": 0, "errors": 0}, (seed, log)
    assert db.scalar("SELECT count(*) FROM fillgate_errors") == 0, (seed, log)
