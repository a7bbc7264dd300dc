"""Commands that change a run read it again under the run's lock: a run that finished (or was
resumed) between the first read and the lock is never re-opened, re-applied or re-labelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fillgate import Limits, apply_plan, connect, control_run, resume_run
from fillgate.errors import RunStateError
from fillgate.ledger import ApplyLock
from fillgate.monitor import Monitor

from conftest import TestDB, run_cli

N = 100


class _StopAfterFirstBatch(Monitor):
    def batch_done(self, *args: Any, **kwargs: Any) -> None:
        super().batch_done(*args, **kwargs)
        raise RuntimeError("the process died after its first batch")


def _failed_after_one_batch(db: TestDB, cli: CliRunner, jobs_file: Path) -> str:
    db.create_people(N, with_email_every=N + 1)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    assert run_cli(cli, cfg, "plan", f"{jobs_file}:FillEmail", "-o", "p.plan").exit_code == 0
    conn = connect(db.target())
    with pytest.raises(RuntimeError):
        apply_plan(conn, "p.plan", Limits(batch_size=10), _StopAfterFirstBatch())
    run_id, status, checkpoint = db.rows("SELECT run_id, status, checkpoint FROM fillgate_runs WHERE kind = 'apply'")[0]
    assert (status, checkpoint) == ("failed", 10)
    return str(run_id)


def test_resume_racing_a_finishing_apply(db: TestDB, cli: CliRunner, jobs_file: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The run finishes (here: another resume completes it) after this resume read it and
    before it took the lock: this resume must see that, not re-apply from the old checkpoint."""
    run_id = _failed_after_one_batch(db, cli, jobs_file)
    conn = connect(db.target())
    real_acquire = ApplyLock.acquire
    raced = []

    def acquire(self: ApplyLock) -> ApplyLock:
        if not raced:
            raced.append(True)
            resume_run(conn, run_id, Limits(batch_size=10))  # the other process finishes the run
        return real_acquire(self)

    monkeypatch.setattr(ApplyLock, "acquire", acquire)
    with pytest.raises(RunStateError, match="already succeeded"):
        resume_run(conn, run_id, Limits(batch_size=10))
    assert raced
    assert db.rows("SELECT status, checkpoint FROM fillgate_runs WHERE kind = 'apply'") == [("succeeded", N)]
    assert db.scalar("SELECT count(*) FROM fillgate_errors") == 0  # no bogus conflicts
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == N
    assert db.scalar("SELECT count(*) FROM people WHERE email LIKE '%@example.com'") == N


def test_pause_racing_a_finishing_apply(db: TestDB, cli: CliRunner, jobs_file: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """pause reads the run as running, its process finishes, then pause takes the lock: the
    succeeded run must stay succeeded."""
    run_id = _failed_after_one_batch(db, cli, jobs_file)
    conn = connect(db.target())
    db.execute("UPDATE fillgate_runs SET status = 'running' WHERE run_id = :r", {"r": run_id})
    real_acquire = ApplyLock.acquire

    def acquire(self: ApplyLock) -> ApplyLock:
        db.execute("UPDATE fillgate_runs SET status = 'succeeded' WHERE run_id = :r", {"r": run_id})
        return real_acquire(self)

    monkeypatch.setattr(ApplyLock, "acquire", acquire)
    with pytest.raises(RunStateError, match="has status succeeded"):
        control_run(conn, run_id, "pause")
    assert db.scalar("SELECT status FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == "succeeded"


def test_cancel_of_a_paused_run_resumed_meanwhile(db: TestDB, cli: CliRunner, jobs_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """cancel reads a failed run; before it acts, a resume finishes it: cancel must not
    overwrite 'succeeded' with 'cancelled'."""
    run_id = _failed_after_one_batch(db, cli, jobs_file)
    conn = connect(db.target())
    real_acquire = ApplyLock.acquire
    raced = []

    def acquire(self: ApplyLock) -> ApplyLock:
        if not raced:
            raced.append(True)
            monkeypatch.setattr(ApplyLock, "acquire", real_acquire)
            resume_run(conn, run_id, Limits(batch_size=10))
        return real_acquire(self)

    monkeypatch.setattr(ApplyLock, "acquire", acquire)
    with pytest.raises(RunStateError, match="has status succeeded"):
        control_run(conn, run_id, "cancel")
    assert db.scalar("SELECT status FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == "succeeded"


def test_a_live_process_keeps_its_lock_however_old_its_heartbeat(sqlite_db: TestDB) -> None:
    """A run held for minutes by a health check sends no batch heartbeat: on its own host its
    lock is judged by its process, which is alive, so a second apply is still refused."""
    from fillgate.errors import LockHeldError
    from fillgate.stamp import init_target

    db = sqlite_db
    target = db.target()
    init_target(target)
    conn = connect(target)
    held = ApplyLock(conn.engine, "apply:job", "01HOLDER0000000000000000AA", "me@here").acquire()
    try:
        db.execute("UPDATE fillgate_locks SET heartbeat_at = :t", {"t": "2000-01-01 00:00:00.000000"})
        with pytest.raises(LockHeldError, match="01HOLDER0000000000000000AA"):
            ApplyLock(conn.engine, "apply:job", "01SECOND0000000000000000AA", "you@there").acquire()
    finally:
        held.release()


def test_a_hold_refreshes_the_heartbeat() -> None:
    beats: list[int] = []
    monitor = Monitor()
    monitor.run_started("R1", "apply", "job", "staging", "staging", 10, heartbeat=lambda: beats.append(1))
    monitor._on_hold("replication lag 12s > 5s")
    monitor._on_hold("replication lag 12s > 5s")  # within 10 s of the last beat: not again
    assert beats == [1]


def test_a_sqlite_write_transaction_waits_for_another_writer(sqlite_db: TestDB) -> None:
    """A batch's transaction may read before it writes. Begun deferred, another writer that
    slips in between makes its first write fail at once ("database is locked": SQLite does not
    wait in that case); begun IMMEDIATE (write_transaction), the other writer waits instead."""
    import sqlite3
    import threading
    import time

    from fillgate.database import engine_for, write_transaction

    db = sqlite_db
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    engine = engine_for(db.target())
    began = threading.Event()
    other: list[BaseException | None] = []

    def other_writer() -> None:
        began.wait(10)
        con = sqlite3.connect(str(db.tmp_path / "test.db"), timeout=10, isolation_level=None)
        try:
            con.execute("UPDATE t SET v = 'other' WHERE id = 2")
            other.append(None)
        except BaseException as exc:
            other.append(exc)
        finally:
            con.close()

    thread = threading.Thread(target=other_writer)
    thread.start()
    with write_transaction(engine) as tx:
        tx.exec_driver_sql("SELECT v FROM t WHERE id = 1").all()  # a read first, as a batch may
        began.set()
        time.sleep(0.3)  # the other writer is trying now
        tx.exec_driver_sql("UPDATE t SET v = 'batch' WHERE id = 1")
    thread.join(30)
    assert other == [None]
    assert db.rows("SELECT id, v FROM t ORDER BY id") == [(1, "batch"), (2, "other")]
