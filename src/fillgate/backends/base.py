"""What every backend provides, and the parts they share.

A backend is one database family (SQLite, PostgreSQL, MariaDB/MySQL). Adding a backend means
adding one module here with a :class:`Backend` subclass (the pattern of Alembic's per-dialect
implementations); every difference between databases lives in these classes:

- connecting: the driver a URL gets, engine options, whether a database is a file;
- the apply lock: a session lock (PostgreSQL advisory locks, MySQL ``GET_LOCK``) or none;
- statements: the null-safe comparison of compare-and-set, how keyset paging says "after this
  key" so the key's index is read as a range, a set-based update of a whole group, whether
  stored values are read back, appending many ledger rows, cheap row-count estimates;
- values: the types of a table's columns and the *storage form* of a value: what the database
  stores, and returns on a read, when fillgate writes that value into that column, or why it
  cannot store it exactly.

Storage forms are worked out per plan by a :class:`ValueChecker`, in three steps per value:

1. the **type check** (Python): the value's type must belong to the column's family (an
   ``int`` for an integer column, a naive ``datetime`` for a timestamp without time zone, …);
   no silent casts;
2. the **exact form**: where Python knows for sure what the column stores (a ``str`` of at
   most n characters for ``varchar(n)``, an ``int`` in range for ``bigint``), that is it;
3. otherwise the **probe**: the backend asks the database itself, by writing the page's
   distinct values into a scratch column of the very same type (a session-local temporary
   table, or an in-memory SQLite table) and reading them back. A value the database rejects,
   or reads back as something else (rounded, truncated, padded, converted), cannot be stored
   exactly.

A value that cannot be stored exactly comes back as :class:`Unstorable` with the reason; the
planner makes it a row error, so nothing of that row is written.
"""

from __future__ import annotations

import datetime as dt
import decimal
import operator
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy.engine import Connection, Engine

from fillgate.values import in_words

# The families a column's type belongs to, and what a proposal for each must be.
FAMILY_WANTS: dict[str, str] = {
    "integer": "an int",
    "numeric": "an int or a decimal.Decimal",
    "float": "a float or an int",
    "bool": "a bool",
    "text": "a str",
    "bytes": "bytes",
    "date": "a datetime.date",
    "timestamp": "a naive datetime.datetime (no tzinfo)",
    "timestamptz": "an aware datetime.datetime (with tzinfo)",
    "time": "a datetime.time",
    "interval": "a datetime.timedelta",
    "uuid": "a uuid.UUID",
    "json": "a dict, list, str, int, float or bool",
    "any": "a value the driver can store",
}

PROBE: Any = object()
"""Returned by :meth:`Backend.exact_form` when only the database can tell."""


@dataclass(frozen=True)
class Unstorable:
    """A value the column cannot hold exactly, and why (a complete sentence fragment)."""

    reason: str


@dataclass(frozen=True)
class ColumnType:
    """One column's type as fillgate reasons about it."""

    column: str
    type: str  # as the database spells it: 'character varying(7)', 'varchar(7)', 'DATETIME'
    family: str  # a key of FAMILY_WANTS
    nullable: bool = True
    # backend specifics: PostgreSQL the cast type, typmod and kind; SQLite affinity and STRICT;
    # MySQL the integer range; …
    details: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"column {self.column!r} ({self.type})"


def shown(value: Any) -> str:
    """A value as a message shows it: as the database would show it, whole (values are never
    cut), a string quoted (``values.in_words``)."""
    return in_words(value)


def _is_nan(value: Any) -> bool:
    if type(value) is float:
        return value != value
    if isinstance(value, decimal.Decimal):
        return value.is_nan()
    return False


