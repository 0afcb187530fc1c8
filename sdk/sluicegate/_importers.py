"""Importers: COCO, image folders and JSON Lines into a dataset store.

Every importer works in three steps, so that bad input never becomes a version:

1. *Plan*: read the format's index (COCO JSON, folder tree, JSONL) into entries (id, file,
   annotations, metadata), rejecting malformed input with its file and line or id.
2. *Scan and store*: hash and stat every file and read its image header (size, format), check
   boxes against the image size, and store the files the store lacks (one listing, create-only
   writes), in one pass over each file and in parallel threads. An interrupted import resumes by
   uploading only what is missing; a problem stops the upload.
3. *Commit* once, with a pure change function that merges the new items into whatever version is
   latest at that moment. When the merge changes nothing, no version is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NamedTuple

import blake3
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sluicegate._exceptions import ImportError_
from sluicegate._imageinfo import HEADER_BYTES, ImageInfo, image_info
from sluicegate.core import manifest as _manifest
from sluicegate.core.manifest import Annotation, ItemRecord, MetaValue
from sluicegate.core.store import S3Options, Store

__all__ = ["Format", "ImportResult", "import_dataset"]

PathLike = str | os.PathLike[str]
# Boxes may overshoot the image by rounding (COCO's float boxes do); more than this is an error.
_BOX_TOLERANCE = 1.0
_SCAN_CHUNK = 32  # entries per thread-pool task (small: threads finish together at the end)
# Files up to this size are read whole, and the bytes hashed are the bytes stored; larger ones are
# streamed through the hash and then copied. Each thread holds at most one such file.
_READ_WHOLE = 8 * 2**20
_PENDING_BYTES = 4 * 2**20  # scanned bytes a thread holds before it stores them
_OBJECT_STORE_WORKERS = 32  # threads for an object store: each keeps one upload in flight
_MAX_LOCAL_WORKERS = 8
_MAX_REPORTED = 1  # problems named in the message; the rest are counted


class Format(StrEnum):
    """The input formats :func:`import_dataset` reads."""

    COCO = "coco"
    IMAGEFOLDER = "imagefolder"
    JSONL = "jsonl"


class ImportResult(BaseModel):
    """What an import did: the version that holds the items and how much was new."""

    model_config = ConfigDict(frozen=True)

    version: int = Field(description="the version containing the imported items")
    committed: bool = Field(description="False when the store already held exactly these items")
    items: int
    blobs_uploaded: int
    blobs_present: int = Field(description="distinct files the store already had (skipped)")


class _Entry(NamedTuple):  # a tuple: one per file, cheaper to build than a frozen dataclass
    """One item to import, before its file has been looked at."""

    id: str
    path: str  # the file (a plain string: pathlib costs more than the scan of a small file)
    where: str  # names the input that declared it, for error messages
    annotations: tuple[Annotation, ...] = ()
    metadata: Mapping[str, MetaValue] | None = None
    declared_size: tuple[int, int] | None = None  # (width, height) the index claims


class _Scanned(NamedTuple):  # a tuple: built once per file, cheaper than a dataclass
    sha: str
    blake3: str  # what readers verify the bytes against (see _manifest)
    size: int
    media_type: str
    width: int
    height: int


class _Problems:
    """Collects malformed-input messages and raises them as one :class:`ImportError_`."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        more = len(self.messages) - _MAX_REPORTED
        suffix = (
            f" (and {more} more problem{'s' if more > 1 else ''}; nothing was imported)" if more > 0 else ""
        )
        raise ImportError_("; ".join(self.messages[:_MAX_REPORTED]) + suffix)


# -- public entry ----------------------------------------------------------------------------------


