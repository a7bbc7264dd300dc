"""Packed audit batches: the audit of each committed batch is ONE row of
``fillgate_audit_batches`` (its changes as a JSON array), and ``fillgate_changes`` becomes a
view that unpacks them, one row per changed field with the columns the table had.

- ``fillgate_audit_batches`` is append-only like ``fillgate_changes`` was (the same triggers;
  on MariaDB/MySQL the guard table's foreign key now references it).
- ``fillgate_audit_keys``: one entry per (batch, row changed), by a 64-bit hash of the table and
  the row key, so ``fillgate history`` finds a row's batches without scanning the log.
- Every existing audit row is moved: consecutive rows of one run written at the same time (one
  batch) with consecutive positions become one packed row; each keeps its key, column, op,
  values, source, time, position and its own chain value (a sixth element of its entry). Their
  ids change: a row's id is now its batch's id times 1,000,000 plus its place in the batch.

Revision ID: 0005_packed_audit
Revises: 0004_batch_timeline
Create Date: 2026-11-29
"""

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005_packed_audit"
down_revision = "0004_batch_timeline"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
ID_FACTOR = 1_000_000
PACKED = "fillgate_audit_batches"

VIEWS = {
    "sqlite": f"""
CREATE VIEW fillgate_changes AS
SELECT b.id * {ID_FACTOR} + j.key + 1 AS id, b.run_id AS run_id, b.table_name AS table_name,
       json_extract(j.value, '$[0]') AS row_key, json_extract(j.value, '$[1]') AS column_name,
       json_extract(j.value, '$[2]') AS op, json_extract(j.value, '$[3]') AS old_value,
       json_extract(j.value, '$[4]') AS new_value, b.source AS source, b.changed_at AS changed_at,
       b.first_seq + j.key AS seq,
       COALESCE(json_extract(j.value, '$[5]'),
                CASE WHEN j.key = b.n_changes - 1 THEN b.chain_sha256 END) AS chain_sha256
FROM {PACKED} AS b, json_each(b.changes) AS j""",
    "postgresql": f"""
CREATE VIEW fillgate_changes AS
SELECT b.id * {ID_FACTOR} + j.n AS id, b.run_id, b.table_name,
       j.e->>0 AS row_key, j.e->>1 AS column_name, j.e->>2 AS op, j.e->>3 AS old_value, j.e->>4 AS new_value,
       b.source, b.changed_at, b.first_seq + CAST(j.n AS integer) - 1 AS seq,
       COALESCE(j.e->>5, CASE WHEN j.n = b.n_changes THEN b.chain_sha256 END) AS chain_sha256
FROM {PACKED} AS b CROSS JOIN LATERAL json_array_elements(CAST(b.changes AS json)) WITH ORDINALITY AS j(e, n)""",
    "mysql": f"""
CREATE VIEW fillgate_changes AS
SELECT b.id * {ID_FACTOR} + j.n AS id, b.run_id, b.table_name, j.row_key, j.column_name, j.op,
       j.old_value, j.new_value, b.source, b.changed_at, b.first_seq + j.n - 1 AS seq,
       COALESCE(j.chain, CASE WHEN j.n = b.n_changes THEN b.chain_sha256 END) AS chain_sha256
FROM {PACKED} AS b, JSON_TABLE(b.changes, '$[*]' COLUMNS (
    n FOR ORDINALITY,
    row_key LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[0]',
    column_name VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[1]',
    op VARCHAR(8) CHARACTER SET utf8mb4 PATH '$[2]',
    old_value LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[3]',
    new_value LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[4]',
    chain VARCHAR(64) CHARACTER SET utf8mb4 PATH '$[5]')) AS j""",
}


def _dialect() -> str:
    name = op.get_bind().dialect.name
    return "mysql" if name == "mariadb" else name


def _refuse(table: str, what: str) -> str:
    return f"{table} is append-only: {what} is not allowed"


def _triggers(dialect: str, table: str) -> list[str]:
    """The append-only triggers of revision 0003, for ``table``."""
    if dialect == "sqlite":
        return [
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{_refuse(table, 'UPDATE')}'); END",
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{_refuse(table, 'DELETE')}'); END",
            f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
            f"WHEN NEW.id > 0 AND EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id) "
            f"BEGIN SELECT RAISE(ABORT, '{_refuse(table, 'replacing an existing row')}'); END",
        ]
    if dialect == "postgresql":
        return [
            f"CREATE TRIGGER {table}_no_modify BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION fillgate_append_only()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION fillgate_append_only()",
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_modify",
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_truncate",
        ]
    return [
        f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} FOR EACH ROW "
        f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{_refuse(table, 'UPDATE')}'",
        f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} FOR EACH ROW "
        f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{_refuse(table, 'DELETE')}'",
    ]


def _guard_table(column: str, table: str) -> None:
    op.create_table(
        "fillgate_audit_guard",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(column, sa.BigInteger),
        sa.Column("error_id", sa.BigInteger),
        sa.ForeignKeyConstraint([column], [f"{table}.id"], name=f"{table} is append-only"),
        sa.ForeignKeyConstraint(["error_id"], ["fillgate_errors.id"], name="fillgate_errors is append-only"),
        mysql_engine="InnoDB",
    )


def key_hash(table: str, row_key: str) -> int:
    """As fillgate.ledger.store.key_hash (kept here: a migration does not change later)."""
    digest = hashlib.sha256(f"{table}\0{row_key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _old_rows(conn: Any) -> Iterator[Any]:
    last = -1
    while True:
        rows = conn.execute(sa.text(
            "SELECT id, run_id, table_name, row_key, column_name, op, old_value, new_value, source, changed_at, "
            "seq, chain_sha256 FROM fillgate_changes WHERE id > :last ORDER BY id LIMIT 5000"
        ), {"last": last}).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].id


