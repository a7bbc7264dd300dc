"""Targets are resolved when used: an unset ${VAR} or a missing driver of one target never
blocks another. And what a target's config decides on the command line: the default change
gate (max_changes), --config anywhere, and which ledger an unknown run was looked up in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fillgate.config import load_config
from fillgate.errors import ConfigError

from conftest import TestDB, run_cli

N = 20
WRITES = N // 2  # FillEmail fills every second person


def _state(db: TestDB) -> tuple[Any, ...]:
    return (
        db.rows("SELECT id, name, email, kind FROM people ORDER BY id"),
        db.rows("SELECT run_id, kind, status FROM fillgate_runs ORDER BY run_id"),
        db.scalar("SELECT count(*) FROM fillgate_changes"),
    )


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- lazy targets -------------------------------------------------------------------------------


def test_unset_variable_of_another_target_does_not_block(
    db: TestDB, cli: CliRunner, jobs_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's own example: staging works while LIVE_DATABASE_URL is unset; live says
    which variable is missing, naming the target."""
    monkeypatch.delenv("FG_LIVE_URL_UNSET", raising=False)
    db.create_people(N)
    cfg = _write(db.tmp_path / "fillgate.toml", f'[targets.staging]\nurl = "{db.url}"\n\n'
                 '[targets.live]\nurl = "${FG_LIVE_URL_UNSET}"\nprotected = true\n')
    assert load_config(cfg).target("staging").environment == "staging"
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    ran = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--target", "staging", "--json")
    assert ran.exit_code == 0, ran.output
    assert db.scalar("SELECT count(*) FROM people WHERE email IS NULL") == 0

    before = _state(db)
    live = run_cli(cli, cfg, "runs", "--target", "live")
    assert live.exit_code == 2
    assert live.stderr.startswith("error: target 'live' in ")
    assert "uses ${FG_LIVE_URL_UNSET}, but the environment variable FG_LIVE_URL_UNSET is not set" in live.stderr
    assert _state(db) == before


def test_missing_driver_of_another_target_does_not_block(
    sqlite_db: TestDB, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fillgate.backends import MySQLBackend

    monkeypatch.setattr(MySQLBackend, "drivers", {**MySQLBackend.drivers,
                                                   "mysql": ("mysql+pymysql", "fillgate_no_such_driver", "mysql")})
    cfg = _write(sqlite_db.tmp_path / "fillgate.toml",
                 f'[targets.local]\nurl = "{sqlite_db.url}"\n\n[targets.reports]\nurl = "mysql://app@db/reports"\n')
    assert run_cli(cli, cfg, "init", "--target", "local").exit_code == 0
    assert run_cli(cli, cfg, "runs", "--target", "local").exit_code == 0
    with pytest.raises(ConfigError, match=r"target 'reports' .* driver 'fillgate_no_such_driver' is not installed"):
        load_config(cfg).target("reports")
    result = run_cli(cli, cfg, "runs", "--target", "reports")
    assert result.exit_code == 2 and "pip install 'fillgate[mysql]'" in result.stderr


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path, cli: CliRunner) -> None:
    """A typo in a SQLite path is an error; only init creates the file."""
    cfg = _write(tmp_path / "fillgate.toml", f'[targets.staging]\nurl = "sqlite:///{tmp_path}/typo.db"\n')
    for command in (["runs"], ["show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"], ["history", "people", "1"]):
        result = run_cli(cli, cfg, *command)
        assert result.exit_code == 2, result.output
        assert "typo.db does not exist" in result.stderr and "fillgate init --target staging" in result.stderr
    assert not (tmp_path / "typo.db").exists()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert (tmp_path / "typo.db").exists()


# --- the default change gate ------------------------------------------------------------------


def _setup(db: TestDB, cli: CliRunner, jobs_file: Path, target: str, extra: str) -> Path:
    db.create_people(N)
    cfg = _write(db.tmp_path / "fillgate.toml", f'[targets.{target}]\nurl = "{db.url}"\n{extra}')
    assert run_cli(cli, cfg, "init", "--confirm", target).exit_code == 0
    plan = run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan")
    assert plan.exit_code == 0, plan.output
    return cfg


