"""One streaming-benchmark case in a fresh process: ``python -m bench.stream_case SPEC_JSON``.

A fresh process per case keeps peak RSS, import state and caches separate between systems (the page
cache aside: the parent warms it for every system alike). Prints one JSON line with, separately, the
first epoch (``first``) and the steady epochs after it (``steady``): items, seconds, samples/s, MB/s,
and µs of CPU per item spent by the trainer with its DataLoader workers and by the sidecar; plus time
to the first batch, peak RSS of the trainer, of its DataLoader workers and of the sidecar, the load
average before and after, and RSS samples through the last epoch.

Systems (each yields batches of ``batch`` samples; bytes are counted to prove they arrived):

* ``sluicegate``: ``sluicegate.open(store).to_pytorch(iterable=True, ...)`` as a user writes it
  (``cache_bytes``, ``disk_cache`` and ``s3`` passed through when given);
* ``sluicegate-sidecar``: a ``sluicegate-sidecar`` subprocess serving the store on a unix socket, read
  with ``sluicegate.connect("unix://...").to_pytorch(iterable=True, ...)``;
* ``dataloader``: a map-style torch Dataset reading the same files from local disk;
* ``mosaic``, ``litdata``, ``webdataset``: the peers over their own formats of the same files;
* ``obstore``: no loader: raw concurrent GETs of the listed objects (``concurrency`` in flight), the
  limit an S3 client meets on that server; first pass only.

Modes: ``bytes`` (the file's bytes reach the loop) and ``jpeg`` (:func:`decode_jpeg` in the loader,
the same function for every system).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset

SIDECAR = str(Path(sys.executable).parent / "sluicegate-sidecar")


class Spec(BaseModel):
    system: str
    mode: str = "bytes"  # "bytes" or "jpeg"
    workers: int = 0
    batch: int = 32
    source: str  # store URI, file list, converted-format directory, or (obstore) a key listing
    s3: dict[str, str] | None = None
    cache_bytes: int | None = None  # sluicegate's memory cache (embedded, or the sidecar's)
    disk_cache: str | None = None  # sluicegate's disk tier (embedded)
    concurrency: int | None = None  # sluicegate's upstream fetches in flight; obstore's GETs in flight
    # sluicegate only: "loader" (a torch DataLoader over to_pytorch(), as users train) or "items" (a
    # plain ``for item in ds`` loop, counted in groups of ``batch``: the data path without torch).
    loop: str = "loader"
    # sluicegate embedded only: record what it hands out in the store's ledger, sluicegate.Ledger(**ledger).
    ledger: dict[str, Any] | None = None
    # Steady epochs follow the first: at least ``steady_epochs`` and ``steady_min_s`` seconds of them,
    # but no more once ``steady_max_s`` seconds are measured (one at least). 0: the first epoch only.
    steady_epochs: int = 2
    steady_min_s: float = 0.0
    steady_max_s: float = 60.0
    max_epochs: int = 10_000


def _rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # exited between listing and reading


def _descendants(pid: int, skip: frozenset[int] = frozenset()) -> list[int]:
    """Every process below ``pid`` (DataLoader workers, a forkserver and its children), ``skip`` aside."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        for child in children:
            if child not in skip:
                found += [child, *_descendants(child, skip)]
    return found


