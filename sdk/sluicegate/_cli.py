"""The ``sluicegate`` command line: import datasets and look at their versions, contents and slices.

``preview`` draws a slice as a picture (:mod:`._preview` draws; this module fetches and writes).

Every command exits non-zero with a one-line cause on stderr when something is wrong (a query error
adds the query with a caret under the offending column).
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
import typer
from PIL import Image
from rich.bar import Bar
from rich.console import Console
from rich.table import Table

from sluicegate._exceptions import ConfigError, IntegrityError, NotFoundError, QueryError, SluicegateError
from sluicegate._importers import Format, import_dataset
from sluicegate._preview import class_color, render_grid
from sluicegate._source import Item, ListRows
from sluicegate.core import ledger as _ledger
from sluicegate.core.manifest import LABEL_PREFIX, META_PREFIX, query_fields
from sluicegate.core.query import select_rows
from sluicegate.core.store import S3Options, Store

app = typer.Typer(
    name="sluicegate",
    help="Versioned, access-controlled training datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Import datasets and inspect their versions and slices.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
ledger_app = typer.Typer(
    help="What training runs consumed: every run and epoch that read an item, a run's exact items.",
    no_args_is_help=True,
)
app.add_typer(ledger_app, name="ledger")

# markup off: ids, messages and queries are user text and may contain [brackets].
_out = Console(highlight=False, markup=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)

Endpoint = Annotated[
    str | None,
    typer.Option(help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL); keys come from AWS_* env."),
]
Region = Annotated[str | None, typer.Option(help="S3 region (default: AWS_REGION or us-east-1).")]
VersionOpt = Annotated[int | None, typer.Option("--version", "-v", help="Version to read (default: latest).")]


@contextmanager
def _errors() -> Iterator[None]:
    """Turn sluicegate's errors into a short message and exit status 1 (the CLI's only error edge)."""
    try:
        yield
    except QueryError as exc:
        _err.print(f"error: {exc}")
        raise typer.Exit(1) from None
    except SluicegateError as exc:
        first = str(exc).strip().splitlines()
        _err.print(f"error: {first[0] if first else type(exc).__name__}")
        raise typer.Exit(1) from None


def _store(uri: str, endpoint: str | None, region: str | None) -> Store:
    return Store(uri, S3Options(endpoint=endpoint, region=region))


@dataset_app.command("import")
def import_command(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE... URI",
            help="Image folders or JSONL files (nothing, for COCO), then the dataset store's URI.",
        ),
    ],
    format: Annotated[Format, typer.Option("--format", "-f", help="Input format.")],
    annotations: Annotated[
        list[Path] | None, typer.Option(help="COCO instances JSON file (repeatable).")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="COCO image directory.")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Version message.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars on stderr.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Threads that read, hash and store files (default: one per CPU for a local store, "
            "32 for an object store, each with one upload in flight).",
        ),
    ] = None,
    allow: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow",
            help="Also read files under this directory (repeatable); by default only under the folders, "
            "the JSONL files' directories or the COCO --images directory.",
        ),
    ] = None,
    endpoint: Endpoint = None,
    region: Region = None,
) -> None:
    """Import SOURCE... into the dataset at URI and print the version that holds the items.

    Examples: `sluicegate dataset import -f imagefolder ./pets ./store`,
    `sluicegate dataset import -f coco --annotations instances.json --images ./images s3://bucket/coco`.
    """
    with _errors():
        *sources, uri = args
        if format is Format.COCO:
            sources = [*map(str, annotations or []), *sources]
        elif annotations:
            raise ConfigError("--annotations applies to --format coco only")
        result = import_dataset(
            format,
            sources,
            uri,
            images=images,
            s3=S3Options(endpoint=endpoint, region=region),
            message=message,
            progress=progress,
            workers=workers,
            allow=allow or (),
        )
        if result.committed:
            _err.print(
                f"version {result.version}: {result.items} items imported "
                f"({result.blobs_uploaded} files uploaded, {result.blobs_present} already stored)"
            )
        else:
            _err.print(f"version {result.version} already holds these {result.items} items; no new version")
        _out.print(result.version)


@dataset_app.command("log")
def log_command(uri: str, endpoint: Endpoint = None, region: Region = None) -> None:
    """List the versions of the dataset at URI: number, items, date and message."""
    with _errors():
        infos = _store(uri, endpoint, region).log()
        if not infos:
            raise NotFoundError(f"{uri} has no versions yet; import data into it first")
        _print_table(
            ("version", "items", "created (UTC)", "message"),
            [(i.version, i.items, f"{i.created_at:%Y-%m-%d %H:%M:%S}", i.message) for i in reversed(infos)],
        )


@dataset_app.command("show")
def show_command(
    uri: str,
    version: VersionOpt = None,
    chart: Annotated[
        bool, typer.Option("--chart", help="Also draw the label counts as bars: items and instances.")
    ] = False,
    endpoint: Endpoint = None,
    region: Region = None,
) -> None:
    """Summarise one version: item count, label histogram, metadata keys and their types."""
    with _errors():
        manifest, info = _store(uri, endpoint, region).manifest(version)
        _out.print(
            f"version {info.version} of {uri}: {manifest.num_rows} items, "
            f"created {info.created_at:%Y-%m-%d %H:%M:%S} UTC"
        )
        types = pc.value_counts(manifest.column("media_type")).to_pylist()
        _out.print("file types: " + ", ".join(f"{t['values']} ({t['counts']})" for t in types))
        _print_table(("label (query as labels.NAME)", "items", "instances"), _label_rows(manifest))
        _print_table(("metadata (query as meta.KEY)", "type", "items with a value"), _meta_rows(manifest))
        if chart:
            _print_label_chart(manifest)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Aligned plain-text columns, one line per row (never wrapped or cut, so it greps and pipes)."""
    cells = [list(headers), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    for row in cells:
        _out.print("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]).rstrip())


def _label_counts(manifest: pa.Table) -> list[tuple[str, int, int]]:
    """(label column, items that carry the label, instances of it), in manifest column order."""
    out: list[tuple[str, int, int]] = []
    for col in manifest.column_names:
        if col.startswith(LABEL_PREFIX):
            counts = manifest.column(col)
            items = pc.sum(pc.greater(counts, 0)).as_py() or 0
            out.append((col, items, pc.sum(counts).as_py() or 0))
    return out


def _label_rows(manifest: pa.Table) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = [(_field_text(c), items, n) for c, items, n in _label_counts(manifest)]
    return rows or [("(no labels)", "", "")]


def _print_label_chart(manifest: pa.Table) -> None:
    """Horizontal bars per label: items out of all items, instances against the most frequent label."""
    counts = _label_counts(manifest)
    _out.print()
    if not counts:
        _out.print("labels: (no labels)")
        return
    most = max(instances for _, _, instances in counts) or 1
    _out.print(
        f"labels: items carrying each (bar out of all {manifest.num_rows}), "
        "instances (bar against the most frequent)"
    )
    names = [" " + col[len(LABEL_PREFIX) :] for col, _, _ in counts]
    items_texts = [_plural(items, "item") for _, items, _ in counts]
    instances_texts = [_plural(instances, "instance") for _, _, instances in counts]
    # Indented plain names: no chart line starts like a table row (`grep '^labels.car '` finds one line).
    # The bars take what the terminal leaves, so names and counts are not cut; 4: the column gaps.
    text_width = 4 + sum(max(map(len, texts)) for texts in (names, items_texts, instances_texts))
    bar_width = max(3, min(24, (_out.width - text_width) // 2))
    chart = Table.grid(padding=(0, 1))
    for justify in ("left", "left", "right", "left", "right"):
        chart.add_column(justify=justify, no_wrap=True)
    for name, (col, items, instances), items_text, instances_text in zip(
        names, counts, items_texts, instances_texts, strict=True
    ):
        colour = "rgb({},{},{})".format(*class_color(col[len(LABEL_PREFIX) :]))  # as in `preview`
        chart.add_row(
            name,
            Bar(max(manifest.num_rows, 1), 0, items, width=bar_width, color=colour),
            items_text,
            Bar(most, 0, instances, width=bar_width, color=colour),
            instances_text,
        )
    _out.print(chart)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _meta_rows(manifest: pa.Table) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for path, (col, ftype) in query_fields(manifest.schema).items():
        if col.startswith(META_PREFIX):
            out.append((_field_text(path), ftype.value, manifest.num_rows - manifest.column(col).null_count))
    return out or [("(no metadata)", "", "")]


_BARE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")  # what the query tokenizer reads unquoted


def _field_text(column: str) -> str:
    """``labels.car``, or ``labels."traffic light"`` when the name is not a bare identifier."""
    namespace, name = column.split(".", 1)
    if _BARE_NAME.fullmatch(name):
        return column
    return namespace + "." + _quoted(name)


def _quoted(text: str) -> str:
    """``text`` as a double-quoted string of the query language."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataset_app.command("query")
def query_command(
    uri: str,
    query: Annotated[
        str, typer.Argument(help="Slice query, e.g. 'labels.car >= 1 and meta.split = \"train\"'.")
    ],
    version: VersionOpt = None,
    count: Annotated[bool, typer.Option("--count", help="Print only the number of matching items.")] = False,
    ids: Annotated[bool, typer.Option("--ids", help="Print every matching id, one per line.")] = False,
    limit: Annotated[int, typer.Option(help="Ids to list in the default summary.")] = 10,
    endpoint: Endpoint = None,
    region: Region = None,
) -> None:
    """Run a slice QUERY against a version of the dataset at URI."""
    with _errors():
        if count and ids:
            raise ConfigError("--count and --ids exclude each other; pick one")
        manifest, info = _store(uri, endpoint, region).manifest(version)
        positions = select_rows(manifest, [query])
        matched = manifest.column("id").take(positions).to_pylist()
        if count:
            _out.print(len(matched))
        elif ids:
            for item_id in matched:
                _out.print(item_id)
        else:
            _out.print(f"{len(matched)} of {manifest.num_rows} items match in version {info.version}")
            for item_id in matched[:limit]:
                _out.print(f"  {item_id}")
            if len(matched) > limit:
                _out.print(f"  ... and {len(matched) - limit} more (--ids lists them all)")


@dataset_app.command("preview")
def preview_command(
    uri: str,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Picture to write; its extension names the format (.png).")
    ],
    query: Annotated[
        str | None, typer.Argument(help="Slice query (default: every item), e.g. 'labels.car >= 1'.")
    ] = None,
    version: VersionOpt = None,
    limit: Annotated[
        int, typer.Option(min=1, max=256, help="Items to draw: the first matches, in dataset order.")
    ] = 16,
    columns: Annotated[int | None, typer.Option(min=1, help="Tiles per row (default: square grid).")] = None,
    size: Annotated[int, typer.Option(min=32, max=1024, help="Tile width and height in pixels.")] = 256,
    endpoint: Endpoint = None,
    region: Region = None,
) -> None:
    """Draw the items of a slice QUERY as a grid of images with their boxes and class names.

    Example: `sluicegate dataset preview ./store 'labels.car >= 2' -o cars.png --limit 9`.
    """
    with _errors():
        image_format = _picture_format(output)  # before any fetching: a bad -o fails at once
        store = _store(uri, endpoint, region)
        manifest, info = store.manifest(version)
        positions = select_rows(manifest, [query] if query else [])
        if len(positions) == 0 and query:
            raise NotFoundError(
                f"no item of version {info.version} matches {query!r}: nothing to draw; "
                "check the query with `sluicegate dataset query URI QUERY --count`"
            )
        if len(positions) == 0:
            raise NotFoundError(f"version {info.version} of {uri} has no items: nothing to draw")
        rows = manifest.take(positions[:limit]).to_pylist()
        for row in rows:  # before fetching: a slice of audio or text fails without downloading it
            if not str(row["media_type"]).startswith("image/"):
                raise ConfigError(
                    f"item {row['id']!r} is {row['media_type']}, not an image; preview draws images: "
                    f'narrow the query, e.g. add `and file.type = "image/jpeg"`'
                )
        with ThreadPoolExecutor(max_workers=8) as pool:  # an object store's latency, overlapped
            blobs = list(pool.map(store.get_blob, [str(row["blob"]) for row in rows]))
        shared = ListRows(rows)  # the items' manifest rows, read by Item as the SDK's sources hand them out
        items = [
            Item(str(row["id"]), blob, shared, i)
            for i, (row, blob) in enumerate(zip(rows, blobs, strict=True))
        ]
        picture = render_grid(items, [_decoded(item) for item in items], columns=columns, size=size)
        _write_picture(picture, output, image_format)
        more = " (raise --limit to draw more)" if len(positions) > len(items) else ""
        _err.print(
            f"drew {len(items)} of {len(positions)} matching items of version {info.version} "
            f"into {output}{more}"
        )
        _out.print(str(output))


def _picture_format(path: Path) -> str:
    """The Pillow format that ``path``'s extension names, after checking that it can be written."""
    if path.is_dir():
        raise ConfigError(f"-o {path} is a directory; name a file in it, e.g. {path / 'preview.png'}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        what = f"{path.suffix} is not an image format" if path.suffix else "the name has no extension"
        raise ConfigError(f"-o {path}: {what}; end it in .png or .jpg")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path}: {parent} is not a directory; create it or pick another -o")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {path}: no permission to write in {parent}; pick another -o")
    return fmt


def _decoded(item: Item) -> Image.Image:
    try:
        return item.image()
    except ConfigError as exc:
        raise ConfigError(f"{exc}; leave it out, e.g. add `and file.id != {_quoted(item.id)}`") from exc
    except Image.DecompressionBombError as exc:  # not an OSError: Item.image() lets it through
        raise ConfigError(
            f"item {item.id!r} is too large to decode safely ({exc}); leave it out, "
            f"e.g. add `and file.id != {_quoted(item.id)}`"
        ) from exc


def _write_picture(picture: Image.Image, path: Path, image_format: str) -> None:
    buf = io.BytesIO()
    try:
        picture.save(buf, format=image_format)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot write {path} as {image_format}: {exc}; use .png or .jpg") from exc
    try:
        path.write_bytes(buf.getvalue())
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; pick another -o") from exc


# -- the ledger ----------------------------------------------------------------------------------------


@ledger_app.command("runs")
def ledger_runs_command(
    uri: str,
    item: Annotated[
        str | None,
        typer.Option("--item", help="List every run, rank, epoch and version that consumed this item id."),
    ] = None,
    chains: Annotated[
        bool, typer.Option("--chains", help="List every chain instead: its records and its head's sha256.")
    ] = False,
    endpoint: Endpoint = None,
    region: Region = None,
) -> None:
    """List the runs recorded in the ledger of the dataset at URI, each chain verified.

    With --item ID: every (run, rank, epoch, version) that consumed the item, including runs on versions
    that no longer hold it. Exits 1 when a chain does not verify (naming the record), after printing.
    """
    with _errors():
        store = _store(uri, endpoint, region)
        latest = store.resolve(None)  # a clear error for a URI that holds no dataset
        if item is not None:
            _print_item_uses(store, uri, item, latest)
            return
        summaries = _ledger.summarize(store)
        if not summaries:
            _err.print(
                f"no runs recorded in the ledger of {uri}; open the dataset with ledger=RUN to record one"
            )
            return
        if chains:
            _print_table(
                ("run", "chain", "records", "items", "head (sha256 of the last record)", "status"),
                [
                    (
                        c.run,
                        c.name,
                        len(c.records),
                        sum(r.items for r in c.records),
                        c.head or "-",
                        "ok" if c.broken is None else "BROKEN",
                    )
                    for summary in summaries
                    for c in summary.chains
                ],
            )
        else:
            _print_table(
                ("run", "ranks", "versions", "epochs", "items", "chains", "last record", "status"),
                [
                    (
                        s.run,
                        ",".join(sorted(s.ranks, key=_rank_key)) or "-",
                        _spans(s.versions),
                        _spans(s.epochs),
                        s.items,
                        len(s.chains),
                        s.last or "-",
                        "ok" if not s.broken else "BROKEN",
                    )
                    for s in summaries
                ],
            )
        _raise_broken([b for s in summaries for b in s.broken])


def _print_item_uses(store: Store, uri: str, item: str, latest: int) -> None:
    uses, broken, resolver = _ledger.item_uses(store, item)
    in_latest = resolver.row_of(latest, item) is not None
    if uses:
        _print_table(
            ("run", "rank", "epoch", "version", "times", "last consumed"),
            [(u.run, u.rank, u.epoch, u.version, u.times, u.last) for u in uses],
        )
        if not in_latest:
            _err.print(
                f"item {item!r} is not in version {latest}, the latest: these runs trained on it in the "
                "versions they pinned"
            )
    elif not in_latest and not any(resolver.row_of(v, item) is not None for v in range(1, latest)):
        raise NotFoundError(
            f"no version of {uri} has an item {item!r}; check the id (sluicegate dataset query)"
        )
    else:
        _err.print(f"no recorded run consumed item {item!r}")
    _raise_broken(broken)


@ledger_app.command("items")
def ledger_items_command(
    uri: str,
    run: str,
    rank: Annotated[
        str | None,
        typer.Option("--rank", help="Only this rank (as `ledger runs` lists them, e.g. 0 or 3.1)."),
    ] = None,
    epoch: Annotated[int | None, typer.Option("--epoch", min=0, help="Only this epoch.")] = None,
    long: Annotated[
        bool, typer.Option("--long", "-l", help="Tab-separated rank, epoch, version, place and id per line.")
    ] = False,
    endpoint: Endpoint = None,
    region: Region = None,
) -> None:
    """Print the exact item ids RUN consumed from the dataset at URI, one per line.

    Per rank and epoch, in that epoch's order (a run's DataLoader workers put back together); random
    access (ds[i], a sampler) in the order it asked. `--long` adds each item's rank, epoch, version and
    place (its index in the epoch order). Example: `sluicegate ledger items ./store run-7 --epoch 0`.
    """
    with _errors():
        store = _store(uri, endpoint, region)
        store.resolve(None)
        passages = _ledger.run_items(store, run, rank, epoch)
        if not passages:
            wanted = " and ".join(
                w
                for w in (f"rank {rank}" if rank else "", f"epoch {epoch}" if epoch is not None else "")
                if w
            )
            summary = next(s for s in _ledger.summarize(store) if s.run == run)
            raise NotFoundError(
                f"run {run} has no records of {wanted}; it has ranks "
                f"{','.join(sorted(summary.ranks, key=_rank_key))} and epochs {_spans(summary.epochs)}"
            )
        lines = ["rank\tepoch\tversion\tplace\tid"] if long else []
        for p in passages:
            if long:
                lines.extend(
                    f"{p.rank}\t{p.epoch}\t{p.version}\t{place}\t{item_id}"
                    for place, item_id in zip(p.places.tolist(), p.ids, strict=True)
                )
            else:
                lines.extend(p.ids)
        sys.stdout.write("\n".join(lines) + "\n")  # rich per line costs more than the rest together
        _err.print(
            f"run {run}: {sum(len(p.ids) for p in passages)} items in "
            + ", ".join(
                f"rank {p.rank} epoch {p.epoch} (version {p.version}, {len(p.ids)})" for p in passages
            )
        )


def _rank_key(rank: str) -> tuple[int, ...]:
    return tuple(int(part) for part in rank.split("."))


def _spans(values: set[int]) -> str:
    """``{0, 1, 2, 5}`` as ``0-2,5``."""
    out: list[str] = []
    for v in sorted(values):
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = out[-1].split("-")[0] + f"-{v}"
        else:
            out.append(str(v))
    return ",".join(out) or "-"


def _raise_broken(broken: Sequence[str]) -> None:
    if broken:
        more = f" (and {len(broken) - 1} more broken chains)" if len(broken) > 1 else ""
        raise IntegrityError(broken[0] + more)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as exc:  # how typer ends every command, errors and --help included
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # The command is done and its output written: end without the interpreter's teardown, during which
    # native libraries' thread pools (Arrow, obstore's runtime) have aborted a finished command with
    # SIGABRT ("terminate called without an active exception") on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
