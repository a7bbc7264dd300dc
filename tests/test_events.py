"""Run events as JSON lines."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
from pathlib import Path
from typing import Any

import pytest

from fillgate.errors import UsageError
from fillgate.events import BATCH_COUNTS, EVENT_FIELDS, EventWriter, SlowestRows, utc_timestamp

FIXED = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_emit_writes_event_ts_then_fields_one_line_each() -> None:
    out = io.StringIO()
    writer = EventWriter(out, clock=lambda: FIXED)
    writer.emit("custom", b=2, a="x")
    writer.emit("custom", nested={"k": [1, 2]})
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 2
    first = text.splitlines()[0]
    assert first == '{"event":"custom","ts":"2024-05-01T12:00:00.123Z","b":2,"a":"x"}'
    assert lines(text)[1]["nested"] == {"k": [1, 2]}
    assert writer.count == 2


def test_ts_is_iso_utc_with_milliseconds() -> None:
    assert utc_timestamp(FIXED) == "2024-05-01T12:00:00.123Z"
    other_zone = FIXED.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert utc_timestamp(other_zone) == "2024-05-01T12:00:00.123Z"
    now = dt.datetime.fromisoformat(utc_timestamp().replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - now).total_seconds()) < 5


def test_the_documented_events_and_their_fields_in_order() -> None:
    out = io.StringIO()
    writer = EventWriter(out, clock=lambda: FIXED)
    writer.run_started(run_id="R1", kind="plan", job="jobs:FillEmail", target="staging",
                       environment="staging", total_estimate=1200)
    writer.batch_done(run_id="R1", batch=1, counts={"rows": 1000, "writes": 10, "errors": 2,
                                                    "unexpected_index": 1, "ignored_extra": 5},
                      elapsed_ms=12.34567, held_ms=500)
    writer.run_held(run_id="R1", batch=1, reason="replication lag 12.3s > 5s", held_ms=1000)
    slow = SlowestRows(2)
    slow.add(5.0, (1,))
    slow.add(9.0, (2,))
    writer.run_finished(run_id="R1", status="succeeded", totals={"rows": 1000}, duration_ms=99.9, slowest=slow)
    events = lines(out.getvalue())
    for event in events:
        assert list(event)[:2] == ["event", "ts"]
        assert tuple(list(event)[2:]) == EVENT_FIELDS[event["event"]]
    started, batch, held, finished = events
    assert started["total_estimate"] == 1200
    assert batch["rows"] == 1000 and batch["skipped"] == 0 and batch["unexpected_index"] == 1
    assert batch["elapsed_ms"] == 12.346 and batch["held_ms"] == 500
    assert "ignored_extra" not in batch
    assert held["reason"] == "replication lag 12.3s > 5s"
    assert finished["slowest"] == [{"key": [2], "ms": 9.0}, {"key": [1], "ms": 5.0}]
    assert set(BATCH_COUNTS) == {"rows", "writes", "unchanged", "skipped", "disagreements", "preserved",
                                 "conflicts", "errors", "unexpected_index"}


def test_every_field_is_documented_in_the_module_docstring() -> None:
    import fillgate.events as module

    doc = module.__doc__ or ""
    for event, fields in EVENT_FIELDS.items():
        assert f"``{event}``" in doc
        for name in fields:
            assert f"``{name}``" in doc, name


def test_values_json_lacks_are_written_readably() -> None:
    out = io.StringIO()
    EventWriter(out).emit("x", when=dt.date(2024, 1, 2), amount=decimal.Decimal("1.50"), key=(1, "a"),
                          raw=b"\x01\xff", bad=float("nan"), inf=[float("inf")])
    (event,) = lines(out.getvalue())
    assert event["when"] == "2024-01-02" and event["amount"] == "1.50" and event["key"] == [1, "a"]
    assert event["raw"] == "01ff" and event["bad"] is None and event["inf"] == [None]


def test_ts_cannot_be_overridden() -> None:
    with pytest.raises(UsageError, match="'ts'"):
        EventWriter(io.StringIO()).emit("x", ts="then")


def test_file_target_appends_and_flushes_each_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("one", n=1)
    assert lines(path.read_text()) and lines(path.read_text())[0]["n"] == 1  # visible before close
    writer.close()
    with EventWriter(str(path)) as again:
        again.emit("two", n=2)
    assert [e["event"] for e in lines(path.read_text())] == ["one", "two"]
    writer.emit("after-close")  # a closed writer is a no-op
    assert len(lines(path.read_text())) == 2


def test_unwritable_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot write events to"):
        EventWriter(tmp_path / "file" / "events.jsonl")


def test_none_target_is_a_no_op() -> None:
    writer = EventWriter(None)
    assert not writer.enabled
    writer.emit("x", a=1)
    writer.batch_done(run_id="R", batch=1, counts={}, elapsed_ms=1)
    writer.close()
    assert writer.count == 0


def test_dash_means_stdout_and_is_not_closed(capsys: pytest.CaptureFixture[str]) -> None:
    writer = EventWriter("-")
    writer.run_started(run_id="R", kind="plan", job="j", target="t", environment="e", total_estimate=None)
    writer.close()
    print("still open")
    first, second = capsys.readouterr().out.splitlines()
    assert json.loads(first)["event"] == "run_started" and json.loads(first)["total_estimate"] is None
    assert second == "still open"


def test_given_stream_is_not_closed() -> None:
    out = io.StringIO()
    with EventWriter(out) as writer:
        writer.emit("x")
    assert not out.closed


def test_slowest_rows_keeps_the_n_largest() -> None:
    slow = SlowestRows(3)
    for ms, key in [(1, "a"), (50, "b"), (7, "c"), (50, "d"), (3, "e"), (100, "f"), (2, "g")]:
        slow.add(ms, key)
    assert slow.items() == [{"key": "f", "ms": 100}, {"key": "b", "ms": 50}, {"key": "d", "ms": 50}]
    assert len(slow) == 3


def test_slowest_rows_with_incomparable_keys_and_merge() -> None:
    run = SlowestRows(10)
    for batch_no in range(3):
        batch = SlowestRows(10)
        for i in range(20):
            batch.add(float(i * 10 + batch_no), (i, {"not": "comparable"}) if i % 2 else (i,))
        run.update(batch)
    items = run.items()
    assert len(items) == 10
    assert [item["ms"] for item in items] == sorted((item["ms"] for item in items), reverse=True)
    assert items[0] == {"key": [19, {"not": "comparable"}], "ms": 192.0}


def test_slowest_rows_needs_n() -> None:
    with pytest.raises(UsageError):
        SlowestRows(0)
