"""Example 4 (examples/album_lookup): a misaligned bulk album lookup, without and with fillgate.

For every faulty mode of the local lookup service, first the incident: the original script
(before.py) writes one album's metadata onto another. Then the job (jobs.py) through the CLI,
with alerts going to a local webhook: zero wrong writes, ``unexpected_index`` equal to the
rows the service answered out of place (plan counts, plan file, ``show --json``), and exactly
one alert per affected batch, with the same fingerprint in a second run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner

from fillgate.fingerprints import anomaly_fingerprint as fingerprint

from conftest import SRC, TestDB, load_module, run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "album_lookup"
JOB_SPEC = f"{EXAMPLE / 'jobs.py'}:FillAlbumMetadata"
JOB_NAME = "album_lookup:FillAlbumMetadata"


def _load(name: str) -> ModuleType:
    """An example module by path, under a name no other test module uses."""
    return load_module(EXAMPLE / f"{name}.py", f"album_lookup_{name}")


service = _load("service")
before = _load("before")

ALBUMS = 200  # 4 pages of 50: 1-50, 51-100, 101-150, 151-200
POISON = (62, 71, 160)  # two faults in batch 2, one in batch 4; batches 1 and 3 stay clean
AFFECTED_BATCHES = [2, 4]
# The rows each mode leaves without a trustworthy result at their own position.
AFFECTED = {
    # 62 is position 11 of batch 2, 160 position 9 of batch 4: everything after a drop moves up
    "drop": [*range(62, 101), *range(160, 201)],
    "swap": [62, 63, 71, 72, 160, 161],
    "short": [*range(51, 101), *range(151, 201)],  # the first result cut off: the whole batch
    "duplicate": [62, 63, 71, 72, 160, 161],  # both claimants of the duplicated index
}
# A concrete wrong write by before.py: (album, the album whose metadata it got).
WRONG = {"drop": (62, 63), "swap": (63, 62), "short": (51, 52), "duplicate": (63, 62)}
FAULTY = list(AFFECTED)


@pytest.fixture
def svc() -> Iterator[Any]:
    with service.AlbumService("ok", POISON) as running:
        yield running


@pytest.fixture
def inbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A local webhook receiver, set as the CLI's alert sink."""
    with service.AlertInbox() as running:
        monkeypatch.setenv("FILLGATE_ALERT_WEBHOOK", running.url + "/hooks/fillgate")
        yield running


def _albums(db: TestDB) -> dict[int, dict[str, Any]]:
    rows = db.rows("SELECT id, genre, release_year, label, catalog_no FROM albums ORDER BY id")
    return {r[0]: dict(zip(service.METADATA, r[1:], strict=True)) for r in rows}


def _own(album_id: int) -> dict[str, Any]:
    return {c: service.truth(album_id)[c] for c in service.METADATA}


def _fillgate_run(db: TestDB, cfg: Path, svc: Any, plan: str, expect_exit: int) -> dict[str, Any]:
    """``fillgate run`` of the example job; returns the plan file's header and body."""
    result = run_cli(CliRunner(), cfg, "run", JOB_SPEC, "--param", f"service_url={svc.url}", "-o", plan, "--json")
    assert result.exit_code == expect_exit, result.output
    applied = json.loads(result.stdout)
    header, *body = (json.loads(line) for line in Path(plan).read_text().splitlines())
    return {"apply": applied, "header": header, "body": body}