def import_dataset(
    format: Format | str,
    sources: PathLike | Sequence[PathLike],
    uri: PathLike,
    *,
    images: PathLike | None = None,
    s3: S3Options | None = None,
    message: str | None = None,
    progress: bool = False,
    workers: int | None = None,
    allow: Sequence[PathLike] = (),
) -> ImportResult:
    """Import ``sources`` in ``format`` into the dataset at ``uri`` as one new version.

    - ``coco``: ``sources`` are COCO instances JSON files, ``images`` the directory their
      ``file_name`` entries are relative to. Item ids are the file names.
    - ``imagefolder``: ``sources`` are directories with one sub-folder per class; every image gets
      one annotation with its folder's name. Item ids are paths relative to the source.
    - ``jsonl``: ``sources`` are JSON Lines files, one item per line:
      ``{"path": ..., "id": ..., "labels": [...], "annotations": [...], "metadata": {...}}``
      (only ``path`` is required; relative paths are relative to the JSONL file).

    Items whose id is already in the dataset are replaced in place, others are added; when that
    changes nothing, no version is written (``ImportResult.committed`` is False). Malformed input
    raises :class:`ImportError_` naming the file and line or id: index errors before any file is
    read, file errors (missing, not an image, box outside it) as soon as they are found, which
    stops the upload. Nothing is committed then, and re-running after a fix uploads only the files
    the store still lacks. ``workers`` threads read, hash and store the files (default: one per
    CPU for a local store, 32 for an object store, where each thread keeps one upload in flight).

    Files are read only under the import's own roots: the folders (imagefolder), the directory of each
    JSONL file, the COCO images directory, and the directories named in ``allow``. An index that points
    elsewhere (an absolute path, ``..``, a symlink out) is refused before anything is read: importing
    someone else's annotation file must not upload ``~/.aws/credentials``.
    """
    try:
        fmt = Format(format)
    except ValueError:
        choices = ", ".join(f.value for f in Format)
        raise ImportError_(f"unknown import format {format!r}: use one of {choices}") from None
    paths = [Path(sources)] if isinstance(sources, str | os.PathLike) else [Path(s) for s in sources]
    if not paths:
        raise ImportError_(f"no sources given: name the {_SOURCE_WORD[fmt]} to import")
    if fmt is Format.COCO:
        if images is None:
            raise ImportError_("COCO import needs the image directory (images=... / --images DIR)")
        entries = _plan_coco(paths, Path(images))
    elif images is not None:
        raise ImportError_(f"images= applies to COCO imports only, not {fmt.value}")
    else:
        entries = _PLANNERS[fmt](paths)
    if not entries:
        raise ImportError_(f"no items in {', '.join(map(str, paths))}: nothing to import")
    if fmt is Format.COCO:
        roots = [Path(images or ".")]
    elif fmt is Format.JSONL:
        roots = [p.parent for p in paths]
    else:
        roots = list(paths)
    _confine(entries, [*roots, *map(Path, allow)])
    store = Store(uri, s3)
    with _progress_bars(progress) as bars:
        records, uploaded, present = _scan_and_upload(store, entries, workers, bars)
    table = _manifest.records_to_table(records)
    change = _MergeInto(table)
    version = store.commit(change, message=message or f"import {fmt.value} from {', '.join(map(str, paths))}")
    return ImportResult(
        version=version,
        committed=not change.unchanged,
        items=table.num_rows,
        blobs_uploaded=uploaded,
        blobs_present=present,
    )


_SOURCE_WORD = {
    Format.COCO: "COCO annotation files",
    Format.IMAGEFOLDER: "image folders",
    Format.JSONL: "JSON Lines files",
}


class _MergeInto:
    """The pure change function of an import: ``new`` merged into the base, or the base itself
    (nothing to commit) when that merge changes nothing; ``unchanged`` tells which, for the last call."""

    def __init__(self, new: pa.Table) -> None:
        self.new = new
        self.unchanged = False

    def __call__(self, base: pa.Table | None) -> pa.Table:
        merged = _manifest.merge(base, self.new)
        self.unchanged = base is not None and merged.equals(base)
        return base if base is not None and self.unchanged else merged


# -- planning: one function per format -------------------------------------------------------------


