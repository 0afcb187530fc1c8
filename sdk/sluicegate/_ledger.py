"""Recording what a dataset hands out into its store's ledger, off the hot path (format: core.ledger).

A dataset opened with a :class:`Ledger` counts what it hands out: iteration bumps one integer per item
(:class:`Pass`), random access notes each batch's indexes (:class:`Picks`). Every ``flush_items`` items or
``flush_s`` seconds, at the end of a pass and at close or exit, the count is cut into a
:class:`~sluicegate.core.ledger.Consumed` and queued; a daemon thread per process (:class:`Recorder`) writes
the queue, in order, through the source's :class:`Sink` (the store itself, or the sidecar). The iterator
never waits for a write. A write that fails is logged and retried with the same bytes at the next tick, and
nothing after it is written first, so no range is lost or recorded twice while the process lives; at exit
the queue is drained for a few seconds and whatever could not be written is logged as lost.

Each process (a DataLoader worker too) writes its own chain, so the workers' records together are exactly
what the loader handed out. A forked child starts with no recorders: the parent's threads and locks are not
its own.
"""

from __future__ import annotations

import atexit
import collections
import logging
import multiprocessing.util
import os
import re
import secrets
import socket
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from sluicegate._exceptions import ConfigError, ConflictError, SluicegateError
from sluicegate.core.ledger import (
    NAME_PATTERN,
    ChainWriter,
    Consumed,
    Range,
    Reading,
    Writer,
    extend_ranges,
)
from sluicegate.core.partition import Positions
from sluicegate.core.store import Store

__all__ = ["Ledger", "Pass", "Recorder", "Sink", "StoreSink", "chain_name", "ledger_of", "recorder"]

log = logging.getLogger("sluicegate.ledger")

_EXIT_DRAIN_S = 4.0  # torch gives a finished DataLoader worker 5 s before it terminates it
_RETRY_S = 1.0
_MAX_TICK_S = 1.0


def _default_run() -> str:
    """``$SLUICEGATE_RUN``, else torchrun's run id (shared by every rank), else a new id."""
    for var in ("SLUICEGATE_RUN", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var, "")
        if value and value != "none" and re.fullmatch(NAME_PATTERN, value):
            return value
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


class Ledger(BaseModel):
    """Record what a dataset hands out in its store's ledger: ``sluicegate.open(uri, ledger="run-7")``.

    ``run`` names the training run; every process of one run must use the same (default:
    ``$SLUICEGATE_RUN``, else torchrun's ``$TORCHELASTIC_RUN_ID``, else a new id, see ``ds.ledger.run``).
    A record is written every ``flush_items`` items or ``flush_s`` seconds, whichever comes first, and at the
    end of each pass and at close.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str = Field(default_factory=_default_run, pattern=NAME_PATTERN)
    flush_items: int = Field(default=10_000, ge=1)
    flush_s: float = Field(default=30.0, gt=0, le=3600)


def ledger_of(value: Ledger | str | bool | None) -> Ledger | None:
    """``open(ledger=...)``: a :class:`Ledger`, a run id, ``True`` for the default run id, or off."""
    if value is None or value is False:
        return None
    if value is True:
        return Ledger()
    if isinstance(value, str):
        if not re.fullmatch(NAME_PATTERN, value):
            raise ConfigError(
                f"ledger run {value!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        return Ledger(run=value)
    if isinstance(value, Ledger):
        return value
    raise ConfigError(f"ledger must be a run id, True, False or a sluicegate.Ledger, got {value!r}")


# -- sinks -------------------------------------------------------------------------------------------


class Sink(ABC):
    """Where a recorder's stretches go. ``write`` runs on the recorder's thread; it raises
    :class:`ConfigError` when recording cannot work at all (recording stops, loudly), any other
    :class:`SluicegateError` or ``OSError`` for a fault worth retrying."""

    @abstractmethod
    def write(self, consumed: Consumed, writer: Writer) -> None: ...

    def close(self) -> None:
        return None


def chain_name(writer: Writer) -> str:
    """A chain of its own for this writer: host, process, DataLoader worker and a random tag."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", writer.host)[:40].strip(".-_") or "host"
    worker = "" if writer.worker is None else f"-w{writer.worker}"
    return f"{host}-{writer.pid}{worker}-{secrets.token_hex(3)}"


