"""``fillgate verify``: the audit log checked against its tamper evidence (``chain.py``).

The database refuses UPDATE, DELETE, TRUNCATE and REPLACE on ``fillgate_changes``, but the
owner of the tables can drop or disable those guards. What they cannot do unnoticed is change
the audit rows of a run without also recomputing the run's hash chain, and they cannot change
a chain head that has left the database (the ``run_finished`` event, shipped to a log they do
not control). ``fillgate verify`` recomputes every chain and says exactly what differs.

How the chain of a run is computed is defined once, in ``chain.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, inspect, select

from fillgate.errors import RunStateError, UsageError
from fillgate.ledger import schema
from fillgate.ledger.chain import batch_link, canonical_time, row_link, start
from fillgate.ledger.schema import ID_FACTOR
from fillgate.ledger.store import AuditRow, Ledger, Run, unpack
from fillgate.runs import WRITING_KINDS

MAX_FINDINGS = 20
"""Findings kept per run for the report (the counts of missing, added and altered rows are
always complete)."""

_SHA256 = re.compile(r"[0-9a-f]{64}")

# --- anchors: chain heads recorded outside the database ---------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A chain head a ``run_finished`` event recorded: the run's first ``rows`` audit rows
    hashed to ``sha256``. ``where`` is ``file:line``."""

    rows: int
    sha256: str
    where: str


@dataclass
class Anchors:
    """Anchors of this target's runs, read from events files."""

    by_run: dict[str, list[Anchor]] = field(default_factory=dict)
    other_targets: int = 0  # run_finished events of runs on other targets, not checked
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(a) for a in self.by_run.values())


def read_anchors(paths: Iterable[str | Path], target: str) -> Anchors:
    """The audit hashes that ``run_finished`` events in ``paths`` (``--events`` files) recorded
    for runs of ``target`` (named by their ``run_started`` event)."""
    anchors = Anchors()
    found: list[tuple[str, Anchor]] = []
    targets: dict[str, Any] = {}
    for raw in paths:
        path = Path(raw)
        anchors.files.append(str(path))
        if path.exists() and not path.is_file():  # a device (/dev/zero), a FIFO: never read to the end
            raise UsageError(f"events file {path} is not a regular file; give a file written by --events.")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot read events file {path}: {reason}.") from None
        # split on "\n" only: a value may hold "\x85" or "\u2028", which str.splitlines() also splits on
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                raise UsageError(
                    f"{where} is not a JSON line; an events file holds one JSON object per line "
                    "(as written by --events). Remove or repair that line."
                ) from None
            if not isinstance(event, dict):
                raise UsageError(f"{where} is not a JSON object; an events file holds one JSON object per line.")
            run_id = event.get("run_id")
            if event.get("event") == "run_started" and isinstance(run_id, str):
                targets[run_id] = event.get("target")
            if event.get("event") != "run_finished" or event.get("audit_sha256") is None:
                continue
            rows, sha = event.get("audit_rows"), event.get("audit_sha256")
            if (not isinstance(run_id, str) or type(rows) is not int or rows < 0 or not isinstance(sha, str)
                    or not _SHA256.fullmatch(sha)):
                raise UsageError(
                    f"{where}: a run_finished event needs a run_id, audit_rows (an integer >= 0) and "
                    f"audit_sha256 (64 hex digits); found run_id={run_id!r}, audit_rows={rows!r}, "
                    f"audit_sha256={sha!r}."
                )
            found.append((run_id, Anchor(rows, sha, where)))
    for run_id, anchor in found:
        if targets.get(run_id, target) != target:
            anchors.other_targets += 1
        else:
            anchors.by_run.setdefault(run_id, []).append(anchor)
    return anchors


# --- verify ---------------------------------------------------------------------------------


