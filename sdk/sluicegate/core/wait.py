"""How long the trainer waits for data: the one number that says whether a training job is starved.

A process has one :class:`Meter`. It counts the time the trainer spends blocked where sluicegate hands it
data (the batch a ``for item in ds`` loop waits on, ``get_many``, the next batch of a loader made by
``sluicegate.torch``), from the first such wait on. Blocking points nest (a loader's ``next`` runs the
dataset's fetch when it has no workers), so only the outermost one counts. DataLoader workers switch their
meter off: a worker waiting on the sidecar is read-ahead, not the trainer waiting.

With a sidecar, the SDK reports the waited seconds to it (``POST /v1/wait``) at most once a second; the
sidecar exports them as ``sluicegate_trainer_data_wait_seconds_total``, whose ``rate()`` is the fraction of
wall time the trainer waited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["METER", "DataWait", "Meter"]

REPORT_EVERY_S = 1.0


@dataclass(frozen=True)
class DataWait:
    """What :func:`sluicegate.data_wait` returns: seconds waited and seconds since the first wait."""

    waited_s: float
    elapsed_s: float
    waits: int

    @property
    def ratio(self) -> float:
        """The fraction of wall time the trainer spent waiting for data (0 before the first wait)."""
        return min(1.0, self.waited_s / self.elapsed_s) if self.elapsed_s > 0 else 0.0


Sink = Callable[[float], None]


class Meter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._local = threading.local()  # nesting depth per thread
        self._started: float | None = None
        self._waited = 0.0
        self._waits = 0
        self._enabled = True
        self._unreported = 0.0
        self._reported_at = 0.0
        self._sink: Sink | None = None

    def disable(self) -> None:
        """Stop counting in this process (a DataLoader worker: its waits are read-ahead)."""
        self._enabled = False

    def report_to(self, sink: Sink | None) -> None:
        """Send waited seconds to ``sink`` (a sidecar), at most once every :data:`REPORT_EVERY_S`."""
        self._sink = sink

    @contextmanager
    def blocked(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth or not self._enabled:
            yield
            return
        self._local.depth = 1
        started = self._clock()
        try:
            yield
        finally:
            self._local.depth = 0
            self._add(started, self._clock())

    def _add(self, started: float, ended: float) -> None:
        sink, due = self._sink, 0.0
        with self._lock:
            if self._started is None:
                self._started = started
            self._waited += ended - started
            self._waits += 1
            self._unreported += ended - started
            if sink is not None and ended - self._reported_at >= REPORT_EVERY_S:
                due, self._unreported, self._reported_at = self._unreported, 0.0, ended
        if due and sink is not None:
            sink(due)

    def read(self) -> DataWait:
        with self._lock:
            elapsed = 0.0 if self._started is None else self._clock() - self._started
            return DataWait(waited_s=self._waited, elapsed_s=elapsed, waits=self._waits)


METER = Meter()
