"""fillgate's own tables (the ledger), as SQLAlchemy Core tables.

The initial Alembic migration creates exactly these; later schema changes are new
migrations under ``migrations/versions``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

VERSION_TABLE = "fillgate_alembic_version"

# Timestamps are naive UTC everywhere (DATETIME(6) on MariaDB for microseconds).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# An auto-incrementing 64-bit id (SQLite needs INTEGER for its rowid alias).
Serial = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

meta = Table(
    "fillgate_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
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
    Column("args", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("control", String(16)),
    Column("plan_id", String(26)),
    Column("plan_path", Text),
    Column("plan_sha256", String(64)),
    Column("parent_run_id", String(26)),
    Column("counts", Text, nullable=False),
    Column("checkpoint", Integer, nullable=False),
    Column("total", Integer),
    Column("message", Text),
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("heartbeat_at", Timestamp),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("details", Text),
    Index("ix_fillgate_runs_plan_id", "plan_id"),
    Index("ix_fillgate_runs_parent", "parent_run_id"),
    Index("ix_fillgate_runs_kind", "kind", "run_id"),
    Index("ix_fillgate_runs_status", "status", "run_id"),
    Index("ix_fillgate_runs_job", "job", "run_id"),
)

changes = Table(
    "fillgate_changes",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("run_id", String(26), nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("row_key", String(512), nullable=False),
    Column("column_name", String(128), nullable=False),
    Column("op", String(8), nullable=False),
    Column("old_value", Text, nullable=False),
    Column("new_value", Text, nullable=False),
    Column("source", String(255), nullable=False),
    Column("changed_at", Timestamp, nullable=False),
    Index("ix_fillgate_changes_run", "run_id"),
    Index("ix_fillgate_changes_row", "table_name", "row_key"),
)

errors = Table(
    "fillgate_errors",
    metadata,
    Column("id", Serial, primary_key=True, autoincrement=True),
    Column("run_id", String(26), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("row_key", String(512)),
    Column("column_name", String(128)),
    Column("error_type", String(255), nullable=False),
    Column("message", Text, nullable=False),
    Column("fingerprint", String(32), nullable=False),
    Column("traceback", Text),
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
    Column("hold_reason", Text),
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
    Column("outcome", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_fillgate_actions_run", "run_id"),
)
