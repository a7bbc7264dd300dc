"""The plan file: a reviewable, verifiable record of every proposed change.

A plan is JSON lines. The first line is the header (plan id, job, job code fingerprint,
target, environment, database fingerprint, created time, parameters, counts, and the number
and SHA-256 of the body lines). Each following line is one finding, ``kind`` being one of
``change``, ``insert``, ``disagreement``, ``preserved``, ``error`` or ``unexpected_index``.
``apply`` refuses a file whose body does not match its header (truncated, edited, or corrupted) before writing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from itertools import chain
from json.encoder import encode_basestring
from pathlib import Path
from typing import IO, Any, get_type_hints

from fillgate.errors import PlanFileError
from fillgate.redact import mask_secrets
from fillgate.sql import Change
from fillgate.validate import (
    SHA256,
    ULID,
    Field,
    all_of,
    kind_of,
    matches,
    non_empty,
    non_negative,
    non_negative_values,
    one_of,
    validate,
)
from fillgate.values import dumps, encode_key, loads, scan_change_line

PLAN_FORMAT = 1
LINE_KINDS = ("change", "insert", "disagreement", "preserved", "error", "unexpected_index")
APPLIED_KINDS = ("change", "insert")


@dataclass
class PlanHeader:
    plan_id: str
    job: str
    job_fingerprint: str
    table: str
    key: list[str]
    columns: dict[str, Any]
    target: str
    environment: str
    database_id: str
    dialect: str
    created_at: str
    operator: str
    params: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    changes: int = 0
    lines: int = 0
    body_sha256: str = ""
    job_spec: str = ""  # file.py:Class or module:Class, to reload the job's health checks at apply
    health_checks: int = 0  # how many health checks the job declares
    fillgate_plan: int = PLAN_FORMAT

    def to_line(self) -> str:
        return json.dumps(asdict(self), default=str, sort_keys=True) + "\n"

    @classmethod
    def from_line(cls, line: str, path: Path) -> PlanHeader:
        try:
            data = json.loads(line)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer too long to read
            raise PlanFileError(f"{path} is not a fillgate plan: its first line is not JSON ({exc}).") from None
        if not isinstance(data, dict) or "fillgate_plan" not in data:
            raise PlanFileError(f"{path} is not a fillgate plan: its first line has no plan header.")
        if data["fillgate_plan"] != PLAN_FORMAT or isinstance(data["fillgate_plan"], bool):
            shown = data["fillgate_plan"] if isinstance(data["fillgate_plan"], int) else kind_of(data["fillgate_plan"])
            raise PlanFileError(
                f"{path} is plan format {shown}; this fillgate reads format "
                f"{PLAN_FORMAT}. Re-create the plan with this version."
            )
        validate(data, header_schema(), f"{path}: plan header", PlanFileError,
                 "; the file is damaged. Re-create it with fillgate plan.")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# What each header field must hold, beyond its type (the type comes from PlanHeader itself).
_HEADER_RULES: dict[str, Callable[[Any], str | None]] = {
    "plan_id": matches(ULID, "a plan run id (a ULID of 26 characters)"),
    "job": non_empty,
    "job_fingerprint": non_empty,
    "table": non_empty,
    "key": all_of(non_empty, lambda key: None if all(k.strip() for k in key) else "holds an empty column name"),
    "target": non_empty,
    "environment": non_empty,
    "database_id": non_empty,
    "dialect": one_of("sqlite", "postgresql", "mysql", "mariadb"),
    "created_at": non_empty,
    "counts": non_negative_values,
    "changes": non_negative,
    "lines": non_negative,
    "body_sha256": matches(SHA256, "a SHA-256 (64 lowercase hex digits)"),
    "health_checks": non_negative,
}
_OPTIONAL = ("params", "counts", "job_spec", "health_checks")  # absent from older plans of this format
_FIELD_TYPES: dict[Any, tuple[type, type | None]] = {
    str: (str, None), int: (int, None), list[str]: (list, str),
    dict[str, Any]: (dict, None), dict[str, int]: (dict, int),
}


@cache
def header_schema() -> dict[str, Field]:
    """The plan header's schema, from PlanHeader's fields and their declared types (a type
    this table does not know is not checked); every field but the _OPTIONAL ones is required."""
    hints = get_type_hints(PlanHeader)
    schema = {}
    for f in fields(PlanHeader):
        kind, items = _FIELD_TYPES.get(hints[f.name], (object, None))
        schema[f.name] = Field(kind, required=f.name not in _OPTIONAL, items=items, rule=_HEADER_RULES.get(f.name))
    return schema


_EXACT = frozenset({str, int, bool, type(None)})  # types JSON gives back as the very same value


class PlanWriter:
    """Streams findings to a body file, then writes header + body atomically."""

    def __init__(self, directory: Path | None = None) -> None:
        fd, name = tempfile.mkstemp(prefix=".fillgate-plan-", suffix=".body", dir=directory)
        self._body_path = Path(name)
        self._body: IO[str] = os.fdopen(fd, "w", encoding="utf-8")
        self._hash = hashlib.sha256()
        self._pending: list[str] = []  # lines not yet written and hashed (flushed in chunks)
        self.file_sha256: str | None = None  # set by finish
        self.lines = 0
        self.changes = 0
        self.collected: list[Change] | None = None  # see collect()

    def _flush(self) -> None:
        if self._pending:
            chunk = "".join(self._pending)
            self._pending = []
            self._body.write(chunk)
            self._hash.update(chunk.encode("utf-8"))

    def _write(self, record: dict[str, Any]) -> None:
        self._pending.append(dumps(record) + "\n")
        self.lines += 1
        if len(self._pending) >= 1000:
            self._flush()

    def collect(self) -> None:
        """From now on also keep every change written, as the apply would read it back from
        the file (see :meth:`take`): ``fillgate run --stream`` applies them as they are planned."""
        self.collected = []

    def take(self) -> list[Change]:
        """The changes written since the last call (``collect`` must have been called)."""
        taken, self.collected = self.collected or [], []
        return taken

    def change(self, key: tuple[Any, ...], column: str, old: Any, new: Any) -> None:
        # the hot path of a plan: the line is put together directly (same JSON as _write)
        pending = self._pending
        # encode_key() and dumps(), inlined for the commonest keys and values
        key_text = "[" + dumps(key[0]) + "]" if len(key) == 1 else encode_key(key)
        old_text = "null" if old is None else encode_basestring(old) if type(old) is str else dumps(old)
        new_text = "null" if new is None else encode_basestring(new) if type(new) is str else dumps(new)
        pending.append(f'{{"kind":"change","key":{key_text},"column":{encode_basestring(column)},'
                       f'"old":{old_text},"new":{new_text}}}\n')
        self.lines += 1
        self.changes += 1
        if self.collected is not None:
            # exactly what iter_changes would give back from the file: a value JSON gives back
            # as another type or value (a tuple, a str subclass) is taken from its text
            self.collected.append(Change(
                tuple(loads(key_text)) if not all(type(k) in _EXACT for k in key) else key, column,
                old if type(old) in _EXACT else loads(old_text), new if type(new) in _EXACT else loads(new_text),
                "update", key_text, old_text, new_text))
        if len(pending) >= 1000:
            self._flush()

    def insert(self, key: tuple[Any, ...], values: dict[str, Any]) -> None:
        """A row that must exist and does not: inserted at apply (if its key is still free)."""
        self._write({"kind": "insert", "key": list(key), "values": values})
        self.changes += 1
        if self.collected is not None:
            self.collected.append(Change(tuple(loads(encode_key(key))), "*", None, loads(dumps(values)), "insert"))

    def disagreement(self, key: tuple[Any, ...], column: str, old: Any, new: Any) -> None:
        self._write({"kind": "disagreement", "key": list(key), "column": column, "old": old, "new": new})

    def preserved(self, key: tuple[Any, ...], column: str, old: Any, reason: str) -> None:
        self._write({"kind": "preserved", "key": list(key), "column": column, "old": old, "reason": reason})

    def error(self, key: tuple[Any, ...], error_type: str, message: str, fingerprint: str) -> None:
        self._write({
            "kind": "error", "key": list(key), "error_type": error_type,
            "message": mask_secrets(message), "fingerprint": fingerprint,
        })

    def unexpected(self, key: tuple[Any, ...], message: str) -> None:
        """A row whose lookup result was missing, extra, duplicated or out of place."""
        self._write({"kind": "unexpected_index", "key": list(key), "message": message})

    def first_updates(self, n: int) -> list[Change]:
        """The first ``n`` updates written so far (for a trial batch), in plan order."""
        self._flush()
        self._body.flush()
        found: list[Change] = []
        with self._body_path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=2):
                if len(found) >= n:
                    break
                record = _decode_record(self._body_path, number, line)
                if record["kind"] == "change":
                    found.append(Change(tuple(record["key"]), record["column"], record["old"], record["new"]))
        return found

    def finish(self, header: PlanHeader, path: Path) -> Path:
        """Write the complete plan to ``path`` (atomically) and return it."""
        self._flush()
        self._body.close()
        header.lines = self.lines
        header.changes = self.changes
        header.body_sha256 = self._hash.hexdigest()
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fillgate-plan-", dir=path.parent)
        whole = hashlib.sha256()  # of the file as written: the ledger records it with the plan run
        try:
            with os.fdopen(fd, "wb") as out, self._body_path.open("rb") as body:
                for chunk in chain([header.to_line().encode("utf-8")], iter(lambda: body.read(1 << 20), b"")):
                    out.write(chunk)
                    whole.update(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            self.file_sha256 = whole.hexdigest()
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._body_path.unlink(missing_ok=True)
        return path

    def seal(self, header: PlanHeader) -> str:
        """Complete ``header`` and return the SHA-256 the plan file would have, without
        writing it (a plan made without ``-o``): the ledger records it for every plan, so no
        file can later claim to be this plan unless it is byte for byte what was planned."""
        self._flush()
        self._body.close()
        header.lines = self.lines
        header.changes = self.changes
        header.body_sha256 = self._hash.hexdigest()
        whole = hashlib.sha256(header.to_line().encode("utf-8"))
        try:
            with self._body_path.open("rb") as body:
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    whole.update(chunk)
        finally:
            self._body_path.unlink(missing_ok=True)
        self.file_sha256 = whole.hexdigest()
        return self.file_sha256

    def discard(self) -> None:
        self._body.close()
        self._body_path.unlink(missing_ok=True)


MAX_HEADER = 64 * 1024 * 1024  # a header line longer than this is not a plan's (read no further)


def read_header(path: str | Path) -> PlanHeader:
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a device (/dev/zero), a FIFO: never read to the end
            raise PlanFileError(f"plan file {path} is not a regular file; give a file made by fillgate plan -o.")
        with path.open(encoding="utf-8") as fh:
            first = fh.readline(MAX_HEADER + 1)
    except FileNotFoundError:
        raise PlanFileError(f"plan file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"cannot read plan file {path}: {exc}.") from None
    if len(first) > MAX_HEADER:
        raise PlanFileError(f"{path} is not a fillgate plan: its first line is longer than any plan header "
                            f"({MAX_HEADER:,} characters).")
    if not first.strip():
        raise PlanFileError(f"{path} is empty; it is not a fillgate plan.")
    return PlanHeader.from_line(first, path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_plan(path: str | Path, written_sha256: str | None = None) -> tuple[PlanHeader, str]:
    """Read the header and check the body against it: line count, SHA-256, and every line a
    well-formed finding about the header's table, with a key of the header's key columns and
    only the header's declared columns (an insert: key and declared columns). Returns the
    header and the SHA-256 of the whole file, both from one read.

    ``written_sha256``: the SHA-256 this very process computed while writing the file (``fillgate
    run``). A file that still hashes to it holds byte for byte the lines this process wrote, so
    they are not decoded and checked one by one; a file that does not is checked in full."""
    path = Path(path)
    header = read_header(path)
    if written_sha256 is not None:
        found = _hashes(path)
        if found[2] == written_sha256 and found[0] == header.lines and found[1] == header.body_sha256:
            return header, written_sha256
    body, whole = hashlib.sha256(), hashlib.sha256()
    lines = 0
    check = _LineCheck(header, path)
    problem: PlanFileError | None = None  # the first bad line, told after the checksum
    with path.open("rb") as fh:
        whole.update(fh.readline())
        for number, line in enumerate(fh, start=2):
            body.update(line)
            whole.update(line)
            lines += 1
            if problem is None:
                try:
                    check(number, line)
                except PlanFileError as exc:
                    problem = exc
    if lines != header.lines or body.hexdigest() != header.body_sha256:
        raise PlanFileError(
            f"{path} does not match its header (expected {header.lines} lines, found {lines}; "
            "checksum differs): the file is truncated or was modified after planning. "
            "Re-create it with fillgate plan."
        )
    if problem is not None:
        raise problem
    return header, whole.hexdigest()


def _hashes(path: Path) -> tuple[int, str, str]:
    """The body's line count and SHA-256, and the whole file's SHA-256 (one read, in chunks)."""
    body, whole = hashlib.sha256(), hashlib.sha256()
    with path.open("rb") as fh:
        first = fh.readline()
        whole.update(first)
        lines = 0
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            body.update(chunk)
            whole.update(chunk)
            lines += chunk.count(b"\n")
    return lines, body.hexdigest(), whole.hexdigest()


class _LineCheck:
    """Checks one body line of a plan against its header (see ``verify_plan``)."""

    def __init__(self, header: PlanHeader, path: Path) -> None:
        self.path = path
        self.key_len = len(header.key)
        self.columns = frozenset(header.columns)
        self.row_columns = self.columns | frozenset(header.key)

    def __call__(self, number: int, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PlanFileError(f"{self.path}:{number}: not UTF-8 text; the file is damaged.") from None
        record = _decode_record(self.path, number, text)
        key = record.get("key")
        kind = record["kind"]
        # error and unexpected_index lines name the source row (an insert job's source key)
        if not isinstance(key, list) or (kind not in ("error", "unexpected_index") and len(key) != self.key_len):
            self._bad(number, f"its key {key!r} does not have the plan's {self.key_len} key column(s)")
        if kind == "insert":
            values = record.get("values")
            if not isinstance(values, dict) or not values.keys() <= self.row_columns:
                extra = sorted(set(values) - self.row_columns) if isinstance(values, dict) else values
                self._bad(number, f"it inserts column(s) {extra!r} the plan's job does not declare")
        elif kind in ("change", "disagreement", "preserved"):
            column = record.get("column")
            if not isinstance(column, str) or column not in self.columns:
                self._bad(number, f"it names column {column!r}, which the plan's job does not declare "
                                  f"({', '.join(map(repr, sorted(self.columns)))})")
            if kind == "change" and ("old" not in record or "new" not in record):
                self._bad(number, "it lacks the old or the new value")

    def _bad(self, number: int, why: str) -> None:
        raise PlanFileError(f"{self.path}:{number}: {why}; the file was modified. Re-create it with fillgate plan.")


def _decode_record(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = loads(line)
    except ValueError as exc:
        raise PlanFileError(f"{path}:{number}: not valid JSON ({exc}).") from None
    if not isinstance(record, dict) or record.get("kind") not in LINE_KINDS:
        raise PlanFileError(f"{path}:{number}: not a plan line (no known 'kind').")
    return record


def iter_changes(path: str | Path, skip: int = 0) -> Iterator[Change]:
    """The plan's changes in order, after the first ``skip`` of them (a checkpoint). A change
    line comes with the JSON text of its key and values as the file holds them (the audit log
    stores that text: nothing is encoded twice)."""
    path = Path(path)
    seen = 0
    with path.open(encoding="utf-8") as fh:
        fh.readline()
        for number, line in enumerate(fh, start=2):
            scanned = scan_change_line(line)
            if scanned is not None:
                seen += 1
                if seen > skip:
                    key, column, old, new, key_text, old_text, new_text = scanned
                    yield Change(key, column, old, new, "update", key_text, old_text, new_text)
                continue
            record = _decode_record(path, number, line)
            if record["kind"] not in APPLIED_KINDS:
                continue
            seen += 1
            if seen <= skip:
                continue
            try:
                if record["kind"] == "insert":
                    yield Change(tuple(record["key"]), "*", None, record["values"], "insert")
                else:
                    yield Change(tuple(record["key"]), record["column"], record["old"], record["new"])
            except KeyError as exc:
                raise PlanFileError(f"{path}: change #{seen} lacks {exc}.") from None


def iter_records(path: str | Path, kinds: tuple[str, ...] = LINE_KINDS) -> Iterator[dict[str, Any]]:
    """The plan's lines of the given kinds, in order (read only: nothing is checked but each
    line's JSON and kind; ``verify_plan`` checks a file before it is applied)."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        fh.readline()
        for number, line in enumerate(fh, start=2):
            record = _decode_record(path, number, line)
            if record["kind"] in kinds:
                yield record
