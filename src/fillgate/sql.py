"""Every statement fillgate runs on the user's tables: key checks, keyset reads and
compare-and-set writes. (Queries on fillgate's own tables live in ``ledger/``.)"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from fillgate.errors import JobError, KeyNotUniqueError
from fillgate.values import encode_key


class Change(NamedTuple):
    """One field change: set ``column`` of the row ``key`` from ``old`` to ``new``."""

    key: tuple[Any, ...]
    column: str
    old: Any
    new: Any


@dataclass
class BatchOutcome:
    applied: list[Change]
    conflicts: list[tuple[Change, Any, bool]]  # (change, current value, row still exists)
    errors: list[tuple[Change, BaseException]]


class TableSQL:
    """Statements for one user table and its key, quoted for the connection's dialect."""

    def __init__(self, dialect: Any, table: str, key: Sequence[str]) -> None:
        self.dialect_name = dialect.name
        q = dialect.identifier_preparer.quote
        self.quote = q
        self.table = table
        self.key = tuple(key)
        self.mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self.q_table = ".".join(q(part) for part in table.split("."))
        self.key_where = " AND ".join(f"{q(k)} = {self.mark}" for k in self.key)

    def null_safe_equal(self, column: str, exact: bool = False) -> str:
        col = self.quote(column)
        if self.dialect_name == "sqlite":
            return f"{col} IS {self.mark}"
        if self.dialect_name == "postgresql":
            return f"{col} IS NOT DISTINCT FROM {self.mark}"
        if exact:
            # MySQL/MariaDB compare text by collation ('a' = 'A' = 'a '): a value changed
            # only in case or trailing spaces since the plan must still be a conflict. Both
            # sides become utf8mb4 bytes, whatever the column's character set.
            return (f"CAST(CONVERT({col} USING utf8mb4) AS BINARY) <=> "
                    f"CAST(CONVERT({self.mark} USING utf8mb4) AS BINARY)")
        return f"{col} <=> {self.mark}"

    def cas_update(self, column: str, exact: bool = False) -> str:
        """``UPDATE t SET col = new WHERE key = k AND col IS NOT DISTINCT FROM old``;
        ``exact``: the old values are text, compared byte for byte."""
        return (
            f"UPDATE {self.q_table} SET {self.quote(column)} = {self.mark} "
            f"WHERE {self.key_where} AND {self.null_safe_equal(column, exact)}"
        )

    def select_current(self, column: str) -> str:
        return f"SELECT {self.quote(column)} FROM {self.q_table} WHERE {self.key_where}"


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


def _after_clause(quote: Any, key: Sequence[str]) -> str:
    """``(k1, k2) > (:a, :b)`` spelled so that every backend can use the key's index."""
    parts = []
    for i, column in enumerate(key):
        equal = [f"{quote(key[j])} = :fillgate_k{j}" for j in range(i)]
        parts.append("(" + " AND ".join([*equal, f"{quote(column)} > :fillgate_k{i}"]) + ")")
    return " OR ".join(parts)