def _continues(pack: list[Any], row: Any) -> bool:
    """``row`` was written in the same batch as ``pack``, right after it."""
    last = pack[-1]
    if (row.run_id, row.table_name, row.source, row.changed_at) != (
            last.run_id, last.table_name, last.source, last.changed_at):
        return False
    if last.seq is None and row.seq is None:
        return last.chain_sha256 is None and row.chain_sha256 is None
    return (type(last.seq) is int and type(row.seq) is int and row.seq == last.seq + 1
            and last.chain_sha256 is not None and row.chain_sha256 is not None)


def _packs(conn: Any) -> Iterator[list[Any]]:
    pack: list[Any] = []
    for row in _old_rows(conn):
        if pack and (not _continues(pack, row) or len(pack) >= 5000):
            yield pack
            pack = []
        pack.append(row)
    if pack:
        yield pack


def _time(value: Any) -> dt.datetime:
    """SQLite hands back a DATETIME written as text (by hand, or by an older fillgate) as text."""
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))


def _move_rows(conn: Any, packed: sa.Table, keys: sa.Table) -> None:
    """Every row of the old table into packed rows (read fully first: the writes go to new tables)."""
    numbers: dict[str, int] = {}
    for pack in list(_packs(conn)):
        first = pack[0]
        numbers[first.run_id] = numbers.get(first.run_id, 0) + 1
        entries = [[r.row_key, r.column_name, r.op, r.old_value, r.new_value]
                   + ([r.chain_sha256] if r.chain_sha256 is not None else []) for r in pack]
        batch_id = conn.execute(sa.insert(packed).values(
            run_id=first.run_id, batch=numbers[first.run_id], table_name=first.table_name, source=first.source,
            changed_at=_time(first.changed_at), first_seq=first.seq, n_changes=len(pack),
            column_names=json.dumps(sorted({r.column_name for r in pack})),
            changes=json.dumps(entries, ensure_ascii=False, separators=(",", ":")),
            chain_sha256=pack[-1].chain_sha256,
        )).inserted_primary_key[0]
        hashes = sorted({key_hash(first.table_name, r.row_key) for r in pack})
        conn.execute(sa.insert(keys), [{"key_hash": h, "batch_id": batch_id} for h in hashes])


def _create_tables() -> tuple[sa.Table, sa.Table]:
    packed = op.create_table(
        PACKED,
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("batch", sa.Integer, nullable=False),
        sa.Column("table_name", sa.String(128), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("changed_at", Timestamp, nullable=False),
        sa.Column("first_seq", sa.Integer),
        sa.Column("n_changes", sa.Integer, nullable=False),
        sa.Column("column_names", LongText, nullable=False),
        sa.Column("changes", LongText, nullable=False),
        sa.Column("chain_sha256", sa.String(64)),
        mysql_engine="InnoDB",
    )
    op.create_index("ix_fillgate_audit_batches_run", PACKED, ["run_id", "batch"])
    op.create_index("ix_fillgate_audit_batches_table", PACKED, ["table_name", "id"])
    keys = op.create_table(
        "fillgate_audit_keys",
        sa.Column("key_hash", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("batch_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sqlite_with_rowid=False,
        mysql_engine="InnoDB",
    )
    assert packed is not None and keys is not None
    return packed, keys


def upgrade() -> None:
    dialect = _dialect()
    packed, keys = _create_tables()
    conn = op.get_bind()
    _move_rows(conn, packed, keys)
    if dialect == "mysql":
        op.drop_table("fillgate_audit_guard")
    op.drop_table("fillgate_changes")  # its triggers go with it
    op.execute(VIEWS[dialect])
    for statement in _triggers(dialect, PACKED):
        op.execute(statement)
    if dialect == "mysql":
        _guard_table("batch_id", PACKED)


# --- downgrade: the table of revision 0004 again, filled from the view -------------------------


def _old_table() -> None:
    op.create_table(
        "fillgate_changes_0004",
        sa.Column("id", Serial, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("table_name", sa.String(128), nullable=False),
        sa.Column("row_key", LongText, nullable=False),
        sa.Column("column_name", sa.String(128), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("old_value", LongText, nullable=False),
        sa.Column("new_value", LongText, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("changed_at", Timestamp, nullable=False),
        sa.Column("seq", sa.Integer),
        sa.Column("chain_sha256", sa.String(64)),
        mysql_engine="InnoDB",
    )


def downgrade() -> None:
    dialect = _dialect()
    _old_table()
    columns = ("run_id, table_name, row_key, column_name, op, old_value, new_value, source, changed_at, seq, "
               "chain_sha256")
    op.execute(f"INSERT INTO fillgate_changes_0004 ({columns}) SELECT {columns} FROM fillgate_changes ORDER BY id")
    op.execute("DROP VIEW fillgate_changes")
    if dialect == "mysql":
        op.drop_table("fillgate_audit_guard")
    op.drop_table("fillgate_audit_keys")
    op.drop_table(PACKED)
    op.rename_table("fillgate_changes_0004", "fillgate_changes")
    op.create_index("ix_fillgate_changes_run", "fillgate_changes", ["run_id"])
    if dialect == "postgresql":
        op.create_index("ix_fillgate_changes_row", "fillgate_changes", ["row_key"], postgresql_using="hash")
    elif dialect == "mysql":
        op.execute("ALTER TABLE fillgate_changes ADD INDEX ix_fillgate_changes_row (row_key(255))")
    else:
        op.create_index("ix_fillgate_changes_row", "fillgate_changes", ["row_key"])
    for statement in _triggers(dialect, "fillgate_changes"):
        op.execute(statement)
    if dialect == "mysql":
        _guard_table("change_id", "fillgate_changes")