def same_value(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same value: ``==`` without its cross-type surprises (True is
    not 1, 'a' is not b'a', a naive datetime is not an aware one), NaN equal to NaN, and
    containers compared element by element the same way."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(same_value(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple):
        return (isinstance(b, list | tuple) and len(a) == len(b)
                and all(map(same_value, a, b)))
    if _is_nan(a) or _is_nan(b):
        return _is_nan(a) and _is_nan(b)
    numbers = (int, float, decimal.Decimal)
    if isinstance(a, numbers) and isinstance(b, numbers):
        try:
            return bool(a == b)
        except (decimal.InvalidOperation, TypeError):
            return False
    if isinstance(a, dt.datetime) or isinstance(b, dt.datetime):
        return (isinstance(a, dt.datetime) and isinstance(b, dt.datetime)
                and (a.tzinfo is None) == (b.tzinfo is None) and a == b)
    if isinstance(a, str | bytes | bytearray | memoryview) or isinstance(b, str | bytes | bytearray | memoryview):
        if isinstance(a, str) != isinstance(b, str):
            return False
        return bool(a == b) if isinstance(a, str) else bytes(a) == bytes(b)
    try:
        return ta is tb and bool(a == b)
    except Exception:
        return False


def utf8_error(text: str) -> str | None:
    """Why ``text`` cannot be sent as UTF-8 (a lone surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"it holds {text[exc.start]!r} at position {exc.start}, which is not valid Unicode text"
    return None


def database_reason(exc: BaseException) -> str:
    """The database's (or the driver's) own words for why it refused a value."""
    orig = getattr(exc, "orig", None) or exc
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):  # PyMySQL: (code, message)
        return args[1]
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def type_name(value: Any) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module in ("builtins", "") else f"{module}.{kind.__qualname__}"


WRITES = "fillgate_writes"
"""The execution option of a connection whose transaction will write (``database.write_transaction``)."""


def placeholder(dialect: Any) -> str:
    """The driver's parameter mark in raw SQL (``?`` for qmark drivers, else ``%s``)."""
    return "?" if dialect.paramstyle == "qmark" else "%s"