class StoreSink(Sink):
    """Appends to a chain of the dataset store's own ledger (embedded mode)."""

    def __init__(
        self, store: Callable[[], Store], run: str, version: int, manifest: Callable[[], str | None]
    ) -> None:
        self._store, self._run, self._version, self._manifest = store, run, version, manifest
        self._chain: ChainWriter | None = None

    def write(self, consumed: Consumed, writer: Writer) -> None:
        store = self._store()
        if self._chain is None:
            self._chain = ChainWriter(store, self._run, chain_name(writer))
        try:
            self._chain.append(
                consumed, writer=writer, dataset=store.uri, version=self._version, manifest=self._manifest()
            )
        except ConflictError as exc:
            # Not this writer's chain after all (a clash of random tags, or an edit): go on in a new one.
            log.warning("ledger: %s; continuing in a new chain", exc)
            self._chain = None
            raise


# -- counting ----------------------------------------------------------------------------------------


class Pass:
    """One pass over a reading's sequence from ``start``: the iterator adds 1 to ``pos`` per item it hands
    out and calls :meth:`Recorder.cut` when ``pos`` reaches ``due``; the rest is the recorder's."""

    __slots__ = ("due", "flush_items", "flush_s", "flushed", "pos", "reading", "since", "start")

    def __init__(self, reading: Reading, start: int, flush_items: int, flush_s: float) -> None:
        self.reading, self.start = reading, start
        self.pos = 0
        self.flushed = 0
        self.flush_items, self.flush_s = flush_items, flush_s
        self.due = flush_items
        self.since = time.monotonic()


class _Picks:
    """Random accesses of one reading since the last cut, as ranges in the order asked for."""

    __slots__ = ("count", "flush_items", "flush_s", "ranges", "since")

    def __init__(self, flush_items: int, flush_s: float) -> None:
        self.ranges: list[Range] = []
        self.count = 0
        self.flush_items, self.flush_s = flush_items, flush_s
        self.since = time.monotonic()


class Recorder:
    """One process's recorder for one run of one source: cuts passes and picks into stretches and writes
    them, in order, on its own daemon thread (see the module docstring)."""

    def __init__(self, run: str, sink: Callable[[], Sink]) -> None:
        self.run = run
        self.pid = os.getpid()
        self._make_sink = sink
        self._sink: Sink | None = None
        self._writer: Writer | None = None
        self._cond = threading.Condition()
        self._passes: list[Pass] = []
        self._picks: dict[Reading, _Picks] = {}
        self._queue: collections.deque[Consumed] = collections.deque()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._disabled: str | None = None
        self.written = 0  # stretches written (tests and the benchmark read it)

    # -- what readers call (cheap, never blocking on I/O) ----------------------------------------

    def begin(self, reading: Reading, start: int, ledger: Ledger) -> Pass:
        p = Pass(reading, start, ledger.flush_items, ledger.flush_s)
        with self._cond:
            self._passes.append(p)
            self._started()
        return p

    def cut(self, p: Pass) -> None:
        with self._cond:
            self._cut_pass(p)
            self._cond.notify_all()

    def end(self, p: Pass) -> None:
        with self._cond:
            self._cut_pass(p)
            if p in self._passes:
                self._passes.remove(p)
            self._cond.notify_all()

    def picked(self, reading: Reading, indexes: Positions, ledger: Ledger) -> None:
        with self._cond:
            picks = self._picks.get(reading)
            if picks is None:
                picks = self._picks[reading] = _Picks(ledger.flush_items, ledger.flush_s)
                self._started()
            extend_ranges(picks.ranges, indexes)
            picks.count += len(indexes)
            if picks.count >= picks.flush_items:
                self._cut_picks(reading, picks)
                self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Cut everything counted so far and wait up to ``timeout`` s for it to be written; False when
        something is still unwritten then (it stays queued and is retried)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            for p in self._passes:
                self._cut_pass(p)
            for reading, picks in list(self._picks.items()):
                self._cut_picks(reading, picks)
            if self._queue:
                self._started()
            self._cond.notify_all()
            while self._queue and self._disabled is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- cutting (under the lock) ----------------------------------------------------------------

    def _cut_pass(self, p: Pass) -> None:
        pos = p.pos  # read once: the iterator may move on meanwhile, into the next stretch
        if pos > p.flushed and self._disabled is None:
            ranges = ((p.start + p.flushed, p.start + pos),)
            self._queue.append(Consumed(reading=p.reading, ranges=ranges))
        p.flushed = pos
        p.due = pos + p.flush_items
        p.since = time.monotonic()

    def _cut_picks(self, reading: Reading, picks: _Picks) -> None:
        if picks.ranges and self._disabled is None:
            self._queue.append(Consumed(reading=reading, ranges=tuple(picks.ranges)))
        del self._picks[reading]

    def _cut_due(self) -> None:
        now = time.monotonic()
        for p in self._passes:
            if p.pos > p.flushed and now - p.since >= p.flush_s:
                self._cut_pass(p)
        for reading, picks in list(self._picks.items()):
            if now - picks.since >= picks.flush_s:
                self._cut_picks(reading, picks)

    def _tick(self) -> float:
        if self._failing:
            return _RETRY_S
        waits = [p.flush_s for p in self._passes] + [p.flush_s for p in self._picks.values()]
        return min([*waits, _MAX_TICK_S])

    def _started(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="sluicegate-ledger", daemon=True)
            self._thread.start()

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._passes and not self._picks:
                    self._thread = None  # idle: the next begin(), picked() or flush() starts a new thread
                    return
                if not self._queue or self._failing:
                    self._cond.wait(self._tick())
                self._cut_due()
                batch = list(self._queue)
            written = 0
            failure: BaseException | None = None
            for consumed in batch:
                try:
                    if self._sink is None:
                        # Made once per recorder, on this thread: one chain per process and run.
                        self._sink, self._writer = self._make_sink(), _writer()
                    assert self._writer is not None
                    self._sink.write(consumed, self._writer)
                except ConfigError as exc:
                    self._disable(f"{exc}")
                    return
                except (SluicegateError, OSError) as exc:
                    failure = exc
                    break
                written += 1
            with self._cond:
                for _ in range(written):
                    self._queue.popleft()
                self.written += written
                if failure is not None and not self._failing:
                    log.warning(
                        "ledger: cannot write a record of run %s yet (will retry): %s", self.run, failure
                    )
                elif failure is None and self._failing:
                    log.info("ledger: writing records of run %s again", self.run)
                self._failing = failure is not None
                self._cond.notify_all()

    def _disable(self, why: str) -> None:
        with self._cond:
            lost = sum(c.items for c in self._queue)
            self._disabled = why
            self._queue.clear()
            self._thread = None
            self._cond.notify_all()
        log.error(
            "ledger: recording of run %s stopped, %d consumed items unrecorded: %s", self.run, lost, why
        )

    def pending(self) -> int:
        """Items counted but not written yet."""
        with self._cond:
            queued = sum(c.items for c in self._queue)
            return queued + sum(p.pos - p.flushed for p in self._passes)

    def drain(self, timeout: float) -> None:
        """At exit: write what is left, and say what could not be."""
        if self.pid != os.getpid() or self.flush(timeout):
            return
        log.error(
            "ledger: %d consumed items of run %s could not be recorded before exit: those ranges are lost",
            self.pending(),
            self.run,
        )


