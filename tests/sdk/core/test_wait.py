"""The data-wait meter: outermost waits only, workers silent, reports at most once a second."""

from __future__ import annotations

import threading

from sluicegate.core.wait import REPORT_EVERY_S, DataWait, Meter

from tests.clock import Clock


def test_nested_waits_count_once_and_the_ratio_is_of_wall_time() -> None:
    clock = Clock()
    meter = Meter(clock)
    assert meter.read() == DataWait(waited_s=0.0, elapsed_s=0.0, waits=0)
    assert meter.read().ratio == 0.0
    with meter.blocked():  # a loader's next() ...
        clock.now += 1.0
        with meter.blocked():  # ... running the dataset's fetch inside it
            clock.now += 2.0
    clock.now += 7.0  # the trainer computes
    wait = meter.read()
    assert (wait.waited_s, wait.elapsed_s, wait.waits) == (3.0, 10.0, 1)
    assert wait.ratio == 0.3


def test_a_disabled_meter_counts_nothing() -> None:
    clock = Clock()
    meter = Meter(clock)
    meter.disable()
    with meter.blocked():
        clock.now += 5.0
    assert meter.read().waits == 0


def test_reports_are_batched_to_at_most_one_per_interval_and_lose_nothing() -> None:
    clock = Clock()
    meter = Meter(clock)
    sent: list[float] = []
    meter.report_to(sent.append)
    for _ in range(50):  # 50 waits of 0.1 s, 0.1 s apart: 10 s in all
        with meter.blocked():
            clock.now += 0.1
        clock.now += 0.1
    assert 5 <= len(sent) <= 50 * 0.2 / REPORT_EVERY_S + 1
    assert abs(sum(sent) + meter._unreported - 5.0) < 1e-9  # every waited second is sent or still due


def test_threads_nest_independently() -> None:
    meter = Meter()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with meter.blocked():
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(5)
    with meter.blocked():  # not nested in the other thread's wait: counted as its own
        pass
    release.set()
    thread.join(5)
    assert meter.read().waits == 2
