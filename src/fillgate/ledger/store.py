"""Every query on fillgate's own tables."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import getpass
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from orjson import dumps as _orjson_dumps
from sqlalchemy import case, func, insert, inspect, or_, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement
from ulid import ULID

from fillgate.backends import backend_for
from fillgate.database import write_transaction
from fillgate.errors import (
    AlreadyDoneError,
    ConfigError,
    NotInitializedError,
    RunNotFoundError,
    RunStateError,
    UsageError,
)
from fillgate.ledger import schema
from fillgate.ledger.chain import CURRENT as CURRENT_CHAIN
from fillgate.ledger.chain import VERSIONS as chain_versions
from fillgate.ledger.chain import AuditChain
from fillgate.ledger.schema import VERSION_TABLE
from fillgate.redact import mask_secrets
from fillgate.runs import MESSAGE_LIMIT, WRITING_KINDS, RunKind, RunStatus, sources_of
from fillgate.values import decode_key, encode_key

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
_REVISION = re.compile(r'^(down_revision|revision) = (?:"([^"]*)"|None)', re.MULTILINE)


@functools.cache
def _revisions() -> tuple[frozenset[str], str | None]:
    """Every ledger revision and the head, read from the migration files' ``revision`` and
    ``down_revision`` lines (without importing Alembic: every command checks the ledger's
    revision, and Alembic costs a CLI start more than the check)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for name, value in _REVISION.findall(path.read_text(encoding="utf-8")):
            if value:
                (revisions if name == "revision" else parents).add(value)
    heads = revisions - parents
    return frozenset(revisions), (next(iter(heads)) if len(heads) == 1 else None)


RUN_STATUSES = tuple(RunStatus)
RUN_KINDS = tuple(RunKind)


def utcnow() -> dt.datetime:
    """Naive UTC, the ledger's timestamp convention."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def new_run_id() -> str:
    """A ULID: time-ordered, 80 random bits, so two processes never collide."""
    return str(ULID())


OPERATOR_LIMIT = 255  # fillgate_runs.operator


_acting_operator: ContextVar[str | None] = ContextVar("fillgate_operator", default=None)


@contextmanager
def acting_as(operator: str) -> Iterator[None]:
    """Record ``operator`` as the operator of what is done inside (in this thread or task and
    the contexts copied from it), whatever ``FILLGATE_OPERATOR`` says: the web dashboard acts
    for the person whose browser asked."""
    token = _acting_operator.set(operator)
    try:
        yield
    finally:
        _acting_operator.reset(token)


def operator_name() -> str:
    """Who is running fillgate: the operator of ``acting_as``, ``FILLGATE_OPERATOR``, or user@host."""
    acting = _acting_operator.get()
    if acting:
        return acting
    explicit = os.environ.get("FILLGATE_OPERATOR")
    if explicit:
        if len(explicit) > OPERATOR_LIMIT:
            raise ConfigError(f"FILLGATE_OPERATOR is {len(explicit)} characters long; the ledger keeps at most "
                              f"{OPERATOR_LIMIT}. Use a shorter name.")
        return explicit
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def error_row(
    run_id: str, phase: str, key: Sequence[Any], column: str | None, error_type: str, message: str,
    fingerprint: str, traceback: str | None = None, created_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """One ``fillgate_errors`` row (a row error, a conflict, a lookup anomaly), for ``insert_errors``."""
    return {
        "run_id": run_id, "phase": phase, "row_key": encode_key(key), "column_name": column,
        "error_type": error_type, "message": mask_secrets(message)[:4000], "fingerprint": fingerprint,
        "traceback": mask_secrets(traceback) if traceback else traceback, "created_at": created_at or utcnow(),
    }


@dataclass
class Run:
    """One row of ``fillgate_runs``."""

    run_id: str
    kind: str
    target: str
    environment: str
    operator: str
    status: str
    args: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    job: str | None = None
    table_name: str | None = None
    control: str | None = None
    plan_id: str | None = None
    plan_path: str | None = None
    plan_sha256: str | None = None
    parent_run_id: str | None = None
    checkpoint: int = 0
    total: int | None = None
    message: str | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    heartbeat_at: dt.datetime | None = None
    host: str | None = None
    pid: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    audit_rows: int | None = None
    audit_sha256: str | None = None

    @property
    def audit(self) -> AuditChain | None:
        """How far the run's audit hash chain got; None for a run that keeps none (one started
        before ledger revision 0003, or a run that writes no audit rows)."""
        if self.audit_rows is None or self.audit_sha256 is None:
            return None
        return AuditChain(self.audit_rows, self.audit_sha256, self.audit_chain)

    @property
    def audit_chain(self) -> int:
        """The version of the run's audit hash chain (fillgate.ledger.chain)."""
        version = self.args.get("audit_chain", 1)
        return version if version in chain_versions else 1

    def to_row(self) -> dict[str, Any]:
        row = dict(self.__dict__)
        row["args"] = json.dumps(self.args, default=str, sort_keys=True)
        row["counts"] = json.dumps(self.counts, sort_keys=True)
        row["details"] = json.dumps(self.details, default=str)
        return row

    @classmethod
    def from_row(cls, row: Any) -> Run:
        data = dict(row._mapping)
        data["args"] = json.loads(data["args"])
        data["counts"] = json.loads(data["counts"])
        data["details"] = json.loads(data["details"]) if data.get("details") else {}
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for name, value in out.items():
            if isinstance(value, dt.datetime):
                out[name] = value.isoformat() + "Z"
        return out

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or utcnow()
        return (end - self.started_at).total_seconds()


