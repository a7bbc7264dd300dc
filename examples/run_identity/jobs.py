"""Example 3, "Run identity and persistence": the fillgate version of the digest job.

    fillgate run examples/run_identity/jobs.py:WriteDigests --target demo

``WriteDigests`` is an insert job: its ``compute`` returns the digest row that must exist for
this run and topic, and fillgate inserts it. The three bugs of ``before.py`` cannot happen:

1. Run identity: ``ctx.run_id`` is a new ULID for every run (time-ordered, 80 random bits),
   never a per-process value; two runs, in one process or two, never share outputs, and each
   run's audit rows are its own.
2. Persistence: the job reaches its database only through ``ctx`` (here it needs nothing but
   its source). A hidden ``create_engine`` is refused at run time; a hidden
   ``sqlite3.connect`` is found by ``fillgate lint`` (see ``buggy_jobs.py``).
3. The conflict key ``(run_timestamp, topic)`` is checked against the table's real UNIQUE
   constraint before anything runs; a key that matches no constraint is an error (exit 2).
"""

from __future__ import annotations

from typing import Any

from digest_world import DIGEST_SOURCE, headline

from fillgate import FillMissing, Job


class WriteDigests(Job):
    """One digest per topic for this run, keyed by (run_timestamp, topic)."""

    name = "digest.write"
    table = "digests"
    writes = "insert"
    key = ("run_timestamp", "topic")  # verified against UNIQUE (run_timestamp, topic)
    source = DIGEST_SOURCE
    source_key = ("topic",)  # one source row per topic
    columns = {"articles": FillMissing(), "headline": FillMissing()}

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"run_timestamp": ctx.run_id, "topic": row["topic"], "articles": row["articles"],
                "headline": headline(row["articles"], row["latest"])}
