"""Property tests (hypothesis), through the library API, on every backend.

For random small tables and random jobs (a random policy per column, random proposals
including None, Failed and omitted columns):

* plan -> apply -> revert returns the table to exactly its original state;
* applying the same job twice changes nothing the second time (its plan has 0 writes);
* apply writes exactly the plan's changes, each audited once, and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fillgate import (
    Failed,
    FillMissing,
    Job,
    Limits,
    Overwrite,
    Promote,
    apply_plan,
    connect,
    init_target,
    make_plan,
    revert_run,
)
from fillgate.policy import Policy

from conftest import TestDB

EXAMPLES = {"sqlite": 50, "postgresql": 10, "mysql": 10}

TEXTS = st.sampled_from(["a", "b", "A", "unknown", "n/a", "", "zz top", "é"])
INTS = st.integers(min_value=-3, max_value=3)
COLUMNS: dict[str, Any] = {"t": TEXTS, "n": INTS}


def _policy(column: str) -> st.SearchStrategy[Policy]:
    values = COLUMNS[column]
    unknown = st.lists(values, max_size=2)
    return st.one_of(
        st.builds(FillMissing, unknown),
        st.builds(Promote, unknown),
        st.builds(Overwrite, unknown),
    )


def _value(column: str) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), COLUMNS[column])


def _proposal(column: str) -> st.SearchStrategy[Any]:
    return st.one_of(_value(column), st.builds(Failed, st.sampled_from(["timeout", "404"])))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Policy], dict[int, Any]]:
    ids = draw(st.lists(st.integers(min_value=1, max_value=60), unique=True, max_size=12))
    rows = [{"id": i, "t": draw(_value("t")), "n": draw(_value("n"))} for i in ids]
    written = draw(st.sampled_from([("t",), ("n",), ("t", "n")]))
    policies = {c: draw(_policy(c)) for c in written}
    proposals: dict[int, Any] = {}
    for i in ids:
        if draw(st.integers(0, 9)) == 0:
            proposals[i] = None  # compute returns None: nothing proposed for this row
            continue
        proposals[i] = {c: draw(_proposal(c)) for c in written if draw(st.booleans()) or len(written) == 1}
    return rows, policies, proposals


def _make_job(policies: dict[str, Policy], proposals: dict[int, Any]) -> type[Job]:
    class RandomJob(Job):
        table = "prop"
        key = ("id",)
        columns = policies
        source = "SELECT id, t, n FROM prop"
        page_size = 5

        def compute(self, row: Any, ctx: Any) -> Any:
            return proposals[row["id"]]

    return RandomJob


def _reset(db: TestDB, rows: list[dict[str, Any]]) -> None:
    db.execute("DROP TABLE IF EXISTS prop")
    db.execute("CREATE TABLE prop (id INTEGER NOT NULL PRIMARY KEY, t VARCHAR(20), n INTEGER)")
    if rows:
        db.execute("INSERT INTO prop (id, t, n) VALUES (:id, :t, :n)", rows)


def _table(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT id, t, n FROM prop ORDER BY id")


def _expected_after(rows: list[dict[str, Any]], policies: dict[str, Policy], proposals: dict[int, Any]) -> list[
    tuple[Any, ...]
]:
    """What the table must hold after apply, computed from the policies directly."""
    out = []
    for row in sorted(rows, key=lambda r: r["id"]):
        new = dict(row)
        for column, value in (proposals[row["id"]] or {}).items():
            if policies[column].decide(row[column], value).value == "write":
                new[column] = value
        out.append((new["id"], new["t"], new["n"]))
    return out


def test_apply_revert_roundtrip_and_idempotence(db: TestDB, tmp_path: Path) -> None:
    target = db.target()
    init_target(target)
    conn = connect(target)
    plans = tmp_path / "plans"
    plans.mkdir()

    @settings(max_examples=EXAMPLES[db.backend], deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(scenarios())
    def check(scenario: tuple[list[dict[str, Any]], dict[str, Policy], dict[int, Any]]) -> None:
        rows, policies, proposals = scenario
        _reset(db, rows)
        original = _table(db)
        job = _make_job(policies, proposals)

        first = make_plan(conn, job, out=plans)
        assert first.path is not None
        assert first.counts["rows"] == len(rows)
        assert first.counts["errors"] == 0
        assert _table(db) == original  # a plan writes nothing
        applied = apply_plan(conn, first.path, Limits(batch_size=3))
        assert applied.run.status == "succeeded"
        assert applied.counts == {"applied": first.header.changes, "conflicts": 0, "errors": 0}
        after = _table(db)
        assert after == _expected_after(rows, policies, proposals)
        assert db.scalar("SELECT count(*) FROM fillgate_changes WHERE run_id = :r",
                         {"r": applied.run.run_id}) == first.header.changes

        # the same job again: nothing left to write
        second = make_plan(conn, job, out=plans)
        assert second.header.changes == 0, second.samples["change"]
        assert second.counts["writes"] == 0
        reapplied = apply_plan(conn, second.path, Limits(batch_size=3))
        assert reapplied.counts["applied"] == 0
        assert _table(db) == after

        # revert returns the table to exactly its original state
        reverted = revert_run(conn, applied.run.run_id, Limits(batch_size=2))
        assert reverted.run.status == "succeeded"
        assert reverted.counts == {"applied": first.header.changes, "conflicts": 0, "errors": 0}
        assert _table(db) == original

    check()
