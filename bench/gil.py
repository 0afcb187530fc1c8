"""The GIL's toll on a verified read: what one CPython process can read and BLAKE3-verify per second on a
worker thread, alone and beside a thread running Python, in Python and with the native reader.

In Python, every read and every hash in the engine's worker (open, read, close, BLAKE3) releases the GIL
and must take it back. Alone, taking it back is free. Beside a thread that runs Python (a training loop
between its waits, the engine's own loop, a transform), each take-back waits for that thread to give the
GIL up, which CPython forces only every switch interval (5 ms). The native reader
(``sluicegate.core.engine._native``, native/read_blobs.c) releases it once per batch. This benchmark
measures both on the engine's own function (``_read_files``), so the stream benchmark's figures can be read
against them.

``GIL_ITEMS`` (3,000) blobs of ``GIL_ITEM_KB`` (100) KiB of random bytes are written to a temporary
directory, laid out as a store's ``blobs/``, and read once before the cases (page cache warm). Each case
runs in a fresh process, ``GIL_ROUNDS`` (3) rounds in alternating order, best round kept:

* ``verified read in Python, 1 thread`` (the baseline), ``2 threads``, ``2 processes`` (one thread each,
  half the blobs each): ``_read_files`` with the native reader switched off, over batches of 64 blobs;
* ``verified read natively``: the same with the native reader (the engine's default where it is built);
* ``... beside a busy thread``: the same with one more thread counting in a Python loop;
* ``... freed heap kept``: with glibc's mmap and trim thresholds raised (``mallopt``), so new blobs reuse
  freed heap rather than fault in fresh pages (glibc only);
* ``read only`` and ``hash only`` (BLAKE3 of bytes already in memory), alone and beside a busy thread: which
  of the two GIL-releasing halves of the Python read suffers.

Python cases beside a busy thread read a tenth of the blobs (at least 320). Results:
``bench/results/gil.json`` and ``gil.md``. About two minutes on 2 cores, from a checkout::

    python -m bench gil
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sluicegate.core.engine import upstream
from sluicegate.core.engine.upstream import BlobRef, Outcome, _read_fd
from sluicegate.core.manifest import blake3_hex
from sluicegate.core.store import blob_key, sha256_hex

from bench import machine, write_results

ITEMS = int(os.environ.get("GIL_ITEMS", "3000"))
ITEM_KB = float(os.environ.get("GIL_ITEM_KB", "100"))
ROUNDS = int(os.environ.get("GIL_ROUNDS", "3"))
BATCH = 64  # blobs per worker hand-off, as a read-ahead flight splits them
HELD = 20  # batches whose bytes stay alive, as the memory tier holds blobs until it evicts them
BASELINE = "verified read in Python, 1 thread"

# name -> (work, threads, processes, busy thread beside it, freed heap kept)
CASES: dict[str, tuple[str, int, int, bool, bool]] = {
    BASELINE: ("python", 1, 1, False, False),
    "verified read in Python, 1 thread, freed heap kept": ("python", 1, 1, False, True),
    "verified read in Python, 2 threads": ("python", 2, 1, False, False),
    "verified read in Python, 2 processes": ("python", 1, 2, False, False),
    "verified read in Python, 1 thread beside a busy thread": ("python", 1, 1, True, False),
    "verified read in Python, 2 threads beside a busy thread": ("python", 2, 1, True, False),
    "verified read natively, 1 thread": ("native", 1, 1, False, False),
    "verified read natively, 2 threads": ("native", 2, 1, False, False),
    "verified read natively, 1 thread beside a busy thread": ("native", 1, 1, True, False),
    "verified read natively, 2 threads beside a busy thread": ("native", 2, 1, True, False),
    "read only (Python), 1 thread": ("read", 1, 1, False, False),
    "read only (Python), 1 thread beside a busy thread": ("read", 1, 1, True, False),
    "hash only, 1 thread": ("hash", 1, 1, False, False),
    "hash only, 1 thread beside a busy thread": ("hash", 1, 1, True, False),
}


def _write_blobs(root: Path) -> list[BlobRef]:
    (root / "blobs").mkdir(parents=True)
    size = int(ITEM_KB * 1024)
    refs = []
    for i in range(ITEMS):
        data = os.urandom(size)
        sha = sha256_hex(data)
        (root / blob_key(sha)).write_bytes(data)
        refs.append(BlobRef(sha, size, f"item{i:06d}", blake3=blake3_hex(data)))
    return refs


def _job(work: str, root: str, refs: list[BlobRef]) -> Callable[[list[BlobRef]], list[Any]]:
    if work in ("python", "native"):
        if work == "python":
            upstream._native = None  # this process only: the engine's pure-Python read
        elif upstream._native is None:
            raise RuntimeError("the native reader is not built (see hatch_build.py)")

        def verified(batch: list[BlobRef]) -> list[Outcome]:
            outcomes = upstream._read_files(root, batch)
            for ref, got in zip(batch, outcomes, strict=True):
                if isinstance(got, BaseException) or got.digest != ref.check:
                    raise RuntimeError(f"blob {ref.sha} did not verify: {got!r}")
            return outcomes

        return verified
    if work == "read":

        def read(batch: list[BlobRef]) -> list[bytes]:
            out = []
            for ref in batch:
                fd = os.open(f"{root}/{blob_key(ref.sha)}", os.O_RDONLY)
                try:
                    out.append(_read_fd(fd, ref.size))
                finally:
                    os.close(fd)
            return out

        return read
    # hash only: the bytes are read before the clock starts (a few batches' worth, reused)
    pool = [Path(root, blob_key(r.sha)).read_bytes() for r in refs[: BATCH * 4]]

    def hash_only(batch: list[BlobRef]) -> list[str]:
        return [blake3_hex(pool[i % len(pool)]) for i in range(len(batch))]

    return hash_only


def _keep_freed_heap() -> None:
    """Raise glibc's mmap and trim thresholds: new blobs reuse freed heap rather than fault in fresh pages."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD (glibc's ceiling for it)
    libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD


