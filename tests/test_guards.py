"""The guards, on every backend: environment stamps, protected environments, the
--max-changes gate, the (job, target) lock, the target-escape guard, init/re-stamp, and
plans that do not belong to the target, database or moment they are applied to."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from fillgate import apply_plan, make_plan, stampread
from fillgate.applier import lock_name
from fillgate.config import load_config, parse_url
from fillgate.database import dispose_all
from fillgate.errors import PlanMismatchError, StampMismatchError, TargetEscapeError
from fillgate.ledger import ApplyLock, new_run_id
from fillgate.loader import load_job
from fillgate.stamp import connect

from conftest import MY_URL, PG_URL, SRC, TestDB, _worker, fillgate_subprocess, run_cli

N = 20  # people; every second one lacks an email, so FillEmail plans 10 changes
WRITES = N // 2


# --- helpers -----------------------------------------------------------------------------


def people(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT id, email, kind FROM people ORDER BY id")


def n_changes(db: TestDB) -> int:
    return db.scalar("SELECT count(*) FROM fillgate_changes")


def runs_of_kind(db: TestDB, kind: str) -> list[tuple[Any, ...]]:
    return db.rows("SELECT run_id, status, job FROM fillgate_runs WHERE kind = :k ORDER BY run_id", {"k": kind})


def stamp(db: TestDB) -> str | None:
    return db.scalar("SELECT value FROM fillgate_meta WHERE name = 'environment'")


def ledger_snapshot(db: TestDB) -> tuple[Any, ...]:
    return (
        db.rows("SELECT name, value FROM fillgate_meta ORDER BY name"),
        db.rows("SELECT * FROM fillgate_runs ORDER BY run_id"),
        n_changes(db),
    )


def setup(db: TestDB, cli: CliRunner, targets: dict[str, dict[str, Any]] | None = None,
          init: str = "staging", confirm: str | None = None) -> Path:
    """people(N) + a config + ``init`` of one target; returns the config path."""
    db.create_people(N)
    cfg = db.config(targets)
    args = ["init", "--target", init] + (["--confirm", confirm] if confirm else [])
    result = run_cli(cli, cfg, *args)
    assert result.exit_code == 0, result.output
    return cfg


def make_plan_file(cli: CliRunner, cfg: Path, jobs_file: Path, target: str = "staging",
                   out: str = "p.plan", job: str = "FillEmail") -> dict[str, Any]:
    result = run_cli(cli, cfg, "plan", f"{jobs_file}:{job}", "--target", target, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_untouched(db: TestDB, before: list[tuple[Any, ...]]) -> None:
    assert people(db) == before
    assert n_changes(db) == 0
    assert runs_of_kind(db, "apply") == []
    assert runs_of_kind(db, "revert") == []


# --- environment stamp -------------------------------------------------------------------


def test_stamp_mismatch_refuses_plan_run_and_apply(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = setup(db, cli, {"staging": {}, "qa": {}})
    before = people(db)
    runs_before = db.rows("SELECT run_id FROM fillgate_runs")

    for args in (
        ["plan", f"{jobs_file}:FillEmail", "--target", "qa"],
        ["run", f"{jobs_file}:FillEmail", "--target", "qa"],
        ["runs", "--target", "qa"],
    ):
        result = run_cli(cli, cfg, *args)
        assert result.exit_code == 3, (args, result.output)
        assert "target 'qa' points at a database stamped 'staging'" in result.stderr
        assert "environment 'qa'" in result.stderr
    assert db.rows("SELECT run_id FROM fillgate_runs") == runs_before  # not even a plan run

    # a plan made while the config was right is refused once the target's environment changes
    make_plan_file(cli, cfg, jobs_file)
    db.config({"staging": {"environment": "qa"}})
    result = run_cli(cli, cfg, "apply", "p.plan", "--max-changes", "100")
    assert result.exit_code == 3, result.output
    assert "stamped 'staging'" in result.stderr
    assert "'qa'" in result.stderr
    assert_untouched(db, before)


# --- protected environments ------------------------------------------------------------


def test_protected_environment_needs_typed_confirmation(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = setup(db, cli, {"live": {}}, init="live", confirm="live")
    before = people(db)

    # plans are read-only: allowed without --confirm
    plan = make_plan_file(cli, cfg, jobs_file, target="live")
    assert plan["changes"] == WRITES

    for confirm in ([], ["--confirm", "staging"], ["--confirm", "LIVE"]):
        result = run_cli(cli, cfg, "apply", "p.plan", *confirm)
        assert result.exit_code == 3, result.output
        assert "protected environment 'live'" in result.stderr
        assert "--confirm live" in result.stderr
        result = run_cli(cli, cfg, "run", f"{jobs_file}:FillKind", "--target", "live", *confirm)
        assert result.exit_code == 3, result.output
        assert "protected environment 'live'" in result.stderr
    assert_untouched(db, before)

    applied = run_cli(cli, cfg, "apply", "p.plan", "--confirm", "live", "--max-changes", str(WRITES), "--json")
    assert applied.exit_code == 0, applied.output
    run_id = json.loads(applied.stdout)["run_id"]
    assert n_changes(db) == WRITES
    after_apply = people(db)
    assert after_apply[0][1] == "person1@example.com"

    for confirm in ([], ["--confirm", "prod"]):
        result = run_cli(cli, cfg, "revert", run_id, "--target", "live", *confirm)
        assert result.exit_code == 3, result.output
        assert "--confirm live" in result.stderr
    assert people(db) == after_apply
    assert runs_of_kind(db, "revert") == []

    reverted = run_cli(cli, cfg, "revert", run_id, "--target", "live", "--confirm", "live")
    assert reverted.exit_code == 0, reverted.output
    assert people(db) == before

    ran = run_cli(cli, cfg, "run", f"{jobs_file}:FillKind", "--target", "live", "--confirm", "live",
                  "--max-changes", "100")
    assert ran.exit_code == 0, ran.output
    assert [row[2] for row in people(db)] == ["odd" if i % 2 else "even" for i in range(1, N + 1)]


# --- the --max-changes gate -------------------------------------------------------------


def test_gate_refuses_before_writing(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = setup(db, cli)
    before = people(db)
    make_plan_file(cli, cfg, jobs_file)
    result = run_cli(cli, cfg, "apply", "p.plan", "--max-changes", str(WRITES - 1))
    assert result.exit_code == 3, result.output
    assert f"has {WRITES} changes, more than --max-changes {WRITES - 1}" in result.stderr
    assert f"--max-changes {WRITES}" in result.stderr  # what to do
    assert_untouched(db, before)
    assert db.scalar("SELECT count(*) FROM fillgate_errors") == 0


    # run = plan + gate + apply: refused the same way; its dry run stays on record for review
    result = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--target", "staging",
                     "--max-changes", "3", "-o", "r.plan")
    assert result.exit_code == 3, result.output
    assert f"has {WRITES} changes, more than --max-changes 3" in result.stderr
    assert_untouched(db, before)
    assert [status for _, status, _ in runs_of_kind(db, "plan")] == ["planned", "planned"]

    ok = run_cli(cli, cfg, "apply", "p.plan", "--max-changes", str(WRITES))
    assert ok.exit_code == 0, ok.output
    assert n_changes(db) == WRITES


# --- one apply per (job, target) -------------------------------------------------------


def test_lock_held_refuses_and_names_the_holder(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = setup(db, cli)
    before = people(db)
    plan = make_plan_file(cli, cfg, jobs_file)
    holder = new_run_id()
    lock = ApplyLock(db.engine, lock_name(plan["job"]), holder, "mallory@elsewhere").acquire()
    try:
        result = run_cli(cli, cfg, "apply", "p.plan")
        assert result.exit_code == 3, result.output
        assert f"run {holder}" in result.stderr
        assert "mallory@elsewhere" in result.stderr
        result = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--target", "staging")
        assert result.exit_code == 3, result.output
        assert f"run {holder}" in result.stderr
        assert_untouched(db, before)
        # another job on the same target is not blocked
        other = run_cli(cli, cfg, "run", f"{jobs_file}:FillKind", "--target", "staging")
        assert other.exit_code == 0, other.output
    finally:
        lock.release()
    ok = run_cli(cli, cfg, "apply", "p.plan")
    assert ok.exit_code == 0, ok.output
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE column_name = 'email'") == WRITES


def test_concurrent_apply_in_another_process_is_refused(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = setup(db, cli)
    make_plan_file(cli, cfg, jobs_file, out="p1.plan")
    make_plan_file(cli, cfg, jobs_file, out="p2.plan")  # another plan of the same job
    slow = fillgate_subprocess(
        ["--config", str(cfg), "apply", "p1.plan", "--batch-size", "1", "--pause-between-batches", "150"],
        cwd=db.tmp_path,
    )
    try:
        deadline = time.monotonic() + 20
        holder = None
        while time.monotonic() < deadline and holder is None:
            running = [r for r in runs_of_kind(db, "apply") if r[1] == "running"]
            holder = running[0][0] if running else None
            if holder is None:
                assert slow.poll() is None, slow.communicate()
                time.sleep(0.05)
        assert holder is not None, "the slow apply never started"

        result = run_cli(cli, cfg, "apply", "p2.plan")
        assert result.exit_code == 3, result.output
        assert f"run {holder}" in result.stderr
        assert f"pid {slow.pid}" in result.stderr
        # only the holder wrote anything, and the refused apply left no run behind
        assert [r[0] for r in runs_of_kind(db, "apply")] == [holder]
        assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id <> :r", {"r": holder}) == 0

        stop = run_cli(cli, cfg, "cancel", holder)
        assert stop.exit_code == 0, stop.output
        _, stderr = slow.communicate(timeout=30)
        assert slow.returncode == 0, stderr
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    status, checkpoint = db.rows("SELECT status, checkpoint FROM fillgate_runs WHERE run_id = :r", {"r": holder})[0]
    assert status == "cancelled"
    assert 0 < checkpoint < WRITES
    assert db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == checkpoint == n_changes(db)


# --- the target-escape guard ------------------------------------------------------------

ESCAPE_JOBS = '''
import sqlalchemy
from sqlalchemy import text
from fillgate import Job, FillMissing

OTHER_URL = {other_url!r}


class _Base(Job):
    table = "people"
    key = ("id",)
    columns = {{"email": FillMissing()}}
    source = "SELECT id, name, email FROM people"


class OpensLive(_Base):
    def compute(self, row, ctx):
        engine = ctx.open_target("live")
        with engine.begin() as conn:
            conn.execute(text("UPDATE people SET email = 'hacked'"))
        return {{"email": "x@example.com"}}


class HardCodedUrl(_Base):
    def compute(self, row, ctx):
        engine = sqlalchemy.create_engine(OTHER_URL)
        with engine.begin() as conn:
            conn.execute(text("UPDATE people SET email = 'hacked'"))
        return {{"email": "x@example.com"}}


class SwallowsTheError(_Base):
    def compute(self, row, ctx):
        try:
            ctx.open_target("live")
        except Exception:
            pass  # a job must not be able to hide an escape attempt
        return {{"email": "x@example.com"}}


class ReadsOwnTarget(_Base):
    def compute(self, row, ctx):
        engine = ctx.open_target(ctx.target.name)
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM people")).scalar()
        return {{"email": f"{{row['id']}}-of-{{n}}@example.com"}}
'''


@pytest.fixture
def escape_setup(db: TestDB, cli: CliRunner) -> tuple[Path, Path, str]:
    """staging -> the test database; live -> another SQLite database with its own people."""
    other = db.tmp_path / "live.db"
    other_url = f"sqlite:///{other}"
    engine = sa.create_engine(other_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, email TEXT)"))
        conn.execute(sa.text("INSERT INTO people VALUES (1, 'Real', NULL), (2, 'Customer', NULL)"))
    engine.dispose()
    jobs = db.tmp_path / "escape_jobs.py"
    jobs.write_text(ESCAPE_JOBS.format(other_url=other_url))
    cfg = setup(db, cli, {"staging": {}, "live": {"url": other_url}})
    return cfg, jobs, other_url


def other_people(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT id, email FROM people ORDER BY id"))]
    finally:
        engine.dispose()


ESCAPING = ("OpensLive", "HardCodedUrl", "SwallowsTheError")


def test_target_escape_refused(db: TestDB, cli: CliRunner, escape_setup: tuple[Path, Path, str]) -> None:
    cfg, jobs, other_url = escape_setup
    before = people(db)
    for job in ESCAPING:
        # through the CLI: plan and run are refused (exit 3), not reported as row errors
        for command, extra in (("plan", ["-o", "e.plan"]), ("run", ["--max-changes", "100"])):
            result = run_cli(cli, cfg, command, f"{jobs}:{job}", "--target", "staging", *extra)
            assert result.exit_code == 3, (job, command, result.output)
            assert "staging" in result.stderr
            assert "live" in result.stderr
            assert "a run reaches only its own target" in result.stderr.lower()
        assert not Path("e.plan").exists()
        # through the library: TargetEscapeError
        conn = connect(load_config(cfg).target("staging"))
        with pytest.raises(TargetEscapeError, match="only its own target"):
            make_plan(conn, load_job(f"{jobs}:{job}"), out=db.tmp_path / "x.plan")
        assert not (db.tmp_path / "x.plan").exists()
    assert_untouched(db, before)
    assert other_people(other_url) == [(1, None), (2, None)]
    plans = db.rows("SELECT status, message FROM fillgate_runs WHERE kind = 'plan'")
    assert len(plans) == 3 * len(ESCAPING)
    assert all(status == "failed" and "only its own target" in message for status, message in plans)

    # the run's own target, reached through ctx, is fine
    result = run_cli(cli, cfg, "run", f"{jobs}:ReadsOwnTarget", "--target", "staging")
    assert result.exit_code == 0, result.output
    assert db.scalar("SELECT email FROM people WHERE id = 1") == f"1-of-{N}@example.com"
    assert n_changes(db) == WRITES


def test_a_stamp_refusal_is_read_through_the_driver_before_sqlalchemy_is_imported(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    """fillgate.stampread reads the stamp the full connect reads, through the driver alone;
    ``fillgate run`` on a target stamped otherwise is refused in a new process that never
    imports SQLAlchemy (the fast CLI start), and leaves everything as it was."""
    cfg = setup(db, cli, {"staging": {}, "qa": {}})
    assert stampread.stamped_environment(db.url) == "staging"
    stampread.refuse_if_stamped_otherwise("staging", "staging", db.url)  # the right stamp: nothing said
    with pytest.raises(StampMismatchError, match="target 'qa' points at a database stamped 'staging'"):
        stampread.refuse_if_stamped_otherwise("qa", "qa", db.url)
    # driver options are left to the full connect: nothing is read, nothing refused
    assert stampread.stamped_environment(db.url + "?connect_timeout=3") is None
    before = ledger_snapshot(db), people(db)
    argv = ["fillgate", "--config", str(cfg), "run", f"{jobs_file}:FillEmail", "--target", "qa"]
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('sqlalchemy imported:', 'sqlalchemy' in sys.modules, file=sys.stderr))\n"
             "from fillgate.cli import main\n"
             f"sys.argv = {argv!r}\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=db.tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert "refused: target 'qa' points at a database stamped 'staging'" in done.stderr
    assert "sqlalchemy imported: False" in done.stderr
    assert (ledger_snapshot(db), people(db)) == before


def test_the_early_stamp_read_leaves_what_it_cannot_read_to_the_full_connect(tmp_path: Path) -> None:
    """No file is created, no server is waited on for long, and nothing is refused."""
    missing = tmp_path / "missing.db"
    assert stampread.stamped_environment(f"sqlite:///{missing}") is None
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a database without a ledger
    for url in (f"sqlite:///{empty}", "sqlite://", "sqlite:///:memory:", "not a url", "oracle://u@h/db",
                "postgresql://nobody@127.0.0.1:1/db", "mysql://nobody@127.0.0.1:1/db"):
        started = time.monotonic()
        assert stampread.stamped_environment(url) is None, url
        assert time.monotonic() - started < stampread.CONNECT_TIMEOUT_S + 3, url
    assert empty.stat().st_size == 0


# --- init and re-stamping -------------------------------------------------------------


def test_init_rerun_is_a_noop(db: TestDB, cli: CliRunner) -> None:
    cfg = setup(db, cli)
    snapshot = ledger_snapshot(db)
    assert [r[1] for r in snapshot[1]] == ["init"]
    result = run_cli(cli, cfg, "init", "--target", "staging", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["changed"] is False
    again = run_cli(cli, cfg, "init", "--target", "staging")
    assert again.exit_code == 0
    assert "nothing to do" in again.stdout
    assert ledger_snapshot(db) == snapshot


def test_force_stamp_changes_stamp_and_records_a_run(db: TestDB, cli: CliRunner) -> None:
    cfg = setup(db, cli, {"staging": {}, "qa": {}})
    database_id = db.scalar("SELECT value FROM fillgate_meta WHERE name = 'database_id'")
    snapshot = ledger_snapshot(db)

    refused = run_cli(cli, cfg, "init", "--target", "qa")
    assert refused.exit_code == 3
    assert "stamped 'staging'" in refused.stderr
    assert "--force-stamp" in refused.stderr
    assert ledger_snapshot(db) == snapshot

    result = run_cli(cli, cfg, "init", "--target", "qa", "--force-stamp", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["previous_environment"] == "staging"
    assert stamp(db) == "qa"
    assert db.scalar("SELECT value FROM fillgate_meta WHERE name = 'database_id'") == database_id
    stamps = db.rows("SELECT target, environment, status, args FROM fillgate_runs WHERE kind = 'stamp'")
    assert len(stamps) == 1
    target, environment, status, args = stamps[0]
    assert (target, environment, status) == ("qa", "qa", "succeeded")
    assert json.loads(args) == {"from": "staging", "to": "qa"}
    # the old name now meets the mismatch guard
    assert run_cli(cli, cfg, "runs", "--target", "staging").exit_code == 3
    assert run_cli(cli, cfg, "runs", "--target", "qa").exit_code == 0


def test_restamping_a_protected_database_needs_its_confirmation(db: TestDB, cli: CliRunner) -> None:
    cfg = setup(db, cli, {"live": {}, "staging": {}}, init="live", confirm="live")
    snapshot = ledger_snapshot(db)
    for confirm in ([], ["--confirm", "staging"]):
        result = run_cli(cli, cfg, "init", "--target", "staging", "--force-stamp", *confirm)
        assert result.exit_code == 3, result.output
        assert "protected environment 'live'" in result.stderr
        assert "--confirm live" in result.stderr
        assert stamp(db) == "live"
        assert ledger_snapshot(db) == snapshot
    ok = run_cli(cli, cfg, "init", "--target", "staging", "--force-stamp", "--confirm", "live")
    assert ok.exit_code == 0, ok.output
    assert stamp(db) == "staging"
    assert [r[1] for r in runs_of_kind(db, "stamp")] == ["succeeded"]


# --- plans that do not belong here ----------------------------------------------------


def test_plan_for_target_a_refused_on_target_b(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    # "mirror" reaches the same database under the same environment, but is another target
    cfg = setup(db, cli, {"staging": {}, "mirror": {"environment": "staging"}})
    before = people(db)
    make_plan_file(cli, cfg, jobs_file)
    result = run_cli(cli, cfg, "apply", "p.plan", "--target", "mirror")
    assert result.exit_code == 3, result.output
    assert "made for target 'staging', not 'mirror'" in result.stderr
    with pytest.raises(PlanMismatchError, match="'staging', not 'mirror'"):
        apply_plan(connect(load_config(cfg).target("mirror")), "p.plan")
    assert_untouched(db, before)


@pytest.fixture
def other_database(db: TestDB) -> Iterator[str]:
    """A second, empty database on the same backend."""
    if db.backend == "sqlite":
        yield f"sqlite:///{db.tmp_path / 'other.db'}"
        return
    name = f"fillgate_t_{_worker()}_other"
    admin_url = PG_URL if db.backend == "postgresql" else MY_URL
    admin = sa.create_engine(parse_url(admin_url, "test"), isolation_level="AUTOCOMMIT")  # type: ignore[arg-type]
    q = '"' if db.backend == "postgresql" else "`"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {q}{name}{q}")
        conn.exec_driver_sql(f"CREATE DATABASE {q}{name}{q}")
    yield sa.make_url(db.url).set(database=name).render_as_string(hide_password=False)
    dispose_all()
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {q}{name}{q}")
    admin.dispose()


def test_plan_from_another_database_refused(
    db: TestDB, cli: CliRunner, jobs_file: Path, other_database: str
) -> None:
    cfg = setup(db, cli)
    before = people(db)
    plan = make_plan_file(cli, cfg, jobs_file)
    assert plan["changes"] == WRITES

    # the same target name now points at a freshly initialized copy of the data
    other = TestDB(db.backend, other_database, sa.create_engine(parse_url(other_database, "test")), db.tmp_path)
    try:
        other.create_people(N)
        cfg = db.config({"staging": {"url": other_database}})
        assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
        other_before = people(other)
        result = run_cli(cli, cfg, "apply", "p.plan", "--max-changes", "100")
        assert result.exit_code == 3, result.output
        assert "against another database" in result.stderr
        assert_untouched(other, other_before)
    finally:
        other.engine.dispose()
    assert_untouched(db, before)


def test_same_plan_twice_refused(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg = setup(db, cli)
    make_plan_file(cli, cfg, jobs_file)
    first = run_cli(cli, cfg, "apply", "p.plan", "--json")
    assert first.exit_code == 0, first.output
    run_id = json.loads(first.stdout)["run_id"]
    assert n_changes(db) == WRITES
    # make one planned change applicable again: a second apply would happily write it
    db.execute("UPDATE people SET email = NULL WHERE id = 1")
    second = run_cli(cli, cfg, "apply", "p.plan")
    assert second.exit_code == 3, second.output
    assert f"already applied by run {run_id}" in second.stderr
    assert db.scalar("SELECT email FROM people WHERE id = 1") is None
    assert n_changes(db) == WRITES
    assert [r[0] for r in runs_of_kind(db, "apply")] == [run_id]
