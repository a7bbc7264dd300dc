"""Batched lookups that cannot misalign.

A :class:`Lookup` sends the inputs of many rows to a user function in batches ("calls"), runs
the calls concurrently, and hands back one :class:`LookupOutcome` per row, in row order. Before
a result is given to any row it is checked to belong to that row:

* by position (``match_by=None``, the default): the result at position ``i`` of a call's answer
  must carry ``index == i`` (an attribute ``.index`` or an item ``["index"]``), and no other
  result of the call may claim index ``i``. The check is O(1) per row, no search.
* by key (``match_by="field"``): each result's ``field`` must equal ``key(input)`` of exactly
  one claimant; the order of the answer does not matter.

A row whose result is missing, extra, duplicated or out of place never gets a value: its
outcome has ``value=None`` and ``unexpected`` says what was wrong, and it is counted in
``LookupBatch.unexpected_index``. The other rows of the same call still get theirs. A call that
fails (after retries, for a transient error; at once, for any other error; or because it timed
out) gives every row of the call an ``error`` instead. Neither is ever a value, so the preserve
guard keeps the stored data.

Example::

    albums = Lookup(fetch_albums, input=lambda row: row["album_id"], batch_size=50,
                    concurrency=8, rate=20, timeout=5, transient=(TimeoutError, ConnectionError))
    batch = albums.resolve(rows)            # from plain synchronous code
    for row, outcome in zip(rows, batch.outcomes):
        if outcome.ok:
            ...use outcome.value...

``fn`` takes a list of inputs and returns a list of results (a sync function runs in a thread
pool of ``concurrency`` workers; an ``async def`` runs on the event loop).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import inspect
import numbers
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fillgate.errors import JobError, LookupResultError, LookupTimeoutError

LookupFn = Callable[[list[Any]], Sequence[Any] | Awaitable[Sequence[Any]]]

_MISSING: Any = object()


@dataclass(slots=True)
class LookupOutcome:
    """What one row got from a lookup.

    ``value``       the result that belongs to the row (None unless ``ok``).
    ``error``       the exception of a call that failed for good, or None.
    ``unexpected``  why the row's result could not be trusted (missing, extra, duplicated,
                    out of place), or None.
    ``elapsed_ms``  latency of the row's call, from its first attempt to its answer
                    (retries and their backoff included; waiting for a free slot excluded).
    """

    value: Any = None
    error: BaseException | None = None
    unexpected: str | None = None
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.unexpected is None


@dataclass
class LookupBatch:
    """The outcomes of :meth:`Lookup.resolve`, aligned 1:1 with the rows, and its counts.

    ``unexpected_index``  rows whose result was missing, extra, duplicated or out of place.
    ``first_mismatch``    the first such row (in row order): ``{"row", "expected", "got",
                          "reason"}``; or, when only stray results were returned, the first
                          stray result; None when everything aligned.
    ``extra_results``     results that belong to no row (beyond the inputs, or with a key no
                          input has). They are never used; they make ``first_mismatch`` loud.
    ``calls``             calls made to ``fn``, retries included.
    ``retries``           of which retries.
    ``errors``            rows whose outcome is an error.
    ``elapsed_ms``        wall time of the whole resolve.
    """

    outcomes: list[LookupOutcome]
    unexpected_index: int = 0
    first_mismatch: dict[str, Any] | None = None
    extra_results: int = 0
    calls: int = 0
    retries: int = 0
    errors: int = 0
    elapsed_ms: float = 0.0

    def __len__(self) -> int:
        return len(self.outcomes)

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the result of a finished task in some paths, and a
        # repr of thousands of outcomes would cost more than the lookups.
        return (
            f"LookupBatch(rows={len(self.outcomes)}, unexpected_index={self.unexpected_index}, "
            f"extra_results={self.extra_results}, errors={self.errors}, calls={self.calls}, "
            f"retries={self.retries}, first_mismatch={self.first_mismatch!r})"
        )

    def __iter__(self) -> Iterator[LookupOutcome]:
        return iter(self.outcomes)

    def __getitem__(self, i: int) -> LookupOutcome:
        return self.outcomes[i]

    @property
    def values(self) -> list[Any]:
        """One value per row; None where the row has no trustworthy result."""
        return [o.value for o in self.outcomes]

    def counts(self) -> dict[str, int]:
        return {
            "unexpected_index": self.unexpected_index,
            "extra_results": self.extra_results,
            "calls": self.calls,
            "retries": self.retries,
            "errors": self.errors,
        }


@dataclass
class _Stats:
    calls: int = 0
    retries: int = 0


@dataclass
class _CallResult:
    outcomes: list[LookupOutcome]
    mismatch: dict[str, Any] | None = None  # first misaligned row of this call
    stray: dict[str, Any] | None = None  # first extra result of this call
    extra: int = 0
    unexpected: int = 0
    positions: list[int] = field(default_factory=list)


def _field(result: Any, name: str) -> Any:
    """``result.name`` or ``result[name]``; ``_MISSING`` if it has neither."""
    if type(result) is dict:  # the common case, without the ABC check
        return result.get(name, _MISSING)
    if isinstance(result, Mapping):
        return result.get(name, _MISSING)
    value = getattr(result, name, _MISSING)
    if callable(value):  # e.g. tuple.index: a method, not a field
        value = _MISSING
    if value is _MISSING and hasattr(result, "__getitem__") and not isinstance(result, str | bytes):
        try:
            value = result[name]
        except (KeyError, IndexError, TypeError, ValueError):
            value = _MISSING
    return value


def _is_index(value: Any) -> bool:
    if type(value) is int:  # the common case, without the ABC check
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_async_callable(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


class Lookup:
    """A batched lookup: see the module docstring.

    ``fn``           sync or async callable: ``list[input] -> list[result]``.
    ``input``        ``row -> input`` (default: the row itself).
    ``batch_size``   inputs per call.
    ``concurrency``  calls in flight at most.
    ``rate``         calls started per second at most (retries included); None = unlimited.
    ``timeout``      seconds per call attempt; None = no timeout.
    ``retries``      further attempts after a transient error.
    ``backoff``      base of the exponential backoff, in seconds: before retry ``n`` the call
                     sleeps ``uniform(0, min(max_backoff, backoff * 2**(n-1)))`` ("full
                     jitter"), or exactly that cap with ``jitter=False``.
    ``transient``    exception types that are retried; anything else fails the call at once.
                     A timeout raises :class:`~fillgate.errors.LookupTimeoutError`, a
                     ``TimeoutError``, so it is retried by default.
    ``match_by``     None: results align by position and carry ``index``; a field name:
                     results align by that field, compared with ``key(input)``.
    ``key``          ``input -> key`` for ``match_by`` (default: the input itself).

    A sync ``fn`` that times out keeps running in its worker thread until it returns (Python
    cannot stop a thread); its answer is discarded. Call :meth:`close` (or use ``with``) to
    release the worker threads.
    """

    def __init__(
        self,
        fn: LookupFn,
        *,
        input: Callable[[Any], Any] | None = None,
        batch_size: int = 100,
        concurrency: int = 4,
        rate: float | None = None,
        timeout: float | None = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        jitter: bool = True,
        transient: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError),
        match_by: str | None = None,
        key: Callable[[Any], Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__name__
        if not callable(fn):
            raise JobError(f"lookup {self.name!r}: fn must be callable, got {type(fn).__name__}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise JobError(f"lookup {self.name!r}: batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise JobError(f"lookup {self.name!r}: concurrency must be a positive integer, got {concurrency!r}.")
        if rate is not None and not rate > 0:
            raise JobError(f"lookup {self.name!r}: rate must be > 0 calls per second (or None), got {rate!r}.")
        if timeout is not None and not timeout > 0:
            raise JobError(f"lookup {self.name!r}: timeout must be > 0 seconds (or None), got {timeout!r}.")
        if not isinstance(retries, int) or retries < 0:
            raise JobError(f"lookup {self.name!r}: retries must be an integer >= 0, got {retries!r}.")
        if backoff < 0 or max_backoff < 0:
            raise JobError(f"lookup {self.name!r}: backoff and max_backoff must be >= 0 seconds.")
        transient = tuple(transient)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in transient):
            raise JobError(f"lookup {self.name!r}: transient must be a tuple of exception types.")
        if key is not None and match_by is None:
            raise JobError(
                f"lookup {self.name!r}: key= is only used with match_by='field'; "
                "pass match_by too, or drop key to align results by position (index)."
            )
        self.fn = fn
        self.input = input
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.rate = rate
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.transient = transient
        self.match_by = match_by
        self.key = key
        self._is_async = _is_async_callable(fn)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._random = random.Random()

    # --- public -------------------------------------------------------------------------

    def resolve(self, rows: Sequence[Any]) -> LookupBatch:
        """Look up ``rows`` from synchronous code; one outcome per row, in order."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.aresolve(rows))
        # Called from inside a running event loop: run ours in a helper thread, in a copy of
        # the caller's context (the active run, and its target guard, go along).
        context = contextvars.copy_context()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fillgate-lookup-loop") as helper:
            return helper.submit(context.run, asyncio.run, self.aresolve(rows)).result()

    async def aresolve(self, rows: Sequence[Any]) -> LookupBatch:
        """The async form of :meth:`resolve`."""
        started = time.perf_counter()
        rows = list(rows)
        outcomes: list[LookupOutcome | None] = [None] * len(rows)
        positions: list[int] = []
        inputs: list[Any] = []
        keys: list[Any] = []
        for pos, row in enumerate(rows):
            try:
                value = self.input(row) if self.input is not None else row
                if self.match_by is not None:
                    k = self.key(value) if self.key is not None else value
                    hash(k)
                    keys.append(k)
            except Exception as exc:
                outcomes[pos] = LookupOutcome(error=exc)
                continue
            positions.append(pos)
            inputs.append(value)

        stats = _Stats()
        size = self.batch_size
        chunks = [
            (positions[i:i + size], inputs[i:i + size], keys[i:i + size] if keys else None)
            for i in range(0, len(inputs), size)
        ]
        results: list[_CallResult] = [_CallResult(outcomes=[])] * len(chunks)
        pending = collections.deque(range(len(chunks)))

        # ``concurrency`` workers, each making one call at a time: the bound is exact, and a
        # finished call starts the next one without a hand-off through a semaphore.
        async def worker() -> None:
            while pending:
                n = pending.popleft()
                results[n] = await self._run_call(*chunks[n], stats)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(chunks)))))

        batch = LookupBatch(outcomes=[], calls=stats.calls, retries=stats.retries)
        stray: dict[str, Any] | None = None
        for call in results:
            for pos, outcome in zip(call.positions, call.outcomes, strict=True):
                outcomes[pos] = outcome
            batch.unexpected_index += call.unexpected
            batch.extra_results += call.extra
            if call.mismatch is not None and batch.first_mismatch is None:
                batch.first_mismatch = call.mismatch
            if call.stray is not None and stray is None:
                stray = call.stray
        if batch.first_mismatch is None:
            batch.first_mismatch = stray
        batch.outcomes = [o if o is not None else LookupOutcome() for o in outcomes]
        batch.errors = sum(1 for o in batch.outcomes if o.error is not None)
        batch.elapsed_ms = (time.perf_counter() - started) * 1000
        return batch

    def close(self) -> None:
        """Release the worker threads of a sync ``fn`` (they are made again when needed)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Lookup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        how = f"match_by={self.match_by!r}" if self.match_by else "by index"
        return (
            f"Lookup({self.name}, batch_size={self.batch_size}, concurrency={self.concurrency}, "
            f"rate={self.rate}, timeout={self.timeout}, retries={self.retries}, {how})"
        )

    # --- one call -------------------------------------------------------------------------

    async def _run_call(
        self,
        positions: list[int],
        inputs: list[Any],
        keys: list[Any] | None,
        stats: _Stats,
    ) -> _CallResult:
        """One call, with its retries (the worker's slot stays taken during the backoff)."""
        started: float | None = None
        attempt = 0
        while True:
            await self._wait_for_rate()
            if started is None:
                started = time.perf_counter()
            stats.calls += 1
            failure: BaseException | None = None
            retry = False
            try:
                answer = await self._invoke(inputs)
            except self.transient as exc:
                failure, retry = exc, attempt < self.retries
            except Exception as exc:
                failure = exc
            if failure is None:
                elapsed = (time.perf_counter() - started) * 1000
                try:
                    return self._align(positions, inputs, keys, answer, elapsed)
                except Exception as exc:  # results so odd that reading them fails
                    failure = LookupResultError(
                        f"lookup {self.name} returned results that could not be read: {type(exc).__name__}: {exc}"
                    )
            if not retry:
                elapsed = (time.perf_counter() - started) * 1000
                return _CallResult(
                    outcomes=[LookupOutcome(error=failure, elapsed_ms=elapsed) for _ in positions],
                    positions=positions,
                )
            attempt += 1
            stats.retries += 1
            await asyncio.sleep(self._backoff_delay(attempt))

    def _backoff_delay(self, attempt: int) -> float:
        cap = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return self._random.uniform(0, cap) if self.jitter else cap

    async def _wait_for_rate(self) -> None:
        if self.rate is None:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 1.0 / self.rate
        if slot > now:
            await asyncio.sleep(slot - now)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="fillgate-lookup"
                )
            return self._executor

    async def _invoke(self, inputs: list[Any]) -> Sequence[Any]:
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                if self._is_async:
                    answer = await self.fn(inputs)  # type: ignore[misc]
                else:
                    loop = asyncio.get_running_loop()
                    # In a copy of this task's context: the active run (and so the guard that
                    # keeps job code on its target) is seen by the worker thread too.
                    context = contextvars.copy_context()
                    answer = await loop.run_in_executor(self._pool(), context.run, self.fn, inputs)
                    if inspect.isawaitable(answer):
                        answer = await answer
        except TimeoutError:
            if deadline.expired():
                raise LookupTimeoutError(
                    f"lookup {self.name} timed out after {self.timeout:g}s on a call of "
                    f"{len(inputs)} input(s)."
                ) from None
            raise
        if isinstance(answer, str | bytes | Mapping) or not isinstance(answer, Sequence):
            raise LookupResultError(
                f"lookup {self.name} returned {type(answer).__name__}; it must return a list of "
                f"results, one per input ({len(inputs)} inputs in this call)."
            )
        return answer

    # --- alignment ------------------------------------------------------------------------

    def _align(
        self, positions: list[int], inputs: list[Any], keys: list[Any] | None, answer: Sequence[Any], elapsed: float
    ) -> _CallResult:
        if self.match_by is None:
            return _align_by_index(positions, answer, elapsed)
        assert keys is not None
        return _align_by_key(positions, keys, answer, self.match_by, elapsed)


