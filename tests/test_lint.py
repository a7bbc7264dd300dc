"""``fillgate lint``: hard-coded targets and database URLs in job modules."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from fillgate.errors import UsageError
from fillgate.lint import Finding, lint_paths, lint_source, mask_url

from conftest import run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stale_classifications"
LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): (?P<code>FG\d{3}) (?P<msg>.+) \(found: (?P<found>.*)\)$")


def lint(code: str, names: tuple[str, ...] | None = None) -> list[Finding]:
    return lint_source(textwrap.dedent(code), "job.py", names)


def codes(code: str, names: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    return [(f.code, f.found) for f in lint(code, names)]


# --- every rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql://app@db/app", "postgres://app@db/app", "postgresql+psycopg://app@db/app",
    "mysql://root@db/app", "mysql+pymysql://root@db/app", "mariadb://root@db/app",
    "mariadb+mariadbconnector://root@db/app", "sqlite:///jobs.db", "sqlite+pysqlite:///jobs.db",
    "SQLite:////abs/path.db",
])
def test_fg001_database_url_literals(url: str) -> None:
    assert codes(f"URL = {url!r}\n") == [("FG001", url)]


def test_fg001_urls_inside_text_fstrings_and_calls() -> None:
    found = codes('''
        """A docstring may mention postgresql://app@db/app: it is documentation."""
        def compute(row, ctx):
            """So may a function's: mysql://root@db/app."""
            url = f"postgresql://{user}@live-db/{db_name}"
            note = "moved from mysql://root@old-db/app, see ticket"
            scheme_only = "postgresql://"
            other = "https://example.com/postgresql://x"
            return helper("sqlite:///other.db")
    ''')
    assert found == [
        ("FG001", "postgresql://{user}@live-db/{db_name}"),
        ("FG001", "mysql://root@old-db/app"),
        ("FG001", "sqlite:///other.db"),
    ]


def test_fg002_open_target_with_a_literal() -> None:
    found = lint('''
        def compute(row, ctx):
            live = ctx.open_target("live")
            other = open_target(name="staging")
            mine = ctx.open_target(ctx.target.name)   # not a literal: fine
    ''')
    assert [(f.code, f.line, f.col, f.found) for f in found] == [
        ("FG002", 3, 12, "open_target('live')"),
        ("FG002", 4, 13, "open_target('staging')"),
    ]


def test_fg003_literal_targets_in_the_config_api() -> None:
    found = codes('''
        import fillgate
        from fillgate import Target, load_config
        from fillgate.config import load_config as lc

        def compute(row, ctx):
            a = load_config().target("live")
            b = lc("other.toml").target(name="prod")
            cfg = load_config()
            c = cfg.target("staging")
            d = Target("live", url, "live")
            e = fillgate.Target(name="reporting", url=url, environment="reporting")
            f = cfg.target(ctx.target.name)            # not a literal: fine
            g = something_else.target("live")           # not fillgate's config: fine
    ''')
    assert [c for c, _ in found] == ["FG003"] * 5
    assert [f for _, f in found] == [".target('live')", ".target('prod')", ".target('staging')",
                                     "Target('live', ...)", "Target('reporting', ...)"]


def test_fg004_protected_names_in_keywords_and_headers() -> None:
    found = codes('''
        def compute(row, ctx):
            call_stage("education", target="live")
            call_stage("work", target_name="production")
            call_stage("skills", environment="prod")
            call_stage("honors", target="qa")            # neither protected nor configured
            requests.post(url, headers={"X-Target": "live", "Accept": "live"})
            headers = {"x-fillgate-environment": "PROD"}
            headers["X-Target"] = "production"
            compare = ctx.environment == "live"          # a comparison, not a hard-coded target
    ''')
    assert found == [
        ("FG004", "target='live'"),
        ("FG004", "target_name='production'"),
        ("FG004", "environment='prod'"),
        ("FG004", "X-Target: live"),
        ("FG004", "x-fillgate-environment: PROD"),
        ("FG004", "X-Target: production"),
    ]


def test_fg004_configured_target_names() -> None:
    code = '''
        def compute(row, ctx):
            call_stage("honors", target="qa")
            call_stage("honors", headers={"X-Target": "reporting"})
    '''
    assert codes(code) == []
    assert codes(code, names=("live", "qa", "reporting")) == [
        ("FG004", "target='qa'"), ("FG004", "X-Target: reporting")
    ]


def test_fg005_hidden_connections() -> None:
    found = codes('''
        import sqlite3
        import sqlite3 as lite
        import psycopg
        import pymysql
        import sqlalchemy as sa
        from sqlalchemy import create_engine
        from psycopg import connect as pg_connect
        from fillgate import connect

        def compute(row, ctx):
            a = create_engine(url)
            b = sa.create_engine(url, future=True)
            c = sqlite3.connect("cache.db")
            d = lite.connect(":memory:")
            e = psycopg.connect(dsn)
            f = pg_connect(dsn)
            g = pymysql.connect(host="db")
            h = connect(target)                          # fillgate's own connect: FG005 is not for it
            i = ctx.connection                           # the run's own connection: fine
    ''')
    assert [c for c, _ in found] == ["FG005"] * 7
    assert [f for _, f in found] == [
        "create_engine(url)", "sa.create_engine(url, future=True)", "sqlite3.connect('cache.db')",
        "lite.connect(':memory:')", "psycopg.connect(dsn)", "pg_connect(dsn)", "pymysql.connect(host='db')",
    ]


def test_fg006_database_url_from_the_environment() -> None:
    found = codes('''
        import os
        from os import environ, getenv

        def compute(row, ctx):
            a = os.environ["DATABASE_URL"]
            b = os.environ.get("DATABASE_URL", "sqlite://")
            c = os.getenv("DATABASE_URL")
            d = getenv("LIVE_DATABASE_URL")
            e = environ["DATABASE_URL"]
            f = os.environ["HOME"]                       # not a database: fine
    ''')
    assert found == [
        ("FG006", "os.environ['DATABASE_URL']"),
        ("FG006", "os.environ.get('DATABASE_URL')"),
        ("FG006", "os.getenv('DATABASE_URL')"),
        ("FG006", "os.getenv('LIVE_DATABASE_URL')"),
        ("FG006", "os.environ['DATABASE_URL']"),
    ]


def test_a_syntax_error_is_reported_not_skipped() -> None:
    (finding,) = lint("def compute(row, ctx:\n    return 1\n")
    assert finding.code == "FG000"


def test_a_clean_job_has_no_findings() -> None:
    assert lint('''
        """Fill emails. Example target URL in a docstring: postgresql://app@db/app."""
        from fillgate import FillMissing, Job

        class FillEmail(Job):
            table = "people"
            columns = {"email": FillMissing()}
            source = "SELECT id, name, email FROM people"

            def compute(self, row, ctx):
                known = ctx.execute("SELECT 1 FROM domains WHERE name = :d", d="example.com")
                headers = {"X-Target": ctx.target.name, "X-Run": ctx.run_id}
                if ctx.environment == "live":
                    return None
                return {"email": row["name"].lower() + "@example.com"}
    ''') == []


# --- suppression, masking --------------------------------------------------------------------


def test_allow_comment_suppresses_the_findings_of_its_line() -> None:
    found = lint('''
        from sqlalchemy import create_engine
        a = create_engine("sqlite:///cache.db")  # fillgate: allow (a local cache, not a target)
        b = create_engine("sqlite:///cache.db")  # fillgate: allow[FG001]
        c = create_engine(
            "sqlite:///cache.db"  # fillgate: allow
        )
        d = "mysql://root@db/app"  # noqa: E501  # fillgate: allow[FG005, FG001]
        e = create_engine("sqlite:///cache.db")  # fillgate: allow[FG006]
        # fillgate: allow  (a comment on its own line suppresses only that line)
        f = create_engine(url)
    ''')
    assert [(f.line, f.code) for f in found] == [
        (4, "FG005"),   # only FG001 allowed there
        (5, "FG005"),   # the call starts on line 5; the comment is on line 6
        (9, "FG005"), (9, "FG001"),  # FG006 allowed, nothing else
        (11, "FG005"),
    ]


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://app:s3cret@db/app") == "postgresql://app:***@db/app"
    assert mask_url("mysql+pymysql://root:p%40ss@db:3306/x") == "mysql+pymysql://root:***@db:3306/x"
    assert mask_url("postgresql://app@db/app") == "postgresql://app@db/app"
    assert mask_url("postgresql://app:pa/ss:w@db/app") == "postgresql://app:***@db/app"
    found = lint('''
        from sqlalchemy import create_engine
        engine = create_engine("postgresql://app:s3cret@live-db/app")
    ''')
    assert [(f.code, f.found) for f in found] == [
        ("FG005", "create_engine('postgresql://app:***@live-db/app')"),
        ("FG001", "postgresql://app:***@live-db/app"),
    ]
    assert all("s3cret" not in f.format() for f in found)


# --- files, folders and the command ----------------------------------------------------------


def _tree(root: Path) -> None:
    (root / "jobs" / "nested").mkdir(parents=True)
    (root / "jobs" / "__pycache__").mkdir()
    (root / "jobs" / ".venv").mkdir()
    (root / "jobs" / "clean.py").write_text("from fillgate import Job\n")
    (root / "jobs" / "nested" / "stage.py").write_text(
        'def compute(row, ctx):\n    return ctx.open_target("live")\n'
    )
    (root / "jobs" / "nested" / "notes.txt").write_text('URL = "postgresql://app@db/app"\n')
    (root / "jobs" / "__pycache__" / "old.py").write_text('URL = "postgresql://app@db/app"\n')
    (root / "jobs" / ".venv" / "lib.py").write_text('URL = "postgresql://app@db/app"\n')
    (root / "single.py").write_text('DB = "mysql://root:hunter2@live-db/app"\n')


def test_lint_paths_walks_folders_and_sorts(tmp_path: Path) -> None:
    _tree(tmp_path)
    found = lint_paths([tmp_path / "single.py", tmp_path / "jobs"])
    # files in __pycache__, .venv and non-.py files in folders are not linted; sorted by path
    assert [(Path(f.file).name, f.line, f.code) for f in found] == [
        ("stage.py", 2, "FG002"), ("single.py", 1, "FG001"),
    ]
    with pytest.raises(UsageError, match="does not exist"):
        lint_paths([tmp_path / "missing.py"])


def test_cli_exit_codes_and_output(cli, tmp_path: Path) -> None:
    _tree(tmp_path)
    clean = run_cli(cli, None, "lint", str(tmp_path / "jobs" / "clean.py"))
    assert clean.exit_code == 0, clean.output
    assert clean.stdout == ""
    assert "1 file checked: no hard-coded targets or database URLs." in clean.stderr

    dirty = run_cli(cli, None, "lint", "single.py", "jobs")
    assert dirty.exit_code == 1
    lines = dirty.stdout.splitlines()
    assert len(lines) == 2
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m["file"], m["line"], m["col"], m["code"]) for m in parsed if m] == [
        ("jobs/nested/stage.py", "2", "12", "FG002"), ("single.py", "1", "6", "FG001"),
    ]
    assert parsed[1] and parsed[1]["found"] == "mysql://root:***@live-db/app"
    assert "hunter2" not in dirty.output
    assert "\x1b[" not in dirty.stdout  # plain text, no Rich markup or colour
    assert "2 findings in 3 files." in dirty.stderr

    as_json = run_cli(cli, None, "lint", "--json", "single.py")
    assert as_json.exit_code == 1
    data = json.loads(as_json.stdout)
    assert data == {"files": 1, "findings": [{
        "file": "single.py", "line": 1, "col": 6, "code": "FG001",
        "message": data["findings"][0]["message"], "found": "mysql://root:***@live-db/app",
    }]}
    assert "hunter2" not in as_json.stdout

    missing = run_cli(cli, None, "lint", "single.py", "nope/")
    assert missing.exit_code == 2
    assert "path nope does not exist" in missing.stderr
    assert missing.stdout == ""


def test_cli_uses_configured_target_names_without_resolving_urls(cli, tmp_path: Path) -> None:
    config = tmp_path / "conf" / "fillgate.toml"  # not found upwards from the working directory
    config.parent.mkdir()
    config.write_text('[targets.reporting]\nurl = "${REPORTING_URL}"\n\n[targets.qa]\nurl = "${QA_URL}"\n'
                      'environment = "qa-eu"\n')
    job = tmp_path / "job.py"
    job.write_text('def compute(row, ctx):\n    return fetch(row, target="reporting", env="qa-eu")\n')
    result = run_cli(cli, config, "lint", str(job))  # REPORTING_URL and QA_URL are not set
    assert result.exit_code == 1, result.output
    assert [LINE.match(line)["found"] for line in result.stdout.splitlines()] == [  # type: ignore[index]
        "target='reporting'", "env='qa-eu'"
    ]
    unconfigured = run_cli(cli, None, "lint", str(job))
    assert unconfigured.exit_code == 0
    missing_config = run_cli(cli, tmp_path / "nope.toml", "lint", str(job))
    assert missing_config.exit_code == 2


def test_the_example_jobs_are_clean_and_the_before_script_is_not(cli) -> None:
    assert run_cli(cli, None, "lint", str(EXAMPLE / "jobs.py")).exit_code == 0
    result = run_cli(cli, None, "lint", str(EXAMPLE))
    assert result.exit_code == 1
    assert [LINE.match(line)["code"] for line in result.stdout.splitlines()] == ["FG005"]  # type: ignore[index]
    assert "before.py" in result.stdout
