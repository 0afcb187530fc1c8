"""Where blobs come from: the dataset store (local files or an object store) or presigned URLs.

An upstream fetches a *batch* of blobs and returns one outcome per blob: its bytes with their check
digest (the manifest's BLAKE3, else the sha256) already computed in worker threads, or the error that blob
met. Where the native extension is built (``_native``, native/read_blobs.c), a batch of local files is
read and hashed, and a batch of fetched bytes hashed, with the GIL released once for the whole batch. It
never verifies or retries: the engine compares digests, retries transient faults and refetches corrupt
blobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import os
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple, Protocol

import httpx

from sluicegate._exceptions import IntegrityError, NotFoundError, StoreError
from sluicegate.core.engine.loop import Workers
from sluicegate.core.manifest import blake3_hex
from sluicegate.core.store import S3Options, Store, blob_key, forked

_native: types.ModuleType | None
try:
    from sluicegate.core.engine import _native
except ImportError:  # installed without a C compiler: the pure-Python read, slower beside a busy thread
    _native = None

__all__ = [
    "BlobRef",
    "Fetched",
    "Limits",
    "Outcome",
    "StoreUpstream",
    "Upstream",
    "UrlRefused",
    "UrlUpstream",
    "engine_store",
    "fetch_each",
    "forked",
    "read_verifiable",
    "transient",
]


class BlobRef(NamedTuple):
    """What the engine needs to fetch and verify one item's bytes; ``item_id`` names the item in errors.

    ``blake3``: the digest the bytes are verified against when the manifest has one; else the ``sha``.
    A named tuple: two are built per item served, and a tuple is built in a third of a frozen
    dataclass's time.
    """

    sha: str
    size: int
    item_id: str
    url: str | None = None
    blake3: str | None = None

    @property
    def check(self) -> str:
        """The digest fetched bytes must have."""
        return self.sha if self.blake3 is None else self.blake3

    def digest(self, data: bytes | memoryview) -> str:
        """``data``'s digest of the kind :attr:`check` is (call off the loop: it hashes)."""
        return hashlib.sha256(data).hexdigest() if self.blake3 is None else blake3_hex(data)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A blob's bytes as they arrived, their digest (of the kind its ref checks), how long the fetch took."""

    data: bytes
    digest: str
    seconds: float


Outcome = Fetched | BaseException


@dataclass(frozen=True, slots=True)
class Limits:
    """What an upstream may use for one batch: the engine's workers, its fetch slots and timeout."""

    workers: Workers
    slots: asyncio.Semaphore  # shared by every batch: at most ``concurrency`` requests at once
    concurrency: int
    timeout_s: float


class Upstream(Protocol):
    """Fetches a batch; one outcome per ref, in order, unverified (the engine verifies and retries)."""

    async def fetch_many(self, refs: Sequence[BlobRef], limits: Limits) -> list[Outcome]: ...

    async def aclose(self) -> None: ...


class _Permanent(StoreError):
    """An upstream refusal that retrying will not change (e.g. HTTP 403 on an expired URL)."""


class UrlRefused(_Permanent):
    """The server refused a (presigned) URL; ``status`` tells a caller that can get a fresh URL (403:
    expired or bad signature) from one that cannot."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def transient(exc: BaseException) -> bool:
    """Whether retrying may help."""
    if isinstance(exc, NotFoundError | IntegrityError | _Permanent):
        return False
    return isinstance(exc, StoreError | TimeoutError | OSError)


URL_LIFETIME = timedelta(minutes=15)


def engine_store(uri: str | os.PathLike[str], s3: S3Options | None) -> Store:
    """A Store for the engine: the object-store client's own retries off, because the engine retries
    transient faults itself (with jitter, and counted in its metrics)."""
    return Store(uri, dataclasses.replace(s3 or S3Options(), max_retries=0))


# -- local files -------------------------------------------------------------------------------------


def _read_files(root: str, refs: Sequence[BlobRef]) -> list[Outcome]:
    """Read and hash a store's local blobs (runs on a worker thread)."""
    return read_verifiable([f"{root}/{blob_key(ref.sha)}" for ref in refs], refs)


def read_verifiable(paths: Sequence[str], refs: Sequence[BlobRef]) -> list[Outcome]:
    """Each file whole, with its digest of the kind its ref checks (runs on a worker thread): natively when
    the extension is built, with the GIL released once for the batch rather than four times per file."""
    if _native is None:
        return [_read_file(ref, path) for ref, path in zip(refs, paths, strict=True)]
    raws = _native.read_blobs(list(paths), [ref.size for ref in refs], any(ref.blake3 for ref in refs))
    out: list[Outcome] = []
    for ref, path, raw in zip(refs, paths, raws, strict=True):
        if isinstance(raw, int):
            out.append(_read_error(ref, path, OSError(raw, os.strerror(raw), path)))
        else:
            data, blake3, seconds = raw
            out.append(Fetched(data, ref.digest(data) if ref.blake3 is None else blake3, seconds))
    return out


def _read_file(ref: BlobRef, path: str) -> Outcome:
    started = time.perf_counter()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return _read_error(ref, path, exc)
    try:
        data = _read_fd(fd, ref.size)
    except OSError as exc:
        return _read_error(ref, path, exc)
    finally:
        os.close(fd)
    return Fetched(data, ref.digest(data), time.perf_counter() - started)


