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
    st.integers(),  # past 64 bits too (orjson refuses them: the scanner reads them)
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
    # the texts an update carries (what the audit log stores) are those the plan wrote,
    # whichever decoder read the line (orjson, or the scanner for tags and big integers)
    written = [(encode_key(tuple(k)), dumps(old), dumps(new)) for k, _, old, new in changes]
    assert [(c.key_text, c.old_text, c.new_text) for c in got if c.op == "update"] == written
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
KEYS = ['plain', 'quote"d', "back\\slash", "comma,sep", "[bracket]", "é ü 東京", "tab\there", "42",
        "100%_/like"]  # LIKE's wildcards and escape character


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
        # SQLite stores dates and datetimes as ISO text (the sqlite3 module's adapters): the
        # plan and the audit log say what the column holds
        sqlite = db.backend == "sqlite"
        assert by_field[('quote"d', "day")] == (None, "2026-01-02" if sqlite else dt.date(2026, 1, 2))
        assert by_field[("é ü 東京", "raw")] == (None, bytes([6, 0, 255]))
        assert json.loads(dict(((k, c), n) for k, c, _, n in audit)[(encode_key(("tab\there",)), "at")]) == (
            "2026-01-07 12:30:15.250000" if sqlite else {"$datetime": "2026-01-07T12:30:15.250000"}
        )

        # history finds an awkward key as a user types it: from the batches the row index does
        # not cover yet (an apply leaves them so), then from the index once it caught up
        assert db.scalar("SELECT count(*) FROM fillgate_audit_keys") == 0
        for index in (False, True):
            for code in KEYS:
                entries = conn.ledger.history("typed", key_candidates(json.dumps([code])), column="day", index=index)
                day = dt.date(2026, 1, KEYS.index(code) + 1)
                assert [loads(e["new_value"]) for e in entries] == [day.isoformat() if sqlite else day]
            assert db.scalar("SELECT count(*) FROM fillgate_audit_keys") == (len(KEYS) if index else 0)
        assert db.scalar("SELECT count(*) FROM fillgate_audit_indexed") == db.scalar(
            "SELECT count(*) FROM fillgate_audit_batches")

        reverted = revert_run(conn, applied.run.run_id)
        assert reverted.run.status == "succeeded" and reverted.clean
        assert db.rows("SELECT code, day, at, raw, amount FROM typed ORDER BY n") == before
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
        return {"amount": decimal.Decimal("2.345") if row["id"] == 1 else decimal.Decimal("2.5")}
