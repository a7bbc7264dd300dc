"""Benchmark: what one keyset page costs, from the first page to the last, with a composite key.

fillgate reads a job's source page by page: ``SELECT * FROM (<source>) fillgate_src WHERE
<after the last key> ORDER BY <key> LIMIT n``. Whether that costs the same for every page, or
grows with the position in the table (quadratic paging), depends on whether the backend turns
"after the last key" into an index range. This bench builds, on every backend available,

* ``flights``: a table like nycflights13's, with a 7-column primary key of ints, a date and
  text, ``(year, sched_date, hour, carrier, flight, origin, dest)`` (``year`` is the same for
  every row, as in nycflights13), 336,776 rows by default, and
* ``flights_id``: the same rows with an integer primary key ``id``, the reference,

and measures, with the predicate fillgate used before (the OR-expansion
``(k1 > :a) OR (k1 = :a AND k2 > :b) OR ...``) and the one it uses now
(``fillgate.sql.keyset_style``: a row-value comparison on PostgreSQL and SQLite, the nested
form on MySQL/MariaDB), the milliseconds of one page read at the first page, 25%, 50%, 75% and
the last page (median of ``--repeat``), and the seconds to page through the whole table
(the old paging loop, copied below from the code before the change, against
``fillgate.sql.keyset_pages``). It prints the backend's EXPLAIN of the middle page for both.

    .venv/bin/python bench/bench_keyset.py                  # SQLite, plus PostgreSQL / MariaDB
                                                             # when FILLGATE_TEST_*_URL are set
    .venv/bin/python bench/bench_keyset.py --rows 50000 --postgres postgresql://postgres@127.0.0.1:5432/test

See bench/README.md for what is measured and how to read the output. Nothing here asserts on
time; a page or a walk that returns the wrong rows stops the bench (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import operator
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from bench_backfill import _cpu_model, _fillgate_version, load

import fillgate.sql
from fillgate.config import parse_url
from fillgate.sql import _keyset_statements, keyset_pages, keyset_style

KEY = ("year", "sched_date", "hour", "carrier", "flight", "origin", "dest")
INT_KEY = ("id",)
VALUES = ("minute", "tailnum", "distance", "note")
FLIGHTS_COLUMNS = (
    "year INTEGER NOT NULL, sched_date DATE NOT NULL, hour INTEGER NOT NULL, carrier VARCHAR(2) NOT NULL, "
    "flight INTEGER NOT NULL, origin VARCHAR(3) NOT NULL, dest VARCHAR(3) NOT NULL, minute INTEGER NOT NULL, "
    "tailnum VARCHAR(8), distance INTEGER, note VARCHAR(40)"
)
DDL = {
    "flights": f"CREATE TABLE flights ({FLIGHTS_COLUMNS}, PRIMARY KEY ({', '.join(KEY)}))",
    "flights_id": f"CREATE TABLE flights_id (id INTEGER NOT NULL PRIMARY KEY, {FLIGHTS_COLUMNS})",
}
SOURCES = {  # what a job's source looks like: the columns it needs, from one table
    "plain": "SELECT {cols} FROM {table}",
    "where": "SELECT {cols} FROM {table} WHERE distance >= 500",
}
POSITIONS = (("first", 0.0), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75), ("last", 1.0))
CARRIERS = ("9E", "AA", "AS", "B6", "DL", "EV", "F9", "FL", "HA", "MQ", "OO", "UA", "US", "VX", "WN", "YV")
ORIGINS = ("EWR", "JFK", "LGA")
DESTS = ("ATL", "BOS", "BUF", "CLT", "DCA", "DEN", "DFW", "DTW", "FLL", "IAD", "IAH", "LAS",
         "LAX", "MCO", "MIA", "MSP", "ORD", "PHL", "RDU", "SEA", "SFO", "SLC", "STL", "TPA")


class BenchFailure(Exception):
    """A page or a walk returned the wrong rows; no number from it may be reported."""


def check(condition: bool, message: str) -> None:
    """An assertion that ``python -O`` cannot switch off."""
    if not condition:
        raise BenchFailure(message)


# --- the data ------------------------------------------------------------------------------


def flight_rows(n: int) -> Iterator[tuple[Any, ...]]:
    """``n`` flights over 2013, in the order of the day's schedule (not the key's order:
    carriers interleave), deterministic. ``(sched_date, carrier, flight)`` is unique."""
    rnd = random.Random(13)
    per_day = -(-n // 365)
    start = datetime.date(2013, 1, 1)
    made = 0
    for d in range(365):
        day = start + datetime.timedelta(days=d)
        for i in range(per_day):
            if made == n:
                return
            carrier = CARRIERS[i % len(CARRIERS)]
            slot = i // len(CARRIERS)
            flight = slot * 7 % 5000 + 1 + slot // 715 * 5000
            hour = 5 + i * 19 // per_day
            yield (2013, day, hour, carrier, flight, rnd.choice(ORIGINS), rnd.choice(DESTS),
                   rnd.randrange(60), f"N{rnd.randrange(100, 999)}{carrier}", rnd.randrange(80, 2600), None)
            made += 1


def table_rows(table: str, n: int) -> Iterator[tuple[Any, ...]]:
    if table == "flights":
        yield from flight_rows(n)
    else:
        for i, row in enumerate(flight_rows(n), start=1):
            yield (i, *row)


def table_columns(table: str) -> tuple[str, ...]:
    return (*(("id",) if table == "flights_id" else ()), *KEY, *VALUES)


# --- backends --------------------------------------------------------------------------------


class SQLiteBackend:
    name = "sqlite"

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "keyset.db"
        self.url = f"sqlite:///{self.path}"

    def create(self) -> None:
        self.path.unlink(missing_ok=True)

    def load(self, table: str, n: int) -> None:
        con = sqlite3.connect(self.path)
        con.execute(DDL[table])
        cols = table_columns(table)
        con.executemany(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            (tuple(v.isoformat() if isinstance(v, datetime.date) else v for v in row) for row in table_rows(table, n)),
        )
        con.commit()
        con.execute("ANALYZE")
        con.close()

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)

    def describe(self) -> str:
        return f"SQLite {sqlite3.sqlite_version} (Python's sqlite3)"


class ServerBackend:
    """PostgreSQL or MariaDB/MySQL: the bench creates its own database next to the one in the
    URL (which it never touches) and drops it at the end."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.server = sa.make_url(parse_url(url, f"--{name}"))
        self.database = f"fillgate_bench_keyset_{os.getpid()}"
        self.url = self.server.set(database=self.database).render_as_string(hide_password=False)

    def admin(self) -> sa.Engine:
        if self.name == "postgresql":
            return sa.create_engine(self.server, isolation_level="AUTOCOMMIT")
        return sa.create_engine(self.server)

    def create(self) -> None:
        engine = self.admin()
        with engine.connect() as conn:
            if self.name == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                conn.exec_driver_sql(f'CREATE DATABASE "{self.database}"')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{self.database}`")
                conn.exec_driver_sql(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4")
        engine.dispose()

    def load(self, table: str, n: int) -> None:
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        cols = table_columns(table)
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(DDL[table])
            if self.name == "postgresql":
                with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                    for row in table_rows(table, n):
                        copy.write_row(row)
                cur.execute(f"VACUUM (ANALYZE) {table}")
            else:
                insert = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
                batch: list[tuple[Any, ...]] = []
                for row in table_rows(table, n):
                    batch.append(row)
                    if len(batch) == 5000:
                        cur.executemany(insert, batch)
                        batch.clear()
                if batch:
                    cur.executemany(insert, batch)
                cur.execute(f"ANALYZE TABLE {table}")
                cur.fetchall()
            raw.commit()
        finally:
            raw.close()
            engine.dispose()

    def drop(self) -> None:
        engine = self.admin()
        with engine.connect() as conn:
            if self.name == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{self.database}`")
        engine.dispose()

    def describe(self) -> str:
        engine = self.admin()
        with engine.connect() as conn:
            version = conn.exec_driver_sql("SELECT version()").scalar()
            if self.name == "postgresql":
                settings = ", ".join(
                    f"{s}={conn.exec_driver_sql(f'SHOW {s}').scalar()}"
                    for s in ("shared_buffers", "work_mem", "random_page_cost", "lc_collate")
                )
            else:
                settings = ", ".join(
                    f"{name}={value}" for name, value in conn.exec_driver_sql(
                        "SHOW VARIABLES WHERE Variable_name IN ('innodb_buffer_pool_size', 'collation_database')"
                    )
                )
        engine.dispose()
        return f"{version} ({settings}); {self.server.render_as_string(hide_password=True)}"


