"""A job's exception may quote a connection string with its password: it never reaches the
plan file, the ledger, the events or any output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TestDB, run_cli

SECRET = "hunter2-s3cret"

JOBS = f'''
from fillgate import Job, Overwrite


class Leaky(Job):
    table = "people"
    key = ("id",)
    columns = {{"email": Overwrite()}}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        if row["id"] % 2:
            raise ConnectionError("could not reach postgresql://svc:{SECRET}@lookup.internal/db "
                                  "(password={SECRET})")
        return {{"email": row["name"].lower() + "@example.com"}}


class Broken(Job):
    table = "people"
    key = ("id",)
    columns = {{"email": Overwrite()}}
    source = "SELECT id, name, email FROM people"

    def build_lookup(self, ctx):
        raise RuntimeError("lookup service at mysql://svc:{SECRET}@lookup.internal/db refused")

    def compute(self, row, ctx):
        return {{}}
'''


def _everything(db: TestDB, tmp_path: Path) -> str:
    """Every text fillgate keeps: the ledger's tables and every file under tmp_path."""
    texts = []
    for table in ("fillgate_runs", "fillgate_errors", "fillgate_changes"):
        texts.extend(str(row) for row in db.rows(f"SELECT * FROM {table}"))
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".plan", ".jsonl", ".toml", ".json"):
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def test_a_password_in_a_job_error_is_never_kept(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    db.create_people(10)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    (tmp_path / "leaky.py").write_text(JOBS)
    outputs = []
    for args in (("plan", "leaky.py:Leaky", "-o", "l.plan", "--events", "ev.jsonl"),
                 ("plan", "leaky.py:Leaky", "--json"),
                 ("plan", "leaky.py:Broken", "--events", "ev.jsonl"),
                 ("plan", "leaky.py:Broken", "--json")):
        result = run_cli(cli, cfg, *args)
        assert result.exit_code in (1, 2), result.output
        outputs.append(result.stdout + result.stderr)
    plan_id = json.loads(Path("l.plan").read_text().splitlines()[0])["plan_id"]
    for args in (("show", plan_id), ("show", plan_id, "--json"), ("runs",), ("runs", "--json")):
        result = run_cli(cli, cfg, *args)
        outputs.append(result.stdout + result.stderr)
    kept = _everything(db, tmp_path)
    assert "lookup.internal" in kept  # the messages are kept ...
    assert SECRET not in kept  # ... without the password
    for output in outputs:
        assert SECRET not in output


PARAM_JOB = f'''
from fillgate import Job, Overwrite


class WithService(Job):
    table = "people"
    key = ("id",)
    columns = {{"email": Overwrite()}}
    source = "SELECT id, name, email FROM people"
    params = {{"service_url": str}}

    def compute(self, row, ctx):
        assert "{SECRET}" in self.args["service_url"]  # the job gets the value as given
        return {{"email": row["name"].lower() + "@example.com"}}
'''


def test_a_password_in_a_job_parameter_is_never_kept(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    """`--param service_url=https://svc:PASSWORD@lookup/x` was kept in the plan header, the run's
    arguments in the ledger, `show` (text and JSON) and the dashboard's run page."""
    db.create_people(6)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    (tmp_path / "params_job.py").write_text(PARAM_JOB)
    param = f"service_url=https://svc:{SECRET}@lookup.internal/x?password={SECRET}"
    outputs = []
    for args in (("plan", "params_job.py:WithService", "-p", param, "-o", "p.plan", "--events", "ev.jsonl"),
                 ("run", "params_job.py:WithService", "-p", param, "--max-changes", "6", "--json")):
        result = run_cli(cli, cfg, *args)
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout + result.stderr)
    plan_id = json.loads(Path("p.plan").read_text().splitlines()[0])["plan_id"]
    for args in (("show", plan_id), ("show", plan_id, "--json"), ("runs", "--json")):
        outputs.append(run_cli(cli, cfg, *args).stdout)
    kept = _everything(db, tmp_path)
    assert "https://svc:***@lookup.internal/x?password=***" in kept
    assert SECRET not in kept
    for output in outputs:
        assert SECRET not in output
    assert db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == 6


def test_a_password_recorded_in_arguments_before_masking_is_not_shown(sqlite_db: TestDB, cli: CliRunner,
                                                                       tmp_path: Path) -> None:
    """Runs recorded before parameters were masked keep the password in the ledger: show, show
    --json and the dashboard's run page mask it when they print the run's arguments."""
    db = sqlite_db
    db.create_people(4)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    (tmp_path / "params_job.py").write_text(PARAM_JOB)
    result = run_cli(cli, cfg, "plan", "params_job.py:WithService", "-p", f"service_url=https://svc:{SECRET}@x/y")
    assert result.exit_code == 0, result.output
    run_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'plan'")
    args = json.dumps({"params": {"service_url": f"https://svc:{SECRET}@x/y"}, "key": ["id"]})
    db.execute("UPDATE fillgate_runs SET args = :a WHERE run_id = :r", {"a": args, "r": run_id})
    for extra in ((), ("--json",)):
        shown = run_cli(cli, cfg, "show", run_id, *extra)
        assert shown.exit_code == 0 and "svc:***@x/y" in shown.stdout and SECRET not in shown.stdout
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from fillgate.web.app import Settings, create_app
    from fillgate.web.data import Dashboard

    board = Dashboard(cfg, None, tmp_path / "cache")
    client = TestClient(create_app(Settings(cfg, None, tmp_path / "cache"), board), base_url="http://127.0.0.1")
    page = client.get(f"/t/staging/runs/{run_id}")
    assert page.status_code == 200 and SECRET not in page.text and "svc:***@x/y" in page.text