@dataclass
class Finding:
    """One difference between the audit rows and their tamper evidence."""

    kind: str  # missing, added, altered, record, anchor, orphan, run_missing
    message: str
    row_id: int | None = None  # the row concerned (missing rows: the row after the gap)
    seq: int | None = None  # its position in the run (missing rows: the first missing)
    rows: int = 1  # rows concerned

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunCheck:
    """The verdict on one run: ``ok``, ``tampered``, or ``predates`` (written before the
    ledger kept tamper evidence: nothing to check it against)."""

    run_id: str
    kind: str
    status: str
    table: str | None
    state: str = "ok"
    rows: int = 0  # audit rows found
    recorded_rows: int | None = None
    recorded_sha256: str | None = None
    computed_sha256: str | None = None
    missing: int = 0
    added: int = 0
    altered: int = 0
    anchors: int = 0  # anchors checked
    findings: list[Finding] = field(default_factory=list)
    more_findings: int = 0  # findings beyond MAX_FINDINGS (counted, not kept)

    def add(self, finding: Finding) -> None:
        self.state = "tampered"
        if finding.kind in ("missing", "added", "altered"):
            setattr(self, finding.kind, getattr(self, finding.kind) + finding.rows)
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)
        else:
            self.more_findings += 1

    @property
    def first(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "findings"}
        out["findings"] = [f.to_json() for f in self.findings]
        return out


@dataclass
class VerifyReport:
    target: str
    runs: list[RunCheck]
    findings: list[Finding] = field(default_factory=list)  # not tied to one run of the ledger
    anchors: Anchors = field(default_factory=Anchors)
    whole_ledger: bool = True

    @property
    def ok(self) -> bool:
        return not self.findings and all(r.state != "tampered" for r in self.runs)

    @property
    def tampered(self) -> list[RunCheck]:
        return [r for r in self.runs if r.state == "tampered"]

    @property
    def predating(self) -> list[RunCheck]:
        return [r for r in self.runs if r.state == "predates"]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "ok": self.ok, "whole_ledger": self.whole_ledger,
            "runs": [r.to_json() for r in self.runs], "findings": [f.to_json() for f in self.findings],
            "anchors": {"files": self.anchors.files, "checked": len(self.anchors),
                        "other_targets": self.anchors.other_targets},
        }


def _describe(row: Any) -> str:
    return f"row id {row.id} (key {row.row_key}, column {row.column_name})"


def _describe_span(rows: Sequence[AuditRow]) -> str:
    if len(rows) == 1:
        return f"{_describe(rows[0])} at position {rows[0].seq}"
    return (f"rows id {rows[0].id}-{rows[-1].id} (positions {rows[0].seq}-{rows[-1].seq}, one batch; the batch "
            "keeps one chain value, so which of them is not known)")


@dataclass
class _Walk:
    """Where the check of one run's chain is: the next position expected, the chain value as
    stored (each batch's) and as recomputed from the rows (``pure``), and the values at the
    positions anchors name."""

    check: RunCheck
    run: Run
    recorded: int
    wanted: set[int]
    stored: str
    pure: str
    seen: dict[int, str]
    expected: int = 1
    last_id: int | None = None
    reread: bool = False
    version: int = 1  # of the run's chain: 2 links whole batches


def check_run(ledger: Ledger, run: Run, anchors: Sequence[Anchor] = (), since: str | None = None) -> RunCheck:
    """Recompute one run's chain from its packed audit batches and compare. A run still
    writing is checked up to the batches committed when its rows were read (a batch past the
    run's record makes verify read the record again)."""
    check = RunCheck(run.run_id, run.kind, run.status, run.table_name, recorded_rows=run.audit_rows,
                     recorded_sha256=run.audit_sha256)
    if run.audit_rows is None or run.audit_sha256 is None:
        return _check_predating(ledger, run, check, anchors, since)
    first = start(run.run_id, run.audit_chain)
    walk = _Walk(check, run, run.audit_rows, {a.rows for a in anchors}, first, first, {0: first},
                 version=run.audit_chain)
    for batch in ledger.iter_batches(run.run_id):
        try:
            rows = list(unpack(batch))
        except (ValueError, TypeError) as exc:
            check.add(Finding("altered", f"audit batch {batch.batch} (id {batch.id}) of the run cannot be read back "
                                         f"as fillgate wrote it: {exc}", batch.id * ID_FACTOR + 1,
                              batch.first_seq if type(batch.first_seq) is int else None))
            continue
        _check_batch(ledger, walk, batch, rows)
    if walk.expected <= walk.recorded:
        check.add(_missing(walk.expected, walk.recorded, walk.last_id, None))
    check.computed_sha256 = walk.pure
    _check_record(check, walk.run, walk.recorded, walk.pure)
    _check_anchors(check, anchors, walk.seen)
    return check


