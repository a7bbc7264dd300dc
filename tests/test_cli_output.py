"""What people read: every id, count and value whole at any width (a table that does not fit
goes vertical), values shown the way the database shows them, one prefix per kind of error
(with a JSON object under --json), hints that can be run as printed, and ``history``
questions that make no sense answered as usage errors."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import re
import shlex
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fillgate import ApplyResult, PlanResult, report
from fillgate.ledger import Run
from fillgate.ledger.integrity import Finding, RunCheck, VerifyReport
from fillgate.pipeline_run import PipelineResult, StageResult
from fillgate.plan import PlanHeader
from fillgate.revert import RevertPreview
from fillgate.stamp import InitResult
from fillgate.values import dumps

from conftest import TestDB, run_cli

# --- format_value ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [
    (None, "NULL"),
    (42, "42"),
    (-7, "-7"),
    (True, "true"),
    (1.5, "1.5"),
    (float("nan"), "NaN"),
    (decimal.Decimal("1.20"), "1.20"),
    (decimal.Decimal("1E+2"), "100"),
    (dt.datetime(2013, 1, 1, 5, 17), "2013-01-01 05:17:00"),
    (dt.datetime(2013, 1, 1, 5, 17, 0, 120000), "2013-01-01 05:17:00.120000"),
    (dt.date(2013, 1, 1), "2013-01-01"),
    (dt.time(5, 17), "05:17:00"),
    (dt.timedelta(days=400, seconds=5), "400 days 00:00:05"),
    (dt.timedelta(days=1, microseconds=250000), "1 day 00:00:00.250000"),
    (-dt.timedelta(hours=1, minutes=30), "-01:30:00"),
    (b"\x00\xff", "\\x00ff"),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
    ("ada@example.com", "ada@example.com"),
    ("two words", "two words"),
    ("42", "'42'"),
    ("NULL", "'NULL'"),
    ("", "''"),
    (" padded", "' padded'"),
    ("it's", "it's"),
    ("'quoted'", "'''quoted'''"),
    ("a\nb", "E'a\\nb'"),
    ("true", "'true'"),
    ({"a": [1, None]}, '{"a": [1, null]}'),
    ("x" * 200, "x" * 200),
])
def test_format_value(value: Any, shown: str) -> None:
    assert report.format_value(value) == shown


def test_format_key() -> None:
    assert report.format_key([1, dt.date(2024, 1, 1)]) == "1, 2024-01-01"
    assert report.format_key(["a,b", "c"]) == "'a,b', c"


# --- every output at 80 and 200 columns ---------------------------------------------------------

RUN_ID = "01M8KW0000000000000000AAAA"
OTHER_RUN = "01M8KW0000000000000000BBBB"
PLAN_ID = "01M8KW0000000000000000CCCC"
BIG = 3360017  # a 7-digit count
LONG = "v" * 150 + " with spaces " + "w" * 37  # a 200-character value
WHEN = dt.datetime(2013, 1, 1, 5, 17)
KEY = [42, "2024-01-01"]  # a composite key


def _run(run_id: str = RUN_ID, kind: str = "apply", **extra: Any) -> Run:
    fields: dict[str, Any] = dict(
        target="staging", environment="staging", operator="someone@a-long-host.example", status="succeeded",
        job="jobs.py:FillEmailFromTheCrmWithALongName", table_name="people",
        counts={"applied": BIG, "conflicts": BIG - 1, "errors": 0, "writes": BIG}, checkpoint=BIG, total=BIG,
        created_at=WHEN, started_at=WHEN, finished_at=WHEN, plan_id=PLAN_ID, parent_run_id=OTHER_RUN,
    )
    return Run(run_id=run_id, kind=kind, **{**fields, **extra})


def _plan(changes: int = BIG, path: str | None = "/tmp/plans/fill email.plan") -> PlanResult:
    header = PlanHeader(plan_id=PLAN_ID, job="jobs.py:FillEmail", job_fingerprint="f", table="people",
                        key=["id", "day"], columns={}, target="live", environment="live", database_id="d",
                        dialect="sqlite", created_at="now", operator="me", changes=changes)
    counts = dict.fromkeys(("rows", "writes", "inserts", "unchanged", "skipped", "disagreements", "preserved",
                            "errors", "unexpected_index"), BIG)
    samples = {
        "change": [{"key": KEY, "column": "email", "old": None, "new": LONG},
                   {"key": KEY, "column": "paid_at", "old": WHEN, "new": decimal.Decimal("1.20")}],
        "insert": [{"key": KEY, "values": {"email": LONG, "amount": decimal.Decimal("1.20")}}],
        "disagreement": [{"key": KEY, "column": "kind", "old": "sales", "new": LONG}],
        "preserved": [{"key": KEY, "column": "email", "old": LONG, "reason": "new value None"}],
        "unexpected_index": [{"key": KEY, "message": "the result at position 1 has index 2, expected 1"}],
        "error": [{"key": KEY, "error_type": "ValueError", "message": "bad " + LONG}],
    }
    return PlanResult(header=header, run=_run(PLAN_ID, "plan"), path=Path(path) if path else None,
                      counts=counts, samples=samples)


def _apply() -> ApplyResult:
    return ApplyResult(run=_run(), counts={"applied": BIG, "conflicts": BIG, "errors": 0},
                       conflicts=[{"key": KEY, "column": "email", "expected": LONG, "found": WHEN, "row_exists": True}])


def _history() -> list[dict[str, Any]]:
    return [{"changed_at": WHEN, "run_id": run_id, "kind": "apply", "source": "jobs.py:FillEmail",
             "column_name": "email", "old_value": dumps(WHEN), "new_value": dumps(LONG), "operator": "me@host"}
            for run_id in (RUN_ID, OTHER_RUN)]


OUTPUTS: dict[str, tuple[Callable[[Console], None], list[str]]] = {
    "plan": (lambda c: report.print_plan(c, _plan(), confirm="live"),
             [PLAN_ID, str(BIG), LONG, "2013-01-01 05:17:00", "1.20", "42, 2024-01-01", f"email={LONG}",
              f"--max-changes {BIG} --confirm live", "'/tmp/plans/fill email.plan'"]),
    "apply": (lambda c: report.print_apply(c, _apply()),
              [RUN_ID, f"applied {BIG}", f"conflicts {BIG}", f"{BIG}/{BIG}", LONG, "2013-01-01 05:17:00",
               "42, 2024-01-01", f"fillgate revert {RUN_ID}"]),
    "preview": (lambda c: report.print_preview(c, RevertPreview(
        run=_run(), total=BIG, revertible=BIG - 1, conflicts=1,
        samples=[{"key": KEY, "column": "email", "old": LONG, "new": None}])),
        [RUN_ID, str(BIG), str(BIG - 1), LONG, "NULL", "42, 2024-01-01"]),
    "runs": (lambda c: report.print_runs(c, [_run(), _run(OTHER_RUN, "plan")]),
             [RUN_ID, OTHER_RUN, str(BIG), "2013-01-01 05:17:00", "succeeded",
              "jobs.py:FillEmailFromTheCrmWithALongName"]),
    "show": (lambda c: report.print_show(
        c, _run(details={"slowest": [{"key": KEY, "ms": 1234567.5}],
                         "first_mismatch": {"key": KEY, "expected": 1, "got": 2, "message": "moved"}},
                counts={"applied": BIG, "unexpected_index": BIG}, message=LONG),
        [{"job": "jobs.py:FillEmail", "fingerprint": "a41c0ffee0ddba11", "phase": "apply", "error_type": "Conflict",
          "count": BIG, "example_key": json.dumps(KEY), "example_column": "email", "example_message": LONG}]),
        [RUN_ID, OTHER_RUN, PLAN_ID, str(BIG), f"{BIG}/{BIG}", LONG, "a41c0ffee0ddba11", "1234567.5",
         "42, 2024-01-01"]),
    "history": (lambda c: report.print_history(c, "people", "42,2024-01-01", _history()),
                [RUN_ID, OTHER_RUN, "2013-01-01 05:17:00", LONG]),
    "pipeline": (lambda c: report.print_pipeline(c, PipelineResult(
        run=_run(OTHER_RUN, "pipeline"),
        stages=[StageResult("enrich-a-very-long-stage-name", _plan(), _apply())])),
        [OTHER_RUN, RUN_ID, str(BIG), "enrich-a-very-long-stage-name", f"fillgate show {OTHER_RUN}"]),
    "init": (lambda c: report.print_init(c, InitResult("staging", "staging", "d", True, True, "live", RUN_ID)),
             [RUN_ID]),
    # verify printed its own rich tables: at 40 columns kind and status were cut ("k…", "sta…") and the
    # rows column was dropped
    "verify": (lambda c: report.print_verify(c, VerifyReport("staging", [
        RunCheck(RUN_ID, "revert", "succeeded", "people", rows=BIG),
        RunCheck(OTHER_RUN, "apply", "succeeded", "people", state="tampered", rows=BIG - 1,
                 findings=[Finding("missing", f"1 row missing: key {LONG}", 17, 5),
                           Finding("altered", "row 19 altered", 19, 7)]),
    ])), [RUN_ID, OTHER_RUN, "revert", "succeeded", str(BIG), str(BIG - 1), LONG, "altered"]),
}


@pytest.mark.parametrize("width", [40, 80, 200])
@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_nothing_is_cut(name: str, width: int) -> None:
    """At 40, 80 and 200 columns, on a console that is not a terminal (a pipe): every id, count
    and value is whole on one line, and nothing is cut with an ellipsis."""
    render, expected = OUTPUTS[name]
    console = Console(file=io.StringIO(), width=width, force_terminal=False, highlight=False)
    render(console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    lines = text.splitlines()
    for item in expected:
        assert any(item in line for line in lines), (name, width, item, text)
    assert "…" not in text, text
    for line in lines:  # a table line never runs past the width (a long value goes vertical)
        if line[:1] in "┏┃┡│└":
            assert len(line) <= width, line


def test_wide_tables_stay_tables(sqlite_db: TestDB) -> None:
    """At 200 columns a history with short values is a table, one row per change."""
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    entries = [{**e, "new_value": dumps("short")} for e in _history()]
    report.print_history(console, "people", "42", entries)
    rows = [line for line in console.file.getvalue().splitlines() if RUN_ID in line]  # type: ignore[attr-defined]
    assert len(rows) == 1 and "2013-01-01 05:17:00" in rows[0] and "short" in rows[0]


# --- errors: one prefix per kind, and JSON with --json --------------------------------------------


def _ready(db: TestDB, cli: CliRunner, jobs_file: Path, **targets: dict[str, Any]) -> Path:
    db.create_people(20)
    cfg = db.config(targets or None)
    target = next(iter(targets or {"staging": {}}))
    assert run_cli(cli, cfg, "init", "--target", target, "--confirm", "live").exit_code == 0
    return cfg


def test_error_prefixes_and_json(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _ready(db, cli, jobs_file)
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan").exit_code == 0
    before = db.rows("SELECT run_id, status FROM fillgate_runs ORDER BY run_id")
    cases = [  # (command, exit code, prefix, error type)
        (["apply", "p.plan", "--max-changes", "1"], 3, "refused: ", "GateExceededError"),
        (["apply", "missing.plan"], 2, "error: ", "PlanFileError"),
        (["show", "01M8KW0000000000000000ZZZZ"], 2, "error: ", "RunNotFoundError"),
        (["runs", "--limit", "0"], 2, "error: ", "UsageError"),  # refused by the option parser
        (["runs", "--no-such-option"], 2, "error: ", "UsageError"),
        (["no-such-command"], 2, "error: ", "UsageError"),
        (["history", "peple", "1"], 2, "error: ", "UsageError"),
        (["lint", "no/such/dir"], 2, "error: ", "UsageError"),
    ]
    for command, code, prefix, kind in cases:
        human = run_cli(cli, cfg, *command)
        assert human.exit_code == code, (command, human.output)
        assert human.stderr.startswith(prefix) and human.stderr.count("\n") == 1, (command, human.stderr)
        assert human.stdout == "", command
        machine = run_cli(cli, cfg, *command, "--json")
        assert machine.exit_code == code
        error = json.loads(machine.stdout)["error"]
        assert (error["type"], error["exit_code"]) == (kind, code), command
        assert error["message"] == human.stderr[len(prefix):].strip()
    assert db.rows("SELECT run_id, status FROM fillgate_runs ORDER BY run_id") == before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0


def test_stamp_mismatch_as_json(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _ready(db, cli, jobs_file)
    cfg.write_text(cfg.read_text() + 'environment = "qa"\n')
    result = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--json")
    assert result.exit_code == 3
    error = json.loads(result.stdout)["error"]
    assert (error["type"], error["exit_code"]) == ("StampMismatchError", 3)
    assert result.stderr.startswith("refused: target 'staging' points at a database stamped 'staging'")
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'plan'") == 0


# --- hints ----------------------------------------------------------------------------------------


def test_apply_hint_confirms_a_protected_target(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _ready(db, cli, jobs_file, live={})
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan")
    assert planned.exit_code == 0
    hint = next(line for line in planned.stdout.splitlines() if line.startswith("Apply it with:"))
    assert hint == f"Apply it with: fillgate apply {db.tmp_path / 'p.plan'} --max-changes 10 --confirm live"
    command = hint.removeprefix("Apply it with: fillgate ").split()
    applied = run_cli(cli, cfg, *command)  # the hint works as printed
    assert applied.exit_code == 0, applied.output
    again = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "empty.plan")
    assert "Nothing to apply: the plan has no changes." in again.stdout
    assert "--max-changes 0" not in again.stdout


# --- history ----------------------------------------------------------------------------------------

VISITS = '''
import datetime as dt
from fillgate import Job, Overwrite


class StampVisits(Job):
    table = "visits"
    key = ("id", "day")
    columns = {"note": Overwrite(), "seen_at": Overwrite()}
    source = "SELECT id, day, note, seen_at FROM visits"

    def compute(self, row, ctx):
        return {"note": "n" * 190 + " " + str(row["id"]).zfill(9), "seen_at": dt.datetime(2013, 1, 1, 5, 17)}
'''


def _visits(db: TestDB, cli: CliRunner) -> tuple[Path, str]:
    db.execute("CREATE TABLE visits (id INTEGER NOT NULL, day VARCHAR(10) NOT NULL, note VARCHAR(300), "
               "seen_at TIMESTAMP NULL, PRIMARY KEY (id, day))")
    db.execute("INSERT INTO visits (id, day, note) VALUES (1, '2024-01-01', NULL), (1, '2024-01-02', 'x')")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    (db.tmp_path / "visits.py").write_text(VISITS)
    ran = run_cli(cli, cfg, "run", f"{db.tmp_path / 'visits.py'}:StampVisits", "--json")
    assert ran.exit_code == 0, ran.output
    return cfg, json.loads(ran.stdout)["run_id"]


def test_history_shows_ids_and_values_whole(db: TestDB, cli: CliRunner) -> None:
    cfg, run_id = _visits(db, cli)
    result = run_cli(cli, cfg, "history", "visits", "1,2024-01-01")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for item in (run_id, "n" * 190 + " 000000001", "2013-01-01 05:17:00", "NULL"):
        assert any(item in line for line in lines), (item, result.stdout)
    assert "datetime.datetime" not in result.stdout and "…" not in result.stdout
    shown = run_cli(cli, cfg, "history", "visits", "1,2024-01-01", "--column", "seen_at")
    assert shown.exit_code == 0 and "n" * 190 not in shown.stdout
    # the run id can be copied to revert
    reverted = run_cli(cli, cfg, "revert", run_id)
    assert reverted.exit_code == 0, reverted.output


def test_history_questions_that_make_no_sense(db: TestDB, cli: CliRunner) -> None:
    cfg, _ = _visits(db, cli)
    before = db.rows("SELECT run_id, status FROM fillgate_runs ORDER BY run_id")
    cases = [
        (["visit", "1,2024-01-01"], "table 'visit' is not in the database of target 'staging' and fillgate never "
                                    "changed it"),
        (["visits", "1,2024-01-01", "--column", "notes"],
         "column 'notes' is not a column of visits (its columns: id, day, note, seen_at)"),
        (["visits", "1"], "key '1' has 1 part but visits's key has 2 columns (id, day)"),
        (["visits", "1,2024-01-01,x"], "key '1,2024-01-01,x' has 3 parts but visits's key has 2 columns (id, day)"),
        (["visits", "[1"], "starts with '[' but is not a JSON list"),
        (["visits", "[]"], "must be a non-empty JSON list"),
        (["visits", '[{"$date": 5}, "x"]'], "holds a value fillgate cannot read"),
        (["visits", "abc,2024-01-01"], "key 'abc,2024-01-01': part 1 of visits's key is a whole number"),
    ]
    for args, message in cases:
        result = run_cli(cli, cfg, "history", *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)
    # a question that makes sense about a row never changed: no recorded changes, exit 0
    for args in (["visits", "2,2024-01-01"], ["visits", "[1, \"2024-01-01\"]", "--column", "note"]):
        result = run_cli(cli, cfg, "history", *args)
        assert result.exit_code == 0, (args, result.output)
    assert re.search(r"No recorded changes for visits 2,2024-01-01\.", run_cli(
        cli, cfg, "history", "visits", "2,2024-01-01").stdout)
    assert db.rows("SELECT run_id, status FROM fillgate_runs ORDER BY run_id") == before


def test_history_of_a_dropped_table_that_fillgate_changed(db: TestDB, cli: CliRunner) -> None:
    cfg, run_id = _visits(db, cli)
    db.execute("DROP TABLE visits")
    result = run_cli(cli, cfg, "history", "visits", "1,2024-01-01")
    assert result.exit_code == 0, result.output
    assert run_id in result.stdout
    wrong = run_cli(cli, cfg, "history", "visits", "1")
    assert wrong.exit_code == 2 and "has 1 part but visits's key has 2 parts" in wrong.stderr


# --- the demo's commands work after it ---------------------------------------------------------------


def _printed_commands(text: str) -> list[list[str]]:
    tail = text.split("Try the commands yourself from there:", 1)[1]
    return [shlex.split(line.strip()) for line in tail.strip("\n").splitlines() if line.startswith("  ")]


def test_demo_commands_can_be_run_afterwards(tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tour dir" / "demo.db"
    result = run_cli(cli, None, "demo", "--path", str(path), "--rows", "300")
    assert result.exit_code == 0, result.output
    assert (path.parent / "fillgate.toml").exists()
    commands = _printed_commands(result.stdout)
    assert commands[0] == ["cd", str(path.parent)]
    monkeypatch.chdir(commands[0][1])
    for command in commands[1:]:
        assert command[0] == "fillgate"
        ran = run_cli(cli, None, *command[1:])
        assert ran.exit_code == 0, (command, ran.output)
    # the printed step commands work too: the stamp refuses the 'live' target
    refused = run_cli(cli, None, "plan", "fillgate.demo:FillCustomerEmail", "--target", "live")
    assert refused.exit_code == 3 and refused.stderr.startswith("refused: target 'live' points at a database")
    assert "Or browse them in the web dashboard: fillgate serve (it needs pip install 'fillgate[web]')." in " ".join(
        result.stdout.split())


def test_demo_never_overwrites_a_config_of_yours(tmp_path: Path, cli: CliRunner,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "fillgate.toml"
    mine.write_text('[targets.mine]\nurl = "sqlite:///mine.db"\n')
    result = run_cli(cli, None, "demo", "--path", str(tmp_path / "demo.db"), "--rows", "300")
    assert result.exit_code == 0, result.output
    assert mine.read_text() == '[targets.mine]\nurl = "sqlite:///mine.db"\n'
    assert (tmp_path / "demo.fillgate.toml").exists()
    commands = _printed_commands(result.stdout)
    monkeypatch.chdir(commands[0][1])
    for command in commands[1:]:
        assert command[-2:] == ["--config", str(tmp_path / "demo.fillgate.toml")]
        ran = run_cli(cli, None, *command[1:])
        assert ran.exit_code == 0, (command, ran.output)


def test_a_sample_table_says_how_many_it_leaves_out(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """The plan showed the first 5 row errors (or preserved fields, disagreements, unexpected
    lookup indexes) under a title that read as the whole list; it now says "first 5 of N"."""
    db = sqlite_db
    db.create_people(12)
    db.execute("UPDATE people SET name = 'boom' WHERE id <= 7")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail")
    assert "row errors (nothing written for these rows): first 5 of 7" in planned.stdout, planned.stdout
    db.execute("UPDATE people SET name = 'Fine' WHERE id <= 3")
    few = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail")
    assert "row errors (nothing written for these rows)\n" in few.stdout
    assert "row errors (nothing written for these rows):" not in few.stdout


def test_runs_with_a_filter_that_matches_nothing_does_not_say_there_are_none(sqlite_db: TestDB,
                                                                              cli: CliRunner) -> None:
    """`fillgate runs --job typo` answered "No runs yet." on a ledger full of runs."""
    sqlite_db.create_people(3)
    cfg = sqlite_db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    result = run_cli(cli, cfg, "runs", "--job", "jobs.py:Typo", "--kind", "apply")
    assert result.exit_code == 0
    assert "No runs match --kind apply, --job jobs.py:Typo" in result.stdout and "No runs yet" not in result.stdout
