"""A plan or an apply collects cyclic garbage less often, and leaves the thresholds as found."""

from __future__ import annotations

import gc
import threading

from fillgate.collector import BATCH_WORK_THRESHOLD, fewer_collections


def test_the_thresholds_are_raised_inside_and_restored_after_nesting_and_threads() -> None:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        inside: list[tuple[int, ...]] = []
        with fewer_collections():
            inside.append(gc.get_threshold())
            with fewer_collections():
                inside.append(gc.get_threshold())
            inside.append(gc.get_threshold())  # the inner one ending restores nothing yet
            entered, leave = threading.Event(), threading.Event()

            def other() -> None:
                with fewer_collections():
                    entered.set()
                    leave.wait(5)

            thread = threading.Thread(target=other)
            thread.start()
            entered.wait(5)
        inside.append(gc.get_threshold())  # the other thread is still inside
        leave.set()
        thread.join()
        assert inside == [(BATCH_WORK_THRESHOLD, 10, 10)] * 4
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_a_higher_threshold_set_by_the_program_is_kept() -> None:
    before = gc.get_threshold()
    gc.set_threshold(BATCH_WORK_THRESHOLD * 2, 5, 5)
    try:
        with fewer_collections():
            assert gc.get_threshold() == (BATCH_WORK_THRESHOLD * 2, 5, 5)
        assert gc.get_threshold() == (BATCH_WORK_THRESHOLD * 2, 5, 5)
    finally:
        gc.set_threshold(*before)
