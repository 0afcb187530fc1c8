"""PyTorch adapter: a sluicegate dataset as a ``torch.utils.data`` dataset.

``ds.to_pytorch()`` gives a map-style dataset over the dataset's positions (use it with any sampler,
``DistributedSampler`` included); ``ds.to_pytorch(iterable=True)`` gives an iterable dataset that visits
this rank's epoch order and splits it across DataLoader workers without overlap or gaps. Both fetch
items in batches (one round trip for many items) and build each sample in the worker that fetched it.

A sample is a dict::

    {"id": str, "index": int, "data": uint8 tensor | "image": CHW uint8 tensor or PIL image,
     "annotations": [{"label", "bbox", "polygon", "iscrowd", "attributes"}, ...],
     "labels": {name: count}, "metadata": {key: value}, "width", "height", "media_type"}

and, read through a mix (``sluicegate.mix``), ``"source"``: the name of the source it came from.

Bytes travel as tensors, not ``bytes``: a DataLoader worker hands tensors to the trainer through shared
memory, while ``bytes`` would be pickled through a pipe. :func:`collate` keeps that true for batches of
variable-length byte strings by packing them into one tensor (:class:`Packed`).

This is the only sluicegate module that imports torch.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import socket
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.utils.data as tud
from PIL import Image
from torch.utils.data._utils.collate import default_collate
from torchvision.transforms.functional import pil_to_tensor

from sluicegate._adapt import LabelMap, annotation_dicts, detection_arrays
from sluicegate._dataset import Item
from sluicegate._exceptions import ConfigError
from sluicegate._mix import Readable
from sluicegate.core.memfd import received, rights, write_all
from sluicegate.core.partition import Pass, pass_of
from sluicegate.core.wait import METER

__all__ = [
    "ITEM_FIELDS",
    "DataLoader",
    "DetectionCollate",
    "IterDataset",
    "MapDataset",
    "Packed",
    "collate",
    "detection_collate",
    "to_pytorch",
]

Decode = Literal["bytes", "image", "pil"] | Callable[[Item], Any]
ImageMode = Literal["RGB", "L", "unchanged"]

_IMAGE_MODES = ("RGB", "L", "unchanged")
ITEM_FIELDS = ("annotations", "labels", "metadata", "width", "height", "media_type")


# -- samples -----------------------------------------------------------------------------------------


# torch warns once per process that a bytes buffer is read-only; the tensors made over item bytes are only
# read (collate copies them), so the warning says nothing useful. Spent here, silenced: a catch_warnings()
# per item costs more than the tensor, and a global filter would hide it for the user's own buffers too.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


def _bytes_tensor(data: bytes | memoryview) -> torch.Tensor:
    """A uint8 tensor over ``data`` without copying it."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8)


def _decode_pil(item: Item, mode: ImageMode) -> Image.Image:
    try:
        image = item.image()
    except ConfigError as exc:
        raise ConfigError(f"{exc}; use decode='bytes' or a decode callable for this data") from exc
    return image if mode == "unchanged" else image.convert(mode)


class _SampleMaker:
    """Item -> sample; a plain object so it pickles into DataLoader workers of any start method."""

    def __init__(
        self,
        decode: Decode,
        image_mode: ImageMode,
        transform: Callable[[Any], Any] | None,
        fields: Collection[str] | None,
    ) -> None:
        chosen = ITEM_FIELDS if fields is None else tuple(fields)
        unknown = sorted(set(chosen) - set(ITEM_FIELDS))
        if isinstance(fields, str) or unknown:
            raise ConfigError(f"fields must be a list drawn from {', '.join(ITEM_FIELDS)}; got {fields!r}")
        if not callable(decode) and decode not in ("bytes", "image", "pil"):
            raise ConfigError(f"decode must be 'bytes', 'image', 'pil' or a callable, got {decode!r}")
        if image_mode not in _IMAGE_MODES:
            raise ConfigError(f"image_mode must be one of {', '.join(_IMAGE_MODES)}, got {image_mode!r}")
        if transform is not None and not callable(transform):
            raise ConfigError(f"transform must be a callable taking a sample, got {transform!r}")
        self.decode = decode
        self.image_mode: ImageMode = image_mode
        self.transform = transform
        self.fields = chosen

    def __call__(self, item: Item, index: int) -> Any:
        sample: dict[str, Any] = {"id": item.id, "index": index}
        if item.source is not None:
            sample["source"] = item.source  # read through a mix: which of its sources
        if self.decode == "bytes":
            sample["data"] = _bytes_tensor(item.buffer)
        elif self.decode == "image":
            # PIL (libjpeg-turbo, libpng): torchvision's own decoders are deprecated in favour of torchcodec.
            sample["image"] = pil_to_tensor(_decode_pil(item, self.image_mode))
        elif self.decode == "pil":
            sample["image"] = _decode_pil(item, self.image_mode)
        else:
            assert callable(self.decode)
            sample["data"] = self.decode(item)
        for name in self.fields:
            # Only the fields asked for: the manifest row behind them is built on first access.
            value = getattr(item, name)
            sample[name] = annotation_dicts(value) if name == "annotations" else value
        return self.transform(sample) if self.transform is not None else sample


