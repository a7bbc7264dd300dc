"""Batch timeline and recorded actions: one row per committed batch of a run (its counts, time,
pacing and holds), and one row per pause/cancel/resume/revert asked for from the web dashboard.

Revision ID: 0004_batch_timeline
Revises: 0003_audit_integrity
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004_batch_timeline"
down_revision = "0003_audit_integrity"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "fillgate_batches",
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("batch", sa.Integer, nullable=False),
        sa.Column("done", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("writes", sa.Integer, nullable=False),
        sa.Column("conflicts", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("elapsed_ms", sa.Integer, nullable=False),
        sa.Column("paced_ms", sa.Integer, nullable=False),
        sa.Column("held_ms", sa.Integer, nullable=False),
        sa.Column("hold_reason", LongText),
        sa.Column("committed_at", Timestamp, nullable=False),
    )
    op.create_index("ix_fillgate_batches_run", "fillgate_batches", ["run_id", "batch"])
    op.create_table(
        "fillgate_actions",
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("outcome", LongText, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_index("ix_fillgate_actions_run", "fillgate_actions", ["run_id"])
    # the dashboard's run list filters by kind, status and job, newest first
    op.create_index("ix_fillgate_runs_kind", "fillgate_runs", ["kind", "run_id"])
    op.create_index("ix_fillgate_runs_status", "fillgate_runs", ["status", "run_id"])
    op.create_index("ix_fillgate_runs_job", "fillgate_runs", ["job", "run_id"])


def downgrade() -> None:
    for name in ("ix_fillgate_runs_job", "ix_fillgate_runs_status", "ix_fillgate_runs_kind"):
        op.drop_index(name, "fillgate_runs")
    op.drop_table("fillgate_actions")
    op.drop_table("fillgate_batches")
