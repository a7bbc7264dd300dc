"""Audit integrity: unbounded values and keys, every rewrite path refused, tamper evidence.

- Every TEXT column becomes LONGTEXT on MariaDB/MySQL (TEXT holds 64 KiB there; an audit value
  must hold whatever the user's column holds), and ``row_key`` becomes unbounded text on every
  backend (its index: a hash index on PostgreSQL, a 255-character prefix on MariaDB/MySQL).
- ``fillgate_changes`` and ``fillgate_errors`` refuse every rewrite the database can stop:
  UPDATE and DELETE (triggers, as before for ``fillgate_changes``), REPLACE (SQLite: a BEFORE
  INSERT trigger refusing an id that exists, since its REPLACE deletes the old row without
  firing DELETE triggers; MariaDB/MySQL: REPLACE fires the DELETE trigger), upserts (they fire
  the UPDATE trigger), TRUNCATE (PostgreSQL: a trigger; MariaDB/MySQL, where no trigger fires
  on TRUNCATE: the always-empty ``fillgate_audit_guard`` table, whose foreign keys make InnoDB
  refuse TRUNCATE and DROP).
  PostgreSQL's triggers fire ALWAYS, so ``session_replication_role = replica`` does not
  silence them.
- Tamper evidence: ``fillgate_changes.seq`` and ``chain_sha256`` (the row's place in its run and
  the run's hash chain up to it), ``fillgate_runs.audit_rows`` and ``audit_sha256`` (the chain's
  length and head, written in the same transaction as the rows). Rows and runs that exist
  already keep NULL there: ``fillgate verify`` reports those runs as predating tamper evidence.
  ``fillgate_meta.audit_evidence_since`` is a ULID of the upgrade: a run with a later id and
  no tamper evidence was stripped of it (or written by an older fillgate).

Existing rows are kept, ids included. SQLite changes a column's declared type only by copying
the table (triggers are created again afterwards); MariaDB copies each altered table once.

Revision ID: 0003_audit_integrity
Revises: 0002_run_details
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from ulid import ULID

revision = "0003_audit_integrity"
down_revision = "0002_run_details"
branch_labels = None
depends_on = None

TABLES = ("fillgate_changes", "fillgate_errors")


def _refuse(table: str, what: str) -> str:
    return f"{table} is append-only: {what} is not allowed"


def _sqlite_triggers(table: str) -> list[str]:
    # NEW.id is -1 in a BEFORE INSERT trigger when the statement leaves the id to SQLite, so
    # only an INSERT naming an id that exists (INSERT OR REPLACE, REPLACE) is refused.
    return [
        f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{_refuse(table, 'UPDATE')}'); END",
        f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{_refuse(table, 'DELETE')}'); END",
        f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
        f"WHEN NEW.id > 0 AND EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id) "
        f"BEGIN SELECT RAISE(ABORT, '{_refuse(table, 'replacing an existing row')}'); END",
    ]


def _mysql_triggers(table: str) -> list[str]:
    return [
        f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} FOR EACH ROW "
        f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{_refuse(table, 'UPDATE')}'",
        f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} FOR EACH ROW "
        f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{_refuse(table, 'DELETE')}'",
    ]


def _postgres_triggers(table: str) -> list[str]:
    return [
        f"CREATE TRIGGER {table}_no_modify BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION fillgate_append_only()",
        f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION fillgate_append_only()",
        # ALWAYS: also in sessions with session_replication_role = replica
        f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_modify",
        f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_truncate",
    ]


LONGTEXT_COLUMNS = {
    "fillgate_meta": [("value", False)],
    "fillgate_runs": [("args", False), ("plan_path", True), ("counts", False), ("message", True),
                      ("details", True)],
    "fillgate_changes": [("row_key", False), ("old_value", False), ("new_value", False)],
    "fillgate_errors": [("row_key", True), ("message", False), ("traceback", True)],
}


def _guard_table() -> None:
    """MariaDB/MySQL: triggers do not fire on TRUNCATE, but InnoDB refuses to TRUNCATE (or
    DROP) a table that another table's foreign key references. The constraints are named so
    that the refusal says why."""
    op.create_table(
        "fillgate_audit_guard",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("change_id", sa.BigInteger),
        sa.Column("error_id", sa.BigInteger),
        sa.ForeignKeyConstraint(["change_id"], ["fillgate_changes.id"], name="fillgate_changes is append-only"),
        sa.ForeignKeyConstraint(["error_id"], ["fillgate_errors.id"], name="fillgate_errors is append-only"),
        mysql_engine="InnoDB",
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("fillgate_runs", sa.Column("audit_rows", sa.Integer))
    op.add_column("fillgate_runs", sa.Column("audit_sha256", sa.String(64)))
    if dialect == "sqlite":
        _upgrade_sqlite()
    elif dialect == "postgresql":
        _upgrade_postgresql()
    else:
        _upgrade_mysql()
        _guard_table()
    op.execute(sa.text("INSERT INTO fillgate_meta (name, value) VALUES ('audit_evidence_since', :since)")
               .bindparams(since=str(ULID())))


def _upgrade_sqlite() -> None:
    # The declared type of row_key changes: SQLite copies the table (rows and ids kept). The
    # copy drops the old table's triggers, so they are created again, with the new one.
    with op.batch_alter_table("fillgate_changes", recreate="always") as batch:
        batch.alter_column("row_key", type_=sa.Text, existing_nullable=False)
        batch.add_column(sa.Column("seq", sa.Integer))
        batch.add_column(sa.Column("chain_sha256", sa.String(64)))
        batch.drop_index("ix_fillgate_changes_row")
        batch.create_index("ix_fillgate_changes_row", ["row_key"])
    with op.batch_alter_table("fillgate_errors", recreate="always") as batch:
        batch.alter_column("row_key", type_=sa.Text, existing_nullable=True)
    for table in TABLES:
        for statement in _sqlite_triggers(table):
            op.execute(statement)


def _upgrade_postgresql() -> None:
    op.execute("ALTER TABLE fillgate_changes ALTER COLUMN row_key TYPE text, "
               "ADD COLUMN seq integer, ADD COLUMN chain_sha256 varchar(64)")
    op.execute("ALTER TABLE fillgate_errors ALTER COLUMN row_key TYPE text")
    op.drop_index("ix_fillgate_changes_row", "fillgate_changes")
    op.create_index("ix_fillgate_changes_row", "fillgate_changes", ["row_key"], postgresql_using="hash")
    # one function for both tables; it names the table and the statement it refuses
    op.execute("DROP TRIGGER fillgate_changes_no_modify ON fillgate_changes")
    op.execute("DROP TRIGGER fillgate_changes_no_truncate ON fillgate_changes")
    op.execute("DROP FUNCTION fillgate_changes_append_only()")
    op.execute(
        "CREATE FUNCTION fillgate_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP; END $$"
    )
    for table in TABLES:
        for statement in _postgres_triggers(table):
            op.execute(statement)


def _upgrade_mysql() -> None:
    # one ALTER TABLE per table: MariaDB copies a table once per statement
    for table, columns in LONGTEXT_COLUMNS.items():
        parts = [f"MODIFY {name} LONGTEXT{'' if nullable else ' NOT NULL'}" for name, nullable in columns]
        if table == "fillgate_changes":
            parts = ["DROP INDEX ix_fillgate_changes_row", *parts, "ADD COLUMN seq INTEGER",
                     "ADD COLUMN chain_sha256 VARCHAR(64)", "ADD INDEX ix_fillgate_changes_row (row_key(255))"]
        op.execute(f"ALTER TABLE {table} {', '.join(parts)}")
    for statement in _mysql_triggers("fillgate_errors"):
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute("DELETE FROM fillgate_meta WHERE name = 'audit_evidence_since'")
    if dialect == "sqlite":
        for table in TABLES:
            for name in ("no_update", "no_delete", "no_replace"):
                op.execute(f"DROP TRIGGER {table}_{name}")
        with op.batch_alter_table("fillgate_changes", recreate="always") as batch:
            batch.drop_index("ix_fillgate_changes_row")
            batch.drop_column("seq")
            batch.drop_column("chain_sha256")
            batch.alter_column("row_key", type_=sa.String(512), existing_nullable=False)
            batch.create_index("ix_fillgate_changes_row", ["table_name", "row_key"])
        with op.batch_alter_table("fillgate_errors", recreate="always") as batch:
            batch.alter_column("row_key", type_=sa.String(512), existing_nullable=True)
        for statement in _sqlite_triggers("fillgate_changes")[:2]:
            op.execute(statement)
    elif dialect == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER {table}_no_modify ON {table}")
            op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION fillgate_append_only()")
        op.drop_index("ix_fillgate_changes_row", "fillgate_changes")
        op.execute("ALTER TABLE fillgate_changes DROP COLUMN seq, DROP COLUMN chain_sha256, "
                   "ALTER COLUMN row_key TYPE varchar(512)")
        op.execute("ALTER TABLE fillgate_errors ALTER COLUMN row_key TYPE varchar(512)")
        op.create_index("ix_fillgate_changes_row", "fillgate_changes", ["table_name", "row_key"])
        op.execute(
            "CREATE FUNCTION fillgate_changes_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'fillgate_changes is append-only: % is not allowed', TG_OP; END $$"
        )
        op.execute("CREATE TRIGGER fillgate_changes_no_modify BEFORE UPDATE OR DELETE ON fillgate_changes "
                   "FOR EACH ROW EXECUTE FUNCTION fillgate_changes_append_only()")
        op.execute("CREATE TRIGGER fillgate_changes_no_truncate BEFORE TRUNCATE ON fillgate_changes "
                   "FOR EACH STATEMENT EXECUTE FUNCTION fillgate_changes_append_only()")
    else:
        op.drop_table("fillgate_audit_guard")
        op.execute("DROP TRIGGER fillgate_errors_no_update")
        op.execute("DROP TRIGGER fillgate_errors_no_delete")
        for table, columns in LONGTEXT_COLUMNS.items():
            parts = [
                f"MODIFY {name} {'VARCHAR(512)' if name == 'row_key' else 'TEXT'}{'' if nullable else ' NOT NULL'}"
                for name, nullable in columns
            ]
            if table == "fillgate_changes":
                parts = ["DROP INDEX ix_fillgate_changes_row", *parts, "DROP COLUMN seq", "DROP COLUMN chain_sha256",
                         "ADD INDEX ix_fillgate_changes_row (table_name, row_key)"]
            op.execute(f"ALTER TABLE {table} {', '.join(parts)}")
    with op.batch_alter_table("fillgate_runs") as batch:
        batch.drop_column("audit_sha256")
        batch.drop_column("audit_rows")

