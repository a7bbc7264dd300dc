"""fillgate's own tables (the ledger), as SQLAlchemy Core tables.

The Alembic migrations under ``migrations/versions`` create exactly these (a test compares
the migrated schema with this module on every backend); a schema change is a new migration
plus the same change here.

``fillgate_audit_batches`` (the audit log, read as the view ``fillgate_changes``) and
``fillgate_errors`` are append-only: the migrations add triggers (and
on MariaDB/MySQL the guard table, whose foreign keys make InnoDB refuse TRUNCATE) so the
database itself refuses to rewrite them; see README "What the audit log guarantees".
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql

VERSION_TABLE = "fillgate_alembic_version"

# Timestamps are naive UTC everywhere (DATETIME(6) on MariaDB for microseconds).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# An auto-incrementing 64-bit id (SQLite needs INTEGER for its rowid alias).
Serial = BigInteger().with_variant(Integer(), "sqlite")
# Unbounded text: TEXT holds 64 KiB on MariaDB/MySQL, LONGTEXT what any user column holds.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# A SHA-256 in hex.
Sha256 = String(64)

metadata = MetaData()

meta = Table(
    "fillgate_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LongText, nullable=False),
)

runs = Table(
    "fillgate_runs",
    metadata,
    Column("run_id", String(26), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("job", String(255)),
    Column("table_name", String(128)),
    Column("target", String(128), nullable=False),
    Column("environment", String(128), nullable=False),
    Column("operator", String(255), nullable=False),
    Column("args", LongText, nullable=False),
    Column("status", String(16), nullable=False),
    Column("control", String(16)),
    Column("plan_id", String(26)),
    Column("plan_path", LongText),
    Column("plan_sha256", String(64)),
    Column("parent_run_id", String(26)),
    Column("counts", LongText, nullable=False),
    Column("checkpoint", Integer, nullable=False),
    Column("total", Integer),
    Column("message", LongText),
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("heartbeat_at", Timestamp),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("details", LongText),
    # tamper evidence of the run's audit rows (apply and revert runs; NULL on runs started
    # before ledger revision 0003): how many it wrote, and the hash chain over them
    Column("audit_rows", Integer),
    Column("audit_sha256", Sha256),
    Index("ix_fillgate_runs_plan_id", "plan_id"),
    Index("ix_fillgate_runs_parent", "parent_run_id"),
    Index("ix_fillgate_runs_kind", "kind", "run_id"),
    Index("ix_fillgate_runs_status", "status", "run_id"),
    Index("ix_fillgate_runs_job", "job", "run_id"),
)

# The audit log: one row per committed batch of an apply or revert run, written in the batch's
# transaction. ``changes`` is a JSON array of ``[row_key, column, op, old, new]``, each of them
# the JSON text fillgate_changes shows (the key and the values in the tagged-JSON encoding of
# fillgate.values), as JSON strings; rows migrated from before revision 0005 may carry a sixth
# element, their own chain value. ``first_seq``/``n_changes``: the positions of the batch's changes in
# its run's audit record (``first_seq`` .. ``first_seq + n_changes - 1``); ``chain_sha256``: the run's
# hash chain after the batch's last change (fillgate.ledger.chain); ``column_names``: the distinct
# columns the batch changed, comma-separated (what history needs to know about a table without
# unpacking). NULL ``first_seq``/``chain_sha256``: rows written before revision 0003.
audit_batches = Table(
    "fillgate_audit_batches",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("run_id", String(26), nullable=False),
    Column("batch", Integer, nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("source", String(255), nullable=False),
    Column("changed_at", Timestamp, nullable=False),
    Column("first_seq", Integer),
    Column("n_changes", Integer, nullable=False),
    Column("column_names", LongText, nullable=False),
    Column("changes", LongText, nullable=False),
    Column("chain_sha256", Sha256),
    Index("ix_fillgate_audit_batches_run", "run_id", "batch"),
    Index("ix_fillgate_audit_batches_table", "table_name", "id"),
)

# The row index of the audit log: for every indexed batch, one entry per distinct row it
# changed, ``key_hash`` the first 8 bytes of SHA-256 over ``table_name NUL row_key`` as a signed
# 64-bit integer (fillgate.ledger.store.key_hash). ``fillgate history`` finds a row's batches
# here. Built lazily (since revision 0008): an apply writes only its packed batches; the index
# catches up on the batches it does not cover yet when a history is asked for
# (``Ledger.index_audit``), and history reads those not yet covered directly.
audit_keys = Table(
    "fillgate_audit_keys",
    metadata,
    Column("key_hash", BigInteger, primary_key=True, autoincrement=False),
    Column("batch_id", BigInteger, primary_key=True, autoincrement=False),
    sqlite_with_rowid=False,  # one b-tree: the entries are the primary key
)

# The batches the row index covers: one row per batch of fillgate_audit_batches whose entries
# are in fillgate_audit_keys (written in the same transaction as those entries).
audit_indexed = Table(
    "fillgate_audit_indexed",
    metadata,
    Column("batch_id", BigInteger, primary_key=True, autoincrement=False),
)

# ``fillgate_changes``: a VIEW unpacking fillgate_audit_batches, one row per changed field, as
# the table of the same name held them before revision 0005 (``id``: the batch's id times
# ID_FACTOR plus the change's place in its batch, 1, 2, ...). Declared apart from ``metadata``
# (the tables the migrations create) so that queries can name its columns.
ID_FACTOR = 1_000_000
views = MetaData()
changes = Table(
    "fillgate_changes",
    views,
    Column("id", BigInteger, primary_key=True),
    Column("run_id", String(26), nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("row_key", LongText, nullable=False),
    Column("column_name", String(128), nullable=False),
    Column("op", String(8), nullable=False),
    Column("old_value", LongText, nullable=False),
    Column("new_value", LongText, nullable=False),
    Column("source", String(255), nullable=False),
    Column("changed_at", Timestamp, nullable=False),
    Column("seq", Integer),
    Column("chain_sha256", Sha256),
)

errors = Table(
    "fillgate_errors",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("run_id", String(26), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("row_key", LongText),
    Column("column_name", String(128)),
    Column("error_type", String(255), nullable=False),
    Column("message", LongText, nullable=False),
    Column("fingerprint", String(32), nullable=False),
    Column("traceback", LongText),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_fillgate_errors_run", "run_id"),
)

locks = Table(
    "fillgate_locks",
    metadata,
    Column("name", String(191), primary_key=True),
    Column("run_id", String(26), nullable=False),
    Column("operator", String(255), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("acquired_at", Timestamp, nullable=False),
    Column("heartbeat_at", Timestamp, nullable=False),
)

APPEND_ONLY_TABLES = ("fillgate_audit_batches", "fillgate_errors")
"""Tables no statement may rewrite: UPDATE, DELETE, TRUNCATE and REPLACE are refused."""

# The names of the guard's foreign keys: InnoDB's refusal to TRUNCATE names the constraint.
GUARD_NAMES = {table: f"{table} is append-only" for table in APPEND_ONLY_TABLES}

audit_guard = Table(
    "fillgate_audit_guard",
    metadata,
    # MariaDB/MySQL only, and always empty. Triggers do not fire on TRUNCATE there, but InnoDB
    # refuses to TRUNCATE (or DROP) a table another table's foreign key references: this table
    # is what stops TRUNCATE of the append-only tables. (PostgreSQL has TRUNCATE triggers;
    # SQLite has no TRUNCATE.)
    Column("id", Integer, primary_key=True),
    Column("batch_id", BigInteger,
           ForeignKey("fillgate_audit_batches.id", name=GUARD_NAMES["fillgate_audit_batches"])),
    Column("error_id", BigInteger, ForeignKey("fillgate_errors.id", name=GUARD_NAMES["fillgate_errors"])),
)
GUARD_DIALECTS = ("mysql", "mariadb")
"""The backends that have ``fillgate_audit_guard``."""

# One row per committed batch of a run (an apply or revert batch, or a plan's progress save),
# written in the batch's own transaction. ``done``: the run's checkpoint (apply, revert) or rows
# read (plan) after the batch; ``paced_ms``/``held_ms``/``hold_reason``: the wait just before
# the batch (``--rate``/``--pause-between-batches``, and health checks holding the run).
batches = Table(
    "fillgate_batches",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("run_id", String(26), nullable=False),
    Column("batch", Integer, nullable=False),
    Column("done", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("writes", Integer, nullable=False),
    Column("conflicts", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("elapsed_ms", Integer, nullable=False),
    Column("paced_ms", Integer, nullable=False),
    Column("held_ms", Integer, nullable=False),
    Column("hold_reason", LongText),
    Column("committed_at", Timestamp, nullable=False),
    Index("ix_fillgate_batches_run", "run_id", "batch"),
)

# Who asked a run to pause, cancel, resume or be reverted from the web dashboard, and what came of it.
actions = Table(
    "fillgate_actions",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("run_id", String(26), nullable=False),
    Column("action", String(16), nullable=False),
    Column("operator", String(255), nullable=False),
    Column("outcome", LongText, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_fillgate_actions_run", "run_id"),
)

# Four-eyes approvals: who approved which plan file (by its SHA-256, the one its plan run
# recorded), from where (``cli`` or the dashboard), with an optional comment. One per operator
# and plan.
approvals = Table(
    "fillgate_approvals",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("plan_id", String(26), nullable=False),
    Column("plan_sha256", Sha256, nullable=False),
    Column("operator", String(255), nullable=False),
    Column("via", String(255), nullable=False),
    Column("comment", LongText),
    Column("created_at", Timestamp, nullable=False),
    UniqueConstraint("plan_sha256", "operator", name="uq_fillgate_approvals_plan_operator"),
    Index("ix_fillgate_approvals_plan", "plan_id"),
)

# One row per partition of a distributed run (a plan or an apply spread over Dask workers):
# ``run_id`` is the run the user sees, ``child_run_id`` the partition's own plan or apply run.
# A partition's apply batches update its row (status, checkpoint, counts) in the batch's own
# transaction, so a partition re-run by the cluster continues exactly where it committed.
partitions = Table(
    "fillgate_partitions",
    metadata,
    Column("run_id", String(26), primary_key=True),
    Column("part", Integer, primary_key=True, autoincrement=False),
    Column("child_run_id", String(26)),
    Column("lo", LongText),  # the key range, as JSON lists (NULL: unbounded)
    Column("hi", LongText),
    Column("plan_file", LongText),
    Column("plan_sha256", Sha256),
    Column("status", String(16), nullable=False),
    Column("checkpoint", Integer, nullable=False),
    Column("total", Integer),
    Column("counts", LongText, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Index("ix_fillgate_partitions_child", "child_run_id"),
)
