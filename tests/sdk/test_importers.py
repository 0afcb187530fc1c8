"""Importers: COCO, image folders and JSON Lines, on a local store and on the S3 server; malformed
input never commits; interrupted imports resume by uploading only what is missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sluicegate import Annotation, ImportError_, Store, StoreError, _importers, import_dataset
from sluicegate.core import store as _store
from sluicegate.core.manifest import rows
from sluicegate.core.query import select_rows

from ..conftest import Backend, PngWriter, S3Server

# -- COCO ------------------------------------------------------------------------------------------


def _coco(tmp_path: Path, write_png: PngWriter) -> tuple[Path, Path, dict[str, Any]]:
    """Three images (one without annotations), three categories (one name with a space)."""
    images = tmp_path / "images"
    write_png(images / "a.png", 40, 30, seed=1)
    write_png(images / "sub" / "b.png", 20, 20, seed=2)
    write_png(images / "c.png", 50, 10, seed=3)
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/b.png", "width": 20, "height": 20},
            {"id": 3, "file_name": "c.png"},
        ],
        "categories": [
            {"id": 1, "name": "car", "supercategory": "vehicle"},
            {"id": 2, "name": "traffic light"},
            {"id": 3, "name": "person"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5], "iscrowd": 0,
             "segmentation": [[1, 2, 11, 2, 11, 7]], "area": 50},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [20, 10, 19.5, 20], "iscrowd": 0,
             "segmentation": [[20, 10, 39, 10, 39, 30, 20, 30], [21, 11, 22, 11, 22, 12]]},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 8], "iscrowd": 1,
             "segmentation": {"counts": [0, 32, 1168], "size": [30, 40]}},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0,
             "segmentation": []},
        ],
    }  # fmt: skip
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    return ann, images, coco


def _rewrite(ann: Path, coco: dict[str, Any]) -> Path:
    ann.write_text(json.dumps(coco, indent=1))
    return ann


def test_coco_import(store_backend: Backend, tmp_path: Path, write_png: PngWriter) -> None:
    ann, images, _ = _coco(tmp_path, write_png)
    result = import_dataset(
        "coco", ann, store_backend.uri, images=images, s3=store_backend.s3, message="coco"
    )
    assert (result.version, result.committed, result.items, result.blobs_uploaded) == (1, True, 3, 3)
    store = store_backend.store()
    table, info = store.manifest()
    assert info.message == "coco"
    items = {r.id: r for r in rows(table)}
    assert list(items) == ["a.png", "sub/b.png", "c.png"]
    a = items["a.png"]
    assert (a.width, a.height, a.media_type) == (40, 30, "image/png")
    assert a.size == (images / "a.png").stat().st_size
    assert store.get_blob(a.blob) == (images / "a.png").read_bytes()
    assert a.labels == {"car": 2, "traffic light": 1}
    assert a.metadata == {"coco_id": 1}
    assert a.annotations[0] == Annotation(
        label="car", bbox=(1, 2, 10, 5), polygon=[[1, 2, 11, 2, 11, 7]], attributes={"coco_id": 10}
    )
    assert a.annotations[1].polygon == [[20, 10, 39, 10, 39, 30, 20, 30], [21, 11, 22, 11, 22, 12]]
    crowd = a.annotations[2]
    assert (crowd.iscrowd, crowd.polygon, crowd.bbox) == (True, None, (0, 0, 4, 8))
    assert crowd.attributes == {"coco_id": 12, "segmentation": "rle"}
    assert items["sub/b.png"].annotations[0].polygon is None  # empty segmentation list
    assert items["c.png"].labels == {}
    assert items["c.png"].annotations == []
    assert select_rows(table, ['labels."traffic light" >= 1']).to_pylist() == [0]
    assert select_rows(table, ["labels.car >= 1 or labels.person >= 1"]).to_pylist() == [0, 1]
    assert select_rows(table, ["file.width >= 40"]).to_pylist() == [0, 2]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["annotations"][0].update(category_id=9), r"annotation 10: unknown category_id 9"),
        (lambda c: c["annotations"][1].update(image_id=99), r"annotation 11: unknown image_id 99"),
        (lambda c: c["annotations"][0].update(bbox=[35, 2, 10, 5]), r"image 1 \(a\.png\): box .* outside"),
        (lambda c: c["images"][1].update(file_name="gone.png"), r"image 2 \(gone\.png\): .*does not exist"),
        (lambda c: c["images"][0].update(width=41), r"image 1 \(a\.png\): declared size 41x30 but"),
        (lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3]]), r"annotation 10: a polygon needs"),
        (lambda c: c["annotations"][2].update(bbox="wide"), r"annotations\[2\] \(id 12\)\.bbox"),
        (lambda c: c["categories"].append({"id": 7, "name": "car"}), r"category 7 repeats the name 'car'"),
        (lambda c: c["images"].append({"id": 4, "file_name": "a.png"}), r"duplicate item id 'a\.png'"),
        (lambda c: c.pop("categories"), r"categories: Field required"),
        (lambda c: c["annotations"][3].update(bbox=[5, 5, -1, 2]), r"annotation 13: bbox: .*must be >= 0"),
    ],
)
def test_malformed_coco_never_commits(
    tmp_path: Path, write_png: PngWriter, mutate: Any, message: str
) -> None:
    ann, images, coco = _coco(tmp_path, write_png)
    mutate(coco)
    store = Store(tmp_path / "store")
    with pytest.raises(ImportError_, match=message) as err:
        import_dataset("coco", _rewrite(ann, coco), store.uri, images=images)
    assert str(ann) in str(err.value)
    assert "\n" not in str(err.value)
    assert store.latest_version() == 0
    assert store.existing_blobs() == set()  # validation happens before any upload


def test_coco_broken_json_names_the_line(tmp_path: Path, write_png: PngWriter) -> None:
    ann, images, _ = _coco(tmp_path, write_png)
    ann.write_text('{\n  "images": [\n    {"id": 1,,}\n  ]\n}')
    with pytest.raises(ImportError_, match=rf"{ann}:3: not valid JSON"):
        import_dataset("coco", ann, tmp_path / "store", images=images)


def test_coco_needs_images_dir(tmp_path: Path, write_png: PngWriter) -> None:
    ann, _, _ = _coco(tmp_path, write_png)
    with pytest.raises(ImportError_, match="needs the image directory"):
        import_dataset("coco", ann, tmp_path / "store")
    with pytest.raises(ImportError_, match="not a directory"):
        import_dataset("coco", ann, tmp_path / "store", images=tmp_path / "nope")


# -- image folder ----------------------------------------------------------------------------------


def _folder(root: Path, write_png: PngWriter) -> Path:
    write_png(root / "cat" / "a.png", seed=1)
    write_png(root / "cat" / "b.png", 16, 8, seed=2)
    (root / "dog").mkdir()
    Image.new("RGB", (12, 9), "red").save(root / "dog" / "c.jpg")
    (root / ".DS_Store").write_bytes(b"\0\0junk")
    (root / "cat" / ".hidden.png").write_bytes(b"not looked at")
    return root


def test_imagefolder_import(store_backend: Backend, tmp_path: Path, write_png: PngWriter) -> None:
    root = _folder(tmp_path / "pets", write_png)
    result = import_dataset("imagefolder", [root], store_backend.uri, s3=store_backend.s3, progress=True)
    assert (result.version, result.items, result.blobs_uploaded) == (1, 3, 3)
    items = {r.id: r for r in rows(store_backend.store().manifest()[0])}
    assert list(items) == ["cat/a.png", "cat/b.png", "dog/c.jpg"]
    assert items["cat/b.png"].labels == {"cat": 1}
    assert items["cat/b.png"].annotations == [Annotation(label="cat")]
    assert (items["cat/b.png"].width, items["cat/b.png"].height) == (16, 8)
    assert (items["dog/c.jpg"].media_type, items["dog/c.jpg"].width) == ("image/jpeg", 12)


def test_reimport_is_idempotent_and_changes_replace_in_place(tmp_path: Path, write_png: PngWriter) -> None:
    root = _folder(tmp_path / "pets", write_png)
    store = tmp_path / "store"
    import_dataset("imagefolder", root, store)
    again = import_dataset("imagefolder", root, store)
    assert (again.version, again.committed, again.blobs_uploaded, again.blobs_present) == (1, False, 0, 3)
    write_png(root / "cat" / "a.png", seed=99)  # new content for an existing id
    write_png(root / "dog" / "d.png", seed=5)
    changed = import_dataset("imagefolder", root, store)
    assert (changed.version, changed.committed, changed.blobs_uploaded) == (2, True, 2)
    table = Store(store).manifest()[0]
    assert table.column("id").to_pylist() == ["cat/a.png", "cat/b.png", "dog/c.jpg", "dog/d.png"]
    assert Store(store).manifest(1)[0].column("blob")[0] != table.column("blob")[0]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: (r / "cat" / "notes.txt").write_text("hello"), r"cat/notes\.txt is not an image"),
        (lambda r: (r / "loose.png").write_bytes(b"x"), r"loose\.png: file outside a class folder"),
    ],
)
def test_malformed_imagefolder_never_commits(
    tmp_path: Path, write_png: PngWriter, setup: Any, message: str
) -> None:
    root = _folder(tmp_path / "pets", write_png)
    setup(root)
    with pytest.raises(ImportError_, match=message):
        import_dataset("imagefolder", root, tmp_path / "store")
    assert Store(tmp_path / "store").latest_version() == 0


def test_empty_or_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportError_, match="no images under"):
        import_dataset("imagefolder", tmp_path / "empty", tmp_path / "store")
    with pytest.raises(ImportError_, match="not a directory"):
        import_dataset("imagefolder", tmp_path / "nope", tmp_path / "store")
    with pytest.raises(ImportError_, match="unknown import format 'tfrecord'"):
        import_dataset("tfrecord", tmp_path, tmp_path / "store")


# -- JSON Lines ------------------------------------------------------------------------------------


def _jsonl(tmp_path: Path, write_png: PngWriter, lines: list[Any]) -> Path:
    write_png(tmp_path / "data" / "img" / "a.png", 30, 20, seed=1)
    write_png(tmp_path / "data" / "img" / "b.png", 10, 10, seed=2)
    file = tmp_path / "data" / "items.jsonl"
    file.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return file


def test_jsonl_import(store_backend: Backend, tmp_path: Path, write_png: PngWriter) -> None:
    file = _jsonl(
        tmp_path,
        write_png,
        [
            {
                "path": "img/a.png",
                "id": "first",
                "labels": ["cat", "cat"],
                "metadata": {"split": "train", "q": 0.9},
            },
            "",
            {
                "path": "img/b.png",
                "annotations": [{"label": "dog", "bbox": [1, 1, 8, 8], "attributes": {"pose": "sit"}}],
                "metadata": {"split": "val", "q": 1, "ok": True},
            },
        ],
    )
    result = import_dataset("jsonl", file, store_backend.uri, s3=store_backend.s3)
    assert result.items == 2
    table = store_backend.store().manifest()[0]
    first, second = rows(table)
    assert (first.id, first.labels, first.metadata) == ("first", {"cat": 2}, {"split": "train", "q": 0.9})
    assert second.id == "img/b.png"
    assert second.annotations == [Annotation(label="dog", bbox=(1, 1, 8, 8), attributes={"pose": "sit"})]
    assert second.metadata == {"split": "val", "q": 1.0, "ok": True}
    assert select_rows(table, ['meta.split = "val" and meta.ok and meta.q >= 1']).to_pylist() == [1]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"path": "img/a.png"}, "{broken", {"path": "img/b.png"}], r"items\.jsonl:2: not valid JSON"),
        (
            [{"path": "img/a.png"}, {"path": "img/b.png", "colour": 1}],
            r"items\.jsonl:2: colour: Extra inputs",
        ),
        ([{"path": "img/a.png", "id": "x"}, {"path": "img/b.png", "id": "x"}], r":2: duplicate item id 'x'"),
        ([{"path": "img/missing.png"}], r"items\.jsonl:1: image file .*missing\.png does not exist"),
        (
            [{"path": "img/b.png", "annotations": [{"label": "d", "bbox": [5, 5, 9, 1]}]}],
            r":1: box .* outside",
        ),
        ([{"path": "img/a.png", "metadata": {"k": [1]}}], r":1: metadata\.k"),
        (
            [{"path": "img/a.png", "metadata": {"k": 1}}, {"path": "img/b.png", "metadata": {"k": "x"}}],
            "mixes",
        ),
        (["   "], r"no items in"),
        ([{"path": "img/a.png", "labels": [""]}], r":1: labels\[0\]: String should have at least 1"),
        (["[1, 2]"], r":1: value: Input should be a valid dictionary"),
    ],
)
def test_malformed_jsonl_never_commits(
    tmp_path: Path, write_png: PngWriter, lines: list[Any], message: str
) -> None:
    file = _jsonl(tmp_path, write_png, lines)
    with pytest.raises(ImportError_, match=message):
        import_dataset("jsonl", file, tmp_path / "store")
    assert Store(tmp_path / "store").latest_version() == 0


def test_metadata_type_conflict_with_the_dataset_never_commits(tmp_path: Path, write_png: PngWriter) -> None:
    store = tmp_path / "store"
    import_dataset("jsonl", _jsonl(tmp_path, write_png, [{"path": "img/a.png", "metadata": {"k": 1}}]), store)
    conflicting = _jsonl(tmp_path, write_png, [{"path": "img/b.png", "metadata": {"k": "one"}}])
    with pytest.raises(ImportError_, match=r"'meta\.k' is int in the dataset but string"):
        import_dataset("jsonl", conflicting, store)
    assert Store(store).latest_version() == 1


def test_many_problems_are_counted_in_one_line(tmp_path: Path, write_png: PngWriter) -> None:
    file = _jsonl(tmp_path, write_png, [{"path": f"img/gone{i}.png"} for i in range(5)])
    with pytest.raises(ImportError_, match=r":1: .*gone0\.png does not exist \(and 4 more problems"):
        import_dataset("jsonl", file, tmp_path / "store")


# -- resuming --------------------------------------------------------------------------------------


def test_resume_uploads_only_missing_blobs(
    store_backend: Backend, tmp_path: Path, write_png: PngWriter
) -> None:
    root = tmp_path / "digits"
    paths = [write_png(root / f"d{i % 3}" / f"{i}.png", 8, 8, seed=i) for i in range(12)]
    store = store_backend.store()
    for path in paths[::2]:  # what an interrupted import left behind
        store.put_blob(path.read_bytes())
    result = import_dataset("imagefolder", root, store_backend.uri, s3=store_backend.s3)
    assert (result.blobs_uploaded, result.blobs_present, result.version) == (6, 6, 1)
    assert store.existing_blobs() == {r.blob for r in rows(store.manifest()[0])}


_IMPORT = "import sys, sluicegate; sluicegate.import_dataset('imagefolder', sys.argv[1], sys.argv[2])"


@pytest.mark.integration
@pytest.mark.slow
def test_killed_import_commits_nothing_and_resumes(
    s3_server: S3Server, tmp_path: Path, write_png: PngWriter
) -> None:
    """A real interruption: SIGKILL the importing process mid-upload (the S3 server is slow enough)."""
    root = tmp_path / "many"
    total = 600
    for i in range(total):
        write_png(root / f"c{i % 4}" / f"{i}.png", 8, 8, seed=i)
    uri = f"s3://{s3_server.create_bucket()}/resume"
    proc = subprocess.Popen(
        [sys.executable, "-c", _IMPORT, str(root), uri],
        env={**os.environ, **s3_server.env},
        stderr=subprocess.PIPE,
    )
    store = Store(uri, s3_server.options)
    deadline = time.monotonic() + 120
    while len(store.existing_blobs()) < 50:
        assert proc.poll() is None, f"import ended before it could be interrupted: {proc.communicate()[1]!r}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = store.existing_blobs()
    time.sleep(0.5)  # the server may still finish requests the killed client had fully sent
    while len(now := store.existing_blobs()) != len(left):
        left = now
        time.sleep(0.5)
    assert 50 <= len(left) < total
    assert store.latest_version() == 0  # nothing half-imported became a version
    result = import_dataset("imagefolder", root, uri, s3=s3_server.options)
    assert (result.blobs_present, result.blobs_uploaded, result.items) == (
        len(left),
        total - len(left),
        total,
    )
    manifest = store.manifest()[0]
    assert store.existing_blobs() == set(manifest.column("blob").to_pylist())
    for sha in list(left)[:20]:
        store.get_blob(sha)  # blobs written before the kill are whole (create-only, verified by hash)


def test_large_and_misnamed_files_are_scanned_alike(
    tmp_path: Path, write_png: PngWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _folder(tmp_path / "pets", write_png)
    png = write_png(tmp_path / "really-a-png.png", 7, 5, seed=4)
    png.rename(root / "dog" / "really-a-png.jpg")  # suffix says JPEG, bytes say PNG
    small = rows(
        Store(tmp_path / "a").manifest(import_dataset("imagefolder", root, tmp_path / "a").version)[0]
    )
    monkeypatch.setattr(_importers, "_READ_WHOLE", 0)  # every file takes the streaming path
    large = rows(
        Store(tmp_path / "b").manifest(import_dataset("imagefolder", root, tmp_path / "b").version)[0]
    )
    assert small == large
    misnamed = next(r for r in small if r.id == "dog/really-a-png.jpg")
    assert (misnamed.media_type, misnamed.width, misnamed.height) == ("image/png", 7, 5)


# -- file scanning ---------------------------------------------------------------------------------


def test_other_formats_are_read_by_pillow_and_fake_headers_are_not_images(
    tmp_path: Path, write_png: PngWriter
) -> None:
    root = tmp_path / "mixed"
    write_png(root / "a" / "p.png", 6, 4, seed=1)
    Image.new("RGB", (9, 3), "blue").save(root / "a" / "t.tiff")  # no header parser: Pillow's job
    result = import_dataset("imagefolder", root, tmp_path / "store")
    items = {r.id: r for r in rows(Store(tmp_path / "store").manifest(result.version)[0])}
    assert (items["a/t.tiff"].media_type, items["a/t.tiff"].width, items["a/t.tiff"].height) == (
        "image/tiff",
        9,
        3,
    )
    fake = root / "a" / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # a PNG signature, then nothing valid
    with pytest.raises(ImportError_, match=r"a/fake\.png is not an image"):
        import_dataset("imagefolder", root, tmp_path / "store")


def test_stores_without_unnamed_files_stage_their_blobs(
    tmp_path: Path, write_png: PngWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filesystems without O_TMPFILE (and other systems) take the staging path: same blobs."""
    root = _folder(tmp_path / "pets", write_png)
    staged_calls: list[str] = []
    link_staged = _store._link_staged

    def counted(tmp: str, target: str, source: Path | bytes) -> None:
        staged_calls.append(target)
        link_staged(tmp, target, source)

    monkeypatch.setattr(_store, "_link_staged", counted)
    fast = import_dataset("imagefolder", root, tmp_path / "fast")
    assert staged_calls == []  # small files: unnamed files linked into blobs/ (Linux)
    monkeypatch.setattr(_store, "_UNNAMED_FILES", False)
    staged = import_dataset("imagefolder", root, tmp_path / "staged")
    assert fast.blobs_uploaded == staged.blobs_uploaded == 3
    assert Store(tmp_path / "fast").existing_blobs() == Store(tmp_path / "staged").existing_blobs()
    for sha in Store(tmp_path / "staged").existing_blobs():
        Store(tmp_path / "staged").get_blob(sha)  # whole: verified against its hash
    assert len(staged_calls) == 3
    assert list((tmp_path / "staged" / "staging").iterdir()) == []


