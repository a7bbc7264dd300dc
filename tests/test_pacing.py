"""Pacing on real databases: adaptive batch sizes (--chunk-time) against a database made slow
on purpose, the batch timeout and its retry at a quarter size (exactly once across the retry
and a resume), the load, vacuum and long-transaction holds, --critical-load, and the plan's
rolled-back trial batch."""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from fillgate import Limits, apply_plan, connect, init_target, load_job, make_plan
from fillgate.alerts import Alerter
from fillgate.control import resume_run
from fillgate.errors import BatchTimeoutError, CriticalLoadError, HealthCheckError
from fillgate.events import EventWriter
from fillgate.ledger.integrity import verify_ledger
from fillgate.monitor import Monitor
from fillgate.pacing import MIN_BATCH, START_BATCH, Batches, BatchSizer, batch_timeout
from fillgate.stamp import Connected

from conftest import TestDB, run_cli

pytestmark = pytest.mark.integration


# --- the sizer alone --------------------------------------------------------------------------


@pytest.mark.unit
def test_sizer_fixed_without_chunk_time() -> None:
    sizer = BatchSizer(300)
    assert not sizer.adaptive and sizer.size == 300
    assert sizer.done(300, 50.0) == 300  # slow or fast, the size stays
    assert sizer.timed_out(300) == 75 and sizer.size == 300


@pytest.mark.unit
def test_sizer_adapts_to_the_chunk_time_within_bounds() -> None:
    sizer = BatchSizer(5000, chunk_time=0.5)
    assert sizer.size == START_BATCH
    assert sizer.done(100, 0.01) == 200  # 10000/s would ask for 5000: growth is capped at 2x
    assert sizer.done(200, 0.02) == 400
    for _ in range(10):
        sizer.done(sizer.size, sizer.size / 10000)
    assert sizer.size == 5000  # the maximum
    assert sizer.done(5000, 10.0) < 5000 / 4  # a slow batch shrinks the next one at once
    for _ in range(40):
        sizer.done(sizer.size, sizer.size / 100)  # 100 changes/s: 50 per half second
    assert sizer.size in (49, 50)
    for _ in range(40):
        sizer.done(sizer.size, sizer.size * 1.0)  # 1 change/s: the minimum
    assert sizer.size == MIN_BATCH
    assert BatchSizer(4, chunk_time=0.5).size == 4  # a maximum below the minimum wins
    assert BatchSizer(5000, chunk_time=0.5, rate=300).size == 150  # seeded by a measured rate


@pytest.mark.unit
def test_sizer_starts_again_at_a_quarter_after_a_timeout() -> None:
    sizer = BatchSizer(5000, chunk_time=0.5)
    sizer.size = 800
    assert sizer.timed_out(800) == 200 and sizer.size == 200
    assert sizer.rate is None  # the average starts over


@pytest.mark.unit
def test_batches_give_back_in_order_and_timeouts() -> None:
    source = Batches(range(10))
    first = source.take(4)
    source.give_back(first[1:])
    assert first[:1] == [0] and source.take(2) == [1, 2] and source.take(5) == [3, 4, 5, 6, 7]
    assert source.take(5) == [8, 9] and source.take(5) == []
    assert batch_timeout(0.5, None) == 5.0 and batch_timeout(2.0, None) == 20.0
    assert batch_timeout(None, None) is None and batch_timeout(0.5, 0) is None and batch_timeout(None, 3) == 3


# --- a database made slow on purpose -------------------------------------------------------------

KIND_JOB = '''
from fillgate import Job, Overwrite


class FillKind(Job):
    table = "people"
    key = ("id",)
    columns = {"kind": Overwrite()}
    source = "SELECT id, kind FROM people"

    def compute(self, row, ctx):
        return {"kind": "even" if row["id"] % 2 == 0 else "odd"}
'''


