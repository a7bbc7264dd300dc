"""Pacing between batches, holds by health checks, and the built-in checks on real databases."""

from __future__ import annotations

import os
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fillgate.config import parse_url
from fillgate.contrib.postgres import ReplicationLagCheck
from fillgate.database import engine_for
from fillgate.errors import HealthCheckError, HoldTimeoutError, UsageError
from fillgate.throttle import HealthCheck, SQLCheck, Throttle

from conftest import TestDB

PG_URL = os.environ.get("FILLGATE_TEST_POSTGRES_URL")


class FakeTime:
    """A monotonic clock that only moves when someone sleeps (or work is simulated)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def work(self, seconds: float) -> None:
        self.now += seconds


class FlippingCheck:
    """Unhealthy for the first ``n`` polls, then healthy."""

    def __init__(self, n: int, reason: str = "replication lag 12.3s > 5s") -> None:
        self.n = n
        self.reason = reason
        self.polls = 0
        self.connections: list[Any] = []

    def check(self, conn: Connection) -> str | None:
        self.polls += 1
        self.connections.append(conn)
        return self.reason if self.polls <= self.n else None


class FakeConnection:
    def __init__(self) -> None:
        self.rollbacks = 0
        self.closed = False

    def rollback(self) -> None:
        self.rollbacks += 1

    def close(self) -> None:
        self.closed = True


def make(fake: FakeTime, **options: Any) -> Throttle:
    return Throttle(clock=fake.clock, sleep=fake.sleep, **options)


def test_rate_paces_batches_to_rows_per_second() -> None:
    fake = FakeTime()
    throttle = make(fake, rate=100)
    throttle.start()
    for _ in range(5):
        fake.work(0.2)  # a batch of 100 rows takes 0.2 s of work
        throttle.after_batch(100)
    assert fake.sleeps == pytest.approx([0.8] * 5)
    assert fake.now - 1000.0 == pytest.approx(5.0)  # 500 rows at 100 rows/s
    assert throttle.paced_s == pytest.approx(4.0)


def test_rate_does_not_sleep_after_a_slow_batch_nor_burst_after_it() -> None:
    fake = FakeTime()
    throttle = make(fake, rate=100)
    fake.work(3.0)  # slower than the rate
    assert throttle.after_batch(100) == 0.0
    assert fake.sleeps == []
    fake.work(0.1)  # the next batch is paced from the end of the slow one, not caught up
    held = throttle.after_batch(100)
    assert held == pytest.approx(0.9)


def test_pause_between_batches() -> None:
    fake = FakeTime()
    throttle = make(fake, pause_ms=250)
    assert throttle.after_batch(10) == pytest.approx(0.25)
    assert fake.sleeps == [0.25]
    assert throttle.last_paused_s == 0.25


def test_no_pacing_no_sleep() -> None:
    fake = FakeTime()
    throttle = make(fake)
    assert not throttle.active
    assert throttle.after_batch(1000) == 0.0 and fake.sleeps == []


def test_hold_then_release_with_a_check_that_flips() -> None:
    fake = FakeTime()
    check = FlippingCheck(3)
    conn = FakeConnection()
    seen: list[tuple[str, float]] = []
    throttle = make(fake, checks=[check], poll_s=2.0)
    throttle.on_hold = lambda reason: seen.append((reason, throttle.hold_s))
    held = throttle.after_batch(100, lambda: conn)  # type: ignore[arg-type, return-value]
    assert held == pytest.approx(6.0)
    assert seen == [("replication lag 12.3s > 5s", 0.0), ("replication lag 12.3s > 5s", 2.0),
                    ("replication lag 12.3s > 5s", 4.0)]
    assert check.polls == 4 and fake.sleeps == [2.0, 2.0, 2.0]
    assert conn.rollbacks == 4 and conn.closed  # no transaction kept between polls
    assert set(map(id, check.connections)) == {id(conn)}  # one connection per hold
    assert throttle.holds == 1 and throttle.last_held_s == pytest.approx(6.0)
    # healthy now: no hold, no callback
    assert throttle.after_batch(100, lambda: conn) == 0.0  # type: ignore[arg-type, return-value]
    assert len(seen) == 3 and throttle.holds == 1


def test_every_check_must_be_healthy_and_reasons_are_joined() -> None:
    fake = FakeTime()
    reasons: list[str] = []
    throttle = make(fake, checks=[FlippingCheck(1, "lag"), FlippingCheck(2, "queue")], poll_s=1.0,
                    on_hold=reasons.append)
    throttle.after_batch(1, FakeConnection)  # type: ignore[arg-type]
    assert reasons == ["lag; queue", "queue"]


def test_call_on_hold_overrides_the_default() -> None:
    fake = FakeTime()
    default: list[str] = []
    given: list[str] = []
    throttle = make(fake, checks=[FlippingCheck(1)], on_hold=default.append)
    throttle.after_batch(1, FakeConnection, on_hold=given.append)  # type: ignore[arg-type]
    assert given == ["replication lag 12.3s > 5s"] and default == []


def test_order_is_rate_then_pause_then_health() -> None:
    fake = FakeTime()
    check = FlippingCheck(1)
    throttle = make(fake, rate=10, pause_ms=500, checks=[check], poll_s=3.0)
    held = throttle.after_batch(10, FakeConnection)  # type: ignore[arg-type]
    assert fake.sleeps == pytest.approx([1.0, 0.5, 3.0])
    assert held == pytest.approx(4.5)
    assert (throttle.last_paced_s, throttle.last_paused_s, throttle.last_held_s) == pytest.approx((1.0, 0.5, 3.0))


def test_max_hold_stops_the_run() -> None:
    fake = FakeTime()
    throttle = make(fake, checks=[FlippingCheck(10_000)], poll_s=5.0, max_hold_s=12)
    with pytest.raises(HoldTimeoutError, match=r"held for 15\.0s .*replication lag 12\.3s > 5s.*maximum of 12s"):
        throttle.after_batch(1, FakeConnection)  # type: ignore[arg-type]
    assert fake.sleeps == [5.0, 5.0, 5.0]


def test_a_failing_check_stops_the_run() -> None:
    class Broken:
        def check(self, conn: Connection) -> str | None:
            raise RuntimeError("cannot read the queue")

    with pytest.raises(RuntimeError, match="cannot read the queue"):
        make(FakeTime(), checks=[Broken()]).after_batch(1, FakeConnection)  # type: ignore[arg-type]


def test_checks_need_a_connection() -> None:
    with pytest.raises(UsageError, match="need a connection"):
        make(FakeTime(), checks=[FlippingCheck(0)]).after_batch(1)


@pytest.mark.parametrize(
    "options",
    [{"rate": 0}, {"rate": -5}, {"pause_ms": -1}, {"poll_s": 0}, {"max_hold_s": -1}, {"checks": [object()]}],
)
def test_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        Throttle(**options)


def test_builtin_checks_are_health_checks() -> None:
    assert isinstance(SQLCheck("SELECT 1"), HealthCheck)
    assert isinstance(ReplicationLagCheck(5), HealthCheck)
    with pytest.raises(UsageError):
        ReplicationLagCheck(0)
    with pytest.raises(UsageError):
        SQLCheck("  ")


# --- real databases ---------------------------------------------------------------------------


def test_sql_check_holds_until_the_table_says_go(db: TestDB) -> None:
    """The flag is flipped by another connection while the run is held: the check must see it
    (no snapshot kept between polls, which matters on MariaDB's REPEATABLE READ)."""
    db.execute("CREATE TABLE maintenance (id INTEGER PRIMARY KEY, busy INTEGER NOT NULL)")
    db.execute("INSERT INTO maintenance (id, busy) VALUES (1, 1)")
    engine = engine_for(db.target())
    check = SQLCheck("SELECT busy FROM maintenance WHERE id = 1", "maintenance window")
    reasons: list[str] = []
    fake = FakeTime()

    def sleep(seconds: float) -> None:
        fake.sleep(seconds)
        if len(fake.sleeps) == 2:
            db.execute("UPDATE maintenance SET busy = 0 WHERE id = 1")

    throttle = Throttle(checks=[check], poll_s=1.0, clock=fake.clock, sleep=sleep, on_hold=reasons.append)
    held = throttle.after_batch(50, engine)
    assert reasons == ["maintenance window", "maintenance window"]
    assert held == pytest.approx(2.0)
    with engine.connect() as conn:
        assert check.check(conn) is None


def test_sql_check_reason_shows_the_value_and_no_rows_is_healthy(db: TestDB) -> None:
    db.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO queue (id) VALUES (1), (2), (3)")
    with db.engine.connect() as conn:
        assert SQLCheck("SELECT COUNT(*) FROM queue", "queue backlog").check(conn) == "queue backlog: 3"
        assert SQLCheck("SELECT COUNT(*) FROM queue WHERE id > :n", params={"n": 5}).check(conn) is None
        assert SQLCheck("SELECT id FROM queue WHERE id > 10").check(conn) is None
        assert SQLCheck("SELECT id  FROM queue\n WHERE id = 2").check(conn) == "SELECT id FROM queue WHERE id = 2: 2"


def test_replication_lag_check_refuses_other_backends(sqlite_db: TestDB) -> None:
    with sqlite_db.engine.connect() as conn, pytest.raises(HealthCheckError, match=r"only PostgreSQL.*sqlite"):
        ReplicationLagCheck(5).check(conn)


@pytest.mark.skipif(not PG_URL, reason="FILLGATE_TEST_POSTGRES_URL is not set")
def test_replication_lag_check_on_postgresql_without_replicas_is_healthy() -> None:
    engine = sa.create_engine(parse_url(PG_URL or "", "FILLGATE_TEST_POSTGRES_URL"))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM pg_stat_replication")).scalar() == 0
            assert ReplicationLagCheck(5).check(conn) is None
        throttle = Throttle(checks=[ReplicationLagCheck(5)])
        assert throttle.after_batch(10, engine) < 1.0 and throttle.holds == 0
    finally:
        engine.dispose()


def test_replication_lag_reasons_from_rows() -> None:
    """The lag arithmetic, on rows as pg_stat_replication gives them (a fake connection:
    a real replica is not available in tests)."""

    class Result:
        def __init__(self, rows: list[dict[str, Any]]) -> None:
            self.rows = rows

        def mappings(self) -> list[dict[str, Any]]:
            return self.rows

    class Conn:
        class dialect:
            name = "postgresql"

        def __init__(self, rows: list[dict[str, Any]]) -> None:
            self.rows = rows

        def execute(self, _sql: Any) -> Result:
            return Result(self.rows)

    def row(name: str, lag: float | None, state: str | None = "streaming") -> dict[str, Any]:
        return {"application_name": name, "client_addr": "10.0.0.2", "state": state, "lag_s": lag}

    check = ReplicationLagCheck(5)
    assert check.check(Conn([row("a", None), row("b", 4.9)])) is None  # type: ignore[arg-type]
    assert check.check(Conn([row("a", 1.0), row("b", 12.34)])) == (  # type: ignore[arg-type]
        "replication lag 12.3s > 5s (b at 10.0.0.2)"
    )
    with pytest.raises(HealthCheckError, match="pg_monitor"):
        check.check(Conn([row("a", None, state=None)]))  # type: ignore[arg-type]