# -- many threads ----------------------------------------------------------------------------------


def _many(root: Path, write_png: PngWriter, n: int) -> Path:
    """``n`` distinct PNGs in 3 class folders, more than one scanning chunk per thread."""
    for i in range(n):
        write_png(root / f"c{i % 3}" / f"{i:03d}.png", 6 + i % 5, 4, seed=100 + i)
    return root


@pytest.mark.parametrize("workers", [1, 4])
def test_threads_change_nothing_but_speed(
    store_backend: Backend, tmp_path: Path, write_png: PngWriter, workers: int
) -> None:
    root = _many(tmp_path / "many", write_png, 3 * _importers._SCAN_CHUNK + 7)
    reference = import_dataset("imagefolder", root, tmp_path / "reference", workers=1)
    result = import_dataset("imagefolder", root, store_backend.uri, s3=store_backend.s3, workers=workers)
    assert (result.items, result.blobs_uploaded, result.blobs_present) == (
        reference.items,
        reference.items,
        0,
    )
    store = store_backend.store()
    assert rows(store.manifest()[0]) == rows(Store(tmp_path / "reference").manifest()[0])  # same order too
    for record in rows(store.manifest()[0])[:: _importers._SCAN_CHUNK // 2]:
        assert store.get_blob(record.blob) == (root / record.id).read_bytes()


def test_concurrent_imports_share_blobs_create_only(tmp_path: Path, write_png: PngWriter) -> None:
    """Two imports of overlapping folders at once, each with several threads: every shared blob is
    stored once and whole, both commit (one on top of the other), nothing is left in staging."""
    root = _many(tmp_path / "many", write_png, 2 * _importers._SCAN_CHUNK)
    other = tmp_path / "other"
    shutil.copytree(root, other)
    write_png(other / "c0" / "extra.png", 9, 9, seed=7)
    store = tmp_path / "store"
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda src: import_dataset("imagefolder", src, store, workers=3), [root, other])
        )
    # Whichever commits second merges into the first; the folder without the extra file may then
    # change nothing (no version), so there are one or two versions, never two claiming one number.
    committed = [r.version for r in results if r.committed]
    assert sorted(committed) == list(range(1, len(committed) + 1))
    assert Store(store).latest_version() == len(committed)
    final = Store(store)
    manifest = rows(final.manifest()[0])
    assert len(manifest) == len(list(root.rglob("*.png"))) + 1  # same ids: the second replaced the first
    assert final.existing_blobs() == {r.blob for r in manifest}
    for sha in final.existing_blobs():
        final.get_blob(sha)  # whole: verified against its hash
    assert list((store / "staging").iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:20]), r"c1/010\.png is not an image .*Truncated"),
        # unreadable (even by root): a link to itself
        (lambda p: (p.unlink(), p.symlink_to(p.name)), r"cannot read .*c1/010\.png \(Too many levels"),
    ],
)
def test_corrupt_or_unreadable_file_commits_nothing_and_resumes(
    tmp_path: Path, write_png: PngWriter, damage: Any, message: str
) -> None:
    """A bad file among many, read by several threads: one clear error naming it, no version, and
    whatever was stored before the problem was seen is whole, so the fixed re-run only adds the rest."""
    root = _many(tmp_path / "many", write_png, 4 * _importers._SCAN_CHUNK)
    bad = root / "c1" / "010.png"
    good = bad.read_bytes()
    damage(bad)
    store = Store(tmp_path / "store")
    with pytest.raises(ImportError_, match=message) as err:
        import_dataset("imagefolder", root, store.uri, workers=4)
    assert "\n" not in str(err.value)
    assert store.latest_version() == 0
    stored = store.existing_blobs()
    for sha in stored:
        store.get_blob(sha)
    bad.unlink()
    bad.write_bytes(good)
    result = import_dataset("imagefolder", root, store.uri, workers=4)
    assert (result.version, result.blobs_present, result.blobs_uploaded) == (
        1,
        len(stored),
        result.items - len(stored),
    )


