"""Plan review of files of any size: a sidecar index, built in one streaming pass.

A plan file is verified once (``verify``, given by the caller: the library's ``verify_plan``),
then indexed into a small SQLite file in the cache folder, named by the plan file's SHA-256:
one row per plan line with its byte offset, kind, column, a hash of its key, and its ordinal
within its kind, its column and its (kind, column). A page of any view (all lines, one kind,
one column, or both) is then an index range scan plus ~50 seeks into the plan file, whatever
the plan's size; a key is found through its hash. The file is never read whole into memory.

Verifying and indexing run in a background thread; the first pages are served while the
index is still being built (from the rows committed so far). The verified state is kept per
file (path, size, modification time, inode), so a file changed after it was verified is
verified again before anything of it is shown.

This module knows the plan file format (JSON lines, a header line, ``kind``/``key``/``column``
fields) but imports nothing else of fillgate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 50
KINDS = ("change", "insert", "disagreement", "preserved", "error", "unexpected_index")
INDEX_FORMAT = 1
_COMMIT_EVERY = 20000

Verify = Callable[[Path], tuple[dict[str, Any], str]]  # path -> (header as a dict, SHA-256 of the file)


def key_hash(key_text: str) -> int:
    """A signed 64-bit hash of a key's canonical JSON text."""
    return int.from_bytes(hashlib.blake2b(key_text.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def canonical_key(key: Any) -> str:
    """A key list as compact JSON, as plans and the audit log write it."""
    return json.dumps(key, ensure_ascii=False, separators=(",", ":"))


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class PlanStatus:
    """Where a plan file stands: ``verifying``, ``refused`` (with ``message``), ``indexing`` or ``ready``."""

    state: str
    path: Path
    message: str | None = None
    header: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    index: PlanIndex | None = None

    @property
    def reviewable(self) -> bool:
        return self.state in ("indexing", "ready")


class PlanIndex:
    """The sidecar index of one verified plan file."""

    def __init__(self, path: Path, sha256: str, cache_dir: Path) -> None:
        self.path = path
        self.sha256 = sha256
        self.db_path = cache_dir / f"{sha256}.v{INDEX_FORMAT}.sqlite"

    # --- building ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        return db

    def state(self) -> tuple[bool, int]:
        """(done, lines indexed so far); (False, 0) when there is no index yet."""
        if not self.db_path.exists():
            return False, 0
        try:
            with contextlib.closing(self._connect()) as db:
                rows = dict(db.execute("SELECT name, value FROM state").fetchall())
        except sqlite3.Error:
            return False, 0
        return rows.get("done") == "1", int(rows.get("lines", "0"))

    def prepare(self) -> None:
        """Create the (empty) index, so that pages can be read from the moment it is being built."""
        self.db_path.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(str(self.db_path) + suffix).unlink(missing_ok=True)
        with contextlib.closing(self._connect()) as db:
            db.executescript("""
                CREATE TABLE state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE columns (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
                CREATE TABLE lines (n INTEGER PRIMARY KEY, off INTEGER NOT NULL, kind INTEGER NOT NULL,
                                    col INTEGER, keyh INTEGER NOT NULL, nk INTEGER NOT NULL, nc INTEGER,
                                    nkc INTEGER);
                CREATE INDEX lines_kind ON lines (kind, nk);
                CREATE INDEX lines_col ON lines (col, nc);
                CREATE INDEX lines_kind_col ON lines (kind, col, nkc);
                CREATE INDEX lines_key ON lines (keyh);
                INSERT INTO state VALUES ('done', '0'), ('lines', '0');
            """)
            db.commit()

    def build(self) -> None:
        """One streaming pass over the plan file; commits every few thousand lines so that
        pages can be read while it runs."""
        with contextlib.closing(self._connect()) as db:
            columns: dict[str, int] = {}
            per_kind = [0] * len(KINDS)
            per_col: dict[int, int] = {}
            per_kind_col: dict[tuple[int, int], int] = {}
            kind_ids = {k: i for i, k in enumerate(KINDS)}
            pending: list[tuple[Any, ...]] = []
            n = 0
            with self.path.open("rb") as fh:
                offset = len(fh.readline())
                for raw in fh:
                    n += 1
                    record = json.loads(raw)
                    kind = kind_ids[record["kind"]]
                    per_kind[kind] += 1
                    column = record.get("column")
                    col = nc = nkc = None
                    if isinstance(column, str):
                        col = columns.get(column)
                        if col is None:
                            col = columns[column] = len(columns) + 1
                            db.execute("INSERT INTO columns VALUES (?, ?)", (col, column))
                        nc = per_col[col] = per_col.get(col, 0) + 1
                        nkc = per_kind_col[kind, col] = per_kind_col.get((kind, col), 0) + 1
                    pending.append((n, offset, kind, col, key_hash(canonical_key(record.get("key"))),
                                    per_kind[kind], nc, nkc))
                    offset += len(raw)
                    if len(pending) >= _COMMIT_EVERY:
                        self._flush(db, pending, n)
                        pending = []
            self._flush(db, pending, n)
            db.execute("UPDATE state SET value = '1' WHERE name = 'done'")
            db.commit()

    @staticmethod
    def _flush(db: sqlite3.Connection, rows: list[tuple[Any, ...]], n: int) -> None:
        db.executemany("INSERT INTO lines VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("UPDATE state SET value = ? WHERE name = 'lines'", (str(n),))
        db.commit()

    # --- reading -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            yield db
        finally:
            db.close()

    def column_id(self, db: sqlite3.Connection, name: str | None) -> int | None:
        if not name:
            return None
        row = db.execute("SELECT id FROM columns WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else -1

    def _view(self, kind: str | None, column: str | None, db: sqlite3.Connection) -> tuple[str, list[Any], str]:
        """(WHERE clause, parameters, ordinal column) of a view."""
        kind_id = KINDS.index(kind) if kind else None
        col = self.column_id(db, column)
        if kind_id is not None and col is not None:
            return "kind = ? AND col = ?", [kind_id, col], "nkc"
        if kind_id is not None:
            return "kind = ?", [kind_id], "nk"
        if col is not None:
            return "col = ?", [col], "nc"
        return "1 = 1", [], "n"

    def count(self, kind: str | None = None, column: str | None = None) -> int:
        """Lines in the view (so far, while the index is being built)."""
        with self._reader() as db:
            where, params, ordinal = self._view(kind, column, db)
            return int(db.execute(f"SELECT coalesce(max({ordinal}), 0) FROM lines WHERE {where}", params).fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Lines of each kind (so far)."""
        with self._reader() as db:
            return {kind: int(db.execute("SELECT coalesce(max(nk), 0) FROM lines WHERE kind = ?", (i,)).fetchone()[0])
                    for i, kind in enumerate(KINDS)}

    def page(self, number: int, kind: str | None = None, column: str | None = None,
             size: int = PAGE) -> list[tuple[int, bytes]]:
        """Page ``number`` (from 1) of the view: (line number in the file, raw line) pairs."""
        first = (max(number, 1) - 1) * size + 1
        with self._reader() as db:
            where, params, ordinal = self._view(kind, column, db)
            rows = db.execute(
                f"SELECT n, off FROM lines WHERE {where} AND {ordinal} BETWEEN ? AND ? ORDER BY {ordinal}",
                [*params, first, first + size - 1],
            ).fetchall()
        return self._read(rows)

    def find_key(self, key_texts: Sequence[str], kind: str | None = None, column: str | None = None,
                 limit: int = 500) -> list[tuple[int, bytes]]:
        """Lines about any of the keys (their canonical JSON texts), in file order."""
        hashes = [key_hash(k) for k in key_texts]
        if not hashes:
            return []
        with self._reader() as db:
            where, params, _ = self._view(kind, column, db)
            marks = ", ".join("?" * len(hashes))
            rows = db.execute(
                f"SELECT n, off FROM lines WHERE keyh IN ({marks}) AND {where} ORDER BY n LIMIT ?",
                [*hashes, *params, limit],
            ).fetchall()
        wanted = set(key_texts)
        return [(n, raw) for n, raw in self._read(rows) if canonical_key(json.loads(raw).get("key")) in wanted]

    def _read(self, rows: Sequence[tuple[int, int]]) -> list[tuple[int, bytes]]:
        out = []
        with self.path.open("rb") as fh:
            for n, off in rows:
                fh.seek(off)
                out.append((n + 1, fh.readline()))  # the header is line 1
        return out


class PlanStore:
    """Verifies and indexes plan files in the background; one per server."""

    def __init__(self, cache_dir: Path, verify: Verify) -> None:
        self.cache_dir = cache_dir
        self.verify = verify
        self._lock = threading.Lock()
        self._verified: dict[Path, tuple[tuple[int, int, int], dict[str, Any], str]] = {}
        self._refused: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._jobs: dict[str, threading.Thread] = {}

    def _memo_path(self, path: Path) -> Path:
        return self.cache_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()}.verified.json"

    def _remembered(self, path: Path, stat: tuple[int, int, int]) -> tuple[dict[str, Any], str] | None:
        known = self._verified.get(path)
        if known is not None and known[0] == stat:
            return known[1], known[2]
        try:
            memo = json.loads(self._memo_path(path).read_text())
        except (OSError, ValueError):
            return None
        if tuple(memo.get("stat", ())) != stat:
            return None
        self._verified[path] = (stat, memo["header"], memo["sha256"])
        return memo["header"], memo["sha256"]

    def status(self, path: Path) -> PlanStatus:
        """Where ``path`` stands now; starts verifying or indexing it if that is what it needs."""
        path = path.resolve()
        try:
            stat = _stat(path)
        except OSError as exc:
            return PlanStatus("refused", path, f"cannot read plan file {path}: {exc.strerror or exc}.")
        with self._lock:
            refused = self._refused.get(path)
            if refused is not None and refused[0] == stat:
                return PlanStatus("refused", path, refused[1])
            known = self._remembered(path, stat)
            if known is None:
                self._start(f"verify:{path}", lambda: self._verify(path, stat))
                return PlanStatus("verifying", path)
            header, sha = known
            index = self._index(path, sha)
            state = "ready" if index.state()[0] else "indexing"
            return PlanStatus(state, path, header=header, sha256=sha, index=index)

    def _index(self, path: Path, sha: str) -> PlanIndex:
        """The file's index, being built in the background unless it is complete (under the lock)."""
        index = PlanIndex(path, sha, self.cache_dir)
        if not index.state()[0]:
            job = self._jobs.get(f"index:{sha}")
            if job is None or not job.is_alive():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                index.prepare()
                self._start(f"index:{sha}", index.build)
        return index

    def _start(self, name: str, work: Callable[[], None]) -> None:
        job = self._jobs.get(name)
        if job is not None and job.is_alive():
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        thread = threading.Thread(target=work, name=f"fillgate-plan-{name}", daemon=True)
        self._jobs[name] = thread
        thread.start()

    def _verify(self, path: Path, stat: tuple[int, int, int]) -> None:
        try:
            header, sha = self.verify(path)
        except Exception as exc:
            with self._lock:
                self._refused[path] = (stat, str(exc) or type(exc).__name__)
            return
        with self._lock:
            self._verified[path] = (stat, header, sha)
            memo = {"stat": list(stat), "header": header, "sha256": sha}
            tmp = self._memo_path(path).with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, default=str))
            os.replace(tmp, self._memo_path(path))
            self._index(path, sha)  # index it at once: its first pages are wanted next

    def wait(self) -> None:
        """Wait until every background verification and index build has finished (tests, bench)."""
        while True:
            with self._lock:
                alive = [t for t in self._jobs.values() if t.is_alive()]
            if not alive:
                return
            for thread in alive:
                thread.join()
