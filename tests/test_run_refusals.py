"""``fillgate run`` plans before its gate can know the plan's size: when a guard then refuses,
nothing is written to the user's tables, and the refusal says exactly what the plan left in
the ledger and on disk, and how to apply it after review (a command that works)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from conftest import TestDB, run_cli

N = 30
WRITES = 15

PIPELINE = '''
from fillgate import Job, Pipeline, FillMissing, Promote


class FillEmail(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        return {"email": row["name"].lower() + "@example.com"}


class FillKind(Job):
    table = "people"
    key = ("id",)
    columns = {"kind": Promote(unknown=["unknown"])}
    source = "SELECT id, kind FROM people"

    def compute(self, row, ctx):
        return {"kind": "even" if row["id"] % 2 == 0 else "odd"}


class Both(Pipeline):
    stages = [FillEmail, FillKind]
'''


def _ledger(db: TestDB) -> list[tuple[str, str]]:
    return [(str(k), str(s)) for k, s in db.rows("SELECT kind, status FROM fillgate_runs ORDER BY run_id")]


def test_run_over_the_gate_says_what_it_recorded(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db.create_people(N)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    before = db.rows("SELECT id, email, kind FROM people ORDER BY id")
    result = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--max-changes", "1")
    assert result.exit_code == 3, result.output
    message = " ".join(result.stderr.split())
    assert f"has {WRITES} changes, more than --max-changes 1" in message
    assert "Nothing was written to your tables" in message
    plan_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'plan'")
    assert f"recorded as plan run {plan_id}" in message
    path = re.search(r"saved to (\S+):", message)
    assert path is not None and Path(path.group(1)).is_file()
    # exactly what the message says, and nothing else
    assert _ledger(db) == [("init", "succeeded"), ("plan", "planned")]
    assert db.rows("SELECT id, email, kind FROM people ORDER BY id") == before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0
    # the command it suggests works
    command = message.split("apply it with: ")[1].split()
    assert command[:2] == ["fillgate", "apply"]
    applied = run_cli(cli, cfg, *command[1:], "--json")
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.stdout)["counts"]["applied"] == WRITES


def test_protected_target_hint_carries_confirm(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db.create_people(N)
    cfg = db.config({"live": {"protected": True}})
    assert run_cli(cli, cfg, "init", "--target", "live", "--confirm", "live").exit_code == 0
    result = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--target", "live", "--confirm", "live",
                     "--max-changes", "2")
    assert result.exit_code == 3, result.output
    assert f"--max-changes {WRITES} --confirm live" in " ".join(result.stderr.split())


def test_pipeline_refused_at_a_later_stage_says_what_was_applied(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    db.create_people(N)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    (tmp_path / "pipe.py").write_text(PIPELINE)
    # stage 1 writes 15 emails (allowed), stage 2 would write 30 kinds (refused)
    result = run_cli(cli, cfg, "run", "pipe.py:Both", "--max-changes", "20")
    assert result.exit_code == 3, result.output
    message = " ".join(result.stderr.split())
    pipeline_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'pipeline'")
    apply_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
    assert f"pipeline run {pipeline_id} (now failed)" in message
    assert f"apply run {apply_id}" in message
    for plan_id, in db.rows("SELECT run_id FROM fillgate_runs WHERE kind = 'plan'"):
        assert f"plan run {plan_id}" in message
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NOT NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == WRITES


def test_an_error_budget_refusal_midway_says_what_it_recorded(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """`plan --max-errors 0` recorded a failed plan run and said only "plan of X stopped: ... exceed
    --max-errors 0"; an apply stopped by its error budget kept its committed batches without
    saying so. Each refusal now says what it recorded."""
    db.create_people(12)
    db.execute("UPDATE people SET name = 'boom' WHERE id = 7")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--max-errors", "0", "-o", "p.plan")
    assert planned.exit_code == 3, planned.output
    run_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'plan'")
    assert db.scalar("SELECT status FROM fillgate_runs WHERE kind = 'plan'") == "failed"
    assert f"Recorded as failed plan run {run_id}" in planned.stderr and "no plan file was saved" in planned.stderr
    assert not (db.tmp_path / "p.plan").exists()


def test_an_apply_stopped_by_its_error_budget_says_its_batches_stay(sqlite_db: TestDB, cli: CliRunner,
                                                                     jobs_file: Path) -> None:
    db = sqlite_db
    db.create_people(12)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan").exit_code == 0
    db.execute("CREATE TRIGGER no_nine BEFORE UPDATE ON people WHEN NEW.id = 9 BEGIN SELECT RAISE(ABORT, 'no'); END")
    applied = run_cli(cli, cfg, "apply", "p.plan", "--max-errors", "0", "--batch-size", "2")
    assert applied.exit_code == 3, applied.output
    run_id, status = db.rows("SELECT run_id, status FROM fillgate_runs WHERE kind = 'apply'")[0]
    written = db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id})
    assert status == "failed" and written > 0
    assert f"The {written} changes of the batches committed before stay written and audited" in applied.stderr
    assert f"fillgate revert {run_id}" in applied.stderr
