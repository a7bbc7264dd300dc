"""Example 3: the incident's bugs, written as fillgate jobs, kept on purpose.

* ``DigestsWithLocalCache`` hides ``sqlite3.connect()`` in a helper. A raw DB-API connection
  is invisible to fillgate's run-time guard (it guards SQLAlchemy engines), so ``fillgate
  lint`` is what finds it, before anything runs (FG005).
* ``DigestsWithHiddenEngine`` hides ``create_engine()`` in a helper: refused at run time
  (exit 3) before anything is written, and found by ``fillgate lint`` too (FG005).
* ``DigestsOnTopic`` names the conflict key ``(topic)``, like the incident's
  ``ON CONFLICT (topic)``; it matches no constraint, so it is an error (exit 2) before
  anything runs.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlalchemy as sa
from digest_world import DIGEST_SOURCE, headline

from fillgate import FillMissing, Job


class WriteDigests(Job):
    """As jobs.py:WriteDigests (repeated here so that this file stands alone)."""

    table = "digests"
    writes = "insert"
    key = ("run_timestamp", "topic")
    source = DIGEST_SOURCE
    source_key = ("topic",)
    columns = {"articles": FillMissing(), "headline": FillMissing()}

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"run_timestamp": ctx.run_id, "topic": row["topic"], "articles": row["articles"],
                "headline": headline(row["articles"], row["latest"])}


def _remember(topic: str, text: str) -> None:
    cache = sqlite3.connect("summary_cache.db")
    cache.execute("CREATE TABLE IF NOT EXISTS summaries (topic TEXT, headline TEXT)")
    cache.execute("INSERT INTO summaries VALUES (?, ?)", (topic, text))
    cache.commit()
    cache.close()


def _remember_with_engine(topic: str, text: str) -> None:
    engine = sa.create_engine("sqlite:///hidden_cache.db")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS summaries (topic TEXT, headline TEXT)"))
        conn.execute(sa.text("INSERT INTO summaries VALUES (:t, :h)"), {"t": topic, "h": text})


class DigestsWithLocalCache(WriteDigests):
    name = "digest.write-with-local-cache"

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        out = super().compute(row, ctx)
        _remember(row["topic"], out["headline"])
        return out


class DigestsWithHiddenEngine(WriteDigests):
    name = "digest.write-with-hidden-engine"

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        out = super().compute(row, ctx)
        _remember_with_engine(row["topic"], out["headline"])
        return out


class DigestsOnTopic(WriteDigests):
    name = "digest.write-on-topic"
    key = ("topic",)  # matches no constraint: UNIQUE is (run_timestamp, topic)
