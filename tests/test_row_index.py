"""The audit log's row index (``fillgate_audit_keys``) is built lazily: an apply writes only its
packed batches, and history is right before, while and after the index catches up."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alembic import command
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine
from typer.testing import CliRunner

from fillgate.ledger import Ledger
from fillgate.ledger.store import _dump, _row_keys, key_hash, key_hashes
from fillgate.values import encode_key

from conftest import TestDB, run_cli

TRICKY = ['["[', '\\"', '"', "],[", '["[1]",', "é🎉", "\n", "[1]", "", "100%_"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.one_of(st.integers(), st.sampled_from(TRICKY), st.text(max_size=8)), min_size=1,
                         max_size=3), min_size=1, max_size=8))
def test_the_row_keys_read_off_a_batch_are_its_entries_keys(keys: list[list[object]]) -> None:
    items = [[encode_key(k), "c", "update", json.dumps(str(k)), "null"] for k in keys]
    text = _dump(items)
    assert _row_keys(text) == {item[0] for item in items}
    keys_read = sorted(_row_keys(text))
    assert key_hashes("t", keys_read) == [key_hash("t", k) for k in keys_read] == [  # the definition, spelled out
        int.from_bytes(hashlib.sha256(f"t\0{k}".encode()).digest()[:8], "big", signed=True) for k in keys_read]


def _applied(db: TestDB, cli: CliRunner, jobs_file: Path, people: int, *options: str) -> tuple[Path, str]:
    """``people`` people (every other one without email), the ledger, and FillEmail run on them:
    the config and the apply run's id."""
    db.create_people(people)
    cfg = db.config()
    assert run_cli(cli, cfg, "init").exit_code == 0
    done = run_cli(cli, cfg, "run", f"{jobs_file}:FillEmail", "--json", *options)
    assert done.exit_code == 0, done.output
    return cfg, str(json.loads(done.stdout)["run_id"])


def _history(cli: CliRunner, cfg: Path, key: str) -> list[tuple[str, str]]:
    done = run_cli(cli, cfg, "history", "people", key, "--json")
    assert done.exit_code == 0, done.output
    return [(e["run_id"], e["new_value"]) for e in json.loads(done.stdout)]


def test_an_apply_leaves_the_index_to_history_which_is_right_before_and_after(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    cfg, run_id = _applied(db, cli, jobs_file, 10, "--batch-size", "2")
    batches = db.scalar("SELECT count(*) FROM fillgate_audit_batches")
    assert batches == 3  # the 5 people without an email, 2 per batch
    assert db.scalar("SELECT count(*) FROM fillgate_audit_keys") == 0
    assert db.scalar("SELECT count(*) FROM fillgate_audit_indexed") == 0
    ledger = Ledger(db.engine)
    unindexed = ledger.history("people", [encode_key([3])], index=False)
    assert [(e["run_id"], e["new_value"]) for e in unindexed] == [(run_id, '"person3@example.com"')]
    assert ledger.history("people", [encode_key([4])], index=False) == []  # had an email: never changed

    assert _history(cli, cfg, "3") == [(run_id, "person3@example.com")]  # catches the index up
    assert db.scalar("SELECT count(*) FROM fillgate_audit_indexed") == batches
    assert db.scalar("SELECT count(*) FROM fillgate_audit_keys") == 5
    assert _history(cli, cfg, "3") == [(run_id, "person3@example.com")]  # now from the index alone
    assert ledger.index_audit() == 0  # nothing left to do
    # a revert adds batches the index does not cover yet; history sees both runs at once
    reverted = run_cli(cli, cfg, "revert", run_id, "--json")
    assert reverted.exit_code == 0, reverted.output
    revert_id = json.loads(reverted.stdout)["run_id"]
    assert ledger.history("people", [encode_key([3])], index=False)[-1]["run_id"] == revert_id
    assert [r for r, _ in _history(cli, cfg, "3")] == [run_id, revert_id]
    assert db.scalar("SELECT count(*) FROM fillgate_audit_indexed") == db.scalar(
        "SELECT count(*) FROM fillgate_audit_batches")


def test_indexing_a_batch_twice_and_in_small_steps_changes_nothing(
    db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    _applied(db, cli, jobs_file, 12, "--batch-size", "2")
    ledger = Ledger(db.engine)
    assert ledger.index_audit(max_changes=1, rounds=1) == 1  # one batch per transaction, one round
    assert ledger.index_audit(max_changes=1) == 2
    keys = db.rows("SELECT key_hash, batch_id FROM fillgate_audit_keys ORDER BY key_hash, batch_id")
    assert len(keys) == 6
    # another session indexing the same batch at the same time: its rows are skipped, not doubled
    with db.engine.begin() as conn:
        ledger.backend.append_new_rows(conn, "fillgate_audit_keys", ("key_hash", "batch_id"), keys[:3])
        ledger.backend.append_new_rows(conn, "fillgate_audit_indexed", ("batch_id",), [(keys[0][1],)])
    assert db.rows("SELECT key_hash, batch_id FROM fillgate_audit_keys ORDER BY key_hash, batch_id") == keys


def test_history_on_a_ledger_it_cannot_write_reads_the_batches_directly(
    sqlite_db: TestDB, cli: CliRunner, jobs_file: Path
) -> None:
    db = sqlite_db
    _applied(db, cli, jobs_file, 6)
    path = db.engine.url.database
    read_only = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    entries = Ledger(read_only).history("people", [encode_key([5])])
    assert [e["new_value"] for e in entries] == ['"person5@example.com"']
    assert db.scalar("SELECT count(*) FROM fillgate_audit_indexed") == 0  # nothing was written
    read_only.dispose()


def test_going_down_to_0007_indexes_what_is_not_indexed_yet(db: TestDB, cli: CliRunner, jobs_file: Path) -> None:
    cfg, _ = _applied(db, cli, jobs_file, 8, "--batch-size", "3")
    ledger = Ledger(db.engine)
    ledger.index_audit(max_changes=1, rounds=1)  # one batch indexed, one not
    with db.engine.begin() as conn:
        command.downgrade(ledger._alembic_config(conn), "0007_workflow")
    hashes = {h for (h,) in db.rows("SELECT key_hash FROM fillgate_audit_keys")}
    assert hashes == {key_hash("people", encode_key([i])) for i in (1, 3, 5, 7)}
    assert len(db.rows("SELECT key_hash FROM fillgate_audit_keys")) == 4
    with db.engine.begin() as conn:  # and up again: every batch is covered
        command.upgrade(ledger._alembic_config(conn), "head")
    assert db.scalar("SELECT count(*) FROM fillgate_audit_indexed") == 2
    assert _history(cli, cfg, "7")[0][1] == "person7@example.com"
