"""PostgreSQL: column types from ``pg_attribute``; values checked in Python where their
storage is certain, otherwise probed in a session-local temporary table of the column's very
type (``CREATE TEMP TABLE ... AS SELECT col ... WITH NO DATA``)."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from fillgate.backends.base import (
    PROBE,
    Backend,
    ColumnType,
    ProbeSession,
    Unstorable,
    database_reason,
    numeric_rule,
    shown,
)
from fillgate.errors import ConfigError

# the column's type after resolving domains: base type name, its kind and category, typmod
_COLUMNS = """
WITH RECURSIVE cols AS (
    SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS shown, a.attnotnull AS notnull,
           a.atttypid AS tid, a.atttypmod AS tmod, false AS domain, 0 AS depth
    FROM pg_attribute a
    WHERE a.attrelid = CAST(%s AS regclass) AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT c.attnum, c.attname, c.shown, c.notnull OR t.typnotnull, t.typbasetype, t.typtypmod, true, c.depth + 1
    FROM cols c JOIN pg_type t ON t.oid = c.tid
    WHERE t.typtype = 'd'
)
SELECT DISTINCT ON (c.attnum) c.attname, c.shown, c.notnull, c.domain, c.tmod, t.typname, t.typtype,
       t.typcategory,
       CASE WHEN t.typcategory = 'A' THEN format_type(t.oid, NULL)
            ELSE quote_ident(n.nspname) || '.' || quote_ident(t.typname) END,
       current_setting('server_encoding')
