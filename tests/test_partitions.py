"""Partitions of a source for distributed runs: key ranges the database computes from the
source's keys (never the table in one process), balanced by row count, covering every row
exactly once, for integer, text and composite keys, on every backend."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fillgate.sql import KeyRange, bounded_source, keyset_pages, partition_bounds

from conftest import TestDB


def test_key_range_round_trips_through_json() -> None:
    for bounds in (KeyRange(), KeyRange(None, (5,)), KeyRange(("a", 2), ("b", 1)), KeyRange((3,), None)):
        assert KeyRange.from_json(bounds.to_json()) == bounds


def _read(db: TestDB, source: str, key: list[str], bounds: KeyRange, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    with db.engine.connect() as conn:
        body, bind = bounded_source(conn.dialect, source, key, bounds, params)
        return [tuple(r[k] for k in key) for page in keyset_pages(conn, body, key, 7, bind) for r in page]


SHAPES = {
    "integer": ("CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY, v INTEGER)", ["id"],
                lambda i: {"id": i * 3 + 1, "v": i}),
    "text": ("CREATE TABLE t (code VARCHAR(20) NOT NULL PRIMARY KEY, v INTEGER)", ["code"],
             lambda i: {"code": f"k{i * 7919 % 1000:04d}", "v": i}),
    "composite": ("CREATE TABLE t (a VARCHAR(10) NOT NULL, b INTEGER NOT NULL, v INTEGER, PRIMARY KEY (a, b))",
                  ["a", "b"], lambda i: {"a": "xyz"[i % 3], "b": i, "v": i}),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_partitions_cover_every_row_once_balanced_by_count(db: TestDB, shape: str) -> None:
    ddl, key, make = SHAPES[shape]
    db.execute(ddl)
    rows = [make(i) for i in range(203)]
    cols = list(rows[0])
    db.execute(f"INSERT INTO t ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})", rows)
    source = f"SELECT {', '.join(cols)} FROM t WHERE v >= :least"
    everything = _read(db, source, key, KeyRange(), {"least": 0})
    assert len(everything) == 203
    with db.engine.connect() as conn:
        ranges = partition_bounds(conn, source, key, 4, {"least": 0})
    assert len(ranges) == 4
    assert ranges[0].lo is None and ranges[-1].hi is None
    assert all(a.hi == b.lo for a, b in itertools.pairwise(ranges))
    parts = [_read(db, source, key, r, {"least": 0}) for r in ranges]
    assert [len(p) for p in parts] == [51, 51, 51, 50]  # balanced by rows, not key values
    assert [k for p in parts for k in p] == everything  # in order, each row exactly once


def test_fewer_rows_than_partitions_and_an_empty_source(db: TestDB) -> None:
    db.execute("CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY)")
    db.execute("INSERT INTO t (id) VALUES (1), (2)")
    with db.engine.connect() as conn:
        assert partition_bounds(conn, "SELECT id FROM t", ["id"], 8) == [KeyRange(None, (2,)), KeyRange((2,), None)]
        assert partition_bounds(conn, "SELECT id FROM t WHERE id > 5", ["id"], 8) == [KeyRange()]


def test_partition_plans_add_up_to_the_whole_plan(db: TestDB, tmp_path: Any) -> None:
    from fillgate import Target
    from fillgate.stamp import connect, init_target

    from conftest import JOBS, load_module

    db.create_people(120)
    (tmp_path / "pjobs.py").write_text(JOBS)
    jobs = load_module(tmp_path / "pjobs.py", "pjobs")
    target = Target.from_url("staging", db.url)
    init_target(target)
    conn = connect(target)
    from fillgate.planner import make_plan

    whole = make_plan(conn, jobs.FillEmail)
    with conn.engine.connect() as reader:
        ranges = partition_bounds(reader, jobs.FillEmail.select_sql(), ["id"], 3)
    parts = [make_plan(conn, jobs.FillEmail, bounds=r, parent_run_id=whole.run.run_id) for r in ranges]
    assert [p.counts["rows"] for p in parts] == [40, 40, 40]
    assert sum(p.header.changes for p in parts) == whole.header.changes == 60
    assert all(p.run.parent_run_id == whole.run.run_id and p.run.args["partition"] for p in parts)