# --- the old paging, as fillgate had it before (commit c42a45c), for the comparison -----------


def old_after_clause(quote: Callable[[str], str], key: Sequence[str]) -> str:
    """``(k1 > :a) OR (k1 = :a AND k2 > :b) OR ...``: the predicate fillgate used before."""
    parts = []
    for i, column in enumerate(key):
        equal = [f"{quote(key[j])} = :fillgate_k{j}" for j in range(i)]
        parts.append("(" + " AND ".join([*equal, f"{quote(column)} > :fillgate_k{i}"]) + ")")
    return " OR ".join(parts)


def old_later_statement(dialect: Any, source: str, key: Sequence[str], page_size: int) -> sa.TextClause:
    quote = dialect.identifier_preparer.quote
    order = ", ".join(quote(k) for k in key)
    return sa.text(f"SELECT * FROM ({source}) fillgate_src WHERE {old_after_clause(quote, key)} "
                   f"ORDER BY {order} LIMIT {int(page_size) + 1}")


def old_keyset_pages(conn: sa.Connection, source: str, key: Sequence[str],
                     page_size: int) -> Iterator[list[dict[str, Any]]]:
    """The paging loop before the change (its checks for parameters and key columns left out:
    they cost nothing per page)."""
    quote = conn.dialect.identifier_preparer.quote
    order = ", ".join(quote(k) for k in key)
    first = sa.text(f"SELECT * FROM ({source}) fillgate_src ORDER BY {order} LIMIT {int(page_size) + 1}")
    later = old_later_statement(conn.dialect, source, key, page_size)
    stmt: sa.TextClause = first
    bind: dict[str, Any] = {}
    last_key: tuple[Any, ...] | None = None
    while True:
        result = conn.execute(stmt, bind)
        names = list(result.keys())
        rows = [dict(zip(names, r, strict=True)) for r in result.fetchall()]
        if not rows:
            return
        if len(key) == 1:
            (column,) = key
            page_keys = [(row[column],) for row in rows]
        else:
            page_keys = [tuple(row[k] for k in key) for row in rows]
        previous = [last_key, *page_keys[:-1]]
        if any(map(operator.eq, previous, page_keys)):
            raise BenchFailure("old paging: a key came twice")
        yield rows[:page_size]
        if len(rows) <= page_size:
            return
        last_key = page_keys[page_size - 1]
        stmt = later
        bind = {f"fillgate_k{i}": v for i, v in enumerate(last_key)}


