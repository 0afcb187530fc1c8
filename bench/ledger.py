"""The ledger's cost to streaming: the embedded uncached epoch with the ledger off and on, in one run.

The data is :mod:`bench.stream`'s (its knobs apply: ``STREAM_ITEMS`` JPEGs of ``STREAM_ITEM_KB`` KiB against
a ``STREAM_CACHE_MB`` MiB memory cache, at least ``STREAM_MIN_RATIO`` times the cache, so every epoch is
uncached; ``STREAM_WORKDIR`` keeps it between runs). Each case runs in a fresh process
(``bench/stream_case.py``), ``sluicegate.open(store, ledger=...)`` as a user writes it, with the ledger's
default flushing (a record every 10,000 items or 30 s) unless ``LEDGER_FLUSH_ITEMS`` says otherwise:

* ``items/w0``: a plain ``for item in ds`` loop (the data path without torch, where any per-item cost shows);
* ``loader/w0`` and ``loader/w2``: ``to_pytorch(iterable=True).loader(...)`` with 0 and 2 DataLoader workers.

Plus ``per-item``: the CPU time the ledger adds to each item handed out (the counting wrapper of the real
iterator over a list of 2,000,000 objects, against the list alone, best of 3, ``time.process_time``): the
number a loaded shared machine cannot blur, to set against the per-item budget (~65 us at 15,000 items/s).

Off and on of a case run back to back, ``LEDGER_ROUNDS`` (3) times (odd rounds in reverse order). Each
case keeps its best round, as ``bench.stream`` does on a shared machine, and the ratio that counts is the
median over rounds of on/off measured back to back (neighbours' load drifts less between two runs than
across the whole benchmark). After every run with the ledger on, its records
are read back and verified: the chains must be intact and account for exactly the items handed out.
Results: ``bench/results/ledger.json`` and ``ledger.md``.

Small run (about 4 minutes on 2 cores)::

    STREAM_ITEMS=3000 STREAM_CACHE_MB=32 STREAM_MIN_SECONDS=2 LEDGER_ROUNDS=5 python -m bench ledger
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from sluicegate import Ledger, Store
from sluicegate import _ledger as recording
from sluicegate._dataset import _recorded
from sluicegate.core import ledger

from bench import machine, write_results
from bench import stream as _stream
from bench.stream_case import Spec

ROUNDS = int(os.environ.get("LEDGER_ROUNDS", "3"))
FLUSH_ITEMS = os.environ.get("LEDGER_FLUSH_ITEMS")
CASES = [("items", 0), ("loader", 0), ("loader", 2)]


def _spec(store: str, loop: str, workers: int, run: str | None) -> Spec:
    options: dict[str, Any] | None = None
    if run is not None:
        options = {"run": run} | ({"flush_items": int(FLUSH_ITEMS)} if FLUSH_ITEMS else {})
    return Spec(
        system="sluicegate",
        mode="bytes",
        workers=workers,
        batch=_stream.BATCH,
        source=store,
        cache_bytes=_stream.CACHE_MB * 2**20,
        loop=loop,
        steady_epochs=_stream.STEADY_EPOCHS,
        steady_min_s=_stream.MIN_SECONDS,
        steady_max_s=max(_stream.STEADY_SECONDS, _stream.MIN_SECONDS),
        ledger=options,
    )


def _check_ledger(store: str, run: str, measured: dict[str, Any]) -> dict[str, Any]:
    """The run's chains, verified, against what the case says it handed out; then removed from the store."""
    chains = ledger.read_run(Store(store), run)
    broken = [c.broken for c in chains if c.broken is not None]
    recorded = sum(r.items for c in chains for r in c.records)
    handed = sum(measured.get(phase, {}).get("items", 0) for phase in ("first", "steady"))
    shutil.rmtree(Path(store) / "ledger" / run)
    return {
        "chains": len(chains),
        "records": sum(len(c.records) for c in chains),
        "items_recorded": recorded,
        "items_handed_out": handed,
        "exact": not broken and recorded == handed,
        "broken": broken,
    }


