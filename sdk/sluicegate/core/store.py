"""The versioned dataset store: content-addressed blobs and immutable manifest versions.

Layout under a dataset's root (a local directory or an object-store prefix)::

    blobs/<sha256>          the files, addressed by the sha256 of their bytes
    versions/<n>.parquet    manifest of version n (1, 2, 3, ...), written once, never replaced
    refs/latest             the newest version number, a hint for readers
    ledger/<run>/...        what training runs consumed (see :mod:`sluicegate.core.ledger`)
    staging/                local stores only: files being copied in (stray ones are safe to delete)

Commits are linearised by creating ``versions/<n>.parquet`` with a create-only conditional write
(``If-None-Match: *`` on object stores, no-clobber link on a filesystem): of two writers racing for
``n`` exactly one succeeds, and the other rebuilds its change on top of the winner and tries ``n+1``.
``refs/latest`` is advanced afterwards with compare-and-swap where the backend has it; readers still
probe past it, so a writer that dies between the two steps loses nothing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import httpx
import obstore
import pyarrow as pa
import pyarrow.parquet as pq
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotSupportedError,
    PreconditionError,
)
from obstore.exceptions import (
    NotFoundError as _ObsNotFound,
)
from obstore.store import LocalStore, S3Store

from sluicegate._exceptions import ConfigError, ConflictError, IntegrityError, NotFoundError, StoreError
from sluicegate.core import manifest as _manifest

if TYPE_CHECKING:
    from obstore.store import ObjectStore

_LATEST = "refs/latest"
# obstore raises its NotFoundError for object stores but the builtin FileNotFoundError for local paths.
_NOT_FOUND = (_ObsNotFound, FileNotFoundError)
_COMMIT_ATTEMPTS = 20
# Linux's unnamed files (O_TMPFILE); the errors that say a filesystem or kernel lacks them.
_UNNAMED_FILES = hasattr(os, "O_TMPFILE")
_NO_UNNAMED_FILES = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
_IMPORT_PID = os.getpid()
_OBJECT_TIMEOUT_S = 30.0
_SIGNED_LIFETIME = timedelta(minutes=5)


def forked() -> bool:
    """True in a process forked after sluicegate (and so obstore) was imported, e.g. a DataLoader worker.

    obstore's tokio runtime does not survive ``fork()``: its threads are gone and calls that need I/O hang.
    """
    return os.getpid() != _IMPORT_PID


@dataclass(frozen=True)
class S3Options:
    """Where and how to reach an S3-compatible store; unset fields come from the AWS_* environment."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    # The client's own retries of 5xx/connection faults; None keeps obstore's default. The streaming
    # engine sets 0 because it retries (and counts the retries) itself.
    max_retries: int | None = None


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_key(sha: str) -> str:
    return f"blobs/{sha}"


def _version_key(version: int) -> str:
    return f"versions/{version}.parquet"


