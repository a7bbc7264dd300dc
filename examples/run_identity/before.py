"""Example 3, BEFORE fillgate: the topic-digest job of the incident, with its three bugs.

It runs inside a long-lived scheduler process, once an hour: ``run_digest()`` writes one
digest per topic under the run's id, replacing "this run's" earlier output if it is re-run.

1. ``RUN_ID`` is taken once, when the module is imported: once per *process*. Every run the
   scheduler starts afterwards reuses it, so each run's "replace this run's outputs" deletes
   the previous run's digests: every run overwrites the last one's outputs.
2. ``_summary_cache()`` opens ``sqlite3.connect("summary_cache.db")``: a hidden database in
   the working directory, whatever ``DATABASE_URL`` says.
3. ``refresh_digest()`` (the late-article path) upserts with ``ON CONFLICT (topic)``, but the
   table's unique constraint is ``(run_timestamp, topic)``. SQLite and PostgreSQL reject the
   statement the first time that path runs, in production, mid-run.

    DATABASE_URL=sqlite:///digests.db python examples/run_identity/before.py

(This is the incident's code, kept as it was; do not copy it. ``jobs.py`` is the fix.)
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import sys
from typing import Any

import sqlalchemy as sa
from digest_world import DIGEST_SOURCE, driver_url, headline

RUN_ID = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M")  # BUG 1: once per process


def _summary_cache() -> sqlite3.Connection:
    conn = sqlite3.connect("summary_cache.db")  # BUG 2: bypasses DATABASE_URL
    conn.execute("CREATE TABLE IF NOT EXISTS summaries (topic TEXT, run TEXT, headline TEXT)")
    return conn


def run_digest(engine: sa.Engine) -> dict[str, Any]:
    """One digest per topic for this run; re-running replaces this run's digests."""
    with engine.connect() as conn:
        topics = [dict(r) for r in conn.execute(sa.text(DIGEST_SOURCE)).mappings()]
    cache = _summary_cache()
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM digests WHERE run_timestamp = :run"), {"run": RUN_ID})
        for row in topics:
            text = headline(row["articles"], row["latest"])
            conn.execute(sa.text("INSERT INTO digests (run_timestamp, topic, articles, headline) "
                                 "VALUES (:run, :topic, :n, :headline)"),
                         {"run": RUN_ID, "topic": row["topic"], "n": row["articles"], "headline": text})
            cache.execute("INSERT INTO summaries VALUES (?, ?, ?)", (row["topic"], RUN_ID, text))
    cache.commit()
    cache.close()
    return {"run_id": RUN_ID, "digests": len(topics)}


def refresh_digest(engine: sa.Engine, topic: str, count: int, latest: str) -> None:
    """A late article arrived: refresh this run's digest of ``topic``."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO digests (run_timestamp, topic, articles, headline) VALUES (:run, :topic, :n, :h) "
            "ON CONFLICT (topic) DO UPDATE SET articles = excluded.articles, headline = excluded.headline"  # BUG 3
        ), {"run": RUN_ID, "topic": topic, "n": count, "h": headline(count, latest)})


def main() -> None:
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("set DATABASE_URL")
    engine = sa.create_engine(driver_url(url))
    done = run_digest(engine)
    print(f"run {done['run_id']}: {done['digests']} digests written")


if __name__ == "__main__":
    main()
