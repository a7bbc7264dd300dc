"""``fillgate run --stream``: the changes of each planned page are applied as they are planned,
with the same audit, compare-and-set and records as a plan-first run; a gate makes the plan
first; a streamed run stopped before its plan is complete is cancelled (never half-resumable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from conftest import TestDB, run_cli

PAUSING_JOBS = '''
import sqlalchemy as sa

from fillgate import FillMissing, Job


class PausesItself(Job):
    """Fills emails 4 rows a page; while computing row 9 it asks the running apply to pause
    (as `fillgate pause` from another terminal would)."""

    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"
    page_size = 4

    def compute(self, row, ctx):
        if row["id"] == 9:
            with ctx.engine.begin() as conn:
                conn.execute(sa.text("UPDATE fillgate_runs SET control = 'pause' WHERE kind = 'apply' "
                                     "AND status = 'running'"))
        return {"email": row["name"].lower() + "@example.com"}
'''


def _emails(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT id, email FROM people ORDER BY id")


def test_a_streamed_run_writes_what_a_plan_first_run_writes(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db.create_people(30)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    done = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--stream", "--batch-size", "4", "--json")
    assert done.exit_code == 0, done.output
    applied = json.loads(done.stdout)
    assert applied["counts"] == {"applied": 15, "conflicts": 0, "errors": 0}
    assert _emails(db) == [(i, f"old{i}@x.org" if i % 2 == 0 else f"person{i}@example.com") for i in range(1, 31)]
    audit = db.rows("SELECT row_key, old_value, new_value, seq FROM fillgate_changes WHERE run_id = :r ORDER BY id",
                    {"r": applied["run_id"]})
    assert audit == [(f"[{i}]", "null", f'"person{i}@example.com"', n) for n, i in enumerate(range(1, 31, 2), 1)]
    run = db.rows("SELECT r.total, r.plan_sha256, r.plan_path, p.plan_sha256, p.status FROM fillgate_runs r "
                  "JOIN fillgate_runs p ON p.run_id = r.plan_id WHERE r.run_id = :r", {"r": applied["run_id"]})
    (total, sha, path, plan_sha, plan_status), = run
    assert (total, sha, plan_status) == (15, plan_sha, "planned") and Path(path).is_file()
    verified = run_cli(cli, cfg, "verify", "--json")
    assert verified.exit_code == 0, verified.output
    assert run_cli(cli, cfg, "revert", applied["run_id"]).exit_code == 0
    assert _emails(db) == [(i, f"old{i}@x.org" if i % 2 == 0 else None) for i in range(1, 31)]


def test_with_a_gate_the_plan_comes_first_and_a_refusal_writes_nothing(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    db.create_people(10)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    before = _emails(db)
    done = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--stream", "--max-changes", "2")
    assert done.exit_code == 3, done.output
    assert "Nothing was written" in done.stderr
    assert _emails(db) == before
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'apply'") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_audit_batches") == 0


def test_a_streamed_run_paused_before_its_plan_is_complete_is_cancelled_and_revertible(
    db: TestDB, cli: CliRunner, tmp_path: Path
) -> None:
    db.create_people(20)
    jobs = tmp_path / "pausing.py"
    jobs.write_text(PAUSING_JOBS)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    done = run_cli(cli, cfg, "run", f"{jobs}:PausesItself", "--stream", "--batch-size", "2")
    assert done.exit_code == 130, done.output
    assert "cannot be resumed" in done.stderr and "fillgate revert" in done.stderr
    (run_id, status, checkpoint, plan_status), = db.rows(
        "SELECT r.run_id, r.status, r.checkpoint, p.status FROM fillgate_runs r JOIN fillgate_runs p "
        "ON p.run_id = r.plan_id WHERE r.kind = 'apply'")
    assert (status, plan_status) == ("cancelled", "failed")
    # the pause is read after the batch that holds row 9 (rows 1-12: 6 changes, three batches of
    # 2); nothing after it was written
    assert checkpoint == 6
    assert _emails(db)[:12] == [(i, f"old{i}@x.org" if i % 2 == 0 else f"person{i}@example.com")
                                for i in range(1, 13)]
    assert [email for _, email in _emails(db)[12:]] == [f"old{i}@x.org" if i % 2 == 0 else None
                                                        for i in range(13, 21)]
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == 6
    resumed = run_cli(cli, cfg, "resume", run_id)
    assert resumed.exit_code == 2 and "cancelled" in resumed.stderr, resumed.output
    assert run_cli(cli, cfg, "verify").exit_code == 0
    assert run_cli(cli, cfg, "revert", run_id).exit_code == 0
    assert [email for _, email in _emails(db)] == [f"old{i}@x.org" if i % 2 == 0 else None for i in range(1, 21)]