class Backend:
    """One database family. Subclasses set ``name`` and ``dialects`` and implement the
    column reflection, the exact forms they know and the probe, and override the defaults
    below where their database differs."""

    name: ClassVar[str] = "base"
    dialects: ClassVar[tuple[str, ...]] = ()
    # URL schemes (``postgresql://``) -> (SQLAlchemy driver name, Python module, extra to install)
    drivers: ClassVar[dict[str, tuple[str, str, str]]] = {}
    # whether apply reads back what it stored (a database that may store something else than
    # it is given: a column type, a trigger)
    reads_back: ClassVar[bool] = True

    # --- connecting ---------------------------------------------------------------------

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for ``create_engine``."""
        return {"pool_pre_ping": True, "pool_size": 5, "max_overflow": 5}

    def prepare_engine(self, engine: Engine) -> None:
        """Set up a new engine (event listeners and the like)."""

    def missing_file(self, url: Any) -> Path | None:
        """The file of a file database that does not exist yet (connecting would create it)."""
        return None

    def check_connection(self, conn: Connection) -> None:
        """After connecting: fail now if the database cannot be used (a file that is not one)."""

    # --- the apply lock -----------------------------------------------------------------

    def try_session_lock(self, conn: Connection, name: str) -> bool | None:
        """Take the session lock ``name`` on ``conn`` (an AUTOCOMMIT connection held for the
        lock's lifetime): True if taken, False if another session holds it, None if this
        database has no session locks (the lock is then a row with a heartbeat)."""
        return None

    def release_session_lock(self, conn: Connection, name: str) -> None:
        raise NotImplementedError

    # --- statements ---------------------------------------------------------------------

    def null_safe_equal(self, column: str, mark: str, exact: bool = False) -> str:
        """``column`` equals the parameter, NULL equal to NULL; ``exact``: the values are text,
        compared byte for byte (not by collation)."""
        return f"{column} IS NOT DISTINCT FROM {mark}"

    def compares_text_by_collation(self) -> bool:
        """Whether ``=`` on text follows the collation ('a' = 'A' = 'a '): then compare-and-set
        of text must compare bytes, so that a change of case since the plan is a conflict."""
        return False

    def keyset_style(self, dialect: Any) -> str:
        """How keyset paging says "after this key" so the database reads the key's index as a
        range: ``"row"`` for a row-value comparison ``(k1, k2) > (:a, :b)``, ``"nested"`` for
        ``k1 > :a OR (k1 = :a AND k2 > :b)`` (bench/bench_keyset.py measures both)."""
        return "nested"

    def estimate_rows(self, conn: Connection, table: str) -> int | None:
        """A cheap row-count estimate for progress bars (catalog statistics, never a COUNT)."""
        return None

    def update_group(self, conn: Connection, sql: Any, column: str, group: Sequence[Any],
                     binders: Mapping[str, Callable[[Any], Any]]) -> tuple[int, list[Any] | None] | None:
        """Compare-and-set a whole group of updates of ``column`` in one statement: how many
        rows matched, and what each row of the group holds afterwards (None where it did not
        match; the whole list None: not known, the caller reads it back where the backend reads
        back); or None when this backend has no such statement for this group (the group then
        runs as one executemany)."""
        return None

    def append_rows(self, conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Append many rows to one of fillgate's own tables, in the caller's transaction."""
        mark = placeholder(conn.dialect)
        conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))})", list(rows)
        )

    def append_new_rows(self, conn: Connection, table: str, columns: Sequence[str],
                        rows: Sequence[Sequence[Any]]) -> None:
        """Append rows to one of fillgate's own tables, in the caller's transaction, skipping
        each row whose primary key the table holds already (another session wrote it)."""
        mark = placeholder(conn.dialect)
        conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))}) "
            "ON CONFLICT DO NOTHING", list(rows)
        )

    def ledger_time(self, value: dt.datetime) -> Any:
        """A naive UTC timestamp as the ledger's timestamp columns are given it."""
        return value

    # --- pacing: batch timeouts, trial batches, health ------------------------------------

    def set_batch_timeout(self, conn: Connection, seconds: float) -> None:
        """Bound the statements of the batch transaction begun on ``conn``: a statement still
        running after ``seconds`` is cancelled with an error that :meth:`is_timeout` knows."""

    def clear_batch_timeout(self, conn: Connection) -> None:
        """Undo :meth:`set_batch_timeout` once the batch's transaction has ended."""

    def is_timeout(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the batch timeout (or a lock wait timeout) cancelling a statement."""
        return False

    def trial_refusal(self, conn: Connection, table: str) -> str | None:
        """Why a rolled-back trial batch on ``table`` might leave a trace (a table a rollback
        does not reach), or None when a rollback undoes it whole."""
        return None

    def replication_lag_check(self, max_lag_s: float, replicas: Sequence[Any]) -> Any:
        """The health check of ``--max-replication-lag`` (``replicas``: the URLs the target's
        config lists). PostgreSQL's reads ``pg_stat_replication`` on the primary (and says
        so on a database without it)."""
        from fillgate.contrib.postgres import ReplicationLagCheck

        return ReplicationLagCheck(max_lag_s)

    def running_sessions(self, conn: Connection) -> tuple[int, str]:
        """The database's load for ``--max-load``/``--critical-load``: (value, what it counts)."""
        raise NotImplementedError

    def vacuum_on(self, conn: Connection, table: str) -> str | None:
        """A vacuum running on ``table`` now (what it is), or None."""
        raise NotImplementedError

    def long_transactions(self, conn: Connection, table: str, age_s: float) -> list[str]:
        """Other sessions whose transaction has been open longer than ``age_s`` seconds while
        holding a lock on ``table`` (one description each)."""
        raise NotImplementedError
    # families whose columns also take a bool, stored as 1/0 (backends without a boolean type)
    bools_as_ints: ClassVar[bool] = False
    # a "timestamp" (without time zone) column refuses aware datetimes
    naive_timestamps: ClassVar[bool] = True
    # Python types each family takes on this backend (checked with isinstance; bool apart)
    accepts: ClassVar[dict[str, tuple[type, ...]]] = {
        "integer": (int,),
        "numeric": (int, decimal.Decimal),
        "float": (float, int),
        "bool": (bool,),
        "text": (str,),
        "bytes": (bytes, bytearray, memoryview),
        "date": (dt.date,),
        "timestamp": (dt.datetime,),
        "timestamptz": (dt.datetime,),
        "time": (dt.time,),
        "interval": (dt.timedelta,),
        "uuid": (uuid.UUID,),
        "json": (dict, list, str, int, float, bool),
        "any": (object,),
    }

    # --- reflection ---------------------------------------------------------------------

    def column_types(self, conn: Connection, table: str) -> dict[str, ColumnType]:
        """The type of every column of ``table``, by name."""
        raise NotImplementedError

    def unsupported(self, ctype: ColumnType) -> str | None:
        """Why fillgate cannot write this column at all (a job error), or None."""
        return None

    # --- storage forms ------------------------------------------------------------------

    def accept(self, ctype: ColumnType, value: Any) -> Any:
        """The type check: the value to bind (normalised: a str subclass becomes a str, bytes
        from a bytearray), or :class:`Unstorable` saying what to propose instead."""
        family = ctype.family
        kind = type(value)
        if kind is bool:
            if family == "bool":
                return int(value) if self.bools_as_ints else value
            if family in ("json", "any"):
                return value
            if self.bools_as_ints and family in ("integer", "numeric"):
                return int(value)
            return self._wrong_type(ctype, value)
        if family == "bool" and self.bools_as_ints and kind is int:
            return value
        if not isinstance(value, self.accepts[family]):
            return self._wrong_type(ctype, value)
        if family == "date" and isinstance(value, dt.datetime):
            return Unstorable(
                f"{ctype.describe()} holds a date, and {shown(value)} is a datetime: its time would be dropped. "
                "Propose a datetime.date (value.date())."
            )
        is_datetime = isinstance(value, dt.datetime)
        tzinfo = value.tzinfo if isinstance(value, dt.datetime) else None
        if family == "timestamp" and is_datetime and tzinfo is not None and self.naive_timestamps:
            return Unstorable(
                f"{ctype.describe()} has no time zone, and {shown(value)} is an aware datetime: the database would "
                "silently convert it to the session's time zone. Propose a naive datetime."
            )
        if family == "timestamptz" and is_datetime and tzinfo is None:
            return Unstorable(
                f"{ctype.describe()} stores an instant, and {shown(value)} is a naive datetime: the database would "
                "read it in the session's time zone. Propose an aware datetime (with tzinfo)."
            )
        if isinstance(value, str):
            if kind is not str:
                value = str.__str__(value)
            problem = utf8_error(value)
            if problem is not None:
                return Unstorable(f"{ctype.describe()} cannot hold {shown(value)}: {problem}.")
        elif kind is not int and isinstance(value, int) and family != "any":
            value = int(value)  # an IntEnum and the like: its number
        elif isinstance(value, bytearray | memoryview):
            value = bytes(value)
        return value

    def _wrong_type(self, ctype: ColumnType, value: Any) -> Unstorable:
        wants = FAMILY_WANTS[ctype.family]
        if ctype.family in ("integer", "numeric") and self.bools_as_ints:
            wants += " (or a bool, stored as 1/0)"
        return Unstorable(
            f"{ctype.describe()} takes {wants}; the job proposed {shown(value)} ({type_name(value)}). "
            "Propose a value of the column's type: fillgate does not convert values."
        )

    def exact_form(self, ctype: ColumnType, value: Any) -> Any:
        """The storage form of an accepted value when Python knows it for sure, an
        :class:`Unstorable`, or :data:`PROBE` to ask the database."""
        return PROBE

    def fast_path(self, ctype: ColumnType) -> Callable[[Any], Any] | None:
        """A cheap function for the common values of this column (a short ASCII str for a
        varchar, an int in range for an integer column): it returns the storage form (or an
        :class:`Unstorable`) that the general path (:meth:`accept`, :meth:`exact_form`, the
        probe) would give, or :data:`PROBE` to take the general path. None: no such function.
        tests/test_value_fidelity.py checks these against the database with hypothesis."""
        return None

    def represents(self, ctype: ColumnType, proposed: Any, stored: Any) -> bool:
        """Whether the value read back after storing ``proposed`` is the same value (so the
        plan may record ``stored`` as what it writes)."""
        if type(proposed) is bool and type(stored) is int:
            return self.bools_as_ints and stored == int(proposed)
        return same_value(proposed, stored)

    def probe(self, session: ProbeSession, ctype: ColumnType, values: Sequence[Any]) -> list[Any]:
        """What the database stores for each value (read back), or :class:`Unstorable`."""
        raise NotImplementedError

    def probe_session(self, engine: Engine, table: str) -> ProbeSession:
        raise NotImplementedError

    def bind(self, ctype: ColumnType) -> Callable[[Any], Any] | None:
        """How a value of this column is handed to the driver (None: as it is)."""
        return None

    def checker(self, engine: Engine, table: str, types: Mapping[str, ColumnType]) -> ValueChecker:
        return ValueChecker(self, engine, table, types)


