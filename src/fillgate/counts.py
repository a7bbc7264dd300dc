"""The names of every count fillgate keeps, in one place.

A plan counts what it found per source row and field (``PLAN_COUNTS``); an apply or revert
counts what it wrote (``APPLY_COUNTS``); every batch of either reports ``BATCH_COUNTS`` in its
``batch_done`` event, its alert and the run's timeline. The run summary, the events, the
alerts, the dashboard and the Prometheus metrics all use these names.
"""

from __future__ import annotations

PLAN_COUNTS = (
    "rows", "writes", "inserts", "unchanged", "skipped", "disagreements", "preserved", "errors",
    "unexpected_index",
)
"""A plan's counts: source rows read, fields to write (inserted rows among them), fields left
alone (unchanged, skipped by policy, disagreements, preserved by the guard), row errors and
rows whose lookup result was misaligned."""

APPLY_COUNTS = ("applied", "conflicts", "errors")
"""An apply's or revert's counts: changes written (audited), conflicts (rows changed since
the plan, left alone) and row errors."""

BATCH_COUNTS = (
    "rows", "writes", "unchanged", "skipped", "disagreements", "preserved", "conflicts", "errors",
    "unexpected_index",
)
"""The counts of one batch (a plan's page, an apply's transaction), in event order."""

BATCH_FIELDS = (*BATCH_COUNTS, "extra_results")
"""Every count a batch may carry: ``extra_results`` (lookup results that belong to no row)
feeds alerts, not events."""

PIPELINE_COUNTS = (
    "rows", "writes", "inserts", "errors", "disagreements", "preserved", "unexpected_index", "applied",
    "conflicts",
)
"""A pipeline run's counts: its stages' plan counts and apply counts, summed."""

LABELS = {
    "rows": "rows scanned",
    "writes": "writes",
    "inserts": "  of which inserts",
    "unchanged": "unchanged",
    "skipped": "skipped by policy",
    "disagreements": "disagreements",
    "preserved": "preserved (guard)",
    "errors": "row errors",
    "unexpected_index": "unexpected lookup index",
    "applied": "applied",
    "conflicts": "conflicts",
    "extra_results": "extra lookup results",
}
"""How a person reads each count."""

ANOMALY_OF_LINE = {"unexpected_index": "unexpected_index", "error": "errors", "disagreement": "disagreements"}
"""Plan line kinds that are anomalies, and the count (the alert's kind) each one feeds."""
