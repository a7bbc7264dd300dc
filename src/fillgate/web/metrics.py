"""``/metrics`` in the Prometheus text format (the official prometheus-client library).

Per target and job, from the ledger at each scrape: rows scanned, changes planned and
applied, conflicts, errors, unexpected lookup indexes, holds, and runs by kind and status.
The totals are sums over every run the ledger keeps, so ``increase(...[24h])`` tells what the
last day added: alert on ``increase(fillgate_unexpected_index_total[24h]) > 0``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fillgate.runs import RunKind

PLAN, APPLY, REVERT = RunKind.PLAN, RunKind.APPLY, RunKind.REVERT

# (metric name, help, the run kinds it sums, the count it sums)
COUNTERS = (
    ("fillgate_rows_scanned", "Source rows read by plans.", (PLAN,), "rows"),
    ("fillgate_changes_planned", "Changes (writes and inserts) proposed by plans.", (PLAN,), "writes"),
    ("fillgate_changes_applied", "Changes written by apply runs.", (APPLY,), "applied"),
    ("fillgate_changes_reverted", "Changes written back by revert runs.", (REVERT,), "applied"),
    ("fillgate_conflicts", "Changes left alone because the row changed since the plan (apply and revert).",
     (APPLY, REVERT), "conflicts"),
    ("fillgate_errors", "Row errors (plan) and write errors (apply, revert).", (PLAN, APPLY, REVERT), "errors"),
    ("fillgate_unexpected_index", "Rows whose lookup result was missing, extra, duplicated or out of place.",
     (PLAN,), "unexpected_index"),
    ("fillgate_disagreements", "Fields whose stored value disagrees with the computed one (not written).",
     (PLAN,), "disagreements"),
)


class LedgerCollector(Collector):
    def __init__(self, snapshot: list[dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fillgate_target_up", "1 when the target is reachable, initialised and its stamp "
                               "matches its declaration.", labels=["target"])
        runs = GaugeMetricFamily("fillgate_runs", "Runs in the ledger by job, kind and status.",
                                 labels=["target", "job", "kind", "status"])
        counters = {name: CounterMetricFamily(name, text, labels=["target", "job"])
                    for name, text, _, _ in COUNTERS}
        holds = CounterMetricFamily("fillgate_holds", "Batches that health checks held.", labels=["target", "job"])
        held = CounterMetricFamily("fillgate_held_seconds", "Time health checks held runs.", labels=["target", "job"])
        for entry in self.snapshot:
            target = entry["target"]
            up.add_metric([target], 1 if entry["up"] else 0)
            sums: dict[tuple[str, str], float] = {}
            jobs: set[str] = set()
            for total in entry["totals"]:
                if total["kind"] in (RunKind.INIT, RunKind.STAMP):
                    continue
                runs.add_metric([target, total["job"], total["kind"], total["status"]], total["runs"])
                jobs.add(total["job"])
                for name, _, kinds, count in COUNTERS:
                    if total["kind"] in kinds:
                        sums[name, total["job"]] = sums.get((name, total["job"]), 0) + total["counts"].get(count, 0)
            for job in sorted(jobs):  # every job gets every counter, 0 included: an alert needs the series
                for name, _, _, _ in COUNTERS:
                    counters[name].add_metric([target, job], sums.get((name, job), 0))
            for hold in entry["holds"]:
                holds.add_metric([target, hold["job"] or ""], hold["holds"])
                held.add_metric([target, hold["job"] or ""], (hold["held_ms"] or 0) / 1000)
        yield up
        yield runs
        yield from counters.values()
        yield holds
        yield held


def render_metrics(snapshot: list[dict[str, Any]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(snapshot))
    return generate_latest(registry)
