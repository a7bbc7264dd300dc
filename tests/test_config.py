"""Targets: fillgate.toml, [tool.fillgate], ${ENV} interpolation, DATABASE_URL, protection,
and passwords that never reach any output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from fillgate.config import DEFAULT_PROTECTED, load_config
from fillgate.errors import ConfigError

from conftest import MY_URL, TestDB, run_cli

SECRET = "hunter2-Zq9"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def stamp_of(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT value FROM fillgate_meta WHERE name = 'environment'")).scalar()
    finally:
        engine.dispose()


# --- where targets come from ----------------------------------------------------------


def test_fillgate_toml_targets_environments_and_defaults(tmp_path: Path) -> None:
    write(
        tmp_path / "fillgate.toml",
        f"""
[targets.staging]
url = "sqlite:///{tmp_path}/staging.db"

[targets.eu]
url = "sqlite:///{tmp_path}/eu.db"
environment = "live"

[targets.qa]
url = "sqlite:///{tmp_path}/qa.db"
protected = true
""",
    )
    config = load_config()
    assert config.source == str(tmp_path / "fillgate.toml")
    assert sorted(config.targets) == ["eu", "qa", "staging"]
    staging = config.target("staging")
    assert staging.environment == "staging"  # environment defaults to the target's name
    assert staging.url.database == f"{tmp_path}/staging.db"
    assert staging.protected is False
    assert config.target("eu").environment == "live"
    assert config.target("eu").protected is True  # live is protected by default
    assert config.target("qa").protected is True  # protected = true


def test_config_found_from_a_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "fillgate.toml", f'[targets.staging]\nurl = "sqlite:///{tmp_path}/s.db"\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert list(load_config().targets) == ["staging"]


def test_pyproject_tool_fillgate(tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "pyproject.toml",
        f"""
[project]
name = "myapp"

