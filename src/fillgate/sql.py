"""Every statement fillgate runs on the user's tables: key checks, keyset reads and
compare-and-set writes. (Queries on fillgate's own tables live in ``ledger/``.)"""

from __future__ import annotations

import itertools
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import column as sa_column
from sqlalchemy import inspect, select, text, tuple_
from sqlalchemy import table as sa_table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SAWarning
from sqlalchemy.sql.elements import TextClause

from fillgate.backends import ColumnType, backend_for, same_value
from fillgate.backends.base import placeholder
from fillgate.errors import JobError, KeyNotUniqueError, StoredValueError
from fillgate.values import encode_key, in_words


class Change(NamedTuple):
    """One change. ``update``: set ``column`` of the row ``key`` from ``old`` to ``new``.
    ``insert``: add the row ``new`` (a dict of column values) whose key is ``key``.
    ``delete``: remove the row ``key`` if it still holds ``old`` (reverting an insert).
    Inserts and deletes use ``column`` ``"*"``."""

    key: tuple[Any, ...]
    column: str
    old: Any
    new: Any
    op: str = "update"
    # the JSON text of key, old and new when it came from a plan file (saves re-encoding)
    key_text: str | None = None
    old_text: str | None = None
    new_text: str | None = None


@dataclass
class BatchOutcome:
    applied: list[Change]
    conflicts: list[tuple[Change, Any, bool]]  # (change, current value, row still exists)
    # row errors: a value the database rejected, or stored differently from the plan (then
    # the change was rolled back: a StoredValueError)
    errors: list[tuple[Change, BaseException]]


class TableSQL:
    """Statements for one user table and its key, quoted for the connection's dialect."""

    def __init__(self, dialect: Any, table: str, key: Sequence[str]) -> None:
        q = dialect.identifier_preparer.quote
        self.quote = q
        self.table = table
        self.key = tuple(key)
        self.mark = placeholder(dialect)
        self.q_table = ".".join(q(part) for part in table.split("."))
        self.key_where = " AND ".join(f"{q(k)} = {self.mark}" for k in self.key)
        self.backend = backend_for(dialect)
        self._types: dict[str, ColumnType] | None = None
        self._binders: dict[str, Callable[[Any], Any]] | None = None

    def null_safe_equal(self, column: str, exact: bool = False) -> str:
        """``column`` equals its parameter, NULL equal to NULL; ``exact``: as bytes, where the
        database compares text by collation ('a' = 'A' = 'a '), so that a value changed only in
        case or trailing spaces since the plan is still a conflict."""
        return self.backend.null_safe_equal(self.quote(column), self.mark, exact)

    def cas_update(self, column: str, exact: bool = False) -> str:
        """``UPDATE t SET col = new WHERE key = k AND col IS NOT DISTINCT FROM old``;
        ``exact``: the old values are text, compared byte for byte."""
        return (
            f"UPDATE {self.q_table} SET {self.quote(column)} = {self.mark} "
            f"WHERE {self.key_where} AND {self.null_safe_equal(column, exact)}"
        )

    def column_types(self, conn: Connection) -> dict[str, ColumnType]:
        """The table's column types (reflected once), by name."""
        if self._types is None:
            self._types = self.backend.column_types(conn, self.table)
        return self._types

    def column_type(self, conn: Connection, column: str) -> ColumnType | None:
        types = self.column_types(conn)
        found = types.get(column)
        if found is None:
            found = next((t for name, t in types.items() if name.lower() == column.lower()), None)
        return found

    def binders(self, conn: Connection) -> dict[str, Callable[[Any], Any]]:
        """How the driver must be handed the values of some columns (PostgreSQL jsonb), by column."""
        if self._binders is None:
            self._binders = {}
            for column, ctype in self.column_types(conn).items():
                bind = self.backend.bind(ctype)
                if bind is not None:
                    self._binders[column] = bind
        return self._binders

    def select_current(self, column: str) -> str:
        return f"SELECT {self.quote(column)} FROM {self.q_table} WHERE {self.key_where}"

    def select_row(self) -> str:
        return f"SELECT * FROM {self.q_table} WHERE {self.key_where}"

    def insert(self, columns: Sequence[str]) -> str:
        names = ", ".join(self.quote(c) for c in columns)
        return f"INSERT INTO {self.q_table} ({names}) VALUES ({', '.join([self.mark] * len(columns))})"

    def cas_delete(self, columns: Sequence[str], exact: Mapping[str, bool]) -> str:
        """``DELETE FROM t WHERE key = k AND every other column still holds what was inserted``."""
        checks = "".join(f" AND {self.null_safe_equal(c, exact.get(c, False))}" for c in columns)
        return f"DELETE FROM {self.q_table} WHERE {self.key_where}{checks}"


