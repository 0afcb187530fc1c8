"""The ``sluicegate`` command line, in-process (typer's CliRunner) and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import PngWriter, S3Server
from .cli import fails, ok, run


def _fails(*args: str) -> str:
    """Runs a command that must fail; returns its message."""
    return fails(*args, one_line=False)[1]


def _row(table: str, key: str) -> list[str]:
    """The cells after ``key`` on the line of a printed table that starts with it."""
    [line] = [line for line in table.splitlines() if line.startswith(key + " ")]
    return line[len(key) :].split()


def _dataset(tmp_path: Path, write_png: PngWriter) -> tuple[Path, Path]:
    """A COCO file over two images, one car and one traffic light, plus a JSONL with metadata."""
    images = tmp_path / "images"
    write_png(images / "a.png", 20, 10, seed=1)
    write_png(images / "b.png", 30, 30, seed=2)
    ann = tmp_path / "instances.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "traffic light"}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
                    {"id": 2, "image_id": 2, "category_id": 2, "bbox": [1, 1, 5, 5]},
                    {"id": 3, "image_id": 2, "category_id": 2, "bbox": [2, 2, 5, 5]},
                ],
            }
        )
    )
    lines = tmp_path / "meta.jsonl"
    lines.write_text(
        json.dumps({"path": "images/a.png", "id": "a.png", "labels": ["car"], "metadata": {"split": "train"}})
        + "\n"
        + json.dumps({"path": "images/b.png", "id": "b.png", "metadata": {"split": "val", "score": 0.5}})
    )
    return ann, images


@pytest.mark.parametrize(
    "command",
    [[], ["dataset"], ["dataset", "import"], ["dataset", "log"], ["dataset", "show"], ["dataset", "query"]],
)
def test_every_command_has_help(command: list[str]) -> None:
    out = ok(*command, "--help")
    assert "Usage" in out
    assert "--help" in out


def test_import_log_show_query(tmp_path: Path, write_png: PngWriter) -> None:
    ann, images = _dataset(tmp_path, write_png)
    store = str(tmp_path / "store")
    out = ok("dataset", "import", "-f", "coco", "--annotations", str(ann), "--images", str(images), store)
    assert out.strip() == "1"
    code, out, err = run(
        "dataset", "import", "-f", "coco", "--annotations", str(ann), "--images", str(images), store
    )
    assert (code, out.strip()) == (0, "1")
    assert "no new version" in err
    out = ok(
        "dataset", "import", "--format", "jsonl", "-m", "add splits", str(tmp_path / "meta.jsonl"), store
    )
    assert out.strip() == "2"

    log = ok("dataset", "log", store)
    lines = [line.split() for line in log.strip().splitlines()]
    assert lines[0][:3] == ["version", "items", "created"]
    assert [row[:2] for row in lines[1:]] == [["2", "2"], ["1", "2"]]
    assert "add splits" in log

    show = ok("dataset", "show", store)
    assert "version 2" in show
    assert "2 items" in show
    assert _row(show, "labels.car") == ["1", "1"]
    assert _row(show, "meta.score") == ["float", "1"]
    assert _row(show, 'labels."traffic light"') == ["0", "0"]  # v2 replaced b.png, which had it
    assert _row(show, "meta.split") == ["string", "2"]
    show_v1 = ok("dataset", "show", store, "--version", "1")
    assert _row(show_v1, 'labels."traffic light"') == ["1", "2"]  # one item, two instances
    assert "meta.coco_id" in show_v1

    assert ok("dataset", "query", store, 'meta.split = "val"', "--count").strip() == "1"
    assert ok("dataset", "query", store, "labels.car >= 1", "--ids").split() == ["a.png"]
    assert ok("dataset", "query", store, 'labels."traffic light" >= 2', "-v", "1", "--ids").split() == [
        "b.png"
    ]
    summary = ok("dataset", "query", store, "file.width >= 10", "--limit", "1")
    assert "2 of 2 items match in version 2" in summary
    assert "and 1 more" in summary


def test_imagefolder_import_with_progress(tmp_path: Path, write_png: PngWriter) -> None:
    write_png(tmp_path / "pets" / "cat" / "x.png")
    code, out, err = run(
        "dataset", "import", "-f", "imagefolder", str(tmp_path / "pets"), str(tmp_path / "s")
    )
    assert (code, out.strip()) == (0, "1")
    assert "scanning" in err
    assert "1 items imported" in err


def test_errors_are_one_line_and_exit_1(tmp_path: Path, write_png: PngWriter) -> None:
    ann, images = _dataset(tmp_path, write_png)
    store = str(tmp_path / "store")
    assert "has no versions yet" in _fails("dataset", "log", store)
    assert "has no versions yet" in _fails("dataset", "show", store)
    ok("dataset", "import", "-f", "coco", "--annotations", str(ann), "--images", str(images), store)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"path": "images/a.png"}\n{"path": \n')
    for err in [
        _fails("dataset", "import", "-f", "jsonl", str(broken), store),
        _fails("dataset", "show", store, "--version", "9"),
        _fails("dataset", "query", store, "labels.car > 0", "--count", "--ids"),
        _fails("dataset", "import", "-f", "jsonl", "--annotations", str(ann), str(broken), store),
        _fails("dataset", "import", "-f", "coco", "--annotations", str(ann), store),
        _fails("dataset", "log", "ftp://nowhere/x"),
    ]:
        assert len(err.strip().splitlines()) == 1, err
    assert "broken.jsonl:2: not valid JSON" in _fails("dataset", "import", "-f", "jsonl", str(broken), store)
    query_err = _fails("dataset", "query", store, "labels.cra > 0")
    first, text, caret = query_err.rstrip("\n").splitlines()
    assert "did you mean 'labels.car'" in first
    assert caret.index("^") == text.index("labels.cra")
    assert run("dataset", "import", "-f", "parquet", store)[0] == 2  # usage errors are click's (exit 2)


@pytest.mark.integration
def test_s3_store_via_endpoint_option(s3_env: S3Server, tmp_path: Path, write_png: PngWriter) -> None:
    write_png(tmp_path / "pets" / "cat" / "x.png")
    write_png(tmp_path / "pets" / "dog" / "y.png", seed=3)
    uri = f"s3://{s3_env.create_bucket()}/pets"
    endpoint = os.environ.pop("AWS_ENDPOINT_URL")  # must come from --endpoint, keys from the environment
    args = ["--endpoint", endpoint, "--region", "us-east-1"]
    assert (
        ok("dataset", "import", "-f", "imagefolder", "--no-progress", *args, str(tmp_path / "pets"), uri)
        == "1\n"
    )
    assert ok("dataset", "query", *args, uri, "labels.dog >= 1", "--ids").split() == ["dog/y.png"]
    assert "2 items" in ok("dataset", "show", *args, uri)


def test_real_subprocess(tmp_path: Path, write_png: PngWriter, venv_bin: Path) -> None:
    write_png(tmp_path / "pets" / "cat" / "x.png")
    exe = str(venv_bin / "sluicegate")
    store = str(tmp_path / "store")
    done = subprocess.run(
        [exe, "dataset", "import", "--format", "imagefolder", str(tmp_path / "pets"), store],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    done = subprocess.run(
        [exe, "dataset", "query", store, "labels.cat >= 1", "--count"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    done = subprocess.run(
        [exe, "dataset", "query", store, "labels.cat >= 'x'"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: type mismatch")
    assert "Traceback" not in done.stderr