def _check_ids(entries: list[_Entry]) -> None:
    seen: dict[str, str] = {}
    problems = _Problems()
    for entry in entries:
        first = seen.setdefault(entry.id, entry.where)
        if first != entry.where:
            problems.add(f"{entry.where}: duplicate item id {entry.id!r} (first at {first})")
    problems.raise_if_any()


def _plan_imagefolder(roots: Sequence[Path]) -> list[_Entry]:
    entries: list[_Entry] = []
    problems = _Problems()
    per_class: dict[str, tuple[Annotation, ...]] = {}  # annotations are immutable: one per class
    for root in roots:
        if not root.is_dir():
            raise ImportError_(f"{root}: not a directory; an image folder has one sub-folder per class")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, .cache, ...
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            label = rel_dir.split("/", 1)[0]
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if name.startswith("."):
                    continue  # .DS_Store, editor swap files, ...
                if rel_dir == ".":
                    problems.add(f"{path}: file outside a class folder; put it in {root}/<class>/")
                    continue
                if label not in per_class:
                    per_class[label] = (Annotation(label=label),)
                entries.append(_Entry(f"{rel_dir}/{name}", path, path, per_class[label]))
    problems.raise_if_any()
    if not entries:
        raise ImportError_(f"no images under {', '.join(map(str, roots))}: expected <root>/<class>/<image>")
    _check_ids(entries)
    return entries


class _JsonlItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    id: str | None = Field(default=None, min_length=1)
    labels: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    annotations: list[Annotation] = Field(default_factory=list)
    metadata: dict[str, MetaValue] = Field(default_factory=dict)


def _confine(entries: Sequence[_Entry], roots: Sequence[Path]) -> None:
    """Refuse entries whose file (symlinks resolved) is not under one of ``roots``."""
    inside = tuple(os.path.join(os.path.realpath(r), "") for r in roots)
    problems = _Problems()
    real_dirs: dict[str, str] = {}  # many files share a directory: resolve each directory once
    for entry in entries:
        if not _realpath(entry.path, real_dirs).startswith(inside):
            problems.add(
                f"{entry.where}: {entry.path} is outside the import's roots "
                f"({', '.join(r.rstrip(os.sep) for r in inside)}); to import files from elsewhere, name "
                "their directory with --allow DIR (import_dataset(..., allow=[DIR]))"
            )
    problems.raise_if_any()


def _realpath(path: str, real_dirs: dict[str, str]) -> str:
    """``os.path.realpath(path)``, resolving ``path``'s directory through the cache ``real_dirs``.

    Resolving is component by component, so the directory's resolution followed by the last
    component's is the whole path's; only a last component that is itself a link (or ``.``/``..``)
    needs more, and takes the full walk. realpath walks every component with an lstat each in Python
    (~30 us a file here, 0.6 s of an import of 20,000); this is one lstat.
    """
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        return os.path.realpath(path)
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return os.path.realpath(path)
    except OSError:
        pass  # missing (realpath keeps it as named) or unreadable: the scan will say which
    real_head = real_dirs.get(head)
    if real_head is None:
        real_head = real_dirs[head] = os.path.realpath(head or ".")
    return os.path.join(real_head, tail)


def _plan_jsonl(files: Sequence[Path]) -> list[_Entry]:
    entries: list[_Entry] = []
    problems = _Problems()
    per_label: dict[str, Annotation] = {}  # annotations are immutable: one per label name
    for file in files:
        parent = os.fspath(file.parent)
        for lineno, line in _read_lines(file):
            where = f"{file}:{lineno}"
            try:
                # Parsed and validated in one step by pydantic's own JSON parser; a line it refuses is
                # read again the slow way, which says what is wrong in the words json.loads uses.
                item = _JsonlItem.model_validate_json(line)
            except ValidationError:
                message = _jsonl_problem(line)
                if message is not None:
                    problems.add(f"{where}: {message}")
                    continue
                item = _JsonlItem.model_validate(json.loads(line))
            labels = item.labels
            annotations: tuple[Annotation, ...] = ()
            if labels:
                for label in labels:
                    if label not in per_label:
                        per_label[label] = Annotation(label=label)
                annotations = tuple(per_label[label] for label in labels)
            if item.annotations:
                annotations += tuple(item.annotations)
            entries.append(
                _Entry(
                    item.id or _as_posix(item.path),
                    os.path.join(parent, item.path),
                    where,
                    annotations,
                    item.metadata,
                )
            )
    problems.raise_if_any()
    _check_ids(entries)
    return entries


