"""Importers: COCO, image folders and JSON Lines into a dataset store.

Every importer works in three steps, so that bad input never becomes a version:

1. *Plan*: read the format's index (COCO JSON, folder tree, JSONL) into entries (id, file,
   annotations, metadata), rejecting malformed input with its file and line or id.
2. *Scan and store*: hash and stat every file and read its image header (size, format), check
   boxes against the image size, and upload the files the store lacks (one listing, create-only
   writes) while the next batch is scanned. An interrupted import resumes by uploading only what
   is missing; a problem stops the upload.
3. *Commit* once, with a pure change function that merges the new items into whatever version is
   latest at that moment. When the merge changes nothing, no version is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NamedTuple

import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import _manifest
from ._exceptions import ImportError_
from ._imageinfo import HEADER_BYTES, ImageInfo, image_info
from ._manifest import Annotation, ItemRecord, MetaValue
from ._store import S3Options, Store

__all__ = ["Format", "ImportResult", "import_dataset"]

PathLike = str | os.PathLike[str]
# Boxes may overshoot the image by rounding (COCO's float boxes do); more than this is an error.
_BOX_TOLERANCE = 1.0
_SCAN_CHUNK = 64  # entries per thread-pool task
_BATCH = 1024  # entries scanned before their files are handed to the uploader
_READ_WHOLE = 32 * 2**20
_KEEP_BYTES = 256 * 2**10  # bounds the memory of a batch waiting to be stored (_BATCH of these)
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
    workers: int = 1,
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
    the store still lacks. ``workers`` threads read and hash files: more than one pays off for
    large files only.
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
    store = Store(uri, s3)
    with _progress_bars(progress) as bars:
        scanned, uploaded, present = _scan_and_upload(store, entries, workers, bars)
    table = _manifest.records_to_table(
        [_record(entry, found) for entry, found in zip(entries, scanned, strict=True)]
    )
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


def _plan_jsonl(files: Sequence[Path]) -> list[_Entry]:
    entries: list[_Entry] = []
    problems = _Problems()
    for file in files:
        for lineno, line in _read_lines(file):
            where = f"{file}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.add(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            try:
                item = _JsonlItem.model_validate(raw)
            except ValidationError as exc:
                problems.add(f"{where}: {_pydantic_problem(exc)}")
                continue
            annotations = tuple(Annotation(label=label) for label in item.labels) + tuple(item.annotations)
            entries.append(
                _Entry(
                    item.id or Path(item.path).as_posix(),
                    os.path.join(file.parent, item.path),
                    where,
                    annotations,
                    item.metadata,
                )
            )
    problems.raise_if_any()
    _check_ids(entries)
    return entries


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
    hash, the header and (up to ``_KEEP_BYTES``) the store, which then does not read the file again.
    Larger ones are streamed through the hash. Plain ``os`` calls: a file object costs more than
    reading a small image.
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
    found = _Scanned(hashlib.sha256(data).hexdigest(), len(data), media_type, width, height)
    return found, data if len(data) <= _KEEP_BYTES else None


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
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
        size = fh.tell()
        fh.seek(0)
        media_type, width, height = _known_image(fh.read(HEADER_BYTES)) or _pillow_image(fh, path)
    return _Scanned(sha, size, media_type, width, height)


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
    store: Store, entries: Sequence[_Entry], workers: int, bars: _Bars
) -> tuple[list[_Scanned], int, int]:
    """Scan every entry and upload the distinct files the store lacks; returns (scanned, uploaded,
    already present).

    Entries are scanned batch by batch while the previous batch uploads to an object store in the
    background (uploads wait on the network, outside Python, so the two overlap). A local store is
    written by this thread, and ``workers`` > 1 scan in a thread pool: for small files every step is
    a short system call, and threads handing the GIL back and forth cost more than they overlap
    (measured: four scanning threads used 3x the CPU of one; bench/store_query.py). Once a problem
    is found nothing more is uploaded; scanning goes on to count the problems, then raises.
    """
    present = store.existing_blobs()  # one listing; an interrupted import's blobs are skipped
    scan_advance = bars.task("scanning", len(entries))
    upload_task = bars.task("uploading", 0)
    problems = _Problems()
    scanned: list[_Scanned] = []
    queued: set[str] = set()
    in_flight: Future[None] | None = None
    with ThreadPoolExecutor(max(1, workers)) as pool, ThreadPoolExecutor(1) as uploader:
        for start in range(0, len(entries), _BATCH):
            part = entries[start : start + _BATCH]
            if workers > 1:
                chunks = [part[i : i + _SCAN_CHUNK] for i in range(0, len(part), _SCAN_CHUNK)]
                results = [r for chunk in pool.map(_scan_chunk, chunks) for r in chunk]
            else:
                results = _scan_chunk(part)
            scan_advance(len(part))
            batch: list[tuple[str, Path | bytes]] = []
            for entry, result in zip(part, results, strict=True):
                if isinstance(result, str):
                    problems.add(result)
                    continue
                found, data = result
                scanned.append(found)
                if found.sha not in present and found.sha not in queued:
                    queued.add(found.sha)
                    batch.append((found.sha, Path(entry.path) if data is None else data))
            if in_flight is not None:
                in_flight.result()  # surfaces a store error now, and keeps one batch in flight
                in_flight = None
            if batch and not problems.messages:
                upload_task.grow(len(batch))
                if store.is_local:
                    _store_batch(store, batch, upload_task)
                else:
                    in_flight = uploader.submit(_store_batch, store, batch, upload_task)
        if in_flight is not None:
            in_flight.result()
    problems.raise_if_any()
    distinct = {found.sha for found in scanned}
    return scanned, len(queued), len(distinct) - len(queued)


def _scan_chunk(chunk: Sequence[_Entry]) -> list[tuple[_Scanned, bytes | None] | str]:
    return [_scan_one(entry) for entry in chunk]


def _store_batch(store: Store, batch: list[tuple[str, Path | bytes]], bar: _Bar) -> None:
    asyncio.run(store.put_blobs_async(batch))
    bar(len(batch))  # once per batch: a progress update per file costs more than storing it


def _record(entry: _Entry, found: _Scanned) -> ItemRecord:
    # Not validated again: the entry was when it was planned (ids non-empty, annotations and
    # metadata checked) and the scan computed the rest; validating cost 5.9 µs a record, this 3.7.
    return ItemRecord.model_construct(
        id=entry.id,
        blob=found.sha,
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

    def __call__(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def grow(self, n: int) -> None:
        self._total += n
        if self._progress is not None and self._task is not None:
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
