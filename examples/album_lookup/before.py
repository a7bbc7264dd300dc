"""Example 4, BEFORE fillgate: the original album-metadata backfill script.

It batches album ids, calls the bulk lookup service, and writes each result to the album at
the same position in the batch: ``zip(batch, results)``. Nothing checks that the result at
position i is album i's. When the service drops, reorders, shortens or duplicates a result,
album A's metadata lands on album B, silently: no error, no count, no alert.

    python examples/album_lookup/before.py --url sqlite:///albums.db --service http://127.0.0.1:8765

(This is the incident's code, kept as it was; do not copy it. ``jobs.py`` is the fix.)
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

COLUMNS = ("genre", "release_year", "label", "catalog_no")


def engine_for(url: str) -> sa.Engine:
    # The drivers fillgate's test setup installs: psycopg 3 and PyMySQL.
    scheme, sep, rest = url.partition("://")
    driver = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
    return sa.create_engine(driver.get(scheme, scheme) + sep + rest)


def fetch(service_url: str, ids: list[int]) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        service_url.rstrip("/") + "/lookup", data=json.dumps({"ids": ids}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["results"]


def backfill(database_url: str, service_url: str, batch_size: int = 50) -> dict[str, int]:
    """Fill missing album metadata from the service; returns counts."""
    engine = engine_for(database_url)
    counts = {"batches": 0, "albums": 0, "updated": 0}
    try:
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM albums ORDER BY id"))]
        update = sa.text(
            "UPDATE albums SET genre = COALESCE(genre, :genre), "
            "release_year = COALESCE(release_year, :release_year), "
            "label = COALESCE(label, :label), catalog_no = COALESCE(catalog_no, :catalog_no) WHERE id = :id"
        )
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            results = fetch(service_url, batch)
            with engine.begin() as conn:
                for album_id, meta in zip(batch, results, strict=False):  # THE BUG: trusts positions
                    conn.execute(update, {"id": album_id, **{c: meta.get(c) for c in COLUMNS}})
                    counts["updated"] += 1
            counts["batches"] += 1
            counts["albums"] += len(batch)
    finally:
        engine.dispose()
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"), help="database URL (default: DATABASE_URL)")
    parser.add_argument("--service", required=True, help="the lookup service's base URL")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("no database: pass --url or set DATABASE_URL")
    counts = backfill(args.url, args.service, args.batch_size)
    print(f"done: {counts['albums']} albums in {counts['batches']} batches, {counts['updated']} updated")


if __name__ == "__main__":
    main()