def _cpu_s(pid: int | str = "self") -> float:
    """A process's CPU seconds so far, user and system (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(skip: frozenset[int], sidecar: int | None) -> dict[str, dict[int, float]]:
    """CPU seconds of the trainer and its DataLoader workers, and of the sidecar, by process."""
    trainer = {pid: _cpu_s(pid) for pid in [os.getpid(), *_descendants(os.getpid(), skip)]}
    return {"trainer": trainer, "sidecar": {} if sidecar is None else {sidecar: _cpu_s(sidecar)}}


def _cpu_per_item(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], items: int
) -> dict[str, float]:
    """µs of CPU per item between two snapshots; a worker that started in between counts from 0."""
    out = {}
    for who, end in after.items():
        if end and items:
            spent = sum(cpu - before[who].get(pid, 0.0) for pid, cpu in end.items())
            out[f"{who}_cpu_us_per_item"] = round(spent / items * 1e6, 1)
    return out


def _peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak RSS (VmHWM: unlike ru_maxrss, it starts afresh at exec)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def decode_jpeg(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """What every system does in jpeg mode: PIL decode to a CHW uint8 tensor."""
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(image.copy()).permute(2, 0, 1)


def decode_item(item: Any) -> torch.Tensor:
    """sluicegate's ``decode=`` callable: the same :func:`decode_jpeg` on the item's bytes."""
    return decode_jpeg(item.buffer)


def as_list(batch: list[Any]) -> list[Any]:
    return batch


def _payload_bytes(batch: Any) -> int:
    """Bytes of data in a batch, whatever shape the system hands it in (forces it to be there)."""
    if isinstance(batch, dict):
        batch = batch.get("data", batch.get("image"))
    if isinstance(batch, torch.Tensor):
        return int(batch.numel() * batch.element_size())
    if hasattr(batch, "nbytes") and not isinstance(batch, list):  # sluicegate.torch.Packed
        return int(batch.nbytes)
    return sum(_payload_bytes(x) if not isinstance(x, bytes | bytearray) else len(x) for x in batch)


class _Files(Dataset[Any]):
    def __init__(self, paths: list[str], jpeg: bool) -> None:
        self.paths, self.jpeg = paths, jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        data = Path(self.paths[i]).read_bytes()
        return decode_jpeg(data) if self.jpeg else data


def _field(sample: dict[str, Any], key: str, jpeg: bool) -> Any:
    return decode_jpeg(sample[key]) if jpeg else sample[key]


class _Field:
    """Picks (and in jpeg mode decodes) one field of a peer's sample; picklable for workers."""

    def __init__(self, key: str, jpeg: bool) -> None:
        self.key, self.jpeg = key, jpeg

    def __call__(self, sample: dict[str, Any]) -> Any:
        return _field(sample, self.key, self.jpeg)


class _ItemBatches:
    """``for item in ds``, handed on in lists of ``batch`` items' bytes (``item.buffer``, which copies
    nothing; decoded in jpeg mode)."""

    def __init__(self, ds: Any, batch: int, jpeg: bool) -> None:
        self.ds, self.batch, self.jpeg = ds, batch, jpeg

    def __iter__(self) -> Iterator[list[Any]]:
        group: list[Any] = []
        for item in self.ds:
            group.append(decode_jpeg(item.buffer) if self.jpeg else item.buffer)
            if len(group) == self.batch:
                yield group
                group = []
        if group:
            yield group


def _loader_kwargs(spec: Spec) -> dict[str, Any]:
    kw: dict[str, Any] = {"batch_size": spec.batch, "num_workers": spec.workers}
    if spec.workers:
        kw["persistent_workers"] = True
    if spec.mode == "bytes":
        kw["collate_fn"] = as_list
    return kw


