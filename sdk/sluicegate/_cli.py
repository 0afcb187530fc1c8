"""The ``sluicegate`` command line: import datasets and look at their versions, contents and slices.

Every command exits non-zero with a one-line cause on stderr when something is wrong (a query error
adds the query with a caret under the offending column).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
import typer
from rich.console import Console

from sluicegate._exceptions import ConfigError, NotFoundError, QueryError, SluicegateError
from sluicegate._importers import Format, import_dataset
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
    uri: str, version: VersionOpt = None, endpoint: Endpoint = None, region: Region = None
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


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Aligned plain-text columns, one line per row (never wrapped or cut, so it greps and pipes)."""
    cells = [list(headers), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    for row in cells:
        _out.print("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]).rstrip())


def _label_rows(manifest: pa.Table) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for col in manifest.column_names:
        if col.startswith(LABEL_PREFIX):
            counts = manifest.column(col)
            items = pc.sum(pc.greater(counts, 0)).as_py() or 0
            out.append((_field_text(col), items, pc.sum(counts).as_py() or 0))
    return out or [("(no labels)", "", "")]


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
    return namespace + '."' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