class _NullSink(recording.Sink):
    def write(self, consumed: ledger.Consumed, writer: ledger.Writer) -> None:
        return None


def _per_item_cost(n: int = 2_000_000) -> dict[str, float]:
    """CPU ns per item: a list iterated alone, and through the ledger's counting (cuts and writes included,
    to a sink that drops them)."""
    items = [object()] * n
    reading = ledger.Reading(views=(ledger.View(),), seed=None, rank=0, epoch=0, order=ledger.Order.EPOCH)
    recorder = recording.Recorder("bench", _NullSink)

    def plain() -> None:
        for _ in iter(items):
            pass

    def counted() -> None:
        for _ in _recorded(iter(items), recorder, recorder.begin(reading, 0, Ledger(run="bench"))):
            pass

    best: dict[str, float] = {}
    for name, fn in (("plain", plain), ("ledger", counted)) * 3:
        t0 = time.process_time()
        fn()
        best[name] = min(best.get(name, float("inf")), time.process_time() - t0)
    recorder.flush()
    return {
        "plain_ns": round(best["plain"] / n * 1e9, 1),
        "ledger_ns": round(best["ledger"] / n * 1e9, 1),
        "added_ns": round((best["ledger"] - best["plain"]) / n * 1e9, 1),
    }


def run() -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "items": _stream.ITEMS,
            "item_kib": _stream.ITEM_KB,
            "cache_mib": _stream.CACHE_MB,
            "batch": _stream.BATCH,
            "rounds": ROUNDS,
            "steady_epochs": _stream.STEADY_EPOCHS,
            "min_seconds": _stream.MIN_SECONDS,
            "flush_items": int(FLUSH_ITEMS) if FLUSH_ITEMS else "default (10,000)",
        },
    }
    with _stream._workdir() as root:
        data: dict[str, Any] = {"items": _stream.ITEMS, "item_kb": _stream.ITEM_KB, "bases": 32, "format": 2}
        files = _stream._prepared(root / "files", data, _stream._write_files)
        paths = _stream._paths(files)
        sg = {"sluicegate": _stream.version("sluicegate")}
        store = str(_stream._prepared(root / "store", data | sg, lambda d: _stream._import(paths, str(d))))
        shutil.rmtree(Path(store) / "ledger", ignore_errors=True)
        size = sum(p.stat().st_size for p in paths)
        ratio = size / (_stream.CACHE_MB * 2**20)
        result["data"] = {
            "items": len(paths),
            "dataset_mb": round(size / 1e6),
            "dataset_to_cache": round(ratio, 2),
        }
        if ratio < _stream.MIN_RATIO:
            raise SystemExit(
                f"the dataset is only {ratio:.2f}x the cache (STREAM_MIN_RATIO={_stream.MIN_RATIO}): raise "
                "STREAM_ITEMS or lower STREAM_CACHE_MB, or this measures a cache"
            )
        best: dict[str, dict[str, Any]] = {}
        order = [(loop, w, on) for loop, w in CASES for on in (False, True)]
        for round_no in range(ROUNDS):
            for loop, workers, on in order if round_no % 2 == 0 else order[::-1]:
                name = f"{loop}/w{workers}/ledger-{'on' if on else 'off'}"
                run_id = f"bench-{round_no}-{loop}-w{workers}" if on else None
                _stream._warm([Path(store)])
                t0 = time.perf_counter()
                measured = _stream._run_case(_spec(store, loop, workers, run_id))
                if run_id is not None and "error" not in measured:
                    measured["ledger"] = _check_ledger(store, run_id, measured)
                print(f"[ledger] {name:24s} {_stream._short(measured)} ({time.perf_counter() - t0:.0f}s)")
                rounds = [*best.get(name, {}).get("rounds", []), _stream._score(measured)]
                previous = best.get(name)
                if (
                    previous is None
                    or "error" in previous
                    or _stream._score(measured) > _stream._score(previous)
                ):
                    best[name] = {"name": name} | measured
                best[name]["rounds"] = rounds
        result["cases"] = best
        result["per_item"] = _per_item_cost()
        result["ratios"] = {
            f"{loop}/w{w}": _ratios(best[f"{loop}/w{w}/ledger-on"], best[f"{loop}/w{w}/ledger-off"])
            for loop, w in CASES
        }
        for loop, w in CASES:
            on, off = best[f"{loop}/w{w}/ledger-on"]["rounds"], best[f"{loop}/w{w}/ledger-off"]["rounds"]
            paired = [a / b for a, b in zip(on, off, strict=True) if a > 0 and b > 0]
            result["ratios"][f"{loop}/w{w}"]["paired_steady"] = [round(x, 3) for x in paired]
            result["ratios"][f"{loop}/w{w}"]["median_steady"] = (
                round(statistics.median(paired), 3) if paired else None
            )
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["machine_after"] = machine()
    write_results("ledger", result, _markdown(result))
    return result