FROM cols c JOIN pg_type t ON t.oid = c.tid JOIN pg_namespace n ON n.oid = t.typnamespace
ORDER BY c.attnum, c.depth DESC
"""

# types with no equality operator (xml, json arrays), or one that compares something else (a box's
# "=" compares areas): IS NOT DISTINCT FROM cannot tell whether a stored value is the planned one
_NO_EQUALITY = frozenset({"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})

_FAMILIES = {
    "int2": "integer", "int4": "integer", "int8": "integer",
    "numeric": "numeric", "float4": "float", "float8": "float", "bool": "bool",
    "text": "text", "varchar": "text", "bpchar": "text", "name": "text", "citext": "text",
    "bytea": "bytes", "date": "date", "timestamp": "timestamp", "timestamptz": "timestamptz",
    "time": "time", "timetz": "time", "interval": "interval", "uuid": "uuid", "jsonb": "json",
}
_INT_BITS = {"int2": 16, "int4": 32, "int8": 64}


def _lock_key(name: str) -> int:
    """The advisory lock key of a lock name (advisory locks are per database)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class PostgreSQLBackend(Backend):
    name: ClassVar[str] = "postgresql"
    dialects: ClassVar[tuple[str, ...]] = ("postgresql",)
    drivers: ClassVar[dict[str, tuple[str, str, str]]] = {
        "postgres": ("postgresql+psycopg", "psycopg", "postgres"),
        "postgresql": ("postgresql+psycopg", "psycopg", "postgres"),
    }

    # --- the apply lock: a session advisory lock (per database), gone with its session ---

    def try_session_lock(self, conn: Connection, name: str) -> bool | None:
        return bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _lock_key(name)}).scalar())

    def release_session_lock(self, conn: Connection, name: str) -> None:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)})

    # --- statements ---------------------------------------------------------------------

    def keyset_style(self, dialect: Any) -> str:
        return "row"  # an Index Cond ROW(...) >= ROW(...); the OR-expansion is only a filter here

    def estimate_rows(self, conn: Connection, table: str) -> int | None:
        value = conn.execute(text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:t)"),
                             {"t": table}).scalar()
        return int(value) if value is not None and value >= 0 else None

    # --- pacing -------------------------------------------------------------------------

    def set_batch_timeout(self, conn: Connection, seconds: float) -> None:
        # local to the transaction: it ends with the batch's COMMIT or ROLLBACK
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")

    def is_timeout(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None) or exc
        return getattr(orig, "sqlstate", None) in ("57014", "55P03")  # query_canceled, lock_not_available

    def running_sessions(self, conn: Connection) -> tuple[int, str]:
        value = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()"
        ).scalar()
        return int(value or 0), "active sessions"

    def vacuum_on(self, conn: Connection, table: str) -> str | None:
        row = conn.execute(text(
            "SELECT p.phase, a.query FROM pg_stat_progress_vacuum p LEFT JOIN pg_stat_activity a ON a.pid = p.pid "
            "WHERE p.relid = to_regclass(:t)"
        ), {"t": table}).first()
        if row is None:
            return None
        who = "autovacuum" if str(row[1] or "").startswith("autovacuum:") else "VACUUM"
        return f"{who} running on {table} ({row[0]})"

    def long_transactions(self, conn: Connection, table: str, age_s: float) -> list[str]:
        rows = conn.execute(text(
            "SELECT DISTINCT a.pid, a.usename, a.state, EXTRACT(EPOCH FROM now() - a.xact_start) AS age_s "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.relation = to_regclass(:t) AND l.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL "
            "AND now() - a.xact_start > make_interval(secs => :age) ORDER BY age_s DESC"
        ), {"t": table, "age": age_s}).all()
        return [f"transaction of pid {pid} ({user or 'unknown user'}, {state}) open {float(age):.0f}s"
                for pid, user, state, age in rows]

    def update_group(self, conn: Connection, sql: Any, column: str, group: Sequence[Any],
                     binders: Mapping[str, Callable[[Any], Any]]) -> tuple[int, list[Any] | None] | None:
        """``UPDATE t SET col = u.new FROM unnest(keys, news, olds) WITH ORDINALITY u WHERE
        t.key = u.key AND t.col IS NOT DISTINCT FROM u.old RETURNING u.n, t.col``: one round
        trip for the group; what each row now holds comes back with its position.

        The arrays are cast to each column's *base* type, without its length, precision or
        domain (``character varying``, not ``character varying(7)``): an explicit cast to
        ``varchar(7)`` would silently truncate and one to ``numeric(5,2)`` round, whereas the
        assignment to the column raises on a value too long and what a column rounds comes
        back through ``RETURNING`` (and is then a row error)."""
        casts = []
        for name in (*sql.key, column):
            ctype = sql.column_type(conn, name)
            if ctype is None:
                raise KeyError(name)
            casts.append(ctype.details["cast"])
        q = sql.quote
        names = [f"k{i}" for i in range(len(sql.key))]
        arrays = ", ".join(f"CAST(%b AS {cast}[])" for cast in (*casts, casts[-1]))
        match = " AND ".join(f"t.{q(k)} = u.{n}" for k, n in zip(sql.key, names, strict=True))
        statement = (
            f"UPDATE {sql.q_table} AS t SET {q(column)} = u.new FROM unnest({arrays}) WITH ORDINALITY "
            f"AS u({', '.join(names)}, new, old, n) WHERE {match} AND t.{q(column)} IS NOT DISTINCT FROM u.old "
            f"RETURNING u.n, t.{q(column)}"
        )

        def bound(name: str, value: Any) -> Any:
            bind = binders.get(name)
            return value if bind is None else bind(value)

        if binders:
            params = [[bound(k, c.key[i]) for c in group] for i, k in enumerate(sql.key)]
            params += [[bound(column, c.new) for c in group], [bound(column, c.old) for c in group]]
        else:  # the common case: every value is bound as it is
            params = [[c.key[i] for c in group] for i in range(len(sql.key))]
            params += [[c.new for c in group], [c.old for c in group]]
        stored: list[Any] = [None] * len(group)
        returned = conn.exec_driver_sql(statement, tuple(params)).all()
        for n, value in returned:
            stored[n - 1] = value
        return len(returned), stored

    def append_rows(self, conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # COPY: the fastest way PostgreSQL takes many rows
        with conn.connection.dbapi_connection.cursor() as cursor, cursor.copy(  # type: ignore[union-attr]
            f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)

    def append_new_rows(self, conn: Connection, table: str, columns: Sequence[str],
                        rows: Sequence[Sequence[Any]]) -> None:
        # COPY into a temporary table, then one INSERT that skips the keys already there
        staging = f"fillgate_new_{table}"
        names = ", ".join(columns)
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {staging} (LIKE {table}) ON COMMIT DROP")
        self.append_rows(conn, staging, columns, rows)
        conn.exec_driver_sql(f"INSERT INTO {table} ({names}) SELECT {names} FROM {staging} ON CONFLICT DO NOTHING")
        conn.exec_driver_sql(f"DROP TABLE {staging}")

    def column_types(self, conn: Connection, table: str) -> dict[str, ColumnType]:
        q = conn.dialect.identifier_preparer.quote
        q_table = ".".join(q(part) for part in table.split("."))
        out: dict[str, ColumnType] = {}
        for name, shown_type, notnull, domain, tmod, typname, typtype, category, cast, encoding in (
            conn.exec_driver_sql(_COLUMNS, (q_table,)).all()
        ):
            family = "text" if typtype == "e" else _FAMILIES.get(typname, "any")
            if typname == "json":
                family = "json"
            details: dict[str, Any] = {
                "typname": typname, "cast": cast, "domain": domain, "utf8": encoding == "UTF8",
                "enum": typtype == "e", "array": category == "A",
            }
            if typname in ("varchar", "bpchar") and tmod >= 4:
                details["length"] = tmod - 4
            elif typname == "numeric" and tmod >= 4:
                details["precision"], details["scale"] = ((tmod - 4) >> 16) & 0xFFFF, (tmod - 4) & 0xFFFF
            elif typname in ("timestamp", "timestamptz") and tmod >= 0:
                details["precision"] = tmod
            elif typname in _INT_BITS:
                bits = _INT_BITS[typname]
                details["range"] = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            out[name] = ColumnType(name, shown_type, family, not notnull, details)
        return out

    def unsupported(self, ctype: ColumnType) -> str | None:
        typname = str(ctype.details.get("typname", ""))
        if typname == "json":
            return (f"{ctype.describe()} is of type json, which has no equality operator, so fillgate cannot "
                    "compare-and-set it. Use jsonb.")
        if typname.lstrip("_") in _NO_EQUALITY:
            return (f"{ctype.describe()} is of type {typname.lstrip('_')}, which has no equality operator (or one "
                    "that compares areas), so fillgate cannot compare-and-set it (an apply would fail, or miss a "
                    "change made since the plan). Write it with a column of another type.")
        return None

    def accept(self, ctype: ColumnType, value: Any) -> Any:
        bound = super().accept(ctype, value)
        if ctype.family == "time" and type(bound) is not Unstorable:
            wants_tz = ctype.details.get("typname") == "timetz"
            if (bound.tzinfo is not None) != wants_tz:
                kind = "an aware" if wants_tz else "a naive"
                return Unstorable(f"{ctype.describe()} takes {kind} datetime.time; the job proposed {shown(bound)}.")
        return bound

    def exact_form(self, ctype: ColumnType, value: Any) -> Any:
        d = ctype.details
        if d["domain"]:
            return PROBE  # its CHECK constraints decide
        family = ctype.family
        if family == "text":
            if d["enum"] or not d["utf8"] or d["typname"] not in ("text", "varchar", "bpchar", "citext"):
                return PROBE
            if "\x00" in value:
                return Unstorable(f"{ctype.describe()} cannot hold {shown(value)}: PostgreSQL text cannot contain NUL "
                                  "(\\x00) characters.")
            length = d.get("length")
            if length is None or len(value) == length or (len(value) < length and d["typname"] == "varchar"):
                return value
            if len(value) > length:
                return Unstorable(f"{ctype.describe()} cannot hold {shown(value)}: it is {len(value)} characters long, "
                                  f"more than {length}.")
            return Unstorable(f"{ctype.describe()} would store {shown(value.ljust(length))} (padded with spaces to "
                              f"{length} characters) for {shown(value)}; propose the padded value.")
        if family == "integer":
            low, high = d["range"]
            if low <= value <= high:
                return value
            return Unstorable(f"{ctype.describe()} cannot hold {value}: out of range ({low} to {high}).")
        if family == "numeric":
            return numeric_rule(ctype, ctype.details.get("precision"), ctype.details.get("scale"))(value)
        if family == "float":
            if d["typname"] != "float8":
                return PROBE
            if type(value) is int:
                try:
                    as_float = float(value)
                except OverflowError:
                    return Unstorable(f"{ctype.describe()} cannot hold {value}: out of range.")
                if as_float != value:
                    return Unstorable(f"{ctype.describe()} would store {shown(as_float)} for {value}.")
                return as_float
            return value
        if family in ("timestamp", "timestamptz"):
            precision = d.get("precision")
            if precision is None or precision >= 6 or value.microsecond % 10 ** (6 - precision) == 0:
                return value
            return Unstorable(
                f"{ctype.describe()} keeps {precision} fractional digits of a second, and {shown(value)} has more: "
                "the database would round it."
            )
        if family in ("bool", "bytes", "date", "uuid"):
            return value
        return PROBE

    def fast_path(self, ctype: ColumnType) -> Callable[[Any], Any] | None:
        d = ctype.details
        if d["domain"]:
            return None
        family, typname = ctype.family, d["typname"]
        if family == "text" and not d["enum"] and d["utf8"] and typname in ("text", "varchar", "bpchar", "citext"):
            length = d.get("length")
            if length is None:
                return lambda v: v if type(v) is str and v.isascii() and "\x00" not in v else PROBE
            if typname == "varchar":
                return lambda v: v if type(v) is str and len(v) <= length and v.isascii() and "\x00" not in v \
                    else PROBE
            return lambda v: v if type(v) is str and len(v) == length and v.isascii() and "\x00" not in v else PROBE
        if family == "integer":
            low, high = d["range"]
            return lambda v: v if type(v) is int and low <= v <= high else PROBE
        if family == "numeric":
            rule = numeric_rule(ctype, ctype.details.get("precision"), ctype.details.get("scale"))
            return lambda v: rule(v) if type(v) is decimal.Decimal or type(v) is int else PROBE
        if typname == "float8":
            return lambda v: v if type(v) is float else PROBE
        kinds = {"bool": bool, "date": dt.date, "bytea": bytes, "uuid": uuid.UUID}
        if typname in kinds:
            kind = kinds[typname]
            return lambda v: v if type(v) is kind else PROBE
        if family in ("timestamp", "timestamptz"):
            aware = family == "timestamptz"
            precision = d.get("precision")
            step = 1 if precision is None or precision >= 6 else 10 ** (6 - precision)
            return lambda v: v if type(v) is dt.datetime and (v.tzinfo is not None) == aware and \
                v.microsecond % step == 0 else PROBE
        return None

    def bind(self, ctype: ColumnType) -> Callable[[Any], Any] | None:
        if ctype.details.get("typname") == "jsonb":
            from psycopg.types.json import Jsonb

            return lambda v: v if v is None else Jsonb(v)
        return None

    def probe_session(self, engine: Engine, table: str) -> ProbeSession:
        return _Probe(engine, table)

    def probe(self, session: ProbeSession, ctype: ColumnType, values: Sequence[Any]) -> list[Any]:
        assert isinstance(session, _Probe)
        return session.probe(ctype, values, self.bind(ctype))


class _Probe(ProbeSession):
    """One connection with one temporary table per probed column; every probe's rows are
    rolled back, and the tables are dropped at the end (or die with the session)."""

    def __init__(self, engine: Engine, table: str) -> None:
        self.conn = engine.connect()
        self.table = table
        self.tables: dict[str, str] = {}
        self.prefix = f"fillgate_probe_{uuid.uuid4().hex[:12]}"

    def _table_for(self, ctype: ColumnType) -> str:
        name = self.tables.get(ctype.column)
        if name is None:
            q = self.conn.dialect.identifier_preparer.quote
            q_table = ".".join(q(part) for part in self.table.split("."))
            name = f"{self.prefix}_{len(self.tables)}"
            try:
                self.conn.exec_driver_sql(
                    f"CREATE TEMP TABLE {name} AS SELECT 0::int AS fillgate_n, {q(ctype.column)} AS v FROM {q_table} "
                    "WITH NO DATA"
                )
                self.conn.commit()
            except DBAPIError as exc:
                self.conn.rollback()
                reason = database_reason(exc)
                raise ConfigError(
                    "fillgate checks proposed values against the column's type in a temporary table, and could "
                    f"not create one ({reason}). Grant the role TEMPORARY on the database."
                ) from None
            self.tables[ctype.column] = name
        return name

    def probe(self, ctype: ColumnType, values: Sequence[Any], bind: Callable[[Any], Any] | None) -> list[Any]:
        name = self._table_for(ctype)
        conn = self.conn
        bound = [bind(v) for v in values] if bind else list(values)
        out: list[Any] = [None] * len(values)
        try:
            if ctype.details["array"]:
                raise ValueError("array columns are probed value by value")
            savepoint = conn.begin_nested()
            try:
                rows = conn.exec_driver_sql(
                    f"INSERT INTO {name} (fillgate_n, v) SELECT u.n, u.v FROM "
                    f"unnest(CAST(%b AS {ctype.details['cast']}[])) WITH ORDINALITY AS u(v, n) RETURNING fillgate_n, v",
                    (bound,),
                ).all()
            except BaseException:
                savepoint.rollback()
                raise
            savepoint.commit()
            for n, stored in rows:
                out[n - 1] = stored
        except (DBAPIError, TypeError, ValueError, OverflowError):
            out = [self._one(name, ctype, value, b) for value, b in zip(values, bound, strict=True)]
        finally:
            conn.rollback()
        return out

    def _one(self, name: str, ctype: ColumnType, value: Any, bound: Any) -> Any:
        savepoint = self.conn.begin_nested()
        try:
            insert = f"INSERT INTO {name} (fillgate_n, v) VALUES (0, %s) RETURNING v"
            stored = self.conn.exec_driver_sql(insert, (bound,)).scalar()
        except (DBAPIError, TypeError, ValueError, OverflowError) as exc:
            savepoint.rollback()
            reason = database_reason(exc)
            return Unstorable(f"{ctype.describe()} cannot hold {shown(value)}: the database refuses it ({reason}).")
        savepoint.commit()
        return stored

    def close(self) -> None:
        conn = self.conn
        try:
            conn.rollback()
            for name in self.tables.values():
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
            conn.commit()
        except Exception:
            # the pool must not hand out a session holding our tables: ending the session drops
            # them; closing never hides the error that ended the plan
            conn.invalidate()
        finally:
            conn.close()
