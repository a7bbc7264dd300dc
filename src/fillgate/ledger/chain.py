"""The audit log's hash chain: tamper evidence written with every audit row.

The database refuses UPDATE, DELETE, TRUNCATE and REPLACE on ``fillgate_changes``, but the
owner of the tables can drop or disable those guards. What they cannot do unnoticed is change
the audit rows of a run without also recomputing the run's hash chain, and they cannot change
a chain head that has left the database (the ``run_finished`` event, shipped to a log they do
not control). ``integrity.py`` (``fillgate verify``) recomputes every chain.

The chain of a run (apply or revert), SHA-256 in lowercase hex throughout:

    start     = sha256("fillgate-audit-v1\n" + run_id)
    chain[i]  = sha256(chain[i-1] + canonical(row i))        for i = 1, 2, ... (its ``seq``)

where ``canonical(row)`` concatenates, for each of ``run_id, table_name, source, changed_at,
seq, row_key, column_name, op, old_value, new_value`` in this order, the field's length in
characters, a colon and the field (``7:[12345]``), and the hash is taken over the UTF-8 bytes.
Length prefixes make the text unambiguous whatever the fields hold. The fields are the text
``fillgate_changes`` stores (the key and the values are their JSON text); ``seq`` is written in
decimal and ``changed_at`` (naive UTC) as ``YYYY-MM-DDTHH:MM:SS.ffffff``: every backend keeps
microseconds, so the text read back is the text written. The row's ``id`` is not covered: the
database assigns it. Each packed batch (``fillgate_audit_batches``) stores the ``seq`` of its
first row and the chain value after its last (rows moved from a ledger older than revision
0005 keep their own chain value in their entry); the run stores ``audit_rows`` (the last
``seq``) and ``audit_sha256`` (the last chain value, or ``start`` for a run that wrote
nothing), written in the same transaction as the rows.

Version 2 (runs started since fillgate 0.1's packed audit; the run's ``args`` say
``"audit_chain": 2``) links whole batches, one SHA-256 per batch instead of one per row:

    start     = sha256("fillgate-audit-v2\n" + run_id)
    chain[b]  = sha256(chain[b-1] + fields(run_id, table_name, source, changed_at, first_seq,
                                            n_changes, changes))

with ``fields`` as above and ``changes`` the batch's JSON text exactly as the database holds
it: every byte of every entry is covered, and a batch is checked as one (a changed value is
named as its batch's rows, as version 1 already did for the rows of one packed batch).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VERSION = "fillgate-audit-v1"
VERSIONS = {1: VERSION, 2: "fillgate-audit-v2"}
CURRENT = 2  # the version new runs use


def start(run_id: str, version: int = 1) -> str:
    """The chain value before a run's first audit row."""
    return hashlib.sha256(f"{VERSIONS[version]}\n{run_id}".encode()).hexdigest()


def canonical_time(value: dt.datetime) -> str:
    return value.replace(tzinfo=None).isoformat(timespec="microseconds")


def _fields(*fields: str) -> str:
    return "".join(f"{len(f)}:{f}" for f in fields)


def link(previous: str, run_id: str, seq: int, table: str, key: str, column: str, op: str, old: str,
         new: str, source: str, stamp: str) -> str:
    """The chain value of one audit row (``stamp``: ``canonical_time`` of ``changed_at``)."""
    text = previous + _fields(run_id, table, source, stamp, str(seq), key, column, op, old, new)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def batch_link(previous: str, run_id: str, table: str, source: str, stamp: str, first_seq: int, n_changes: int,
               changes: str) -> str:
    """The chain value after one packed batch (version 2; ``stamp``: ``canonical_time``)."""
    text = previous + _fields(run_id, table, source, stamp, str(first_seq), str(n_changes), changes)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def row_link(previous: str, row: Any) -> str:
    """The chain value of a ``fillgate_changes`` row as the database holds it now."""
    return link(previous, row.run_id, row.seq, row.table_name, row.row_key, row.column_name, row.op,
                row.old_value, row.new_value, row.source, canonical_time(row.changed_at))


@dataclass(frozen=True)
class AuditChain:
    """How far a run's chain got: ``rows`` audit rows, the last one's chain value ``sha256``."""

    rows: int
    sha256: str
    version: int = 1

    @classmethod
    def start(cls, run_id: str, version: int = 1) -> AuditChain:
        return cls(0, start(run_id, version), version)

    def follow_batch(self, run_id: str, table: str, source: str, when: dt.datetime,
                     items: Sequence[Sequence[str]], changes: str) -> AuditChain:
        """The chain after one packed batch: its rows ``items`` and their JSON text
        ``changes`` as stored (version 2: one hash over the text; version 1: one per row)."""
        if self.version == 1:
            return self.follow(run_id, table, source, when, items)
        sha = batch_link(self.sha256, run_id, table, source, canonical_time(when), self.rows + 1, len(items), changes)
        return AuditChain(self.rows + len(items), sha, self.version)

    def extend(
        self, run_id: str, table: str, source: str, when: dt.datetime,
        items: Sequence[Sequence[str]],
    ) -> tuple[AuditChain, list[tuple[int, str]]]:
        """Chain one batch of audit rows ``(row_key, column, op, old, new)``: the chain after
        them, and each row's ``(seq, chain_sha256)``."""
        head = _fields(run_id, table, source, canonical_time(when))  # the same for the whole batch
        sha256 = hashlib.sha256
        previous, seq = self.sha256, self.rows
        out: list[tuple[int, str]] = []
        for key, column, op, old, new in items:
            seq += 1
            n = str(seq)
            text = (f"{previous}{head}{len(n)}:{n}{len(key)}:{key}{len(column)}:{column}{len(op)}:{op}"
                    f"{len(old)}:{old}{len(new)}:{new}")  # link(), inlined: this runs once per audit row
            previous = sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            out.append((seq, previous))
        return AuditChain(seq, previous, self.version), out

    def follow(
        self, run_id: str, table: str, source: str, when: dt.datetime,
        items: Sequence[Sequence[str]],
    ) -> AuditChain:
        """The chain after one batch of audit rows ``(row_key, column, op, old, new)`` (what
        :meth:`extend` returns first, without each row's value)."""
        return self.extend(run_id, table, source, when, items)[0]
