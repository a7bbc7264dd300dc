"""The audit log's integrity, on every backend: every rewrite path the database can refuse is
refused, values and keys of any size are audited in full, and ``fillgate verify`` proves an
untouched log untouched and names what an owner who bypassed the guards changed."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fillgate.errors import UsageError
from fillgate.ledger import Ledger
from fillgate.ledger import schema as ledger_schema
from fillgate.ledger.chain import AuditChain
from fillgate.ledger.integrity import check_run, read_anchors
from fillgate.values import dumps

from conftest import TestDB, current_apply, finish_apply, kill_when, run_cli, start_apply

CHANGES_COLUMNS = ("id, run_id, table_name, row_key, column_name, op, old_value, new_value, source, changed_at, "
                   "seq, chain_sha256")
ERRORS_COLUMNS = "id, run_id, phase, row_key, column_name, error_type, message, fingerprint, traceback, created_at"
PACKED_COLUMNS = ("id, run_id, batch, table_name, source, changed_at, first_seq, n_changes, column_names, changes, "
                  "chain_sha256")
APPEND_ONLY = ("fillgate_audit_batches", "fillgate_errors")


def _contents(db: TestDB) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Everything the two append-only tables hold (the audit log packed, and as its view shows it)."""
    return (db.rows(f"SELECT {PACKED_COLUMNS} FROM fillgate_audit_batches ORDER BY id"),
            db.rows(f"SELECT {ERRORS_COLUMNS} FROM fillgate_errors ORDER BY id"),
            db.rows(f"SELECT {CHANGES_COLUMNS} FROM fillgate_changes ORDER BY id"))


def _setup(db: TestDB, cli: CliRunner, n: int = 10) -> Path:
    """``n`` people, every other one without email; two named 'boom' (their compute fails)."""
    db.create_people(n)
    db.execute("UPDATE people SET name = 'boom' WHERE id IN (1, 3)")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    return cfg


def _apply(cli: CliRunner, cfg: Path, jobs_file: Path, *options: str) -> str:
    done = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--json", *options)
    assert done.exit_code in (0, 1), done.output  # 1: the 'boom' rows' compute errors
    return str(json.loads(done.stdout)["run_id"])


