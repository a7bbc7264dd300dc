"""MariaDB and MySQL: column types from ``information_schema.columns`` (``COLUMN_TYPE`` and
the character set); integers checked in Python, every other value probed in a session-local
``TEMPORARY`` table whose column is declared exactly like the user's (type, length, precision,
character set and collation), in the server's own SQL mode."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import math
import re
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

_FAMILIES = {
    "tinyint": "integer", "smallint": "integer", "mediumint": "integer", "int": "integer",
    "integer": "integer", "bigint": "integer", "year": "integer",
    "decimal": "numeric", "numeric": "numeric", "float": "float", "double": "float", "real": "float",
    "char": "text", "varchar": "text", "tinytext": "text", "text": "text", "mediumtext": "text",
    "longtext": "text", "enum": "text", "set": "text", "json": "text",
    "binary": "bytes", "varbinary": "bytes", "tinyblob": "bytes", "blob": "bytes", "mediumblob": "bytes",
    "longblob": "bytes",
    "date": "date", "datetime": "timestamp", "timestamp": "timestamp", "time": "time",
}
_INT_BITS = {"tinyint": 8, "smallint": 16, "mediumint": 24, "int": 32, "integer": 32, "bigint": 64}
_TEXT_BYTES = {"tinytext": 255, "text": 65535, "mediumtext": 16777215, "longtext": 4294967295}
# character sets that store every ASCII string exactly
_ASCII_SAFE = {"utf8mb4", "utf8mb3", "utf8", "latin1", "ascii"}
_SIZE = re.compile(r"\((\d+)(?:,(\d+))?\)")


def _lock_name(conn: Connection, name: str) -> str:
    """GET_LOCK names are server-wide (PostgreSQL's advisory locks are per database): the
    database is part of the name, so applies on two databases of one server never block
    each other."""
    scoped = hashlib.sha256(f"{conn.engine.url.database}\0{name}".encode()).hexdigest()
    return "fillgate:" + scoped[:48]


class MySQLBackend(Backend):
    name: ClassVar[str] = "mysql"
    dialects: ClassVar[tuple[str, ...]] = ("mysql", "mariadb")
    drivers: ClassVar[dict[str, tuple[str, str, str]]] = {
        "mysql": ("mysql+pymysql", "pymysql", "mysql"),
        "mariadb": ("mariadb+pymysql", "pymysql", "mysql"),
    }
    bools_as_ints: ClassVar[bool] = True  # BOOLEAN is TINYINT(1)
    accepts: ClassVar[dict[str, tuple[type, ...]]] = {
        **Backend.accepts,
        "time": (dt.time, dt.timedelta),  # the driver reads TIME as a timedelta
    }

    # --- the apply lock: GET_LOCK, gone with its session ---------------------------------

    def try_session_lock(self, conn: Connection, name: str) -> bool | None:
        return bool(conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": _lock_name(conn, name)}).scalar())

    def release_session_lock(self, conn: Connection, name: str) -> None:
        conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": _lock_name(conn, name)})

    # --- statements ---------------------------------------------------------------------

    def null_safe_equal(self, column: str, mark: str, exact: bool = False) -> str:
        if exact:  # both sides as utf8mb4 bytes, whatever the column's character set
            return f"CAST(CONVERT({column} USING utf8mb4) AS BINARY) <=> CAST(CONVERT({mark} USING utf8mb4) AS BINARY)"
        return f"{column} <=> {mark}"

    def compares_text_by_collation(self) -> bool:
        return True

    def append_new_rows(self, conn: Connection, table: str, columns: Sequence[str],
                        rows: Sequence[Sequence[Any]]) -> None:
        conn.exec_driver_sql(  # fillgate's own integer rows: IGNORE skips only the duplicate keys
            f"INSERT IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
            list(rows),
        )

    def update_group(self, conn: Connection, sql: Any, column: str, group: Sequence[Any],
                     binders: Mapping[str, Callable[[Any], Any]]) -> tuple[int, list[Any] | None] | None:
        """``UPDATE t JOIN (SELECT k, new, old UNION ALL ...) AS j ON t.key = j.k SET t.col =
        j.new WHERE t.col <=> j.old``: one statement (one round trip) for the group, where
        PyMySQL's executemany sends one UPDATE per row. bench/bench_backfill.py measured it
        about 20x faster than executemany on MariaDB 10.11 (JSON_TABLE about the same, but it
        needs each value's SQL type spelled out).

        The derived table's columns take one type across the group's rows, so only groups whose
        keys and values are each all text or all integers (or NULL) go this way, and at most
        4 MB of values (the statement must fit in max_allowed_packet); what each row holds
        afterwards is read back by the caller, as for executemany."""
        if binders:
            return None
        rows = [(*change.key, change.new, change.old) for change in group]
        size = 0
        for position in range(len(rows[0]) if rows else 0):
            kinds = {type(row[position]) for row in rows} - {type(None)}
            if len(kinds) > 1 or not kinds <= {int, str}:
                return None
            if str in kinds:
                size += sum(len(row[position]) for row in rows if row[position] is not None)
        if not rows or size > 4_000_000:
            return None
        q, t = sql.quote, sql.q_table
        names = [f"fillgate_k{i}" for i in range(len(sql.key))]
        first = ", ".join(f"%s AS {n}" for n in (*names, "fillgate_new", "fillgate_old"))
        later = ", ".join(["%s"] * (len(names) + 2))
        derived = " UNION ALL ".join([f"SELECT {first}", *[f"SELECT {later}"] * (len(rows) - 1)])
        match = " AND ".join(f"t.{q(k)} = j.{n}" for k, n in zip(sql.key, names, strict=True))
        exact = all(row[-1] is None or type(row[-1]) is str for row in rows)
        same = self.null_safe_equal(f"t.{q(column)}", "j.fillgate_old", exact)
        statement = (f"UPDATE {t} AS t JOIN ({derived}) AS j ON {match} SET t.{q(column)} = j.fillgate_new "
                     f"WHERE {same}")
        matched = conn.exec_driver_sql(statement, tuple(value for row in rows for value in row)).rowcount
        if matched != len(rows) or len(sql.key) != 1:
            return matched, None  # the caller reads back what it needs
        return matched, self._stored_after(conn, sql, column, group)

    def _stored_after(self, conn: Connection, sql: Any, column: str, group: Sequence[Any]) -> list[Any]:
        """What the field of each row of the group holds now, read back with ONE ``SELECT key,
        col FROM t WHERE key IN (...)`` in the group's transaction (the generic read-back
        compiles a query per 500 keys through SQLAlchemy: on 50,000 changes it took 1.3 s of
        an apply's 2.1 s of CPU). The values are the driver's, as the generic read-back gets
        them; a row not found counts as holding what was planned, as there."""
        q, t, key = sql.quote, sql.q_table, sql.key[0]
        keys = [change.key[0] for change in group]
        found: dict[Any, Any] = dict(conn.exec_driver_sql(
            f"SELECT {q(key)}, {q(column)} FROM {t} WHERE {q(key)} IN ({', '.join(['%s'] * len(keys))})",
            tuple(keys),
        ).all())
        return [found.get(change.key[0], change.new) for change in group]

    def estimate_rows(self, conn: Connection, table: str) -> int | None:
        schema, _, name = table.rpartition(".")
        value = conn.execute(text("SELECT table_rows FROM information_schema.tables "
                                  "WHERE table_schema = COALESCE(:s, DATABASE()) AND table_name = :t"),
                             {"s": schema or None, "t": name}).scalar()
        return int(value) if value is not None else None

    # --- pacing -------------------------------------------------------------------------

    def set_batch_timeout(self, conn: Connection, seconds: float) -> None:
        """MariaDB: ``max_statement_time`` (lock waits included); MySQL: only lock waits can be
        bounded for an UPDATE (``innodb_lock_wait_timeout``, whole seconds)."""
        if conn.dialect.is_mariadb:  # type: ignore[attr-defined]
            conn.exec_driver_sql(f"SET SESSION max_statement_time = {max(seconds, 0.001):.3f}")
        else:
            conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(seconds))}")

    def clear_batch_timeout(self, conn: Connection) -> None:
        if conn.dialect.is_mariadb:  # type: ignore[attr-defined]
            conn.exec_driver_sql("SET SESSION max_statement_time = DEFAULT")
        else:
            conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")

    def is_timeout(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None) or exc
        args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
        # 1969: max_statement_time exceeded (MariaDB); 1205: lock wait timeout; 3024: max_execution_time
        return len(args) > 0 and args[0] in (1969, 1205, 3024)

    def trial_refusal(self, conn: Connection, table: str) -> str | None:
        schema, _, name = table.rpartition(".")
        where = "table_schema = COALESCE(:s, DATABASE()) AND "
        engine = conn.execute(text(f"SELECT engine FROM information_schema.tables WHERE {where} table_name = :t"),
                              {"s": schema or None, "t": name}).scalar()
        if engine is not None and str(engine).lower() not in ("innodb", "xtradb"):
            return f"{table} uses the {engine} engine, which a rollback does not undo"
        triggers = conn.execute(text(f"SELECT count(*) FROM information_schema.triggers WHERE "
                                     f"{where.replace('table_schema', 'event_object_schema')} event_object_table = :t"),
                                {"s": schema or None, "t": name}).scalar()
        if triggers:
            return f"{table} has triggers, which may write to tables a rollback does not undo"
        return None

    def replication_lag_check(self, max_lag_s: float, replicas: Sequence[Any]) -> Any:
        from fillgate.contrib.mysql import ReplicaLagCheck

        return ReplicaLagCheck(max_lag_s, replicas)

    def running_sessions(self, conn: Connection) -> tuple[int, str]:
        row = conn.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Threads_running'").first()
        return int(row[1]) if row is not None else 0, "Threads_running"

    def long_transactions(self, conn: Connection, table: str, age_s: float) -> list[str]:
        """InnoDB does not say which tables a transaction holds locks on: every other
        transaction that has locked rows or tables and is older than ``age_s`` counts."""
        rows = conn.execute(text(
            "SELECT trx_mysql_thread_id, trx_state, TIMESTAMPDIFF(SECOND, trx_started, NOW()) AS age_s, "
            "trx_rows_locked, trx_tables_locked FROM information_schema.innodb_trx "
            "WHERE trx_mysql_thread_id <> CONNECTION_ID() AND trx_started < NOW() - INTERVAL :age SECOND "
            "AND (trx_rows_locked > 0 OR trx_tables_locked > 0) ORDER BY trx_started"
        ), {"age": age_s}).all()
        return [f"transaction of thread {thread} ({state}) open {age}s with {rows_locked} rows locked"
                for thread, state, age, rows_locked, _tables in rows]

    # --- values -------------------------------------------------------------------------

    def column_types(self, conn: Connection, table: str) -> dict[str, ColumnType]:
        schema, _, name = table.rpartition(".")
        sql_mode = str(conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar() or "")
        rows = conn.exec_driver_sql(
            "SELECT column_name, data_type, column_type, character_set_name, collation_name, is_nullable "
            "FROM information_schema.columns WHERE table_schema = COALESCE(%s, DATABASE()) AND table_name = %s "
            "ORDER BY ordinal_position",
            (schema or None, name),
        ).all()
        checks: dict[str, list[str]] = {}
        for checked, clause in _column_checks(conn, schema, name):
            checks.setdefault(checked, []).append(clause)
        out: dict[str, ColumnType] = {}
        for column, data_type, column_type, charset, collation, nullable in rows:
            data_type = str(data_type).lower()
            details: dict[str, Any] = {"column_type": column_type, "charset": charset, "collation": collation,
                                       "data_type": data_type, "sql_mode": sql_mode, "checks": checks.get(column, [])}
            size = _SIZE.search(str(column_type))
            if size is not None:
                details["size"] = (int(size.group(1)), int(size.group(2)) if size.group(2) else None)
            bits = _INT_BITS.get(data_type)
            if bits is not None:
                if "unsigned" in str(column_type).lower():
                    details["range"] = (0, 2 ** bits - 1)
                else:
                    details["range"] = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            out[column] = ColumnType(column, column_type, _FAMILIES.get(data_type, "any"), nullable == "YES", details)
        return out

    def exact_form(self, ctype: ColumnType, value: Any) -> Any:
        if type(value) is float and not math.isfinite(value):
            what = "NaN" if value != value else "an infinity"
            return Unstorable(f"{ctype.describe()} cannot hold {shown(value)}: MariaDB and MySQL cannot store {what}.")
        limits = ctype.details.get("range")
        if limits is None or type(value) is not int:
            return PROBE
        low, high = limits
        if low <= value <= high:
            return PROBE if ctype.details.get("checks") else value
        return Unstorable(f"{ctype.describe()} cannot hold {value}: out of range ({low} to {high}).")

    def fast_path(self, ctype: ColumnType) -> Callable[[Any], Any] | None:
        """Integers in range; ASCII text that fits (CHAR drops trailing spaces: probed); DECIMAL
        by its precision and scale; DATETIME and DATE in range with the fractions the column
        keeps. Everything else is probed."""
        d = ctype.details
        if d.get("checks"):  # a CHECK constraint decides too: probe every value
            return None
        limits = d.get("range")
        if limits is not None:
            low, high = limits
            return lambda v: v if type(v) is int and low <= v <= high else PROBE
        data_type, size, unsigned = d["data_type"], d.get("size"), "unsigned" in str(d["column_type"]).lower()
        if data_type in ("varchar", "char", *_TEXT_BYTES) and str(d.get("charset")).lower() in _ASCII_SAFE:
            if data_type == "char" and "PAD_CHAR_TO_FULL_LENGTH" in d["sql_mode"]:
                return None
            limit = _TEXT_BYTES.get(data_type) or (size[0] if size else 1)
            if data_type == "char":
                return lambda v: v if type(v) is str and len(v) <= limit and v.isascii() and not v.endswith(" ") \
                    else PROBE
            return lambda v: v if type(v) is str and len(v) <= limit and v.isascii() else PROBE
        if data_type in ("decimal", "numeric") and size is not None and not unsigned:
            rule = numeric_rule(ctype, size[0], size[1] or 0)
            return lambda v: rule(v) if type(v) is decimal.Decimal or type(v) is int else PROBE
        if data_type == "datetime":
            step = 10 ** (6 - (size[0] if size else 0))
            return lambda v: v if type(v) is dt.datetime and v.tzinfo is None and v.year >= 1000 and \
                v.microsecond % step == 0 else PROBE
        if data_type == "date":
            return lambda v: v if type(v) is dt.date and v.year >= 1000 else PROBE
        return None

    def represents(self, ctype: ColumnType, proposed: Any, stored: Any) -> bool:
        if isinstance(proposed, dt.time) and isinstance(stored, dt.timedelta):
            return proposed.tzinfo is None and stored == dt.timedelta(
                hours=proposed.hour, minutes=proposed.minute, seconds=proposed.second,
                microseconds=proposed.microsecond,
            )
        return super().represents(ctype, proposed, stored)

    def probe_session(self, engine: Engine, table: str) -> ProbeSession:
        return _Probe(engine)

    def probe(self, session: ProbeSession, ctype: ColumnType, values: Sequence[Any]) -> list[Any]:
        assert isinstance(session, _Probe)
        return session.probe(ctype, values)


def _column_checks(conn: Connection, schema: str, table: str) -> list[tuple[str, str]]:
    """MariaDB's column-level CHECK constraints of ``table`` (its JSON columns are LONGTEXT with
    ``CHECK (json_valid(col))``): (column, clause). Probes carry them, so a value they refuse is a
    plan row error, not an apply error. MySQL has no column-level checks: none."""
    try:
        rows = conn.exec_driver_sql(
            "SELECT constraint_name, check_clause FROM information_schema.check_constraints "
            "WHERE constraint_schema = COALESCE(%s, DATABASE()) AND table_name = %s AND level = 'Column'",
            (schema or None, table),
        ).all()
    except DBAPIError:  # MySQL: no LEVEL column (its checks are table-level)
        return []
    return [(str(column), str(clause)) for column, clause in rows]


class _Probe(ProbeSession):
    """One connection with one ``TEMPORARY`` InnoDB table per probed column; every probe's
    rows are rolled back, and the tables are dropped at the end (or die with the session)."""

    def __init__(self, engine: Engine) -> None:
        self.conn = engine.connect()
        self.tables: dict[str, str] = {}
        self.prefix = f"fillgate_probe_{uuid.uuid4().hex[:12]}"

    def _table_for(self, ctype: ColumnType) -> str:
        name = self.tables.get(ctype.column)
        if name is None:
            name = f"{self.prefix}_{len(self.tables)}"
            d = ctype.details
            charset = f" CHARACTER SET {d['charset']} COLLATE {d['collation']}" if d.get("charset") else ""
            checks = "".join(f" CHECK ({clause})" for clause in d.get("checks", ()))
            try:
                column = self.conn.dialect.identifier_preparer.quote(ctype.column)
                self.conn.exec_driver_sql(  # the column keeps its name: the server's messages name it
                    f"CREATE TEMPORARY TABLE {name} (fillgate_n INT NOT NULL, {column} {d['column_type']}{charset} "
                    f"NULL{checks}) ENGINE=InnoDB"
                )
                self.conn.commit()
            except DBAPIError as exc:
                self.conn.rollback()
                reason = database_reason(exc)
                raise ConfigError(
                    "fillgate checks proposed values against the column's type in a temporary table, and could "
                    f"not create one ({reason}). Grant the role CREATE TEMPORARY TABLES on the database."
                ) from None
            self.tables[ctype.column] = name
        return name

    def probe(self, ctype: ColumnType, values: Sequence[Any]) -> list[Any]:
        name = self._table_for(ctype)
        conn = self.conn
        out: list[Any] = [None] * len(values)
        column = conn.dialect.identifier_preparer.quote(ctype.column)
        insert = f"INSERT INTO {name} (fillgate_n, {column}) VALUES (%s, %s)"
        try:
            try:
                conn.exec_driver_sql(insert, [(i, v) for i, v in enumerate(values)])
            except (DBAPIError, TypeError, ValueError, OverflowError):
                conn.rollback()
                for i, value in enumerate(values):  # a failed statement changes nothing: no savepoint needed
                    try:
                        conn.exec_driver_sql(insert, (i, value))
                    except (DBAPIError, TypeError, ValueError, OverflowError) as exc:
                        reason = database_reason(exc)
                        out[i] = Unstorable(
                            f"{ctype.describe()} cannot hold {shown(value)}: the database refuses it ({reason})."
                        )
            for n, stored in conn.exec_driver_sql(f"SELECT fillgate_n, {column} FROM {name}").all():
                out[n] = stored
        finally:
            conn.rollback()
        return out

    def close(self) -> None:
        conn = self.conn
        try:
            conn.rollback()
            for name in self.tables.values():
                conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {name}")
            conn.commit()
        except Exception:
            # the pool must not hand out a session holding our tables: ending the session drops
            # them; closing never hides the error that ended the plan
            conn.invalidate()
        finally:
            conn.close()

