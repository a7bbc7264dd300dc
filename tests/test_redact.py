"""Passwords never printed: one masking function for every form a password takes in a URL,
a DSN or a driver's message, used wherever fillgate prints one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from fillgate import database
from fillgate.config import load_config
from fillgate.contrib.webhook import WebhookSink
from fillgate.errors import ConfigError
from fillgate.lint import lint_source
from fillgate.redact import mask_secrets, redact_url

from conftest import TestDB, run_cli

SECRET = "hunter2-Zq9"


@pytest.mark.parametrize("text, shown", [
    (f"postgresql://app:{SECRET}@db/app", "postgresql://app:***@db/app"),
    (f"postgresql://app@db/app?password={SECRET}", "postgresql://app@db/app?password=***"),
    (f"postgresql://app@db/app?sslmode=require&sslpassword={SECRET}&x=1", "sslpassword=***&x=1"),
    (f"mysql://app@db/app?pass={SECRET}", "mysql://app@db/app?pass=***"),
    (f"mysql://app@db/app?PWD={SECRET};x=1", "PWD=***;x=1"),
    (f"postgresql://app:p@ss/{SECRET}@db/app?email=a@b.example", "postgresql://app:***@db/app?email=a@b.example"),
    (f"host=db user=app password={SECRET} dbname=app", "host=db user=app password=*** dbname=app"),
    (f"host=db password='{SECRET} x' dbname=app", "host=db password=*** dbname=app"),
    (f"connect({{'host': 'db', 'password': '{SECRET}'}})", "'password': '***'"),
    (f'{{"user": "app", "password": "{SECRET}"}}', "\"password\": '***'"),
])
def test_mask_secrets(text: str, shown: str) -> None:
    masked = mask_secrets(text)
    assert SECRET not in masked
    assert shown in masked


def test_a_password_with_spaces_or_quotes_is_masked_whole() -> None:
    """A url that does not parse is shown as written: 'postgresql://app:my SECRET@db:notaport/db'
    was printed with its password (the mask stopped at the space)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from sqlalchemy.engine import URL

    assert mask_secrets(f"'postgresql://app:my {SECRET}@db:x/db' is not a database URL") == (
        "'postgresql://app:***@db:x/db' is not a database URL")
    assert mask_secrets(f"postgresql://app:it's \"{SECRET}@db/db") == "postgresql://app:***@db/db"

    password = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\r\n"),
                       min_size=1, max_size=20)

    @settings(max_examples=400, deadline=None)
    @given(pw=password, user=st.sampled_from(["app", "a.b"]), around=st.sampled_from(["", "'", '"', "("]))
    def check(pw: str, user: str, around: str) -> None:
        url = URL.create("postgresql", username=user, password=pw, host="db", database="db")
        close = {"'": "'", '"': '"', "(": ")"}.get(around, "")
        shown = mask_secrets(f"cannot connect {around}{url.render_as_string(hide_password=False)}{close}: no")
        assert shown == f"cannot connect {around}{url.render_as_string(hide_password=True)}{close}: no"
        if not {"?", "#", "@"} & set(pw):  # written raw, these would read as a query, fragment or host
            raw = f"'postgresql://{user}:{pw}@db:notaport/db' is not a database URL"
            assert mask_secrets(raw) == f"'postgresql://{user}:***@db:notaport/db' is not a database URL"

    check()


def test_mask_secrets_leaves_other_text_alone() -> None:
    for text in ("postgresql://app@db:5432/app", "bypass=1 compass=2", "sqlite:///a.db", "no password here",
                 "password authentication failed for user \"app\""):
        assert mask_secrets(text) == text


def test_redact_url() -> None:
    url = make_url(f"postgresql://app:{SECRET}@db/app?password={SECRET}")
    assert redact_url(url) == "postgresql://app:***@db/app?password=***"
    assert redact_url(f"https://u:{SECRET}@hooks.example:8443/services/{SECRET}?token=x", hide_path=True) == (
        "https://hooks.example:8443/…"
    )
    assert SECRET not in repr(WebhookSink(f"https://hooks.example/services/{SECRET}"))