def _verify(cli: CliRunner, cfg: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = run_cli(cli, cfg, "verify", "--json", *args)
    assert done.exit_code in (0, 4), done.output
    return done.exit_code, json.loads(done.stdout)


def _bypass_guards(db: TestDB) -> None:
    """What the owner of the tables can do: drop or disable the triggers."""
    if db.backend == "postgresql":
        db.execute("ALTER TABLE fillgate_audit_batches DISABLE TRIGGER fillgate_audit_batches_no_modify")
    else:
        db.execute("DROP TRIGGER fillgate_audit_batches_no_update")
        db.execute("DROP TRIGGER fillgate_audit_batches_no_delete")


def _batches(db: TestDB, run_id: str) -> list[Any]:
    """The run's packed audit rows: (id, first_seq, n_changes, changes, chain_sha256)."""
    return db.rows("SELECT id, first_seq, n_changes, changes, chain_sha256 FROM fillgate_audit_batches "
                   "WHERE run_id = :r ORDER BY id", {"r": run_id})


def _rewrite_batch(db: TestDB, batch_id: int, **values: Any) -> None:
    """What an owner who bypassed the guards can do: rewrite a packed row."""
    assign = ", ".join(f"{name} = :{name}" for name in values)
    db.execute(f"UPDATE fillgate_audit_batches SET {assign} WHERE id = :i", {**values, "i": batch_id})


# --- 1. every rewrite path the database can stop is stopped ---------------------------------------


def _rewrites(db: TestDB, table: str, row_id: int) -> list[tuple[str, str]]:
    """(statement, what the refusal says) for every way to rewrite ``table`` on this backend."""
    if table == "fillgate_audit_batches":
        columns = "id, run_id, batch, table_name, source, changed_at, n_changes, column_names, changes"
        values = f"{row_id}, 'FORGED', 1, 'people', 'x', '2020-01-01 00:00:00', 0, '[]', '[]'"
        assign = "changes = '[]'"
    else:
        columns = "id, run_id, phase, error_type, message, fingerprint, created_at"
        values = f"{row_id}, 'FORGED', 'plan', 'X', 'forged', 'f', '2020-01-01 00:00:00'"
        assign = "message = 'forged'"
    refused = f"{table} is append-only"
    out = [
        (f"UPDATE {table} SET {assign} WHERE id = {row_id}", refused),
        (f"UPDATE {table} SET run_id = 'FORGED'", refused),
        (f"DELETE FROM {table} WHERE id = {row_id}", refused),
        (f"DELETE FROM {table}", refused),
    ]
    if db.backend == "sqlite":
        out += [
            (f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({values})", refused),
            (f"REPLACE INTO {table} ({columns}) VALUES ({values})", refused),
            (f"INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT (id) DO UPDATE SET {assign}", refused),
            (f"UPDATE OR REPLACE {table} SET {assign} WHERE id = {row_id}", refused),
            (f"UPDATE OR REPLACE {table} SET id = {row_id} WHERE id <> {row_id}", refused),
        ]
    elif db.backend == "postgresql":
        out += [
            (f"TRUNCATE {table}", refused),
            (f"TRUNCATE {table} CASCADE", refused),
            (f"INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT (id) DO UPDATE SET {assign}", refused),
        ]
        if db.scalar("SHOW server_version_num") >= "150000":
            out += [
                (f"MERGE INTO {table} t USING (SELECT {row_id} AS id) s ON t.id = s.id "
                 f"WHEN MATCHED THEN UPDATE SET {assign}", refused),
                (f"MERGE INTO {table} t USING (SELECT {row_id} AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE",
                 refused),
            ]
    else:
        out += [
            (f"TRUNCATE {table}", refused),  # the guard table's foreign key is named so
            (f"REPLACE INTO {table} ({columns}) VALUES ({values})", refused),
            (f"INSERT INTO {table} ({columns}) VALUES ({values}) ON DUPLICATE KEY UPDATE {assign}", refused),
            (f"DROP TABLE {table}", "foreign key constraint fails"),
        ]
    return out


def _view_rewrites(row_id: int) -> list[str]:
    """Writes through the view: no database takes them (it unpacks a JSON array)."""
    return [f"UPDATE fillgate_changes SET new_value = '\"forged\"' WHERE id = {row_id}",
            f"DELETE FROM fillgate_changes WHERE id = {row_id}", "DELETE FROM fillgate_changes",
            "INSERT INTO fillgate_changes (run_id, table_name, row_key, column_name, op, old_value, new_value, source, "
            "changed_at) VALUES ('FORGED', 'people', '[2]', 'email', 'update', 'null', 'null', 'x', "
            "'2020-01-01 00:00:00')"]


def test_every_rewrite_path_is_refused_by_the_database(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _setup(db, cli)
    run_id = _apply(cli, cfg, jobs_file, "--batch-size", "1")
    before = _contents(db)
    # 3 emails filled (one batch each), 2 compute errors
    assert len(before[0]) == 3 and len(before[1]) == 2 and len(before[2]) == 3
    for table, rows in zip(APPEND_ONLY, before, strict=False):
        for statement, refusal in _rewrites(db, table, rows[0][0]):
            with pytest.raises(sa.exc.DBAPIError, match=refusal):
                db.execute(statement)
    for statement in _view_rewrites(before[2][0][0]):
        with pytest.raises(sa.exc.DBAPIError):
            db.execute(statement)
    if db.backend == "postgresql":  # a superuser's replica mode does not silence the triggers
        for statement in ("DELETE FROM fillgate_audit_batches", "TRUNCATE fillgate_errors"):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), db.engine.begin() as conn:
                conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
                conn.exec_driver_sql(statement)
    assert _contents(db) == before
    # appending still works: a revert adds its own rows, and the log verifies
    assert run_cli(cli, cfg, "revert", run_id).exit_code == 0
    after = _contents(db)
    assert after[0][:3] == before[0] and len(after[2]) == 6 and after[2][:3] == before[2]
    assert _verify(cli, cfg)[0] == 0


# --- 2. values and keys of any size --------------------------------------------------------------

BIG_JOBS = '''
from fillgate import Job, FillMissing, Overwrite


def big(i):
    """About 100 KiB of text (more in UTF-8), different for every row."""
    return f"{i}:" + ("é🎉 ünïcödé " + str(i) * 7) * 5800


class Rewrite(Job):
    table = "notes"
    key = ("id",)
    columns = {"body": Overwrite()}
    source = "SELECT id, body FROM notes"

    def compute(self, row, ctx):
        return {"body": big(row["id"])}


class FillTitle(Job):
    table = "pages"
    key = ("url",)
    columns = {"title": FillMissing()}
    source = "SELECT url, title FROM pages"

    def compute(self, row, ctx):
        if row["url"].endswith("fail"):
            raise ValueError("no title for " + row["url"])
        return {"title": "title of " + row["url"][-8:]}
'''


def _big_jobs(tmp_path: Path) -> tuple[Path, Any]:
    path = tmp_path / "big_jobs.py"
    path.write_text(BIG_JOBS)
    namespace: dict[str, Any] = {}
    exec(compile(BIG_JOBS.split("\n\nclass ")[0], "big", "exec"), namespace)
    return path, namespace["big"]


def test_a_100_kib_value_is_applied_audited_shown_and_reverted(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    jobs, big = _big_jobs(tmp_path)
    assert len(big(3)) > 100 * 1024 and len(big(3).encode()) > 130 * 1024
    text = "LONGTEXT" if db.backend == "mysql" else "TEXT"
    db.execute(f"CREATE TABLE notes (id INTEGER NOT NULL PRIMARY KEY, body {text})")
    db.execute("INSERT INTO notes (id, body) VALUES (:id, :body)", [{"id": i, "body": f"old {i}"} for i in (1, 2, 3)])
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    done = run_cli(cli, cfg, "run", f"{jobs}:Rewrite", "--json", "--batch-size", "2")
    assert done.exit_code == 0, done.output
    run_id = json.loads(done.stdout)["run_id"]
    assert db.rows("SELECT id, body FROM notes ORDER BY id") == [(i, big(i)) for i in (1, 2, 3)]
    audited = db.rows("SELECT row_key, old_value, new_value FROM fillgate_changes WHERE run_id = :r ORDER BY id",
                      {"r": run_id})
    assert audited == [(f"[{i}]", dumps(f"old {i}"), dumps(big(i))) for i in (1, 2, 3)]
    history = run_cli(cli, cfg, "history", "notes", "2", "--json")
    assert history.exit_code == 0, history.output
    assert [(e["old_value"], e["new_value"]) for e in json.loads(history.stdout)] == [("old 2", big(2))]
    reverted = run_cli(cli, cfg, "revert", run_id, "--json")
    assert reverted.exit_code == 0, reverted.output
    assert db.rows("SELECT id, body FROM notes ORDER BY id") == [(i, f"old {i}") for i in (1, 2, 3)]
    assert _verify(cli, cfg)[0] == 0


def test_a_key_longer_than_512_characters_is_audited_and_reverted(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    jobs, _ = _big_jobs(tmp_path)
    db.execute("CREATE TABLE pages (url VARCHAR(700) NOT NULL PRIMARY KEY, title VARCHAR(100))")
    rng = random.Random(7)
    urls = ["https://example.org/" + "".join(rng.choice("abcdefghij0123456789") for _ in range(670)) + f"{i:04d}"
            for i in range(4)]
    urls.append(urls[0][:-8] + "....fail")
    assert all(len(u) == 694 for u in urls)
    db.execute("INSERT INTO pages (url, title) VALUES (:u, NULL)", [{"u": u} for u in urls])
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    done = run_cli(cli, cfg, "run", f"{jobs}:FillTitle", "--json")
    assert done.exit_code == 1, done.output  # the plan's one row error
    run_id = json.loads(done.stdout)["run_id"]
    assert json.loads(done.stdout)["counts"]["applied"] == 4
    assert db.rows("SELECT row_key FROM fillgate_errors") == [(json.dumps([urls[4]]),)]
    assert sorted(r[0] for r in db.rows("SELECT row_key FROM fillgate_changes")) == sorted(
        json.dumps([u]) for u in urls[:4])
    history = run_cli(cli, cfg, "history", "pages", json.dumps([urls[2]]), "--json")
    assert history.exit_code == 0, history.output
    assert [e["new_value"] for e in json.loads(history.stdout)] == [f"title of {urls[2][-8:]}"]
    assert run_cli(cli, cfg, "revert", run_id).exit_code == 0
    assert db.scalar("SELECT count(*) FROM pages WHERE title IS NOT NULL") == 0
    assert _verify(cli, cfg)[0] == 0


# --- 3. verify: an untouched ledger verifies --------------------------------------------------------


def test_verify_is_ok_after_apply_kill_resume_and_revert_and_matches_events_and_show(
    db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path
) -> None:
    n = 600
    db.create_people(n, with_email_every=n + 1)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan")
    assert planned.exit_code == 0, planned.output
    options = ("--batch-size", "10", "--pause-between-batches", "5")
    events = ("--events", str(tmp_path / "events.jsonl"))

    def past(checkpoint: int) -> Any:
        return lambda: (run := current_apply(db)) is not None and run[2] >= checkpoint

    proc = start_apply(cfg, tmp_path, "p.plan", None, (*options, *events))
    log = [kill_when(proc, past(100), random.Random(1))]
    run = current_apply(db)
    assert run is not None and 0 < run[2] < n, log  # killed part way
    finish_apply(db, cfg, "p.plan", (*options[:2], *events), log)
    run_id = str(current_apply(db)[0])  # type: ignore[index]
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == n
    reverted = run_cli(cli, cfg, "revert", run_id, "--json", "--batch-size", "64", *events)
    assert reverted.exit_code == 0, reverted.output
    revert_id = json.loads(reverted.stdout)["run_id"]

    code, report = _verify(cli, cfg)
    assert code == 0, report
    assert [(r["run_id"], r["state"], r["rows"]) for r in report["runs"]] == [
        (run_id, "ok", n), (revert_id, "ok", n)]
    assert report["findings"] == []
    recorded = dict(db.rows("SELECT run_id, audit_sha256 FROM fillgate_runs WHERE kind IN ('apply', 'revert')"))
    assert {r["run_id"]: r["computed_sha256"] for r in report["runs"]} == recorded
    # the run_finished events recorded the same chain heads (the killed process wrote none)
    finished = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    finished = [e for e in finished if e["event"] == "run_finished"]
    assert {e["run_id"]: e["audit_sha256"] for e in finished} == recorded
    assert [e["audit_rows"] for e in finished if e["run_id"] == revert_id] == [n]
    code, report = _verify(cli, cfg, *events)
    assert code == 0 and report["anchors"]["checked"] == len(finished) >= 2, report
    # fillgate show prints the same hash, whole
    shown = run_cli(cli, cfg, "show", run_id)
    assert shown.exit_code == 0 and f"audit: {n} rows, sha256 {recorded[run_id]}" in shown.stdout
    one = run_cli(cli, cfg, "verify", revert_id)
    assert one.exit_code == 0 and "matches its tamper evidence (1 run checked)" in one.stdout, one.output


def test_verify_of_a_run_still_writing_checks_what_it_committed(
    db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path
) -> None:
    """verify read the run's record, then the run committed more batches before verify read
    its rows: the rows past the record are not 'added', the record is read again."""
    cfg, run_id, rows = _chained_run(db, cli, jobs_file, tmp_path)
    ledger = Ledger(db.engine)
    earlier = ledger.get_run(run_id)
    head = db.scalar("SELECT chain_sha256 FROM fillgate_changes WHERE id = :i", {"i": rows[2][0]})
    earlier.audit_rows, earlier.audit_sha256, earlier.status = 3, head, "running"
    earlier.counts = {**earlier.counts, "applied": 3}
    check = check_run(ledger, earlier)
    assert (check.state, check.rows, check.recorded_rows, check.status, check.findings) == (
        "ok", 10, 10, "succeeded", [])
    assert _verify(cli, cfg)[0] == 0


def test_verify_of_a_run_that_is_not_an_apply_and_of_an_empty_ledger(
    sqlite_db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    cfg = _setup(sqlite_db, cli)
    empty = run_cli(cli, cfg, "verify")
    assert empty.exit_code == 0 and "no audit rows to verify" in empty.stdout
    plan = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--json")
    plan_id = json.loads(plan.stdout)["run_id"]
    refused = run_cli(cli, cfg, "verify", plan_id)
    assert refused.exit_code == 2 and "plan run" in refused.stderr
    missing = run_cli(cli, cfg, "verify", "01NOSUCHRUN")
    assert missing.exit_code == 2 and "no run" in missing.stderr


# --- 4. verify: what an owner who bypasses the guards changed ---------------------------------------


def _tampered(report: dict[str, Any], run_id: str) -> dict[str, Any]:
    (check,) = [r for r in report["runs"] if r["run_id"] == run_id]
    assert check["state"] == "tampered", report
    return check


def _chained_run(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> tuple[Path, str, list[Any]]:
    """An apply of 10 changes in batches of 3 (events in events.jsonl), and its audit rows."""
    db.create_people(20)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    run_id = _apply(cli, cfg, jobs_file, "--batch-size", "3", "--events", str(tmp_path / "events.jsonl"))
    rows = db.rows("SELECT id, seq FROM fillgate_changes WHERE run_id = :r ORDER BY id", {"r": run_id})
    assert [seq for _, seq in rows] == list(range(1, 11))
    code, report = _verify(cli, cfg, run_id)
    assert code == 0, report
    return cfg, run_id, rows


def test_verify_names_a_deleted_batch(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    cfg, run_id, rows = _chained_run(db, cli, jobs_file, tmp_path)
    _bypass_guards(db)
    batches = _batches(db, run_id)
    db.execute("DELETE FROM fillgate_audit_batches WHERE id = :i", {"i": batches[1][0]})  # positions 4-6
    done = run_cli(cli, cfg, "verify")
    assert done.exit_code == 4, done.output
    assert f"run {run_id}" in done.stdout and "3 rows missing: positions 4-6 of the run" in done.stdout
    assert f"after row id {rows[2][0]} and before row id {rows[6][0]}" in done.stdout
    check = _tampered(_verify(cli, cfg, run_id)[1], run_id)
    assert (check["missing"], check["added"], check["altered"]) == (3, 0, 0)
    assert check["findings"][0]["kind"] == "missing" and check["findings"][0]["seq"] == 4
    assert check["rows"] == 7 and check["recorded_rows"] == 10


def test_verify_names_a_row_removed_from_its_batch(db: TestDB, cli: CliRunner, jobs_file: Path,
                                                   tmp_path: Path) -> None:
    cfg, run_id, _ = _chained_run(db, cli, jobs_file, tmp_path)
    _bypass_guards(db)
    batch_id, _, _, changes, _ = _batches(db, run_id)[1]
    entries = json.loads(changes)
    del entries[0]  # position 4
    _rewrite_batch(db, batch_id, changes=json.dumps(entries))
    check = _tampered(_verify(cli, cfg, run_id)[1], run_id)
    assert [f["kind"] for f in check["findings"]] == ["altered"]  # the batch's row count no longer agrees
    _rewrite_batch(db, batch_id, n_changes=2)  # and with the count made to agree, the chain does not
    check = _tampered(_verify(cli, cfg, run_id)[1], run_id)
    kinds = [(f["kind"], f["seq"]) for f in check["findings"]]
    assert kinds[0] == ("altered", 4) and ("missing", 6) in kinds and check["rows"] == 9


def test_verify_names_an_altered_value(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    cfg, run_id, rows = _chained_run(db, cli, jobs_file, tmp_path)
    _bypass_guards(db)
    batches = _batches(db, run_id)
    entries = json.loads(batches[2][3])  # positions 7-9
    entries[0][4] = '"attacker@evil.org"'
    _rewrite_batch(db, batches[2][0], changes=json.dumps(entries))
    assert db.scalar("SELECT new_value FROM fillgate_changes WHERE id = :i", {"i": rows[6][0]}) == \
        '"attacker@evil.org"'
    code, report = _verify(cli, cfg)
    assert code == 4
    check = _tampered(report, run_id)
    # the batch keeps one chain value: the finding names the batch's rows (positions 7-9)
    assert (check["missing"], check["added"], check["altered"]) == (0, 0, 3)
    assert [(f["kind"], f["row_id"], f["seq"], f["rows"]) for f in check["findings"]] == [
        ("altered", rows[6][0], 7, 3)]
    # changing only the time of a change is caught too
    _rewrite_batch(db, batches[0][0], changed_at=dt.datetime(2001, 2, 3, 4, 5, 6))
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert [(f["kind"], f["seq"]) for f in check["findings"]] == [("altered", 1), ("altered", 7)]


def test_verify_names_added_rows_and_orphans(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    cfg, run_id, _ = _chained_run(db, cli, jobs_file, tmp_path)
    copy = ("INSERT INTO fillgate_audit_batches (run_id, batch, table_name, source, changed_at, first_seq, n_changes, "
            "column_names, changes, chain_sha256) SELECT {run}, batch, table_name, source, changed_at, {seq}, "
            "n_changes, column_names, changes, chain_sha256 FROM fillgate_audit_batches WHERE id = :i")
    last = _batches(db, run_id)[-1][0]  # position 10, alone in its batch
    # appending needs no bypass: a copy of position 10, a row without evidence, a row of no run
    db.execute(copy.format(run="run_id", seq="first_seq"), {"i": last})
    db.execute(copy.format(run="run_id", seq="NULL"), {"i": last})
    db.execute(copy.format(run="'01NOSUCHRUN000000000000000'", seq="first_seq"), {"i": last})
    added = [r[0] for r in db.rows("SELECT id FROM fillgate_changes ORDER BY id")][-3:]
    done = run_cli(cli, cfg, "verify")
    assert done.exit_code == 4, done.output
    assert "01NOSUCHRUN000000000000000" in done.stdout
    report = _verify(cli, cfg)[1]
    check = _tampered(report, run_id)
    assert (check["missing"], check["added"], check["altered"]) == (0, 2, 0)
    assert [(f["kind"], f["row_id"]) for f in check["findings"]] == [("added", added[0]), ("added", added[1])]
    assert "claims position 10, which an earlier row of the run holds" in check["findings"][0]["message"]
    assert [(f["kind"], f["row_id"]) for f in report["findings"]] == [("orphan", added[2])]


def test_verify_names_a_changed_run_record(db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path) -> None:
    cfg, run_id, _ = _chained_run(db, cli, jobs_file, tmp_path)
    db.execute("UPDATE fillgate_runs SET audit_sha256 = :h WHERE run_id = :r", {"h": "0" * 64, "r": run_id})
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert [f["kind"] for f in check["findings"]] == ["record"]
    # stripping the run of its evidence does not make it look like a run from before it existed
    db.execute("UPDATE fillgate_runs SET audit_sha256 = NULL, audit_rows = NULL WHERE run_id = :r", {"r": run_id})
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert "10 of its rows carry one" in check["findings"][0]["message"]


def test_a_rechained_log_passes_verify_but_not_the_events_it_sent(
    db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path
) -> None:
    """An owner who deletes a row and recomputes the chain fools the database; the chain head
    in the run_finished event they could not rewrite catches it."""
    cfg, run_id, _ = _chained_run(db, cli, jobs_file, tmp_path)
    _bypass_guards(db)
    with db.engine.begin() as conn:
        b = ledger_schema.audit_batches.c
        batches = conn.execute(sa.select(ledger_schema.audit_batches).where(b.run_id == run_id).order_by(b.id)).all()
        chain = AuditChain.start(run_id, version=2)  # the run's chain links whole batches
        for number, batch in enumerate(batches):
            entries = json.loads(batch.changes)
            if number == 1:
                del entries[1]  # position 5
            first, text = chain.rows + 1, json.dumps(entries)
            chain = chain.follow_batch(run_id, batch.table_name, batch.source, batch.changed_at, entries, text)
            conn.execute(sa.update(ledger_schema.audit_batches).where(b.id == batch.id).values(
                changes=text, n_changes=len(entries), first_seq=first, chain_sha256=chain.sha256))
        chain_head = chain.sha256
        conn.execute(sa.update(ledger_schema.runs).where(ledger_schema.runs.c.run_id == run_id).values(
            audit_rows=9, audit_sha256=chain_head, counts=json.dumps({"applied": 9, "conflicts": 0, "converted": 0,
                                                                "errors": 0})))
    assert _verify(cli, cfg)[0] == 0  # what the database alone can tell
    done = run_cli(cli, cfg, "verify", "--events", str(tmp_path / "events.jsonl"))
    assert done.exit_code == 4, done.output
    assert f"run {run_id}" in done.stdout and "events.jsonl:" in done.stdout and "rewritten" in done.stdout
    check = _tampered(_verify(cli, cfg, "--events", str(tmp_path / "events.jsonl"))[1], run_id)
    assert [(f["kind"], f["seq"]) for f in check["findings"]] == [("anchor", 10)]


def test_a_run_lost_from_the_ledger_is_named_by_its_events(
    db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path
) -> None:
    cfg, run_id, _ = _chained_run(db, cli, jobs_file, tmp_path)
    _bypass_guards(db)
    db.execute("DELETE FROM fillgate_audit_batches WHERE run_id = :r", {"r": run_id})
    db.execute("DELETE FROM fillgate_runs WHERE run_id = :r", {"r": run_id})
    assert _verify(cli, cfg)[0] == 0
    code, report = _verify(cli, cfg, "--events", str(tmp_path / "events.jsonl"))
    assert code == 4
    assert [(f["kind"], run_id in f["message"]) for f in report["findings"]] == [("run_missing", True)]


def test_verify_reports_garbled_rows_and_a_dropped_table_without_a_traceback(
    sqlite_db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path
) -> None:
    """SQLite stores any value in any column: a tampered row may hold what fillgate never writes."""
    cfg, run_id, rows = _chained_run(sqlite_db, cli, jobs_file, tmp_path)
    _bypass_guards(sqlite_db)
    batches = _batches(sqlite_db, run_id)
    _rewrite_batch(sqlite_db, batches[0][0], first_seq="two")
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert [(f["kind"], f["row_id"]) for f in check["findings"]][:1] == [("altered", rows[0][0])]
    _rewrite_batch(sqlite_db, batches[1][0], changes="[[1, 2")
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert any("cannot be read back as fillgate wrote it" in f["message"] for f in check["findings"]), check
    _rewrite_batch(sqlite_db, batches[2][0], changed_at="yesterday")
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert "cannot be read back as fillgate wrote them" in check["findings"][0]["message"]
    sqlite_db.execute("DROP TABLE fillgate_audit_batches")
    done = run_cli(cli, cfg, "verify")
    assert done.exit_code == 4 and "fillgate_audit_batches does not exist" in done.stdout, done.output


def test_mariadb_truncate_after_disabling_foreign_key_checks_is_detected(
    db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path
) -> None:
    if db.backend != "mysql":
        pytest.skip("MariaDB/MySQL: foreign_key_checks")
    cfg, run_id, _ = _chained_run(db, cli, jobs_file, tmp_path)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("SET foreign_key_checks = 0")
        conn.exec_driver_sql("TRUNCATE fillgate_audit_batches")
        conn.exec_driver_sql("SET foreign_key_checks = 1")
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert check["missing"] == 10 and check["findings"][0]["message"].startswith("10 rows missing: positions 1-10")


# --- 5. a ledger made before tamper evidence ------------------------------------------------------


def _legacy_ledger(db: TestDB) -> dict[str, Any]:
    """A ledger at revision 0002 holding what fillgate wrote then: an init, an apply of three
    emails, and a revert of it that failed after its first change (resumable)."""
    ledger = Ledger(db.engine)
    with db.engine.begin() as conn:
        command.upgrade(ledger._alembic_config(conn), "0002_run_details")
    db.create_people(6, with_email_every=7)
    when = "2026-01-02 03:04:05.123456"
    db.execute("INSERT INTO fillgate_meta (name, value) VALUES ('environment', 'staging'), "
               "('database_id', '01LEGACYDB0000000000000000'), ('stamped_at', '2026-01-02T03:04:05Z'), "
               "('stamped_by', 'old@host')")
    ids = {"apply": "01JAAAAAAAAAAAAAAAAAAAAAAA", "revert": "01JBBBBBBBBBBBBBBBBBBBBBBB"}
    runs = [
        {"run_id": "01J0000000000000000000000I", "kind": "init", "job": None, "status": "succeeded",
         "args": {"from": None, "to": "staging"}, "counts": {}, "checkpoint": 0, "total": None, "parent": None},
        {"run_id": ids["apply"], "kind": "apply", "job": "jobs:FillEmail", "status": "succeeded",
         "args": {"key": ["id"], "source": "jobs:FillEmail", "batch_size": 5000, "max_changes": None},
         "counts": {"applied": 3, "conflicts": 0, "errors": 0, "converted": 0}, "checkpoint": 3, "total": 3,
         "parent": None},
        {"run_id": ids["revert"], "kind": "revert", "job": "jobs:FillEmail", "status": "failed",
         "args": {"key": ["id"], "source": f"revert:{ids['apply']}", "batch_size": 1},
         "counts": {"applied": 1, "conflicts": 0, "errors": 0, "converted": 0}, "checkpoint": 1, "total": 3,
         "parent": ids["apply"]},
    ]
    db.execute(
        "INSERT INTO fillgate_runs (run_id, kind, job, table_name, target, environment, operator, args, status, "
        "parent_run_id, counts, checkpoint, total, created_at, started_at, finished_at, host, pid) VALUES "
        "(:run_id, :kind, :job, 'people', 'staging', 'staging', 'old@host', :args, :status, :parent, :counts, "
        ":checkpoint, :total, :when, :when, :when, 'host', 1)",
        [{**r, "args": json.dumps(r["args"]), "counts": json.dumps(r["counts"]), "when": when} for r in runs],
    )
    changes = [(ids["apply"], i, "null", dumps(f"person{i}@example.com"), "jobs:FillEmail") for i in (1, 2, 3)]
    changes.append((ids["revert"], 1, dumps("person1@example.com"), "null", f"revert:{ids['apply']}"))
    db.execute(
        "INSERT INTO fillgate_changes (run_id, table_name, row_key, column_name, op, old_value, new_value, source, "
        "changed_at) VALUES (:run, 'people', :key, 'email', 'update', :old, :new, :source, :when)",
        [{"run": r, "key": f"[{i}]", "old": old, "new": new, "source": s, "when": when}
         for r, i, old, new, s in changes],
    )
    db.execute("INSERT INTO fillgate_errors (run_id, phase, row_key, error_type, message, fingerprint, created_at) "
               "VALUES (:run, 'apply', :key, 'Conflict', 'then', 'f0', :when)",
               [{"run": ids["apply"], "key": f"[{i}]", "when": when} for i in (8, 9)])
    db.execute("UPDATE people SET email = 'person' || id || '@example.com' WHERE id IN (2, 3)"
               if db.backend != "mysql" else
               "UPDATE people SET email = CONCAT('person', id, '@example.com') WHERE id IN (2, 3)")
    return ids


def test_a_ledger_from_before_tamper_evidence_is_upgraded_keeping_every_row(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    ids = _legacy_ledger(db)
    old_columns = CHANGES_COLUMNS.rsplit(", seq", 1)[0].removeprefix("id, ")  # ids change in revision 0005
    before = (db.rows(f"SELECT {old_columns} FROM fillgate_changes ORDER BY id"),
              db.rows(f"SELECT {ERRORS_COLUMNS} FROM fillgate_errors ORDER BY id"),
              db.rows("SELECT run_id, kind, status, args, counts, checkpoint FROM fillgate_runs ORDER BY run_id"))
    cfg = db.config()
    stale = run_cli(cli, cfg, "runs")
    assert stale.exit_code == 2 and "0002_run_details" in stale.stderr and "fillgate init" in stale.stderr
    upgraded = run_cli(cli, cfg, "init")
    assert upgraded.exit_code == 0, upgraded.output
    assert db.scalar("SELECT version_num FROM fillgate_alembic_version") == Ledger(db.engine).head_revision()
    after = (db.rows(f"SELECT {old_columns} FROM fillgate_changes ORDER BY id"),
             db.rows(f"SELECT {ERRORS_COLUMNS} FROM fillgate_errors ORDER BY id"),
             db.rows("SELECT run_id, kind, status, args, counts, checkpoint FROM fillgate_runs ORDER BY run_id"))
    assert after == before and len(after[0]) == 4
    assert db.rows("SELECT DISTINCT seq, chain_sha256 FROM fillgate_changes") == [(None, None)]

    done = run_cli(cli, cfg, "verify")
    assert done.exit_code == 0, done.output
    assert "2 runs predate tamper evidence" in done.stdout
    # the failed revert resumes (its rows stay without evidence), then a new run has it
    assert run_cli(cli, cfg, "resume", ids["revert"]).exit_code == 0
    assert db.rows("SELECT id, email FROM people ORDER BY id") == [(i, None) for i in range(1, 7)]
    new = _apply(cli, cfg, jobs_file)
    code, report = _verify(cli, cfg)
    assert code == 0, report
    assert [(r["run_id"], r["state"], r["rows"]) for r in report["runs"]] == [
        (ids["apply"], "predates", 3), (ids["revert"], "predates", 3), (new, "ok", 6)]
    shown = run_cli(cli, cfg, "show", ids["apply"])
    assert "no tamper evidence (the run predates it)" in shown.stdout
    # the upgraded ledger refuses rewrites like a new one
    rows = _contents(db)
    for table, contents in zip(APPEND_ONLY, rows, strict=False):
        for statement, refusal in _rewrites(db, table, contents[0][0]):
            with pytest.raises(sa.exc.DBAPIError, match=refusal):
                db.execute(statement)
    assert _contents(db) == rows
    _assert_schema_matches(db)


# --- 6. the migrated schema is schema.py --------------------------------------------------------


def _assert_schema_matches(db: TestDB) -> None:
    """The tables the migrations made are the ones ``fillgate.ledger.schema`` declares: columns,
    types, nullability, indexes (the kind of index too), foreign keys and the guards."""
    guard = db.backend == "mysql"

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "table":
            return bool(name and name.startswith("fillgate_") and name != ledger_schema.VERSION_TABLE
                        and (guard or name != "fillgate_audit_guard"))
        return True

    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include})
        assert compare_metadata(context, ledger_schema.metadata) == []
        inspector = sa.inspect(conn)
        tables = {t for t in inspector.get_table_names() if t.startswith("fillgate_")}
        declared_tables = {t.name for t in ledger_schema.metadata.sorted_tables}
        assert tables == (declared_tables if guard else declared_tables - {"fillgate_audit_guard"}) | {
            ledger_schema.VERSION_TABLE}
        for table in ledger_schema.metadata.sorted_tables:
            if table.name not in tables:
                continue
            declared = {i.name: [c.name for c in i.columns] for i in table.indexes}
            found = {i["name"]: i["column_names"] for i in inspector.get_indexes(table.name)
                     if i["name"].startswith("ix_")}  # not the ones MariaDB adds for foreign keys
            assert found == declared, table.name
        assert "fillgate_changes" in inspector.get_view_names()
        if db.backend == "postgresql":
            triggers = conn.exec_driver_sql(
                "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal "
                "ORDER BY 1, 2").all()
            expected = [(t, f"{t}_{n}", "A") for t in ledger_schema.APPEND_ONLY_TABLES
                        for n in ("no_modify", "no_truncate")]
        elif db.backend == "mysql":
            triggers = conn.exec_driver_sql(
                "SELECT event_object_table, trigger_name, action_timing FROM information_schema.triggers "
                "WHERE trigger_schema = DATABASE() ORDER BY 1, 2").all()
            expected = [(t, f"{t}_{n}", "BEFORE") for t in ledger_schema.APPEND_ONLY_TABLES
                        for n in ("no_delete", "no_update")]
            guards = {fk["name"]: fk["referred_table"] for fk in inspector.get_foreign_keys("fillgate_audit_guard")}
            assert guards == {name: table for table, name in ledger_schema.GUARD_NAMES.items()}
        else:
            triggers = conn.exec_driver_sql(
                "SELECT tbl_name, name, 'BEFORE' FROM sqlite_master WHERE type = 'trigger' ORDER BY 1, 2").all()
            expected = [(t, f"{t}_{n}", "BEFORE") for t in ledger_schema.APPEND_ONLY_TABLES
                        for n in ("no_delete", "no_replace", "no_update")]
        assert [tuple(t) for t in triggers] == expected


def test_the_migrated_schema_is_schema_py_and_migrations_go_down_and_up(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    cfg = _setup(db, cli)
    _assert_schema_matches(db)
    run_id = _apply(cli, cfg, jobs_file)
    ledger = Ledger(db.engine)
    with db.engine.begin() as conn:  # the comparison can fail: revision 0002 is not schema.py
        command.downgrade(ledger._alembic_config(conn), "0002_run_details")
    with pytest.raises(AssertionError):
        _assert_schema_matches(db)
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == 3
    assert run_cli(cli, cfg, "init").exit_code == 0
    _assert_schema_matches(db)
    code, report = _verify(cli, cfg)
    assert code == 0 and [r["state"] for r in report["runs"]] == ["predates"]  # its evidence went with 0002


# --- 7. events files, as anchors ----------------------------------------------------------------


def test_events_files_that_cannot_be_anchors_are_usage_errors(sqlite_db: TestDB, cli: CliRunner,
                                                              tmp_path: Path) -> None:
    cfg = _setup(sqlite_db, cli)
    bad = tmp_path / "bad.jsonl"
    for text, message in (
        ('{"event": "run_finished"\n', "bad.jsonl:1 is not a JSON line"),
        ('[1]\n', "bad.jsonl:1 is not a JSON object"),
        ('\n{"event": "run_finished", "run_id": "R", "audit_rows": -1, "audit_sha256": "ab"}\n',
         "bad.jsonl:2: a run_finished event needs"),
    ):
        bad.write_text(text)
        done = run_cli(cli, cfg, "verify", "--events", str(bad))
        assert done.exit_code == 2 and message in done.stderr, done.output
    done = run_cli(cli, cfg, "verify", "--events", str(tmp_path / "absent.jsonl"))
    assert done.exit_code == 2 and "cannot read events file" in done.stderr


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.text(max_size=80),
    st.builds(lambda d: json.dumps(d), st.dictionaries(
        st.sampled_from(["event", "run_id", "audit_rows", "audit_sha256", "target"]),
        st.one_of(st.sampled_from(["run_finished", "run_started", "R", "staging", "a" * 64]),
                  st.integers(-2, 5), st.none(), st.booleans()))),
), max_size=6))
def test_reading_anchors_never_fails_with_anything_but_a_usage_error(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        anchors = read_anchors([path], "staging")
    except UsageError as exc:
        assert str(path) in str(exc) or "cannot read" in str(exc)
    else:
        for listed in anchors.by_run.values():
            assert all(a.rows >= 0 and len(a.sha256) == 64 for a in listed)



# --- 8. a ledger at revision 0004 (one audit row per field) is packed, keeping every row ----------


def test_a_0004_ledger_is_packed_keeping_every_audit_row_and_still_verifies(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    ledger = Ledger(db.engine)
    with db.engine.begin() as conn:
        command.upgrade(ledger._alembic_config(conn), "0004_batch_timeline")
    db.create_people(6, with_email_every=7)
    db.execute("INSERT INTO fillgate_meta (name, value) VALUES ('environment', 'staging'), "
               "('database_id', '01LEGACYDB0000000000000000'), ('stamped_at', '2026-01-02T03:04:05Z'), "
               "('stamped_by', 'old@host')")
    run_id = "01JCCCCCCCCCCCCCCCCCCCCCCC"
    chain = AuditChain.start(run_id)
    rows: list[dict[str, Any]] = []
    for number, keys in enumerate(([1, 2, 3], [4, 5]), 1):  # two batches of one run
        when = dt.datetime(2026, 1, 2, 3, 4, number, 123456)
        items = [(f"[{i}]", "email", "update", "null", dumps(f"pérson{i}@exämple.com 🎉")) for i in keys]
        chain, links = chain.extend(run_id, "people", "jobs:FillEmail", when, items)
        rows += [{"key": k, "col": c, "op": o, "old": old, "new": new, "when": when, "seq": seq, "chain": link}
                 for (k, c, o, old, new), (seq, link) in zip(items, links, strict=True)]
    db.execute(
        "INSERT INTO fillgate_runs (run_id, kind, job, table_name, target, environment, operator, args, status, "
        "counts, checkpoint, total, created_at, started_at, finished_at, host, pid, audit_rows, audit_sha256) VALUES "
        "(:r, 'apply', 'jobs:FillEmail', 'people', 'staging', 'staging', 'old@host', :args, 'succeeded', :counts, "
        "5, 5, :when, :when, :when, 'host', 1, 5, :sha)",
        {"r": run_id, "args": json.dumps({"key": ["id"], "source": "jobs:FillEmail"}),
         "counts": json.dumps({"applied": 5, "conflicts": 0, "errors": 0}), "when": rows[0]["when"],
         "sha": chain.sha256})
    db.execute(
        "INSERT INTO fillgate_changes (run_id, table_name, row_key, column_name, op, old_value, new_value, source, "
        "changed_at, seq, chain_sha256) VALUES (:r, 'people', :key, :col, :op, :old, :new, 'jobs:FillEmail', :when, "
        ":seq, :chain)", [{**row, "r": run_id} for row in rows])
    columns = CHANGES_COLUMNS.removeprefix("id, ")
    before = db.rows(f"SELECT {columns} FROM fillgate_changes ORDER BY id")
    assert len(before) == 5
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert db.scalar("SELECT version_num FROM fillgate_alembic_version") == ledger.head_revision()
    assert db.rows(f"SELECT {columns} FROM fillgate_changes ORDER BY id") == before
    assert db.scalar("SELECT count(*) FROM fillgate_audit_batches") == 2
    code, report = _verify(cli, cfg)
    assert code == 0 and [(r["run_id"], r["state"], r["rows"]) for r in report["runs"]] == [(run_id, "ok", 5)]
    history = run_cli(cli, cfg, "history", "people", "4", "--json")
    assert history.exit_code == 0, history.output
    assert [e["new_value"] for e in json.loads(history.stdout)] == ["pérson4@exämple.com 🎉"]
    _assert_schema_matches(db)
    # a changed value of a moved row is named exactly: each moved row kept its own chain value
    _bypass_guards(db)
    batch_id, _, _, changes, _ = _batches(db, run_id)[0]
    entries = json.loads(changes)
    entries[1][4] = '"attacker@evil.org"'
    _rewrite_batch(db, batch_id, changes=json.dumps(entries))
    check = _tampered(_verify(cli, cfg)[1], run_id)
    assert [(f["kind"], f["seq"], f["rows"]) for f in check["findings"]] == [("altered", 2, 1)]


# --- 9. a run begun on a version 1 chain (per row) goes on with it -------------------------------


def test_a_run_begun_on_a_version_1_chain_goes_on_with_it_and_verifies(db: TestDB) -> None:
    """A run started by a fillgate whose chain linked every row (resumed after an upgrade)
    keeps linking rows; version 2 runs link batches; verify checks each by its own version."""
    from fillgate.ledger import Run, new_run_id
    from fillgate.ledger.chain import start

    ledger = Ledger(db.engine)
    ledger.upgrade()
    when = dt.datetime(2026, 5, 6, 7, 8, 9, 123456)
    items = [("[1]", "email", "update", "null", dumps("a@x")), ("[2]", "email", "update", "null", dumps("b@x"))]
    chains = {}
    for version in (1, 2):
        run_id = new_run_id()
        run = Run(run_id=run_id, kind="apply", target="t", environment="e", operator="o", status="running",
                  args={"key": ["id"]}, job="j", table_name="people")
        if version == 1:  # how a run recorded before version 2 looks: no version in its args
            run.audit_rows, run.audit_sha256 = 0, start(run_id)
        ledger.create_run(run)
        assert ledger.get_run(run_id).audit_chain == version
        with db.engine.begin() as conn:
            chain = ledger.insert_changes(conn, run_id, "people", "j", when, items[:1], ledger.get_run(run_id).audit)
            chain = ledger.insert_changes(conn, run_id, "people", "j", when, items[1:], chain)
            ledger.update_run(run_id, conn, audit=chain, counts={"applied": 2, "conflicts": 0, "errors": 0})
        chains[version] = chain
        assert check_run(ledger, ledger.get_run(run_id)).state == "ok"
        by_rows = AuditChain.start(run_id).follow(run_id, "people", "j", when, items)
        assert chain is not None and (chain.sha256 == by_rows.sha256) == (version == 1)
    assert chains[1] is not None and chains[2] is not None and chains[1].rows == chains[2].rows == 2
