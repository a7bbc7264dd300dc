"""A plan file can only write what a plan run recorded: every plan run records the SHA-256 of
its plan (saved with -o or not), apply checks the file against it, and every line against the
job's declared table, key and columns. A forged file is refused (exit 2) and writes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from conftest import TestDB, run_cli


def _snapshot(db: TestDB) -> tuple[list[tuple[Any, ...]], int, int]:
    people = db.rows("SELECT id, name, email, kind FROM people ORDER BY id")
    changes = db.scalar("SELECT count(*) FROM fillgate_changes")
    writing = db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind IN ('apply', 'revert')")
    return people, changes, writing


def _forge(text: str, plan_id: str | None = None, column: str = "name", new: str = "Mallory",
           declare: bool = False) -> str:
    """Point the header at ``plan_id``, make the first change write ``column`` = ``new`` and
    recompute the body checksum (what a forger can always do)."""
    header_line, *body = text.splitlines(keepends=True)
    header = json.loads(header_line)
    index = next(i for i, line in enumerate(body) if '"kind":"change"' in line)
    record = json.loads(body[index])
    record["column"], record["new"], record["old"] = column, new, f"Person{record['key'][0]}"
    body[index] = json.dumps(record, separators=(",", ":")) + "\n"
    if plan_id is not None:
        header["plan_id"] = plan_id
    if declare:
        header["columns"][column] = {"policy": "overwrite"}
    header["body_sha256"] = hashlib.sha256("".join(body).encode()).hexdigest()
    return json.dumps(header, sort_keys=True) + "\n" + "".join(body)


def _ready(db: TestDB, cli: CliRunner, jobs_file: Path) -> tuple[Path, str, str]:
    db.create_people(20)
    cfg = db.config()
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    saved = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "good.plan", "--json")
    assert saved.exit_code == 0, saved.output
    unsaved = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--json")
    assert unsaved.exit_code == 0, unsaved.output
    return cfg, Path("good.plan").read_text(), json.loads(unsaved.stdout)["plan_id"]


def test_every_plan_run_records_its_checksum(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    _, _, unsaved_id = _ready(db, cli, jobs_file)
    recorded = db.rows("SELECT run_id, plan_sha256 FROM fillgate_runs WHERE kind = 'plan' ORDER BY run_id")
    assert len(recorded) == 2
    assert all(sha and len(sha) == 64 for _, sha in recorded), recorded
    assert unsaved_id in {run_id for run_id, _ in recorded}


def test_forged_plan_pointed_at_an_unsaved_plan_is_refused(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """The incident: a plan made without -o, an edited file pointed at its id, apply wrote
    people.name = 'Mallory'."""
    cfg, good, unsaved_id = _ready(db, cli, jobs_file)
    before = _snapshot(db)
    for declare in (False, True):
        forged = Path(f"forged-{declare}.plan")
        forged.write_text(_forge(good, unsaved_id, declare=declare))
        result = run_cli(cli, cfg, "apply", str(forged))
        assert result.exit_code == 2, result.output
        assert "modified" in result.stderr
        assert _snapshot(db) == before
    assert db.scalar("SELECT count(*) FROM people WHERE name = 'Mallory'") == 0


def test_plan_run_without_checksum_cannot_be_applied(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """A plan run recorded by an older fillgate without -o has no checksum: nothing can be
    checked against it, so nothing is applied in its name."""
    cfg, good, unsaved_id = _ready(db, cli, jobs_file)
    db.execute("UPDATE fillgate_runs SET plan_sha256 = NULL WHERE run_id = :r", {"r": unsaved_id})
    before = _snapshot(db)
    forged = Path("forged.plan")
    forged.write_text(_forge(good, unsaved_id, declare=True))
    result = run_cli(cli, cfg, "apply", str(forged))
    assert result.exit_code == 2, result.output
    assert "recorded no plan checksum" in result.stderr
    assert _snapshot(db) == before


def test_lines_are_checked_against_declared_columns(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """Even with the ledger's checksum forged too, a line writing an undeclared column, or a
    header declaring a column the plan run did not, is refused before anything is written."""
    cfg, good, _ = _ready(db, cli, jobs_file)
    saved_id = json.loads(good.splitlines()[0])["plan_id"]
    before = _snapshot(db)
    for declare, message in ((False, "which the plan's job does not declare"), (True, "columns differ")):
        text = _forge(good, declare=declare)
        forged = Path(f"forged-{declare}.plan")
        forged.write_text(text)
        sha = hashlib.sha256(text.encode()).hexdigest()
        db.execute("UPDATE fillgate_runs SET plan_sha256 = :s WHERE run_id = :r", {"s": sha, "r": saved_id})
        result = run_cli(cli, cfg, "apply", str(forged))
        assert result.exit_code == 2, result.output
        assert message in result.stderr, result.stderr
        assert _snapshot(db) == before


def test_line_with_wrong_key_shape_is_refused(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db = sqlite_db
    cfg, good, _ = _ready(db, cli, jobs_file)
    header_line, *body = good.splitlines(keepends=True)
    index = next(i for i, line in enumerate(body) if '"kind":"change"' in line)
    record = json.loads(body[index])
    record["key"] = [record["key"][0], 99]
    body[index] = json.dumps(record, separators=(",", ":")) + "\n"
    header = json.loads(header_line)
    header["body_sha256"] = hashlib.sha256("".join(body).encode()).hexdigest()
    text = json.dumps(header, sort_keys=True) + "\n" + "".join(body)
    db.execute("UPDATE fillgate_runs SET plan_sha256 = :s WHERE run_id = :r",
               {"s": hashlib.sha256(text.encode()).hexdigest(), "r": header["plan_id"]})
    Path("odd.plan").write_text(text)
    before = _snapshot(db)
    result = run_cli(cli, cfg, "apply", "odd.plan")
    assert result.exit_code == 2, result.output
    assert "key column" in result.stderr
    assert _snapshot(db) == before