"""


def test_run_refuses_values_a_column_would_round(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    """A third decimal for NUMERIC(10, 2) was written rounded and reported 'converted'; now the
    plan refuses that row (exit 1) and the rest is written exactly. SQLite stores numbers as
    binary floats: 2.345 is not one, 2.5 is."""
    db.execute("CREATE TABLE rounded (id INTEGER NOT NULL PRIMARY KEY, amount NUMERIC(10, 2))")
    db.execute("INSERT INTO rounded (id) VALUES (1), (2)")
    (tmp_path / "rounding.py").write_text(ROUNDING_JOB)
    cfg = db.config()
    assert run_cli(cli, cfg, "init", "--target", "staging").exit_code == 0
    result = run_cli(cli, cfg, "run", f"{tmp_path / 'rounding.py'}:FillAmount", "--target", "staging")
    assert result.exit_code == 1, result.output
    assert "converted" not in result.output and "stored differently" not in result.output
    runs = json.loads(run_cli(cli, cfg, "runs", "--target", "staging", "--json").stdout)
    planned = next(r for r in runs if r["kind"] == "plan")
    applied = next(r for r in runs if r["kind"] == "apply")
    assert planned["counts"]["errors"] == 1
    assert applied["counts"] == {"applied": 1, "conflicts": 0, "errors": 0}
    (message,) = db.rows("SELECT message FROM fillgate_errors WHERE run_id = :r", {"r": planned["run_id"]})[0]
    assert "2.345" in message and "Decimal(" not in message and "column 'amount'" in message
    stored = db.rows("SELECT id, amount FROM rounded ORDER BY id")
    assert stored == [(1, None), (2, 2.5 if db.backend == "sqlite" else decimal.Decimal("2.50"))]


class InsertRounded(Job):
    """An insert job whose rows carry a value the column would round."""

    name = "tests:InsertRounded"
    table = "prices"
    writes = "insert"
    key = ("sku",)
    source_key = ("id",)
    columns = {"price": FillMissing()}
    source = "SELECT id FROM rounded"

    def compute(self, row: Any, ctx: Any) -> dict[str, Any]:
        price = decimal.Decimal("9.999") if row["id"] == 1 else decimal.Decimal("9.5")
        return {"sku": f"sku-{row['id']}", "price": price}


def test_inserted_rows_a_column_would_round_are_plan_row_errors(db: TestDB, tmp_path: Path) -> None:
    db.execute("CREATE TABLE rounded (id INTEGER NOT NULL PRIMARY KEY)")
    db.execute("INSERT INTO rounded (id) VALUES (1), (2), (3)")
    db.execute("CREATE TABLE prices (sku VARCHAR(20) NOT NULL PRIMARY KEY, price NUMERIC(10, 2))")
    target = db.target()
    init_target(target)
    conn = connect(target)
    try:
        plan = make_plan(conn, InsertRounded, out=tmp_path / "prices.plan")
        assert plan.counts["errors"] == 1 and plan.counts["inserts"] == 2
        applied = apply_plan(conn, plan.path, Limits())
        assert applied.clean and applied.counts["applied"] == 2
        price = 9.5 if db.backend == "sqlite" else decimal.Decimal("9.50")
        assert db.rows("SELECT sku, price FROM prices ORDER BY sku") == [("sku-2", price), ("sku-3", price)]
        audit = db.rows("SELECT new_value FROM fillgate_changes WHERE run_id = :r AND row_key = :k",
                        {"r": applied.run.run_id, "k": encode_key(("sku-2",))})
        assert loads(audit[0][0]) == {"sku": "sku-2", "price": price}
        # revert deletes each row only if it still holds what was inserted: it does
        reverted = revert_run(conn, applied.run.run_id)
        assert reverted.clean and reverted.counts["applied"] == 2
        assert db.rows("SELECT count(*) FROM prices") == [(0,)]
    finally:
        conn.engine.dispose()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.timedeltas(), st.floats(), st.lists(st.floats(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.one_of(st.floats(), st.timedeltas()), max_size=3)))
def test_timedeltas_and_nan_round_trip_as_strict_json(value: Any) -> None:
    """MySQL TIME and PostgreSQL interval read as timedelta; PostgreSQL keeps NaN and the
    infinities: plans and the audit log hold them as tags, never as the non-JSON NaN tokens."""
    from fillgate.backends import same_value

    text = dumps(value)

    def no_constants(name: str) -> Any:
        raise AssertionError(f"{text} holds the non-JSON constant {name}")

    json.loads(text, parse_constant=no_constants)
    assert same_value(loads(text), value)


def test_malformed_tags_are_value_errors() -> None:
    import pytest

    for text in ('{"$float":"x"}', '{"$decimal":"x"}', '{"$timedelta":"x"}', '{"$date":"x"}'):
        with pytest.raises(ValueError):
            loads(text)


key_parts = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)


@settings(max_examples=500, deadline=None)
@given(key=st.lists(key_parts, min_size=1, max_size=4).map(tuple))
def test_a_key_as_fillgate_shows_it_can_be_typed_back(key: tuple[Any, ...]) -> None:
    """A key copied from fillgate's output (plan, history, dashboard: format_key) finds its row
    when typed back (history, the dashboard's key search): the string key '42' is shown quoted,
    and 'a,b' is one part, not two. Typed back, they used to match nothing."""
    from fillgate.values import format_key

    assert encode_key(list(key)) in key_candidates(format_key(key)), format_key(key)


def test_typed_keys_still_read_as_before() -> None:
    assert key_candidates("42") == [encode_key([42]), encode_key(["42"])]
    assert encode_key(["a", "b"]) in key_candidates("a, b")
    assert key_candidates("O'Brien") == [encode_key(["O'Brien"])]
    assert key_candidates("'42'") == [encode_key(["42"])]
    assert key_candidates("'a,b', 1")[0] == encode_key(["a,b", 1])


json_anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(described=json_anything | st.fixed_dictionaries({"policy": st.text(max_size=8)}, optional={
    "unknown": json_anything, "other": json_anything}))
def test_a_policy_description_from_any_plan_header_is_shown_as_text(described: Any) -> None:
    """The dashboard shows a plan header's column policies with format_policy; a hand-edited header
    may hold anything there."""
    from fillgate.values import format_policy

    text = format_policy(described)
    assert isinstance(text, str)
    if isinstance(described, dict) and isinstance(described.get("policy"), str):
        assert text.startswith(described["policy"])


def test_a_policy_description_reads_as_the_cli_shows_values() -> None:
    import decimal

    from fillgate import FillMissing, Promote
    from fillgate.values import format_policy

    assert format_policy(Promote(unknown=[decimal.Decimal("1.5"), "n/a", "42"]).describe()) == (
        "promote (unknown: '42', 1.5, n/a)")
    assert format_policy(FillMissing().describe()) == "fill_missing"


def test_a_change_line_with_an_integer_past_64_bits_keeps_it_exact() -> None:
    """orjson reads -9223372036854775809 as a float: such a line is read by the scanner."""
    from fillgate.values import scan_change_line

    for number in (-(2**63) - 1, 2**64, 10**30):
        line = f'{{"kind":"change","key":[{number}],"column":"c","old":null,"new":{number}}}\n'
        key, column, old, new, key_text, old_text, new_text = scan_change_line(line)  # type: ignore[misc]
        assert (key, column, old, new) == ((number,), "c", None, number)
        assert (key_text, old_text, new_text) == (f"[{number}]", "null", str(number))
        assert type(key[0]) is int and type(new) is int


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.text(), st.text(max_size=6), st.text()), max_size=4))
def test_a_packed_batch_text_is_json_dumps_text(items: list[tuple[str, str, str]]) -> None:
    """The packed audit text is written by orjson (ten times faster); it must be byte for byte
    what json.dumps writes (the v2 hash chain is over that text), lone surrogates included
    (orjson refuses them: json.dumps writes them)."""
    from fillgate.ledger.store import _dump

    assert _dump(items) == json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    assert _dump([["\ud800", "x"]]) == json.dumps([["\ud800", "x"]], ensure_ascii=False, separators=(",", ":"))