def _measure(
    work: str, threads: int, busy: bool, kept: bool, root: str, refs: list[BlobRef], start: Any, out: Any
) -> None:
    """In a fresh process: ``threads`` threads take batches of ``refs`` until none is left, each batch's
    bytes held for HELD batches."""
    if kept:
        _keep_freed_heap()
    job = _job(work, root, refs)
    batches = iter([refs[i : i + BATCH] for i in range(0, len(refs), BATCH)])
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        held: deque[Any] = deque(maxlen=HELD)
        while True:
            with lock:
                batch = next(batches, None)
            if batch is None:
                return
            held.append(job(batch))

    def spin() -> None:  # Python running between waits, as a training loop's own code does
        n = 0
        while not stop.is_set():
            for _ in range(1000):
                n += 1

    if busy:
        threading.Thread(target=spin, daemon=True).start()
    start.wait()
    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(time.perf_counter() - started)
    stop.set()


def _case(name: str, root: str, refs: list[BlobRef]) -> dict[str, Any]:
    work, threads, processes, busy, kept = CASES[name]
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    if busy and work != "native":  # a few hundred items per second: a tenth of the blobs tells the rate
        refs = refs[: max(5 * BATCH, len(refs) // 10)]
    load = round(os.getloadavg()[0], 2)
    shares = [refs[i::processes] for i in range(processes)]
    args = [(work, threads, busy, kept, root, share, start, out) for share in shares]
    procs = [ctx.Process(target=_measure, args=a) for a in args]
    for p in procs:
        p.start()
    seconds = max(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"case {name!r} failed in its process (exit code {p.exitcode})")
    nbytes = sum(r.size for r in refs)
    return {
        "items_per_s": len(refs) / seconds,
        "mb_per_s": nbytes / seconds / 1e6,
        "seconds": round(seconds, 3),
        "load_average_before": load,
    }


def run() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sg-bench-gil-"))
    try:
        refs = _write_blobs(work)
        for ref in refs:  # page cache warm for every case
            (work / blob_key(ref.sha)).read_bytes()
        best: dict[str, dict[str, Any]] = {}
        names = list(CASES)
        for rnd in range(ROUNDS):
            for name in names if rnd % 2 == 0 else names[::-1]:
                got = _case(name, str(work), refs)
                if name not in best or got["items_per_s"] > best[name]["items_per_s"]:
                    best[name] = got
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = best[BASELINE]["items_per_s"]
    for got in best.values():
        got["x"] = round(got["items_per_s"] / base, 3)
    result = {
        "items": ITEMS,
        "item_kb": ITEM_KB,
        "rounds": ROUNDS,
        "switch_interval_s": sys.getswitchinterval(),
        "cases": best,
        "machine": machine(),
    }
    write_results("gil", result, _markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# The GIL's toll on a verified read (`python -m bench gil`)",
        "",
        f"{r['items']:,} blobs of {r['item_kb']:g} KiB, page cache warm; the engine's own read-and-verify "
        f"function (open, read, close, BLAKE3) over batches of {BATCH}, each held for {HELD} batches as the "
        "memory tier holds blobs. Each case in a fresh process, "
        f"best of {r['rounds']} rounds. Switch interval {r['switch_interval_s'] * 1000:g} ms. "
        f"{m['cpus']} CPUs, load {m['load_average_1m']} at the end, {m['date_utc']}, Python {m['python']}.",
        "",
        f"x: the ratio to `{BASELINE}`.",
        "",
        "| case | items/s | MB/s | x | load avg before |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in r["cases"].items():
        lines.append(
            f"| {name} | {c['items_per_s']:,.0f} | {c['mb_per_s']:,.0f} | {c['x']:.3f} "
            f"| {c['load_average_before']} |"
        )
    return "\n".join(lines)