def _row_values(values: dict[str, Any]) -> dict[str, Any]:
    """Column values of a run's row from Python values (JSON text, masked message, audit chain)."""
    values = dict(values)
    if values.get("message"):  # may quote a job's exception, which may quote a DSN
        values["message"] = mask_secrets(values["message"])
    if "audit" in values:
        chain = values.pop("audit")
        if chain is not None:
            values.update(audit_rows=chain.rows, audit_sha256=chain.sha256)
    if "counts" in values:
        values["counts"] = json.dumps(values["counts"], sort_keys=True)
    if "args" in values:
        values["args"] = json.dumps(values["args"], default=str, sort_keys=True)
    if "details" in values:
        values["details"] = json.dumps(values["details"], default=str)
    return values


def _not_partition() -> list[Any]:
    """The condition that leaves out the runs of a distributed run's partitions (the list shows
    the distributed run itself, with their totals)."""
    p, r = schema.partitions.c, schema.runs.c
    # a partition's plan run is known by its parent (its row names it only once it planned)
    return [~select(p.child_run_id).where(p.child_run_id == r.run_id).exists(),
            ~((r.kind == RunKind.PLAN) & select(p.run_id).where(p.run_id == r.parent_run_id).exists())]


def _partition_values(values: dict[str, Any]) -> dict[str, Any]:
    values = dict(values)
    if "counts" in values:
        values["counts"] = json.dumps(values["counts"], sort_keys=True)
    for side in ("lo", "hi"):
        if side in values and values[side] is not None:
            values[side] = encode_key(values[side])
    values.setdefault("updated_at", utcnow())
    return values


def _dump(value: Any) -> str:
    """The JSON text of a packed batch (non-ASCII kept as is, no spaces): orjson's text, which
    is byte for byte json.dumps's for these lists of strings (tests/test_values.py checks it)
    and ten times faster; a string orjson refuses (a lone surrogate) takes json.dumps."""
    try:
        return _orjson_dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _load_list(text: Any) -> list[Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return []
    return value if isinstance(value, list) else []


def key_hash(table: str, row_key: str) -> int:
    """A row's entry in ``fillgate_audit_keys``: the first 8 bytes of SHA-256 over the table's
    name, a NUL and the row key's JSON text, as a signed 64-bit integer."""
    return key_hashes(table, [row_key])[0]


HISTORY_INDEXES = 20_000  # changes a history call adds to the row index, at most (see Ledger.history)
_DECODER = json.JSONDecoder()
_ENTRY_START = '["['  # where an entry begins: a row key's JSON text always starts with "["


def _not_indexed() -> ColumnElement[bool]:
    """The audit batches the row index does not cover yet."""
    return ~select(schema.audit_indexed.c.batch_id).where(
        schema.audit_indexed.c.batch_id == schema.audit_batches.c.id).exists()


def _entry_needle(key: str) -> str:
    """How an entry of ``key`` begins in a batch's JSON text (see :func:`find_rows`)."""
    return "[" + json.dumps(key, ensure_ascii=False) + ","


# An entry's row key in a batch's JSON text (see find_rows: an entry begins with ``["[`` and
# nowhere else), as the JSON string's body.
_ENTRY_KEY = re.compile(r'\["(\[(?:[^"\\]|\\.)*)"')


def _row_keys(changes: str) -> set[str]:
    """The row keys of one packed batch's changes, read off its text (decoding the whole
    batch costs several times more); a text fillgate did not write is decoded in full."""
    if not changes.startswith("[" + _ENTRY_START):
        entries = json.loads(changes)
        return {entry[0] for entry in entries if isinstance(entry, list) and entry and isinstance(entry[0], str)}
    return {json.loads(f'"{key}"') if "\\" in key else key for key in _ENTRY_KEY.findall(changes)}


def key_hashes(table: str, row_keys: Iterable[str]) -> list[int]:
    """``key_hash`` of many keys of one table (the table's part of the hash is taken once)."""
    prefix = hashlib.sha256(f"{table}\0".encode("utf-8", "surrogatepass"))
    out = []
    for key in row_keys:
        digest = prefix.copy()
        digest.update(key.encode("utf-8", "surrogatepass"))
        out.append(int.from_bytes(digest.digest()[:8], "big", signed=True))
    return out


def find_rows(batch: Any, keys: Sequence[str]) -> list[AuditRow]:
    """The rows of one packed batch whose key is one of ``keys``, without decoding the others.

    In the batch's JSON text an entry begins with ``["[`` and nowhere else (inside a JSON
    string a quote is escaped), and its key is written as ``json.dumps`` writes it; so each
    entry of a key is found with ``str.find``, decoded alone, and its place in the batch is
    the number of entry beginnings before it. A batch whose text is not what fillgate writes
    is decoded in full (``unpack``) instead."""
    text = batch.changes
    if not isinstance(text, str) or not text.startswith("[" + _ENTRY_START):
        return [row for row in unpack(batch) if row.row_key in keys]
    base, first, last = batch.id * schema.ID_FACTOR, batch.first_seq, batch.n_changes - 1
    found: list[AuditRow] = []
    for key in keys:
        needle = _entry_needle(key)
        at = text.find(needle)
        while at >= 0:
            entry = _DECODER.raw_decode(text, at)[0]
            i = text.count(_ENTRY_START, 0, at)
            chain = entry[5] if len(entry) > 5 else (batch.chain_sha256 if i == last else None)
            found.append(AuditRow(base + i + 1, batch.run_id, batch.table_name, entry[0], entry[1], entry[2],
                                  entry[3], entry[4], batch.source, batch.changed_at,
                                  None if first is None else first + i, chain))
            at = text.find(needle, at + len(needle))
    return found


class AuditRow(NamedTuple):
    """One row of ``fillgate_changes``: one changed field of a packed batch."""

    id: int
    run_id: str
    table_name: str
    row_key: str
    column_name: str
    op: str
    old_value: str
    new_value: str
    source: str
    changed_at: dt.datetime
    seq: int | None
    chain_sha256: str | None


def unpack(batch: Any) -> Iterator[AuditRow]:
    """The rows of one packed batch (a ``fillgate_audit_batches`` row), as the view shows them.
    Raises ValueError when its changes are not the JSON array fillgate writes."""
    entries = json.loads(batch.changes)
    if not isinstance(entries, list):
        raise ValueError("not a JSON array")
    base, first, last = batch.id * schema.ID_FACTOR, batch.first_seq, len(entries) - 1
    for i, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) < 5:
            raise ValueError(f"entry {i + 1} is not a list of at least 5 strings")
        chain = entry[5] if len(entry) > 5 else (batch.chain_sha256 if i == last else None)
        yield AuditRow(base + i + 1, batch.run_id, batch.table_name, entry[0], entry[1], entry[2], entry[3],
                       entry[4], batch.source, batch.changed_at, None if first is None else first + i, chain)