def test_store_error_stops_every_thread_and_commits_nothing(
    tmp_path: Path, write_png: PngWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _many(tmp_path / "many", write_png, 4 * _importers._SCAN_CHUNK)
    calls: list[str] = []
    put = _store.BlobWriter.put

    def failing(self: _store.BlobWriter, sha: str, source: Path | bytes) -> None:
        calls.append(sha)
        if len(calls) == 5:
            raise StoreError("cannot store blob: disk full")
        put(self, sha, source)

    monkeypatch.setattr(_store.BlobWriter, "put", failing)
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="disk full"):
        import_dataset("imagefolder", root, store.uri, workers=4)
    assert store.latest_version() == 0
    assert len(calls) < 4 * _importers._SCAN_CHUNK  # the threads stopped instead of storing the rest


def test_jsonl_fast_path_reads_lines_as_json_loads_does(tmp_path: Path, write_png: PngWriter) -> None:
    """Lines are parsed by pydantic's JSON parser first; what they mean must not depend on that."""
    lines = [
        '{"path": "img/a.png", "id": "dup keys", "id": "last wins"}',
        '{"path": "img/a.png", "id": "nan", "metadata": {"x": NaN, "big": 123456789012345678901234567890}}',
        '{"path": "img/a.png", "id": "floats", "metadata": {"one": 1.0, "exp": 1e3, "neg": -0.0}}',
        '{"path": "img/a.png", "id": "unicode \\u00e9\\ud83d\\ude00", "labels": ["caf\\u00e9"]}',
        '{"path": "./img//a.png", "labels": ["a", "b", "a"]}',
        '{"path": "img/b.png", "annotations": [{"label": "d", "bbox": [1, 2, 3, 4], "iscrowd": 1,'
        ' "attributes": {"nested": {"k": [1, 2.5, null, true]}}}], "metadata": {"flag": false}}',
    ]
    file = _jsonl(tmp_path, write_png, lines)
    fast = _importers._plan_jsonl([file])
    slow = [_importers._JsonlItem.model_validate(json.loads(line)) for line in lines]
    assert [e.id for e in fast] == ["last wins", "nan", "floats", "unicode é😀", "img/a.png", "img/b.png"]
    for entry, item in zip(fast, slow, strict=True):
        assert entry.metadata == item.metadata or entry.id == "nan"
        assert entry.annotations == tuple(Annotation(label=x) for x in item.labels) + tuple(item.annotations)
        assert entry.path == os.path.join(file.parent, item.path)
    nan = fast[1].metadata
    assert nan is not None
    assert nan["x"] != nan["x"]
    assert nan["big"] == 123456789012345678901234567890
    assert fast[2].metadata == {"one": 1.0, "exp": 1000.0, "neg": -0.0}
    assert [type(v) for v in (fast[2].metadata or {}).values()] == [float, float, float]
    bad = _jsonl(tmp_path, write_png, ['{"path": "img/a.png", "labels": "cat"}'])
    with pytest.raises(ImportError_, match=r"items\.jsonl:1: labels: Input should be a valid list"):
        import_dataset("jsonl", bad, tmp_path / "store")