[tool.fillgate.targets.staging]
url = "sqlite:///{tmp_path}/py.db"
environment = "stage"
""",
    )
    config = load_config()
    assert config.source == str(tmp_path / "pyproject.toml")
    assert config.target(None).environment == "stage"
    # and the CLI uses it without --config: init stamps the database "stage"
    result = run_cli(cli, None, "init")
    assert result.exit_code == 0, result.output
    assert stamp_of(f"sqlite:///{tmp_path}/py.db") == "stage"


def test_pyproject_without_tool_fillgate_is_not_a_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "other"\n[tool.ruff]\nline-length = 99\n')
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/env.db")
    config = load_config()
    assert config.source == "DATABASE_URL"
    assert list(config.targets) == ["default"]


def test_fillgate_config_env_var_and_missing_config_file(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path / "elsewhere.toml", f'[targets.ops]\nurl = "sqlite:///{tmp_path}/ops.db"\n')
    monkeypatch.setenv("FILLGATE_CONFIG", str(cfg))
    assert list(load_config().targets) == ["ops"]
    result = run_cli(cli, tmp_path / "nope.toml", "init")
    assert result.exit_code == 2
    assert "nope.toml does not exist" in result.stderr
    assert not (tmp_path / "ops.db").exists()


# --- ${ENV} interpolation ----------------------------------------------------------------


def test_env_interpolation(tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FG_DB_NAME", "interp.db")
    (tmp_path / "data").mkdir()
    cfg = write(tmp_path / "fillgate.toml", '[targets.staging]\nurl = "sqlite:///${FG_DATA_DIR}/${FG_DB_NAME}"\n')
    assert load_config().target("staging").url.database == f"{tmp_path}/data/interp.db"
    result = run_cli(cli, cfg, "init", "--target", "staging")
    assert result.exit_code == 0, result.output
    assert stamp_of(f"sqlite:///{tmp_path}/data/interp.db") == "staging"


def test_missing_env_variable_is_named(tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FG_UNSET_DB_PASSWORD", raising=False)
    cfg = write(
        tmp_path / "fillgate.toml",
        '[targets.staging]\nurl = "postgresql://app:${FG_UNSET_DB_PASSWORD}@127.0.0.1/app"\n',
    )
    config = load_config()  # the url is resolved when the target is used
    with pytest.raises(ConfigError, match="FG_UNSET_DB_PASSWORD") as info:
        config.target("staging")
    assert "staging" in str(info.value)
    result = run_cli(cli, cfg, "init")
    assert result.exit_code == 2
    assert "FG_UNSET_DB_PASSWORD" in result.stderr
    assert "is not set" in result.stderr


# --- mistakes in the config --------------------------------------------------------------


def test_unknown_key_in_target_is_an_error(tmp_path: Path, cli: CliRunner) -> None:
    cfg = write(
        tmp_path / "fillgate.toml",
        f'[targets.live]\nurl = "sqlite:///{tmp_path}/live.db"\nprotect = true\n',
    )
    with pytest.raises(ConfigError, match="protect") as info:
        load_config()
    assert "unknown key" in str(info.value)
    assert "protected" in str(info.value)  # names the allowed spelling
    result = run_cli(cli, cfg, "init", "--confirm", "live")
    assert result.exit_code == 2
    assert "protect" in result.stderr
    assert not (tmp_path / "live.db").exists()


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "fillgate.toml", f'target = "x"\n[targets.a]\nurl = "sqlite:///{tmp_path}/a.db"\n')
    with pytest.raises(ConfigError, match=r"unknown key.*target"):
        load_config()


def test_missing_url(tmp_path: Path, cli: CliRunner) -> None:
    cfg = write(tmp_path / "fillgate.toml", '[targets.staging]\nenvironment = "staging"\n')
    with pytest.raises(ConfigError, match=r"target 'staging'.*has no url"):
        load_config()
    result = run_cli(cli, cfg, "init")
    assert result.exit_code == 2
    assert "has no url" in result.stderr


def test_unparseable_or_unsupported_url(tmp_path: Path) -> None:
    write(tmp_path / "fillgate.toml", '[targets.a]\nurl = "not a url"\n')
    with pytest.raises(ConfigError, match="is not a database URL"):
        load_config().target("a")
    write(tmp_path / "fillgate.toml", '[targets.a]\nurl = "oracle://scott:tiger@db/orcl"\n')
    with pytest.raises(ConfigError, match="not supported") as info:
        load_config().target("a")
    assert "tiger" not in str(info.value)


def test_no_targets_declared(tmp_path: Path) -> None:
    write(tmp_path / "fillgate.toml", 'protected_environments = ["live"]\n')
    with pytest.raises(ConfigError, match="declares no targets"):
        load_config()


def test_unknown_target_lists_known_ones(tmp_path: Path, cli: CliRunner) -> None:
    cfg = write(
        tmp_path / "fillgate.toml",
        f'[targets.staging]\nurl = "sqlite:///{tmp_path}/s.db"\n[targets.qa]\nurl = "sqlite:///{tmp_path}/q.db"\n',
    )
    with pytest.raises(ConfigError, match=r"unknown target 'stagin'.*qa, staging"):
        load_config().target("stagin")
    result = run_cli(cli, cfg, "init", "--target", "stagin")
    assert result.exit_code == 2
    assert "unknown target 'stagin'" in result.stderr
    assert "qa, staging" in result.stderr
    # the hint is printed literally (not eaten as console markup)
    assert "[targets.stagin]" in result.stderr
    assert not (tmp_path / "s.db").exists()
    assert not (tmp_path / "q.db").exists()


def test_several_targets_need_target_option(tmp_path: Path, cli: CliRunner) -> None:
    cfg = write(
        tmp_path / "fillgate.toml",
        f'[targets.staging]\nurl = "sqlite:///{tmp_path}/s.db"\n[targets.qa]\nurl = "sqlite:///{tmp_path}/q.db"\n',
    )
    with pytest.raises(ConfigError, match="several targets"):
        load_config().target(None)
    result = run_cli(cli, cfg, "init")
    assert result.exit_code == 2
    assert "several targets" in result.stderr
    assert "--target" in result.stderr
    assert not (tmp_path / "s.db").exists()
    assert not (tmp_path / "q.db").exists()
    # default_target picks one explicitly
    cfg.write_text('default_target = "qa"\n' + cfg.read_text())
    result = run_cli(cli, cfg, "init")
    assert result.exit_code == 0, result.output
    assert stamp_of(f"sqlite:///{tmp_path}/q.db") == "qa"
    assert not (tmp_path / "s.db").exists()


def test_default_target_must_be_declared(tmp_path: Path) -> None:
    write(tmp_path / "fillgate.toml", f'default_target = "x"\n[targets.a]\nurl = "sqlite:///{tmp_path}/a.db"\n')
    with pytest.raises(ConfigError, match="default_target 'x' is not a declared target"):
        load_config()


# --- no config: DATABASE_URL ----------------------------------------------------------


def test_no_config_uses_database_url_as_default(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("DATABASE_URL", url)
    config = load_config()
    assert list(config.targets) == ["default"]
    assert config.target(None).name == "default"
    assert config.target(None).environment == "default"
    assert config.target(None).protected is False
    result = run_cli(cli, None, "init")
    assert result.exit_code == 0, result.output
    assert stamp_of(url) == "default"
    other = run_cli(cli, None, "runs", "--target", "staging")
    assert other.exit_code == 2
    assert "unknown target 'staging'" in other.stderr
    assert "default" in other.stderr


@pytest.mark.parametrize("command", [["init"], ["runs"], ["plan", "jobs.py:FillEmail"], ["history", "t", "1"]])
def test_no_config_and_no_database_url_fails_loudly(
    tmp_path: Path, cli: CliRunner, jobs_file: Path, command: list[str]
) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(cli, None, *command)
    assert result.exit_code == 2
    assert "DATABASE_URL is not set" in result.stderr
    assert "fillgate.toml" in result.stderr
    # no database file was conjured up anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- passwords ---------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["toml", "env_interpolation", "database_url"])
def test_password_never_printed_for_unreachable_database(
    tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    url = f"postgresql://app:{SECRET}@127.0.0.1:1/appdb?connect_timeout=2"
    cfg: Path | None = None
    if via == "toml":
        cfg = write(tmp_path / "fillgate.toml", f'[targets.staging]\nurl = "{url}"\n')
    elif via == "env_interpolation":
        monkeypatch.setenv("FG_PW", SECRET)
        cfg = write(
            tmp_path / "fillgate.toml",
            '[targets.staging]\nurl = "postgresql://app:${FG_PW}@127.0.0.1:1/appdb?connect_timeout=2"\n',
        )
    else:
        monkeypatch.setenv("DATABASE_URL", url)
    for command in (["init"], ["runs"], ["runs", "--json"], ["show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]):
        result = run_cli(cli, cfg, *command)
        assert result.exit_code == 2, (command, result.output)
        assert "cannot connect" in result.stderr
        assert "***" in result.stderr
        assert "app:***@127.0.0.1:1/appdb" in result.stderr
        assert SECRET not in result.output
        assert SECRET not in result.stdout
        assert SECRET not in result.stderr


def test_password_not_printed_for_bad_url(tmp_path: Path, cli: CliRunner) -> None:
    cfg = write(tmp_path / "fillgate.toml", f'[targets.staging]\nurl = "postgresql://app:{SECRET}@host:notaport/db"\n')
    result = run_cli(cli, cfg, "init")
    assert result.exit_code == 2
    assert "is not a database URL" in result.stderr
    assert SECRET not in result.output
    assert SECRET not in result.stderr


@pytest.mark.skipif(not MY_URL, reason="needs FILLGATE_TEST_MYSQL_URL")
def test_password_not_printed_when_access_denied(tmp_path: Path, cli: CliRunner) -> None:
    url = sa.make_url(MY_URL).set(username="fillgate_nobody", password=SECRET)  # type: ignore[arg-type]
    cfg = write(tmp_path / "fillgate.toml", f'[targets.staging]\nurl = "{url.render_as_string(False)}"\n')
    result = run_cli(cli, cfg, "init")
    assert result.exit_code == 2
    assert "fillgate_nobody" in result.stderr
    assert "***" in result.stderr
    assert SECRET not in result.output
    assert SECRET not in result.stderr


def test_password_absent_from_output_plans_and_ledger(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """A full workflow against a URL carrying a password: no output, plan file or ledger row
    contains it. (PostgreSQL: the test server trusts 127.0.0.1 and ignores the password;
    MariaDB: a user created with that password.)"""
    if db.backend == "sqlite":
        pytest.skip("SQLite URLs carry no password")
    url = sa.make_url(db.url).set(password=SECRET)
    if db.backend == "mysql":  # a user that really needs the password
        user = "fgpw_" + os.environ.get("PYTEST_XDIST_WORKER", "main")
        db.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        db.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{SECRET}'")
        db.execute(f"GRANT ALL PRIVILEGES ON `{url.database}`.* TO '{user}'@'%'")
        url = url.set(username=user)
    url = url.render_as_string(hide_password=False)
    assert SECRET in url
    db.create_people(10)
    cfg = db.config({"staging": {"url": url}})
    outputs = []
    for args in (
        ["init", "--target", "staging"],
        ["plan", f"{jobs_file}:FillEmail", "--target", "staging", "-o", "p.plan"],
        ["plan", f"{jobs_file}:FillEmail", "--target", "staging", "--json"],
        ["apply", "p.plan", "--max-changes", "4"],
        ["apply", "p.plan", "--json"],
        ["runs"],
        ["runs", "--json"],
        ["history", "people", "1", "--json"],
        ["history", "people", "1"],
    ):
        result = run_cli(cli, cfg, *args)
        outputs.append((args, result))
    codes = [r.exit_code for _, r in outputs]
    assert codes == [0, 0, 0, 3, 0, 0, 0, 0, 0], [(a, r.output) for a, r in outputs]
    run_id = json.loads(outputs[4][1].stdout)["run_id"]
    for extra in (["show", run_id], ["show", run_id, "--json"], ["revert", run_id]):
        result = run_cli(cli, cfg, *extra)
        assert result.exit_code == 0, result.output
        outputs.append((extra, result))
    for args, result in outputs:
        assert SECRET not in result.stdout, args
        assert SECRET not in result.stderr, args
    assert SECRET not in Path("p.plan").read_text()
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 10
    for table in ("fillgate_meta", "fillgate_runs", "fillgate_changes", "fillgate_errors", "fillgate_locks"):
        dump = repr(db.rows(f"SELECT * FROM {table}"))
        assert SECRET not in dump, table


# --- protection ----------------------------------------------------------------------------


def test_default_protected_environments(tmp_path: Path) -> None:
    assert set(DEFAULT_PROTECTED) == {"live", "prod", "production"}
    lines = []
    for name in ("live", "prod", "production", "staging", "dev"):
        lines.append(f'[targets.{name}]\nurl = "sqlite:///{tmp_path}/{name}.db"\n')
    # a target is protected by its environment, whatever its name
    lines.append(f'[targets.eu]\nurl = "sqlite:///{tmp_path}/eu.db"\nenvironment = "production"\n')
    lines.append(f'[targets.sandbox]\nurl = "sqlite:///{tmp_path}/sb.db"\nprotected = true\n')
    lines.append(f'[targets.prodlike]\nurl = "sqlite:///{tmp_path}/pl.db"\nprotected = false\nenvironment = "prod"\n')
    write(tmp_path / "fillgate.toml", "\n".join(lines))
    config = load_config()
    protected = {name for name, t in config.targets.items() if t.protected}
    # protected = false cannot unprotect a protected environment
    assert protected == {"live", "prod", "production", "eu", "sandbox", "prodlike"}


def test_custom_protected_environments(tmp_path: Path) -> None:
    write(
        tmp_path / "fillgate.toml",
        'protected_environments = ["main"]\n'
        f'[targets.main]\nurl = "sqlite:///{tmp_path}/m.db"\n'
        f'[targets.live]\nurl = "sqlite:///{tmp_path}/l.db"\n',
    )
    config = load_config()
    assert config.target("main").protected is True
    assert config.target("live").protected is False


def test_protected_flag_refuses_init_without_confirm(tmp_path: Path, cli: CliRunner) -> None:
    cfg = write(tmp_path / "fillgate.toml", f'[targets.qa]\nurl = "sqlite:///{tmp_path}/qa.db"\nprotected = true\n')
    result = run_cli(cli, cfg, "init")
    assert result.exit_code == 3
    assert "protected" in result.stderr
    assert "--confirm qa" in result.stderr
    assert not _has_meta(tmp_path / "qa.db")
    wrong = run_cli(cli, cfg, "init", "--confirm", "live")
    assert wrong.exit_code == 3
    assert not _has_meta(tmp_path / "qa.db")
    ok = run_cli(cli, cfg, "init", "--confirm", "qa")
    assert ok.exit_code == 0, ok.output
    assert stamp_of(f"sqlite:///{tmp_path}/qa.db") == "qa"


def _has_meta(path: Path) -> bool:
    if not path.exists():
        return False
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        return sa.inspect(engine).has_table("fillgate_meta")
    finally:
        engine.dispose()


def test_a_target_or_environment_name_longer_than_the_ledger_keeps_is_a_config_error(db: TestDB,
                                                                                      cli: CliRunner) -> None:
    """A target named with 140 characters was accepted, then the plan failed with "the database
    answered: value too long for type character varying(128)" (exit 1) on PostgreSQL and MariaDB."""
    db.create_people(2)
    long = "t" * 140
    for targets, message in (({long: {"environment": "staging"}}, "declares a target whose name is 140 characters"),
                             ({"staging": {"environment": long}}, "environment is 140 characters long")):
        cfg = db.config(targets)
        result = run_cli(cli, cfg, "init")
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "at most 128" in result.stderr
    assert "fillgate_runs" not in sa.inspect(db.engine).get_table_names()
