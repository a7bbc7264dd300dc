"""Partitions of distributed runs: one row per partition of a distributed plan or apply run
(its key range, plan file and SHA-256, its own plan or apply run, status, checkpoint and
counts). A partition's apply batches update its row in the batch's own transaction.

Revision ID: 0006_partitions
Revises: 0004_batch_timeline
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0006_partitions"
down_revision = "0005_packed_audit"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "fillgate_partitions",
        sa.Column("run_id", sa.String(26), primary_key=True),
        sa.Column("part", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("child_run_id", sa.String(26)),
        sa.Column("lo", LongText),
        sa.Column("hi", LongText),
        sa.Column("plan_file", LongText),
        sa.Column("plan_sha256", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("checkpoint", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer),
        sa.Column("counts", LongText, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_index("ix_fillgate_partitions_child", "fillgate_partitions", ["child_run_id"])


def downgrade() -> None:
    op.drop_table("fillgate_partitions")