# -- datasets ----------------------------------------------------------------------------------------


class DataLoader(tud.DataLoader[Any]):
    """torch's DataLoader that also counts how long the trainer waits for each batch
    (:func:`sluicegate.data_wait`, and the sidecar's ``sluicegate_trainer_data_wait_seconds_total``).

    With workers, this is where the trainer blocks; a plain DataLoader works as well but, with workers,
    its waits go uncounted.

    Over an :class:`IterDataset` it also notes which samples it handed to the trainer (by their
    ``"index"``), so :meth:`state_dict` says exactly what was consumed, whatever each worker had read
    ahead: ``loader.state_dict()`` and ``loader.load_state_dict(state)`` as with torchdata's
    ``StatefulDataLoader`` (load before iterating; with ``persistent_workers``, before the first iteration).
    """

    def __iter__(self) -> Any:
        dataset = self.dataset
        noted = None
        if isinstance(dataset, IterDataset):
            # Before the workers start: they take what the dataset has left with them.
            dataset._begin(max(1, self.num_workers))
            noted = dataset
        inner, handoff = self._start()
        return _MeteredIter(inner, noted, handoff)

    def _start(self) -> tuple[Any, _Handoff | None]:
        """torch's iterator, whose workers (if it forks them now) take this loader's hand-off along."""
        global _HANDOFF
        if not (self.num_workers and _FD_HANDOFF and _forks(self.multiprocessing_context)):
            return super().__iter__(), None
        handoff: _Handoff | None = getattr(self, "_handoff", None)
        if handoff is None or not self.persistent_workers:  # persistent workers keep the one they have
            handoff = self._handoff = _Handoff(self.num_workers)
        _HANDOFF = handoff
        try:
            return super().__iter__(), handoff
        finally:
            _HANDOFF = None  # forked by now; another loader's workers must not inherit it

    def state_dict(self) -> dict[str, Any]:
        """What the trainer consumed of its epoch (see :meth:`IterDataset.state_dict`)."""
        return self._iterable().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._iterable().load_state_dict(state)

    def _iterable(self) -> IterDataset:
        if not isinstance(self.dataset, IterDataset):
            raise ConfigError(
                "only a loader over to_pytorch(iterable=True) keeps its epoch's progress; a map-style "
                "dataset's position is its sampler's"
            )
        return self.dataset


class _MeteredIter:
    """A DataLoader iterator whose ``next`` counts as waiting for data; anything else is the iterator's.
    Over an :class:`IterDataset`, each batch handed out is noted there."""

    def __init__(self, inner: Any, noted: IterDataset | None = None, handoff: _Handoff | None = None) -> None:
        self._inner = inner
        self._noted = noted
        self._handoff = handoff  # the workers' hand-off lives as long as the pass, not just its loader

    def __iter__(self) -> _MeteredIter:
        return self

    def __next__(self) -> Any:
        try:
            with METER.blocked():
                batch = next(self._inner)
        except StopIteration:
            if self._noted is not None:
                self._noted._report()
            raise
        if self._noted is not None:
            self._noted._note(batch)
        return batch

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _count_waits_here() -> None:
    """A DataLoader worker's waits are read-ahead, not the trainer waiting: stop counting them."""
    if tud.get_worker_info() is not None:
        METER.disable()