def numeric_rule(ctype: ColumnType, precision: int | None, scale: int | None) -> Callable[[Any], Any]:
    """The storage form of an int or a finite Decimal in a fixed-point column: unconstrained,
    it is kept exactly (1E+3 shown as 1000, as PostgreSQL does); NUMERIC(p, s) / DECIMAL(p, s)
    round to s places (half away from zero, on PostgreSQL and MariaDB/MySQL alike), and more
    than p - s digits before the point overflow. Non-finite values: :data:`PROBE`."""
    one = decimal.Decimal(1)
    if precision is None:
        def unconstrained(value: Any) -> Any:
            number = decimal.Decimal(value) if type(value) is int else value
            if not number.is_finite():
                return PROBE
            _, digits, exponent = number.as_tuple()
            if isinstance(exponent, int) and exponent > 0:
                return number.quantize(one, context=decimal.Context(prec=len(digits) + exponent + 1))
            return number
        return unconstrained
    scale = scale or 0
    quantum = one.scaleb(-scale)
    limit = decimal.Decimal(10) ** (precision - scale)
    context = decimal.Context(prec=precision + 1, rounding=decimal.ROUND_HALF_UP)

    def constrained(value: Any) -> Any:
        number = decimal.Decimal(value) if type(value) is int else value
        if not number.is_finite():
            return PROBE
        try:
            stored = number.quantize(quantum, context=context)
        except decimal.InvalidOperation:
            stored = limit  # more digits than the column holds
        if abs(stored) >= limit:
            return Unstorable(f"{ctype.describe()} cannot hold {shown(value)}: it holds at most {precision - scale} "
                              "digits before the decimal point (numeric field overflow).")
        if stored != number:
            return Unstorable(f"{ctype.describe()} would store {shown(stored)} for {shown(value)}: "
                              f"it keeps {scale} decimal places and rounds the rest.")
        return stored
    return constrained