def _ratios(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in ("first", "steady"):
        a, b = on.get(phase, {}).get("samples_per_s"), off.get(phase, {}).get("samples_per_s")
        out[phase] = round(a / b, 3) if a and b else None
    return out


def _markdown(r: dict[str, Any]) -> str:
    c, d, m = r["config"], r["data"], r["machine"]
    lines = [
        "# The ledger's cost to streaming (embedded, uncached)",
        "",
        f"{d['items']} JPEGs, {d['dataset_mb']} MB, {d['dataset_to_cache']}x a {c['cache_mib']} MiB memory "
        f"cache: every epoch is uncached. Batch {c['batch']}, ledger flush every {c['flush_items']} items or "
        f"30 s; each case in a fresh process, best of {c['rounds']} alternating rounds. {m['cpus']} CPUs, "
        f"load {m['load_average_1m']} at the start, {r['machine_after']['load_average_1m']} at the end.",
        "",
        "| case | ledger off, items/s (first / steady), best | ledger on, items/s (first / steady), best | "
        "on/off steady: median of back-to-back rounds (each round) | records (chains) | "
        "recorded = handed out |",
        "|---|---|---|---|---|---|",
    ]
    for loop, w in CASES:
        key = f"{loop}/w{w}"
        off, on = r["cases"][f"{key}/ledger-off"], r["cases"][f"{key}/ledger-on"]
        ratios = r["ratios"][key]
        check = on.get("ledger", {})

        def rate(m: dict[str, Any], phase: str) -> str:
            value = m.get(phase, {}).get("samples_per_s")
            return f"{value:,.0f}" if value else "-"

        lines.append(
            f"| {key} | {rate(off, 'first')} / {rate(off, 'steady')} | {rate(on, 'first')} / "
            f"{rate(on, 'steady')} | **{ratios['median_steady']}** "
            f"({', '.join(str(x) for x in ratios['paired_steady'])}) | "
            f"{check.get('records', '-')} ({check.get('chains', '-')}) | "
            f"{'yes' if check.get('exact') else 'NO'} ({check.get('items_recorded', '-')}) |"
        )
    p = r["per_item"]
    lines += [
        "",
        f"Per item, CPU time the ledger adds to handing an item out: {p['added_ns']} ns "
        f"({p['ledger_ns']} ns through the counting wrapper against {p['plain_ns']} ns for a bare list "
        "iteration); at 15,000 items/s an item has about 65,000 ns.",
        "",
        "Rounds (items/s of the steady epochs, each round): "
        + "; ".join(
            f"{name} {', '.join(f'{x:,.0f}' for x in case['rounds'])}" for name, case in r["cases"].items()
        ),
        "",
        "Command: `python -m bench ledger` (see `bench/ledger.py` for the knobs).",
    ]
    return "\n".join(lines)