def _read_error(ref: BlobRef, path: str, exc: OSError) -> StoreError:
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"blob {ref.sha} of item {ref.item_id!r} is missing ({path})")
    return StoreError(f"cannot read blob {ref.sha} of item {ref.item_id!r}: {exc}")


def _read_fd(fd: int, size: int) -> bytes:
    """The whole file, normally in one read: a short read of a regular file means its end, and asking for
    one byte more than expected means a longer file shows up (in its hash) rather than being cut."""
    parts: list[bytes] = []
    got, want = 0, size + 1
    while got < want:
        asked = want - got
        chunk = os.read(fd, asked)
        parts.append(chunk)
        got += len(chunk)
        if len(chunk) < asked:
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_files(root: str, refs: Sequence[BlobRef], workers: Workers) -> list[Outcome]:
    """Local blobs read and hashed over the workers, one hand-off per worker."""
    return await workers.map(functools.partial(_read_files, root), refs)


# -- one request per blob (object stores, presigned URLs) --------------------------------------------


def _hash_all(pairs: Sequence[tuple[BlobRef, tuple[bytes, float] | BaseException]]) -> list[Outcome]:
    """Fetched bytes with their digests: BLAKE3 in one native call for the batch where it is built."""
    if _native is None:
        return [
            r if isinstance(r, BaseException) else Fetched(r[0], ref.digest(r[0]), r[1]) for ref, r in pairs
        ]
    native = [r[0] for ref, r in pairs if ref.blake3 is not None and not isinstance(r, BaseException)]
    digests = iter(_native.hash_blobs(native))
    return [
        r
        if isinstance(r, BaseException)
        else Fetched(r[0], ref.digest(r[0]) if ref.blake3 is None else next(digests), r[1])
        for ref, r in pairs
    ]


async def fetch_each(
    fetch_one: Callable[[BlobRef], Awaitable[bytes]], refs: Sequence[BlobRef], limits: Limits
) -> list[Outcome]:
    """``fetch_one`` for every ref, as many at once as the engine's slots allow, then hashed in workers.

    A few coroutines per batch each take the next ref, rather than a task per blob: per-blob tasks cost
    more CPU than a fast store takes to answer.
    """
    raws: list[tuple[bytes, float] | BaseException] = [StoreError("not fetched")] * len(refs)
    todo = iter(range(len(refs)))
    slots, timeout_s = limits.slots, limits.timeout_s
    clock = time.perf_counter

    async def worker() -> None:
        for i in todo:
            async with slots:
                started = clock()
                try:
                    async with asyncio.timeout(timeout_s):
                        data = await fetch_one(refs[i])
                except Exception as exc:  # one blob's fault: the engine decides whether to retry it
                    raws[i] = exc
                else:
                    raws[i] = (data, clock() - started)

    fan_out = min(len(refs), limits.concurrency)
    await asyncio.gather(*(worker() for _ in range(fan_out)))
    return await limits.workers.map(_hash_all, list(zip(refs, raws, strict=True)))


class UrlUpstream:
    """GETs each blob from its own (presigned) URL, as the broker hands them out."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None  # created on the loop that uses it

    async def fetch_one(self, ref: BlobRef) -> bytes:
        if ref.url is None:
            raise _Permanent(
                f"item {ref.item_id!r} has no URL in the plan; the broker must send one per blob"
            )
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeout_s,
                trust_env=False,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        try:
            response = await self._client.get(ref.url)
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot GET blob {ref.sha}: {exc!r}") from exc
        if response.status_code == 404:
            raise NotFoundError(f"blob {ref.sha} of item {ref.item_id!r} is missing upstream (HTTP 404)")
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise StoreError(f"upstream answered HTTP {response.status_code} for blob {ref.sha}")
        if response.status_code != 200:
            raise UrlRefused(
                f"upstream refused blob {ref.sha} of item {ref.item_id!r}: HTTP {response.status_code} "
                f"{response.text[:200]}",
                response.status_code,
            )
        return response.content

    async def fetch_many(self, refs: Sequence[BlobRef], limits: Limits) -> list[Outcome]:
        return await fetch_each(self.fetch_one, refs, limits)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class StoreUpstream:
    """Reads ``blobs/<sha256>`` from the dataset store.

    Local stores are read with plain file reads on the workers (fast, and safe after fork). Object stores
    go through obstore, except in a forked process, where blobs are fetched by httpx from URLs presigned on
    the spot (signing with static credentials is computation, which still works there).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._urls: UrlUpstream | None = None
        root = store.local_root
        self._root = None if root is None else os.fspath(root)

    @property
    def local(self) -> bool:
        """Whether blobs are files read here rather than remote objects."""
        return self._root is not None

    async def _get(self, ref: BlobRef) -> bytes:
        return await self.store.get_blob_async(ref.sha)

    async def fetch_many(self, refs: Sequence[BlobRef], limits: Limits) -> list[Outcome]:
        if self._root is not None:
            return await read_files(self._root, refs, limits.workers)
        if not forked():
            return await fetch_each(self._get, refs, limits)
        if self._urls is None:
            self._urls = UrlUpstream(limits.timeout_s)
        urls = self.store.presign_many([blob_key(r.sha) for r in refs], URL_LIFETIME)
        located = [BlobRef(r.sha, r.size, r.item_id, u) for r, u in zip(refs, urls, strict=True)]
        return await self._urls.fetch_many(located, limits)

    async def aclose(self) -> None:
        if self._urls is not None:
            await self._urls.aclose()