def _jsonl_problem(line: str) -> str | None:
    """What is wrong with one JSON Lines item (``None``: nothing, by Python's reading of it)."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    try:
        _JsonlItem.model_validate(raw)
    except ValidationError as exc:
        return _pydantic_problem(exc)
    return None


def _as_posix(path: str) -> str:
    """``Path(path).as_posix()``, without building a Path for the paths it would not change."""
    if "//" in path or "/." in path or path.startswith("./") or path.endswith("/") or path == ".":
        return Path(path).as_posix()
    return path


def _read_lines(file: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a text file with their 1-based numbers."""
    try:
        with file.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, line
    except FileNotFoundError:
        raise ImportError_(f"{file}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ImportError_(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ImportError_(f"{file}: cannot read ({exc.strerror})") from exc


class _CocoImage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    file_name: str = Field(min_length=1)
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)


class _CocoCategory(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    name: str = Field(min_length=1)


class _CocoRle(BaseModel):
    model_config = ConfigDict(extra="ignore")

    counts: list[int] | str
    size: tuple[int, int]


class _CocoAnnotation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float] | None = None
    segmentation: list[list[float]] | _CocoRle | None = None
    iscrowd: int = Field(default=0, ge=0, le=1)


class _CocoFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    images: list[_CocoImage]
    annotations: list[_CocoAnnotation] = Field(default_factory=list)
    categories: list[_CocoCategory]


def _plan_coco(files: Sequence[Path], images: Path) -> list[_Entry]:
    if not images.is_dir():
        raise ImportError_(f"{images}: not a directory (the COCO images directory)")
    entries: list[_Entry] = []
    for file in files:
        entries.extend(_plan_coco_file(file, images))
    _check_ids(entries)
    return entries


