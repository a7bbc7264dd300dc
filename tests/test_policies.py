"""Write policies: the full decision matrix, and the preserve guard end to end.

The matrix crosses the stored value (NULL, an "unknown" marker, a known value) with the
proposed value (NULL, an "unknown" marker, ``Failed(...)``, the same known value, a different
known value) for every policy. The end-to-end tests run a plan and an apply through the CLI
on every backend and check the plan file, the table and the audit log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fillgate.policy import Decision, Failed, FillMissing, Overwrite, Policy, Promote

from conftest import TestDB, run_cli

W, U, S, D, P = (Decision.WRITE, Decision.UNCHANGED, Decision.SKIPPED, Decision.DISAGREEMENT,
                 Decision.PRESERVED)

# Stored values: NULL, the unknown marker, a known value "a".
STORED = {"null": None, "unknown": "unknown", "known": "a"}
# Proposed values; "same" equals the known stored value, "different" does not.
NEW: dict[str, Any] = {
    "null": None, "unknown": "unknown", "failed": Failed("timeout"), "same": "a", "different": "b",
}

# policy name -> stored kind -> (decision for new null, unknown, failed, same, different)
MATRIX: dict[str, dict[str, tuple[Decision, ...]]] = {
    # "unknown" is an ordinary known value for a policy without unknown markers.
    "FillMissing()": {
        "null":    (U, W, S, W, W),
        "unknown": (P, U, P, S, S),
        "known":   (P, S, P, U, S),
    },
    "FillMissing(unknown=['unknown'])": {
        "null":    (U, W, S, W, W),
        "unknown": (S, U, S, S, S),
        "known":   (P, P, P, U, S),
    },
    "Promote(unknown=['unknown'])": {
        "null":    (U, W, S, W, W),
        "unknown": (S, U, S, W, W),
        "known":   (P, P, P, U, D),
    },
    "Overwrite()": {
        "null":    (U, W, S, W, W),
        "unknown": (P, U, P, W, W),
        "known":   (P, W, P, U, W),
    },
    "Overwrite(unknown=['unknown'])": {
        "null":    (U, W, S, W, W),
        "unknown": (S, U, S, W, W),
        "known":   (P, P, P, U, W),
    },
}

POLICIES: dict[str, Policy] = {
    "FillMissing()": FillMissing(),
    "FillMissing(unknown=['unknown'])": FillMissing(unknown=["unknown"]),
    "Promote(unknown=['unknown'])": Promote(unknown=["unknown"]),
    "Overwrite()": Overwrite(),
    "Overwrite(unknown=['unknown'])": Overwrite(unknown=["unknown"]),
}

CASES = [
    pytest.param(policy, stored, new, expected, id=f"{policy}-stored_{stored}-new_{new}")
    for policy, rows in MATRIX.items()
    for stored, decisions in rows.items()
    for new, expected in zip(NEW, decisions, strict=True)
]


@pytest.mark.parametrize(("policy", "stored", "new", "expected"), CASES)
def test_decision_matrix(policy: str, stored: str, new: str, expected: Decision) -> None:
    assert POLICIES[policy].decide(STORED[stored], NEW[new]) is expected


def test_matrix_is_complete() -> None:
    assert len(CASES) == len(POLICIES) * len(STORED) * len(NEW) == 75


def test_promote_defaults_to_unknown_marker() -> None:
    assert Promote().decide("unknown", "song") is W
    assert Promote().decide("album", "unknown") is P
    assert Promote().decide("album", "song") is D


@pytest.mark.parametrize("policy", [FillMissing(), Promote(), Overwrite()], ids=repr)
@pytest.mark.parametrize("stored", ["a", 0, False, "", 42])
def test_guard_never_replaces_a_known_value_with_nothing(policy: Policy, stored: Any) -> None:
    """Falsy known values (0, False, "") are known values too; NULL and Failed never replace them."""
    assert policy.decide(stored, None) is P
    assert policy.decide(stored, Failed()) is P
    assert policy.decide(stored, Failed("timeout")) is P


def test_several_unknown_markers_never_replace_each_other() -> None:
    policy = Promote(unknown=["unknown", "n/a", ""])
    assert policy.decide("n/a", "unknown") is S
    assert policy.decide("", None) is S
    assert policy.decide("n/a", "") is S
    assert policy.decide(None, "n/a") is W  # NULL may become an explicit marker
    assert policy.decide("n/a", "song") is W
    assert policy.decide("song", "n/a") is P


def test_integer_unknown_markers_and_unhashable_values() -> None:
    policy = Overwrite(unknown=[-1])
    assert policy.decide(5, -1) is P
    assert policy.decide(-1, 5) is W
    assert policy.decide(None, -1) is W
    assert policy.decide(-1, None) is S
    # an unhashable value cannot be in the unknown set: it is known
    assert policy.is_known([1, 2])
    assert policy.decide(None, [1, 2]) is W


# --- end to end, on every backend -------------------------------------------------------

# Each row of `items` with what the job proposes for it, per column:
#   label: FillMissing(), kind: Promote(unknown=["unknown"]), score: Overwrite()
ROWS: list[dict[str, Any]] = [
    {"id": 1, "label": None, "kind": None, "score": None},
    {"id": 2, "label": "keep", "kind": "album", "score": 10},
    {"id": 3, "label": "keep", "kind": "unknown", "score": 10},
    {"id": 4, "label": "keep", "kind": "album", "score": 10},
    {"id": 5, "label": "keep", "kind": "album", "score": 10},
    {"id": 6, "label": None, "kind": "album", "score": 10},
]

JOB = '''
from fillgate import Job, Failed, FillMissing, Promote, Overwrite

PROPOSALS = {
    1: {"label": "new", "kind": "song", "score": 1},
    2: {"label": None, "kind": None, "score": None},
    3: {"label": Failed("timeout"), "kind": "song", "score": 11},
    4: {"label": "other", "kind": "song", "score": Failed("timeout")},
    5: {"label": "keep", "kind": "album", "score": 10},
    6: {"label": Failed("timeout"), "kind": "unknown", "score": 12},
}


class Mixed(Job):
    table = "items"
    key = ("id",)
    columns = {"label": FillMissing(), "kind": Promote(unknown=["unknown"]), "score": Overwrite()}
    source = "SELECT id, label, kind, score FROM items"

    def compute(self, row, ctx):
        return PROPOSALS[row["id"]]
'''

# The table after apply.
AFTER = [
    (1, "new", "song", 1),
    (2, "keep", "album", 10),       # None proposals preserved
    (3, "keep", "song", 11),        # Failed label preserved; unknown kind promoted; score overwritten
    (4, "keep", "album", 10),       # FillMissing skips, Promote disagrees, Failed score preserved
    (5, "keep", "album", 10),       # unchanged
    (6, None, "album", 12),         # Failed over NULL skipped; unknown over known preserved
]


def _setup(db: TestDB, tmp_path: Path) -> tuple[Path, Path]:
    db.execute("CREATE TABLE items (id INTEGER NOT NULL PRIMARY KEY, label VARCHAR(50), "
               "kind VARCHAR(50), score INTEGER)")
    db.execute("INSERT INTO items (id, label, kind, score) VALUES (:id, :label, :kind, :score)", ROWS)
    jobs = tmp_path / "policy_jobs.py"
    jobs.write_text(JOB)
    return db.config(), jobs


def _table(db: TestDB) -> list[tuple[Any, ...]]:
    return db.rows("SELECT id, label, kind, score FROM items ORDER BY id")


def _plan_lines(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    header, *body = path.read_text().splitlines()
    return json.loads(header), [json.loads(line) for line in body]


def test_policies_end_to_end(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    cfg, jobs = _setup(db, tmp_path)
    assert run_cli(cli, cfg, "init").exit_code == 0
    before = _table(db)

    planned = run_cli(cli, cfg, "plan", f"{jobs}:Mixed", "-o", "mixed.plan", "--json")
    assert planned.exit_code == 0, planned.output
    counts = json.loads(planned.stdout)["counts"]
    assert counts == {"rows": 6, "writes": 6, "unchanged": 3, "skipped": 2, "disagreements": 1,
                      "preserved": 6, "errors": 0, "unexpected_index": 0, "inserts": 0}
    assert _table(db) == before  # a plan writes nothing

    header, body = _plan_lines(Path("mixed.plan"))
    assert header["changes"] == 6
    changes = {(tuple(r["key"]), r["column"]): (r["old"], r["new"]) for r in body if r["kind"] == "change"}
    assert changes == {
        ((1,), "label"): (None, "new"), ((1,), "kind"): (None, "song"), ((1,), "score"): (None, 1),
        ((3,), "kind"): ("unknown", "song"), ((3,), "score"): (10, 11), ((6,), "score"): (10, 12),
    }
    disagreements = {(tuple(r["key"]), r["column"]): (r["old"], r["new"])
                     for r in body if r["kind"] == "disagreement"}
    assert disagreements == {((4,), "kind"): ("album", "song")}
    preserved = {(tuple(r["key"]), r["column"]): (r["old"], r["reason"])
                 for r in body if r["kind"] == "preserved"}
    assert preserved == {
        ((2,), "label"): ("keep", "new value None"),
        ((2,), "kind"): ("album", "new value None"),
        ((2,), "score"): (10, "new value None"),
        ((3,), "label"): ("keep", "timeout"),
        ((4,), "score"): (10, "timeout"),
        ((6,), "kind"): ("album", "new value 'unknown'"),
    }

    applied = run_cli(cli, cfg, "apply", "mixed.plan", "--json")
    assert applied.exit_code == 0, applied.output
    result = json.loads(applied.stdout)
    assert result["counts"] == {"applied": 6, "conflicts": 0, "errors": 0}
    assert _table(db) == AFTER
    audit = db.rows("SELECT row_key, column_name, old_value, new_value FROM fillgate_changes "
                    "WHERE run_id = :r ORDER BY row_key, column_name", {"r": result["run_id"]})
    assert sorted(audit) == sorted([
        ("[1]", "kind", "null", '"song"'), ("[1]", "label", "null", '"new"'), ("[1]", "score", "null", "1"),
        ("[3]", "kind", '"unknown"', '"song"'), ("[3]", "score", "10", "11"), ("[6]", "score", "10", "12"),
    ])


def test_preserve_guard_none_and_failed(db: TestDB, cli: CliRunner, tmp_path: Path) -> None:
    """A job proposing None or Failed("timeout") for known values writes nothing there."""
    db.create_people(20, with_email_every=1)  # every person has an email
    jobs = tmp_path / "guard_jobs.py"
    jobs.write_text('''
from fillgate import Job, Failed, FillMissing, Overwrite, Promote


class Clobber(Job):
    table = "people"
    columns = {"email": Overwrite(), "kind": Promote(unknown=["unknown"])}
    source = "SELECT id, email, kind FROM people"

    def compute(self, row, ctx):
        if row["id"] % 2:
            return {"email": None, "kind": None}
        return {"email": Failed("timeout"), "kind": Failed("timeout")}
''')
    db.execute("UPDATE people SET kind = 'person'")
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    before = db.rows("SELECT id, name, email, kind FROM people ORDER BY id")

    planned = run_cli(cli, cfg, "plan", f"{jobs}:Clobber", "-o", "clobber.plan", "--json")
    assert planned.exit_code == 0, planned.output
    counts = json.loads(planned.stdout)["counts"]
    assert counts["writes"] == 0
    assert counts["preserved"] == 40
    header, body = _plan_lines(Path("clobber.plan"))
    assert header["changes"] == 0
    assert {r["kind"] for r in body} == {"preserved"}
    reasons = {(r["key"][0], r["column"]): r["reason"] for r in body}
    assert len(reasons) == 40
    assert reasons[(1, "email")] == "new value None"
    assert reasons[(2, "email")] == "timeout"
    assert reasons[(2, "kind")] == "timeout"
    assert {r["old"] for r in body if r["column"] == "kind"} == {"person"}

    applied = run_cli(cli, cfg, "apply", "clobber.plan", "--json")
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.stdout)["counts"]["applied"] == 0
    assert db.rows("SELECT id, name, email, kind FROM people ORDER BY id") == before
    assert db.scalar("SELECT count(*) FROM fillgate_changes") == 0


def test_promote_disagreements_are_listed_never_written(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    """FillKind proposes even/odd: NULL and 'unknown' are promoted, other known values disagree."""
    db.create_people(10)
    db.execute("UPDATE people SET kind = 'unknown' WHERE id IN (1, 2)")
    db.execute("UPDATE people SET kind = 'even' WHERE id IN (4, 5)")  # 4 agrees, 5 disagrees
    db.execute("UPDATE people SET kind = 'vip' WHERE id = 6")        # disagrees
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0

    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:FillKind", "-o", "kind.plan", "--json")
    assert planned.exit_code == 0, planned.output
    summary = json.loads(planned.stdout)
    assert summary["counts"]["writes"] == 7       # 1, 2 (unknown) and 3, 7, 8, 9, 10 (NULL)
    assert summary["counts"]["disagreements"] == 2
    assert summary["counts"]["unchanged"] == 1
    assert sorted((d["key"], d["old"], d["new"]) for d in summary["samples"]["disagreement"]) == [
        ([5], "even", "odd"), ([6], "vip", "even"),
    ]
    _, body = _plan_lines(Path("kind.plan"))
    assert sorted((r["key"][0], r["old"], r["new"]) for r in body if r["kind"] == "disagreement") == [
        (5, "even", "odd"), (6, "vip", "even"),
    ]

    applied = run_cli(cli, cfg, "apply", "kind.plan", "--json")
    assert applied.exit_code == 0, applied.output
    assert db.rows("SELECT id, kind FROM people ORDER BY id") == [
        (1, "odd"), (2, "even"), (3, "odd"), (4, "even"), (5, "even"), (6, "vip"),
        (7, "odd"), (8, "even"), (9, "odd"), (10, "even"),
    ]
    audited = {r[0] for r in db.rows("SELECT row_key FROM fillgate_changes")}
    assert audited == {"[1]", "[2]", "[3]", "[7]", "[8]", "[9]", "[10]"}


def test_overwrite_writes_differing_values(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    db.create_people(6)  # ids 2, 4, 6 have old emails, the others NULL
    db.execute("UPDATE people SET email = 'person3@corp.test' WHERE id = 3")  # already right
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0

    planned = run_cli(cli, cfg, "plan", f"{jobs_file}:OverwriteEmail", "-p", "domain=corp.test",
                      "-o", "ow.plan", "--json")
    assert planned.exit_code == 0, planned.output
    counts = json.loads(planned.stdout)["counts"]
    assert (counts["writes"], counts["unchanged"], counts["preserved"]) == (5, 1, 0)

    applied = run_cli(cli, cfg, "apply", "ow.plan", "--json")
    assert applied.exit_code == 0, applied.output
    assert db.rows("SELECT id, email FROM people ORDER BY id") == [
        (i, f"person{i}@corp.test") for i in range(1, 7)
    ]
    audit = dict(db.rows("SELECT row_key, old_value FROM fillgate_changes"))
    assert audit == {"[1]": "null", "[2]": '"old2@x.org"', "[4]": '"old4@x.org"', "[5]": "null",
                     "[6]": '"old6@x.org"'}