class Store:
    """One dataset's store. Construction does no I/O; every method talks to the backend."""

    def __init__(self, uri: str | os.PathLike[str], s3: S3Options | None = None) -> None:
        self.uri, target = _parse(uri, s3 or S3Options())
        self._root = target if isinstance(target, Path) else None
        self._obj = None if isinstance(target, Path) else target
        self._manifests: dict[int, tuple[pa.Table, _manifest.VersionInfo]] = {}

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self._root is not None

    @property
    def local_root(self) -> Path | None:
        """The directory of a filesystem store (``None`` for object stores)."""
        return self._root

    @property
    def _backend(self) -> ObjectStore:
        """The object store; a local one is opened on first use, and reads never create it."""
        if self._obj is None:
            assert self._root is not None
            if not self._root.is_dir():
                # Read paths treat this like an object missing from a store: an empty dataset.
                raise FileNotFoundError(f"{self._root} does not exist")
            self._obj = LocalStore(self._root)
        return self._obj

    def _writable(self) -> None:
        """Create a local store's directory before the first write."""
        if self._root is not None:
            try:
                self._root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {self.uri}: {exc.strerror or exc}") from exc

    # -- blobs ---------------------------------------------------------------------------------

    def existing_blobs(self) -> set[str]:
        """The hashes of every blob already stored (one listing, for imports to skip them)."""
        found: set[str] = set()
        try:
            for chunk in obstore.list(self._backend, "blobs/", chunk_size=10_000):
                found.update(meta["path"].rsplit("/", 1)[-1] for meta in chunk)
        except _NOT_FOUND:
            return found
        except BaseError as exc:
            raise StoreError(f"cannot list blobs of {self.uri}: {exc}") from exc
        return found

    def put_blob(self, data: bytes, sha: str | None = None) -> str:
        """Store ``data`` under its sha256 (kept as is when present) and return the hash."""
        sha = sha or sha256_hex(data)
        self._writable()
        _create_blob(self._backend, sha, data, f"cannot write blob {sha} to {self.uri}")
        return sha

    def blob_writer(self) -> BlobWriter:
        """A writer that stores blobs from many threads at once (see :class:`BlobWriter`)."""
        return BlobWriter(self)

    async def put_blobs_async(
        self,
        blobs: Iterable[tuple[str, Path | bytes]],
        concurrency: int = 32,
        on_done: Callable[[], None] | None = None,
    ) -> int:
        """Upload files (or bytes already read) under their computed hashes, ``concurrency`` at a time.

        ``on_done`` is called after each blob is stored (for progress bars).
        """
        self._writable()
        if self.local_root is not None:
            return await asyncio.to_thread(self._put_local_files, list(blobs), on_done)
        sem = asyncio.Semaphore(concurrency)

        async def one(sha: str, source: Path | bytes) -> None:
            async with sem:
                try:
                    await obstore.put_async(self._backend, blob_key(sha), source, mode="create")
                except AlreadyExistsError:
                    pass
                except BaseError as exc:
                    what = source if isinstance(source, Path) else f"blob {sha}"
                    raise StoreError(f"cannot upload {what} to {self.uri}: {exc}") from exc
            if on_done is not None:
                on_done()

        tasks = [asyncio.ensure_future(one(sha, source)) for sha, source in blobs]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return len(tasks)

    def _put_local_files(
        self, blobs: list[tuple[str, Path | bytes]], on_done: Callable[[], None] | None
    ) -> int:
        with self.blob_writer() as writer:
            for sha, source in blobs:
                writer.put(sha, source)
                if on_done is not None:
                    on_done()
        return len(blobs)

    def get_blob(self, sha: str) -> bytes:
        """The bytes of blob ``sha``, checked against the hash."""
        try:
            data = obstore.get(self._backend, blob_key(sha)).bytes().to_bytes()
        except _NOT_FOUND as exc:
            raise NotFoundError(f"blob {sha} is missing from {self.uri}") from exc
        except BaseError as exc:
            raise StoreError(f"cannot read blob {sha} from {self.uri}: {exc}") from exc
        verify(sha, data)
        return data

    async def get_blob_async(self, sha: str) -> bytes:
        """Like :meth:`get_blob`, without verifying (the caller verifies and retries)."""
        try:
            result = await obstore.get_async(self._backend, blob_key(sha))
            return (await result.bytes_async()).to_bytes()
        except _NOT_FOUND as exc:
            raise NotFoundError(f"blob {sha} is missing from {self.uri}") from exc
        except BaseError as exc:
            raise StoreError(f"cannot read blob {sha} from {self.uri}: {exc}") from exc

    def presign(self, key: str, expires_in: timedelta) -> str:
        """A presigned GET URL for ``key`` (object stores only)."""
        if not isinstance(self._backend, S3Store):
            raise ConfigError(f"{self.uri} is a local store; presigned URLs need an object store")
        try:
            return obstore.sign(self._backend, "GET", key, expires_in)
        except BaseError as exc:
            raise StoreError(f"cannot presign {key} on {self.uri}: {exc}") from exc

    def presign_many(self, keys: list[str], expires_in: timedelta) -> list[str]:
        """Presigned GET URLs for many keys at once."""
        if not isinstance(self._backend, S3Store):
            raise ConfigError(f"{self.uri} is a local store; presigned URLs need an object store")
        try:
            return list(obstore.sign(self._backend, "GET", keys, expires_in))
        except BaseError as exc:
            raise StoreError(f"cannot presign on {self.uri}: {exc}") from exc

    # -- versions ------------------------------------------------------------------------------

    def latest_version(self) -> int:
        """The newest committed version, 0 for an empty dataset."""
        n = self._read_latest_ref()
        while self._exists(_version_key(n + 1)):
            n += 1
        return n

    def resolve(self, version: int | None) -> int:
        """``version`` checked to exist, or the latest one when ``None``."""
        if version is None:
            latest = self.latest_version()
            if latest == 0:
                raise NotFoundError(f"{self.uri} has no versions yet; import data into it first")
            return latest
        if version < 1:
            raise NotFoundError(f"version {version} does not exist: versions are numbered from 1")
        if version not in self._manifests and not self._exists(_version_key(version)):
            raise NotFoundError(f"{self.uri} has no version {version} (latest is {self.latest_version()})")
        return version

    def manifest(self, version: int | None = None) -> tuple[pa.Table, _manifest.VersionInfo]:
        """The manifest table and version info of ``version`` (default: latest); cached, immutable."""
        n = self.resolve(version)
        if n not in self._manifests:
            key = _version_key(n)
            try:
                data = obstore.get(self._backend, key).bytes().to_bytes()
            except _NOT_FOUND as exc:
                raise NotFoundError(f"{self.uri} has no version {n}") from exc
            except BaseError as exc:
                raise StoreError(f"cannot read {key} from {self.uri}: {exc}") from exc
            self._manifests[n] = _manifest.from_parquet(data, f"{self.uri}/{key}")
        return self._manifests[n]

    def version_info(self, version: int) -> _manifest.VersionInfo:
        """A version's info from its Parquet footer alone (a few small range reads)."""
        if version in self._manifests:
            return self._manifests[version][1]
        key = _version_key(version)
        try:
            meta = pq.read_metadata(_ArrowFile(self._backend, key))
        except _NOT_FOUND as exc:
            raise NotFoundError(f"{self.uri} has no version {version}") from exc
        except (BaseError, pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"cannot read {key} from {self.uri}: {exc}") from exc
        return _manifest.info_from_metadata(meta.metadata, f"{self.uri}/{key}")

    def log(self) -> list[_manifest.VersionInfo]:
        return [self.version_info(n) for n in range(1, self.latest_version() + 1)]

    def commit(self, change: Callable[[pa.Table | None], pa.Table], message: str = "") -> int:
        """Commit ``change(latest manifest)`` as the next version and return its number.

        ``change`` must be a pure function of the base table: when another writer commits first, it
        is called again on top of that writer's version. A change that returns the base table itself
        (``change(base) is base``) has nothing to commit: no version is written and the base's
        number is returned.
        """
        self._writable()
        for _ in range(_COMMIT_ATTEMPTS):
            parent = self.latest_version()
            base = self.manifest(parent)[0] if parent else None
            table = change(base)
            if base is not None and table is base:
                return parent
            n = parent + 1
            info = _manifest.VersionInfo(
                version=n,
                parent=parent or None,
                items=table.num_rows,
                created_at=_manifest.now(),
                message=message,
            )
            data = _manifest.to_parquet(table, info)
            if not self._create(_version_key(n), data):
                continue  # another writer took n: rebuild on top of it
            self._advance_latest(n)
            return n
        raise ConflictError(
            f"{self.uri}: {_COMMIT_ATTEMPTS} concurrent commits won before this one; try again"
        )

    # -- small objects beside the versions (the ledger) ----------------------------------------

    def create_object(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if absent; ``False`` when an object is there already.

        Works in a forked process too (a DataLoader worker): a local store writes a file and links it into
        place (never a partial object, never a replaced one); an object store there takes a presigned PUT
        with ``If-None-Match: *``, since obstore's client cannot run after ``fork()``.
        """
        self._writable()
        if self._root is not None:
            return _create_file(self._root / key, data, self.uri)
        if not forked():
            return self._create(key, data)
        response = self._signed("PUT", key, data)
        if response.status_code in (409, 412):
            return False
        if response.status_code >= 300:
            raise StoreError(f"cannot write {key} to {self.uri}: HTTP {response.status_code}")
        return True

    def read_object(self, key: str) -> bytes:
        """The bytes of ``key``; :class:`NotFoundError` when there is none. Works in a forked process too."""
        if self._root is not None:
            try:
                return (self._root / key).read_bytes()
            except FileNotFoundError as exc:
                raise NotFoundError(f"{self.uri} has no {key}") from exc
            except OSError as exc:
                raise StoreError(f"cannot read {key} from {self.uri}: {exc.strerror or exc}") from exc
        if forked():
            response = self._signed("GET", key)
            if response.status_code == 404:
                raise NotFoundError(f"{self.uri} has no {key}")
            if response.status_code != 200:
                raise StoreError(f"cannot read {key} from {self.uri}: HTTP {response.status_code}")
            return response.content
        try:
            return obstore.get(self._backend, key).bytes().to_bytes()
        except _NOT_FOUND as exc:
            raise NotFoundError(f"{self.uri} has no {key}") from exc
        except BaseError as exc:
            raise StoreError(f"cannot read {key} from {self.uri}: {exc}") from exc

    def _signed(self, method: Literal["GET", "PUT"], key: str, data: bytes | None = None) -> httpx.Response:
        """``method`` on ``key`` through a presigned URL (PUT create-only): how a forked process reaches an
        object store, since signing with static credentials is computation, which still works there."""
        if not isinstance(self._backend, S3Store):
            raise ConfigError(f"{self.uri} is not an object store; presigned URLs need one")
        try:
            url = obstore.sign(self._backend, method, key, _SIGNED_LIFETIME)
        except BaseError as exc:
            raise StoreError(f"cannot presign {key} on {self.uri}: {exc}") from exc
        headers = {"If-None-Match": "*"} if method == "PUT" else {}
        try:
            return httpx.request(
                method, url, content=data, headers=headers, timeout=_OBJECT_TIMEOUT_S, trust_env=False
            )
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot {method} {key} on {self.uri}: {exc!r}") from exc

    def list_objects(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` (a folder, ending in ``/``), sorted; none when there is no such one."""
        keys: list[str] = []
        try:
            for chunk in obstore.list(self._backend, prefix, chunk_size=10_000):
                keys.extend(str(meta["path"]) for meta in chunk)
        except _NOT_FOUND:
            return []
        except BaseError as exc:
            raise StoreError(f"cannot list {prefix} of {self.uri}: {exc}") from exc
        return sorted(keys)

    # -- internals -----------------------------------------------------------------------------

    def _create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if absent; ``False`` when another writer's object is there."""
        try:
            obstore.put(self._backend, key, data, mode="create")
            return True
        except AlreadyExistsError:
            return False
        except BaseError as exc:
            # Some servers answer a refused conditional write by closing the connection before the
            # body is sent, and a lost response looks the same: what is stored now tells which.
            try:
                stored = obstore.get(self._backend, key).bytes().to_bytes()
            except BaseError:
                raise StoreError(f"cannot write {key} to {self.uri}: {exc}") from exc
            return stored == data

    def _exists(self, key: str) -> bool:
        try:
            obstore.head(self._backend, key)
        except _NOT_FOUND:
            return False
        except BaseError as exc:
            raise StoreError(f"cannot read {key} from {self.uri}: {exc}") from exc
        return True

    def _read_latest_ref(self) -> int:
        try:
            raw = obstore.get(self._backend, _LATEST).bytes().to_bytes()
        except _NOT_FOUND:
            return 0
        except BaseError as exc:
            raise StoreError(f"cannot read {_LATEST} from {self.uri}: {exc}") from exc
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit():
            raise StoreError(f"{self.uri}/{_LATEST} holds {text[:40]!r}, not a version number")
        return int(text)

    def _advance_latest(self, n: int) -> None:
        """Move refs/latest forward to ``n`` unless a later version already got there."""
        for _ in range(_COMMIT_ATTEMPTS):
            try:
                got = obstore.get(self._backend, _LATEST)
                current, etag = int(got.bytes().to_bytes()), got.meta["e_tag"]
            except _NOT_FOUND:
                current, etag = 0, None
            except (BaseError, ValueError) as exc:
                raise StoreError(f"cannot read {_LATEST} from {self.uri}: {exc}") from exc
            if current >= n:
                return
            mode: Any = "create" if etag is None else {"e_tag": etag}
            try:
                obstore.put(self._backend, _LATEST, str(n).encode(), mode=mode)
                return
            except (AlreadyExistsError, PreconditionError):
                continue
            except (NotSupportedError, NotImplementedError):
                # Filesystems have no compare-and-swap; an atomic rename is the best there is, and
                # readers probe past a stale ref anyway.
                obstore.put(self._backend, _LATEST, str(n).encode())
                return
            except BaseError as exc:
                raise StoreError(f"cannot update {_LATEST} on {self.uri}: {exc}") from exc


class BlobWriter:
    """Stores blobs into one store, create-only, from any number of threads at once.

    ``put(sha, source)`` stores ``source`` (bytes, or a file to copy) as ``blobs/<sha>`` unless that
    blob is there already; the caller computed ``sha`` from exactly those bytes. Each blob appears
    whole or not at all, and a blob already stored is never replaced (content-addressed: the bytes
    there are these bytes).

    On an object store each call is one conditional PUT (``If-None-Match: *``) that blocks only its
    own thread, outside the GIL: N threads keep N uploads in flight without an event loop or a task
    per blob. On a filesystem, bytes are written to an unnamed file in ``blobs/`` (``O_TMPFILE``)
    that is then linked as ``blobs/<sha>``: one entry change in that large directory, nothing left
    behind by a crash. Files, and bytes on filesystems without unnamed files, are staged in
    ``staging/`` and then hard-linked; obstore's own staging beside the target (``blobs/<sha>#n``)
    makes three entry changes there per file, which measured 3-10x slower for many small files
    (bench/store_query.py). Links are create-only and atomic, so a crash leaves at most a stray
    staging file, never a partial blob. Like ``cp``, nothing is fsynced: a version is only as
    durable as the filesystem makes the files it names.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._target_fd = -1
        store._writable()
        root = store.local_root
        self._local = root is not None
        if root is None:
            self._backend = store._backend
            return
        self._staging, self._target = f"{root}/staging", f"{root}/blobs"  # plain strings: cheaper
        # Linux's unnamed files, linked by their /proc/self/fd entry; False once the filesystem refuses.
        self._unnamed = _UNNAMED_FILES and os.path.isdir("/proc/self/fd")
        try:
            os.makedirs(self._staging, exist_ok=True)
            os.makedirs(self._target, exist_ok=True)
            self._target_fd = os.open(self._target, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StoreError(f"cannot write to {store.uri}: {exc.strerror or exc}") from exc

    def put(self, sha: str, source: bytes | Path) -> None:
        """Store ``source`` as blob ``sha`` (kept as is when present); raises :class:`StoreError`."""
        what: object = source if isinstance(source, Path) else f"blob {sha}"
        if not self._local:
            _create_blob(self._backend, sha, source, f"cannot upload {what} to {self._store.uri}")
            return
        try:
            if self._unnamed and isinstance(source, bytes):
                if _link_unnamed(self._target_fd, sha, source):
                    return
                self._unnamed = False  # not supported here: stage this blob and every later one
            tag = f"{os.getpid()}-{threading.get_ident()}"  # one staging file per thread at a time
            _link_staged(f"{self._staging}/{sha}.{tag}", f"{self._target}/{sha}", source)
        except OSError as exc:
            raise StoreError(f"cannot store {what} in {self._store.uri}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Release the store's directory (call once every ``put`` has returned)."""
        fd, self._target_fd = self._target_fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_blob(backend: ObjectStore, sha: str, source: bytes | Path, failure: str) -> None:
    """Upload blob ``sha`` unless it is there already; :class:`StoreError` starting with ``failure``."""
    try:
        obstore.put(backend, blob_key(sha), source, mode="create")
    except AlreadyExistsError:
        pass  # content-addressed: the bytes there are these bytes
    except BaseError as exc:
        raise StoreError(f"{failure}: {exc}") from exc


def _link_unnamed(dir_fd: int, name: str, data: bytes) -> bool:
    """Write ``data`` to an unnamed file in the directory ``dir_fd`` and link it there as ``name``
    (kept as is when present); ``False`` when the filesystem has no unnamed files."""
    try:
        fd = os.open(".", os.O_WRONLY | os.O_TMPFILE, 0o666, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _NO_UNNAMED_FILES:
            return False
        raise
    try:
        _write_all(fd, data)
        # A directory fd makes os.link call linkat with AT_SYMLINK_FOLLOW: it links the file itself.
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd)
    except FileExistsError:
        pass  # content-addressed: the bytes there are these bytes
    except OSError:
        return False  # linking by fd refused (sandboxes, odd /proc): staging tries again, or explains
    finally:
        os.close(fd)
    return True


def _stage(tmp: str | Path, source: Path | bytes) -> None:
    """Write ``source`` (a file to copy, or bytes) to the staging file ``tmp``."""
    if isinstance(source, Path):
        shutil.copyfile(source, tmp)
        return
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _write_all(fd, source)
    finally:
        os.close(fd)


def _link_staged(tmp: str, target: str, source: Path | bytes) -> None:
    """Copy ``source`` to the staging file ``tmp``, then link it as ``target`` (kept when present)."""
    _stage(tmp, source)
    try:
        os.link(tmp, target)
    except FileExistsError:
        pass  # content-addressed: the bytes there are these bytes
    finally:
        os.unlink(tmp)


def _create_file(path: Path, data: bytes, uri: str) -> bool:
    """Create ``path`` holding ``data`` unless it exists: written beside it, then linked (create-only and
    atomic), so a reader never sees a partial file and a crash leaves at most a stray ``.tmp`` file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _stage(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise StoreError(f"cannot write {path} in {uri}: {exc.strerror or exc}") from exc
    return True


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    while written < len(data):  # partial writes: very large buffers, full disks
        written += os.write(fd, memoryview(data)[written:])


def verify(sha: str, data: bytes | memoryview) -> None:
    got = sha256_hex(data)
    if got != sha:
        raise IntegrityError(f"blob {sha} is corrupt: its bytes hash to {got}")


class _ArrowFile:
    """obstore's buffered reader as pyarrow takes a file (pyarrow also asks ``closed`` and ``readable``)."""

    closed = False

    def __init__(self, backend: ObjectStore, key: str) -> None:
        # Footers are a few KB: small buffers keep a version's info to a couple of range reads.
        self._reader = obstore.open_reader(backend, key, buffer_size=64 * 1024)

    def readable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


def _parse(uri: str | os.PathLike[str], s3: S3Options) -> tuple[str, ObjectStore | Path]:
    """The canonical URI and the backend (a local store's directory, opened later: no I/O here)."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        root = Path(parsed.path if parsed.scheme else text).expanduser().absolute()
        return root.as_uri(), root
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"{text!r} names no bucket; write s3://BUCKET/PREFIX")
        endpoint = s3.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config: dict[str, str] = {"conditional_put": "etag"}
        for key, value in (
            ("endpoint", endpoint),
            ("region", s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")),
            ("access_key_id", s3.access_key_id),
            ("secret_access_key", s3.secret_access_key),
            ("session_token", s3.session_token),
        ):
            if value:
                config[key] = value
        config.setdefault("region", "us-east-1")
        prefix = parsed.path.strip("/") or None
        try:
            store = S3Store(
                parsed.netloc,
                prefix=prefix,
                config=config,  # type: ignore[arg-type]
                client_options={"allow_http": bool(endpoint and endpoint.startswith("http://"))},
                retry_config=None if s3.max_retries is None else {"max_retries": s3.max_retries},
            )
        except BaseError as exc:
            raise ConfigError(f"cannot configure S3 store for {text!r}: {exc}") from exc
        return f"s3://{parsed.netloc}/{prefix or ''}".rstrip("/"), store
    raise ConfigError(f"unsupported store URI {text!r}: use a local path, file:///PATH or s3://BUCKET/PREFIX")
