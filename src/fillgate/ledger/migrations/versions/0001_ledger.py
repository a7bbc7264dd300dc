"""The ledger: meta, runs, the append-only change log, errors and locks.

Revision ID: 0001_ledger
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001_ledger"
down_revision = None
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

APPEND_ONLY = "fillgate_changes is append-only"

TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER fillgate_changes_no_update BEFORE UPDATE ON fillgate_changes "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: UPDATE is not allowed'); END",
        "CREATE TRIGGER fillgate_changes_no_delete BEFORE DELETE ON fillgate_changes "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: DELETE is not allowed'); END",
    ],
    "postgresql": [
        "CREATE FUNCTION fillgate_changes_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN RAISE EXCEPTION '{APPEND_ONLY}: % is not allowed', TG_OP; END $$",
        "CREATE TRIGGER fillgate_changes_no_modify BEFORE UPDATE OR DELETE ON fillgate_changes "
        "FOR EACH ROW EXECUTE FUNCTION fillgate_changes_append_only()",
        "CREATE TRIGGER fillgate_changes_no_truncate BEFORE TRUNCATE ON fillgate_changes "
        "FOR EACH STATEMENT EXECUTE FUNCTION fillgate_changes_append_only()",
    ],
    "mysql": [
        "CREATE TRIGGER fillgate_changes_no_update BEFORE UPDATE ON fillgate_changes FOR EACH ROW "
        f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{APPEND_ONLY}: UPDATE is not allowed'",
        "CREATE TRIGGER fillgate_changes_no_delete BEFORE DELETE ON fillgate_changes FOR EACH ROW "
        f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{APPEND_ONLY}: DELETE is not allowed'",
    ],
}


def upgrade() -> None:
    op.create_table(
        "fillgate_meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "fillgate_runs",
        sa.Column("run_id", sa.String(26), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job", sa.String(255)),
        sa.Column("table_name", sa.String(128)),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("environment", sa.String(128), nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("control", sa.String(16)),
        sa.Column("plan_id", sa.String(26)),
        sa.Column("plan_path", sa.Text),
        sa.Column("plan_sha256", sa.String(64)),
        sa.Column("parent_run_id", sa.String(26)),
        sa.Column("counts", sa.Text, nullable=False),
        sa.Column("checkpoint", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer),
        sa.Column("message", sa.Text),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("started_at", Timestamp),
        sa.Column("finished_at", Timestamp),
        sa.Column("heartbeat_at", Timestamp),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
    )
    op.create_index("ix_fillgate_runs_plan_id", "fillgate_runs", ["plan_id"])
    op.create_index("ix_fillgate_runs_parent", "fillgate_runs", ["parent_run_id"])
    op.create_table(
        "fillgate_changes",
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("table_name", sa.String(128), nullable=False),
        sa.Column("row_key", sa.String(512), nullable=False),
        sa.Column("column_name", sa.String(128), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("old_value", sa.Text, nullable=False),
        sa.Column("new_value", sa.Text, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("changed_at", Timestamp, nullable=False),
    )
    op.create_index("ix_fillgate_changes_run", "fillgate_changes", ["run_id"])
    op.create_index("ix_fillgate_changes_row", "fillgate_changes", ["table_name", "row_key"])
    op.create_table(
        "fillgate_errors",
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("row_key", sa.String(512)),
        sa.Column("column_name", sa.String(128)),
        sa.Column("error_type", sa.String(255), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("traceback", sa.Text),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_index("ix_fillgate_errors_run", "fillgate_errors", ["run_id"])
    op.create_table(
        "fillgate_locks",
        sa.Column("name", sa.String(191), primary_key=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("operator", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("acquired_at", Timestamp, nullable=False),
        sa.Column("heartbeat_at", Timestamp, nullable=False),
    )
    dialect = op.get_bind().dialect.name
    for statement in TRIGGERS["mysql" if dialect == "mariadb" else dialect]:
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP TABLE fillgate_changes CASCADE")
        op.execute("DROP FUNCTION fillgate_changes_append_only()")
    else:
        op.drop_table("fillgate_changes")
    for table in ("fillgate_locks", "fillgate_errors", "fillgate_runs", "fillgate_meta"):
        op.drop_table(table)