# --- checking a job's table and key -----------------------------------------------------


def verify_table_and_key(
    engine: Engine, table: str, key: Sequence[str], columns: Sequence[str]
) -> None:
    """The table exists, has every column, and ``key`` is its primary key or a unique,
    NOT NULL constraint; otherwise a clear JobError before anything runs."""
    schema, _, name = table.rpartition(".")
    insp = inspect(engine)
    if not insp.has_table(name, schema=schema or None):
        raise JobError(f"table {table!r} does not exist in the target database.")
    with warnings.catch_warnings():  # "Did not recognize type 'xml'": fillgate reads types itself
        warnings.simplefilter("ignore", SAWarning)
        cols = {c["name"].lower(): c for c in insp.get_columns(name, schema=schema or None)}
    missing = [c for c in (*key, *columns) if c.lower() not in cols]
    if missing:
        raise JobError(
            f"table {table!r} has no column(s) {', '.join(missing)}; "
            f"its columns are {', '.join(sorted(cols))}."
        )
    wanted = {k.lower() for k in key}
    candidates: list[set[str]] = []
    pk = insp.get_pk_constraint(name, schema=schema or None).get("constrained_columns") or []
    candidates.append({c.lower() for c in pk})
    for uc in insp.get_unique_constraints(name, schema=schema or None):
        candidates.append({c.lower() for c in uc["column_names"]})
    for ix in insp.get_indexes(name, schema=schema or None):
        if ix.get("unique"):
            candidates.append({c.lower() for c in ix["column_names"] if c})
    if wanted not in candidates:
        raise KeyNotUniqueError(
            f"key ({', '.join(key)}) of table {table!r} matches no primary key or unique "
            "constraint, so it may not identify one row. Use the primary key, or add a unique "
            "constraint on those columns."
        )
    is_pk = {c.lower() for c in pk} == wanted
    nullable = [k for k in key if not is_pk and cols[k.lower()].get("nullable", True)]
    if nullable:
        raise KeyNotUniqueError(
            f"key column(s) {', '.join(nullable)} of table {table!r} allow NULL, and rows with a "
            "NULL key cannot be addressed; use a NOT NULL key."
        )


# --- reading the source, keyset style ---------------------------------------------------


def keyset_style(dialect: Any) -> str:
    """How this database is told where the next page starts so that it reads the key's index
    as a range (``Backend.keyset_style``; bench/bench_keyset.py measures the spellings)."""
    return backend_for(dialect).keyset_style(dialect)


def _after_clause(quote: Any, key: Sequence[str], style: str, inclusive: bool = False,
                  prefix: str = "fillgate_k") -> str:
    """``(k1, k2) > (:fillgate_k0, :fillgate_k1)`` (``>=`` when ``inclusive``), spelled in
    ``style`` (see Backend.keyset_style); the parameters are named ``prefix`` + position."""
    op = ">=" if inclusive else ">"
    cols = [quote(k) for k in key]
    marks = [f":{prefix}{i}" for i in range(len(key))]
    if len(key) == 1:
        return f"{cols[0]} {op} {marks[0]}"
    if style == "row":
        return f"({', '.join(cols)}) {op} ({', '.join(marks)})"
    # k1 > :a OR (k1 = :a AND (k2 > :b OR (k2 = :b AND k3 >= :c))), built from the last column
    clause = f"{cols[-1]} {op} {marks[-1]}"
    for col, mark in zip(reversed(cols[:-1]), reversed(marks[:-1]), strict=True):
        clause = f"{col} > {mark} OR ({col} = {mark} AND ({clause}))"
    return f"({clause})"