class ProbeSession:
    """The database side of one plan's probes (a connection, scratch tables); closed once."""

    def close(self) -> None:
        pass


def _value_key(value: Any) -> Any:
    """A dict key telling apart values that ``==`` would merge (1, 1.0, True; NaN)."""
    kind = type(value)
    if kind is float and value != value:
        return (float, "nan")
    try:
        hash(value)
    except TypeError:
        return (kind, repr(value))
    if kind is decimal.Decimal:
        return (kind, str(value))  # 1.1 and 1.10 may be stored alike, but say so per value
    return (kind, value)


class ValueChecker:
    """The storage forms of one plan's proposed values, column by column."""

    def __init__(self, backend: Backend, engine: Engine, table: str, types: Mapping[str, ColumnType]) -> None:
        self.backend = backend
        self.engine = engine
        self.table = table
        self.types = types
        self._session: ProbeSession | None = None
        self._fast = {column: backend.fast_path(ctype) for column, ctype in types.items()}

    def storage_forms(self, column: str, values: Sequence[Any]) -> Sequence[Any]:
        """For each value (not None): its storage form, or :class:`Unstorable`. When every
        value is its own storage form, ``values`` itself is returned."""
        fast = self._fast[column]
        if fast is None:
            return self._general(column, values)
        forms = list(map(fast, values))
        slow = [i for i, form in enumerate(forms) if form is PROBE]
        if slow:
            for i, form in zip(slow, self._general(column, [values[i] for i in slow]), strict=True):
                forms[i] = form
        elif all(map(operator.is_, forms, values)):
            return values
        return forms

    def _general(self, column: str, values: Sequence[Any]) -> list[Any]:
        backend = self.backend
        ctype = self.types[column]
        out: list[Any] = [None] * len(values)
        pending: dict[Any, tuple[Any, list[int]]] = {}  # value key -> (bound value, positions)
        accept, exact_form = backend.accept, backend.exact_form
        for i, value in enumerate(values):
            bound = accept(ctype, value)
            if type(bound) is Unstorable:
                out[i] = bound
                continue
            form = exact_form(ctype, bound)
            if form is PROBE:
                key = _value_key(bound)
                entry = pending.get(key)
                if entry is None:
                    pending[key] = (bound, [i])
                else:
                    entry[1].append(i)
            else:
                out[i] = form
        if pending:
            if self._session is None:
                self._session = backend.probe_session(self.engine, self.table)
            entries = list(pending.values())
            stored = backend.probe(self._session, ctype, [bound for bound, _ in entries])
            for (bound, positions), form in zip(entries, stored, strict=True):
                for i in positions:
                    out[i] = self._judge(ctype, values[i], bound, form)
        return out

    def _judge(self, ctype: ColumnType, proposed: Any, bound: Any, stored: Any) -> Any:
        if type(stored) is Unstorable:
            return stored
        if stored is None:
            return Unstorable(f"{ctype.describe()} would store NULL for {shown(proposed)}.")
        if not self.backend.represents(ctype, bound, stored):
            return Unstorable(f"{ctype.describe()} would store {shown(stored)} for {shown(proposed)}.")
        return stored

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.close()
