"""Values that JSON lacks (dates, times, decimals, bytes, UUIDs) and awkward keys, through the
plan file, the audit log, history and revert: every value comes back as the same Python
value, and the audit log keys rows by their canonical ``encode_key`` text."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import mysql
from typer.testing import CliRunner

from fillgate import FillMissing, Job, Limits, apply_plan, connect, init_target, make_plan, revert_run
from fillgate.plan import PlanHeader, PlanWriter, iter_changes
from fillgate.values import dumps, encode_key, key_candidates, loads

from conftest import TestDB, run_cli

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
TAGGED = st.one_of(
    st.datetimes(),
    st.dates(),
    st.times(),
    st.decimals(allow_nan=False, allow_infinity=False, places=4),
    st.binary(max_size=12),
    st.uuids(),
)
VALUES = st.one_of(
    SCALARS, TAGGED, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)
)
KEY_PARTS = st.one_of(st.integers(), st.text(max_size=10), st.dates(), st.uuids())


def _header() -> PlanHeader:
    return PlanHeader(
        plan_id="01J0000000000000000000PLAN", job="t:Job", job_fingerprint="x", table="t", key=["id"],
        columns={}, target="t", environment="t", database_id="d", dialect="sqlite",
        created_at="2026-11-22T00:00:00", operator="me",
    )


@settings(max_examples=300, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.lists(KEY_PARTS, min_size=1, max_size=3), st.text(min_size=1, max_size=8), VALUES, VALUES),
        max_size=8,
    ),
    others=st.lists(st.sampled_from(["disagreement", "preserved", "error", "insert"]), max_size=4),
)
def test_plan_lines_read_back_as_the_same_values(
    tmp_path_factory: Any, changes: list[Any], others: list[str]
) -> None:
    folder = tmp_path_factory.mktemp("plans")
    writer = PlanWriter(folder)
    expected = []
    for i, (key, column, old, new) in enumerate(changes):
        writer.change(tuple(key), column, old, new)
        expected.append(("update", tuple(key), column, old, new))
        if i < len(others):  # other kinds of line in between: skipped or read the general way
            kind = others[i]
            if kind == "insert":
                writer.insert((i,), {"id": i, "at": dt.date(2026, 1, 1)})
                expected.append(("insert", (i,), "*", None, {"id": i, "at": dt.date(2026, 1, 1)}))
            elif kind == "disagreement":
                writer.disagreement(tuple(key), column, old, new)
            elif kind == "preserved":
                writer.preserved(tuple(key), column, old, "timeout")
            else:
                writer.error(tuple(key), "ValueError", 'bad "value"', "fp")
    path = writer.finish(_header(), folder / "p.plan")
    got = list(iter_changes(path))
    assert [(c.op, c.key, c.column, c.old, c.new) for c in got] == expected
    for change in got:
        # what the audit log stores decodes back to the very same values
        assert loads(encode_key(change.key)) == list(change.key)
        assert loads(dumps(change.old)) == change.old and loads(dumps(change.new)) == change.new
    # resuming after a checkpoint skips exactly that many changes, whatever lies between them
    assert [(c.op, c.key) for c in iter_changes(path, skip=1)] == [(op, k) for op, k, *_ in expected[1:]]


class FillTyped(Job):
    """Fills a date, a timestamp, bytes and (where the driver takes it) a decimal."""

    name = "tests:FillTyped"
    table = "typed"
    key = ("code",)
    columns = {"day": FillMissing(), "at": FillMissing(), "raw": FillMissing(), "amount": FillMissing()}
    source = "SELECT code, n, day, at, raw, amount FROM typed"

    def compute(self, row: Any, ctx: Any) -> dict[str, Any]:
        n = row["n"]
        out = {
            "day": dt.date(2026, 1, n),
            "at": dt.datetime(2026, 1, n, 12, 30, 15, 250000),
            "raw": bytes([n, 0, 255]),
        }
        if ctx.engine.dialect.name != "sqlite":  # sqlite3 cannot bind Decimal; such a job would use str
            out["amount"] = decimal.Decimal(f"{n}.25")
        return out


# string keys that stress JSON and SQL text: quotes, backslashes, commas, brackets, non-ASCII
KEYS = ['plain', 'quote"d', "back\\slash", "comma,sep", "[bracket]", "é ü 東京", "tab\there", "42"]


def test_typed_values_and_awkward_keys_round_trip(db: TestDB, tmp_path: Path) -> None:
    meta = sa.MetaData()
    typed = sa.Table(
        "typed", meta,
        sa.Column("code", sa.String(40), primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("day", sa.Date),
        # MariaDB's plain DATETIME drops the microseconds; DATETIME(6) keeps them
        sa.Column("at", sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")),
        sa.Column("raw", sa.LargeBinary(16)),
        sa.Column("amount", sa.Numeric(10, 2)),
    )
    meta.create_all(db.engine)
    with db.engine.begin() as conn:
        conn.execute(typed.insert(), [{"code": code, "n": i + 1} for i, code in enumerate(KEYS)])
    target = db.target()
    init_target(target)
    conn = connect(target)
    try:
        before = db.rows("SELECT code, day, at, raw, amount FROM typed ORDER BY n")
        plan = make_plan(conn, FillTyped, out=tmp_path / "typed.plan")
        per_row = 3 if db.backend == "sqlite" else 4
        assert plan.counts["writes"] == per_row * len(KEYS)
        applied = apply_plan(conn, plan.path, Limits())
        assert applied.run.status == "succeeded" and applied.clean
        assert applied.counts["applied"] == per_row * len(KEYS)

        with db.engine.connect() as c:
            rows = {r.code: r for r in c.execute(sa.select(typed))}
        for i, code in enumerate(KEYS):
            n = i + 1
            assert rows[code].day == dt.date(2026, 1, n)
            assert rows[code].at == dt.datetime(2026, 1, n, 12, 30, 15, 250000)
            assert bytes(rows[code].raw) == bytes([n, 0, 255])
            if db.backend != "sqlite":
                assert rows[code].amount == decimal.Decimal(f"{n}.25")

        # the audit log holds the tagged JSON text, one row per field, keyed canonically
        audit = db.rows(
            "SELECT row_key, column_name, old_value, new_value FROM fillgate_changes WHERE run_id = :r",
            {"r": applied.run.run_id},
        )
        assert len(audit) == per_row * len(KEYS)
        assert {key for key, *_ in audit} == {encode_key((code,)) for code in KEYS}
        by_field = {(loads(key)[0], column): (loads(old), loads(new)) for key, column, old, new in audit}
        assert by_field[('quote"d', "day")] == (None, dt.date(2026, 1, 2))
        assert by_field[("é ü 東京", "raw")] == (None, bytes([6, 0, 255]))
        assert json.loads(dict(((k, c), n) for k, c, _, n in audit)[(encode_key(("tab\there",)), "at")]) == {
            "$datetime": "2026-01-07T12:30:15.250000"
        }

        # history finds an awkward key as a user types it
        for code in KEYS:
            entries = conn.ledger.history("typed", key_candidates(json.dumps([code])), column="day")
            assert [loads(e["new_value"]) for e in entries] == [dt.date(2026, 1, KEYS.index(code) + 1)]

        reverted = revert_run(conn, applied.run.run_id)
        assert reverted.run.status == "succeeded" and reverted.clean
        assert db.rows("SELECT code, day, at, raw, amount FROM typed ORDER BY n") == before
    finally:
        conn.engine.dispose()


class FillRounded(Job):
    """Proposes values the columns cannot hold exactly: a timestamp with fractions for a
    column without them, a third decimal for NUMERIC(10,2), text for an integer column."""

    name = "tests:FillRounded"
    table = "rounded"
    key = ("id",)
    columns = {"at": FillMissing(), "amount": FillMissing(), "count": FillMissing()}
    source = "SELECT id, at, amount, count FROM rounded"

    def compute(self, row: Any, ctx: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"at": dt.datetime(2026, 1, 1, 12, 0, 0, 250000), "count": str(row["id"] * 10)}
        if ctx.engine.dialect.name != "sqlite":
            out["amount"] = decimal.Decimal("1.255")
        return out


def _rounded_table(db: TestDB, at_type: str) -> Any:
    """``rounded(id, at, amount NUMERIC(10,2), count INTEGER)`` with three empty rows; the
    target initialised; a connection to it."""
    db.execute(f"CREATE TABLE rounded (id INTEGER NOT NULL PRIMARY KEY, at {at_type}, "
               "amount NUMERIC(10, 2), count INTEGER)")
    db.execute("INSERT INTO rounded (id) VALUES (1), (2), (3)")
    target = db.target()
    init_target(target)
    return connect(target)


def test_values_a_column_rounds_are_audited_as_stored(db: TestDB, tmp_path: Path) -> None:
    """The audit log tells what the row holds, not what was proposed: a value the database
    rounded or converted is counted, shown, audited as stored, and revert restores the row."""
    conn = _rounded_table(db, "TIMESTAMP(0)" if db.backend == "postgresql" else "DATETIME")
    try:
        plan = make_plan(conn, FillRounded, out=tmp_path / "rounded.plan")
        applied = apply_plan(conn, plan.path, Limits())
        assert applied.run.status == "succeeded" and applied.clean
        audit = {
            (loads(key)[0], column): loads(new)
            for key, column, new in db.rows(
                "SELECT row_key, column_name, new_value FROM fillgate_changes WHERE run_id = :r",
                {"r": applied.run.run_id},
            )
        }
        if db.backend == "sqlite":
            # SQLite keeps what it is given (the text '10' becomes the integer 10 by the
            # column's affinity, which compare-and-set treats as equal): nothing to report
            assert applied.counts["converted"] == 0 and applied.counts["applied"] == 6
            assert audit[(1, "count")] == "10"
        else:
            assert applied.counts == {"applied": 9, "conflicts": 0, "errors": 0, "converted": 9}
            assert audit[(2, "at")] == dt.datetime(2026, 1, 1, 12, 0, 0)
            assert audit[(2, "amount")] == decimal.Decimal("1.26")
            assert audit[(2, "count")] == 20
            assert {(i["key"][0], i["column"]) for i in applied.converted} == set(audit)
            sample = next(i for i in applied.converted if i["key"] == [1] and i["column"] == "amount")
            assert (sample["planned"], sample["stored"]) == (decimal.Decimal("1.255"), decimal.Decimal("1.26"))
            assert db.rows("SELECT at, amount, count FROM rounded WHERE id = 3") == [
                (dt.datetime(2026, 1, 1, 12, 0, 0), decimal.Decimal("1.26"), 30)
            ]
        # every field of the run goes back, none reported as changed since
        reverted = revert_run(conn, applied.run.run_id)
        assert reverted.clean and reverted.counts["applied"] == applied.counts["applied"]
        assert db.rows("SELECT id, at, amount, count FROM rounded ORDER BY id") == [
            (1, None, None, None), (2, None, None, None), (3, None, None, None)
        ]
    finally:
        conn.engine.dispose()


def test_rounded_values_are_audited_as_stored_on_the_row_by_row_path(db: TestDB, tmp_path: Path) -> None:
    """A conflict in a batch sends its group down the row-by-row path; the rows that did
    apply are still read back and audited as stored."""
    conn = _rounded_table(db, "TIMESTAMP NULL")
    try:
        plan = make_plan(conn, FillRounded, out=tmp_path / "rounded.plan")
        db.execute("UPDATE rounded SET count = 99 WHERE id = 3")  # drift since the plan
        applied = apply_plan(conn, plan.path, Limits())
        stored = db.rows("SELECT count FROM rounded ORDER BY id")
        assert stored == [(10,), (20,), (99,)]
        counts = db.rows(
            "SELECT row_key, new_value FROM fillgate_changes WHERE run_id = :r AND column_name = 'count' "
            "ORDER BY row_key", {"r": applied.run.run_id},
        )
        assert applied.counts["conflicts"] == 1
        if db.backend == "sqlite":
            assert counts == [("[1]", '"10"'), ("[2]", '"20"')]
        else:
            assert counts == [("[1]", "10"), ("[2]", "20")]
            # every count and amount; the timestamps too where TIMESTAMP has no fractions (MariaDB)
            assert applied.counts["applied"] == 8
            assert applied.counts["converted"] == (5 if db.backend == "postgresql" else 8)
        reverted = revert_run(conn, applied.run.run_id)
        assert reverted.clean
        assert db.rows("SELECT id, count FROM rounded ORDER BY id") == [(1, None), (2, None), (3, 99)]
    finally:
        conn.engine.dispose()


ROUNDING_JOB = """
import decimal
from fillgate import FillMissing, Job