def _at_clause(quote: Any, key: Sequence[str]) -> str:
    """``k1 = :fillgate_k0 AND k2 = :fillgate_k1``: equal to the last key, as the database compares."""
    return " AND ".join(f"{quote(k)} = :fillgate_k{i}" for i, k in enumerate(key))


def _duplicate_key(keys: Sequence[tuple[Any, ...]]) -> KeyNotUniqueError:
    """The error for rows of the source whose keys the database compares as equal."""
    distinct: list[tuple[Any, ...]] = []
    for k in keys:
        if all(k != seen for seen in distinct):
            distinct.append(k)
    if len(distinct) == 1:
        return KeyNotUniqueError(
            f"the job's source returns key {encode_key(distinct[0])} more than once; "
            "a key must identify one row (check joins in the source)."
        )
    return KeyNotUniqueError(
        f"the job's source returns keys {' and '.join(encode_key(k) for k in distinct)}, which the "
        "database compares as equal (a collation that ignores case, accents or trailing spaces), "
        "so paging cannot tell them apart; a key must identify one row (check COLLATE, computed "
        "key columns and joins in the source)."
    )


def _keyset_statements(dialect: Any, source: str, key: Sequence[str], page_size: int) -> tuple[TextClause, TextClause]:
    """The statement that reads the first page of ``source``, and the one that reads each next
    page from ``:fillgate_k0, :fillgate_k1, ...`` (the last key read)."""
    quote = dialect.identifier_preparer.quote
    body = source.strip().rstrip(";")
    order = ", ".join(quote(k) for k in key)
    # One row more than a page: a key repeated across the page boundary is in the same read.
    limit = int(page_size) + 1
    first = text(f"SELECT * FROM ({body}) fillgate_src ORDER BY {order} LIMIT {limit}")
    style = keyset_style(dialect)
    # The next page starts AT the last key (>=, one row more again) and marks the rows the
    # database compares equal to it (1, else NULL: cheaper to read than 0): the row already
    # read, and no other. A twin that differs only in case or trailing spaces under the key's
    # collation would be skipped by ``>``, and Python cannot tell that it is one.
    later = text(
        f"SELECT fillgate_src.*, CASE WHEN {_at_clause(quote, key)} THEN 1 END AS fillgate_at_last "
        f"FROM ({body}) fillgate_src WHERE {_after_clause(quote, key, style, inclusive=True)} "
        f"ORDER BY {order} LIMIT {limit + 1}"
    )
    return first, later


