"""Production workflow: approvals of plans (four-eyes), one row per operator who approved a
plan file, by the plan's SHA-256.

Revision ID: 0007_workflow
Revises: 0006_partitions
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0007_workflow"
down_revision = "0006_partitions"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "fillgate_approvals",
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("plan_id", sa.String(26), nullable=False),
        sa.Column("plan_sha256", sa.String(64), nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("via", sa.String(255), nullable=False),
        sa.Column("comment", LongText),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.UniqueConstraint("plan_sha256", "operator", name="uq_fillgate_approvals_plan_operator"),
    )
    op.create_index("ix_fillgate_approvals_plan", "fillgate_approvals", ["plan_id"])


def downgrade() -> None:
    op.drop_index("ix_fillgate_approvals_plan", "fillgate_approvals")
    op.drop_table("fillgate_approvals")
