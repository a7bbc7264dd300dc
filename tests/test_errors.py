"""Row errors, error budgets, misaligned batch lookups and apply-time conflicts, on every backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from typer.testing import CliRunner

from conftest import TestDB, run_cli

JOBS = '''
from fillgate import Job, FillMissing


def lookup(row):
    if row["id"] % 10 == 3:
        raise RuntimeError(f"lookup failed for {row['name']}")
    if row["id"] % 10 == 7:
        raise ValueError("bad name " + row["name"])
    return row["name"].lower() + "@example.com"


class FailSome(Job):
    """ids ending in 3 raise RuntimeError, ids ending in 7 raise ValueError."""

    table = "people"
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        return {"email": lookup(row)}


class FailHalf(Job):
    """Every odd id raises; pages of 50 rows."""

    table = "people"
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"
    page_size = 50

    def compute(self, row, ctx):
        if row["id"] % 2:
            raise RuntimeError("odd")
        return {"email": row["name"].lower() + "@example.com"}


class ShortBatch(Job):
    """A bulk lookup that drops one result in the page holding id 17 (pages of 10)."""

    table = "people"
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"
    page_size = 10

    def compute_batch(self, rows, ctx):
        out = [{"email": r["name"].lower() + "@example.com"} for r in rows]
        if any(r["id"] == 17 for r in rows):
            out.pop(0)
        return out


class LongBatch(Job):
    """A bulk lookup that returns one result too many for the page holding id 5."""

    table = "people"
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"
    page_size = 10

    def compute_batch(self, rows, ctx):
        out = [{"email": r["name"].lower() + "@example.com"} for r in rows]
        if any(r["id"] == 5 for r in rows):
            out.append({"email": "extra@example.com"})
        return out
'''


def _setup(db: TestDB, tmp_path: Path, n: int = 30) -> tuple[Path, Path]:
    db.create_people(n, with_email_every=n + 1)  # nobody has an email
    jobs = tmp_path / "err_jobs.py"
    jobs.write_text(JOBS)
    cfg = db.config()
    db_init = run_cli(CliRunner(), cfg, "init")
    assert db_init.exit_code == 0, db_init.output
    return cfg, jobs


def _errors(db: TestDB, run_id: str) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            sa.text("SELECT * FROM fillgate_errors WHERE run_id = :r ORDER BY id"), {"r": run_id})]


def _status(db: TestDB, run_id: str) -> str:
    return db.scalar("SELECT status FROM fillgate_runs WHERE run_id = :r", {"r": run_id})


def test_row_errors_are_stored_and_not_written(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    cfg, jobs = _setup(db, tmp_path)
    first = run_cli(cli, cfg, "plan", f"{jobs}:FailSome", "-o", "a.plan", "--json")
    assert first.exit_code == 1, first.output  # row errors -> exit 1
    summary = json.loads(first.stdout)
    run_id = summary["run_id"]
    assert summary["counts"]["errors"] == 6  # 3, 7, 13, 17, 23, 27
    assert summary["counts"]["writes"] == 24
    assert _status(db, run_id) == "planned"

    errors = _errors(db, run_id)
    assert [(e["row_key"], e["error_type"]) for e in errors] == [
        ("[3]", "RuntimeError"), ("[7]", "ValueError"), ("[13]", "RuntimeError"),
        ("[17]", "ValueError"), ("[23]", "RuntimeError"), ("[27]", "ValueError"),
    ]
    by_key = {e["row_key"]: e for e in errors}
    assert by_key["[3]"]["message"] == "lookup failed for Person3"
    assert by_key["[7]"]["message"] == "bad name Person7"
    assert all(e["phase"] == "plan" for e in errors)
    for e in errors:
        assert e["traceback"].startswith("Traceback (most recent call last)")
        assert "in lookup" in e["traceback"]
        assert e["traceback"].rstrip().endswith(f"{e['error_type']}: {e['message']}")
    # one fingerprint per kind of failure
    runtime = {e["fingerprint"] for e in errors if e["error_type"] == "RuntimeError"}
    value = {e["fingerprint"] for e in errors if e["error_type"] == "ValueError"}
    assert len(runtime) == 1 and len(value) == 1 and runtime != value

    # the plan file lists the errors; the failed rows have no change line
    header, *body = Path("a.plan").read_text().splitlines()
    records = [json.loads(line) for line in body]
    assert sorted(r["key"][0] for r in records if r["kind"] == "error") == [3, 7, 13, 17, 23, 27]
    changed = {r["key"][0] for r in records if r["kind"] == "change"}
    assert changed == set(range(1, 31)) - {3, 7, 13, 17, 23, 27}
    assert json.loads(header)["counts"]["errors"] == 6

    # the same job planned again: same fingerprints
    second = run_cli(cli, cfg, "plan", f"{jobs}:FailSome", "--json")
    assert second.exit_code == 1
    again = _errors(db, json.loads(second.stdout)["run_id"])
    assert [(e["row_key"], e["fingerprint"]) for e in again] == [
        (e["row_key"], e["fingerprint"]) for e in errors
    ]

    # applying the plan writes the other rows and never the failed ones
    applied = run_cli(cli, cfg, "apply", "a.plan", "--json")
    assert applied.exit_code == 0, applied.output
    emails = dict(db.rows("SELECT id, email FROM people"))
    for i in range(1, 31):
        if i % 10 in (3, 7):
            assert emails[i] is None
        else:
            assert emails[i] == f"person{i}@example.com"
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 24


def test_show_groups_errors_by_fingerprint(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    cfg, jobs = _setup(db, tmp_path, n=40)
    planned = run_cli(cli, cfg, "plan", f"{jobs}:FailSome", "--json")
    assert planned.exit_code == 1
    run_id = json.loads(planned.stdout)["run_id"]
    shown = run_cli(cli, cfg, "show", run_id, "--json")
    assert shown.exit_code == 0, shown.output
    groups = json.loads(shown.stdout)["error_groups"]
    assert sorted((g["error_type"], g["count"]) for g in groups) == [("RuntimeError", 4), ("ValueError", 4)]
    assert len({g["fingerprint"] for g in groups}) == 2
    example = next(g for g in groups if g["error_type"] == "RuntimeError")
    assert example["example_key"] == "[3]"
    assert example["example_message"] == "lookup failed for Person3"


def test_max_errors_stops_the_plan(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    cfg, jobs = _setup(db, tmp_path)
    before = db.rows("SELECT id, email FROM people ORDER BY id")

    # 6 errors are within --max-errors 6
    ok = run_cli(cli, cfg, "plan", f"{jobs}:FailSome", "--max-errors", "6", "-o", "ok.plan", "--json")
    assert ok.exit_code == 1, ok.output
    assert Path("ok.plan").is_file()

    stopped = run_cli(cli, cfg, "plan", f"{jobs}:FailSome", "--max-errors", "5", "-o", "stopped.plan")
    assert stopped.exit_code == 3, stopped.output
    assert "--max-errors 5" in stopped.stderr
    assert not Path("stopped.plan").exists()
    assert not [p for p in Path().iterdir() if p.name.startswith(".fillgate-plan-")]
    (run_id, status, message), = db.rows(
        "SELECT run_id, status, message FROM fillgate_runs WHERE kind = 'plan' AND status <> 'planned'")
    assert status == "failed"
    assert "6 errors exceed --max-errors 5" in message
    assert len(_errors(db, run_id)) == 6
    assert db.rows("SELECT id, email FROM people ORDER BY id") == before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0


def test_max_error_rate_stops_the_plan(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    cfg, jobs = _setup(db, tmp_path, n=300)
    before = db.rows("SELECT id, email FROM people ORDER BY id")

    stopped = run_cli(cli, cfg, "plan", f"{jobs}:FailHalf", "--max-error-rate", "0.2", "-o", "rate.plan")
    assert stopped.exit_code == 3, stopped.output
    assert "--max-error-rate 0.2" in stopped.stderr
    assert not Path("rate.plan").exists()
    (status, counts), = db.rows("SELECT status, counts FROM fillgate_runs WHERE kind = 'plan'")
    assert status == "failed"
    counts = json.loads(counts)
    assert counts["rows"] < 300  # stopped early, not after computing everything
    assert counts["errors"] == counts["rows"] // 2
    assert db.rows("SELECT id, email FROM people ORDER BY id") == before

    # a rate above the actual one lets the plan finish (with exit 1 for its row errors)
    ok = run_cli(cli, cfg, "plan", f"{jobs}:FailHalf", "--max-error-rate", "0.6", "--json")
    assert ok.exit_code == 1, ok.output
    assert json.loads(ok.stdout)["counts"] == {
        "rows": 300, "writes": 150, "unchanged": 0, "skipped": 0, "disagreements": 0,
        "preserved": 0, "errors": 150, "unexpected_index": 0, "inserts": 0,
    }


def test_compute_batch_with_wrong_length_errs_the_whole_batch(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    cfg, jobs = _setup(db, tmp_path, n=30)
    for job, bad_page in (("ShortBatch", range(11, 21)), ("LongBatch", range(1, 11))):
        planned = run_cli(cli, cfg, "plan", f"{jobs}:{job}", "-o", f"{job}.plan", "--json")
        assert planned.exit_code == 1, planned.output
        summary = json.loads(planned.stdout)
        assert summary["counts"]["errors"] == 10
        assert summary["counts"]["writes"] == 20
        errors = _errors(db, summary["run_id"])
        assert [e["row_key"] for e in errors] == [f"[{i}]" for i in bad_page]
        assert {e["error_type"] for e in errors} == {"JobError"}
        got = 9 if job == "ShortBatch" else 11
        assert {e["message"] for e in errors} == {
            f"compute_batch returned {got} results for 10 rows; it must return one result per row, in order."
        }
        assert len({e["fingerprint"] for e in errors}) == 1  # one alert per bad batch
        _, *body = Path(f"{job}.plan").read_text().splitlines()
        changed = {json.loads(line)["key"][0] for line in body if json.loads(line)["kind"] == "change"}
        assert changed == set(range(1, 31)) - set(bad_page)

    applied = run_cli(cli, cfg, "apply", "ShortBatch.plan", "--json")
    assert applied.exit_code == 0, applied.output
    emails = dict(db.rows("SELECT id, email FROM people"))
    assert {i for i, e in emails.items() if e is None} == set(range(11, 21))
    assert all(emails[i] == f"person{i}@example.com" for i in emails if not 11 <= i <= 20)


def test_conflicts_at_apply(db: TestDB, cli: CliRunner, tmp_path: Path, jobs_file: Path) -> None:
    db.create_people(20)  # odd ids have no email
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "fill.plan", "--json")
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["changes"] == 10

    # between plan and apply: someone fills row 3 by hand and deletes row 5
    db.execute("UPDATE people SET email = 'manual@x.org' WHERE id = 3")
    db.execute("DELETE FROM people WHERE id = 5")

    applied = run_cli(cli, cfg, "apply", "fill.plan", "--json")
    assert applied.exit_code == 1, applied.output
    result = json.loads(applied.stdout)
    run_id = result["run_id"]
    assert result["status"] == "succeeded"
    assert result["counts"] == {"applied": 8, "conflicts": 2, "errors": 0}
    conflicts = {c["key"][0]: c for c in result["conflicts"]}
    assert conflicts[3]["expected"] is None and conflicts[3]["found"] == "manual@x.org"
    assert conflicts[3]["row_exists"] is True
    assert conflicts[5]["row_exists"] is False

    emails = dict(db.rows("SELECT id, email FROM people"))
    assert emails[3] == "manual@x.org"
    assert 5 not in emails
    for i in (1, 7, 9, 11, 13, 15, 17, 19):
        assert emails[i] == f"person{i}@example.com"

    errors = _errors(db, run_id)
    assert sorted((e["row_key"], e["column_name"], e["error_type"], e["phase"]) for e in errors) == [
        ("[3]", "email", "Conflict", "apply"), ("[5]", "email", "Conflict", "apply"),
    ]
    assert "manual@x.org" in next(e for e in errors if e["row_key"] == "[3]")["message"]
    assert "no longer exists" in next(e for e in errors if e["row_key"] == "[5]")["message"]
    audited = {r[0] for r in db.rows("SELECT row_key FROM fillgate_changes WHERE run_id = :r", {"r": run_id})}
    assert audited == {"[1]", "[7]", "[9]", "[11]", "[13]", "[15]", "[17]", "[19]"}

    # show groups the conflicts under one fingerprint
    human = run_cli(cli, cfg, "show", run_id, "--json")
    groups = json.loads(human.stdout)["error_groups"]
    assert [(g["error_type"], g["count"]) for g in groups] == [("Conflict", 2)]


def test_conflicts_are_exact_even_under_case_insensitive_collations(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    """MariaDB compares text by collation ('a' = 'A' = 'a '); a value changed since the plan
    only in case or trailing spaces is still a conflict, never silently overwritten (which
    would also put a wrong old value in the audit log)."""
    db.create_people(8)  # even ids have old emails
    if db.backend == "mysql":  # a column in another character set than the connection's
        db.execute("ALTER TABLE people MODIFY email VARCHAR(200) CHARACTER SET latin1")
    db.execute("UPDATE people SET email = 'zoë@x.org' WHERE id = 8")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:OverwriteEmail", "-o", "ow.plan", "--json")
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["changes"] == 8

    db.execute("UPDATE people SET email = 'OLD2@X.ORG' WHERE id = 2")
    db.execute("UPDATE people SET email = 'old4@x.org ' WHERE id = 4")
    applied = run_cli(cli, cfg, "apply", "ow.plan", "--json")
    assert applied.exit_code == 1, applied.output
    result = json.loads(applied.stdout)
    assert result["counts"] == {"applied": 6, "conflicts": 2, "errors": 0}
    assert sorted((c["key"][0], c["found"]) for c in result["conflicts"]) == [
        (2, "OLD2@X.ORG"), (4, "old4@x.org "),
    ]
    emails = dict(db.rows("SELECT id, email FROM people"))
    assert (emails[2], emails[4]) == ("OLD2@X.ORG", "old4@x.org ")
    assert emails[8] == "person8@example.com"  # non-ASCII old value: no spurious conflict
    old_values = dict(db.rows("SELECT row_key, old_value FROM fillgate_changes"))
    assert "[2]" not in old_values and "[4]" not in old_values
    assert old_values["[8]"] == '"zoë@x.org"'

    # the same holds for revert: a written value changed in case since is left alone
    db.execute("UPDATE people SET email = 'PERSON6@EXAMPLE.COM' WHERE id = 6")
    reverted = run_cli(cli, cfg, "revert", result["run_id"], "--json")
    assert reverted.exit_code == 1, reverted.output
    assert json.loads(reverted.stdout)["counts"] == {"applied": 5, "conflicts": 1, "errors": 0}
    emails = dict(db.rows("SELECT id, email FROM people"))
    assert emails[6] == "PERSON6@EXAMPLE.COM"
    assert emails[8] == "zoë@x.org"