def _align_by_index(positions: list[int], answer: Sequence[Any], elapsed: float) -> _CallResult:
    n, m = len(positions), len(answer)
    indexes = [_field(r, "index") for r in answer]
    claims = [0] * n
    for k in indexes:
        if _is_index(k) and 0 <= k < n:
            claims[int(k)] += 1
    call = _CallResult(outcomes=[], positions=positions)
    for i in range(n):
        got: Any = None
        if i >= m:
            reason = f"no result at position {i}: the call returned {m} results for {n} inputs"
        else:
            got = indexes[i]
            if got is _MISSING:
                got = None
                reason = f"the result at position {i} has no index"
            elif not _is_index(got) or got != i:
                reason = f"the result at position {i} has index {got!r}, expected {i}"
            elif claims[i] > 1:
                reason = f"index {i} is claimed by {claims[i]} results"
            else:
                call.outcomes.append(LookupOutcome(value=answer[i], elapsed_ms=elapsed))
                continue
        call.outcomes.append(LookupOutcome(unexpected=reason, elapsed_ms=elapsed))
        call.unexpected += 1
        if call.mismatch is None:
            call.mismatch = {"row": positions[i], "expected": i, "got": got, "reason": reason}
    if m > n:
        call.extra = m - n
        got = indexes[n]
        call.stray = {
            "row": None,
            "expected": None,
            "got": None if got is _MISSING else got,
            "reason": f"extra result at position {n}: the call returned {m} results for {n} inputs",
        }
    return call