def _writer() -> Writer:
    """This process, and its DataLoader worker id in a worker (read without importing torch)."""
    worker = None
    data = sys.modules.get("torch.utils.data")
    if data is not None:
        info = data.get_worker_info()
        worker = None if info is None else int(info.id)
    return Writer(host=socket.gethostname(), pid=os.getpid(), worker=worker)


# -- one recorder per (process, source, run) ---------------------------------------------------------

_lock = threading.Lock()
_recorders: weakref.WeakKeyDictionary[object, dict[str, Recorder]] = weakref.WeakKeyDictionary()
_all: list[Recorder] = []
_exit_pid = os.getpid()


def recorder(owner: object, run: str, sink: Callable[[], Sink]) -> Recorder:
    """The recorder of ``run`` for ``owner`` (a source) in this process, made on first use."""
    global _exit_pid
    with _lock:
        per = _recorders.setdefault(owner, {})
        found = per.get(run)
        if found is None or found.pid != os.getpid():
            found = per[run] = Recorder(run, sink)
            _all.append(found)
            if _exit_pid != os.getpid():
                # A multiprocessing child (a DataLoader worker) ends without atexit but runs these.
                multiprocessing.util.Finalize(None, _drain_all, exitpriority=100)
                _exit_pid = os.getpid()
        return found


def _drain_all() -> None:
    with _lock:
        live = [r for r in _all if r.pid == os.getpid()]
    for r in live:
        r.drain(_EXIT_DRAIN_S)


def _forget_parent() -> None:
    global _lock, _recorders, _all
    _lock = threading.Lock()
    _recorders = weakref.WeakKeyDictionary()
    _all = []


os.register_at_fork(after_in_child=_forget_parent)
# Registered after the engine's loop threads' own exit hook, so it runs before they stop.
atexit.register(_drain_all)