class _Sidecar:
    """``sluicegate-sidecar --store SOURCE`` on a unix socket in a temp dir, for one case."""

    def __init__(self, spec: Spec, stack: contextlib.ExitStack) -> None:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sg-bench-sidecar-")))
        self.address = f"unix://{folder / 'sidecar.sock'}"
        self.log = folder / "sidecar.log"
        # No shuffle, as for the embedded and peer cases: every system reads the same order.
        cmd = [SIDECAR, "--store", spec.source, "--listen", self.address, "--shuffle", "false"]
        cmd += ["--rank", "0", "--world-size", "1"]
        if spec.cache_bytes is not None:
            cmd += ["--cache-memory", str(spec.cache_bytes)]
        if spec.concurrency is not None:
            cmd += ["--concurrency", str(spec.concurrency)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stack.callback(self.stop)

    def peak_rss_mb(self) -> float:
        return _peak_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


def build(spec: Spec, stack: contextlib.ExitStack) -> tuple[Any, Callable[[int], None], _Sidecar | None]:
    """The loader for ``spec``, a function that sets its epoch, and the sidecar it reads from if any."""
    jpeg = spec.mode == "jpeg"
    kw = _loader_kwargs(spec)
    if spec.system in ("sluicegate", "sluicegate-sidecar"):
        import sluicegate
        from sluicegate import S3Options

        sidecar = None
        if spec.system == "sluicegate":
            options: dict[str, Any] = {}
            if spec.s3:
                options["s3"] = S3Options(**spec.s3)  # type: ignore[arg-type]
            if spec.cache_bytes is not None:
                options["cache_bytes"] = spec.cache_bytes
            if spec.disk_cache is not None:
                options["disk_cache"] = spec.disk_cache
            if spec.concurrency is not None:
                options["concurrency"] = spec.concurrency
            if spec.ledger is not None:
                options["ledger"] = sluicegate.Ledger(**spec.ledger)
            ds = sluicegate.open(spec.source, **options)
        else:
            sidecar = _Sidecar(spec, stack)
            try:
                ds = sluicegate.connect(sidecar.address, timeout=120)
            except Exception as exc:
                raise RuntimeError(f"{exc}; sidecar log: {sidecar.tail()}") from exc
        if spec.loop == "items":
            return _ItemBatches(ds, spec.batch, jpeg), ds.set_epoch, sidecar
        tds = ds.to_pytorch(iterable=True, decode=decode_item if jpeg else "bytes", fields=())
        kw.pop("collate_fn", None)  # sluicegate's collate packs bytes into one shared tensor
        return tds.loader(**kw), tds.set_epoch, sidecar
    if spec.system == "dataloader":
        paths = json.loads(Path(spec.source).read_text())
        return DataLoader(_Files(paths, jpeg), **kw), lambda _e: None, None
    if spec.system == "mosaic":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()

        class _Mosaic(StreamingDataset):
            def __getitem__(self, i: Any) -> Any:
                return _field(super().__getitem__(i), "data", jpeg)

        mds = _Mosaic(local=spec.source, shuffle=False, batch_size=spec.batch)
        return DataLoader(mds, **kw), lambda _e: None, None
    if spec.system == "litdata":
        import litdata as ld

        lit = ld.StreamingDataset(input_dir=spec.source, transform=_Field("data", jpeg))
        return ld.StreamingDataLoader(lit, **kw), lambda _e: None, None
    if spec.system == "webdataset":
        import webdataset as wds

        urls = sorted(str(p) for p in Path(spec.source).glob("*.tar"))
        pipe = wds.WebDataset(
            urls, shardshuffle=False, empty_check=False, workersplitter=wds.split_by_worker
        ).map(_Field("jpg", jpeg))
        return DataLoader(pipe, **kw), lambda _e: None, None
    raise SystemExit(f"unknown system {spec.system!r}")


_MODULES = {
    "sluicegate": "sluicegate.torch",
    "sluicegate-sidecar": "sluicegate.torch",
    "mosaic": "streaming",
    "litdata": "litdata",
    "webdataset": "webdataset",
}


def _epoch_stats(items: int, nbytes: int, seconds: float) -> dict[str, Any]:
    return {
        "items": items,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "samples_per_s": items / seconds if seconds else 0.0,
        "mb_per_s": nbytes / seconds / 1e6 if seconds else 0.0,
    }


def measure(spec: Spec) -> dict[str, Any]:
    load_before = round(os.getloadavg()[0], 2)
    if spec.system == "obstore":
        return {"load_average_before": load_before} | _raw_gets(spec)
    if spec.system in _MODULES:
        # Library imports are paid once per process, by every system alike: not part of the first batch.
        importlib.import_module(_MODULES[spec.system])
    out: dict[str, Any] = {"load_average_before": load_before}
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        loader, set_epoch, sidecar = build(spec, stack)
        skip = frozenset() if sidecar is None else frozenset({sidecar.proc.pid})
        sidecar_pid = None if sidecar is None else sidecar.proc.pid
        steady_cpu: dict[str, dict[int, float]] | None = None
        steady_items = steady_bytes = steady_n = 0
        steady_s = 0.0
        rss: list[float] = []
        workers_rss = 0.0  # the most that all DataLoader worker processes held together at a sample
        items = 0
        for epoch in range(spec.max_epochs):
            set_epoch(epoch)
            cpu = _cpu_snapshot(skip, sidecar_pid)
            if epoch == 1:
                steady_cpu = cpu
            t0 = time.perf_counter()
            items = nbytes = 0
            rss = []
            for batch_no, batch in enumerate(loader):
                if epoch == 0 and batch_no == 0:
                    out["first_batch_s"] = round(time.perf_counter() - started, 3)
                nbytes += _payload_bytes(batch)
                items += len(batch["id"]) if isinstance(batch, dict) else len(batch)
                if batch_no % 8 == 0:
                    rss.append(round(_rss_mb(), 1))
                    workers = _descendants(os.getpid(), skip)
                    workers_rss = max(workers_rss, sum(_rss_mb(p) for p in workers))
            seconds = time.perf_counter() - t0
            if epoch == 0:
                # Everything a user waits for in a first epoch: workers starting, the first fetches.
                out["first"] = _epoch_stats(items, nbytes, seconds) | _cpu_per_item(
                    cpu, _cpu_snapshot(skip, sidecar_pid), items
                )
                if spec.steady_epochs == 0:
                    break
                continue
            steady_items += items
            steady_bytes += nbytes
            steady_s += seconds
            steady_n += 1
            enough = steady_n >= spec.steady_epochs and steady_s >= spec.steady_min_s
            if enough or steady_s >= spec.steady_max_s:
                break
        if steady_n:
            out["steady"] = _epoch_stats(steady_items, steady_bytes, steady_s) | {"epochs": steady_n}
            assert steady_cpu is not None
            out["steady"] |= _cpu_per_item(steady_cpu, _cpu_snapshot(skip, sidecar_pid), steady_items)
        out["items_per_epoch"] = items
        out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        out["workers_peak_rss_mb"] = round(workers_rss, 1)
        if sidecar is not None:
            out["sidecar_peak_rss_mb"] = round(sidecar.peak_rss_mb(), 1)
        out["rss_last_epoch_mb"] = rss
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


def _raw_gets(spec: Spec) -> dict[str, Any]:
    """Raw concurrent GETs with obstore: ``concurrency`` requests in flight over the listed keys."""
    import obstore
    from obstore.store import S3Store

    listing = json.loads(Path(spec.source).read_text())
    s3 = spec.s3 or {}
    config = {k: s3[k] for k in ("endpoint", "region", "access_key_id", "secret_access_key") if k in s3}
    store = S3Store(
        listing["bucket"],
        prefix=listing.get("prefix") or None,
        config=config,  # type: ignore[arg-type]
        client_options={"allow_http": config.get("endpoint", "").startswith("http://")},
    )
    keys: list[str] = listing["keys"]
    concurrency = spec.concurrency or 16

    async def main() -> tuple[int, int, float]:
        todo = iter(keys)
        total = count = 0

        async def worker() -> None:
            nonlocal total, count
            for key in todo:
                result = await obstore.get_async(store, key)
                data = await result.bytes_async()
                total += len(data)
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count, total, time.perf_counter() - t0

    items, nbytes, seconds = asyncio.run(main())
    return {
        "first": _epoch_stats(items, nbytes, seconds),
        "items_per_epoch": items,
        "concurrency": concurrency,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    print(json.dumps(measure(Spec.model_validate_json(sys.argv[1]))), flush=True)