def _plan_coco_file(file: Path, images: Path) -> list[_Entry]:
    try:
        raw = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise ImportError_(f"{file}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ImportError_(f"{file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportError_(f"{file}: cannot read as JSON ({exc})") from exc
    try:
        coco = _CocoFile.model_validate(raw)
    except ValidationError as exc:
        raise ImportError_(f"{file}: {_pydantic_problem(exc, raw)}") from None
    problems = _Problems()
    names: dict[int, str] = {}
    for cat in coco.categories:
        if cat.name in names.values():
            problems.add(f"{file}: category {cat.id} repeats the name {cat.name!r} of another category")
        names[cat.id] = cat.name
    per_image: dict[int, list[Annotation]] = {img.id: [] for img in coco.images}
    for ann in coco.annotations:
        where = f"{file}: annotation {ann.id}"
        if ann.category_id not in names:
            problems.add(f"{where}: unknown category_id {ann.category_id} (not in 'categories')")
            continue
        if ann.image_id not in per_image:
            problems.add(f"{where}: unknown image_id {ann.image_id} (not in 'images')")
            continue
        attributes: dict[str, Any] = {"coco_id": ann.id}
        polygon = None
        if isinstance(ann.segmentation, _CocoRle):
            attributes["segmentation"] = "rle"  # masks are not kept; the box is
        elif ann.segmentation:
            bad = [ring for ring in ann.segmentation if len(ring) < 6 or len(ring) % 2]
            if bad:
                problems.add(
                    f"{where}: a polygon needs an even number (>= 6) of coordinates, got {len(bad[0])}"
                )
                continue
            polygon = ann.segmentation
        try:
            annotation = Annotation(
                label=names[ann.category_id],
                bbox=ann.bbox,
                polygon=polygon,
                iscrowd=bool(ann.iscrowd),
                attributes=attributes,
            )
        except ValidationError as exc:
            problems.add(f"{where}: {_pydantic_problem(exc)}")
            continue
        per_image[ann.image_id].append(annotation)
    problems.raise_if_any()
    entries = []
    for img in coco.images:
        declared = (img.width, img.height) if img.width and img.height else None
        entries.append(
            _Entry(
                Path(img.file_name).as_posix(),
                os.path.join(images, img.file_name),
                f"{file}: image {img.id} ({img.file_name})",
                tuple(per_image[img.id]),
                {"coco_id": img.id},
                declared,
            )
        )
    return entries


def _pydantic_problem(exc: ValidationError, raw: Any = None) -> str:
    """The first validation error as ``where: what``, naming list entries by their own id."""
    err = exc.errors()[0]
    where, node = "", raw
    for loc in err["loc"]:
        if isinstance(loc, int):
            where += f"[{loc}]"
            node = node[loc] if isinstance(node, list) and loc < len(node) else None
            if isinstance(node, dict) and "id" in node:
                where += f" (id {node['id']})"
        else:
            where += f".{loc}" if where else str(loc)
            node = node.get(loc) if isinstance(node, dict) else None
    return f"{where or 'value'}: {err['msg']}"


_PLANNERS: dict[Format, Callable[[Sequence[Path]], list[_Entry]]] = {
    Format.IMAGEFOLDER: _plan_imagefolder,
    Format.JSONL: _plan_jsonl,
}

# -- scanning ------------------------------------------------------------------------------------


def _scan_file(path: str) -> tuple[_Scanned, bytes | None]:
    """Hash, stat and read the image header of one file (raises OSError or Pillow's errors).

    Files up to ``_READ_WHOLE`` bytes are read with one system call, and those bytes serve the
    hash, the header and the store, which then does not read the file again (so what is stored is
    exactly what was hashed). Larger ones are streamed through the hash. Plain ``os`` calls: a file
    object costs more than reading a small image.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size > _READ_WHOLE:
            return _scan_large(fd, path), None
        data = _read_to_end(fd, size)
    finally:
        os.close(fd)
    media_type, width, height = _known_image(data) or _pillow_image(io.BytesIO(data), path)
    sha = hashlib.sha256(data).hexdigest()
    found = _Scanned(sha, _manifest.blake3_hex(data), len(data), media_type, width, height)
    return found, data


def _read_to_end(fd: int, size: int) -> bytes:
    data = os.read(fd, size + 1)  # the whole file at once; one byte more notices a grown file
    if len(data) == size:
        return data
    chunks = [data]  # a short read, or the file changed since it was measured: read to its end
    while chunk := os.read(fd, 2**20):
        chunks.append(chunk)
    return b"".join(chunks)


def _scan_large(fd: int, path: str) -> _Scanned:
    with open(fd, "rb", closefd=False) as fh:
        sha, check = hashlib.sha256(), blake3.blake3()
        while chunk := fh.read(2**20):  # one pass feeds both hashes (each drops the GIL)
            sha.update(chunk)
            check.update(chunk)
        size = fh.tell()
        fh.seek(0)
        media_type, width, height = _known_image(fh.read(HEADER_BYTES)) or _pillow_image(fh, path)
    return _Scanned(sha.hexdigest(), check.hexdigest(), size, media_type, width, height)


def _known_image(header: bytes) -> ImageInfo | None:
    """The header's facts for the common formats, or ``None`` where Pillow has to tell."""
    info = image_info(header)
    limit = Image.MAX_IMAGE_PIXELS
    if info is not None and limit is not None and info.width * info.height > limit:
        return None  # Pillow warns about, or refuses, images this large: let it
    return info


def _pillow_image(source: BinaryIO, path: str) -> ImageInfo:
    """The image's facts from Pillow (pixels are never decoded here)."""
    image = _open_image(source, os.path.splitext(path)[1])
    kind = image.format or "unknown"
    width, height = image.size
    return ImageInfo(Image.MIME.get(kind, f"image/{kind.lower()}"), width, height)


def _open_image(source: BinaryIO, suffix: str) -> Image.Image:
    """The image's header, trying the format its suffix names first."""
    hint = Image.registered_extensions().get(suffix.lower())
    if hint is not None:
        source.seek(0)
        try:
            return Image.open(source, formats=[hint])
        except UnidentifiedImageError:
            pass  # a misnamed file: let Pillow try every format
    source.seek(0)
    return Image.open(source)


def _scan_one(entry: _Entry) -> tuple[_Scanned, bytes | None] | str:
    """The file's facts (and bytes, when small), or a message saying what is wrong with it."""
    try:
        found, data = _scan_file(entry.path)
    except FileNotFoundError:
        return f"{entry.where}: image file {entry.path} does not exist"
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return f"{entry.where}: {entry.path} is not an image (Pillow cannot read its header)"
    except OSError as exc:
        if exc.errno is None:  # Pillow's own errors (a header cut short, ...): the system read it
            return f"{entry.where}: {entry.path} is not an image (Pillow cannot read its header: {exc})"
        return f"{entry.where}: cannot read {entry.path} ({exc.strerror or exc})"
    if entry.declared_size is not None and entry.declared_size != (found.width, found.height):
        w, h = entry.declared_size
        return f"{entry.where}: declared size {w}x{h} but the file is {found.width}x{found.height}"
    for ann in entry.annotations:
        if ann.bbox is not None and not _box_inside(ann.bbox, found.width, found.height):
            which = f" (annotation {ann.attributes['coco_id']})" if "coco_id" in ann.attributes else ""
            return (
                f"{entry.where}: box {list(ann.bbox)} of {ann.label!r}{which} lies outside the "
                f"{found.width}x{found.height} image"
            )
    return found, data


def _box_inside(bbox: tuple[float, float, float, float], width: int, height: int) -> bool:
    x, y, w, h = bbox
    return (
        x >= -_BOX_TOLERANCE
        and y >= -_BOX_TOLERANCE
        and x + w <= width + _BOX_TOLERANCE
        and (y + h <= height + _BOX_TOLERANCE)
    )


def _scan_and_upload(
    store: Store, entries: Sequence[_Entry], workers: int | None, bars: _Bars
) -> tuple[list[ItemRecord], int, int]:
    """Scan every entry and store the distinct files the store lacks; returns (the entries' records
    in their order, blobs uploaded, blobs already present).

    One pass over the files, in ``workers`` threads that each take a chunk of entries and, file by
    file, read it, hash it, read its header and, when the store lacks it, store the bytes just read
    (:class:`BlobWriter`): no file is read twice, no batch of bytes waits in memory, and reading,
    hashing and writing (system calls and sha256, all outside the GIL) overlap across threads. On an
    object store each thread has one upload in flight, so the threads are the upload concurrency.
    Each thread scans a chunk before it stores the chunk's files, and once a problem is found nothing
    more is stored (a thread finishes the file in its hands); scanning goes on to count the problems,
    then raises. A store error stops everything at once.
    """
    present = store.existing_blobs()  # one listing; an interrupted import's blobs are skipped
    threads = workers if workers is not None else _default_workers(store)
    scan = _ScanAndStore(store, present, bars.task("scanning", len(entries)), bars.task("storing", 0))
    chunks = [entries[i : i + _SCAN_CHUNK] for i in range(0, len(entries), _SCAN_CHUNK)]
    results: list[ItemRecord | str] = []
    try:
        if threads <= 1 or len(chunks) == 1:
            for chunk in chunks:
                results.extend(scan(chunk))
        else:
            pool = ThreadPoolExecutor(min(threads, len(chunks)), thread_name_prefix="sluicegate-import")
            try:
                for done in pool.map(scan, chunks):
                    results.extend(done)
            finally:
                scan.abort = True  # an error or an interrupt: the chunks still queued do nothing
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        scan.writer.close()
    problems = _Problems()
    records: list[ItemRecord] = []
    for result in results:
        if isinstance(result, str):
            problems.add(result)
        else:
            records.append(result)
    problems.raise_if_any()
    distinct = {record.blob for record in records}
    return records, len(scan.claimed), len(distinct) - len(scan.claimed)


def _default_workers(store: Store) -> int:
    """Threads for an import: one per CPU for a filesystem (they compete for cores: hashing and the
    kernel's copying), and for an object store enough to keep the server busy (they mostly wait)."""
    if not store.is_local:
        return _OBJECT_STORE_WORKERS
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_LOCAL_WORKERS))


