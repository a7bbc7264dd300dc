"""Run details: slowest rows, first lookup mismatch and other facts `fillgate show` prints.

Revision ID: 0002_run_details
Revises: 0001_ledger
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_run_details"
down_revision = "0001_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("fillgate_runs", sa.Column("details", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fillgate_runs") as batch:
        batch.drop_column("details")