class _Loadable:
    """The ``loader()`` shortcut both dataset forms share."""

    def loader(self, batch_size: int | None = 1, **kwargs: Any) -> DataLoader:
        """A :class:`DataLoader` over this dataset with :func:`collate` as the default ``collate_fn``.

        Samples carry ragged fields (the file's bytes, annotations), which torch's default collate
        cannot stack; :func:`collate` keeps them as lists and packs bytes into one shared buffer.
        """
        kwargs.setdefault("collate_fn", collate)
        return DataLoader(self, batch_size=batch_size, **kwargs)  # type: ignore[arg-type]


class MapDataset(_Loadable, tud.Dataset[Any]):
    """Map-style: ``tds[i]`` is the sample at position ``i`` of the sluicegate dataset.

    DataLoader fetches a whole batch of positions in one call (``__getitems__``), so a sampler's batch
    costs one round trip to the data path.

    Over a mix (whose positions hold other items each epoch) call :meth:`set_epoch` before each epoch,
    beside the sampler's: like the iterable form's, it reaches persistent workers.
    """

    def __init__(self, source: Readable, make: _SampleMaker) -> None:
        self.source = source
        self._make = make
        # -1: never set, the source's own epoch stands (a Dataset's positions do not depend on it).
        self._epoch = torch.full((), -1, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indexes: Sequence[int]) -> list[Any]:
        _count_waits_here()
        epoch = int(self._epoch)
        if epoch >= 0 and self.source.epoch != epoch:
            self.source.set_epoch(epoch)
        n = len(self.source)
        positions = [int(i) + n if int(i) < 0 else int(i) for i in indexes]
        for given, pos in zip(indexes, positions, strict=True):
            if not 0 <= pos < n:
                raise IndexError(f"index {given} is out of range for a dataset of {n} items")
        items = self.source.get_many(positions)
        return [self._make(item, pos) for item, pos in zip(items, positions, strict=True)]


