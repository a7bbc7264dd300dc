"""plan -> gate -> apply -> history -> revert, on every backend, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import TestDB, run_cli


def test_plan_apply_revert_roundtrip(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db.create_people(50)
    cfg = db.config()
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    before = db.rows("SELECT id, email FROM people ORDER BY id")

    result = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--target", "staging", "-o", "p.plan", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"]["writes"] == 25
    assert summary["counts"]["skipped"] == 25
    # a plan writes nothing to the user's table
    assert db.rows("SELECT id, email FROM people ORDER BY id") == before

    header, *lines = Path("p.plan").read_text().splitlines()
    assert json.loads(header)["changes"] == 25
    assert len([line for line in lines if json.loads(line)["kind"] == "change"]) == 25

    applied = run_cli(cli, cfg, "apply", "p.plan", "--max-changes", "25", "--json")
    assert applied.exit_code == 0, applied.output
    run_id = json.loads(applied.stdout)["run_id"]
    assert db.scalar("SELECT email FROM people WHERE id = 1") == "person1@example.com"
    assert db.scalar("SELECT email FROM people WHERE id = 2") == "old2@x.org"
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == 25

    history = run_cli(cli, cfg, "history", "people", "1", "--json")
    entries = json.loads(history.stdout)
    assert [(e["run_id"], e["old_value"], e["new_value"]) for e in entries] == [
        (run_id, None, "person1@example.com")
    ]

    reverted = run_cli(cli, cfg, "revert", run_id, "--json")
    assert reverted.exit_code == 0, reverted.output
    assert db.rows("SELECT id, email FROM people ORDER BY id") == before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 50