def test_configured_max_changes_gates_apply_and_run(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _setup(db, cli, jobs_file, "staging", f"max_changes = {WRITES - 1}\n")
    before = _state(db)
    for command in (["apply", "p.plan"], ["run", f"{jobs_file}:FillEmail"]):
        refused = run_cli(cli, cfg, *command)
        assert refused.exit_code == 3, refused.output
        assert refused.stderr.startswith("refused: ")
        assert f"more than --max-changes {WRITES - 1}" in refused.stderr
        # run made its plan (recorded as a plan run) before the gate; nothing else is written
        assert _state(db)[0] == before[0] and _state(db)[2] == 0
        assert {kind for _, kind, _ in _state(db)[1]} <= {"init", "plan"}
    # the command line wins over the config
    applied = run_cli(cli, cfg, "apply", "p.plan", "--max-changes", str(WRITES))
    assert applied.exit_code == 0, applied.output
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == WRITES


def test_protected_target_needs_a_gate(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _setup(db, cli, jobs_file, "live", "")
    before = _state(db)
    plans = sorted(p.name for p in db.tmp_path.glob("**/*.plan"))
    for command in (["apply", "p.plan"], ["run", f"{jobs_file}:FillEmail"]):
        for as_json in ((), ("--json",)):
            refused = run_cli(cli, cfg, *command, "--confirm", "live", *as_json)
            assert refused.exit_code == 3, refused.output
            assert refused.stderr.startswith("refused: target 'live' is the protected environment 'live' and has no "
                                             "change gate")
            assert "--max-changes N" in refused.stderr and "max_changes = N under [targets.live]" in refused.stderr
            if as_json:
                assert json.loads(refused.stdout)["error"]["type"] == "ProtectedTargetError"
    assert _state(db) == before  # not even run's plan was made
    assert sorted(p.name for p in db.tmp_path.glob("**/*.plan")) == plans
    ok = run_cli(cli, cfg, "apply", "p.plan", "--confirm", "live", "--max-changes", str(WRITES))
    assert ok.exit_code == 0, ok.output


def test_protected_target_with_configured_gate(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _setup(db, cli, jobs_file, "live", f"max_changes = {WRITES}\n")
    ok = run_cli(cli, cfg, "apply", "p.plan", "--confirm", "live")
    assert ok.exit_code == 0, ok.output
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == WRITES


# --- --config after the command ------------------------------------------------------------------


def test_config_option_after_the_command(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    sqlite_db.create_people(N)
    cfg = sqlite_db.config(name="elsewhere.toml")
    assert run_cli(cli, None, "init", "--config", str(cfg)).exit_code == 0
    for args in (["runs", "--config", str(cfg)], ["runs", "-c", str(cfg), "--json"], [f"--config={cfg}", "runs"],
                 ["runs", f"--config={cfg}"], ["plan", f"{jobs_file}:FillEmail", "--config", str(cfg), "-o", "x.plan"],
                 ["history", "people", "1", "-c", str(cfg)], ["lint", str(jobs_file), "--config", str(cfg)]):
        result = run_cli(cli, None, *args)
        assert result.exit_code == 0, (args, result.output)
    # a --config without its value is a usage error
    missing = run_cli(cli, None, "runs", "--config")
    assert missing.exit_code == 2 and missing.stderr == "error: option --config needs a value: --config PATH.\n"


# --- unknown runs ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Query string argument")  # pysqlite ignores ?password=: only its masking matters
@pytest.mark.parametrize("command", [["show"], ["resume"], ["revert"], ["revert", "--dry-run"], ["pause"], ["cancel"]])
def test_unknown_run_names_the_ledger_searched(sqlite_db: TestDB, cli: CliRunner, command: list[str]) -> None:
    other = sqlite_db.tmp_path / "other.db"
    cfg = _write(sqlite_db.tmp_path / "fillgate.toml",
                 'default_target = "staging"\n'
                 f'[targets.staging]\nurl = "sqlite:///{sqlite_db.tmp_path}/test.db?password=hunter2"\n'
                 f'[targets.qa]\nurl = "sqlite:///{other}"\n')
    assert run_cli(cli, cfg, "init").exit_code == 0
    run_id = "01M8KW00000000000000000000"
    result = run_cli(cli, cfg, command[0], run_id, *command[1:])
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.startswith(f"error: no run '{run_id}' in the ledger of target 'staging' (environment staging, ")
    assert "test.db?password=***" in message and "hunter2" not in message
    assert "see: fillgate runs --target staging" in message
    assert "Other declared targets: qa; pick one with --target NAME." in message
    single = _write(sqlite_db.tmp_path / "single.toml", f'[targets.staging]\nurl = "{sqlite_db.url}"\n')
    alone = run_cli(cli, single, command[0], run_id, *command[1:])
    assert alone.exit_code == 2 and "Other declared targets" not in alone.stderr


def test_init_of_a_protected_sqlite_target_refused_creates_no_file(tmp_path: Path, cli: CliRunner) -> None:
    cfg = tmp_path / "fillgate.toml"
    cfg.write_text(f'[targets.live]\nurl = "sqlite:///{tmp_path / "live.db"}"\nprotected = true\nmax_changes = 10\n')
    result = run_cli(cli, cfg, "init", "--target", "live")
    assert result.exit_code == 3, result.output
    assert "refused:" in result.stderr
    assert not (tmp_path / "live.db").exists()