class IterDataset(_Loadable, tud.IterableDataset[Any]):
    """Iterable: this rank's epoch order, split across DataLoader workers (worker ``w`` of ``k`` reads
    every ``k``-th position from ``w``), fetched in batches with read-ahead.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``): the epoch lives in shared
    memory, so workers see it even when they persist across epochs.
    """

    def __init__(self, source: Readable, make: _SampleMaker) -> None:
        self.source = source
        self._make = make
        # Shared memory: set_epoch in the trainer reaches workers forked (or spawned) before it.
        self._epoch = torch.full((), source.epoch, dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        self._seen: _Seen | None = None  # the trainer's side only: what its loader handed out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_seen"] = None  # a worker hands out; only the trainer's process knows what was consumed
        return state

    def __len__(self) -> int:
        return len(self.source)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    # -- resume: what the trainer consumed -------------------------------------------------------

    def _at_epoch(self) -> Readable:
        """The source (a Dataset or a Mix), at this loader's epoch."""
        source = self.source
        if source.epoch != self.epoch:
            source.set_epoch(self.epoch)
        return source

    def _begin(self, num_workers: int) -> None:
        """A loader starts a pass with ``num_workers`` workers: what an earlier pass over this epoch
        consumed becomes what this one leaves out (non-persistent workers take it along)."""
        seen, self._seen = self._seen, None
        if seen is not None and seen.epoch == self.epoch and seen.indexes:
            source = self._at_epoch()
            source._progress = source._consumed(seen.step(source))
        self._seen = _Seen(self.epoch, num_workers)

    def _note(self, batch: Any) -> None:
        seen = self._seen
        if seen is None:
            return
        seen.add(batch)
        if time.monotonic() - seen.reported >= _REPORT_S:
            self._report()

    def _report(self) -> None:
        """Tell a sidecar how far the trainer got (every second at most, and at the end of a pass)."""
        seen = self._seen
        if seen is None or seen.broken is not None or self.source._reporter() is None:
            return
        seen.reported = time.monotonic()
        source = self._at_epoch()
        source._report(seen.step(source))

    def state_dict(self) -> dict[str, Any]:
        """The epoch and exactly what the trainer consumed of it: the samples a :class:`DataLoader` over
        this dataset or mix handed out, whichever worker read them (its ``state_dict()``)."""
        source = self._at_epoch()
        seen = self._seen
        if seen is None or seen.epoch != self.epoch:
            return source.state_dict()
        return source._state(seen.step(source)).model_dump(mode="json")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved epoch (see :meth:`Dataset.load_state_dict`, :meth:`Mix.load_state_dict`);
        before iterating."""
        self.source.load_state_dict(state)
        self.set_epoch(self.source.epoch)
        self._seen = None

    def __iter__(self) -> Iterator[Any]:
        info = tud.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        _count_waits_here()
        source = self.source  # this process's copy: a worker's own, or the trainer's with no workers
        if source.epoch != self.epoch:
            source.set_epoch(self.epoch)
        mine = source.epoch_positions(worker, workers)
        # Fetched in batches with the next ones requested ahead of this loop; recorded when the ledger is on.
        for item, pos in zip(source._iter_epoch(worker, workers, order=mine), mine.tolist(), strict=True):
            yield self._make(item, pos)


_REPORT_S = 1.0  # the least time between two progress reports to a sidecar


class _Seen:
    """The ``"index"`` of every sample a loader handed the trainer in one pass over one epoch."""

    def __init__(self, epoch: int, num_workers: int) -> None:
        self.epoch, self.num_workers = epoch, num_workers
        self.indexes: list[np.ndarray[Any, np.dtype[np.int64]]] = []
        self.broken: str | None = None
        self.reported = time.monotonic()

    def add(self, batch: Any) -> None:
        found = _batch_indexes(batch)
        if found is None:
            self.broken = (
                f"a batch ({type(batch).__name__}) carried no 'index': keep the samples' 'index' through "
                "transform and collate_fn, which is how the loader knows what the trainer consumed"
            )
        else:
            self.indexes.append(found)

    def step(self, source: Readable) -> Pass:
        """This pass as a :data:`~sluicegate.core.partition.Pass` of ``source``'s epoch plan."""
        if self.broken is not None:
            raise ConfigError(f"cannot say what was consumed: {self.broken}")
        plan = source._epoch_plan().rank
        indexes = np.concatenate(self.indexes) if self.indexes else np.empty(0, np.int64)
        if indexes.size and (indexes.min() < 0 or indexes.max() >= len(plan.order)):
            raise ConfigError(
                "a sample's 'index' is not of this epoch's plan: was the epoch changed mid-pass?"
            )
        slot_of = np.empty(len(plan.order), dtype=np.int64)
        slot_of[plan.order] = np.arange(len(plan.order))
        slots = slot_of[indexes]
        places = np.searchsorted(plan.todo, slots)
        if places.size and not np.array_equal(plan.todo[np.minimum(places, len(plan.todo) - 1)], slots):
            raise ConfigError("the loader handed out samples this epoch's plan had already consumed")
        return pass_of(len(plan.todo), places, self.num_workers)


def _batch_indexes(batch: Any) -> np.ndarray[Any, np.dtype[np.int64]] | None:
    """The samples' ``"index"`` in a batch: collated (a dict of tensors), a list of samples, or one."""
    if isinstance(batch, Mapping):
        value = batch.get("index")
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if isinstance(value, int | np.integer):
            return np.array([int(value)], dtype=np.int64)
        if isinstance(value, list | tuple) and all(isinstance(v, int | np.integer) for v in value):
            return np.asarray(value, dtype=np.int64)
        return None
    if isinstance(batch, list | tuple) and batch and all(isinstance(b, Mapping) for b in batch):
        parts = [_batch_indexes(b) for b in batch]
        if any(p is None for p in parts):
            return None
        return np.concatenate([p for p in parts if p is not None])
    return None


@overload
def to_pytorch(
    ds: Readable,
    *,
    iterable: Literal[False] = False,
    decode: Decode = "bytes",
    image_mode: ImageMode = "RGB",
    transform: Callable[[Any], Any] | None = None,
    fields: Collection[str] | None = None,
) -> MapDataset: ...
@overload
def to_pytorch(
    ds: Readable,
    *,
    iterable: Literal[True],
    decode: Decode = "bytes",
    image_mode: ImageMode = "RGB",
    transform: Callable[[Any], Any] | None = None,
    fields: Collection[str] | None = None,
) -> IterDataset: ...
def to_pytorch(
    ds: Readable,
    *,
    iterable: bool = False,
    decode: Decode = "bytes",
    image_mode: ImageMode = "RGB",
    transform: Callable[[Any], Any] | None = None,
    fields: Collection[str] | None = None,
) -> MapDataset | IterDataset:
    """``ds`` as a PyTorch dataset (map-style, or iterable with ``iterable=True``).

    ``decode``: ``"bytes"`` (``sample["data"]``, a uint8 tensor of the file), ``"image"``
    (``sample["image"]``, a CHW uint8 tensor in ``image_mode``), ``"pil"`` (a PIL image), or a callable
    taking the item whose result goes to ``sample["data"]``. ``transform`` maps each sample (in the
    DataLoader worker) to what the model needs. ``fields`` picks the item fields besides ``id``, ``index``
    and the data that samples carry (default: all of :data:`ITEM_FIELDS`; ``()`` for the leanest samples).
    """
    make = _SampleMaker(decode, image_mode, transform, fields)
    if iterable:
        return IterDataset(ds, make)
    return MapDataset(ds, make)


# -- collation ---------------------------------------------------------------------------------------


def _in_worker() -> bool:
    return tud.get_worker_info() is not None


class Packed:
    """Variable-length 1-D tensors (typically the bytes of a batch's files), as one batch.

    ``packed[i]`` is the i-th tensor; ``values`` holds them end to end and ``offsets`` (int64, ``n + 1``)
    says where each starts. Packed in a DataLoader worker, both live in one shared-memory storage,
    which is what crosses to the trainer: one segment and one handle per batch, instead of one per item
    or a pickled copy of every byte. Packed in the trainer itself (no workers), it keeps the item
    tensors as they are and copies them into one buffer only if ``values``/``offsets`` are asked for.
    """

    __slots__ = ("_buffer", "_count", "_dtype", "_parts")

    def __init__(
        self,
        buffer: torch.Tensor | None,
        count: int,
        dtype: torch.dtype,
        parts: list[torch.Tensor] | None = None,
    ) -> None:
        self._buffer, self._count, self._dtype, self._parts = buffer, count, dtype, parts

    @classmethod
    def pack(cls, tensors: Sequence[torch.Tensor]) -> Packed:
        dtype = tensors[0].dtype
        if not _in_worker():
            return cls(None, len(tensors), dtype, list(tensors))
        return cls(_pack_buffer(tensors, shared=True), len(tensors), dtype)

    def _packed(self) -> torch.Tensor:
        if self._buffer is None:
            assert self._parts is not None
            self._buffer = _pack_buffer(self._parts, shared=False)
        return self._buffer

    @property
    def offsets(self) -> torch.Tensor:
        buffer = self._packed()
        return torch.empty(0, dtype=torch.int64).set_(buffer.untyped_storage(), 0, (self._count + 1,), (1,))

    @property
    def values(self) -> torch.Tensor:
        buffer = self._packed()
        size = _element_size(self._dtype)
        header = 8 * (self._count + 1)
        count = (buffer.numel() - header) // size
        return torch.empty(0, dtype=self._dtype).set_(
            buffer.untyped_storage(), header // size, (count,), (1,)
        )

    @property
    def nbytes(self) -> int:
        """Bytes of data held (the offsets header not counted)."""
        if self._parts is not None:
            return sum(t.numel() * t.element_size() for t in self._parts)
        return int(self._packed().numel()) - 8 * (self._count + 1)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Packed, (self._packed(), self._count, self._dtype))

    def __repr__(self) -> str:
        return f"Packed({self._count} tensors, {self.nbytes} bytes of {self._dtype})"

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self._count <= index < self._count:
            raise IndexError(f"index {index} is out of range for {self._count} packed tensors")
        index %= self._count
        if self._parts is not None:
            return self._parts[index]
        offsets = self.offsets
        return self.values[int(offsets[index]) : int(offsets[index + 1])]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._parts is not None:
            yield from self._parts
            return
        values = self.values
        for start, end in itertools.pairwise(self.offsets.tolist()):
            yield values[start:end]

    def tobytes(self) -> list[bytes]:
        """Each packed tensor's bytes."""
        return [t.numpy().tobytes() for t in self]

    def pin_memory(self) -> Packed:
        """Pinned copy (DataLoader's ``pin_memory=True`` calls this)."""
        return Packed(self._packed().pin_memory(), self._count, self._dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packed:
        """A copy on ``device`` (the whole buffer in one transfer)."""
        return Packed(self._packed().to(device, non_blocking=non_blocking), self._count, self._dtype)


class _Handoff:
    """The memory files of a DataLoader's worker batches, passed to the trainer over one socket pair per
    worker made before the workers fork: a message per batch, ``(seq, descriptor)``.

    torch's file_descriptor strategy instead connects to the worker's ``multiprocessing`` resource
    sharer and runs its HMAC challenge for every storage it rebuilds: measured here, 42% of a 2-worker
    trainer's time on 100 KB items, and 18% of each worker's. Batches are matched to their message by
    worker and sequence number, never by arrival alone.
    """

    def __init__(self, workers: int) -> None:
        self.owner, self.workers = os.getpid(), workers
        self.key = next(_HANDOFF_KEYS)
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers)]
        self._seq = itertools.count()  # a worker's own copy counts its batches
        self._waiting: dict[tuple[int, int], int] = {}  # received ahead of their batch
        self._lock = threading.Lock()
        _HANDOFFS[self.key] = self
        weakref.finalize(self, _close_handoff, self._pairs, self._waiting)

    def send(self, worker: int, fd: int) -> int:
        """In worker ``worker``: pass ``fd`` on; returns the sequence number its batch carries."""
        seq = next(self._seq)
        self._pairs[worker][1].sendmsg([_SEQ.pack(seq)], rights(fd))
        return seq

    def receive(self, worker: int, seq: int) -> int:
        """In the trainer: the descriptor of batch ``seq`` of ``worker`` (the caller closes it)."""
        with self._lock:
            while (worker, seq) not in self._waiting:
                data, ancillary, _, _ = self._pairs[worker][0].recvmsg(_SEQ.size, socket.CMSG_SPACE(4))
                fds = received(ancillary)
                if len(data) != _SEQ.size or len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    raise RuntimeError(f"DataLoader worker {worker} sent a malformed batch hand-off")
                self._waiting[(worker, *_SEQ.unpack(data))] = fds[0]
            fd = self._waiting.pop((worker, seq))
            # Far behind this one: batches dropped unread (a pass left early), never to be asked for.
            for stale in [k for k in self._waiting if k[0] == worker and k[1] < seq - _HANDOFF_WINDOW]:
                os.close(self._waiting.pop(stale))
            return fd


