"""Ctrl-C and SIGTERM: a run stops at a batch boundary (or, on a second Ctrl-C, rolls the
batch in flight back), is left paused (apply) or failed (plan), never 'running', the command
says how to continue and exits 130, and no traceback ever reaches the user."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TestDB, fillgate_subprocess, run_cli

N = 3000

SLOW_JOBS = '''
import time
from fillgate import Job, Overwrite


class SlowFill(Job):
    table = "people"
    key = ("id",)
    columns = {"email": Overwrite()}
    source = "SELECT id, name, email FROM people"
    page_size = 50

    def compute(self, row, ctx):
        time.sleep(0.002)
        return {"email": row["name"].lower() + "@slow.example"}
'''


def _wait_for(predicate, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("the condition never held while the process ran")


def _audit_matches_table(db: TestDB) -> None:
    written = db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'")
    audited = db.scalar("SELECT count(*) FROM fillgate_changes")
    checkpoint = db.scalar("SELECT checkpoint FROM fillgate_runs WHERE kind = 'apply'")
    assert written == audited == checkpoint


def _planned(db: TestDB, cli: CliRunner, jobs_file: Path) -> Path:
    db.create_people(N, with_email_every=N + 1)  # nobody has an email: N changes
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan").exit_code == 0
    return cfg


def _started_writing(db: TestDB) -> bool:
    return bool(db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'apply' AND checkpoint > 0"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_pauses_at_a_batch_boundary(db: TestDB, cli: CliRunner, jobs_file: Path, sig: int) -> None:
    cfg = _planned(db, cli, jobs_file)
    proc = fillgate_subprocess(["--config", str(cfg), "apply", "p.plan", "--batch-size", "100",
                                "--pause-between-batches", "50"], cwd=db.tmp_path)
    _wait_for(lambda: _started_writing(db), proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    run_id, status, checkpoint, message = db.rows(
        "SELECT run_id, status, checkpoint, message FROM fillgate_runs WHERE kind = 'apply'")[0]
    assert status == "paused"
    assert 0 < checkpoint < N and checkpoint % 100 == 0  # a batch boundary
    assert f"fillgate resume {run_id}" in out
    assert "interrupted by" in message
    _audit_matches_table(db)
    result = run_cli(cli, cfg, "resume", run_id)
    assert result.exit_code == 0, result.output
    assert db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == N
    _audit_matches_table(db)


def test_second_ctrl_c_rolls_the_batch_back(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = _planned(db, cli, jobs_file)
    proc = fillgate_subprocess(["--config", str(cfg), "apply", "p.plan", "--batch-size", "500",
                                "--pause-between-batches", "20"], cwd=db.tmp_path)
    _wait_for(lambda: _started_writing(db), proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    status, message = db.rows("SELECT status, message FROM fillgate_runs WHERE kind = 'apply'")[0]
    assert status == "paused", message
    _audit_matches_table(db)
    run_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
    assert f"fillgate resume {run_id}" in out + err
    assert run_cli(cli, cfg, "resume", run_id).exit_code == 0
    _audit_matches_table(db)
    assert db.scalar("SELECT checkpoint FROM fillgate_runs WHERE kind = 'apply'") == N


def test_ctrl_c_ends_a_hold(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """A run held by a health check stops promptly on Ctrl-C instead of waiting out the hold."""
    db = sqlite_db
    cfg = _planned(db, cli, jobs_file)
    proc = fillgate_subprocess(["--config", str(cfg), "apply", "p.plan", "--batch-size", "100",
                                "--hold-while", "SELECT 1"], cwd=db.tmp_path)
    _wait_for(lambda: _started_writing(db), proc)
    time.sleep(0.2)  # held after its first batch
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert time.monotonic() - started < 10
    assert db.rows("SELECT status, checkpoint FROM fillgate_runs WHERE kind = 'apply'") == [("paused", 100)]
    _audit_matches_table(db)


def test_ctrl_c_during_a_plan(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    db.create_people(N)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    (tmp_path / "slow.py").write_text(SLOW_JOBS)
    proc = fillgate_subprocess(["--config", str(cfg), "plan", "slow.py:SlowFill", "-o", "slow.plan"],
                               cwd=db.tmp_path)
    _wait_for(lambda: bool(db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'plan'")), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    assert "interrupted" in err
    status, message = db.rows("SELECT status, message FROM fillgate_runs WHERE kind = 'plan'")[0]
    assert status == "failed" and "interrupted by Ctrl-C" in message
    assert not (tmp_path / "slow.plan").exists()
    assert not list(tmp_path.glob(".fillgate-plan-*"))  # no temporary body left behind
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_ctrl_c_while_starting_never_shows_a_traceback(sqlite_db: TestDB, cli: CliRunner, jobs_file: Path,
                                                       delay: float) -> None:
    db = sqlite_db
    cfg = _planned(db, cli, jobs_file)
    proc = fillgate_subprocess(["--config", str(cfg), "apply", "p.plan"], cwd=db.tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # Before the interpreter has reached fillgate's entry point, Python itself may die of the
    # signal (silently, "Could not import runpy module", or a traceback in its own startup
    # imports): no program can handle that. From the entry point on, there is never one.
    python_starting = proc.returncode in (1, -signal.SIGINT) and "fillgate/__main__.py" not in err
    assert python_starting or "Traceback" not in out + err, err
    assert proc.returncode in (0, 130) or python_starting, (out, err)
    status = db.rows("SELECT status FROM fillgate_runs WHERE kind = 'apply'")
    assert status in ([], [("paused",)], [("succeeded",)])
    if db.rows("SELECT 1 FROM fillgate_runs WHERE kind = 'apply'"):
        _audit_matches_table(db)


def test_a_run_whose_process_died_is_not_shown_running(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """kill -9 leaves the run recorded as running; runs and show call it interrupted and say
    how to continue."""
    cfg = _planned(db, cli, jobs_file)
    proc = fillgate_subprocess(["--config", str(cfg), "apply", "p.plan", "--batch-size", "100",
                                "--pause-between-batches", "50"], cwd=db.tmp_path)
    _wait_for(lambda: _started_writing(db), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    run_id = db.scalar("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")
    assert db.scalar("SELECT status FROM fillgate_runs WHERE kind = 'apply'") == "running"
    listed = run_cli(cli, cfg, "runs", "--kind", "apply")
    assert listed.exit_code == 0 and "interrupted" in listed.stdout and "running" not in listed.stdout
    shown = run_cli(cli, cfg, "show", run_id)
    text = " ".join(shown.stdout.split())
    assert "interrupted (recorded as running, but its process (pid" in text
    assert f"fillgate resume {run_id}" in text
    as_json = run_cli(cli, cfg, "runs", "--json")
    assert "is gone" in next(r for r in json.loads(as_json.stdout) if r["run_id"] == run_id)["interrupted"]
    assert run_cli(cli, cfg, "resume", run_id).exit_code == 0
    assert "interrupted" not in run_cli(cli, cfg, "show", run_id).stdout
    _audit_matches_table(db)


@pytest.mark.unit
def test_ctrl_c_while_a_command_still_imports_says_so_without_importing_more(
        monkeypatch: pytest.MonkeyPatch, cli: CliRunner, tmp_path: Path) -> None:
    """The CLI imports its heavy modules in the command that needs them: a Ctrl-C landing in
    such an import must be reported without importing anything more (a module whose import was
    cut short cannot be imported again safely: that printed a traceback)."""
    from fillgate import cli as cli_module

    class NoMoreImports:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"imported {name} after a Ctrl-C")

    class CtrlC:
        def __getattr__(self, name: str) -> object:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "loader", CtrlC())
    monkeypatch.setattr(cli_module, "report", NoMoreImports())
    (tmp_path / "fillgate.toml").write_text('[targets.t]\nurl = "sqlite:///t.db"\n')
    for extra in ([], ["--json"]):
        result = run_cli(cli, tmp_path / "fillgate.toml", "run", "jobs.py:Job", *extra)
        assert result.exit_code == 130, result.output
        assert result.stderr.startswith("interrupted: stopped by Ctrl-C before anything was written.")
        assert "Traceback" not in result.output
        if extra:
            assert json.loads(result.stdout)["error"] == {
                "type": "Interrupted", "exit_code": 130,
                "message": "stopped by Ctrl-C before anything was written."}
    assert not (tmp_path / "t.db").exists()
