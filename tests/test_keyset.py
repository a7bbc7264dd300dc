"""Keyset paging (``fillgate.sql.keyset_pages``) on every backend.

* every row of the source comes exactly once, in the database's key order, for composite keys
  of mixed types (ints, text with awkward characters, dates), with a WHERE in the source, and
  for page sizes 1, 2, 7 and larger than the table; for each spelling of the next-page
  predicate, not only the one the backend uses;
* the next page is read as an index range: the SQL sent is the spelling chosen for the backend
  (a row-value comparison on PostgreSQL and SQLite, the nested form on MySQL/MariaDB), and the
  backend's own EXPLAIN shows an index range, not a filter over the whole index;
* keys that differ only in case or trailing spaces are distinct keys where the key's collation
  says so, and keys the database compares as equal are an error, never a skipped row;
* the errors for an unbound parameter and a missing key column.

No timing here: bench/bench_keyset.py measures the cost per page.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fillgate import sql
from fillgate.errors import JobError, KeyNotUniqueError
from fillgate.sql import keyset_pages

from conftest import TestDB, run_cli

KEY = ("grp", "code", "day", "n")
CODES = [  # distinct under every backend's default collation (MariaDB's utf8mb4_general_ci
    # equates case, accents, 'ß' with 's', trailing spaces, and all characters beyond the BMP)
    "", " lead", "O'Brien", 'say "hi"', "back\\slash", "100%", "under_score", "tab\there",
    "new\nline", "é", "ß", "日本", "😀", "a;--", "Zebra", "apple", "?", ":grp", "%s",
]
DAYS = [datetime.date(1999, 12, 31), datetime.date(2000, 1, 1), datetime.date(2024, 2, 29)]
COLUMNS = "grp, code, day, n, note"


def pages(db: TestDB, source: str, key: Sequence[str], page_size: int,
          params: dict[str, Any] | None = None) -> list[list[tuple[Any, ...]]]:
    with db.engine.connect() as conn:
        return [[tuple(row.values()) for row in page] for page in keyset_pages(conn, source, key, page_size, params)]


def ordered(db: TestDB, source: str, key: Sequence[str], params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """The source in key order, in one query: what paging must reproduce."""
    order = ", ".join(key)
    return db.rows(f"SELECT * FROM ({source}) s ORDER BY {order}", params)


def check_pages(got: list[list[tuple[Any, ...]]], expected: list[tuple[Any, ...]], page_size: int) -> None:
    assert [row for page in got for row in page] == expected  # every row once, in key order
    assert all(0 < len(page) <= page_size for page in got)
    assert len(got) == -(-len(expected) // page_size)  # full pages but the last, no empty page


def create_legs(db: TestDB) -> list[tuple[Any, ...]]:
    db.execute(
        "CREATE TABLE legs (grp INTEGER NOT NULL, code VARCHAR(40) NOT NULL, day DATE NOT NULL, "
        "n INTEGER NOT NULL, note VARCHAR(40), PRIMARY KEY (grp, code, day, n))"
    )
    rows = [
        {"grp": grp, "code": code, "day": day, "n": n, "note": f"{grp}/{i}/{n}"}
        for grp in (-7, 0, 2_000_000_000)
        for i, code in enumerate(CODES)
        for day in DAYS
        for n in (-1, 3)
        if (grp + i + n) % 4  # gaps, so groups are uneven
    ]
    # inserted out of key order
    db.execute(f"INSERT INTO legs ({COLUMNS}) VALUES (:grp, :code, :day, :n, :note)", rows[::-1])
    return [(r["grp"], r["code"], stored_date(db, r["day"]), r["n"]) for r in rows]


def stored_date(db: TestDB, day: datetime.date) -> Any:
    """A date as the backend returns it (SQLite stores and returns ISO text)."""
    return day.isoformat() if db.backend == "sqlite" else day


@pytest.fixture(params=["backend's own", "row", "nested"])
def style(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each spelling of the next-page predicate must page correctly on every backend (the
    backend's own is the one it runs; the others must be right too, only slower)."""
    if request.param != "backend's own":
        monkeypatch.setattr(sql, "keyset_style", lambda dialect: request.param)
    return str(request.param)


