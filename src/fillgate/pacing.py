"""Batch sizes that adapt to the database: ``--chunk-time``.

With a chunk time, every batch is sized so that its transaction takes about that long. After
each batch, :class:`BatchSizer` folds the batch's rows and seconds into decaying sums (the
weighted average rate of pt-online-schema-change: each older batch counts ``WEIGHT`` times
less), and the next batch has ``rate x chunk time`` changes, within bounds:

- at most ``--batch-size`` (the maximum), at least ``MIN_BATCH`` (or the maximum, if smaller);
- growing at most ``GROWTH`` times per batch, so one fast batch cannot make the next one huge
  (GitLab's batch optimizer caps its growth the same way); shrinking is immediate;
- the first batch has ``START_BATCH`` changes (or fewer, by the maximum), unless a rate was
  measured before (the plan's trial batch), which then sizes it.

A batch that timed out is retried at a quarter of its size (:func:`quarter`), and the sizer
starts again from that size.

Without a chunk time, every batch has ``--batch-size`` changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Generic, TypeVar

from fillgate.errors import UsageError

DEFAULT_CHUNK_TIME = 0.5
"""The command line's chunk time when neither ``--chunk-time`` nor ``--batch-size`` is given."""
DEFAULT_MAX_BATCH = 5000
"""The most changes a batch holds when ``--batch-size`` is not given."""
MIN_BATCH = 10
"""The fewest changes an adaptive batch holds (a slower database still moves)."""
START_BATCH = 100
"""The first adaptive batch, when no rate was measured before."""
GROWTH = 2.0
"""The most a batch may grow over the previous one."""
WEIGHT = 0.75
"""How much each older batch counts less in the average rate."""
TIMEOUT_FACTOR = 10
"""The default batch timeout is this many chunk times (and at least ``MIN_TIMEOUT_S``)."""
MIN_TIMEOUT_S = 5.0

T = TypeVar("T")


def quarter(size: int) -> int:
    """The size a timed-out batch is retried at."""
    return max(1, size // 4)


class BatchSizer:
    """The size of the next batch; see the module docstring. ``chunk_time`` None or 0: fixed."""

    def __init__(self, max_size: int, chunk_time: float | None = None, rate: float | None = None) -> None:
        if max_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {max_size}.")
        if chunk_time is not None and chunk_time < 0:
            raise UsageError(f"--chunk-time must be >= 0 seconds, got {chunk_time!r}.")
        self.max_size = max_size
        self.chunk_time = chunk_time or None
        self.min_size = min(MIN_BATCH, max_size)
        self._rows = self._seconds = 0.0
        start = START_BATCH if not rate or not self.chunk_time else rate * self.chunk_time
        self.size = self._bounded(start) if self.chunk_time else max_size

    @property
    def adaptive(self) -> bool:
        return self.chunk_time is not None

    @property
    def rate(self) -> float | None:
        """The weighted average rate (changes per second) of the batches so far."""
        return self._rows / self._seconds if self._seconds > 0 else None

    def _bounded(self, size: float) -> int:
        return max(self.min_size, min(self.max_size, int(size)))

    def done(self, rows: int, seconds: float) -> int:
        """A batch of ``rows`` changes took ``seconds`` in its transaction: the next size."""
        if rows <= 0:
            return self.size
        self._rows = self._rows * WEIGHT + rows
        self._seconds = self._seconds * WEIGHT + max(seconds, 1e-6)
        if self.chunk_time is not None:
            wanted = self._rows / self._seconds * self.chunk_time
            self.size = self._bounded(min(wanted, self.size * GROWTH))
        return self.size

    def timed_out(self, size: int) -> int:
        """A batch of ``size`` changes timed out: retry at a quarter, and start from there."""
        retry = quarter(size)
        if self.chunk_time is not None:
            self.size = max(1, min(self.size, retry))
            self._rows = self._seconds = 0.0
        return retry


def batch_timeout(chunk_time: float | None, given: float | None) -> float | None:
    """The batch timeout: ``--batch-timeout`` if given (0: none), else ``TIMEOUT_FACTOR`` chunk
    times (at least ``MIN_TIMEOUT_S``) with a chunk time, else none."""
    if given is not None:
        return given or None
    if chunk_time:
        return max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * chunk_time)
    return None


class Batches(Generic[T]):
    """Takes batches of any size from a stream, in order; what a batch gave back (the part of
    a timed-out batch not retried) comes first in the next ones."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items: Iterator[T] = iter(items)
        self._back: list[T] = []

    def take(self, size: int) -> list[T]:
        batch, self._back = self._back[:size], self._back[size:]
        if len(batch) < size:
            batch.extend(islice(self._items, size - len(batch)))
        return batch

    def give_back(self, items: list[T]) -> None:
        self._back = items + self._back