@pytest.mark.parametrize("mode", FAULTY)
def test_misaligned_lookup_before_and_with_fillgate(
    db: TestDB, svc: Any, inbox: Any, tmp_path: Path, mode: str
) -> None:
    affected = AFFECTED[mode]
    svc.set_mode(mode)

    # --- without fillgate: the original script writes album A's metadata onto album B ---
    service.create_albums(db.engine, ALBUMS)
    counts = before.backfill(db.url, svc.url, batch_size=50)
    short_by = {"drop": 3, "short": 2}.get(mode, 0)  # zip() silently stops at the shorter list
    assert counts == {"batches": 4, "albums": ALBUMS, "updated": ALBUMS - short_by}  # and it noticed nothing
    victim, donor = WRONG[mode]
    stored = _albums(db)[victim]
    assert stored["catalog_no"] == service.truth(donor)["catalog_no"]  # album B's catalog number on A
    assert stored["genre"] == service.truth(donor)["genre"]
    wrong = service.wrong_values(db.engine)
    assert wrong, "the faulty service must make the plain script write wrong values"
    assert {w["id"] for w in wrong} <= set(affected)
    assert svc.affected() == affected

    # --- with fillgate ---------------------------------------------------------------------
    service.create_albums(db.engine, ALBUMS)
    svc.reset_log()
    cfg = db.config()
    assert run_cli(CliRunner(), cfg, "init").exit_code == 0
    first = _fillgate_run(db, cfg, svc, "run1.plan", expect_exit=1)  # 1: rows were left out

    # zero wrong writes: every album holds its own metadata, or none where its result was not
    assert service.wrong_values(db.engine) == []
    assert svc.affected() == affected
    for album_id, values in _albums(db).items():
        if album_id in affected:
            seeded = {c: None for c in service.METADATA}
            if album_id % 10 == 0:
                seeded["label"] = service.truth(album_id)["label"]
            assert values == seeded, album_id
        else:
            assert values == _own(album_id), album_id

    # unexpected_index == affected rows: plan counts, plan file lines, show --json
    header, body = first["header"], first["body"]
    assert header["counts"]["unexpected_index"] == len(affected)
    assert [r["key"][0] for r in body if r["kind"] == "unexpected_index"] == affected
    assert not {r["key"][0] for r in body if r["kind"] == "change"} & set(affected)
    assert first["apply"]["counts"]["applied"] == header["changes"]
    shown = run_cli(CliRunner(), cfg, "show", header["plan_id"], "--json")
    assert shown.exit_code == 0, shown.output
    plan_run = json.loads(shown.stdout)
    assert plan_run["counts"]["unexpected_index"] == len(affected)
    mismatch = plan_run["details"]["first_mismatch"]
    assert mismatch["key"] == [affected[0]]
    assert {"expected", "got", "message"} <= set(mismatch)
    groups = [g for g in plan_run["error_groups"] if g["error_type"] == "UnexpectedIndex"]
    assert len(groups) == 1 and groups[0]["count"] == len(affected)

    # exactly one alert per affected batch, never one per row
    alerts = list(inbox.alerts)
    assert [a["batch"] for a in alerts] == AFFECTED_BATCHES
    assert all(a["kind"] == "unexpected_index" and a["level"] == "error" for a in alerts)
    assert all(a["run_id"] == header["plan_id"] for a in alerts)
    assert sum(a["counts"]["unexpected_index"] for a in alerts) == len(affected)
    per_batch = [len([x for x in affected if (x - 1) // 50 + 1 == b]) for b in AFFECTED_BATCHES]
    assert [a["counts"]["unexpected_index"] for a in alerts] == per_batch
    assert {a["fingerprint"] for a in alerts} == {fingerprint(JOB_NAME, "unexpected_index")}

    # a second run: the same rows are left out again, the same batches alert, same fingerprint
    inbox.clear()
    second = _fillgate_run(db, cfg, svc, "run2.plan", expect_exit=1)
    assert second["header"]["plan_id"] != header["plan_id"]
    assert second["header"]["counts"]["unexpected_index"] == len(affected)
    assert second["header"]["changes"] == 0  # everything else was filled by the first run
    again = list(inbox.alerts)
    assert [a["batch"] for a in again] == AFFECTED_BATCHES
    assert {a["run_id"] for a in again} == {second["header"]["plan_id"]}
    assert {a["fingerprint"] for a in again} == {a["fingerprint"] for a in alerts}
    assert service.wrong_values(db.engine) == []


def test_ok_mode_writes_everything_and_alerts_nothing(db: TestDB, svc: Any, inbox: Any) -> None:
    service.create_albums(db.engine, ALBUMS)
    before.backfill(db.url, svc.url, batch_size=50)
    assert service.wrong_values(db.engine) == []  # a correct service hides the bug

    service.create_albums(db.engine, ALBUMS)
    svc.reset_log()
    cfg = db.config()
    assert run_cli(CliRunner(), cfg, "init").exit_code == 0
    run = _fillgate_run(db, cfg, svc, "ok.plan", expect_exit=0)
    assert run["header"]["counts"]["unexpected_index"] == 0
    assert not [r for r in run["body"] if r["kind"] == "unexpected_index"]
    assert run["apply"]["counts"]["applied"] == run["header"]["changes"] == ALBUMS * 4 - ALBUMS // 10
    assert _albums(db) == {i: _own(i) for i in range(1, ALBUMS + 1)}
    assert svc.affected() == [] and len(svc.calls) == 4
    assert inbox.alerts == []


def test_service_modes_can_be_switched_over_http(svc: Any) -> None:
    """The service itself: honest indexes in every mode, switched at runtime with POST /mode."""
    import urllib.request

    def post(path: str, body: Any) -> Any:
        request = urllib.request.Request(svc.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    ids = list(range(61, 66))  # 62 is poisoned, at position 1
    clean = post("/lookup", {"ids": ids})["results"]
    assert [(r["index"], r["album_id"]) for r in clean] == list(enumerate(ids))
    expected = {
        "drop": [(0, 61), (2, 63), (3, 64), (4, 65)],
        "swap": [(0, 61), (2, 63), (1, 62), (3, 64), (4, 65)],
        "short": [(1, 62), (2, 63), (3, 64), (4, 65)],
        "duplicate": [(0, 61), (1, 62), (1, 62), (3, 64), (4, 65)],
    }
    for mode, pairs in expected.items():
        assert post("/mode", {"mode": mode}) == {"mode": mode, "poison": list(POISON)}
        results = post("/lookup", {"ids": ids})["results"]
        assert [(r["index"], r["album_id"]) for r in results] == pairs, mode
        assert all({k: r[k] for k in service.METADATA} == _own(r["album_id"]) for r in results)
    assert post("/lookup", {"ids": [1, 2]})["results"][1]["album_id"] == 2  # no poison: clean


def test_demo_runs_with_one_command(tmp_path: Path) -> None:
    """The README's one command, on its default embedded SQLite file."""
    import os

    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("FILLGATE_ALERT_WEBHOOK", None)
    done = subprocess.run([sys.executable, str(EXAMPLE / "demo.py"), "--mode", "swap"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "24 wrong values on 6 albums (62, 63, 71, 72, 188, 189)" in out
    assert "✓ wrong values written: 0" in out
    assert "✓ unexpected_index: 6 rows, = the 6 rows the service answered out of place" in out
    assert "✓ alerts received by the webhook: 2, one per affected batch (2 of 6 batches)" in out
    assert f"fingerprint {fingerprint(JOB_NAME, 'unexpected_index')}" in out
    assert "first: key 62: expected 11, got 12" in out
    assert "albums still missing metadata: 0; wrong values: 0; alerts: 0" in out


class _Sink:
    """An in-process alert sink."""

    def __init__(self) -> None:
        self.alerts: list[Any] = []

    def send(self, alert: Any) -> None:
        self.alerts.append(alert)


def _library_plan(db: TestDB, svc: Any) -> tuple[Any, _Sink]:
    from fillgate import connect, init_target, make_plan
    from fillgate.alerts import Alerter
    from fillgate.monitor import Monitor

    jobs = _load("jobs")
    service.create_albums(db.engine, ALBUMS)
    target = db.target()
    init_target(target)
    sink = _Sink()
    planned = make_plan(connect(target), jobs.FillAlbumMetadata, {"service_url": svc.url},
                        monitor=Monitor(alerter=Alerter([sink])))
    return planned, sink


def test_library_alerter_sink_gets_one_alert_per_affected_batch(sqlite_db: TestDB, svc: Any) -> None:
    svc.set_mode("swap")
    planned, sink = _library_plan(sqlite_db, svc)
    assert planned.counts["unexpected_index"] == len(AFFECTED["swap"])
    assert [(a.batch, a.kind, a.counts["unexpected_index"]) for a in sink.alerts] == [
        (2, "unexpected_index", 4), (4, "unexpected_index", 2)]
    assert {a.fingerprint for a in sink.alerts} == {fingerprint(JOB_NAME, "unexpected_index")}
    assert sink.alerts[0].example["key"] == [62]
    assert sink.alerts[0].example["expected"] == 11 and sink.alerts[0].example["got"] == 12


def test_each_alert_carries_its_own_batchs_first_mismatch(sqlite_db: TestDB, svc: Any) -> None:
    svc.set_mode("swap")
    _, sink = _library_plan(sqlite_db, svc)
    assert [a.example["key"] for a in sink.alerts] == [[62], [160]]
