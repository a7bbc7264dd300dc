"""The audit log's row index is built lazily: an apply writes only its packed audit batches,
and ``fillgate_audit_keys`` catches up on the batches it does not cover yet when a history is
asked for. ``fillgate_audit_indexed`` names the batches the index covers (one row per batch).

Upgrade: every batch written until now was indexed as it was written, so each one is recorded
as covered. Downgrade: revision 0007 indexes every batch as it writes it and reads only the
index, so the batches not covered yet are indexed first.

Revision ID: 0008_lazy_row_index
Revises: 0007_workflow
Create Date: 2026-11-29
"""

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008_lazy_row_index"
down_revision = "0007_workflow"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fillgate_audit_indexed",
        sa.Column("batch_id", sa.BigInteger, primary_key=True, autoincrement=False),
        mysql_engine="InnoDB",
    )
    op.execute("INSERT INTO fillgate_audit_indexed (batch_id) SELECT id FROM fillgate_audit_batches")


def _key_hash(table: str, row_key: str) -> int:
    """fillgate.ledger.store.key_hash as of this revision."""
    digest = hashlib.sha256(f"{table}\0{row_key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _index_backlog(conn: Any) -> None:
    unindexed = sa.text(
        "SELECT id, table_name, changes FROM fillgate_audit_batches b WHERE NOT EXISTS "
        "(SELECT 1 FROM fillgate_audit_indexed i WHERE i.batch_id = b.id) ORDER BY id"
    )
    for batch_id, table, changes in conn.execute(unindexed).all():
        hashes = sorted({_key_hash(table, entry[0]) for entry in json.loads(changes)})
        if hashes:
            conn.execute(sa.text("INSERT INTO fillgate_audit_keys (key_hash, batch_id) VALUES (:h, :b)"),
                         [{"h": h, "b": batch_id} for h in hashes])


def downgrade() -> None:
    _index_backlog(op.get_bind())
    op.drop_table("fillgate_audit_indexed")