def _align_by_key(
    positions: list[int], keys: list[Any], answer: Sequence[Any], field_name: str, elapsed: float
) -> _CallResult:
    wanted = set(keys)
    claimants: dict[Any, list[int]] = {}
    call = _CallResult(outcomes=[], positions=positions)
    for j, result in enumerate(answer):
        k = _field(result, field_name)
        try:
            known = k is not _MISSING and k in wanted
        except TypeError:  # unhashable
            known = False
        if known:
            claimants.setdefault(k, []).append(j)
            continue
        call.extra += 1
        if call.stray is None:
            shown = None if k is _MISSING else k
            why = f"has no {field_name!r}" if k is _MISSING else f"has {field_name}={k!r}, which no input has"
            call.stray = {"row": None, "expected": None, "got": shown,
                          "reason": f"the result at position {j} {why}"}
    for i, k in enumerate(keys):
        found = claimants.get(k)
        if found is not None and len(found) == 1:
            call.outcomes.append(LookupOutcome(value=answer[found[0]], elapsed_ms=elapsed))
            continue
        if found is None:
            reason = f"no result has {field_name}={k!r}"
        else:
            reason = f"{len(found)} results have {field_name}={k!r}"
        call.outcomes.append(LookupOutcome(unexpected=reason, elapsed_ms=elapsed))
        call.unexpected += 1
        if call.mismatch is None:
            call.mismatch = {"row": positions[i], "expected": k, "got": None if found is None else k,
                             "reason": reason}
    return call
