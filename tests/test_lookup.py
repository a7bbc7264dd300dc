"""Batched lookups: alignment in every fault mode, concurrency, rate, retries, timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from fillgate.errors import JobError, LookupResultError, LookupTimeoutError
from fillgate.lookup import Lookup, LookupBatch

ROWS = [{"id": i, "album": f"album-{i}"} for i in range(10)]


def service(fault: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None) -> Callable[..., Any]:
    """A lookup fn answering ``{"index": i, "title": TITLE(input)}``, then applying ``fault``."""

    def fn(inputs: list[str]) -> list[dict[str, Any]]:
        results = [{"index": i, "title": x.upper()} for i, x in enumerate(inputs)]
        return fault(results) if fault else results

    return fn


def resolve(fault: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None, **options: Any) -> LookupBatch:
    with Lookup(service(fault), input=lambda r: r["album"], **options) as lookup:
        return lookup.resolve(ROWS)


def assert_never_misaligned(batch: LookupBatch) -> None:
    """Every value a row got is its own album's."""
    for row, outcome in zip(ROWS, batch.outcomes, strict=True):
        if outcome.value is not None:
            assert outcome.ok
            assert outcome.value["title"] == row["album"].upper()
        else:
            assert not outcome.ok


def unexpected_rows(batch: LookupBatch) -> list[int]:
    return [i for i, o in enumerate(batch.outcomes) if o.unexpected]


# --- alignment by position ------------------------------------------------------------------


def test_clean_answers_align() -> None:
    batch = resolve(None, batch_size=4)
    assert [o.value["title"] for o in batch.outcomes] == [r["album"].upper() for r in ROWS]
    assert batch.unexpected_index == 0 and batch.first_mismatch is None and batch.errors == 0
    assert batch.calls == 3  # 4 + 4 + 2
    assert all(o.elapsed_ms >= 0 for o in batch.outcomes)


def test_drop_one_in_the_middle_marks_it_and_every_shifted_row() -> None:
    batch = resolve(lambda rs: rs[:3] + rs[4:])
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [3, 4, 5, 6, 7, 8, 9]
    assert [o.value["index"] for o in batch.outcomes[:3]] == [0, 1, 2]
    assert batch.first_mismatch == {
        "row": 3, "expected": 3, "got": 4, "reason": "the result at position 3 has index 4, expected 3"
    }
    assert batch.unexpected_index == 7


def test_n_minus_one_results_marks_the_row_without_one() -> None:
    batch = resolve(lambda rs: rs[:-1])
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [9]
    assert batch.unexpected_index == 1
    assert batch.outcomes[9].value is None
    assert "no result at position 9" in (batch.outcomes[9].unexpected or "")
    assert batch.first_mismatch is not None and batch.first_mismatch["expected"] == 9
    assert batch.first_mismatch["got"] is None