# --- measuring -------------------------------------------------------------------------------


def key_of(row: Sequence[Any] | Mapping[str, Any], key: Sequence[str], names: Sequence[str]) -> tuple[Any, ...]:
    if isinstance(row, Mapping):
        return tuple(row[k] for k in key)
    return tuple(row[names.index(k)] for k in key)


def boundaries(conn: sa.Connection, source: str, key: Sequence[str], total: int,
               page_size: int) -> list[tuple[str, tuple[Any, ...], tuple[Any, ...]]]:
    """For each position: the last key of the page before it, and the first key of the page
    (looked up with OFFSET, once, outside the timing)."""
    order = ", ".join(key)
    out = []
    for label, fraction in POSITIONS:
        offset = min(int(fraction * total), total - page_size - 1)
        pair = conn.execute(sa.text(f"SELECT {order} FROM ({source}) s ORDER BY {order} "
                                    f"LIMIT 2 OFFSET {offset}")).all()
        out.append((label, tuple(pair[0]), tuple(pair[1])))
    conn.rollback()
    return out


def time_page(conn: sa.Connection, stmt: sa.TextClause, bind: dict[str, Any]) -> tuple[float, list[Any], list[str]]:
    t0 = time.perf_counter()
    result = conn.execute(stmt, bind)
    rows = result.fetchall()
    seconds = time.perf_counter() - t0
    names = list(result.keys())
    conn.rollback()  # as the planner does between pages
    return seconds, rows, names