@pytest.mark.parametrize("via", ["toml", "database_url"])
def test_password_in_the_query_string_is_never_printed(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    url = f"postgresql://app@127.0.0.1:1/appdb?password={SECRET}&connect_timeout=2"
    cfg: Path | None = None
    if via == "toml":
        cfg = tmp_path / "fillgate.toml"
        cfg.write_text(f'[targets.staging]\nurl = "{url}"\n')
    else:
        monkeypatch.setenv("DATABASE_URL", url)
    for command in (["init"], ["runs"], ["runs", "--json"], ["show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]):
        result = run_cli(cli, cfg, *command)
        assert result.exit_code == 2, (command, result.output)
        assert "cannot connect" in result.stderr and "password=***" in result.stderr
        assert SECRET not in result.stdout and SECRET not in result.stderr
        if "--json" in command:
            assert "password=***" in json.loads(result.stdout)["error"]["message"]


def test_password_echoed_by_the_driver_is_masked(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver's message may repeat the connection string it was given."""

    class Refusing:
        def connect(self) -> Any:
            raise OperationalError("connect", {}, Exception(f"could not connect: host=db user=app password={SECRET}"))

    monkeypatch.setattr(database, "engine_for", lambda target: Refusing())
    cfg = tmp_path / "fillgate.toml"
    cfg.write_text(f'[targets.staging]\nurl = "postgresql://app:{SECRET}@db/app"\n')
    with pytest.raises(ConfigError) as info:
        database.check_reachable(load_config(cfg).target("staging"))
    assert SECRET not in str(info.value)
    assert "postgresql+psycopg://app:***@db/app" in str(info.value) and "password=***" in str(info.value)


def test_unparseable_url_is_shown_masked(tmp_path: Path, cli: CliRunner) -> None:
    cfg = tmp_path / "fillgate.toml"
    cfg.write_text(f'[targets.staging]\nurl = "postgresql://app:{SECRET}@db:port/app?password={SECRET}"\n')
    result = run_cli(cli, cfg, "runs")
    assert result.exit_code == 2
    assert "postgresql://app:***@db:port/app?password=***" in result.stderr and SECRET not in result.stderr


def test_lint_masks_every_password_form() -> None:
    findings = lint_source(f'URL = "postgresql://app@db/app?password={SECRET}"\n', "job.py")
    assert [f.found for f in findings] == ["postgresql://app@db/app?password=***"]


LEAKY_JOB = f'''
from fillgate import Job, FillMissing


class Leaky(Job):
    table = "people"
    key = ("id",)
    columns = {{"email": FillMissing()}}
    source = "SELECT id, name, email FROM people"

    def compute(self, row, ctx):
        raise RuntimeError("cannot reach postgresql://svc:{SECRET}@crm/db?sslpassword={SECRET}")
'''


def test_error_messages_of_jobs_are_masked(sqlite_db: TestDB, cli: CliRunner) -> None:
    """Row errors quote whatever the job's exception said: plan, show and --json mask it."""
    sqlite_db.create_people(3)
    cfg = sqlite_db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    (sqlite_db.tmp_path / "leaky.py").write_text(LEAKY_JOB)
    job = f"{sqlite_db.tmp_path / 'leaky.py'}:Leaky"
    planned = run_cli(cli, cfg, "plan", job, "--json")
    assert planned.exit_code == 1
    run_id = json.loads(planned.stdout)["run_id"]
    outputs = [planned, run_cli(cli, cfg, "plan", job), run_cli(cli, cfg, "show", run_id),
               run_cli(cli, cfg, "show", run_id, "--json")]
    for result in outputs:
        assert "svc:***@crm/db?sslpassword=***" in result.stdout, result.stdout
        assert SECRET not in result.stdout and SECRET not in result.stderr