def test_swapped_results_mark_both_rows() -> None:
    def swap(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rs[2], rs[5] = rs[5], rs[2]
        return rs

    batch = resolve(swap)
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [2, 5]
    assert batch.first_mismatch == {
        "row": 2, "expected": 2, "got": 5, "reason": "the result at position 2 has index 5, expected 2"
    }


def test_swapped_payloads_with_honest_looking_indexes_are_not_caught_by_position() -> None:
    """By position, a result is trusted by its index; a service that lies about the index
    needs key matching (see the key tests below)."""

    def relabel(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rs[2]["title"], rs[5]["title"] = rs[5]["title"], rs[2]["title"]
        return rs

    batch = resolve(relabel)
    assert batch.unexpected_index == 0


def test_duplicate_index_marks_both_claimants() -> None:
    def duplicate(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rs[4] = dict(rs[3])  # position 4 answers for index 3 again
        return rs

    batch = resolve(duplicate)
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [3, 4]
    assert batch.outcomes[3].unexpected == "index 3 is claimed by 2 results"
    assert batch.outcomes[4].unexpected == "the result at position 4 has index 3, expected 4"


def test_extra_result_with_a_fresh_index_is_counted_and_used_nowhere() -> None:
    batch = resolve(lambda rs: [*rs, {"index": 10, "title": "GHOST"}])
    assert_never_misaligned(batch)
    assert batch.unexpected_index == 0
    assert batch.extra_results == 1
    assert batch.first_mismatch is not None
    assert batch.first_mismatch["got"] == 10 and "extra result at position 10" in batch.first_mismatch["reason"]
    assert all(o.ok for o in batch.outcomes)


def test_extra_result_repeating_an_index_marks_that_row() -> None:
    batch = resolve(lambda rs: [*rs, {"index": 6, "title": "IMPOSTOR"}])
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [6]
    assert batch.extra_results == 1
    assert batch.first_mismatch is not None and batch.first_mismatch["row"] == 6


def test_results_without_index_or_with_a_wrong_type_are_unexpected() -> None:
    def damage(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        del rs[1]["index"]
        rs[2]["index"] = "2"
        rs[3]["index"] = 3.0  # a float is not an index
        return rs

    batch = resolve(damage)
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [1, 2, 3]
    assert batch.outcomes[1].unexpected == "the result at position 1 has no index"
    assert batch.outcomes[2].unexpected == "the result at position 2 has index '2', expected 2"


def test_bool_index_is_not_an_index() -> None:
    with Lookup(lambda xs: [{"index": True} for _ in xs]) as lookup:
        batch = lookup.resolve([{"a": 1}, {"a": 2}])
    assert [o.unexpected is not None for o in batch.outcomes] == [True, True]


def test_index_attribute_objects_work() -> None:
    @dataclass
    class Result:
        index: int
        title: str

    with Lookup(lambda xs: [Result(i, x) for i, x in enumerate(xs)][::-1], input=lambda r: r["album"]) as lookup:
        batch = lookup.resolve(ROWS[:3])
    assert unexpected_rows(batch) == [0, 2]
    assert batch.outcomes[1].value == Result(1, "album-1")


def test_faults_are_per_call_and_row_positions_are_global() -> None:
    calls = 0

    def fn(inputs: list[str]) -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        results = [{"index": i, "title": x.upper()} for i, x in enumerate(inputs)]
        if inputs[0] == "album-4":  # the second call of 4 drops its first result
            results = results[1:]
        return results

    with Lookup(fn, input=lambda r: r["album"], batch_size=4, concurrency=1) as lookup:
        batch = lookup.resolve(ROWS)
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [4, 5, 6, 7]
    assert batch.first_mismatch is not None and batch.first_mismatch["row"] == 4
    assert batch.first_mismatch["expected"] == 0 and batch.first_mismatch["got"] == 1
    assert [o.ok for o in batch.outcomes[8:]] == [True, True]


def test_five_hundred_rows_every_one_misaligned() -> None:
    rows = [{"album": f"a{i}"} for i in range(500)]
    with Lookup(lambda xs: [{"index": i + 1} for i in range(len(xs))], input=lambda r: r["album"]) as lookup:
        batch = lookup.resolve(rows)
    assert batch.unexpected_index == 500 and batch.calls == 5
    assert all(o.value is None for o in batch.outcomes)


def test_non_list_answer_is_an_error_for_the_call() -> None:
    with Lookup(lambda xs: {"results": xs}, retries=0) as lookup:
        batch = lookup.resolve([{"a": 1}])
    assert isinstance(batch.outcomes[0].error, LookupResultError)
    assert "must return a list of results" in str(batch.outcomes[0].error)
    assert batch.errors == 1


def test_input_function_failure_is_that_rows_error_only() -> None:
    with Lookup(service(), input=lambda r: r["album"]) as lookup:
        batch = lookup.resolve([{"album": "x"}, {"nope": 1}, {"album": "y"}])
    assert isinstance(batch.outcomes[1].error, KeyError)
    assert batch.outcomes[0].value["title"] == "X" and batch.outcomes[2].value["title"] == "Y"
    assert batch.calls == 1


def test_empty_rows() -> None:
    with Lookup(service()) as lookup:
        batch = lookup.resolve([])
    assert batch.outcomes == [] and batch.calls == 0


# --- alignment by key ------------------------------------------------------------------------


def keyed(fault: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None) -> Callable[..., Any]:
    def fn(inputs: list[str]) -> list[dict[str, Any]]:
        results = [{"album": x, "title": x.upper()} for x in inputs]
        results.reverse()  # order does not matter when matching by key
        return fault(results) if fault else results

    return fn


def test_key_matching_ignores_order() -> None:
    with Lookup(keyed(), input=lambda r: r["album"], match_by="album") as lookup:
        batch = lookup.resolve(ROWS)
    assert_never_misaligned(batch)
    assert batch.unexpected_index == 0 and all(o.ok for o in batch.outcomes)


def test_key_matching_catches_missing_duplicate_and_stray_results() -> None:
    def fault(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rs = [r for r in rs if r["album"] != "album-2"]  # missing
        rs.append({"album": "album-7", "title": "IMPOSTOR"})  # duplicate
        rs.append({"album": "album-99", "title": "GHOST"})  # stray
        rs.append({"title": "NO KEY"})  # stray without the field
        return rs

    with Lookup(keyed(fault), input=lambda r: r["album"], match_by="album") as lookup:
        batch = lookup.resolve(ROWS)
    assert_never_misaligned(batch)
    assert unexpected_rows(batch) == [2, 7]
    assert batch.outcomes[2].unexpected == "no result has album='album-2'"
    assert batch.outcomes[7].unexpected == "2 results have album='album-7'"
    assert batch.extra_results == 2
    assert batch.first_mismatch is not None and batch.first_mismatch["row"] == 2


def test_key_callable_and_shared_keys() -> None:
    rows = [{"isbn": "978-1"}, {"isbn": "978-2"}, {"isbn": "978-1"}]

    def fn(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"isbn": x["isbn"], "title": f"T{x['isbn']}"} for x in {x["isbn"]: x for x in inputs}.values()]

    with Lookup(fn, match_by="isbn", key=lambda x: x["isbn"]) as lookup:
        batch = lookup.resolve(rows)
    assert [o.value["title"] for o in batch.outcomes] == ["T978-1", "T978-2", "T978-1"]


def test_key_without_match_by_is_refused() -> None:
    with pytest.raises(JobError, match="match_by"):
        Lookup(service(), key=lambda x: x)


@pytest.mark.parametrize(
    "options",
    [{"batch_size": 0}, {"concurrency": 0}, {"rate": 0}, {"timeout": -1}, {"retries": -1}, {"transient": (int,)}],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(JobError):
        Lookup(service(), **options)


# --- concurrency, rate, retries, timeouts ---------------------------------------------------


class InFlight:
    def __init__(self) -> None:
        self.now = 0
        self.max = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_sync_concurrency_bound_is_honoured(concurrency: int) -> None:
    meter = InFlight()

    def fn(inputs: list[int]) -> list[dict[str, int]]:
        meter.enter()
        time.sleep(0.01)
        meter.leave()
        return [{"index": i} for i in range(len(inputs))]

    with Lookup(fn, batch_size=1, concurrency=concurrency) as lookup:
        batch = lookup.resolve(list(range(24)))
    assert batch.calls == 24 and batch.unexpected_index == 0
    assert meter.max == concurrency


def test_async_concurrency_bound_is_honoured() -> None:
    meter = InFlight()

    async def fn(inputs: list[int]) -> list[dict[str, int]]:
        meter.enter()
        await asyncio.sleep(0.01)
        meter.leave()
        return [{"index": i} for i in range(len(inputs))]

    lookup = Lookup(fn, batch_size=2, concurrency=5)
    batch = lookup.resolve(list(range(40)))
    assert batch.calls == 20 and all(o.ok for o in batch.outcomes)
    assert meter.max == 5


def test_concurrency_speeds_up_slow_calls() -> None:
    def fn(inputs: list[int]) -> list[dict[str, int]]:
        time.sleep(0.02)
        return [{"index": i} for i in range(len(inputs))]

    with Lookup(fn, batch_size=1, concurrency=10) as lookup:
        started = time.perf_counter()
        lookup.resolve(list(range(20)))
        elapsed = time.perf_counter() - started
    assert elapsed < 0.2  # serial would take 0.4 s


def test_rate_limit_is_honoured() -> None:
    starts: list[float] = []

    async def fn(inputs: list[int]) -> list[dict[str, int]]:
        starts.append(time.monotonic())
        return [{"index": i} for i in range(len(inputs))]

    lookup = Lookup(fn, batch_size=1, concurrency=8, rate=50)
    started = time.monotonic()
    lookup.resolve(list(range(11)))
    elapsed = time.monotonic() - started
    assert elapsed >= 10 / 50 - 0.01
    # call k starts no earlier than k slots after the first (a late call may be followed by a
    # punctual one, so gaps between neighbours say nothing on a busy machine)
    assert all(start - starts[0] >= k / 50 - 0.005 for k, start in enumerate(starts))
    # the limit carries over to the next resolve: no burst at its start
    lookup.resolve([1])
    assert starts[-1] - starts[0] >= 11 / 50 - 0.005


def test_transient_errors_are_retried_with_exponential_backoff_then_succeed() -> None:
    attempts: list[float] = []

    def fn(inputs: list[int]) -> list[dict[str, int]]:
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            raise ConnectionError("connection reset by peer")
        return [{"index": i} for i in range(len(inputs))]

    with Lookup(fn, retries=3, backoff=0.02, jitter=False) as lookup:
        batch = lookup.resolve([1, 2])
    assert all(o.ok for o in batch.outcomes)
    assert batch.calls == 3 and batch.retries == 2 and batch.errors == 0
    assert attempts[1] - attempts[0] >= 0.02 - 0.003
    assert attempts[2] - attempts[1] >= 0.04 - 0.003
    assert batch.outcomes[0].elapsed_ms >= 55  # latency includes the retries


def test_full_jitter_never_exceeds_the_cap() -> None:
    lookup = Lookup(service(), backoff=0.1, max_backoff=0.3)
    delays = [lookup._backoff_delay(n) for n in (1, 2, 3, 4, 5) for _ in range(50)]
    assert all(0 <= d <= 0.3 for d in delays)
    assert max(lookup._backoff_delay(1) for _ in range(50)) <= 0.1


def test_transient_errors_exhaust_retries_into_an_error_outcome() -> None:
    def fn(inputs: list[int]) -> list[dict[str, int]]:
        raise ConnectionError("service down")

    with Lookup(fn, retries=2, backoff=0.001) as lookup:
        batch = lookup.resolve([1, 2, 3])
    assert batch.calls == 3 and batch.retries == 2 and batch.errors == 3
    assert all(isinstance(o.error, ConnectionError) and o.value is None for o in batch.outcomes)


def test_non_transient_error_is_not_retried() -> None:
    calls = 0

    def fn(inputs: list[int]) -> list[dict[str, int]]:
        nonlocal calls
        calls += 1
        raise ValueError("bad request")

    with Lookup(fn, retries=5, backoff=0.001) as lookup:
        batch = lookup.resolve([1, 2])
    assert calls == 1 and batch.retries == 0 and batch.errors == 2
    assert all(isinstance(o.error, ValueError) for o in batch.outcomes)


def test_custom_transient_types() -> None:
    class Throttled(Exception):
        pass

    calls = 0

    async def fn(inputs: list[int]) -> list[dict[str, int]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Throttled("429")
        return [{"index": i} for i in range(len(inputs))]

    batch = Lookup(fn, transient=(Throttled,), backoff=0.001).resolve([1])
    assert batch.outcomes[0].ok and batch.retries == 1


def test_async_timeout_is_an_error_outcome() -> None:
    async def fn(inputs: list[int]) -> list[dict[str, int]]:
        await asyncio.sleep(5)
        return []

    started = time.perf_counter()
    batch = Lookup(fn, timeout=0.05, retries=1, backoff=0.001).resolve([1, 2])
    assert time.perf_counter() - started < 1
    assert batch.calls == 2 and batch.retries == 1  # a timeout is transient by default
    error = batch.outcomes[0].error
    assert isinstance(error, LookupTimeoutError) and isinstance(error, TimeoutError)
    assert "timed out after 0.05s" in str(error)


def test_sync_timeout_is_an_error_outcome() -> None:
    release = threading.Event()

    def fn(inputs: list[int]) -> list[dict[str, int]]:
        release.wait(2)
        return [{"index": i} for i in range(len(inputs))]

    with Lookup(fn, timeout=0.05, retries=0) as lookup:
        started = time.perf_counter()
        batch = lookup.resolve([1])
        assert time.perf_counter() - started < 1
        release.set()
    assert isinstance(batch.outcomes[0].error, LookupTimeoutError)


def test_a_timeout_error_raised_by_fn_itself_keeps_its_type() -> None:
    def fn(inputs: list[int]) -> list[dict[str, int]]:
        raise TimeoutError("socket timed out")

    with Lookup(fn, retries=0) as lookup:
        error = lookup.resolve([1]).outcomes[0].error
    assert type(error) is TimeoutError


def test_sync_fn_runs_in_worker_threads() -> None:
    threads: set[str] = set()

    def fn(inputs: list[int]) -> list[dict[str, int]]:
        threads.add(threading.current_thread().name)
        return [{"index": i} for i in range(len(inputs))]

    with Lookup(fn, batch_size=1) as lookup:
        lookup.resolve([1, 2, 3])
    assert threads and all(name.startswith("fillgate-lookup") for name in threads)


def test_resolve_works_inside_a_running_event_loop() -> None:
    async def fn(inputs: list[int]) -> list[dict[str, int]]:
        return [{"index": i, "v": x} for i, x in enumerate(inputs)]

    lookup = Lookup(fn)

    async def main() -> LookupBatch:
        sync_batch = lookup.resolve([1, 2])  # a sync caller nested in async code
        assert sync_batch.values == [{"index": 0, "v": 1}, {"index": 1, "v": 2}]
        return await lookup.aresolve([3])

    batch = asyncio.run(main())
    assert batch.values == [{"index": 0, "v": 3}]


def test_callable_object_with_async_call() -> None:
    class Client:
        async def __call__(self, inputs: list[int]) -> list[dict[str, int]]:
            return [{"index": i} for i in range(len(inputs))]

    batch = Lookup(Client()).resolve([1, 2])
    assert all(o.ok for o in batch.outcomes)


def test_tuple_results_have_no_index_field() -> None:
    with Lookup(lambda xs: [(i, x) for i, x in enumerate(xs)]) as lookup:
        batch = lookup.resolve([1, 2])
    assert [o.unexpected for o in batch.outcomes] == ["the result at position 0 has no index",
                                                       "the result at position 1 has no index"]


def test_unreadable_results_are_an_error_for_the_call() -> None:
    class Weird:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("cannot read me")

    with Lookup(lambda xs: [Weird() for _ in xs], retries=0) as lookup:
        batch = lookup.resolve([1, 2])
    assert all(isinstance(o.error, LookupResultError) for o in batch.outcomes)
    assert "could not be read" in str(batch.outcomes[0].error)


def test_the_callers_context_reaches_sync_and_async_fns() -> None:
    """The active run (a contextvar) must be visible in the lookup fn, so the guard that keeps
    job code on its target also covers lookups running in worker threads."""
    import contextvars

    current: contextvars.ContextVar[str] = contextvars.ContextVar("current", default="none")
    seen: list[str] = []

    def sync_fn(inputs: list[int]) -> list[dict[str, int]]:
        seen.append(current.get())
        return [{"index": i} for i in range(len(inputs))]

    async def async_fn(inputs: list[int]) -> list[dict[str, int]]:
        seen.append(current.get())
        return [{"index": i} for i in range(len(inputs))]

    token = current.set("run-1")
    try:
        with Lookup(sync_fn, batch_size=1) as lookup:
            lookup.resolve([1, 2])
        Lookup(async_fn).resolve([1])

        async def nested() -> None:
            Lookup(sync_fn).resolve([1])  # via the helper thread

        asyncio.run(nested())
    finally:
        current.reset(token)
    assert seen == ["run-1"] * 4


def test_the_run_guard_covers_lookup_threads(tmp_path: Any) -> None:
    """End to end with fillgate's own guard: a lookup fn that opens another database while a
    run is active is refused, even from a worker thread."""
    import sqlalchemy as sa

    from fillgate.config import Target, parse_url
    from fillgate.context import RunContext, activate
    from fillgate.database import engine_for
    from fillgate.errors import TargetEscapeError

    target = Target("staging", parse_url(f"sqlite:///{tmp_path / 'a.db'}", "test"), "staging", False)
    ctx = RunContext(run_id="R", target=target, job="j", params={}, engine=engine_for(target))
    other = sa.create_engine(f"sqlite:///{tmp_path / 'b.db'}")

    def escaping(inputs: list[int]) -> list[dict[str, int]]:
        with other.connect():
            pass
        return [{"index": i} for i in range(len(inputs))]

    with activate(ctx), Lookup(escaping, retries=0) as lookup:
        batch = lookup.resolve([1])
    other.dispose()
    assert isinstance(batch.outcomes[0].error, TargetEscapeError)