def keyset_pages(
    conn: Connection,
    source: str,
    key: Sequence[str],
    page_size: int,
    params: Mapping[str, Any] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Pages of the source's rows in key order; never OFFSET, never the whole table in memory.

    Every row of the source comes exactly once, or a KeyNotUniqueError says which key the
    source returns more than once (or which keys the database compares as equal)."""
    first, later = _keyset_statements(conn.dialect, source, key, page_size)
    base = _bound_params(source, params)
    stmt, bind = first, base
    last_key: tuple[Any, ...] | None = None
    while True:
        rows, page_keys = _read_page(conn, stmt, bind, key, last_key, int(page_size) + 1)
        if not rows:
            return
        yield rows[:page_size]
        if len(rows) <= page_size:
            return
        last_key = page_keys[page_size - 1]
        stmt = later
        bind = {**base, **{f"fillgate_k{i}": v for i, v in enumerate(last_key)}}


def _read_page(
    conn: Connection, stmt: TextClause, bind: Mapping[str, Any], key: Sequence[str],
    last_key: tuple[Any, ...] | None, limit: int,
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """One page of rows (at most ``limit``, the last key read dropped) and their keys; a key
    the source returns twice (or two the database compares as equal) is a KeyNotUniqueError."""
    result = conn.execute(stmt, bind)
    names = list(result.keys())
    fetched = result.fetchall()
    if last_key is not None:
        names.pop()  # fillgate_at_last
    # zip without strict=: passing the keyword costs about half a microsecond per row (names
    # is shorter than a row by the paging column, which zip leaves out)
    rows = [dict(zip(names, r)) for r in fetched]  # noqa: B905
    absent = [k for k in key if rows and k not in rows[0]]  # SQLite and MariaDB ORDER BY any case
    if absent:
        raise JobError(f"the job's source does not select the key column(s) {', '.join(absent)}.")
    if len(key) == 1:
        (column,) = key
        page_keys = [(row[column],) for row in rows]
    else:
        page_keys = [tuple(row[k] for k in key) for row in rows]
    if last_key is not None:
        at_last = [i for i, r in enumerate(fetched) if r[-1]]
        if at_last:
            if len(at_last) > 1 or page_keys[at_last[0]] != last_key:
                raise _duplicate_key([last_key, *(page_keys[i] for i in at_last)])
            del rows[at_last[0]], page_keys[at_last[0]]
        # (when the last row has gone since, one row more came than a page needs)
        del rows[limit:], page_keys[limit:]
    # rows come in key order, so a repeated key sits next to its twin (or follows last_key)
    previous = [last_key, *page_keys[:-1]]
    if any(map(operator.eq, previous, page_keys)):
        twin = next(k for p, k in zip(previous, page_keys, strict=True) if p == k)
        raise _duplicate_key([twin])
    return rows, page_keys


# --- partitions: key ranges of the source, for distributed runs --------------------------


@dataclass(frozen=True)
class KeyRange:
    """The source rows whose key is ``>= lo`` and ``< hi`` (as the database compares keys);
    None: unbounded on that side."""

    lo: tuple[Any, ...] | None = None
    hi: tuple[Any, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"lo": None if self.lo is None else list(self.lo), "hi": None if self.hi is None else list(self.hi)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyRange:
        lo, hi = data.get("lo"), data.get("hi")
        return cls(None if lo is None else tuple(lo), None if hi is None else tuple(hi))


def _bound_params(source: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job's parameters the source binds; an unbound one is a JobError."""
    wanted = set(text(source)._bindparams)
    base = {k: v for k, v in (params or {}).items() if k in wanted}
    unbound = wanted - set(base)
    if unbound:
        raise JobError(
            f"the job's source uses :{', :'.join(sorted(unbound))} but the job has no such "
            "parameter(s); declare them in params."
        )
    return base


def partition_bounds(
    conn: Connection, source: str, key: Sequence[str], partitions: int, params: Mapping[str, Any] | None = None,
) -> list[KeyRange]:
    """Split the source into at most ``partitions`` key ranges holding about as many rows each.

    The database does the work in two statements (a COUNT, then the key of every ``step``-th
    row by ROW_NUMBER over the key's order); only the boundary keys come back, never the
    table. The first range is unbounded below and the last unbounded above, so together they
    cover every key; each range holds at least one row when it was computed."""
    quote = conn.dialect.identifier_preparer.quote
    body = source.strip().rstrip(";")
    bind = _bound_params(body, params)
    total = conn.execute(text(f"SELECT COUNT(*) FROM ({body}) fillgate_src"), bind).scalar_one()
    partitions = max(1, min(int(partitions), int(total)))
    if partitions == 1:
        return [KeyRange()]
    step = -(-int(total) // partitions)  # ceil: rows per partition
    cols = ", ".join(quote(k) for k in key)
    stmt = text(
        f"SELECT {cols} FROM (SELECT {cols}, ROW_NUMBER() OVER (ORDER BY {cols}) AS fillgate_rn "
        f"FROM ({body}) fillgate_src) fillgate_keys WHERE (fillgate_rn - 1) % :fillgate_step = 0 "
        f"AND fillgate_rn > 1 ORDER BY {cols}"
    )
    starts = [tuple(row) for row in conn.execute(stmt, {**bind, "fillgate_step": step})]
    edges: list[tuple[Any, ...] | None] = [None, *starts, None]
    return [KeyRange(lo, hi) for lo, hi in itertools.pairwise(edges)]


def bounded_source(
    dialect: Any, source: str, key: Sequence[str], bounds: KeyRange, params: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The source restricted to the rows of ``bounds``, and the parameters it takes (the job's
    and the bounds', named ``fillgate_lo0..`` and ``fillgate_hi0..``)."""
    body = source.strip().rstrip(";")
    given = dict(params or {})
    if bounds.lo is None and bounds.hi is None:
        return body, given
    quote, style = dialect.identifier_preparer.quote, keyset_style(dialect)
    where = []
    if bounds.lo is not None:
        where.append(_after_clause(quote, key, style, inclusive=True, prefix="fillgate_lo"))
        given.update({f"fillgate_lo{i}": v for i, v in enumerate(bounds.lo)})
    if bounds.hi is not None:
        where.append(f"NOT ({_after_clause(quote, key, style, inclusive=True, prefix='fillgate_hi')})")
        given.update({f"fillgate_hi{i}": v for i, v in enumerate(bounds.hi)})
    return f"SELECT * FROM ({body}) fillgate_part WHERE {' AND '.join(where)}", given


# --- writing ----------------------------------------------------------------------------


def _group_key(change: Change) -> tuple[str, ...]:
    if change.op == "update":
        return ("update", change.column)
    values = change.new if change.op == "insert" else change.old
    return (change.op, *sorted(values))


def _text_only(values: Iterable[Any]) -> bool:
    return all(v is None or isinstance(v, str) for v in values)


def _bound(binders: Mapping[str, Callable[[Any], Any]], column: str, value: Any) -> Any:
    bind = binders.get(column)
    return value if bind is None else bind(value)


def _statement(
    sql: TableSQL, group_key: tuple[str, ...], group: Sequence[Change], binders: Mapping[str, Callable[[Any], Any]]
) -> tuple[str, list[tuple[Any, ...]]]:
    """The compare-and-set statement of a group of like changes, and its parameters."""
    op, *columns = group_key
    by_collation = sql.backend.compares_text_by_collation()  # then text is compared as bytes
    if binders:
        def b(column: str, value: Any) -> Any:
            return _bound(binders, column, value)

        def key_of(c: Change) -> tuple[Any, ...]:
            return tuple(b(k, v) for k, v in zip(sql.key, c.key, strict=True))
    else:
        def b(column: str, value: Any) -> Any:
            return value

        def key_of(c: Change) -> tuple[Any, ...]:
            return c.key
    if op == "update":
        column = columns[0]
        exact = by_collation and _text_only(c.old for c in group)
        if not binders:
            return sql.cas_update(column, exact), [(c.new, *c.key, c.old) for c in group]
        return sql.cas_update(column, exact), [(b(column, c.new), *key_of(c), b(column, c.old)) for c in group]
    if op == "insert":
        return sql.insert(columns), [tuple(b(col, c.new[col]) for col in columns) for c in group]
    others = [col for col in columns if col not in sql.key]
    exact_text = {col: by_collation and _text_only(c.old[col] for c in group) for col in others}
    return sql.cas_delete(others, exact_text), [(*key_of(c), *(b(col, c.old[col]) for col in others)) for c in group]


def apply_changes(conn: Connection, sql: TableSQL, changes: Sequence[Change]) -> BatchOutcome:
    """Compare-and-set every change inside the caller's transaction.

    Updates set a field only if it still holds the planned old value; inserts add a row only
    if its key is free; deletes (reverting an insert) remove a row only if it still holds
    what was inserted. The fast path runs one statement per group of like changes (an
    ``executemany``, or on PostgreSQL one ``UPDATE ... FROM unnest(...)``); if any row did not
    match or the database rejected a value, that group is rolled back to a savepoint and redone
    row by row to tell applied changes from conflicts and errors.

    On PostgreSQL and MariaDB/MySQL, what each updated field and inserted row holds is read
    back before the group's savepoint is released: a field stored differently from the plan
    (a column type or a trigger changed it) sends the group down the row-by-row path, where
    that row's change is rolled back and becomes a row error (:class:`StoredValueError`).
    The plan already checked every value against its column's type, so this is a safety net.
    SQLite stores exactly the values the plan checked, and is not read back.
    """
    outcome = BatchOutcome([], [], [])
    groups: dict[tuple[str, ...], list[Change]] = {}
    for change in changes:
        group_key = ("update", change.column) if change.op == "update" else _group_key(change)
        groups.setdefault(group_key, []).append(change)
    binders = sql.binders(conn)
    for group_key, group in groups.items():
        savepoint = conn.begin_nested()
        if _group_at_once(conn, sql, group_key, group, binders):
            savepoint.commit()
            outcome.applied.extend(group)
            continue
        savepoint.rollback()
        statement, params = _statement(sql, group_key, group, binders)
        outcome.applied.extend(_apply_one_by_one(conn, sql, statement, group, params, outcome,
                                                 sql.backend.reads_back))
    return outcome


def _group_at_once(conn: Connection, sql: TableSQL, group_key: tuple[str, ...], group: list[Change],
                   binders: Mapping[str, Callable[[Any], Any]]) -> bool:
    """Apply a group of like changes with one statement (set-based, or one executemany):
    True when every change matched and, where the database is read back, every field holds
    what was planned; False (the caller rolls the group back) otherwise."""
    stored: list[Any] | None = None  # what each row of the group holds after the update
    try:
        done = sql.backend.update_group(conn, sql, group_key[1], group, binders) if group_key[0] == "update" \
            else None
        if done is not None:
            matched, stored = done
        else:
            statement, params = _statement(sql, group_key, group, binders)
            matched = conn.exec_driver_sql(statement, params).rowcount
    except Exception as exc:  # a value the fast path cannot send: the row-by-row path decides
        if sql.backend.is_timeout(exc):  # the batch timeout: the whole batch is rolled back
            raise
        return False
    if matched != len(group):
        return False
    if not sql.backend.reads_back or group_key[0] == "delete":
        return True
    if stored is None:
        stored = _stored_values(conn, sql, group)
    return _as_planned(group, stored)


def _stored_values(conn: Connection, sql: TableSQL, changes: Sequence[Change]) -> list[Any]:
    """What each update's field, or each inserted row's columns, hold now (read back in the
    same transaction). A row not found by its planned key counts as holding what was planned."""
    columns = sorted({col for c in changes for col in ((c.column,) if c.op == "update" else c.new)})
    rows = existing_rows(conn, sql.table, sql.key, columns, [c.key for c in changes])
    out: list[Any] = []
    for c in changes:
        row = rows.get(c.key)
        if row is None:
            out.append(c.new)
        elif c.op == "update":
            out.append(row[c.column])
        else:
            out.append({col: row[col] for col in c.new})
    return out


def _as_planned(changes: Sequence[Change], stored: Sequence[Any]) -> bool:
    """Every field holds exactly what was planned."""
    news = [c.new for c in changes]
    try:
        if stored == news:  # the usual case, compared in one go
            return True
    except Exception:  # values that refuse comparison: one by one below
        pass
    return all(not _differences(c, value) for c, value in zip(changes, stored, strict=True))


def _differences(change: Change, stored: Any) -> list[tuple[str, Any, Any]]:
    """(column, planned, stored) of each field that holds something else than planned."""
    if change.op == "update":
        return [] if same_value(change.new, stored) else [(change.column, change.new, stored)]
    return [(col, value, stored.get(col)) for col, value in change.new.items()
            if not same_value(value, stored.get(col))]


def _stored_differently(conn: Connection, sql: TableSQL, differences: list[tuple[str, Any, Any]]) -> StoredValueError:
    parts = []
    for column, planned, stored in differences:
        ctype = sql.column_type(conn, column)
        kind = f" ({ctype.type})" if ctype is not None else ""
        parts.append(f"{column}{kind} would hold {in_words(stored)}, not the planned {in_words(planned)}")
    return StoredValueError(
        "the database stored a value differently from the plan: " + "; ".join(parts)
        + " (the column's type or a trigger changed it). The row's change was rolled back; nothing of it "
        "was written."
    )


def _apply_one_by_one(
    conn: Connection,
    sql: TableSQL,
    statement: str,
    group: list[Change],
    params: list[tuple[Any, ...]],
    outcome: BatchOutcome,
    read_back: bool,
) -> list[Change]:
    """Each change on its own; conflicts and errors go to ``outcome``, the applied ones are returned."""
    applied: list[Change] = []
    for change, param in zip(group, params, strict=True):
        savepoint = conn.begin_nested()
        try:
            matched = conn.exec_driver_sql(statement, param).rowcount
        except (DBAPIError, OverflowError, ValueError, TypeError) as exc:  # refused by the database or its driver
            if sql.backend.is_timeout(exc):  # not the row's fault: the whole batch is rolled back
                raise
            savepoint.rollback()
            exists, current = current_value(conn, sql, change)
            if change.op == "insert" and exists:  # the key was taken since the plan
                outcome.conflicts.append((change, current, True))
            else:
                outcome.errors.append((change, getattr(exc, "orig", None) or exc))
            continue
        if matched == 1 and read_back and change.op != "delete":
            differences = _differences(change, _stored_values(conn, sql, [change])[0])
            if differences:
                savepoint.rollback()
                outcome.errors.append((change, _stored_differently(conn, sql, differences)))
                continue
        savepoint.commit()
        if matched == 1:
            applied.append(change)
        else:
            exists, current = current_value(conn, sql, change)
            outcome.conflicts.append((change, current, exists))
    return applied


def would_apply(change: Change, exists: bool, current: Any) -> bool:
    """Whether ``change`` would apply to the row as ``current_value`` found it."""
    if change.op == "update":
        return exists and current == change.old
    if change.op == "insert":
        return not exists
    return exists and all(current.get(c) == v for c, v in change.old.items())


def current_value(conn: Connection, sql: TableSQL, change: Change) -> tuple[bool, Any]:
    """(row exists, what it holds now: the field for an update, the whole row otherwise)."""
    if change.op == "update":
        row = conn.exec_driver_sql(sql.select_current(change.column), tuple(change.key)).first()
        return row is not None, (row[0] if row is not None else None)
    mapping = conn.exec_driver_sql(sql.select_row(), tuple(change.key)).mappings().first()
    return mapping is not None, (dict(mapping) if mapping is not None else None)


def existing_rows(
    conn: Connection, table: str, key: Sequence[str], columns: Sequence[str], keys: Sequence[tuple[Any, ...]]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rows of ``table`` whose key is in ``keys`` (key and ``columns`` only), by key."""
    schema, _, name = table.rpartition(".")
    tbl = sa_table(name, *(sa_column(c) for c in dict.fromkeys([*key, *columns])), schema=schema or None)
    key_expr = tbl.c[key[0]] if len(key) == 1 else tuple_(*(tbl.c[k] for k in key))
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), 500):
        chunk = unique[start:start + 500]
        values = [k[0] for k in chunk] if len(key) == 1 else chunk
        for row in conn.execute(select(tbl).where(key_expr.in_(values))).mappings():
            out[tuple(row[k] for k in key)] = dict(row)
    return out


def estimate_rows(engine: Engine, table: str) -> int | None:
    """A cheap row-count estimate for progress bars: catalog statistics, never a COUNT(*)."""
    try:
        with engine.connect() as conn:
            return backend_for(engine).estimate_rows(conn, table)
    except DBAPIError:
        return None