def keyset_pages(
    conn: Connection,
    source: str,
    key: Sequence[str],
    page_size: int,
    params: Mapping[str, Any] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Pages of the source's rows in key order; never OFFSET, never the whole table in memory."""
    quote = conn.dialect.identifier_preparer.quote
    body = source.strip().rstrip(";")
    order = ", ".join(quote(k) for k in key)
    # One row more than a page: a duplicate key straddling the page boundary must be seen
    # (the next page starts after the last key, so it would silently skip the second copy).
    limit = int(page_size) + 1
    first = text(f"SELECT * FROM ({body}) fillgate_src ORDER BY {order} LIMIT {limit}")
    later = text(
        f"SELECT * FROM ({body}) fillgate_src WHERE {_after_clause(quote, key)} "
        f"ORDER BY {order} LIMIT {limit}"
    )
    wanted = set(first._bindparams)
    base = {k: v for k, v in (params or {}).items() if k in wanted}
    unbound = wanted - set(base)
    if unbound:
        raise JobError(
            f"the job's source uses :{', :'.join(sorted(unbound))} but the job has no such "
            "parameter(s); declare them in params."
        )
    stmt, bind = first, base
    last_key: tuple[Any, ...] | None = None
    while True:
        rows = [dict(r) for r in conn.execute(stmt, bind).mappings()]
        if not rows:
            return
        if last_key is None:
            absent = [k for k in key if k not in rows[0]]
            if absent:
                raise JobError(
                    f"the job's source does not select the key column(s) {', '.join(absent)}."
                )
        for row in rows:
            row_key = tuple(row[k] for k in key)
            if row_key == last_key:
                raise KeyNotUniqueError(
                    f"the job's source returns key {encode_key(row_key)} more than once; "
                    "a key must identify one row (check joins in the source)."
                )
            last_key = row_key
        yield rows[:page_size]
        if len(rows) <= page_size:
            return
        last_key = tuple(rows[page_size - 1][k] for k in key)
        stmt = later
        bind = {**base, **{f"fillgate_k{i}": v for i, v in enumerate(last_key)}}


# --- writing ----------------------------------------------------------------------------


def apply_changes(conn: Connection, sql: TableSQL, changes: Sequence[Change]) -> BatchOutcome:
    """Compare-and-set every change inside the caller's transaction.

    The fast path runs one ``executemany`` per column; if any row did not match (it changed
    since the plan) or the database rejected a value, that column's group is rolled back to
    a savepoint and redone row by row to tell applied changes from conflicts and errors.
    """
    outcome = BatchOutcome([], [], [])
    groups: dict[str, list[Change]] = {}
    for change in changes:
        groups.setdefault(change.column, []).append(change)
    for column, group in groups.items():
        statement = sql.cas_update(column, exact=all(c.old is None or isinstance(c.old, str) for c in group))
        params = [(c.new, *c.key, c.old) for c in group]
        savepoint = conn.begin_nested()
        try:
            matched = conn.exec_driver_sql(statement, params).rowcount
        except DBAPIError:
            matched = -1
        if matched == len(params):
            savepoint.commit()
            outcome.applied.extend(group)
            continue
        savepoint.rollback()
        _apply_one_by_one(conn, sql, statement, group, params, outcome)
    return outcome


def _apply_one_by_one(
    conn: Connection,
    sql: TableSQL,
    statement: str,
    group: list[Change],
    params: list[tuple[Any, ...]],
    outcome: BatchOutcome,
) -> None:
    for change, param in zip(group, params, strict=True):
        savepoint = conn.begin_nested()
        try:
            matched = conn.exec_driver_sql(statement, param).rowcount
        except DBAPIError as exc:
            savepoint.rollback()
            outcome.errors.append((change, exc.orig or exc))
            continue
        savepoint.commit()
        if matched == 1:
            outcome.applied.append(change)
        else:
            current = conn.exec_driver_sql(sql.select_current(change.column), tuple(change.key)).first()
            outcome.conflicts.append((change, current[0] if current else None, current is not None))


def estimate_rows(engine: Engine, table: str) -> int | None:
    """A cheap row-count estimate for progress bars: catalog statistics, never a COUNT(*)."""
    schema, _, name = table.rpartition(".")
    dialect = engine.dialect.name
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                value = conn.execute(
                    text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
                ).scalar()
                return int(value) if value is not None and value >= 0 else None
            if dialect in ("mysql", "mariadb"):
                value = conn.execute(
                    text("SELECT table_rows FROM information_schema.tables "
                         "WHERE table_schema = COALESCE(:s, DATABASE()) AND table_name = :t"),
                    {"s": schema or None, "t": name},
                ).scalar()
                return int(value) if value is not None else None
            q = conn.dialect.identifier_preparer.quote
            row = conn.exec_driver_sql(f"SELECT min(rowid), max(rowid) FROM {q(name)}").first()
            return int(row[1] - row[0] + 1) if row and row[0] is not None else 0
    except DBAPIError:
        return None