def test_cli_import_takes_workers(tmp_path: Path, write_png: PngWriter) -> None:
    from sluicegate._cli import app
    from typer.testing import CliRunner

    root = _many(tmp_path / "many", write_png, 10)
    done = CliRunner().invoke(
        app, ["dataset", "import", "-f", "imagefolder", "--workers", "3", str(root), str(tmp_path / "s")]
    )
    assert done.exit_code == 0, done.output
    assert Store(tmp_path / "s").manifest()[0].num_rows == 10
    refused = CliRunner().invoke(
        app, ["dataset", "import", "-f", "imagefolder", "--workers", "0", str(root), str(tmp_path / "s")]
    )
    assert refused.exit_code != 0


def test_imported_items_carry_the_blake3_that_readers_verify(tmp_path: Path, write_png: PngWriter) -> None:
    from sluicegate.core.manifest import blake3_hex

    small = tmp_path / "small.png"
    write_png(small, 8, 8)
    big = tmp_path / "big.png"
    write_png(big, 8, 8)
    with big.open("ab") as fh:  # past the size read whole: hashed as a stream, both digests in one pass
        fh.write(os.urandom(_importers._READ_WHOLE + 1000))
    listing = tmp_path / "items.jsonl"
    listing.write_text(json.dumps({"path": "small.png"}) + "\n" + json.dumps({"path": "big.png"}) + "\n")
    import_dataset("jsonl", [listing], tmp_path / "ds")
    table, _ = Store(tmp_path / "ds").manifest()
    checks = dict(zip(table.column("id").to_pylist(), table.column("blake3").to_pylist(), strict=True))
    assert checks == {"small.png": blake3_hex(small.read_bytes()), "big.png": blake3_hex(big.read_bytes())}


