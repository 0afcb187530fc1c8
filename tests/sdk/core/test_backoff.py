from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st
from sluicegate.core.backoff import Deadline, delay


@given(attempt=st.integers(0, 10_000), first=st.floats(0.001, 5), cap=st.floats(0.001, 60))
def test_delays_grow_with_jitter_and_never_pass_the_cap(attempt: int, first: float, cap: float) -> None:
    got = delay(attempt, first_s=first, max_s=cap)
    assert 0 <= got <= min(cap, first * 2 ** min(attempt, 62))


def test_the_deadline_counts_from_the_first_failure() -> None:
    deadline = Deadline(0.05)
    time.sleep(0.1)  # time before the first failure does not count
    assert not deadline.passed()
    time.sleep(0.1)
    assert deadline.passed()