@pytest.mark.parametrize("page_size", [1, 2, 7, 1000])
def test_composite_key_of_mixed_types_every_row_once_in_order(db: TestDB, style: str, page_size: int) -> None:
    keys = create_legs(db)
    source = f"SELECT {COLUMNS} FROM legs WHERE n <> 3 OR day > :since"
    params = {"since": DAYS[0]}
    expected = ordered(db, source, KEY, params)
    wanted = {k for k in keys if k[3] != 3 or k[2] > stored_date(db, DAYS[0])}
    assert len(expected) == len(wanted) > 100
    assert {row[:4] for row in expected} == wanted
    if db.backend != "mysql":  # (MariaDB orders text by its collation: case and accents aside)
        assert [row[:2] for row in expected] == sorted(row[:2] for row in expected)
    got = pages(db, source, KEY, page_size, params)
    check_pages(got, expected, page_size)


def test_whole_table_without_source_where(db: TestDB, style: str) -> None:
    create_legs(db)
    source = "SELECT * FROM legs"
    expected = ordered(db, source, KEY)
    for page_size in (1, 7, len(expected) - 1, len(expected), len(expected) + 1):
        check_pages(pages(db, source, KEY, page_size), expected, page_size)


def test_single_column_key(db: TestDB) -> None:
    db.create_people(23)
    source = "SELECT id, name FROM people WHERE id <> 5"
    for page_size in (1, 2, 7, 100):
        got = pages(db, source, ("id",), page_size)
        check_pages(got, [(i, f"Person{i}") for i in range(1, 24) if i != 5], page_size)


def test_empty_source(db: TestDB) -> None:
    create_legs(db)
    assert pages(db, "SELECT * FROM legs WHERE grp = 1", KEY, 3) == []


# --- random tables ---------------------------------------------------------------------------

TEXTS = st.text(alphabet=st.sampled_from(list("aAbB _%'\"\\é日😀\t;")), max_size=6)
KEY_ROWS = st.lists(
    st.tuples(st.integers(-3, 3), TEXTS, st.sampled_from(DAYS)),
    max_size=30,
)
EXAMPLES = {"sqlite": 60, "postgresql": 25, "mysql": 25}


def _insert_ignoring_duplicates(db: TestDB) -> str:
    """INSERT that skips a key the table already holds (under the backend's own comparison:
    MariaDB's collation equates 'a', 'A' and 'a ')."""
    head = {"sqlite": "INSERT OR IGNORE", "postgresql": "INSERT", "mysql": "INSERT IGNORE"}[db.backend]
    tail = " ON CONFLICT DO NOTHING" if db.backend == "postgresql" else ""
    return f"{head} INTO rnd (a, t, d, v) VALUES (:a, :t, :d, :v){tail}"


def test_random_tables_every_row_once_in_order(db: TestDB) -> None:
    @settings(max_examples=EXAMPLES[db.backend], deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(KEY_ROWS, st.sampled_from([1, 2, 3, 7, 50]), st.integers(-3, 3), st.sampled_from(["row", "nested"]))
    def check(key_rows: list[tuple[int, str, datetime.date]], page_size: int, low: int, style: str) -> None:
        db.execute("DROP TABLE IF EXISTS rnd")
        db.execute("CREATE TABLE rnd (a INTEGER NOT NULL, t VARCHAR(20) NOT NULL, d DATE NOT NULL, v INTEGER, "
                   "PRIMARY KEY (t, d, a))")
        if key_rows:
            db.execute(_insert_ignoring_duplicates(db),
                       [{"a": a, "t": t, "d": d, "v": i} for i, (a, t, d) in enumerate(key_rows)])
        source = "SELECT * FROM rnd WHERE a >= :low"
        key = ("t", "d", "a")
        expected = ordered(db, source, key, {"low": low})
        assert sorted(r[3] for r in expected) == sorted(r[3] for r in db.rows("SELECT * FROM rnd") if r[0] >= low)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sql, "keyset_style", lambda dialect: style)
            got = pages(db, source, key, page_size, {"low": low})
        check_pages(got, expected, page_size)

    check()


# --- the SQL sent and how the backend runs it --------------------------------------------------


@pytest.fixture
def statements(db: TestDB) -> Iterator[list[tuple[str, Any]]]:
    """Every statement (and its parameters) sent to the database while the test runs."""
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        sent.append((statement, parameters))

    sa.event.listen(db.engine, "before_cursor_execute", record)
    yield sent
    sa.event.remove(db.engine, "before_cursor_execute", record)