class _ScanAndStore:
    """Scans a chunk of entries and stores the files the store lacks; one instance, many threads."""

    def __init__(self, store: Store, present: set[str], scanned: _Bar, stored: _Bar) -> None:
        self.writer = store.blob_writer()
        self.present = present
        self.claimed: set[str] = set()  # the blobs this import stores (each by one thread)
        self.failed = False  # a problem was found: store nothing more
        self.abort = False  # the import is over (an error elsewhere): do nothing more
        self._lock = threading.Lock()
        self._scanned, self._stored = scanned, stored

    def _claim(self, sha: str) -> bool:
        """True for the one caller that is to store ``sha``."""
        with self._lock:
            if sha in self.present or sha in self.claimed:
                return False
            self.claimed.add(sha)
            return True

    def __call__(self, chunk: Sequence[_Entry]) -> list[ItemRecord | str]:
        """Scan ``chunk``, then store its new files unless a problem has been found by then (by this
        thread or another): bad input found early stores nothing. At most ``_PENDING_BYTES`` wait
        to be stored; past that the files scanned so far are stored before scanning on."""
        out: list[ItemRecord | str] = []  # records built here, in parallel with other threads' hashing
        pending: list[tuple[str, Path | bytes]] = []
        held = 0
        for entry in chunk:
            if self.abort:
                return out
            result = _scan_one(entry)
            if isinstance(result, str):
                self.failed = True
                out.append(result)
                continue
            found, data = result
            out.append(_record(entry, found))
            if not self.failed and self._claim(found.sha):
                pending.append((found.sha, Path(entry.path) if data is None else data))
                held += found.size if data is not None else 0
                if held > _PENDING_BYTES:
                    self._store(pending)
                    pending, held = [], 0
        self._scanned(len(chunk))  # once per chunk: a progress update per file costs more than a file
        self._store(pending)
        return out

    def _store(self, pending: list[tuple[str, Path | bytes]]) -> None:
        if not pending or self.failed or self.abort:
            return  # the import will fail: what is not stored yet stays so
        for sha, source in pending:
            if self.abort:
                return
            self.writer.put(sha, source)
        self._stored.grow(len(pending))
        self._stored(len(pending))