def explain(conn: sa.Connection, backend: str, stmt: sa.TextClause, bind: dict[str, Any]) -> str:
    """One line: how the backend ran the page (index range or filter, rows it read)."""
    if backend == "sqlite":
        steps = [row[3] for row in conn.execute(sa.text("EXPLAIN QUERY PLAN " + stmt.text), bind)]
        conn.rollback()
        return "; ".join(steps)
    if backend == "postgresql":
        plan = conn.execute(sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + stmt.text), bind).scalar()
        conn.rollback()
        nodes = []
        stack = [plan[0]["Plan"]]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(reversed(node.get("Plans", [])))
        shape = [n["Node Type"] for n in nodes]
        shape = [f"{t} x{shape.count(t)}" if shape.count(t) > 1 else t for t in dict.fromkeys(shape)]
        scan = next(n for n in nodes if "Relation Name" in n)
        cond = scan.get("Index Cond")
        removed = scan.get("Rows Removed by Filter", 0)
        return (f"{' > '.join(shape)}: "
                f"{'Index Cond ' + (cond[:50] + '...' if len(cond) > 50 else cond) if cond else 'no Index Cond'}, "
                f"{scan['Actual Rows']} rows from {scan['Relation Name']}, {removed} removed by a filter")
    raw = conn.execute(sa.text("ANALYZE FORMAT=JSON " + stmt.text), bind).scalar()
    conn.rollback()
    tables = []
    stack2: list[Any] = [json.loads(raw)]
    while stack2:
        item = stack2.pop()
        if isinstance(item, dict):
            if "access_type" in item:
                tables.append(item)
            stack2.extend(item.values())
        elif isinstance(item, list):
            stack2.extend(item)
    return "; ".join(
        f"{t['table_name']}: access {t['access_type']} on {t.get('key')} ({len(t.get('used_key_parts') or [])} key "
        f"parts), {t.get('r_rows')} rows read, {t.get('r_filtered')}% kept" for t in tables
    )


