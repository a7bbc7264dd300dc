"""A row's history from the audit log, with the typing mistakes told apart from "never changed".

``fillgate history people 42`` answers from ``fillgate_changes``. When nothing is recorded,
the answer is only "no recorded changes" if the question made sense: a table that is neither
in the database nor in the audit log, a column that is not in the table, or a key with the
wrong number of parts is a usage error naming the problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from fillgate.errors import UsageError
from fillgate.stamp import Connected
from fillgate.values import decode_key, key_candidates, split_key

MAX_TEXT_KEY_PARTS = 12  # every numeric part doubles the encodings to look up (number or text)


def _key_parts(raw: str) -> int:
    """How many parts the typed key has (``a,b``: 2; a JSON list: its length)."""
    text = raw.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            raise UsageError(f"key {raw!r} starts with '[' but is not a JSON list.") from None
        return len(parsed) if isinstance(parsed, list) else 0
    return len(split_key(text))


def _candidates(raw: str) -> list[str]:
    try:
        return key_candidates(raw)
    except UsageError:
        raise
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:  # a tagged value that does not decode
        raise UsageError(f"key {raw!r} holds a value fillgate cannot read: {exc}.") from None


def _table_shape(conn: Connected, table: str) -> tuple[bool, list[str], list[str]]:
    """(exists, columns, primary key columns) of ``table`` in the target database."""
    try:
        inspector = inspect(conn.engine)
        if not inspector.has_table(table):
            return False, [], []
        columns = [c["name"] for c in inspector.get_columns(table)]
        primary = list(inspector.get_pk_constraint(table).get("constrained_columns") or [])
    except SQLAlchemyError:
        return False, [], []
    return True, columns, primary


def row_history(conn: Connected, table: str, key: str, column: str | None = None) -> list[dict[str, Any]]:
    """Every recorded change of one row of ``table`` (``key`` as typed: ``42``, ``a,b`` or a
    JSON list), oldest first; only ``column``'s if given."""
    parts = _key_parts(key)
    if parts == 0:
        raise UsageError(f"key {key!r} must be a non-empty JSON list.")
    exists, columns, primary = _table_shape(conn, table)
    sample_key = conn.ledger.audited_key(table)
    if not exists and sample_key is None:
        raise UsageError(
            f"table '{table}' is not in the database of target '{conn.target.name}' and fillgate never "
            "changed it. Check the spelling (names are case-sensitive on some databases)."
        )
    if column is not None and column not in columns and column not in (
            audited_columns := conn.ledger.audited_columns(table)):
        known = ", ".join(columns or audited_columns)
        raise UsageError(f"column '{column}' is not a column of {table} (its columns: {known}).")
    arities = {len(primary)} if primary else set()
    if sample_key is not None:
        arities.add(len(decode_key(sample_key)))
    if arities and parts not in arities:
        if arities == {len(primary)}:
            shape = f"{len(primary)} column{'s' if len(primary) != 1 else ''} ({', '.join(primary)})"
        else:
            shape = " or ".join(f"{n} part{'s' if n != 1 else ''}" for n in sorted(arities))
        raise UsageError(
            f"key {key!r} has {parts} part{'s' if parts != 1 else ''} but {table}'s key has {shape}. "
            "Give every part, separated by commas (a,b) or as a JSON list ([1, \"b\"])."
        )
    if not key.strip().startswith("[") and parts > MAX_TEXT_KEY_PARTS:
        raise UsageError(f"key {key!r} has {parts} parts; give a key of more than {MAX_TEXT_KEY_PARTS} "
                         "parts as a JSON list.")
    candidates = _candidates(key)
    if sample_key is not None:
        _check_part_types(key, table, decode_key(sample_key), [decode_key(c) for c in candidates])
    return conn.ledger.history(table, candidates, column)


def _check_part_types(key: str, table: str, sample: Sequence[Any], readings: Sequence[Sequence[Any]]) -> None:
    """A key whose part can only be text where fillgate recorded whole numbers (``abc`` for an
    integer id) names no row that could ever have changed: a usage error, not "no changes"."""
    for i, recorded in enumerate(sample):
        if type(recorded) is not int:
            continue
        if not any(len(r) == len(sample) and type(r[i]) is int for r in readings):
            where = f"part {i + 1} of " if len(sample) > 1 else ""
            raise UsageError(
                f"key {key!r}: {where}{table}'s key is a whole number (fillgate recorded keys such as "
                f"{recorded}), and this is not one. Check the key."
            )