def _record(entry: _Entry, found: _Scanned) -> ItemRecord:
    # Not validated again: the entry was when it was planned (ids non-empty, annotations and
    # metadata checked) and the scan computed the rest; validating cost 5.9 µs a record, this 3.7.
    return ItemRecord.model_construct(
        id=entry.id,
        blob=found.sha,
        blake3=found.blake3,
        size=found.size,
        media_type=found.media_type,
        width=found.width,
        height=found.height,
        metadata=dict(entry.metadata or {}),
        labels=_manifest.label_counts(entry.annotations),
        annotations=list(entry.annotations),
    )


# -- progress --------------------------------------------------------------------------------------


class _Bar:
    """One progress bar: call it to advance, ``grow`` to raise its total (a no-op without bars)."""

    def __init__(self, progress: Progress | None, what: str, total: int) -> None:
        self._progress = progress
        self._total = total
        self._task = progress.add_task(what, total=total) if progress is not None else None
        self._lock = threading.Lock()  # importing threads share a bar

    def __call__(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def grow(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            with self._lock:
                self._total += n
                self._progress.update(self._task, total=self._total)


class _Bars:
    """Progress bars on stderr, or nothing when ``progress`` is off."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def task(self, what: str, total: int) -> _Bar:
        return _Bar(self._progress, what, total)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[_Bars]:
    if not enabled:
        yield _Bars(None)
        return
    with Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bars:
        yield _Bars(bars)