def _check_batch(ledger: Ledger, walk: _Walk, batch: Any, rows: list[AuditRow]) -> None:
    """One packed batch against the chain: its place in the run, then its rows."""
    check = walk.check
    check.rows += len(rows)
    if not rows:
        return
    head = rows[0]
    if batch.first_seq is None or batch.chain_sha256 is None:
        check.add(Finding("added", f"{_describe(head)} and the rest of its batch ({len(rows)} rows) carry no tamper "
                                   "evidence (no position, no chain hash): they were not written by this run",
                          head.id, rows=len(rows)))
        return
    if type(batch.first_seq) is not int or not isinstance(batch.chain_sha256, str):
        check.add(Finding("altered", f"{_describe(head)}: its batch's position {batch.first_seq!r} or chain hash "
                                     "is not what fillgate writes", head.id))
        return
    claimed = batch.n_changes if type(batch.n_changes) is int and batch.n_changes > 0 else len(rows)
    last_seq = batch.first_seq + claimed - 1
    if batch.first_seq < walk.expected:
        check.add(Finding("added", f"{_describe(head)} claims position {batch.first_seq}, which an earlier row "
                                   "of the run holds", head.id, batch.first_seq, len(rows)))
        return
    if last_seq > walk.recorded and not walk.reread:
        # a live run commits its batch and its record together: read the record again (once)
        run = ledger.get_run(walk.run.run_id)
        walk.reread = run.audit_rows == walk.recorded
        walk.recorded, walk.run = run.audit_rows or 0, run
        check.status, check.recorded_rows, check.recorded_sha256 = run.status, run.audit_rows, run.audit_sha256
    if last_seq > walk.recorded:
        span = str(batch.first_seq) if claimed == 1 else f"{batch.first_seq}-{last_seq}"
        check.add(Finding("added", f"{_describe(head)} claims position {span}, beyond the {walk.recorded} rows the "
                                   "run recorded", head.id, batch.first_seq, len(rows)))
        return
    after_gap = batch.first_seq > walk.expected
    if after_gap:
        check.add(_missing(walk.expected, batch.first_seq - 1, walk.last_id, head.id))
    if claimed != len(rows):
        check.add(Finding("altered", f"{_describe(head)}: its batch says it holds {batch.n_changes!r} changes "
                                     f"(positions {batch.first_seq}-{last_seq}) and holds {len(rows)}",
                          head.id, batch.first_seq, len(rows)))
        _follow(walk, batch, rows)
        walk.stored = batch.chain_sha256
    elif after_gap:  # the chain value before the batch is gone: the batch's own is taken as it is
        _follow(walk, batch, rows)
    elif walk.version == 2:
        _check_whole_batch(walk, batch, rows)
    else:
        _check_rows(walk, rows)
    walk.expected, walk.last_id = last_seq + 1, rows[-1].id


def _batch_link(previous: str, batch: Any) -> str:
    return batch_link(previous, batch.run_id, batch.table_name, batch.source, canonical_time(batch.changed_at),
                      batch.first_seq, batch.n_changes, batch.changes)


def _follow(walk: _Walk, batch: Any, rows: list[AuditRow]) -> None:
    """A batch whose stored chain value cannot be checked: recompute the pure chain only."""
    if walk.version == 1:
        _follow_rows(walk, rows)
        return
    walk.pure = _batch_link(walk.pure, batch)
    if rows[-1].seq in walk.wanted:
        walk.seen[rows[-1].seq] = walk.pure
    walk.stored = batch.chain_sha256