def _explain(db: TestDB, statement: str, parameters: Any) -> Any:
    with db.engine.connect() as conn:
        if db.backend == "sqlite":
            return [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
        if db.backend == "postgresql":
            # the question is whether the key range CAN drive an index scan, not what the
            # planner prefers for a small table
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar()
            return plan[0]["Plan"]
        return json.loads(conn.exec_driver_sql("EXPLAIN FORMAT=JSON " + statement, parameters).scalar())


def _nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Every object in an EXPLAIN FORMAT JSON tree."""
    if isinstance(plan, dict):
        yield plan
        plan = list(plan.values())
    if isinstance(plan, list):
        for item in plan:
            yield from _nodes(item)


@pytest.mark.parametrize("where", ["", " WHERE note <> 'x'"])
def test_next_page_is_an_index_range(db: TestDB, statements: list[tuple[str, Any]], where: str) -> None:
    db.execute("CREATE TABLE big (grp INTEGER NOT NULL, code VARCHAR(20) NOT NULL, day DATE NOT NULL, "
               "note VARCHAR(20), PRIMARY KEY (grp, code, day))")
    db.execute("INSERT INTO big (grp, code, day, note) VALUES (:g, :c, :d, :n)", [
        {"g": g, "c": f"c{c:02}", "d": DAYS[0] + datetime.timedelta(days=d), "n": "n"}
        for g in range(10) for c in range(30) for d in range(10)
    ])
    db.execute({"sqlite": "ANALYZE", "postgresql": "ANALYZE big", "mysql": "ANALYZE TABLE big"}[db.backend])
    source = f"SELECT grp, code, day, note FROM big{where}"
    with db.engine.connect() as conn:
        for number, _page in enumerate(keyset_pages(conn, source, ("grp", "code", "day"), 100), start=1):
            if number == 27:  # 90% into the table
                break
    statement, parameters = next(s for s in reversed(statements) if "fillgate_src" in s[0])
    assert "OFFSET" not in statement.upper()
    where_part = statement.split(" WHERE ")[-1]

    if db.backend in ("sqlite", "postgresql"):
        # a row-value comparison, not the OR-expansion
        assert re.search(r"\(grp, code, day\) >= \(", where_part), statement
        assert " OR " not in where_part, statement
    else:
        # the nested form; MariaDB reads the whole index for a row-value comparison
        assert "(grp, code, day)" not in statement
        mark = r"(\?|%\(fillgate_k\d\)s)"
        nested = (rf"\(grp > {mark} OR \(grp = {mark} AND \(code > {mark} OR \(code = {mark} AND "
                  rf"\(day >= {mark}\)\)\)\)\)")
        assert re.search(nested, where_part), statement

    plan = _explain(db, statement, parameters)
    if db.backend == "sqlite":
        assert any(re.fullmatch(r"SEARCH big USING (COVERING )?INDEX \w+ \(\(grp,code,day\)>\(\?,\?,\?\)\)", step)
                   for step in plan), plan
        assert not any(step.startswith("SCAN big") or "TEMP B-TREE" in step for step in plan), plan
    elif db.backend == "postgresql":
        scans = [n for n in _nodes(plan) if n.get("Node Type") in ("Index Scan", "Index Only Scan")]
        assert len(scans) == 1 and scans[0]["Relation Name"] == "big", plan
        assert re.match(r"\(ROW\(grp, \(?code\)?(::text)?, day\) >= ROW\(", scans[0]["Index Cond"]), plan
        assert not any(n.get("Node Type") == "Sort" for n in _nodes(plan)), plan
    else:
        tables = [n for n in _nodes(plan) if "access_type" in n]
        assert len(tables) == 1, plan  # the source is merged into the outer query ...
        assert tables[0]["table_name"] == "big", plan
        assert tables[0]["access_type"] == "range", plan  # ... and read as a range of the key
        assert tables[0]["key"] == "PRIMARY", plan
        assert tables[0]["used_key_parts"] == ["grp", "code", "day"], plan
        assert not any("filesort" in n for n in _nodes(plan)), plan


# --- case, trailing spaces, collations ---------------------------------------------------------

# a key column that tells 'a', 'A' and 'a ' apart, in byte order
EXACT = {"sqlite": "VARCHAR(10)", "postgresql": 'VARCHAR(10) COLLATE "C"',
         "mysql": "VARCHAR(10) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"}
EXACT_KEYS = ["a", "A", "a ", "a  ", " a", "b", "B ", "", "ab"]


@pytest.mark.parametrize("page_size", [1, 2, 3, 100])
def test_keys_differing_only_in_case_or_trailing_spaces(db: TestDB, page_size: int) -> None:
    db.execute(f"CREATE TABLE words (k {EXACT[db.backend]} NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (k, n))")
    db.execute("INSERT INTO words (k, n) VALUES (:k, :n)", [{"k": k, "n": n} for k in EXACT_KEYS for n in (2, 1)])
    expected = [(k, n) for k in sorted(EXACT_KEYS, key=lambda k: k.encode()) for n in (1, 2)]
    assert ordered(db, "SELECT k, n FROM words", ("k", "n")) == expected
    check_pages(pages(db, "SELECT k, n FROM words", ("k", "n"), page_size), expected, page_size)


def _case_insensitive(db: TestDB) -> str:
    """A collation that ignores case (MariaDB's default one also ignores trailing spaces)."""
    if db.backend == "postgresql":
        db.execute("CREATE COLLATION fillgate_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
        return "fillgate_ci"
    return {"sqlite": "NOCASE", "mysql": "utf8mb4_general_ci"}[db.backend]


def test_case_insensitive_key(db: TestDB) -> None:
    """A unique key in a case-insensitive collation cannot hold both 'a' and 'A'; its keys come
    in the collation's order (a, B, c), which the next-page comparison must follow too."""
    collation = _case_insensitive(db)
    db.execute(f"CREATE TABLE words (k VARCHAR(10) COLLATE {collation} NOT NULL PRIMARY KEY, n INTEGER)")
    keys = ["D", "a", "c", "B", "e f", "E"]
    db.execute("INSERT INTO words (k, n) VALUES (:k, :n)", [{"k": k, "n": i} for i, k in enumerate(keys)])
    with pytest.raises(sa.exc.IntegrityError):
        db.execute("INSERT INTO words (k, n) VALUES ('A', 9)")
    expected = [("a", 1), ("B", 3), ("c", 2), ("D", 0), ("E", 5), ("e f", 4)]
    assert ordered(db, "SELECT k, n FROM words", ("k",)) == expected
    for page_size in (1, 2, 4, 10):
        check_pages(pages(db, "SELECT k, n FROM words", ("k",), page_size), expected, page_size)


@pytest.mark.parametrize("page_size", [1, 2, 3, 4, 100])
def test_keys_the_database_compares_as_equal_are_an_error_not_a_skipped_row(db: TestDB, page_size: int) -> None:
    """A source that changes the key's collation can return 'a' and 'A' (or 'a' and 'a ') as
    two rows whose keys the database compares as equal: ``> 'a'`` would skip 'A'. Paging
    returns every row once or stops with an error naming them; it never skips one."""
    db.execute(f"CREATE TABLE words (k {EXACT[db.backend]} NOT NULL PRIMARY KEY, n INTEGER)")
    keys = ["a", "A", "b", "c", "C", "d"]
    if db.backend != "postgresql":  # (no PostgreSQL collation ignores trailing spaces)
        keys.append("d ")
    db.execute("INSERT INTO words (k, n) VALUES (:k, :n)", [{"k": k, "n": i} for i, k in enumerate(keys)])
    collation = _case_insensitive(db)
    source = f"SELECT k COLLATE {collation} AS k, n FROM words"
    assert len(ordered(db, source, ("k",))) == len(keys)
    try:
        got = pages(db, source, ("k",), page_size)
    except KeyNotUniqueError as exc:
        assert re.search(r'returns keys \["(a|A|c|C|d|d )"\] and \["(a|A|c|C|d|d )"\], which the database compares '
                         "as equal", str(exc)), str(exc)
        assert page_size < len(keys)
    else:
        seen = sorted(row for page in got for row in page)
        assert seen == sorted((k, i) for i, k in enumerate(keys))  # nothing skipped, nothing twice
        assert page_size > 1  # a page of one row always ends between two equal keys


TWIN_JOBS = '''
from fillgate import Job, FillMissing


class Recollated(Job):
    table = "words"
    key = ("k",)
    columns = {"n": FillMissing()}
    source = "SELECT k COLLATE {collation} AS k, n FROM words"
    page_size = 2

    def compute(self, row, ctx):
        return {"n": 7}
'''


def test_a_plan_over_keys_the_database_compares_as_equal_fails_and_writes_nothing(db: TestDB, cli: CliRunner) -> None:
    db.execute(f"CREATE TABLE words (k {EXACT[db.backend]} NOT NULL PRIMARY KEY, n INTEGER)")
    db.execute("INSERT INTO words (k) VALUES ('a'), ('b'), ('B'), ('c')")
    collation = _case_insensitive(db)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    jobs = db.tmp_path / "twin_jobs.py"
    jobs.write_text(TWIN_JOBS.replace("{collation}", collation))
    result = run_cli(cli, cfg, "run", f"{jobs}:Recollated", "--target", "staging", "-o", "twins.plan")
    assert result.exit_code == 2, result.output
    assert re.search(r'returns keys \["(b|B)"\] and \["(b|B)"\], which the database compares as equal',
                     " ".join(result.stderr.split())), result.stderr
    assert not (db.tmp_path / "twins.plan").exists()
    assert db.rows("SELECT k, n FROM words ORDER BY n, k") == [(k, None) for k in sorted(["a", "b", "B", "c"])]
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0
    assert db.rows("SELECT kind, status FROM fillgate_runs WHERE kind <> 'init'") == [("plan", "failed")]


def test_sqlite_mixed_types_in_one_key_column(sqlite_db: TestDB) -> None:
    """SQLite lets an untyped column hold numbers, text and blobs (ordered in that order)."""
    db = sqlite_db
    db.execute("CREATE TABLE mixed (k NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (k, n))")
    values: list[Any] = [10, "a", 2.5, b"a", "10", 1, "A", b"\x00", "1", -3, "", b""]
    db.execute("INSERT INTO mixed (k, n) VALUES (:k, :n)", [{"k": v, "n": n} for v in values for n in (1, 0)])
    expected = [(v, n) for v in [-3, 1, 2.5, 10, "", "1", "10", "A", "a", b"", b"\x00", b"a"] for n in (0, 1)]
    assert ordered(db, "SELECT k, n FROM mixed", ("k", "n")) == expected
    for page_size in (1, 2, 7, 100):
        check_pages(pages(db, "SELECT k, n FROM mixed", ("k", "n"), page_size), expected, page_size)


# --- errors -----------------------------------------------------------------------------------


def test_exact_duplicate_key_straddling_pages(db: TestDB) -> None:
    create_legs(db)
    db.execute("CREATE TABLE tags (grp INTEGER NOT NULL, tag VARCHAR(5) NOT NULL)")
    db.execute("INSERT INTO tags (grp, tag) VALUES (:g, :t)", [{"g": -7, "t": "x"}, {"g": 0, "t": "x"},
                                                                {"g": 0, "t": "y"}, {"g": 2_000_000_000, "t": "x"}])
    source = "SELECT l.grp, l.code, l.day, l.n FROM legs l JOIN tags t ON t.grp = l.grp"
    for page_size in (1, 2, 7, 1000):
        with pytest.raises(KeyNotUniqueError, match=r"returns key \[0,.*\] more than once"):
            pages(db, source, KEY, page_size)


def test_unbound_parameter(db: TestDB, statements: list[tuple[str, Any]]) -> None:
    create_legs(db)
    statements.clear()
    with pytest.raises(JobError, match=r"uses :since, :top but the job has no such parameter\(s\)"):
        pages(db, "SELECT * FROM legs WHERE day >= :since AND grp < :top", KEY, 10, {"other": 1})
    assert statements == []  # refused before anything ran


def test_key_column_the_source_does_not_select(db: TestDB) -> None:
    create_legs(db)
    if db.backend == "postgresql":  # PostgreSQL itself refuses: ORDER BY names a missing column
        with pytest.raises(sa.exc.ProgrammingError):
            pages(db, "SELECT grp, day, n FROM legs", KEY, 10)
        return
    # SQLite and MariaDB match column names in any case, so ORDER BY "CODE" runs; the row has "code"
    with pytest.raises(JobError, match=r"does not select the key column\(s\) CODE"):
        pages(db, "SELECT * FROM legs", ("grp", "CODE", "day", "n"), 10)
