"""Example 4: a local bulk album-lookup service that can be switched to faulty modes.

The service answers ``POST /lookup`` with ``{"ids": [album id, ...]}`` by
``{"results": [{"index": i, "album_id": id, "genre": ..., "release_year": ...,
"label": ..., "catalog_no": ...}, ...]}``: one result per requested album, ``index`` being
the album's position in the request. That is the contract a by-position client relies on.

In a faulty mode, every call that contains one of the *poisoned* album ids breaks the
contract (the other calls stay correct, so some batches are clean and some are not):

``ok``         every result in place.
``drop``       the poisoned album's result is left out (as if the service could not find
               it): N-1 results, and every result after it moves up one place.
``swap``       the poisoned album's result and the next one trade places.
``short``      N-1 results: the first one is cut off (an off-by-one in the service's paging),
               so every result moves up one place.
``duplicate``  the result after the poisoned album's is replaced by a copy of the poisoned
               album's result: the same index twice.

The results keep honest ``index`` values (each result still says which request position it
answers), so a client that checks ``result.index == i`` sees every fault; a client that
zips requests with results (``before.py``) writes one album's metadata onto another.

Every call is logged with the album ids whose result cannot be trusted at their position
("affected"): the rows a correct client must refuse to write. Per mode: ``drop`` from the
first dropped position to the end of the batch; ``swap`` both albums of each pair; ``short``
the whole batch; ``duplicate`` both claimants of the duplicated index (nothing tells which of
two identical claims is the genuine one).

The module also holds the catalog the service serves (the *true* metadata of every album),
a helper that creates the example's ``albums`` table, and :class:`AlertInbox`, a local
webhook receiver that collects fillgate's alerts.

Run it on its own::

    python examples/album_lookup/service.py --mode swap --poison 62,71 --port 8765
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("ok", "drop", "swap", "short", "duplicate")
METADATA = ("genre", "release_year", "label", "catalog_no")

# --- the catalog: the true metadata of every album ----------------------------------------

_GENRES = ("jazz", "rock", "soul", "folk", "blues", "funk", "reggae", "classical", "electronic", "hip hop", "punk")
_LABELS = (("Blue Note", "BN"), ("Motown", "MT"), ("Stax", "ST"), ("Island", "IS"), ("Verve", "VE"),
           ("Chess", "CH"), ("Impulse!", "IM"), ("Warp", "WA"), ("Rough Trade", "RT"), ("Sub Pop", "SP"),
           ("Factory", "FA"), ("Trojan", "TR"), ("Deutsche Grammophon", "DG"))
_WORDS = ("Blue", "Midnight", "Train", "Kind", "Velvet", "Electric", "Lady", "River", "Moon", "Street", "Silent",
          "Golden", "Paper", "Fire", "Garden", "Echo", "Northern", "Glass", "Sugar", "Thunder", "Winter", "Dust")
_ARTISTS = ("The Quiet Machines", "Nina Holloway", "Arturo Vance Trio", "Delta Nine", "Miriam Osei",
            "The Lanterns", "Kofi & the Tides", "Elsa Brandt", "Harbour Lights", "Sonny Marsh Quartet")


def truth(album_id: int) -> dict[str, Any]:
    """The true metadata of album ``album_id`` (deterministic; ``catalog_no`` is unique)."""
    name, prefix = _LABELS[(album_id * 7) % len(_LABELS)]
    return {
        "album_id": album_id,
        "genre": _GENRES[(album_id * 5) % len(_GENRES)],
        "release_year": 1955 + (album_id * 13) % 68,
        "label": name,
        "catalog_no": f"{prefix}-{album_id:05d}",
    }


def whose(catalog_no: str) -> int | None:
    """The album a catalog number belongs to (catalog numbers are unique)."""
    try:
        return int(catalog_no.rsplit("-", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


def title_of(album_id: int) -> str:
    return f"{_WORDS[album_id % len(_WORDS)]} {_WORDS[(album_id * 3 + 7) % len(_WORDS)]} #{album_id}"


ALBUMS_DDL = (
    "CREATE TABLE albums (id INTEGER NOT NULL PRIMARY KEY, title VARCHAR(200) NOT NULL, "
    "artist VARCHAR(200) NOT NULL, genre VARCHAR(40), release_year INTEGER, label VARCHAR(60), "
    "catalog_no VARCHAR(20))"
)


def seed_rows(n: int) -> list[dict[str, Any]]:
    """``n`` albums with their metadata missing; every 10th already has its (true) label."""
    rows = []
    for i in range(1, n + 1):
        rows.append({
            "id": i, "title": title_of(i), "artist": _ARTISTS[i % len(_ARTISTS)],
            "genre": None, "release_year": None,
            "label": truth(i)["label"] if i % 10 == 0 else None, "catalog_no": None,
        })
    return rows


def create_albums(engine: Any, n: int) -> None:
    """(Re)create the ``albums`` table on a SQLAlchemy engine with ``n`` albums."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS albums"))
        conn.execute(text(ALBUMS_DDL))
        conn.execute(
            text("INSERT INTO albums (id, title, artist, genre, release_year, label, catalog_no) "
                 "VALUES (:id, :title, :artist, :genre, :release_year, :label, :catalog_no)"),
            seed_rows(n),
        )