def _close_handoff(
    pairs: list[tuple[socket.socket, socket.socket]], waiting: dict[tuple[int, int], int]
) -> None:
    for pair in pairs:
        for sock in pair:
            sock.close()
    for fd in waiting.values():
        os.close(fd)


def _forks(context: Any) -> bool:
    """Whether DataLoader workers started with ``context`` are forked (and so inherit the hand-off)."""
    method = context if isinstance(context, str) else getattr(context, "_name", None)
    # Unset, the platform's default (listed first) without fixing it, which would bind the user's program.
    method = method or multiprocessing.get_start_method(allow_none=True)
    return (method or multiprocessing.get_all_start_methods()[0]) == "fork"


def _reduce_packed(packed: Packed) -> tuple[Any, ...]:
    """How a worker's Packed crosses to the trainer (``ForkingPickler``): its memory file over the
    loader's hand-off where there is one, else as torch shares any storage."""
    handoff, info = _HANDOFF, tud.get_worker_info()
    buffer = packed._buffer
    if (
        handoff is None
        or info is None
        or buffer is None
        or not buffer.numel()
        or handoff.owner != os.getppid()
        or not 0 <= info.id < handoff.workers
    ):
        return packed.__reduce__()
    storage = buffer.untyped_storage()
    fd, size = storage._share_fd_cpu_()
    seq = handoff.send(info.id, fd)
    return (_received_packed, (handoff.key, info.id, seq, int(size), packed._count, packed._dtype))