def measure_table(engine: sa.Engine, backend: str, table: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    key = KEY if table == "flights" else INT_KEY
    source = SOURCES[args.source].format(cols=", ".join(table_columns(table)[:-1]), table=table)
    page_size = args.page_size
    log = args.log
    results = []
    with engine.connect() as conn:
        total = conn.execute(sa.text(f"SELECT count(*) FROM ({source}) s")).scalar_one()
        conn.rollback()
        check(total > 2 * page_size + 2, f"{table}: {total} rows is too few for pages of {page_size}")
        spots = boundaries(conn, source, key, total, page_size)
        forms = {
            "old": old_later_statement(conn.dialect, source, key, page_size),
            "new": _keyset_statements(conn.dialect, source, key, page_size)[1],
        }
        spelling = {"row": "row values", "nested": "nested OR"}
        style = keyset_style(conn.dialect)
        labels = {"old": "old: OR-expansion", "new": f"new: {spelling[style]}"}
        if len(key) > 1:
            # the spelling not chosen for this backend, built the same way: why it was not chosen
            other = "nested" if style == "row" else "row"
            with unittest.mock.patch.object(fillgate.sql, "keyset_style", lambda dialect: other):
                forms["other"] = _keyset_statements(conn.dialect, source, key, page_size)[1]
            labels["other"] = f"not used: {spelling[other]}"
        else:
            labels = {"old": "old: id > :k", "new": "new: id >= :k"}
        per_page: dict[str, dict[str, float]] = {form: {} for form in forms}
        plans: dict[str, dict[str, str]] = {form: {} for form in forms}
        for label, before, after in spots:
            bind = {f"fillgate_k{i}": v for i, v in enumerate(before)}
            samples: dict[str, list[float]] = {form: [] for form in forms}
            for rep in range(args.repeat + 1):  # the first round warms the cache and is not counted
                for form in list(forms) if rep % 2 == 0 else list(forms)[::-1]:
                    seconds, rows, names = time_page(conn, forms[form], bind)
                    # the page must be the right rows: the new one starts AT the last key read
                    # (flagged), the old one after it
                    first = 0 if form == "old" else 1
                    check(len(rows) >= first + min(page_size, total - 1) and key_of(rows[first], key, names) == after,
                          f"{backend} {table} {form} page at {label}: wrong rows")
                    if form != "old":
                        check(key_of(rows[0], key, names) == before and rows[0][-1] == 1
                              and not any(row[-1] for row in rows[1:]),
                              f"{backend} {table} new page at {label}: does not start at the last key read")
                    if rep:
                        samples[form].append(seconds)
            for form in samples:
                per_page[form][label] = statistics.median(samples[form]) * 1000
            if label in ("50%", "last"):
                for form in forms:
                    plans[form][label] = explain(conn, backend, forms[form], bind)
            log(f"  [{backend} {table}] page at {label}: "
                + ", ".join(f"{form} {per_page[form][label]:.2f} ms" for form in forms))
        walks: dict[str, float | None] = dict.fromkeys(forms)
        for form in ("new", "old"):
            if form == "old" and args.skip_old_walk and len(key) > 1:
                continue
            pager = keyset_pages if form == "new" else old_keyset_pages
            t0 = time.perf_counter()
            seen = pages = 0
            last: tuple[Any, ...] | None = None
            for rows in pager(conn, source, key, page_size):
                conn.rollback()
                pages += 1
                seen += len(rows)
                first_key = key_of(rows[0], key, ())
                check(last is None or first_key != last, f"{backend} {table} {form} walk: a key came twice")
                last = key_of(rows[-1], key, ())
            walks[form] = time.perf_counter() - t0
            check(seen == total and pages == -(-total // page_size),
                  f"{backend} {table} {form} walk: {seen} rows in {pages} pages, expected {total}")
            log(f"  [{backend} {table}] whole table, {form}: {walks[form]:.2f} s ({pages} pages)")
        for form in forms:
            results.append({
                "backend": backend, "table": table, "key_columns": len(key), "rows": total, "form": form,
                "predicate": labels[form], "page_ms": per_page[form], "walk_s": walks[form],
                "pages": -(-total // page_size), "plan": plans[form], "sql": forms[form].text,
            })
    return results


def measure(backend: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    log = args.log
    log(f"[{backend.name}] loading {args.rows:,} rows into flights and flights_id")
    backend.create()
    try:
        t0 = time.perf_counter()
        for table in DDL:
            backend.load(table, args.rows)
        log(f"[{backend.name}] loaded in {time.perf_counter() - t0:.1f} s")
        engine = sa.create_engine(backend.url)
        try:
            return [r for table in DDL for r in measure_table(engine, backend.name, table, args)]
        finally:
            engine.dispose()
    finally:
        backend.drop()


# --- the report --------------------------------------------------------------------------------


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    labels = [label for label, _ in POSITIONS]
    print(f"\nper page: milliseconds to read one page of {args.page_size} rows (+1 or +2, see bench/README.md), "
          f"median of {args.repeat}; whole table: seconds to page through it")
    header = (f"{'backend':<10} {'table':<10} {'key':>3} {'predicate':<21} "
              + " ".join(f"{label:>8}" for label in labels)
              + f" {'last/first':>10} {'whole':>8} {'whole/int':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        ms = r["page_ms"]
        reference = next(x for x in results if x["backend"] == r["backend"] and x["table"] == "flights_id"
                         and x["form"] == "new")
        walk = r["walk_s"]
        ratio = f"{walk / reference['walk_s']:>8.1f}x" if walk is not None else f"{'-':>9}"
        print(f"{r['backend']:<10} {r['table']:<10} {r['key_columns']:>3} {r['predicate']:<21} "
              + " ".join(f"{ms[label]:>8.2f}" for label in labels)
              + f" {ms['last'] / ms['first']:>9.1f}x "
              + (f"{walk:>8.2f}" if walk is not None else f"{'-':>8}") + f" {ratio}")
    print("\nnew against old, same page (old ms / new ms):")
    for backend in dict.fromkeys(r["backend"] for r in results):
        for table in DDL:
            old, new = (next(r for r in results if r["backend"] == backend and r["table"] == table and r["form"] == f)
                        for f in ("old", "new"))
            ratios = "  ".join(f"{label} {old['page_ms'][label] / new['page_ms'][label]:.1f}x" for label in labels)
            walk = (f"; whole table {old['walk_s'] / new['walk_s']:.1f}x"
                    if old["walk_s"] is not None and new["walk_s"] is not None else "")
            print(f"  {backend:<10} {table:<10} {ratios}{walk}")
    for label in ("50%", "last"):
        print(f"\nhow the backend read the page at {label} (its EXPLAIN):")
        for r in results:
            print(f"  {r['backend']:<10} {r['table']:<10} {r['predicate'] + ':':<22} {r['plan'][label]}")
    print("\nthe next-page statements, new:")
    for r in results:
        if r["form"] == "new" and r["table"] == "flights":
            print(f"  {r['backend']}: {r['sql']}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time keyset pages at the start, middle and end of a 7-column-key table, "
                    "with the old OR-expanded predicate and the one fillgate uses now.",
    )
    parser.add_argument("--rows", type=int, default=336_776, help="rows per table (default 336776, nycflights13)")
    parser.add_argument("--page-size", type=int, default=1000, help="rows per page (fillgate's default 1000)")
    parser.add_argument("--repeat", type=int, default=9, help="timed reads of each page; the median is reported")
    parser.add_argument("--source", choices=tuple(SOURCES), default="plain",
                        help="the job's source: the table's columns (plain) or with WHERE distance >= 500")
    parser.add_argument("--postgres", default=os.environ.get("FILLGATE_TEST_POSTGRES_URL"), metavar="URL",
                        help="PostgreSQL server (default $FILLGATE_TEST_POSTGRES_URL); needs CREATEDB")
    parser.add_argument("--mysql", default=os.environ.get("FILLGATE_TEST_MYSQL_URL"), metavar="URL",
                        help="MariaDB/MySQL server (default $FILLGATE_TEST_MYSQL_URL); needs CREATE/DROP DATABASE")
    parser.add_argument("--no-sqlite", action="store_true", help="leave SQLite out")
    parser.add_argument("--skip-old-walk", action="store_true",
                        help="do not page through the composite-key table with the old predicate (the slow part)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--workdir", help="where the SQLite file goes (default: a temporary folder)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.rows < 10 * args.page_size or args.page_size < 1 or args.repeat < 1:
        parser.error("--rows must be at least 10 pages, --page-size and --repeat at least 1")
    args.log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fillgate-bench-keyset-"))
    workdir.mkdir(parents=True, exist_ok=True)
    backends: list[Any] = [] if args.no_sqlite else [SQLiteBackend(workdir)]
    if args.postgres:
        backends.append(ServerBackend("postgresql", args.postgres))
    if args.mysql:
        backends.append(ServerBackend("mysql", args.mysql))
    print("command:", " ".join(["python", "bench/bench_keyset.py", *argv]))
    print(f"{'python:':<14}{platform.python_implementation()} {sys.version.split()[0]}")
    print(f"{'cpu:':<14}{_cpu_model()}, {os.cpu_count()} cores")
    print(f"{'fillgate:':<14}{_fillgate_version()}")
    print(f"{'sqlalchemy:':<14}{metadata.version('sqlalchemy')}")
    for backend in backends:
        print(f"{backend.name + ':':<14}{backend.describe()}")
    print(f"{'table:':<14}{args.rows:,} rows, source {args.source}: "
          f"{SOURCES[args.source].format(cols='...', table='flights')}; page_size {args.page_size}")
    print(f"{'machine:':<14}{load()} (at start)")
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    try:
        for backend in backends:
            results.extend(measure(backend, args))
    except BenchFailure as exc:
        print(f"\nBENCH FAILED: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.workdir:
            with contextlib.suppress(OSError):
                for path in workdir.iterdir():
                    path.unlink()
                workdir.rmdir()
    report(results, args)
    print(f"\n{load()} (at end); wall time {time.perf_counter() - started:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "log"},
                                               "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
