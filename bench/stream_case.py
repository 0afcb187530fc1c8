"""One streaming-benchmark case in a fresh process: ``python -m bench.stream_case SPEC_JSON``.

A fresh process per case keeps peak RSS, page-cache warmth aside, and import state separate between
systems. Prints one JSON line: samples/s and MB/s over the measured epochs, time to the first batch,
peak RSS of the trainer and of its workers, and RSS samples through the last epoch.

Systems (each yields batches of ``batch`` samples; bytes are counted to prove they arrived):

* ``sluicegate``: ``sluicegate.open(store).to_pytorch(iterable=True)``; epoch 0 warms, later epochs
  are measured (``cold=True``: only epoch 0 is measured, e.g. from the S3 server);
* ``dataloader``: a map-style torch Dataset reading the same files from local disk;
* ``mosaic``, ``litdata``, ``webdataset``: the peers over their own formats of the same files.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset


class Spec(BaseModel):
    system: str
    mode: str  # "bytes" or "jpeg"
    workers: int
    batch: int = 64
    source: str  # store URI, file list, or converted-format directory
    s3: dict[str, str] | None = None
    cold: bool = False
    min_seconds: float = 2.0
    max_epochs: int = 20


def _rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # exited between listing and reading


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (DataLoader workers, a forkserver and its children)."""
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
            found += [child, *_descendants(child)]
    return found


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, it starts afresh at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def decode_jpeg(data: bytes) -> torch.Tensor:
    """What every system does in jpeg mode: PIL decode to a CHW uint8 tensor."""
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(image.copy()).permute(2, 0, 1)


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


class _Mapped(torch.utils.data.IterableDataset[Any]):
    def __init__(self, inner: Iterable[Any], fn: Callable[[Any], Any]) -> None:
        self.inner, self.fn = inner, fn

    def __iter__(self) -> Any:
        return (self.fn(s) for s in self.inner)


def _loader_kwargs(spec: Spec) -> dict[str, Any]:
    kw: dict[str, Any] = {"batch_size": spec.batch, "num_workers": spec.workers}
    if spec.workers:
        kw["persistent_workers"] = True
    if spec.mode == "bytes":
        kw["collate_fn"] = as_list
    return kw


def build(spec: Spec) -> tuple[Any, Callable[[int], None]]:
    """The loader for ``spec`` and a function that sets its epoch."""
    jpeg = spec.mode == "jpeg"
    kw = _loader_kwargs(spec)
    if spec.system == "sluicegate":
        import sluicegate
        from sluicegate import S3Options

        s3 = S3Options(**spec.s3) if spec.s3 else None
        tds = sluicegate.open(spec.source, s3=s3).to_pytorch(
            iterable=True, decode="image" if jpeg else "bytes", fields=()
        )
        kw.pop("collate_fn", None)  # sluicegate's collate packs bytes into one shared tensor
        return tds.loader(**kw), tds.set_epoch
    if spec.system == "dataloader":
        paths = json.loads(Path(spec.source).read_text())
        return DataLoader(_Files(paths, jpeg), **kw), lambda _e: None
    if spec.system == "mosaic":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()

        class _Mosaic(StreamingDataset):
            def __getitem__(self, i: int) -> Any:
                return _field(super().__getitem__(i), "data", jpeg)

        ds = _Mosaic(local=spec.source, shuffle=False, batch_size=spec.batch)
        return DataLoader(ds, **kw), lambda _e: None
    if spec.system == "litdata":
        import litdata as ld

        lit = ld.StreamingDataset(input_dir=spec.source, transform=_Field("data", jpeg))
        return ld.StreamingDataLoader(lit, **kw), lambda _e: None
    if spec.system == "webdataset":
        import webdataset as wds

        urls = sorted(str(p) for p in Path(spec.source).glob("*.tar"))
        pipe = wds.WebDataset(
            urls, shardshuffle=False, empty_check=False, workersplitter=wds.split_by_worker
        ).map(_Field("bin", jpeg))
        return DataLoader(pipe, **kw), lambda _e: None
    raise SystemExit(f"unknown system {spec.system!r}")


_MODULES = {
    "sluicegate": "sluicegate.torch",
    "mosaic": "streaming",
    "litdata": "litdata",
    "webdataset": "webdataset",
}


def measure(spec: Spec) -> dict[str, Any]:
    if spec.system in _MODULES:
        # Library imports are paid once per process, by every system alike: not part of the first batch.
        importlib.import_module(_MODULES[spec.system])
    started = time.perf_counter()
    loader, set_epoch = build(spec)
    first_batch_s = 0.0
    measured_items = measured_bytes = 0
    measured_s = 0.0
    rss: list[float] = []
    workers_rss = 0.0  # the most that all descendant processes held together at a sample
    epochs = 0
    while epochs < spec.max_epochs:
        set_epoch(epochs)
        t0 = time.perf_counter()
        items = nbytes = 0
        rss = []
        for batch_no, batch in enumerate(loader):
            if epochs == 0 and batch_no == 0:
                first_batch_s = time.perf_counter() - started
            nbytes += _payload_bytes(batch)
            items += len(batch["id"]) if isinstance(batch, dict) else len(batch)
            if batch_no % 8 == 0:
                rss.append(round(_rss_mb(), 1))
                workers_rss = max(workers_rss, sum(_rss_mb(p) for p in _descendants(os.getpid())))
        elapsed = time.perf_counter() - t0
        epochs += 1
        if epochs == 1 and not spec.cold:
            continue  # the warm-up epoch
        measured_items += items
        measured_bytes += nbytes
        measured_s += elapsed
        if spec.cold or measured_s >= spec.min_seconds:
            break
    return {
        "items_per_epoch": items,
        "epochs_measured": epochs - (0 if spec.cold else 1),
        "samples_per_s": measured_items / measured_s if measured_s else 0.0,
        "mb_per_s": measured_bytes / measured_s / 1e6 if measured_s else 0.0,
        "first_batch_s": first_batch_s,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "workers_peak_rss_mb": round(workers_rss, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rss_last_epoch_mb": rss,
    }


if __name__ == "__main__":
    print(json.dumps(measure(Spec.model_validate_json(sys.argv[1]))))