class Ledger:
    """fillgate's tables in one target database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend = backend_for(engine)

    # --- schema and stamp ----------------------------------------------------------------

    def _alembic_config(self, connection: Connection) -> AlembicConfig:
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = connection
        return cfg

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return None
            found = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        if len(found) > 1:
            raise NotInitializedError(f"the fillgate ledger records {len(found)} schema revisions "
                                      f"({', '.join(sorted(found))}); it was changed by hand.")
        return found[0] if found else None

    def head_revision(self) -> str | None:
        return _revisions()[1]

    def upgrade(self) -> bool:
        """Create or upgrade the ledger tables; True if anything changed."""
        if self.current_revision() == self.head_revision():
            return False
        from alembic import command

        with self.engine.begin() as conn:
            command.upgrade(self._alembic_config(conn), "head")
        return True

    def is_initialized(self) -> bool:
        return self.current_revision() is not None

    def read_meta(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table("fillgate_meta"):
                return {}
            return {r.name: r.value for r in conn.execute(select(schema.meta))}

    def write_meta(self, conn: Connection, values: dict[str, str]) -> None:
        existing = {r.name for r in conn.execute(select(schema.meta.c.name))}
        for name, value in values.items():
            if name in existing:
                conn.execute(update(schema.meta).where(schema.meta.c.name == name).values(value=value))
            else:
                conn.execute(insert(schema.meta).values(name=name, value=value))

    def require_meta(self, target_name: str) -> dict[str, str]:
        meta = self.read_meta()
        if "environment" not in meta:
            raise NotInitializedError(
                f"the database of target '{target_name}' has no fillgate ledger (or no stamp); "
                f"run: fillgate init --target {target_name}"
            )
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            if current in _revisions()[0]:
                raise NotInitializedError(
                    f"the fillgate ledger of target '{target_name}' is at schema revision {current}, older "
                    f"than this fillgate's {head}; upgrade it (it keeps every row) with: "
                    f"fillgate init --target {target_name}"
                )
            raise NotInitializedError(
                f"the fillgate ledger of target '{target_name}' is at schema revision {current}, which this "
                f"fillgate does not know (it knows up to {head}): a newer fillgate upgraded it. Use that "
                "version of fillgate."
            )
        return meta

    # --- runs ----------------------------------------------------------------------------

    def create_run(self, run: Run, conn: Connection | None = None) -> Run:
        now = utcnow()
        if run.kind in WRITING_KINDS and run.audit_rows is None:
            chain = AuditChain.start(run.run_id, CURRENT_CHAIN)
            run.audit_rows, run.audit_sha256 = chain.rows, chain.sha256
            run.args = {**run.args, "audit_chain": CURRENT_CHAIN}
        run.created_at = run.created_at or now
        run.host = run.host or socket.gethostname()
        run.pid = run.pid or os.getpid()
        if conn is None:
            with self.engine.begin() as own:
                own.execute(insert(schema.runs).values(**run.to_row()))
        else:
            conn.execute(insert(schema.runs).values(**run.to_row()))
        return run

    def update_run(self, run_id: str, conn: Connection | None = None, **values: Any) -> None:
        """Set columns of the run's row (never its status: see :meth:`transition`);
        ``audit=AuditChain`` sets ``audit_rows`` and ``audit_sha256`` (``audit=None``: the run
        keeps no chain, nothing is set)."""
        if "status" in values:
            raise TypeError("a run's status changes only through Ledger.transition")
        stmt = update(schema.runs).where(schema.runs.c.run_id == run_id).values(**_row_values(values))
        self._execute(stmt, conn)

    def transition(self, run_id: str, status: RunStatus, conn: Connection | None = None, **values: Any) -> None:
        """Move the run to ``status`` (setting ``values`` too) if ``runs.TRANSITIONS`` allows
        it from the status the run has: a compare-and-set, so a run moved meanwhile by another
        process is not moved again. Refused with RunStateError otherwise."""
        r = schema.runs.c
        stmt = (update(schema.runs).where(r.run_id == run_id, r.status.in_(sources_of(status)))
                .values(status=status, **_row_values(values)))
        if self._execute(stmt, conn) != 1:
            current = self.get_run(run_id, conn).status
            raise RunStateError(f"run {run_id} is {current}; it cannot become {status}.")

    def fail_run(self, run_id: str, message: str, conn: Connection | None = None, **values: Any) -> None:
        """The run failed: its status, the time, and the message (cut to a limit)."""
        self.transition(run_id, RunStatus.FAILED, conn, finished_at=utcnow(), message=message[:MESSAGE_LIMIT],
                        **values)

    def _execute(self, stmt: Any, conn: Connection | None) -> int:
        if conn is None:
            with self.engine.begin() as own:
                return int(own.execute(stmt).rowcount)
        return int(conn.execute(stmt).rowcount)

    def get_run(self, run_id: str, conn: Connection | None = None) -> Run:
        stmt = select(schema.runs).where(schema.runs.c.run_id == run_id)
        if conn is None:
            with self.engine.connect() as own:
                row = own.execute(stmt).first()
        else:
            row = conn.execute(stmt).first()
        if row is None:
            raise RunNotFoundError(f"no run {run_id!r} in this target's ledger; see: fillgate runs")
        return Run.from_row(row)

    def read_control(self, run_id: str, conn: Connection | None = None) -> str | None:
        """A pause or cancel request for the run (read inside the caller's transaction if given)."""
        stmt = select(schema.runs.c.control).where(schema.runs.c.run_id == run_id)
        if conn is not None:
            return conn.execute(stmt).scalar_one_or_none()
        with self.engine.connect() as own:
            return own.execute(stmt).scalar_one_or_none()

    def list_runs(
        self, limit: int = 20, kind: str | None = None, status: str | None = None,
        job: str | None = None,
    ) -> list[Run]:
        for name, value, allowed in (("kind", kind, RUN_KINDS), ("status", status, RUN_STATUSES)):
            if value is not None and value not in allowed:
                raise UsageError(f"unknown run {name} {value!r}; use one of: {', '.join(allowed)}.")
        stmt = select(schema.runs).where(*_not_partition()).order_by(schema.runs.c.run_id.desc()).limit(limit)
        if kind:
            stmt = stmt.where(schema.runs.c.kind == kind)
        if status:
            stmt = stmt.where(schema.runs.c.status == status)
        if job:
            stmt = stmt.where(schema.runs.c.job == job)
        with self.engine.connect() as conn:
            return [Run.from_row(r) for r in conn.execute(stmt)]

    def page_runs(
        self, offset: int = 0, limit: int = 50, kind: str | None = None, status: str | None = None,
        job: str | None = None,
    ) -> tuple[list[Run], int]:
        """One page of runs, newest first, and how many runs match the filters in all."""
        for name, value, allowed in (("kind", kind, RUN_KINDS), ("status", status, RUN_STATUSES)):
            if value is not None and value not in allowed:
                raise UsageError(f"unknown run {name} {value!r}; use one of: {', '.join(allowed)}.")
        r = schema.runs.c
        where = [cond for cond, value in ((r.kind == kind, kind), (r.status == status, status),
                                          (r.job == job, job)) if value] + _not_partition()
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(schema.runs).where(*where)).scalar_one()
            rows = conn.execute(
                select(schema.runs).where(*where).order_by(r.run_id.desc()).offset(max(offset, 0)).limit(limit)
            ).all()
        return [Run.from_row(row) for row in rows], total

    def job_names(self) -> list[str]:
        """Every job name that has a run, sorted."""
        r = schema.runs.c
        with self.engine.connect() as conn:
            return list(conn.execute(
                select(r.job).where(r.job.is_not(None)).group_by(r.job).order_by(r.job)
            ).scalars())

    def active_locks(self) -> list[dict[str, Any]]:
        """The apply locks held now (name, run, operator, host, pid, since, heartbeat); a lock
        row whose process is gone may linger on SQLite until the next apply takes it over."""
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(
                select(schema.locks).order_by(schema.locks.c.acquired_at)
            )]

    def run_totals(self) -> list[dict[str, Any]]:
        """Per (job, kind, status): how many runs, and the sum of each of their counts
        (rows, writes, applied, conflicts, errors, unexpected_index, ...)."""
        r = schema.runs.c
        totals: dict[tuple[str, str, str], dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(select(r.job, r.kind, r.status, r.counts)):
                entry = totals.setdefault((row.job or "", row.kind, row.status),
                                          {"job": row.job or "", "kind": row.kind, "status": row.status,
                                           "runs": 0, "counts": {}})
                entry["runs"] += 1
                for name, value in json.loads(row.counts).items():
                    if isinstance(value, int):
                        entry["counts"][name] = entry["counts"].get(name, 0) + value
        return list(totals.values())

    def hold_totals(self) -> list[dict[str, Any]]:
        """Per job: how many batches health checks held, and for how long in all (ms)."""
        b = schema.batches.c
        r = schema.runs.c
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(
                select(r.job, func.count().label("holds"), func.sum(b.held_ms).label("held_ms"))
                .select_from(schema.batches.join(schema.runs, r.run_id == b.run_id))
                .where(b.held_ms > 0)
                .group_by(r.job)
            )]

    def runs_of_plan(self, plan_id: str) -> list[Run]:
        stmt = (
            select(schema.runs)
            .where(schema.runs.c.plan_id == plan_id, schema.runs.c.kind == RunKind.APPLY)
            .order_by(schema.runs.c.run_id)
        )
        with self.engine.connect() as conn:
            return [Run.from_row(r) for r in conn.execute(stmt)]

    def children_of(self, run_id: str) -> list[Run]:
        """Runs started on behalf of ``run_id`` (the stage plans of a pipeline), in order."""
        stmt = select(schema.runs).where(schema.runs.c.parent_run_id == run_id, schema.runs.c.kind == RunKind.PLAN)
        with self.engine.connect() as conn:
            return [Run.from_row(r) for r in conn.execute(stmt.order_by(schema.runs.c.run_id))]

    def reverts_of(self, run_id: str) -> list[Run]:
        stmt = (
            select(schema.runs)
            .where(schema.runs.c.parent_run_id == run_id, schema.runs.c.kind == RunKind.REVERT)
            .order_by(schema.runs.c.run_id)
        )
        with self.engine.connect() as conn:
            return [Run.from_row(r) for r in conn.execute(stmt)]

    # --- the audit log -------------------------------------------------------------------

    def insert_changes(
        self, conn: Connection, run_id: str, table: str, source: str, when: dt.datetime,
        items: Sequence[tuple[str, str, str, str, str]], chain: AuditChain | None = None,
    ) -> AuditChain | None:
        """Append the audit of one batch, in the caller's transaction: ONE packed row of
        ``fillgate_audit_batches`` (the row index catches up later: :meth:`index_audit`).
        ``items``: (row_key, column, op, old, new), every value already its JSON text.

        ``chain`` is how far the run's hash chain got; the batch gets its positions in it and
        the chain after it is returned, for the caller to record with the run in the same
        transaction (``update_run(..., audit=chain)``). A run without a chain (started before
        ledger revision 0003) writes batches without one."""
        if not items:
            return chain
        first_seq: int | None = None
        changes = _dump(items)
        if chain is not None:
            first_seq = chain.rows + 1
            chain = chain.follow_batch(run_id, table, source, when, items, changes)
        b = schema.audit_batches.c
        number = conn.execute(
            select(func.coalesce(func.max(b.batch), 0)).where(b.run_id == run_id)
        ).scalar_one() + 1
        conn.execute(insert(schema.audit_batches).values(
            run_id=run_id, batch=number, table_name=table, source=source, changed_at=when, first_seq=first_seq,
            n_changes=len(items), column_names=_dump(sorted({item[1] for item in items})),
            changes=changes, chain_sha256=None if chain is None else chain.sha256,
        ))
        return chain

    def index_audit(self, max_changes: int = 200_000, rounds: int | None = None) -> int:
        """Bring the row index up to date: the entries of every batch it does not cover yet,
        about ``max_changes`` changes per transaction (at most ``rounds`` transactions); the
        number of batches indexed.

        Writing the index with each batch cost an apply more than its packed audit row (its
        entries land at random places of a large b-tree, once per batch commit); written here,
        many batches at a time, each page is written once. Safe to run from several sessions
        at once (an entry or a batch indexed twice is skipped), and a failed or interrupted
        catch-up loses nothing: history reads the batches not covered directly."""
        b = schema.audit_batches.c
        done = 0
        while rounds is None or rounds > 0:
            rounds = None if rounds is None else rounds - 1
            # read and hash outside the write transaction (on SQLite another writer, an apply's
            # batch, waits only for the inserts): the batches are append-only
            with self.engine.connect() as conn:
                todo = conn.execute(select(b.id, b.n_changes).where(_not_indexed()).order_by(b.id).limit(1000)).all()
                ids: list[int] = []
                total = 0
                for batch_id, n in todo:
                    if ids and total + n > max_changes:
                        break
                    ids.append(batch_id)
                    total += n
                if not ids:
                    return done
                entries: list[tuple[int, int]] = []
                batches = conn.execute(select(b.id, b.table_name, b.changes).where(b.id.in_(ids)))
                for batch_id, table, changes in batches:
                    entries.extend((h, batch_id) for h in key_hashes(table, _row_keys(changes)))
            entries.sort(key=itemgetter(0))  # in the index's order: each page of it is written once
            with write_transaction(self.engine) as conn:
                if entries:
                    self.backend.append_new_rows(conn, "fillgate_audit_keys", ("key_hash", "batch_id"), entries)
                self.backend.append_new_rows(conn, "fillgate_audit_indexed", ("batch_id",), [(x,) for x in ids])
            done += len(ids)
        return done

    def insert_errors(self, conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            conn.execute(insert(schema.errors), rows)

    def iter_batches(self, run_id: str, chunk: int = 20) -> Iterator[Any]:
        """The packed audit rows of a run (``fillgate_audit_batches``), in the order they were written."""
        b = schema.audit_batches.c
        last = 0
        with self.engine.connect() as conn:
            while True:
                rows = conn.execute(
                    select(schema.audit_batches).where(b.run_id == run_id, b.id > last).order_by(b.id).limit(chunk)
                ).all()
                conn.rollback()  # hold no read lock while the caller writes (SQLite)
                if not rows:
                    return
                yield from rows
                last = rows[-1].id

    def iter_changes(self, run_id: str) -> Iterator[AuditRow]:
        """The audit rows of a run (one per changed field, as ``fillgate_changes`` shows them),
        in the order they were written."""
        for batch in self.iter_batches(run_id):
            yield from unpack(batch)

    def count_changes(self, run_id: str) -> int:
        b = schema.audit_batches.c
        with self.engine.connect() as conn:
            return int(conn.execute(
                select(func.coalesce(func.sum(b.n_changes), 0)).where(b.run_id == run_id)
            ).scalar_one())

    def history(
        self, table: str, row_keys: Sequence[str], column: str | None = None, limit: int | None = None,
        *, index: bool = True,
    ) -> list[dict[str, Any]]:
        """Every recorded change of one row (``row_keys``: the encodings it may have), oldest
        first; with ``limit``, only the first ``limit`` of them. The row index names the few
        batches that changed the row; only their entries for the row are decoded.

        With ``index`` the row index first catches up by up to HISTORY_INDEXES changes
        (:meth:`index_audit`: about 0.1 s on a small ledger, 1.1 s on a SQLite ledger of 10
        million changes, where each entry lands on a page of its own; skipped when the ledger
        cannot be written, e.g. a read-only login); the batches it does not cover yet are
        searched for the row's key in the database (a text match, about 0.1 s per million
        changes on SQLite) and read directly. So no history waits for the whole index to catch
        up after a large run."""
        keys = list(dict.fromkeys(row_keys))
        if index:
            self._try_index_audit()
        b, k, r = schema.audit_batches.c, schema.audit_keys.c, schema.runs.c
        hashes = sorted({key_hash(table, key) for key in keys})
        needles = [_entry_needle(key) for key in keys]
        with self.engine.connect() as conn:
            batch_ids = set(conn.execute(select(k.batch_id).where(k.key_hash.in_(hashes))).scalars())
            unindexed = list(conn.execute(select(b.id).where(b.table_name == table, _not_indexed())).scalars())
            for chunk in range(0, len(unindexed), 500):  # of those, the batches whose text holds the key
                batch_ids.update(conn.execute(select(b.id).where(
                    b.id.in_(unindexed[chunk:chunk + 500]),
                    or_(*(b.changes.contains(needle, autoescape=True) for needle in needles)),
                )).scalars())
            batches = conn.execute(
                select(schema.audit_batches, r.kind, r.job, r.operator, r.status)
                .select_from(schema.audit_batches.outerjoin(schema.runs, r.run_id == b.run_id))
                .where(b.id.in_(sorted(batch_ids)), b.table_name == table)
                .order_by(b.id)
            ).all() if batch_ids else []
        out: list[dict[str, Any]] = []
        for batch in batches:
            for row in find_rows(batch, keys):
                if column is None or row.column_name == column:
                    out.append({"id": row.id, "run_id": row.run_id, "column_name": row.column_name, "op": row.op,
                                "old_value": row.old_value, "new_value": row.new_value, "source": row.source,
                                "changed_at": row.changed_at, "kind": batch.kind, "job": batch.job,
                                "operator": batch.operator, "status": batch.status})
        out.sort(key=lambda e: e["id"])
        return out if limit is None else out[:limit]

    def _try_index_audit(self) -> None:
        """:meth:`index_audit`, when the ledger can be written: history is right without it."""
        # no write permission, a read-only database, a lock held too long: the batches not
        # covered yet are read directly
        with contextlib.suppress(DBAPIError):
            self.index_audit(HISTORY_INDEXES, rounds=1)

    def audited_key(self, table: str) -> str | None:
        """One row key the audit log recorded in ``table`` (None: fillgate never changed it):
        the first entry of the table's first batch, found by the table's index."""
        b = schema.audit_batches.c
        with self.engine.connect() as conn:
            text = conn.execute(
                select(b.changes).where(b.table_name == table).order_by(b.id).limit(1)
            ).scalar()
        if text is None:
            return None
        try:
            entry = _DECODER.raw_decode(text, 1)[0]
        except (TypeError, ValueError):
            return None
        return entry[0] if isinstance(entry, list) and entry and isinstance(entry[0], str) else None

    def audited_columns(self, table: str) -> list[str]:
        """The columns the audit log holds changes of in ``table`` (the batches' column lists,
        one row per batch: never the changes themselves)."""
        b = schema.audit_batches.c
        columns: set[str] = set()
        with self.engine.connect() as conn:
            for names in conn.execute(select(b.column_names).where(b.table_name == table).distinct()).scalars():
                columns.update(c for c in _load_list(names) if isinstance(c, str))
        return sorted(columns)

    def audited_shape(self, table: str) -> tuple[list[str], str | None]:
        """The columns the audit log holds changes of in ``table``, and one row key it
        recorded there (``([], None)``: fillgate never changed that table)."""
        return self.audited_columns(table), self.audited_key(table)

    # --- errors --------------------------------------------------------------------------

    def error_groups(self, run_ids: str | Sequence[str]) -> list[dict[str, Any]]:
        """Errors of one or more runs grouped by job (stage) and fingerprint, with counts and
        one example each."""
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        e = schema.errors.c
        r = schema.runs.c
        with self.engine.connect() as conn:
            groups = conn.execute(
                select(r.job, e.fingerprint, e.phase, e.error_type, func.count().label("count"),
                       func.min(e.id).label("first_id"))
                .select_from(schema.errors.join(schema.runs, r.run_id == e.run_id))
                .where(e.run_id.in_(ids))
                .group_by(r.job, e.fingerprint, e.phase, e.error_type)
                .order_by(func.count().desc())
            ).all()
            out = []
            for g in groups:
                first = conn.execute(select(schema.errors).where(e.id == g.first_id)).one()
                out.append({
                    "job": g.job, "fingerprint": g.fingerprint, "phase": g.phase, "error_type": g.error_type,
                    "count": g.count, "example_key": first.row_key, "example_column": first.column_name,
                    "example_message": first.message, "example_traceback": first.traceback,
                })
            return out

    # --- batch timeline and recorded actions ---------------------------------------------

    def record_batch(
        self, conn: Connection, run_id: str, *, done: int, rows: int, writes: int = 0, conflicts: int = 0,
        errors: int = 0, elapsed_ms: float = 0.0, paced_ms: float = 0.0, held_ms: float = 0.0,
        hold_reason: str | None = None, committed_at: dt.datetime | None = None,
    ) -> None:
        """Append one batch to the run's timeline, in the caller's (the batch's) transaction.
        Batches are numbered from 1 per run, across resumes."""
        b = schema.batches.c
        number = conn.execute(
            select(func.coalesce(func.max(b.batch), 0)).where(b.run_id == run_id)
        ).scalar_one() + 1
        conn.execute(insert(schema.batches).values(
            run_id=run_id, batch=number, done=done, rows=rows, writes=writes, conflicts=conflicts, errors=errors,
            elapsed_ms=round(elapsed_ms), paced_ms=round(paced_ms), held_ms=round(held_ms),
            hold_reason=hold_reason[:4000] if hold_reason else None, committed_at=committed_at or utcnow(),
        ))

    def batches(self, run_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """The run's last ``limit`` batches, oldest first."""
        b = schema.batches.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(schema.batches).where(b.run_id == run_id).order_by(b.batch.desc()).limit(limit)
            ).all()
        return [dict(row._mapping) for row in reversed(rows)]

    def batch_summary(self, run_id: str) -> dict[str, Any]:
        """Totals over all of the run's batches: how many, held (count, ms), paced (ms)."""
        b = schema.batches.c
        held = func.sum(case((b.held_ms > 0, 1), else_=0))
        with self.engine.connect() as conn:
            row = conn.execute(
                select(func.count().label("batches"), held.label("holds"),
                       func.coalesce(func.sum(b.held_ms), 0).label("held_ms"),
                       func.coalesce(func.sum(b.paced_ms), 0).label("paced_ms"))
                .where(b.run_id == run_id)
            ).one()
        return {"batches": row.batches, "holds": int(row.holds or 0), "held_ms": int(row.held_ms),
                "paced_ms": int(row.paced_ms)}

    def record_action(self, run_id: str, action: str, operator: str, outcome: str) -> None:
        """Record who asked for ``action`` (pause, cancel, resume, revert) on a run, and what came of it."""
        with self.engine.begin() as conn:
            conn.execute(insert(schema.actions).values(
                run_id=run_id, action=action, operator=operator[:255], outcome=outcome[:4000], created_at=utcnow(),
            ))

    def actions(self, run_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The recorded actions on a run, oldest first (at most ``limit``)."""
        a = schema.actions.c
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(
                select(schema.actions).where(a.run_id == run_id).order_by(a.id).limit(limit)
            )]

    # --- approvals (four-eyes) -----------------------------------------------------------

    def add_approval(self, plan_id: str, plan_sha256: str, operator: str, via: str,
                     comment: str | None = None) -> dict[str, Any]:
        """Record ``operator``'s approval of the plan file whose SHA-256 is ``plan_sha256``;
        refused (AlreadyDoneError, nothing written) if that operator approved it already."""
        a = schema.approvals.c
        row = {"plan_id": plan_id, "plan_sha256": plan_sha256, "operator": operator[:OPERATOR_LIMIT],
               "via": via[:255], "comment": mask_secrets(comment) if comment else None, "created_at": utcnow()}
        with self.engine.begin() as conn:
            earlier = conn.execute(select(a.created_at).where(a.plan_sha256 == plan_sha256,
                                                              a.operator == row["operator"])).first()
            if earlier is not None:
                raise AlreadyDoneError(
                    f"{operator} already approved plan {plan_id} (at {earlier.created_at.isoformat()}Z); "
                    "nothing was recorded. Approvals that count come from other operators."
                )
            conn.execute(insert(schema.approvals).values(**row))
        return row

    def approvals(self, plan_id: str) -> list[dict[str, Any]]:
        """Every approval of the plan (plan run ``plan_id``), oldest first."""
        a = schema.approvals.c
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(
                select(a.plan_id, a.plan_sha256, a.operator, a.via, a.comment, a.created_at)
                .where(a.plan_id == plan_id).order_by(a.id)
            )]

    def succeeded_applies(self, job: str, limit: int = 200) -> list[Run]:
        """The job's succeeded apply runs, newest first (at most ``limit``)."""
        r = schema.runs.c
        with self.engine.connect() as conn:
            return [Run.from_row(row) for row in conn.execute(
                select(schema.runs).where(r.job == job, r.kind == RunKind.APPLY, r.status == RunStatus.SUCCEEDED)
                .order_by(r.run_id.desc()).limit(limit)
            )]

    # --- partitions of distributed runs --------------------------------------------------

    def create_partitions(self, run_id: str, rows: Sequence[dict[str, Any]], conn: Connection | None = None) -> None:
        """Record the partitions of distributed run ``run_id`` (each: part, lo, hi, and any of
        child_run_id, plan_file, plan_sha256, total)."""
        values = [_partition_values({"run_id": run_id, "status": "pending", "checkpoint": 0, "counts": {}, **row})
                  for row in rows]
        if conn is None:
            with self.engine.begin() as own:
                own.execute(insert(schema.partitions), values)
        else:
            conn.execute(insert(schema.partitions), values)

    def update_partition(self, run_id: str, part: int, conn: Connection | None = None, **values: Any) -> int:
        """Set columns of one partition's row (in the caller's transaction, if given); with
        ``expect_child``, only while the row still names that child run (or none)."""
        p = schema.partitions.c
        expected = values.pop("expect_child", False)
        stmt = update(schema.partitions).where(p.run_id == run_id, p.part == part)
        if expected is not False:
            stmt = stmt.where((p.child_run_id == expected) | p.child_run_id.is_(None))
        return self._execute(stmt.values(**_partition_values(values)), conn)

    def partitions(self, run_id: str, conn: Connection | None = None) -> list[dict[str, Any]]:
        """The partitions of distributed run ``run_id``, in order (empty: not a distributed run)."""
        p = schema.partitions.c
        stmt = select(schema.partitions).where(p.run_id == run_id).order_by(p.part)
        if conn is None:
            with self.engine.connect() as own:
                rows = own.execute(stmt).all()
        else:
            rows = conn.execute(stmt).all()
        out = []
        for row in rows:
            item = dict(row._mapping)
            item["counts"] = json.loads(item["counts"])
            for side in ("lo", "hi"):
                item[side] = None if item[side] is None else decode_key(item[side])
            out.append(item)
        return out

    def partition_of(self, child_run_id: str) -> dict[str, Any] | None:
        """The partition whose own run is ``child_run_id`` (its run_id is the distributed run)."""
        p = schema.partitions.c
        with self.engine.connect() as conn:
            row = conn.execute(select(p.run_id, p.part).where(p.child_run_id == child_run_id)).first()
        return None if row is None else {"run_id": row.run_id, "part": row.part}