def _received_packed(key: int, worker: int, seq: int, size: int, count: int, dtype: torch.dtype) -> Packed:
    handoff = _HANDOFFS.get(key)
    if handoff is None or handoff.owner != os.getpid():
        raise RuntimeError(
            "a batch packed in a DataLoader worker was unpickled outside the trainer that started the worker"
        )
    fd = handoff.receive(worker, seq)
    try:
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, size)  # type: ignore[attr-defined]
    finally:
        os.close(fd)  # the storage holds its own
    return Packed(_bytes_of(storage, size), count, dtype)


_SEQ = struct.Struct("<Q")
_HANDOFF_WINDOW = 64  # batches of one worker unpickled out of order, at most (torch keeps them in order)
_HANDOFF_KEYS = itertools.count()
_HANDOFFS: weakref.WeakValueDictionary[int, _Handoff] = weakref.WeakValueDictionary()
_HANDOFF: _Handoff | None = None  # the loader whose workers fork next (they inherit it)


def _pack_buffer(tensors: Sequence[torch.Tensor], *, shared: bool) -> torch.Tensor:
    """One uint8 buffer: int64 offsets (``n + 1``; 8-byte multiples keep any dtype aligned), then values."""
    dtype = tensors[0].dtype
    lengths = np.array([t.numel() for t in tensors], dtype=np.int64)
    offsets = np.zeros(len(tensors) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    header = offsets.nbytes
    nbytes = header + int(lengths.sum()) * _element_size(dtype)
    parts = [t.numpy().view(np.uint8) for t in tensors]
    if shared and _MEMFD:
        # In a worker, built straight in shared memory (as default_collate does): the hand-off copies nothing.
        storage = _shared_storage([offsets, *parts], nbytes)
        return _bytes_of(storage, nbytes)
    storage = torch.UntypedStorage._new_shared(nbytes) if shared else torch.UntypedStorage(nbytes)  # type: ignore[no-untyped-call]
    buffer = _bytes_of(storage, nbytes)
    raw = buffer.numpy()
    raw[:header] = offsets.view(np.uint8)
    # NumPy's single-threaded memcpy, not torch.cat: in the trainer process torch's intra-op threads
    # spin against the training loop for the cores, which made packing 20x slower on 2 busy cores.
    np.concatenate(parts, out=raw[header:])
    return buffer


def _bytes_of(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor over the first ``nbytes`` of ``storage``, sharing it."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


# Linux's memory files, and torch's storage over one (the file_descriptor sharing strategy's own).
_MEMFD = hasattr(os, "memfd_create") and hasattr(torch.UntypedStorage, "_new_shared_fd_cpu")
_FD_HANDOFF = _MEMFD and hasattr(socket, "SCM_RIGHTS") and hasattr(torch.UntypedStorage, "_share_fd_cpu_")
if _FD_HANDOFF:
    multiprocessing.reduction.ForkingPickler.register(Packed, _reduce_packed)
# dtypes whose tensors NumPy can view (not bfloat16, say), so their bytes can be written out directly
_NUMPY_DTYPES = frozenset(
    [
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    ]
)


def _shared_storage(parts: Sequence[np.ndarray[Any, Any]], nbytes: int) -> torch.UntypedStorage:
    """Shared memory holding ``parts`` end to end: written into a memory file rather than through a fresh
    mapping, which costs a page fault per 4 KiB (twice the copy's time), and handed to torch as the
    storage's descriptor, which is how a worker's batch crosses to the trainer anyway."""
    fd = os.memfd_create("sluicegate-collate", os.MFD_CLOEXEC)
    try:
        views: list[memoryview] = []
        for part in parts:
            if part.flags.c_contiguous or part.nbytes > _SCRATCH_LIMIT:
                views.append(np.ascontiguousarray(part).data.cast("B"))
                continue
            # A strided part (a decoded HWC image permuted to CHW) is laid out in a buffer this process
            # keeps: np.ascontiguousarray's fresh one faults a page per 4 KiB, which cost more than the copy.
            write_all(fd, views)
            views = [_laid_out(part)]
        write_all(fd, views)
        storage: torch.UntypedStorage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # type: ignore[attr-defined]
    finally:
        os.close(fd)  # the storage holds its own
    return storage


_SCRATCH_LIMIT = 64 << 20  # larger strided parts take a fresh buffer rather than a resident one
_SCRATCH = threading.local()


def _laid_out(part: np.ndarray[Any, Any]) -> memoryview:
    """``part``'s bytes in C order, in this thread's scratch buffer (valid until its next call)."""
    scratch: np.ndarray[Any, Any] | None = getattr(_SCRATCH, "buffer", None)
    if scratch is None or scratch.nbytes < part.nbytes:
        scratch = _SCRATCH.buffer = np.empty(part.nbytes, dtype=np.uint8)
    dest = scratch[: part.nbytes].view(part.dtype).reshape(part.shape)
    np.copyto(dest, part)
    return scratch[: part.nbytes].data


def _stack(batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors of one shape and dtype stacked, as ``default_collate`` does (in shared memory in a worker)."""
    first = batch[0]
    nbytes = sum(t.numel() for t in batch) * first.element_size()
    if _MEMFD and _in_worker() and nbytes and first.device.type == "cpu" and first.dtype in _NUMPY_DTYPES:
        storage = _shared_storage([t.detach().numpy() for t in batch], nbytes)
        return torch.empty(0, dtype=first.dtype).set_(storage).view(len(batch), *first.shape)
    stacked: torch.Tensor = default_collate(list(batch))  # type: ignore[no-untyped-call]
    return stacked


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _same_type(batch: Sequence[Any]) -> bool:
    kind = type(batch[0])
    return all(type(x) is kind for x in batch)


def collate(batch: Sequence[Any]) -> Any:
    """Collate samples like ``default_collate``, but never fail on ragged data.

    * 1-D uint8 tensors (file bytes) become one :class:`Packed`; other tensors of one shape are stacked
      (in shared memory inside workers); ragged ones stay a list;
    * numbers and NumPy arrays of one type become tensors;
    * dicts with the same keys collate per key; tuples of one length collate per position;
    * anything else (strings, ``None``, lists such as annotations, PIL images) stays a list.
    """
    if not batch:
        return []
    first = batch[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(x, torch.Tensor) and x.dtype == first.dtype for x in batch):
            return list(batch)
        if first.dtype == torch.uint8 and all(x.dim() == 1 for x in batch):
            return Packed.pack(batch)  # file bytes: ragged by nature, even when a batch happens not to be
        if all(x.shape == first.shape for x in batch):
            return _stack(batch)
        return list(batch)
    if isinstance(first, Mapping):
        keys = first.keys()
        if all(isinstance(x, Mapping) and x.keys() == keys for x in batch):
            return {key: collate([x[key] for x in batch]) for key in keys}
        return list(batch)
    if isinstance(first, tuple) and _same_type(batch) and all(len(x) == len(first) for x in batch):
        columns = [collate(list(column)) for column in zip(*batch, strict=True)]
        return type(first)(*columns) if hasattr(first, "_fields") else tuple(columns)
    numeric = isinstance(first, bool | int | float | np.number | np.ndarray) and _same_type(batch)
    if numeric and (not isinstance(first, np.ndarray) or all(x.shape == first.shape for x in batch)):
        return default_collate(list(batch))  # type: ignore[no-untyped-call]
    return list(batch)


class DetectionCollate:
    """Collate ``decode="image"`` samples into torchvision detection inputs.

    Returns ``(images, targets)``: a list of CHW tensors and, per image, ``{"boxes": float32 [N, 4]
    (x1, y1, x2, y2), "labels": int64 [N], "iscrowd": bool [N], "image_id": item id}``. Class names map
    through ``labels`` (a list gives index = position + ``start``; ``start=1`` leaves 0 for torchvision's
    background class), or an explicit ``{name: index}`` mapping.
    """

    def __init__(self, labels: Sequence[str] | Mapping[str, int], *, start: int = 1) -> None:
        self.labels = LabelMap(labels, start=start)

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        images: list[torch.Tensor] = []
        targets: list[dict[str, Any]] = []
        for sample in batch:
            image = sample.get("image") if isinstance(sample, Mapping) else None
            if not isinstance(image, torch.Tensor) or "annotations" not in sample:
                raise ConfigError(
                    "detection collate needs samples with an 'image' tensor and 'annotations': "
                    "use to_pytorch(decode='image') and a transform that keeps both keys"
                )
            boxes, _, ids, crowd = detection_arrays(sample["annotations"], self.labels)
            images.append(image)
            targets.append(
                {
                    "boxes": torch.from_numpy(boxes),
                    "labels": torch.from_numpy(ids),
                    "iscrowd": torch.from_numpy(crowd),
                    "image_id": sample["id"],
                }
            )
        return images, targets


def detection_collate(labels: Sequence[str] | Mapping[str, int], *, start: int = 1) -> DetectionCollate:
    """A ``collate_fn`` for torchvision detection models; see :class:`DetectionCollate`."""
    return DetectionCollate(labels, start=start)