def test_confinement_resolves_paths_as_realpath_does(tmp_path: Path) -> None:
    """The import's root check resolves each directory once; the answers are os.path.realpath's."""
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root" / "sub" / "f.png").write_bytes(b"x")
    (tmp_path / "elsewhere" / "secret").write_bytes(b"x")
    (tmp_path / "root" / "out").symlink_to(tmp_path / "elsewhere")  # a directory link out
    (tmp_path / "root" / "sub" / "leak.png").symlink_to(tmp_path / "elsewhere" / "secret")  # a file link out
    (tmp_path / "root" / "sub" / "in.png").symlink_to("f.png")  # a relative link that stays inside
    (tmp_path / "root" / "loop").symlink_to("loop")
    cases = [
        "sub/f.png", "sub/in.png", "sub/leak.png", "out/secret", "sub/../sub/f.png", "sub/..",
        "sub/.", "sub/", "missing/x.png", "sub/missing.png", "loop", "loop/x", "sub/f.png/x",
        "../elsewhere/secret", str(tmp_path / "elsewhere" / "secret"),
    ]  # fmt: skip
    cache: dict[str, str] = {}
    for case in cases:
        path = os.path.join(tmp_path / "root", case)
        assert _importers._realpath(path, cache) == os.path.realpath(path), case
    rel = os.path.relpath(tmp_path / "root" / "sub" / "f.png")  # relative to the working directory
    assert _importers._realpath(rel, cache) == os.path.realpath(rel)