def wrong_values(engine: Any) -> list[dict[str, Any]]:
    """Every stored metadata value that is not its own album's, as the catalog says.

    Each item: ``{"id", "title", "column", "value", "expected", "belongs_to"}`` where
    ``belongs_to`` is the album whose metadata the row got (from its catalog number), if known.
    """
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(text(
            "SELECT id, title, genre, release_year, label, catalog_no FROM albums ORDER BY id")).mappings()]
    out = []
    for row in rows:
        expected = truth(row["id"])
        owner = whose(row["catalog_no"]) if row["catalog_no"] is not None else None
        for column in METADATA:
            if row[column] is not None and row[column] != expected[column]:
                out.append({"id": row["id"], "title": row["title"], "column": column, "value": row[column],
                            "expected": expected[column], "belongs_to": owner})
    return out


# --- the service ------------------------------------------------------------------------------


@dataclass
class Call:
    """One ``/lookup`` call as the service saw it."""

    ids: list[int]
    mode: str
    affected: list[int] = field(default_factory=list)  # album ids whose result is not in place

    @property
    def faulty(self) -> bool:
        return bool(self.affected)


def answer(ids: Sequence[int], mode: str, poison: Iterable[int]) -> tuple[list[dict[str, Any]], list[int]]:
    """The service's results for ``ids`` in ``mode``, and the affected album ids."""
    results = [{"index": i, **truth(album_id)} for i, album_id in enumerate(ids)]
    n = len(ids)
    poison = set(poison)
    poisoned = [i for i, album_id in enumerate(ids) if album_id in poison]
    if mode == "ok" or not poisoned or n < 2:
        return results, []
    affected: set[int] = set()
    if mode == "drop":
        for i in reversed(poisoned):
            del results[i]
        affected = set(range(poisoned[0], n))
    elif mode == "swap":
        for i in poisoned:
            j = i + 1 if i + 1 < n else i - 1
            results[i], results[j] = results[j], results[i]
            affected |= {i, j}
    elif mode == "short":
        results = results[1:]
        affected = set(range(n))
    elif mode == "duplicate":
        for i in poisoned:
            src, dst = (i, i + 1) if i + 1 < n else (i - 1, i)
            results[dst] = dict(results[src])
            affected |= {src, dst}
    else:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    return results, [ids[i] for i in sorted(affected)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _LocalHTTP:
    """A threaded HTTP server on a free localhost port, run in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner._reply(self, *owner.get(self.path))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    owner._reply(self, 400, {"error": "body is not JSON"})
                    return
                owner._reply(self, *owner.post(self.path, body))

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = _Server((host, port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def get(self, path: str) -> tuple[int, Any]:
        return 404, {"error": f"no route GET {path}"}

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return 404, {"error": f"no route POST {path}"}

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def start(self) -> _LocalHTTP:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> _LocalHTTP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AlbumService(_LocalHTTP):
    """The bulk lookup service. ``POST /lookup`` looks albums up; ``POST /mode`` with
    ``{"mode": ..., "poison": [...]}`` (or :meth:`set_mode`) switches modes at runtime;
    ``GET /calls`` lists the calls seen."""

    def __init__(self, mode: str = "ok", poison: Iterable[int] = (), *, latency_ms: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._lock = threading.Lock()
        self.mode = "ok"
        self.poison: frozenset[int] = frozenset()
        self.latency_ms = latency_ms
        self.calls: list[Call] = []
        self.set_mode(mode, poison)

    def set_mode(self, mode: str, poison: Iterable[int] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        with self._lock:
            self.mode = mode
            if poison is not None:
                self.poison = frozenset(int(p) for p in poison)

    def reset_log(self) -> None:
        with self._lock:
            self.calls = []

    def affected(self) -> list[int]:
        """Album ids whose result was out of place, over the calls logged since the last reset."""
        with self._lock:
            return sorted({a for call in self.calls for a in call.affected})

    def faulty_calls(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.faulty]

    def lookup(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        with self._lock:
            mode, poison = self.mode, self.poison
        results, affected = answer(ids, mode, poison)
        with self._lock:
            self.calls.append(Call(ids=list(ids), mode=mode, affected=affected))
        return results

    def get(self, path: str) -> tuple[int, Any]:
        if path == "/health":
            return 200, {"ok": True, "mode": self.mode}
        if path == "/calls":
            with self._lock:
                return 200, [{"ids": c.ids, "mode": c.mode, "affected": c.affected} for c in self.calls]
        return super().get(path)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        if path == "/lookup":
            ids = body.get("ids") if isinstance(body, dict) else None
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                return 400, {"error": 'expected {"ids": [album id, ...]}'}
            if self.latency_ms:
                time.sleep(self.latency_ms / 1000)
            return 200, {"results": self.lookup(ids)}
        if path == "/mode":
            try:
                self.set_mode(body["mode"], body.get("poison"))
            except (KeyError, TypeError, ValueError) as exc:
                return 400, {"error": str(exc)}
            return 200, {"mode": self.mode, "poison": sorted(self.poison)}
        return super().post(path, body)


class AlertInbox(_LocalHTTP):
    """A local webhook receiver: every JSON body POSTed to it is kept in ``alerts``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._lock = threading.Lock()
        self.alerts: list[dict[str, Any]] = []

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        with self._lock:
            self.alerts.append(body)
        return 200, {"received": True}

    def clear(self) -> None:
        with self._lock:
            self.alerts = []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the example's bulk album-lookup service.")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--poison", default="62,71,188", help="comma-separated album ids that trigger the fault")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(argv)
    poison = [int(p) for p in args.poison.split(",") if p.strip()]
    service = AlbumService(args.mode, poison, port=args.port).start()
    print(f"album service on {service.url} (mode {args.mode}, poison {poison}); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        service.stop()


if __name__ == "__main__":
    main()