def _slow_sqlite(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.create_function("fg_sleep", 1, lambda s: time.sleep(s) or 0)


def make_slow(db: TestDB, conn: Connected, per_row_s: float) -> None:
    """Every update of a row of ``people`` sleeps ``per_row_s`` in the database."""
    if db.backend == "sqlite":
        engine = conn.engine
        event.listen(engine, "connect", _slow_sqlite)
        engine.dispose()  # new connections know fg_sleep
        with engine.begin() as c:
            c.exec_driver_sql(f"CREATE TRIGGER slow BEFORE UPDATE ON people BEGIN SELECT fg_sleep({per_row_s}); END")
    elif db.backend == "postgresql":
        db.execute("CREATE FUNCTION slow_row() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep("
                   f"{per_row_s}); RETURN NEW; END $$ LANGUAGE plpgsql")
        db.execute("CREATE TRIGGER slow BEFORE UPDATE ON people FOR EACH ROW EXECUTE FUNCTION slow_row()")
    else:
        db.execute(f"CREATE TRIGGER slow BEFORE UPDATE ON people FOR EACH ROW SET @fg_slow = SLEEP({per_row_s})")


def setup(db: TestDB, rows: int) -> tuple[Connected, Any]:
    db.create_people(rows)
    target = db.target()
    init_target(target)
    conn = connect(target)
    jobs = db.tmp_path / "kind_jobs.py"
    jobs.write_text(KIND_JOB)
    return conn, load_job(f"{jobs}:FillKind")


def events_monitor() -> tuple[Monitor, io.StringIO]:
    stream = io.StringIO()
    return Monitor(events=EventWriter(stream), alerter=Alerter([])), stream


def events_of(stream: io.StringIO, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == kind]


def assert_applied_exactly_once(db: TestDB, run_id: str, rows: int) -> None:
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == rows
    assert db.scalar("SELECT count(DISTINCT row_key) FROM fillgate_changes WHERE run_id = :r", {"r": run_id}) == rows
    assert db.scalar("SELECT checkpoint FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == rows


def test_chunk_time_sizes_batches_to_a_slow_database(db: TestDB) -> None:
    conn, job = setup(db, 240)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    make_slow(db, conn, 0.005)  # 5 ms a row: 0.1 s holds about 20 rows
    monitor, stream = events_monitor()
    applied = apply_plan(conn, planned.path, Limits(batch_size=1000, chunk_time=0.1), monitor)
    assert applied.run.status == "succeeded"
    assert_applied_exactly_once(db, applied.run.run_id, 240)
    batches = events_of(stream, "batch_done")
    sizes = [b["batch_size"] for b in batches]
    assert sizes[0] == START_BATCH and batches[0]["rows"] == START_BATCH
    assert all(b["rows"] <= b["batch_size"] for b in batches) and all(b["timed_out"] == 0 for b in batches)
    # the first batch (100 rows, ~0.5 s) was 5 times too long: the next ones are near 20
    assert all(MIN_BATCH <= size <= 60 for size in sizes[1:]), sizes
    timeline = conn.ledger.batches(applied.run.run_id)
    assert [b["rows"] for b in timeline] == [b["rows"] for b in batches]  # the chosen sizes, recorded


def test_chunk_time_grows_batches_on_a_fast_database(db: TestDB) -> None:
    conn, job = setup(db, 700)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    monitor, stream = events_monitor()
    applied = apply_plan(conn, planned.path, Limits(batch_size=400, chunk_time=5.0), monitor)
    assert_applied_exactly_once(db, applied.run.run_id, 700)
    assert [b["batch_size"] for b in events_of(stream, "batch_done")] == [100, 200, 400]  # doubling, up to the max


# --- the batch timeout and its retry at a quarter size ------------------------------------------


@contextmanager
def row_locked(db: TestDB, row_id: int) -> Iterator[None]:
    """Another session holds a lock on one row of people (PostgreSQL, MariaDB)."""
    engine = sa.create_engine(sa.make_url(db.engine.url))
    with engine.connect() as other:
        other.exec_driver_sql(f"SELECT id FROM people WHERE id = {row_id} FOR UPDATE").all()
        try:
            yield
        finally:
            other.rollback()
    engine.dispose()


def test_a_batch_that_times_out_is_retried_at_a_quarter_then_stops_and_resumes_exactly_once(db: TestDB) -> None:
    conn, job = setup(db, 100)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    monitor, stream = events_monitor()
    limits = Limits(batch_size=40, batch_timeout_s=0.5)
    if db.backend == "sqlite":  # no row locks: a row that is slow for good (SQLite times the whole batch)
        make_slow(db, conn, 0.02)  # 40 rows: 0.8 s, over the timeout; a quarter (10): 0.2 s
        applied = apply_plan(conn, planned.path, limits, monitor)
        batches = events_of(stream, "batch_done")
        assert batches[0]["rows"] == 10 and batches[0]["timed_out"] == 40
        assert all(b["rows"] == b["timed_out"] // 4 for b in batches if b["timed_out"])
        assert sum(b["rows"] for b in batches) == 100
        assert_applied_exactly_once(db, applied.run.run_id, 100)
        assert verify_ledger(conn.ledger, None, {}, "staging").ok  # the audit chain holds across retries
        return
    with row_locked(db, 20), pytest.raises(BatchTimeoutError, match="first 10 changes"):
        apply_plan(conn, planned.path, limits, monitor)
    # batch 1 (rows 1-40) waited on row 20 and timed out; its first quarter (1-10) committed;
    # the next batch (11-50) and its quarter (11-20) hold row 20: the run stopped
    batches = events_of(stream, "batch_done")
    assert [(b["rows"], b["timed_out"]) for b in batches] == [(10, 40)]
    (run_id,) = [r[0] for r in db.rows("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")]
    assert db.rows("SELECT status, checkpoint FROM fillgate_runs WHERE run_id = :r", {"r": run_id}) == [("failed", 10)]
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NOT NULL") == 10
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 10
    resumed = resume_run(conn, run_id, limits)  # the lock is gone
    assert resumed.run.status == "succeeded"
    assert_applied_exactly_once(db, run_id, 100)
    assert verify_ledger(conn.ledger, None, {}, "staging").ok  # the audit chain holds across retry and resume


# --- health holds: load, critical load, long transactions, vacuum ---------------------------------

SLEEPERS = 12
SERVER = ("postgresql", "mysql")


@contextmanager
def busy_sessions(db: TestDB, seconds: float, n: int = SLEEPERS) -> Iterator[None]:
    """``n`` other sessions each running one statement for ``seconds`` (load on the server)."""
    sleep = "SELECT pg_sleep(:s)" if db.backend == "postgresql" else "SELECT SLEEP(:s)"
    engine = sa.create_engine(sa.make_url(db.engine.url), pool_size=n + 1)

    def run() -> None:
        with engine.connect() as c:
            c.execute(sa.text(sleep), {"s": seconds})

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    probe = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%%' AND state = 'active'" \
        if db.backend == "postgresql" else \
        "SELECT count(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP%%'"
    deadline = time.monotonic() + 10
    while db.scalar(probe) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield
    finally:
        for thread in threads:
            thread.join()
        engine.dispose()


class AfterFirstBatch:
    """A progress display that runs ``action`` once, after the first batch committed."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action

    def start(self, description: str, total: int | None) -> None: ...
    def hold(self, reason: str | None) -> None: ...
    def measured(self, rate: float | None) -> None: ...
    def stop(self) -> None: ...

    def advance(self, done: int) -> None:
        if self.action is not None:
            action, self.action = self.action, None
            action()


def test_critical_load_pauses_the_run_at_a_batch_boundary(db: TestDB) -> None:
    if db.backend not in SERVER:
        pytest.skip("a server's load")
    conn, job = setup(db, 50)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    load = contextlib.ExitStack()  # busy sessions from the end of the first batch on
    monitor, stream = events_monitor()
    monitor.progress = AfterFirstBatch(lambda: load.enter_context(busy_sessions(db, 3.0)))
    limits = Limits.for_target(conn, critical_load=SLEEPERS - 4, batch_size=10)
    with load, pytest.raises(CriticalLoadError, match="--critical-load 8") as raised:
        apply_plan(conn, planned.path, limits, monitor)
    assert raised.value.exit_code == 3 and "Nothing more was written" in str(raised.value)
    (run_id,) = [r[0] for r in db.rows("SELECT run_id FROM fillgate_runs WHERE kind = 'apply'")]
    status, checkpoint, message = db.rows("SELECT status, checkpoint, message FROM fillgate_runs WHERE run_id = :r",
                                          {"r": run_id})[0]
    assert (status, checkpoint) == ("paused", 10) and "--critical-load" in message
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NOT NULL") == 10  # only the first batch
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 10
    (finished,) = events_of(stream, "run_finished")
    assert finished["status"] == "paused" and "--critical-load" in finished["message"]
    resumed = resume_run(conn, run_id, Limits(batch_size=10))
    assert resumed.run.status == "succeeded"
    assert_applied_exactly_once(db, run_id, 50)


def test_critical_load_refuses_before_writing_on_the_command_line(db: TestDB, cli: Any) -> None:
    if db.backend not in SERVER:
        pytest.skip("a server's load")
    setup(db, 20)
    jobs = db.tmp_path / "kind_jobs.py"
    cfg = db.config()
    assert run_cli(cli, cfg, "plan", f"{jobs}:FillKind", "-o", "p.plan", "--no-estimate").exit_code == 0
    with busy_sessions(db, 2.0):
        result = run_cli(cli, cfg, "apply", "p.plan", "--critical-load", str(SLEEPERS - 4))
    assert result.exit_code == 3, result.output
    assert "refused:" in result.stderr and "> --critical-load 8" in result.stderr
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NOT NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'apply'") == 0


def test_max_load_holds_the_run_while_the_server_is_busy(db: TestDB) -> None:
    if db.backend not in SERVER:
        pytest.skip("a server's load")
    conn, job = setup(db, 30)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    load = contextlib.ExitStack()  # busy sessions from the end of the first batch on
    monitor, stream = events_monitor()
    monitor.progress = AfterFirstBatch(lambda: load.enter_context(busy_sessions(db, 2.0)))
    limits = Limits.for_target(conn, max_load=SLEEPERS - 4, batch_size=10)
    with load:  # the sessions end when the apply does
        applied = apply_plan(conn, planned.path, limits, monitor)
    assert applied.run.status == "succeeded"
    assert_applied_exactly_once(db, applied.run.run_id, 30)
    held = events_of(stream, "run_held")
    assert held and "> --max-load 8" in held[0]["reason"]
    what = "active sessions" if db.backend == "postgresql" else "Threads_running"
    assert held[0]["reason"].startswith(what)
    timeline = conn.ledger.batches(applied.run.run_id)
    assert timeline[1]["hold_reason"] is not None and "--max-load" in timeline[1]["hold_reason"]


def test_load_and_vacuum_checks_are_usage_errors_on_sqlite(sqlite_db: TestDB) -> None:
    conn, _ = setup(sqlite_db, 5)
    for options in ({"max_load": 5}, {"critical_load": 5}, {"hold_during_vacuum": True, "table": "people"},
                    {"max_transaction_age": 5.0, "table": "people"}):
        with pytest.raises(HealthCheckError, match="not available on sqlite"):
            Limits.for_target(conn, **options)  # type: ignore[arg-type]


def test_a_long_transaction_holding_the_table_holds_the_run(db: TestDB) -> None:
    if db.backend not in SERVER:
        pytest.skip("a server's transactions")
    conn, job = setup(db, 20)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    db.execute("CREATE TABLE other (id INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO other (id) VALUES (1)")
    engine = sa.create_engine(sa.make_url(db.engine.url))
    other = engine.connect()
    # PostgreSQL: a lock on people itself; MariaDB (which cannot tell the table): a locked row anywhere
    other.exec_driver_sql("SELECT id FROM people WHERE id = 20" if db.backend == "postgresql"
                          else "SELECT id FROM other WHERE id = 1 FOR UPDATE").all()
    time.sleep(2.2)  # older than 1 s even at MariaDB's whole seconds (innodb_trx.trx_started)
    release = threading.Timer(2.5, other.rollback)

    monitor, stream = events_monitor()
    monitor.progress = AfterFirstBatch(release.start)
    try:
        limits = Limits.for_target(conn, table="people", max_transaction_age=1.0, batch_size=10)
        applied = apply_plan(conn, planned.path, limits, monitor)
    finally:
        release.join()
        other.close()
        engine.dispose()
    assert applied.run.status == "succeeded"
    assert_applied_exactly_once(db, applied.run.run_id, 20)
    held = events_of(stream, "run_held")
    assert held and "older than --max-transaction-age 1.0s" in held[0]["reason"]
    assert ("transaction of pid" if db.backend == "postgresql" else "transaction of thread") in held[0]["reason"]


def test_a_vacuum_on_the_table_holds_the_run(db: TestDB) -> None:
    if db.backend != "postgresql":
        pytest.skip("PostgreSQL's vacuum")
    conn, job = setup(db, 3000)
    db.execute("UPDATE people SET name = name || 'x'")  # dead rows for the vacuum to visit
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    engine = sa.create_engine(sa.make_url(db.engine.url), isolation_level="AUTOCOMMIT")

    def vacuum() -> None:
        with engine.connect() as c:  # a vacuum made slow: it sleeps after every page it reads
            c.exec_driver_sql("SET vacuum_cost_delay = 50")
            c.exec_driver_sql("SET vacuum_cost_limit = 1")
            with contextlib.suppress(sa.exc.OperationalError):  # cancelled by the test once the run was held
                c.exec_driver_sql("VACUUM people")

    thread = threading.Thread(target=vacuum)
    thread.start()
    deadline = time.monotonic() + 10
    while not db.scalar("SELECT count(*) FROM pg_stat_progress_vacuum") and time.monotonic() < deadline:
        time.sleep(0.02)
    monitor, stream = events_monitor()
    try:
        limits = Limits.for_target(conn, table="people", hold_during_vacuum=True, batch_size=1000, max_hold_s=0.5)
        with pytest.raises(Exception, match="VACUUM running on people"):
            apply_plan(conn, planned.path, limits, monitor)
    finally:
        with engine.connect() as c:
            c.exec_driver_sql("SELECT pg_cancel_backend(pid) FROM pg_stat_progress_vacuum")
        thread.join()
        engine.dispose()
    held = events_of(stream, "run_held")
    assert held and held[0]["reason"].startswith("VACUUM running on people (")


# --- the plan's trial batch ---------------------------------------------------------------------


def snapshot(db: TestDB) -> dict[str, Any]:
    return {
        "people": db.rows("SELECT id, name, email, kind FROM people ORDER BY id"),
        "changes": db.scalar("SELECT count(*) FROM fillgate_changes"),
        "errors": db.scalar("SELECT count(*) FROM fillgate_errors"),
        "batches": db.scalar("SELECT count(*) FROM fillgate_batches WHERE run_id IN "
                             "(SELECT run_id FROM fillgate_runs WHERE kind <> 'plan')"),
        "runs": db.rows("SELECT kind, status FROM fillgate_runs WHERE kind <> 'plan' ORDER BY run_id"),
    }


def test_plan_estimates_the_apply_from_a_trial_batch_that_writes_nothing(db: TestDB) -> None:
    conn, job = setup(db, 500)
    before = snapshot(db)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan", estimate=True)
    assert snapshot(db) == before  # the trial was rolled back: tables and ledger as they were
    estimate = planned.estimate
    assert estimate is not None and estimate.skipped is None
    assert estimate.changes == 500 and estimate.trial == 200
    assert estimate.rate and estimate.rate > 0 and estimate.duration_s == pytest.approx(500 / estimate.rate, abs=1e-3)
    recorded = conn.ledger.get_run(planned.run.run_id).details["estimate"]
    assert recorded["trial"] == 200 and recorded["rate"] == estimate.rate
    # the apply starts from the measured rate: its first adaptive batch is sized by it
    monitor, stream = events_monitor()
    applied = apply_plan(conn, planned.path, Limits(batch_size=300, chunk_time=0.001), monitor)
    assert_applied_exactly_once(db, applied.run.run_id, 500)
    first = events_of(stream, "batch_done")[0]["batch_size"]
    assert first == max(MIN_BATCH, min(300, int(estimate.rate * 0.001)))


def test_plan_without_a_saved_file_still_estimates_and_writes_nothing(db: TestDB) -> None:
    conn, job = setup(db, 30)
    before = snapshot(db)
    planned = make_plan(conn, job, estimate=True)
    assert snapshot(db) == before
    assert planned.estimate is not None and planned.estimate.trial == 30


def test_plan_on_a_slow_table_estimates_it_slow(db: TestDB) -> None:
    conn, job = setup(db, 100)
    make_slow(db, conn, 0.01)
    planned = make_plan(conn, job, estimate=True)
    estimate = planned.estimate
    assert estimate is not None
    if db.backend == "mysql":  # a table with triggers gets no trial there
        assert estimate.skipped == "no trial batch: people has triggers, which may write to tables a rollback " \
                                   "does not undo"
        return
    assert estimate.rate is not None and estimate.rate < 120  # 10 ms a row: at most 100 rows/s
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NOT NULL") == 0


def test_plan_prints_the_estimate_and_the_json_has_it(db: TestDB, cli: Any) -> None:
    setup(db, 40)
    jobs = db.tmp_path / "kind_jobs.py"
    cfg = db.config()
    result = run_cli(cli, cfg, "plan", f"{jobs}:FillKind", "-o", "p.plan")
    assert result.exit_code == 0, result.output
    assert "Estimated apply time: " in result.stdout and "for 40 changes (" in result.stdout
    assert "measured by a trial batch of 40 changes that was rolled back" in result.stdout
    as_json = json.loads(run_cli(cli, cfg, "plan", f"{jobs}:FillKind", "--json").stdout)
    assert as_json["estimate"]["trial"] == 40 and as_json["estimate"]["changes"] == 40
    quiet = run_cli(cli, cfg, "plan", f"{jobs}:FillKind", "--no-estimate")
    assert "Estimated" not in quiet.stdout
    plan_id = db.scalar("SELECT plan_id FROM fillgate_runs WHERE plan_path IS NOT NULL")
    shown = run_cli(cli, cfg, "show", plan_id)
    assert "Estimated apply time: " in " ".join(shown.stdout.split())
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NOT NULL") == 0


def test_apply_events_carry_the_chosen_batch_sizes(db: TestDB, cli: Any) -> None:
    setup(db, 50)
    jobs = db.tmp_path / "kind_jobs.py"
    cfg = db.config()
    assert run_cli(cli, cfg, "plan", f"{jobs}:FillKind", "-o", "p.plan", "--no-estimate").exit_code == 0
    result = run_cli(cli, cfg, "apply", "p.plan", "--chunk-time", "10", "--batch-size", "30",
                     "--events", "ev.jsonl")
    assert result.exit_code == 0, result.output
    done = [e for e in map(json.loads, Path(db.tmp_path / "ev.jsonl").read_text().splitlines())
            if e["event"] == "batch_done" and e["batch_size"] is not None]
    assert [(e["batch_size"], e["rows"]) for e in done] == [(30, 30), (30, 20)]  # 100 capped at the max 30


# --- MariaDB/MySQL replica lag ---------------------------------------------------------------------


@pytest.mark.unit
def test_replica_lag_reads_the_worst_channel_and_a_stopped_replication() -> None:
    from fillgate.contrib.mysql import replica_lag

    assert replica_lag("r1", [{"Connection_name": "", "Seconds_Behind_Master": 3}]) == (3.0, "r1")
    assert replica_lag("r1", [{"Connection_name": "a", "Seconds_Behind_Master": 3},
                              {"Connection_name": "b", "Seconds_Behind_Master": 12}]) == (12.0, "r1 channel b")
    assert replica_lag("r1", [{"Channel_Name": "", "Seconds_Behind_Source": None}]) == (None, "r1")
    with pytest.raises(HealthCheckError, match="r1 is not replicating"):
        replica_lag("r1", [])


def test_replica_lag_on_mariadb_reads_the_listed_replicas(db: TestDB, cli: Any) -> None:
    if db.backend != "mysql":
        pytest.skip("MariaDB/MySQL replicas")
    setup(db, 10)
    jobs = db.tmp_path / "kind_jobs.py"
    bare = db.config()
    assert run_cli(cli, bare, "plan", f"{jobs}:FillKind", "-o", "p.plan", "--no-estimate").exit_code == 0
    refused = run_cli(cli, bare, "apply", "p.plan", "--max-replication-lag", "5")
    assert refused.exit_code == 2 and "replicas = [" in " ".join(refused.stderr.split())
    # the test server is no replica: the check says so rather than waving the run on
    listed = db.config({"staging": {"replicas": [db.url]}}, name="replicas.toml")
    refused = run_cli(cli, listed, "apply", "p.plan", "--max-replication-lag", "5")
    assert refused.exit_code == 2, refused.output
    assert "is not replicating (SHOW ALL SLAVES STATUS is empty)" in " ".join(refused.stderr.split())
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NOT NULL") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_runs WHERE kind = 'apply'") == 0


# --- the dashboard ---------------------------------------------------------------------------------


def test_the_dashboard_shows_the_estimate_and_the_chosen_sizes(sqlite_db: TestDB) -> None:
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from fillgate.web.app import Settings, create_app
    from fillgate.web.data import Dashboard

    db = sqlite_db
    conn, job = setup(db, 60)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan", estimate=True)
    applied = apply_plan(conn, planned.path, Limits(batch_size=25, chunk_time=30.0))
    cfg = db.config()
    app = create_app(Settings(cfg, None, db.tmp_path / "cache"), Dashboard(cfg, None, db.tmp_path / "cache"))
    client = TestClient(app, base_url="http://127.0.0.1")
    plan_page = client.get(f"/t/staging/runs/{planned.run.run_id}").text
    assert 'data-testid="estimate">' in plan_page and "for 60 changes" in plan_page
    assert "from a rolled-back trial batch of 60" in plan_page
    apply_page = client.get(f"/t/staging/runs/{applied.run.run_id}").text
    rows = [int(n) for n in re.findall(r'<tr(?: class="held-row")?><td class="num">\d+</td><td>[^<]*</td>'
                                       r'<td class="num">(\d+)</td>', apply_page)]
    assert sorted(rows) == [10, 25, 25]  # the sizes chosen, batch by batch


def test_holds_are_printed_where_there_is_no_progress_bar(db: TestDB, cli: Any) -> None:
    setup(db, 12)
    db.execute("CREATE TABLE control_flag (hold INTEGER)")
    db.execute("INSERT INTO control_flag (hold) VALUES (1)")
    jobs = db.tmp_path / "kind_jobs.py"
    cfg = db.config()
    assert run_cli(cli, cfg, "plan", f"{jobs}:FillKind", "-o", "p.plan", "--no-estimate").exit_code == 0
    release = threading.Timer(1.5, db.execute, ("UPDATE control_flag SET hold = 0",))
    release.start()
    try:
        result = run_cli(cli, cfg, "apply", "p.plan", "--batch-size", "5", "--hold-while",
                         "SELECT hold FROM control_flag")
    finally:
        release.join()
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines.count("held: SELECT hold FROM control_flag") == 1  # once per hold, not once per poll
    assert any(line.startswith("going on after a hold of ") for line in lines)
    assert db.scalar("SELECT count(*) FROM people WHERE kind IS NULL") == 0


@pytest.mark.unit
def test_estimated_durations_read_well() -> None:
    from fillgate.estimate import Estimate, format_duration
    from fillgate.report import estimate_line

    assert [format_duration(s) for s in (0.2, 4.25, 45, 725, 12000)] == ["under 1s", "4.2s", "45s", "12m 5s", "3h 20m"]
    line = estimate_line(Estimate(48000, 200, 1.04, 192.0, 250.0))
    assert line.startswith("Estimated apply time: about 4m 10s for 48000 changes (192 changes/s, measured by a trial "
                           "batch of 200 changes that was rolled back")
    assert estimate_line(Estimate(10, 10, 0.001, 10000.0, 0.001)).startswith("Estimated apply time: under 1s for 10")
    assert estimate_line(Estimate(5, skipped="no trial batch: x")) == "No duration estimate: no trial batch: x."


def test_a_held_run_says_why_in_its_record_while_held(db: TestDB) -> None:
    conn, job = setup(db, 10)
    planned = make_plan(conn, job, out=db.tmp_path / "p.plan")
    seen: list[tuple[str, str | None]] = []

    class HoldTwice:
        """Holds after the first batch for two polls; on the second, looks at the run's record."""

        calls = 0

        def check(self, _conn: Any) -> str | None:
            self.calls += 1
            if self.calls == 2:
                seen.extend(db.rows("SELECT status, message FROM fillgate_runs WHERE kind = 'apply'"))
            return "the test holds" if self.calls <= 2 else None

    applied = apply_plan(conn, planned.path, Limits(batch_size=5, checks=[HoldTwice()]))
    assert seen == [("running", "held: the test holds")]
    assert applied.run.status == "succeeded" and applied.run.message is None  # the next batch cleared it

    from fillgate.web.data import progress

    run = conn.ledger.get_run(applied.run.run_id)
    run.status, run.message = "running", "held: Threads_running 31 > --max-load 25"  # type: ignore[assignment]
    assert progress(run, conn.ledger.batches(run.run_id))["last_hold"] == "Threads_running 31 > --max-load 25"


@pytest.mark.unit
def test_the_dashboard_eta_starts_from_the_plans_measured_rate() -> None:
    from fillgate.ledger import Run
    from fillgate.web.data import progress

    run = Run(run_id="R", kind="apply", target="t", environment="t", operator="o", status="running",
              total=1000, checkpoint=0)
    assert progress(run, [], 50.0)["eta"] == pytest.approx(20.0)
    assert progress(run, [])["eta"] is None