def _check_whole_batch(walk: _Walk, batch: Any, rows: list[AuditRow]) -> None:
    """A batch of a version 2 chain against the chain value stored with it: its text as a whole."""
    computed = _batch_link(walk.stored, batch)
    _follow(walk, batch, rows)
    if computed != batch.chain_sha256:
        walk.check.add(Finding("altered", f"{_describe_span(rows)} differs from what the run wrote (a value, "
                                          "the key, the time or its chain hash was changed)",
                               rows[0].id, rows[0].seq, len(rows)))


def _follow_rows(walk: _Walk, rows: list[AuditRow]) -> None:
    """Rows whose stored chain values cannot be checked: recompute the pure chain only."""
    for row in rows:
        walk.pure = row_link(walk.pure, row)
        if row.seq in walk.wanted:
            walk.seen[row.seq] = walk.pure
        if row.chain_sha256 is not None:
            walk.stored = row.chain_sha256


def _check_rows(walk: _Walk, rows: list[AuditRow]) -> None:
    """The rows of one batch against the chain values stored with them (the batch's, after
    its last row; a row moved from before revision 0005 also has its own)."""
    span: list[AuditRow] = []
    computed = walk.stored
    for row in rows:
        span.append(row)
        computed = row_link(computed, row)
        walk.pure = row_link(walk.pure, row)
        if row.seq in walk.wanted:
            walk.seen[row.seq] = walk.pure
        if row.chain_sha256 is None:
            continue
        if computed != row.chain_sha256:
            walk.check.add(Finding("altered", f"{_describe_span(span)} differs from what the run wrote (a value, "
                                              "the key, the time or its chain hash was changed)",
                                   span[0].id, span[0].seq, len(span)))
        computed = walk.stored = row.chain_sha256
        span = []


def _check_record(check: RunCheck, run: Run, recorded: int, computed: str) -> None:
    """The run's own record agrees with its rows: the chain head and the applied count."""
    if check.state == "ok" and computed != run.audit_sha256:
        check.add(Finding("record", f"the run's recorded audit hash {run.audit_sha256} differs from its rows' "
                                    f"{computed}: the run's record was changed"))
    # a distributed apply writes no audit rows itself: its counts are the sum of its
    # partitions' runs, and each of those is checked against its own rows
    applied = 0 if run.args.get("distributed") else run.counts.get("applied", 0)
    if applied != recorded:
        check.add(Finding("record", f"the run's counts say {applied} changes applied, its audit record "
                                    f"{recorded} rows: the run's record was changed"))


def _check_anchors(check: RunCheck, anchors: Sequence[Anchor], seen: dict[int, str]) -> None:
    """The chain heads recorded outside the database (``run_finished`` events) still hold."""
    for anchor in anchors:
        check.anchors += 1
        now = seen.get(anchor.rows)
        if now != anchor.sha256:
            found = (f"the ledger's first {anchor.rows} rows now hash to {now}" if now is not None
                     else f"the ledger holds no row at position {anchor.rows}")
            check.add(Finding("anchor", f"{anchor.where} recorded that the run's first {anchor.rows} audit rows "
                                        f"hash to {anchor.sha256}; {found}: the log was rewritten (and its chain "
                                        "recomputed, if nothing else differs)", seq=anchor.rows))


def _missing(first: int, last: int, after: int | None, before: int | None) -> Finding:
    n = last - first + 1
    where = " and ".join(w for w in (f"after row id {after}" if after is not None else "",
                                     f"before row id {before}" if before is not None else "") if w)
    span = f"position {first}" if n == 1 else f"positions {first}-{last}"
    return Finding("missing", f"{n} row{'s' if n != 1 else ''} missing: {span} of the run"
                              + (f", {where}" if where else ""), before, first, n)