class FillAmount(Job):
    table = "rounded"
    key = ("id",)
    columns = {"amount": FillMissing()}
    source = "SELECT id, amount FROM rounded"

    def compute(self, row, ctx):
        return {"amount": decimal.Decimal("2.345") if ctx.engine.dialect.name != "sqlite" else 2.5}
"""


def test_run_reports_values_stored_differently(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    db.execute("CREATE TABLE rounded (id INTEGER NOT NULL PRIMARY KEY, amount NUMERIC(10, 2))")
    db.execute("INSERT INTO rounded (id) VALUES (1), (2)")
    (tmp_path / "rounding.py").write_text(ROUNDING_JOB)
    cfg = db.config()
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    result = run_cli(cli, cfg, "run", f"{tmp_path / 'rounding.py'}:FillAmount", "--target", "staging")
    assert result.exit_code == 0, result.output
    if db.backend == "sqlite":
        assert "stored differently" not in result.output
    else:
        assert "2 field(s) were stored differently from the plan" in result.output
        assert "2.345" in result.output and "2.35" in result.output
        runs = json.loads(run_cli(cli, cfg, "runs", "--target", "staging", "--json").stdout)
        applied = next(r for r in runs if r["kind"] == "apply")
        assert applied["counts"]["converted"] == 2


class InsertRounded(Job):
    """An insert job whose rows carry a value the column rounds."""

    name = "tests:InsertRounded"
    table = "prices"
    writes = "insert"
    key = ("sku",)
    source_key = ("id",)
    columns = {"price": FillMissing()}
    source = "SELECT id FROM rounded"

    def compute(self, row: Any, ctx: Any) -> dict[str, Any]:
        price = decimal.Decimal("9.999") if ctx.engine.dialect.name != "sqlite" else 9.5
        return {"sku": f"sku-{row['id']}", "price": price}


def test_inserted_rows_are_audited_as_stored(db: TestDB, tmp_path: Path) -> None:
    conn = _rounded_table(db, "TIMESTAMP NULL")
    db.execute("CREATE TABLE prices (sku VARCHAR(20) NOT NULL PRIMARY KEY, price NUMERIC(10, 2))")
    try:
        plan = make_plan(conn, InsertRounded, out=tmp_path / "prices.plan")
        applied = apply_plan(conn, plan.path, Limits())
        assert applied.clean and applied.counts["applied"] == 3
        audit = db.rows("SELECT row_key, new_value FROM fillgate_changes WHERE run_id = :r AND row_key = :k",
                        {"r": applied.run.run_id, "k": encode_key(("sku-1",))})
        if db.backend == "sqlite":
            assert applied.counts["converted"] == 0
            assert loads(audit[0][1]) == {"sku": "sku-1", "price": 9.5}
        else:
            assert applied.counts["converted"] == 3
            assert loads(audit[0][1]) == {"sku": "sku-1", "price": decimal.Decimal("10.00")}
            assert applied.converted[0]["planned"] == {"sku": "sku-1", "price": decimal.Decimal("9.999")}
        # revert deletes each row only if it still holds what was inserted: it does
        reverted = revert_run(conn, applied.run.run_id)
        assert reverted.clean and reverted.counts["applied"] == 3
        assert db.rows("SELECT count(*) FROM prices") == [(0,)]
    finally:
        conn.engine.dispose()
