"""Threads: the engine's asyncio loop for synchronous callers, and the workers that read and hash.

Neither uses :mod:`concurrent.futures` executors for the engine's own work: those refuse new work once
the interpreter starts exiting ("cannot schedule new futures after interpreter shutdown"), which a loop
still finishing a read-ahead hits whenever a trainer leaves a ``for item in ds`` loop early.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

__all__ = ["Finalizer", "LoopThread", "Workers", "close_on_collect", "split"]

T = TypeVar("T")
U = TypeVar("U")
Finalizer = Callable[[], Coroutine[Any, Any, None]]
_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class Workers:
    """A few daemon threads for blocking batch work; each job's result reaches the loop in one callback.

    Started on first use, and again in a forked child (threads do not survive ``fork()``). Jobs are whole
    batches (read and hash many blobs), so the hand-off costs one queue put and one loop callback per batch.
    """

    def __init__(self, threads: int, name: str) -> None:
        self.threads = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _jobs(self) -> queue.SimpleQueue[_Job | None]:
        with self._lock:
            if self._queue is None or self._pid != os.getpid():
                jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
                for i in range(self.threads):
                    threading.Thread(
                        target=_work, args=(jobs,), name=f"{self._name}-{i}", daemon=True
                    ).start()
                self._queue, self._pid = jobs, os.getpid()
            return self._queue

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on a worker thread, as a future of the calling loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs().put((fn, args, loop, future))
        return future

    async def map(self, fn: Callable[[Sequence[T]], list[U]], items: Sequence[T]) -> list[U]:
        """``fn`` over ``items`` split into one contiguous share per worker, results in order: one
        hand-off per worker for the whole batch, and the shares' reads and hashes run in parallel."""
        shares = await asyncio.gather(*(self.run(fn, s) for s in split(items, self.threads)))
        return [x for share in shares for x in share]

    def close(self) -> None:
        with self._lock:
            jobs, self._queue = self._queue, None
        if jobs is not None and self._pid == os.getpid():
            for _ in range(self.threads):
                jobs.put(None)


def split(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """Contiguous, near-equal parts (at most ``parts``, none empty)."""
    n = len(items)
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        fn, args, loop, future = job
        try:
            outcome, failed = fn(*args), False
        except BaseException as exc:  # delivered to the one waiter it belongs to
            outcome, failed = exc, True
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(_settle, future, outcome, failed)
        del job, fn, args, loop, future, outcome  # do not keep the last batch's bytes alive while idle


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.done():  # its waiter was cancelled
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


_RUNNING: dict[int, tuple[asyncio.AbstractEventLoop, threading.Thread]] = {}


class LoopThread:
    """An asyncio loop on a daemon thread, for synchronous callers (embedded mode, the HTTP client).

    Started on first use. A forked child (DataLoader worker) does not inherit threads, so it starts its
    own loop instead of waiting forever on the parent's. :meth:`close` (also called when the owner is
    garbage collected, see :func:`close_on_collect`) runs a final coroutine, cancels what is left and
    ends the thread.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                _RUNNING[id(loop)] = (loop, thread)
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self, final: Finalizer | None = None, wait: bool = True) -> None:
        """Run ``final()`` on the loop, cancel the remaining tasks and stop the thread."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None or self._pid != os.getpid():
            return
        _RUNNING.pop(id(loop), None)
        _stop(loop, thread, final, wait=wait and threading.current_thread() is not thread)


def close_on_collect(owner: object, loop: LoopThread, final: Finalizer | None = None) -> None:
    """Close ``loop`` when ``owner`` is garbage collected, so a dropped dataset leaves no thread behind."""
    weakref.finalize(owner, loop.close, final, False)


def _stop(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, final: Finalizer | None, wait: bool
) -> None:
    async def finish() -> None:
        if final is not None:
            with contextlib.suppress(Exception):
                await final()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if not loop.is_running():
        return
    try:
        done = asyncio.run_coroutine_threadsafe(finish(), loop)
    except RuntimeError:  # the loop closed between the check and the call
        return
    # Stopped only once the result is delivered: stopping inside finish() would strand the waiter.
    done.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
    if wait:
        with contextlib.suppress(Exception):
            done.result(timeout=10)
        thread.join(timeout=5)


@atexit.register
def _shutdown_all() -> None:
    """Stop every loop still running at interpreter exit, so no task is destroyed while pending."""
    for loop, thread in list(_RUNNING.values()):
        _stop(loop, thread, None, wait=True)
    _RUNNING.clear()