def _check_predating(ledger: Ledger, run: Run, check: RunCheck, anchors: Sequence[Anchor],
                     since: str | None) -> RunCheck:
    """A run without tamper evidence: fine if it predates the ledger's tamper evidence."""
    b = schema.audit_batches.c
    with ledger.engine.connect() as conn:
        total, chained = conn.execute(
            select(func.coalesce(func.sum(b.n_changes), 0),
                   func.coalesce(func.sum(case((b.chain_sha256.is_not(None), b.n_changes), else_=0)), 0))
            .where(b.run_id == run.run_id)
        ).one()
    total, chained = int(total), int(chained)  # MariaDB sums as DECIMAL
    check.rows = total
    check.state = "predates"
    if chained:
        check.add(Finding("record", f"the run's record holds no audit hash, yet {chained} of its rows carry "
                                    "one: the run's record was changed"))
    elif since is not None and run.run_id > since:
        check.add(Finding("record", "the run started after this ledger began keeping tamper evidence, yet "
                                    "has none: its record and rows were stripped, or a fillgate older than "
                                    "the ledger wrote it"))
    for anchor in anchors:
        check.anchors += 1
        check.add(Finding("anchor", f"{anchor.where} recorded {anchor.rows} audit rows hashing to "
                                    f"{anchor.sha256}, but the ledger's record of the run holds no audit hash"))
    return check


def verify_ledger(ledger: Ledger, run_ids: Sequence[str] | None = None, anchors: Anchors | None = None,
                  target: str = "") -> VerifyReport:
    """Check runs against their tamper evidence: ``run_ids``, or every apply and revert run
    (plus audit rows that belong to no such run, and anchored runs the ledger lost)."""
    anchors = anchors or Anchors()
    since = ledger.read_meta().get("audit_evidence_since")
    whole = not run_ids
    if run_ids:
        runs = [ledger.get_run(run_id) for run_id in dict.fromkeys(run_ids)]
        for run in runs:
            if run.kind not in WRITING_KINDS:
                raise RunStateError(
                    f"run {run.run_id} is a {run.kind} run; only apply and revert runs write audit rows. "
                    "Run fillgate verify without a run to check the whole audit log."
                )
    else:
        r = schema.runs.c
        with ledger.engine.connect() as conn:
            ids = conn.execute(select(r.run_id).where(r.kind.in_(WRITING_KINDS)).order_by(r.run_id)).scalars().all()
        runs = [ledger.get_run(run_id) for run_id in ids]
    report = VerifyReport(target, [], anchors=anchors, whole_ledger=whole)
    with ledger.engine.connect() as conn:
        if not inspect(conn).has_table(schema.audit_batches.name):
            report.findings.append(Finding("table_missing", f"the audit log table {schema.audit_batches.name} does not "
                                                            "exist: it was dropped"))
            return report
    for run in runs:
        listed = anchors.by_run.get(run.run_id, ())
        try:
            check = check_run(ledger, run, listed, since)
        except (ValueError, TypeError, UnicodeError) as exc:  # a value no fillgate row holds
            check = RunCheck(run.run_id, run.kind, run.status, run.table_name)
            check.add(Finding("altered", f"the run's audit rows cannot be read back as fillgate wrote them: "
                                         f"{type(exc).__name__}: {exc}"))
        report.runs.append(check)
    known = {r.run_id for r in runs}
    for run_id, listed in anchors.by_run.items():
        if run_id not in known and (whole or run_id in (run_ids or ())):
            report.findings.append(Finding("run_missing", f"{listed[0].where} recorded run {run_id}, which this "
                                                          "ledger no longer has"))
    if whole:
        report.findings.extend(_orphans(ledger))
    return report


def _orphans(ledger: Ledger) -> list[Finding]:
    """Audit rows whose run is not an apply or revert run of this ledger."""
    b = schema.audit_batches.c
    r = schema.runs.c
    writing = select(r.run_id).where(r.kind.in_(WRITING_KINDS))
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(b.run_id, func.sum(b.n_changes).label("n"), (func.min(b.id) * ID_FACTOR + 1).label("first"))
            .where(b.run_id.not_in(writing))
            .group_by(b.run_id)
            .order_by(func.min(b.id))
        ).all()
    return [Finding("orphan", f"{int(row.n)} audit row{'s' if row.n != 1 else ''} (first: row id {row.first}) "
                              f"name{'s' if row.n == 1 else ''} run {row.run_id}, which is not an apply or revert "
                              "run of this ledger", int(row.first), rows=int(row.n))
            for row in rows]

