"""Bad input is refused loudly (exit 2, a clear message) and writes nothing: damaged plan
files, job paths that do not load, keys that do not identify a row, bad --param values,
undeclared columns and invalid config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import TestDB, run_cli

N = 20
WRITES = N // 2


def people(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT id, email, kind FROM people ORDER BY id")


def assert_nothing_written(db: TestDB, before: list[tuple[Any, ...]]) -> None:
    assert people(db) == before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind IN ('apply', 'revert')") == 0


def ready(db: TestDB, cli: CliRunner) -> Path:
    db.create_people(N)
    cfg = db.config()
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    return cfg


# --- damaged plan files ----------------------------------------------------------------


def _edit_one_change(text: str) -> str:
    header, *body = text.splitlines(keepends=True)
    index = next(i for i, line in enumerate(body) if '"kind":"change"' in line)
    record = json.loads(body[index])
    record["new"] = "attacker@evil.example"
    body[index] = json.dumps(record, separators=(",", ":")) + "\n"
    return header + "".join(body)


def _header_claims_fewer_changes(text: str) -> str:
    header, rest = text.split("\n", 1)
    data = json.loads(header)
    data["changes"] = 1
    data["counts"]["writes"] = 1
    return json.dumps(data, sort_keys=True) + "\n" + rest


CORRUPTIONS = {
    "not_json": (lambda text: "this is not a plan\n" + text, "first line is not JSON"),
    "not_a_plan": (lambda text: '{"hello": "world"}\n', "has no plan header"),
    "empty": (lambda text: "", "is empty"),
    "header_only": (lambda text: text.split("\n", 1)[0] + "\n", f"expected {WRITES} lines, found 0"),
    "truncated": (lambda text: text[: len(text) // 2], "truncated or was modified"),
    "edited_line": (_edit_one_change, "truncated or was modified"),
    "line_dropped": (lambda text: "".join(text.splitlines(keepends=True)[:-1]), "truncated or was modified"),
    "header_edited": (_header_claims_fewer_changes, "modified"),
}


def test_damaged_plan_files_are_refused(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db = sqlite_db
    cfg = ready(db, cli)
    result = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "good.plan")
    assert result.exit_code == 0, result.output
    good = Path("good.plan").read_text()
    assert good.count('"kind":"change"') == WRITES
    before = people(db)
    for name, (damage, message) in CORRUPTIONS.items():
        path = db.tmp_path / f"{name}.plan"
        path.write_text(damage(good))
        # --max-changes 1: an edited header must not sneak a bigger plan past the gate
        result = run_cli(cli, cfg, "apply", str(path), "--max-changes", "1")
        assert result.exit_code == 2, (name, result.output)
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.output
        assert_nothing_written(db, before)
    # the intact plan still applies
    result = run_cli(cli, cfg, "apply", "good.plan")
    assert result.exit_code == 0, result.output
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == WRITES


def test_missing_plan_file(sqlite_db: TestDB, cli: CliRunner) -> None:
    cfg = ready(sqlite_db, cli)
    before = people(sqlite_db)
    result = run_cli(cli, cfg, "apply", "nowhere.plan")
    assert result.exit_code == 2
    assert "nowhere.plan does not exist" in result.stderr
    assert_nothing_written(sqlite_db, before)


# --- job paths that do not load ---------------------------------------------------------


def test_unloadable_job_paths(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = ready(sqlite_db, cli)
    before = people(sqlite_db)
    runs_before = sqlite_db.rows("SELECT run_id FROM fillgate_runs")
    broken = sqlite_db.tmp_path / "broken_jobs.py"
    broken.write_text("from fillgate import Job\n\nclass Oops(Job:\n    pass\n")
    cases = {
        "missing_file.py:FillEmail": "file missing_file.py does not exist",
        f"{jobs_file}:FillEmial": "has no class 'FillEmial'. Jobs in that module: FillEmail, FillKind, OverwriteEmail.",
        "no_such_package.jobs:FillEmail": "no module named 'no_such_package'",
        f"{broken}:Oops": "SyntaxError",
        "nocolon": "expected path/to/file.py:ClassName or package.module:ClassName",
        f"{jobs_file}:Param": "is not a fillgate Job subclass",
        f"{jobs_file}:": "expected path/to/file.py:ClassName",
    }
    for spec, message in cases.items():
        for command in ("plan", "run"):
            result = run_cli(cli, cfg, command, spec, "--target", "staging")
            assert result.exit_code == 2, (spec, command, result.output)
            assert message in result.stderr, (spec, command, result.stderr)
            assert "Traceback" not in result.output
    assert_nothing_written(sqlite_db, before)
    assert sqlite_db.rows("SELECT run_id FROM fillgate_runs") == runs_before


# --- keys that do not identify a row -------------------------------------------------------

KEY_JOBS = '''
from fillgate import Job, FillMissing


class ByName(Job):
    table = "people"
    key = ("name",)  # no primary key or unique constraint on name
    columns = {"email": FillMissing()}
    source = "SELECT name, email FROM people"

    def compute(self, row, ctx):
        return {"email": row["name"].lower() + "@example.com"}


class ByHandle(Job):
    table = "people"
    key = ("handle",)  # unique, but NULL-able
    columns = {"email": FillMissing()}
    source = "SELECT handle, email FROM people"

    def compute(self, row, ctx):
        return {"email": f"{row['handle']}@example.com"}


class Joined(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    # person 3 has two tags: the join returns id 3 twice
    source = "SELECT p.id, p.name, p.email FROM people p JOIN tags t ON t.person_id = p.id"

    def compute(self, row, ctx):
        return {"email": row["name"].lower() + "@example.com"}


class JoinedSmallPages(Joined):
    page_size = 3  # the two id-3 rows straddle the first page boundary


class JoinedTinyPages(Joined):
    page_size = 2  # the two id-3 rows are both on the second page
'''


def test_key_must_be_primary_or_unique(db: TestDB, cli: CliRunner) -> None:
    cfg = ready(db, cli)
    db.execute("ALTER TABLE people ADD handle VARCHAR(50)")
    db.execute("CREATE UNIQUE INDEX people_handle ON people (handle)")
    before = people(db)
    jobs = db.tmp_path / "key_jobs.py"
    jobs.write_text(KEY_JOBS)
    result = run_cli(cli, cfg, "run", f"{jobs}:ByName", "--target", "staging")
    assert result.exit_code == 2, result.output
    assert "key (name) of table 'people' matches no primary key or unique constraint" in result.stderr
    result = run_cli(cli, cfg, "run", f"{jobs}:ByHandle", "--target", "staging")
    assert result.exit_code == 2, result.output
    assert "allow NULL" in result.stderr
    assert_nothing_written(db, before)
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'plan'") == 0


def test_duplicate_keys_from_a_join(db: TestDB, cli: CliRunner) -> None:
    cfg = ready(db, cli)
    db.execute("CREATE TABLE tags (person_id INTEGER NOT NULL, tag VARCHAR(20) NOT NULL)")
    db.execute(
        "INSERT INTO tags (person_id, tag) VALUES (:p, :t)",
        [{"p": p, "t": "a"} for p in range(1, 8)] + [{"p": 3, "t": "b"}],
    )
    before = people(db)
    jobs = db.tmp_path / "key_jobs.py"
    jobs.write_text(KEY_JOBS)
    for job in ("Joined", "JoinedSmallPages", "JoinedTinyPages"):
        result = run_cli(cli, cfg, "run", f"{jobs}:{job}", "--target", "staging", "-o", "dup.plan")
        assert result.exit_code == 2, (job, result.output)
        assert "returns key [3] more than once" in result.stderr
        assert "check joins" in result.stderr
        assert not Path("dup.plan").exists()
        assert_nothing_written(db, before)
    assert db.rows("SELECT status FROM fillgate_runs WHERE kind = 'plan'") == [("failed",)] * 3


# --- job parameters ------------------------------------------------------------------------

PARAM_JOBS = '''
from fillgate import Job, FillMissing, Param


class UpTo(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people WHERE id <= :limit"
    params = {"limit": Param(int), "domain": Param(str, default="example.com")}

    def compute(self, row, ctx):
        return {"email": row["name"].lower() + "@" + self.args["domain"]}
'''


def test_bad_params(sqlite_db: TestDB, cli: CliRunner) -> None:
    cfg = ready(sqlite_db, cli)
    before = people(sqlite_db)
    jobs = sqlite_db.tmp_path / "param_jobs.py"
    jobs.write_text(PARAM_JOBS)
    spec = f"{jobs}:UpTo"
    cases = [
        (["--param", "limit=4", "--param", "limt=5"], "has no parameter(s) limt; declared parameters: domain, limit"),
        (["--param", "limit=four"], "parameter 'limit' expects int, got 'four'"),
        ([], "needs parameter 'limit' (int); pass --param limit=VALUE"),
        (["--param", "limit"], "--param expects name=value, got 'limit'"),
        (["--param", "=4"], "--param expects name=value"),
    ]
    for extra, message in cases:
        for command in ("plan", "run"):
            result = run_cli(cli, cfg, command, spec, "--target", "staging", *extra)
            assert result.exit_code == 2, (extra, result.output)
            assert message in result.stderr, (extra, result.stderr)
    assert_nothing_written(sqlite_db, before)
    assert sqlite_db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'plan'") == 0
    # and good values work: only ids 1..4 are read, 1 and 3 lack an email
    result = run_cli(cli, cfg, "run", spec, "--target", "staging", "-p", "limit=4", "-p", "domain=corp.test")
    assert result.exit_code == 0, result.output
    assert sqlite_db.rows("SELECT id FROM people WHERE email LIKE '%@corp.test' ORDER BY id") == [(1,), (3,)]


# --- proposals the job did not declare ---------------------------------------------------

PROPOSAL_JOBS = '''
from fillgate import Job, FillMissing


class SneaksKind(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email, kind FROM people"

    def compute(self, row, ctx):
        if row["id"] % 4 == 1:
            return {"email": "x@example.com", "kind": "vip"}  # kind is not declared
        return {"email": row["name"].lower() + "@example.com"}


class NotSelected(Job):
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing(), "kind": FillMissing()}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        return {"email": "a@example.com", "kind": "vip"}
'''


def test_undeclared_column_stops_the_plan(sqlite_db: TestDB, cli: CliRunner) -> None:
    """A proposal setting a column the job does not declare is a bug of the job: one clear
    error and exit 2, not a row error per row (it was: 5 identical row errors, the rest planned)."""
    db = sqlite_db
    cfg = ready(db, cli)
    before = people(db)
    jobs = db.tmp_path / "proposal_jobs.py"
    jobs.write_text(PROPOSAL_JOBS)
    for command in ("plan", "run"):
        result = run_cli(cli, cfg, command, f"{jobs}:SneaksKind", "--target", "staging")
        assert result.exit_code == 2, result.output
        assert "compute proposed column(s) 'kind' for row [1] that the job does not declare" in result.stderr
    assert db.scalar("SELECT count(*) FROM fillgate_errors") == 0
    assert db.rows("SELECT status FROM fillgate_runs WHERE kind = 'plan'") == [("failed",), ("failed",)]
    assert_nothing_written(db, before)


def test_proposed_column_not_selected_is_a_usage_error(sqlite_db: TestDB, cli: CliRunner) -> None:
    cfg = ready(sqlite_db, cli)
    before = people(sqlite_db)
    jobs = sqlite_db.tmp_path / "proposal_jobs.py"
    jobs.write_text(PROPOSAL_JOBS)
    result = run_cli(cli, cfg, "run", f"{jobs}:NotSelected", "--target", "staging")
    assert result.exit_code == 2, result.output
    assert "does not select column(s) kind" in result.stderr
    assert_nothing_written(sqlite_db, before)


# --- config files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fillgate.toml", "pyproject.toml"])
def test_invalid_toml(tmp_path: Path, cli: CliRunner, name: str) -> None:
    path = tmp_path / name
    path.write_text('[targets.staging\nurl = "sqlite:///x.db"\n')
    for config in (path, None):  # given with --config, or found in the working directory
        result = run_cli(cli, config, "init")
        assert result.exit_code == 2, result.output
        assert f"{name} is not valid TOML" in result.stderr
        assert "line 1" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_names_longer_than_the_ledger_keeps_are_refused(sqlite_db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    """A job whose name, table or column would not fit fillgate's ledger is refused when it is
    loaded (exit 2), not with a database error halfway; and the limits match the schema."""
    from fillgate.job import NAME_LIMITS
    from fillgate.ledger import schema

    assert schema.runs.c.job.type.length >= NAME_LIMITS["job"]
    assert schema.locks.c.name.type.length >= NAME_LIMITS["job"] + len("apply:")
    assert schema.runs.c.table_name.type.length >= NAME_LIMITS["table"]
    assert schema.errors.c.column_name.type.length >= NAME_LIMITS["column"]
    db = sqlite_db
    cfg = ready(db, cli)
    long_name = "j" * 186
    (tmp_path / "long.py").write_text(
        "from fillgate import Job, FillMissing\n"
        f"class Long(Job):\n    name = {long_name!r}\n    table = 'people'\n"
        "    columns = {'email': FillMissing()}\n    def compute(self, row, ctx):\n        return {}\n"
    )
    result = run_cli(cli, cfg, "plan", "long.py:Long")
    assert result.exit_code == 2, result.output
    assert "186 characters long" in result.stderr
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'plan'") == 0


def test_numbers_past_what_a_database_or_timer_holds_are_usage_errors(db: TestDB, cli: CliRunner,
                                                                       jobs_file: Path) -> None:
    """`runs --limit 2**64` failed with an OverflowError (exit 1); `apply --batch-size 2**64`
    recorded a failed apply run and then failed on islice; `--pause-between-batches` of years
    overflowed the timer. Each is exit 2 before anything is recorded."""
    cfg = ready(db, cli)
    huge = str(2**64)
    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", str(db.tmp_path / "p.plan"))
    assert planned.exit_code == 0, planned.output
    before = people(db)
    runs_before = db.scalar("SELECT count(*) FROM fillgate_runs")
    for args in (("runs", "--limit", huge), ("plan", f"{jobs_file}:FillEmail", "--sample", huge),
                 ("apply", str(db.tmp_path / "p.plan"), "--batch-size", huge),
                 ("apply", str(db.tmp_path / "p.plan"), "--max-changes", huge),
                 ("apply", str(db.tmp_path / "p.plan"), "--max-errors", huge),
                 ("apply", str(db.tmp_path / "p.plan"), "--pause-between-batches", str(10**15))):
        result = run_cli(cli, cfg, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "Invalid value" in result.stderr and "Traceback" not in result.output
    assert_nothing_written(db, before)
    assert db.scalar("SELECT count(*) FROM fillgate_runs") == runs_before
    limit = run_cli(cli, cfg, "runs", "--limit", str(2**63 - 1))
    assert limit.exit_code == 0, limit.output


def test_a_url_parameter_the_driver_cannot_use_is_a_config_error(tmp_path: Path, cli: CliRunner) -> None:
    """PyMySQL raised AttributeError on an unknown charset: 'unexpected AttributeError ... a bug' (exit 1)."""
    pytest.importorskip("pymysql")
    cfg = tmp_path / "fillgate.toml"
    cfg.write_text('[targets.a]\nurl = "mysql://root:s3cr3t-pw@127.0.0.1:1/x?charset=bogus"\n')
    result = run_cli(cli, cfg, "runs")
    assert result.exit_code == 2, result.output
    assert "driver refused the url" in result.stderr and "charset" in result.stderr
    assert "s3cr3t-pw" not in result.output and "bug" not in result.stderr


def test_a_plan_path_that_is_not_a_regular_file_is_refused_without_reading_it(sqlite_db: TestDB, cli: CliRunner,
                                                                                tmp_path: Path) -> None:
    """`fillgate apply /dev/zero` read its endless "first line" until memory ran out (and the
    dashboard's /plan?path=/dev/zero did the same in a server thread); a FIFO blocked forever."""
    import os

    cfg = ready(sqlite_db, cli)
    before = people(sqlite_db)
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        result = run_cli(cli, cfg, "apply", path)
        assert result.exit_code == 2, result.output
        assert "is not a regular file" in result.stderr
    result = run_cli(cli, cfg, "apply", str(tmp_path))  # a folder is read as a distributed plan's
    assert result.exit_code == 2 and "is not a distributed plan: it has no manifest.json" in result.stderr
    huge = tmp_path / "huge.plan"
    from fillgate import plan as plan_module

    huge.write_text("x" * 100)
    original = plan_module.MAX_HEADER
    plan_module.MAX_HEADER = 50
    try:
        result = run_cli(cli, cfg, "apply", str(huge))
    finally:
        plan_module.MAX_HEADER = original
    assert result.exit_code == 2 and "longer than any plan header" in result.stderr
    assert_nothing_written(sqlite_db, before)


MISSHAPEN_JOBS = '''
import sys

from fillgate import Job, Overwrite


class Base(Job):
    table = "people"
    key = ("id",)
    columns = {"email": Overwrite()}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        return {"email": "x@example.com"}


class KeyInt(Base):
    key = 5


class SourceInt(Base):
    source = 42


class TableList(Base):
    table = ["people"]


class BadSql(Base):
    source = "SELEC id FROM people"


class Exits(Base):
    def compute(self, row, ctx):
        sys.exit(3)
'''


@pytest.mark.parametrize("job, exit_code, message", [
    ("KeyInt", 2, "key must be a column name or a tuple of column names, not 5"),  # was: unexpected TypeError, exit 1
    ("SourceInt", 2, "source must be a SQL SELECT (a non-empty string), not 42"),  # was: unexpected AttributeError
    ("TableList", 2, "has table = ['people'], not a table name"),  # was: "has no table"
    ("BadSql", 2, "the job's source cannot be run (nothing was recorded)"),  # was: exit 1, "the database answered"
    ("Exits", 1, "job code raised SystemExit(3)"),  # was: exit 3 (a guard's code), and not a word
])
def test_a_misshapen_job_is_one_clear_error(db: TestDB, cli: CliRunner, job: str, exit_code: int,
                                            message: str) -> None:
    cfg = ready(db, cli)
    before = people(db)
    jobs = db.tmp_path / "misshapen_jobs.py"
    jobs.write_text(MISSHAPEN_JOBS)
    result = run_cli(cli, cfg, "plan", f"{jobs}:{job}")
    assert result.exit_code == exit_code, result.output
    assert message in result.stderr and "Traceback" not in result.output
    plans = db.rows("SELECT status FROM fillgate_runs WHERE kind = 'plan'")
    assert plans == ([("failed",)] if job == "Exits" else [])  # a job that ran is recorded as failed
    assert_nothing_written(db, before)


def test_sys_exit_while_a_job_module_is_imported_is_a_load_error(sqlite_db: TestDB, cli: CliRunner) -> None:
    """`sys.exit(4)` at import made fillgate exit 4 (verify's "tampered" code) without a word."""
    cfg = ready(sqlite_db, cli)
    jobs = sqlite_db.tmp_path / "exits_at_import.py"
    jobs.write_text("import sys\nsys.exit(4)\n")
    result = run_cli(cli, cfg, "plan", f"{jobs}:Anything")
    assert result.exit_code == 2, result.output
    assert "importing" in result.stderr and "SystemExit: 4" in result.stderr


def test_plan_output_that_is_not_a_file_or_folder_is_refused_before_recording(
    sqlite_db: TestDB, cli: CliRunner, jobs_file: Path, tmp_path: Path,
) -> None:
    """`plan -o /dev/full` replaced the device node with the plan file (os.replace, as root); a
    FIFO likewise. Now: exit 2, nothing recorded, the path untouched."""
    import os
    import stat

    cfg = ready(sqlite_db, cli)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    result = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", str(fifo))
    assert result.exit_code == 2, result.output
    assert "is not a regular file or a folder" in result.stderr and "Nothing was recorded" in result.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sqlite_db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'plan'") == 0


def test_events_that_cannot_be_written_stop_the_run_with_a_clear_error(sqlite_db: TestDB, cli: CliRunner,
                                                                       jobs_file: Path) -> None:
    """`--events /dev/full` (a full disk) was "unexpected OSError ... a bug" (exit 1) and left the
    plan run 'running'; now the error says what failed and the run is recorded as failed."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    cfg = ready(sqlite_db, cli)
    result = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "--events", "/dev/full")
    assert result.exit_code == 2, result.output
    assert "cannot write events to /dev/full: No space left on device" in result.stderr
    assert sqlite_db.rows("SELECT status FROM fillgate_runs WHERE kind = 'plan'") == [("failed",)]


def test_a_sqlite_target_that_is_not_a_database_is_a_config_error(tmp_path: Path, cli: CliRunner) -> None:
    """A target url naming a text file: "the database answered: file is not a database" (exit 1,
    as if a statement had failed); now "cannot connect to target" (exit 2), the file untouched."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    cfg = tmp_path / "fillgate.toml"
    cfg.write_text(f'[targets.a]\nurl = "sqlite:///{notes}"\n')
    for command in (("init",), ("runs",)):
        result = run_cli(cli, cfg, *command)
        assert result.exit_code == 2, result.output
        assert "cannot connect to target 'a'" in result.stderr and "file is not a database" in result.stderr
    assert notes.read_text() == "not a database\n"


LINE_SEPARATOR_JOB = '''
from fillgate import Job, FillMissing


class Odd(Job):
    name = "jobs:Odd\\u2028name\\x85"
    table = "people"
    key = ("id",)
    columns = {"email": FillMissing()}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        return {"email": row["name"].lower() + "@example.com"}
'''


def test_verify_reads_every_events_file_fillgate_writes_and_refuses_endless_ones(sqlite_db: TestDB, cli: CliRunner,
                                                                                  tmp_path: Path) -> None:
    """`verify --events` split the file with str.splitlines(), so an event holding U+2028 or U+0085
    (a job's name, a message) made fillgate's own events file "not a JSON line" (exit 2); `--events
    /dev/zero` read forever; a line nested 100,000 deep was an unexpected RecursionError."""
    cfg = ready(sqlite_db, cli)
    (tmp_path / "odd_job.py").write_text(LINE_SEPARATOR_JOB)
    ran = run_cli(cli, cfg, "run", f"{tmp_path / 'odd_job.py'}:Odd", "--max-changes", "100", "--events",
                  str(tmp_path / "ev.jsonl"))
    assert ran.exit_code == 0, ran.output
    assert "\u2028" in (tmp_path / "ev.jsonl").read_text(encoding="utf-8")
    verified = run_cli(cli, cfg, "verify", "--events", str(tmp_path / "ev.jsonl"))
    assert verified.exit_code == 0, verified.output
    assert "Checked 1 audit hash" in verified.stdout
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    for path, message in (("/dev/zero", "is not a regular file"), (str(tmp_path / "deep.jsonl"), "is not a JSON line")):
        result = run_cli(cli, cfg, "verify", "--events", path)
        assert result.exit_code == 2, result.output
        assert message in result.stderr
