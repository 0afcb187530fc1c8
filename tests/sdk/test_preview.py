"""``sluicegate dataset preview`` and ``show --chart``, through the real CLI; the picture is checked on
its pixels: each box's colour lies along the annotated edges (scaled into its tile), not inside the box
or beside it, and the grid has one tile per drawn item."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sluicegate import Store
from sluicegate._preview import BACKGROUND, MAT, PALETTE, class_color, render_grid
from sluicegate.core.manifest import Annotation, ItemRecord, records_to_table

from tests.sdk.cli import fails, run

Box = tuple[int, int, int, int]  # x, y, width, height in image pixels (COCO order)

# id -> (width, height, uniform colour, [(class, box)]). The colours are in neither the palette nor the
# greys that antialiased captions blend, so each marks exactly where its image was pasted.
IMAGES: dict[str, tuple[int, int, tuple[int, int, int], list[tuple[str, Box]]]] = {
    "a.png": (80, 60, (60, 90, 120), [("car", (10, 20, 30, 20)), ("dog", (50, 25, 20, 30))]),
    "b.png": (60, 80, (120, 60, 90), [("car", (30, 15, 20, 15)), ("person", (10, 45, 30, 25))]),
    "c.png": (64, 64, (90, 120, 60), []),
}
CLASSES = ["car", "dog", "person"]


def _fails(*args: str) -> str:
    """Runs a command that must fail with a one-line cause and no traceback; returns that line."""
    return fails(*args)[1]


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A COCO import of the three uniform-colour images of IMAGES, with their boxes."""
    images = tmp_path / "images"
    images.mkdir()
    coco: dict[str, list[dict[str, object]]] = {
        "images": [],
        "categories": [{"id": i, "name": name} for i, name in enumerate(CLASSES, 1)],
        "annotations": [],
    }
    for image_id, (name, (width, height, colour, boxes)) in enumerate(IMAGES.items(), 1):
        Image.new("RGB", (width, height), colour).save(images / name)
        coco["images"].append({"id": image_id, "file_name": name})
        for label, box in boxes:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": CLASSES.index(label) + 1,
                    "bbox": list(box),
                }
            )
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(coco))
    uri = str(tmp_path / "store")
    code, _, err = run(
        "dataset",
        "import",
        "-f",
        "coco",
        "--no-progress",
        "--annotations",
        str(ann),
        "--images",
        str(images),
        uri,
    )
    assert code == 0, err
    return uri


def _picture(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(np.int16)


def _where(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == colour, axis=2)


def _runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def _tile_grid(pixels: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Column and row extents of the tiles: the runs of anything but the background between them."""
    tile = ~_where(pixels, BACKGROUND)
    return _runs(tile.any(axis=0)), _runs(tile.any(axis=1))


def _image_region(pixels: np.ndarray, name: str) -> tuple[int, int, int, int]:
    """Where image ``name`` was pasted (its uniform colour's extent): x, y, width, height."""
    ys, xs = np.nonzero(_where(pixels, IMAGES[name][2]))
    assert xs.size, f"{name} is not in the picture"
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0


def _check_boxes(pixels: np.ndarray, name: str) -> None:
    """Every box of image ``name``: its class colour along all four edges, the image's colour inside and
    just outside it; and that colour nowhere else in the image but on its boxes' outlines and tags."""
    width, height, image_colour, boxes = IMAGES[name]
    rx, ry, drawn_w, drawn_h = _image_region(pixels, name)
    scale = drawn_w // width  # the tests pick tile sizes that scale these images by whole numbers
    assert (drawn_w, drawn_h) == (width * scale, height * scale), (name, "not scaled to fit the tile")
    region = pixels[ry : ry + drawn_h, rx : rx + drawn_w]
    allowed = {label: np.zeros(region.shape[:2], bool) for label, _ in boxes}
    for label, (bx, by, bw, bh) in boxes:
        colour = class_color(label)
        # Tile pixels of the box's first and last pixel rows and columns, scaled.
        left, top = bx * scale, by * scale
        right, bottom = (bx + bw) * scale - 1, (by + bh) * scale - 1
        cx, cy = (left + right) // 2, (top + bottom) // 2
        xs = np.linspace(left + (right - left) // 4, right - (right - left) // 4, 9).astype(int)
        ys = np.linspace(top + (bottom - top) // 4, bottom - (bottom - top) // 4, 9).astype(int)
        for x in xs:
            assert tuple(region[top, x]) == colour, (name, label, "top edge", x)
            assert tuple(region[bottom, x]) == colour, (name, label, "bottom edge", x)
        for y in ys:
            assert tuple(region[y, left]) == colour, (name, label, "left edge", y)
            assert tuple(region[y, right]) == colour, (name, label, "right edge", y)
        for x, y in [(cx, cy), (left + 8, cy), (right - 8, cy), (cx, top + 8), (cx, bottom - 8)]:
            assert tuple(region[y, x]) == image_colour, (name, label, "inside the box", x, y)
        for x, y in [(left - 3, cy), (right + 3, cy), (cx, bottom + 3)]:
            assert tuple(region[y, x]) == image_colour, (name, label, "outside the box", x, y)
        # The class name's tag: filled with the class colour just above the box's left corner.
        tag = region[max(0, top - 24) : top, left : left + 40]
        assert _where(tag, colour).sum() > 40, (name, label, "no tag above the box")
        assert (~_where(tag, colour) & ~_where(tag, image_colour)).any(), (name, label, "tag without text")
        outline = allowed[label]
        outline[top : bottom + 1, left : right + 1] = True
        outline[top + 8 : bottom - 7, left + 8 : right - 7] = False  # the outline is thinner than 8 px
        outline[max(0, top - 24) : top, max(0, left - 1) : left + 80] = True
    for label, mask in allowed.items():
        stray = _where(region, class_color(label)) & ~mask
        assert not stray.any(), (name, label, "colour off its boxes", np.argwhere(stray)[:5])


def test_help() -> None:
    code, out, _ = run("dataset", "preview", "--help")
    assert code == 0
    for option in ("--output", "--limit", "--columns", "--size", "--version"):
        assert option in out
    assert "--chart" in run("dataset", "show", "--help")[1]


@pytest.mark.parametrize("size", [160, 240])
def test_boxes_are_drawn_where_the_annotations_say(store: str, tmp_path: Path, size: int) -> None:
    out = tmp_path / "grid.png"
    code, stdout, err = run("dataset", "preview", store, "-o", str(out), "--size", str(size))
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert "drew 3 of 3 matching items of version 1" in err
    assert len({class_color(c) for c in CLASSES}) == len(CLASSES), "pick classes of distinct colours"
    pixels = _picture(out)
    columns, rows = _tile_grid(pixels)
    assert (len(columns), len(rows)) == (2, 2)  # three tiles, near-square: two per row
    assert all(end - start == size for start, end in columns)
    # Row by row: a and b in the first row, c (no annotations, untouched) alone in the second.
    for name, (column, row) in {"a.png": (0, 0), "b.png": (1, 0), "c.png": (0, 1)}.items():
        x, y, w, h = _image_region(pixels, name)
        assert columns[column][0] <= x < x + w <= columns[column][1], name
        assert rows[row][0] <= y < y + h <= rows[row][1], name
    (c0, c1), (r0, r1) = columns[1], rows[1]
    assert (pixels[r0:r1, c0:c1] == BACKGROUND).all()  # the fourth cell is empty
    x, y, w, h = _image_region(pixels, "c.png")
    assert (w, h) == (size, size)
    assert _where(pixels[y : y + h, x : x + w], IMAGES["c.png"][2]).all()
    for name in ("a.png", "b.png"):
        _check_boxes(pixels, name)
    # Aspect kept: the landscape image has a mat above and below it, the portrait one left and right.
    x, y, w, h = _image_region(pixels, "a.png")
    assert (w, tuple(pixels[y - 1, x + 5]), tuple(pixels[y + h, x + 5])) == (size, MAT, MAT)
    x, y, w, h = _image_region(pixels, "b.png")
    assert (h, tuple(pixels[y + 5, x - 1]), tuple(pixels[y + 5, x + w])) == (size, MAT, MAT)


def test_query_limit_and_columns(store: str, tmp_path: Path) -> None:
    out = tmp_path / "cars.png"
    code, _, err = run(
        "dataset", "preview", store, "labels.car >= 1", "-o", str(out), "--columns", "3", "--size", "160"
    )
    assert code == 0, err
    pixels = _picture(out)
    columns, rows = _tile_grid(pixels)
    assert (len(columns), len(rows)) == (2, 1)  # two matches: never more columns than tiles
    assert pixels.shape[1] - columns[-1][1] == columns[0][0]  # no empty column on the right either
    assert not _where(pixels, IMAGES["c.png"][2]).any()
    _check_boxes(pixels, "a.png")
    _check_boxes(pixels, "b.png")

    code, _, err = run("dataset", "preview", store, "-o", str(out), "--limit", "2", "--columns", "1")
    assert code == 0, err
    assert "drew 2 of 3" in err
    assert "raise --limit" in err
    columns, rows = _tile_grid(_picture(out))
    assert (len(columns), len(rows)) == (1, 2)

    code, _, err = run("dataset", "preview", store, "-o", str(out), "--columns", "3", "--size", "64")
    assert code == 0, err
    columns, rows = _tile_grid(_picture(out))
    assert (len(columns), len(rows)) == (3, 1)
    assert all(end - start == 64 for start, end in columns)

    jpeg = tmp_path / "grid.jpg"  # the extension picks the format
    assert run("dataset", "preview", store, "-o", str(jpeg))[0] == 0
    with Image.open(jpeg) as img:
        assert img.format == "JPEG"


def test_preview_reads_the_version_asked_for(store: str, tmp_path: Path) -> None:
    Store(store).commit(lambda base: base.slice(0, 1) if base is not None else base, "only a.png")
    out = tmp_path / "v.png"
    assert run("dataset", "preview", store, "-o", str(out))[0] == 0
    columns, rows = _tile_grid(_picture(out))
    assert (len(columns), len(rows)) == (1, 1)
    assert run("dataset", "preview", store, "-o", str(out), "-v", "1")[0] == 0
    columns, rows = _tile_grid(_picture(out))
    assert (len(columns), len(rows)) == (2, 2)


def test_colours_are_stable(store: str, tmp_path: Path) -> None:
    """One colour per class, from the palette, the same in every run: the same picture twice."""
    assert all(class_color(c) in PALETTE for c in CLASSES)
    first, second = tmp_path / "1.png", tmp_path / "2.png"
    for out in (first, second):
        assert run("dataset", "preview", store, "-o", str(out))[0] == 0
    assert np.array_equal(_picture(first), _picture(second))


def test_show_chart_names_each_label_with_its_counts(store: str) -> None:
    code, out, err = run("dataset", "show", store, "--chart")
    assert code == 0, err
    chart = out[out.index("labels: items carrying each") :].splitlines()[1:]
    expected = {"car": (2, 2), "dog": (1, 1), "person": (1, 1)}
    assert len(chart) == len(expected)
    bars: dict[str, int] = {}
    for line in chart:
        m = re.fullmatch(r" (\w+) +(\S+) +(\d+) items? +(\S+) +(\d+) instances?", line.rstrip())
        assert m, line
        name, items_bar, items, _, instances = m.groups()
        assert (int(items), int(instances)) == expected.pop(name)
        bars[name] = len(items_bar)
    assert not expected
    assert bars["car"] > bars["dog"] == bars["person"]  # 2 of 3 items against 1 of 3
    # The table above is unchanged: one line per label, greppable.
    [row] = [line for line in out.splitlines() if line.startswith("labels.car ")]
    assert row.split()[1:] == ["2", "2"]
    assert "labels: items" not in run("dataset", "show", store)[1]  # the chart only when asked


def test_render_grid_is_pure() -> None:
    """Records and images in, a picture out; mismatched input is refused, nothing else is touched."""
    record = ItemRecord(
        id="x", blob="0" * 64, size=1, media_type="image/png", annotations=[Annotation(label="cat")]
    )
    picture = render_grid([record], [Image.new("L", (10, 20), 250)], size=64)  # brighter than captions
    assert picture.mode == "RGB"
    pixels = np.asarray(picture).astype(np.int16)
    ys, xs = np.nonzero(_where(pixels, (250, 250, 250)))
    assert (xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (32, 64)  # fitted into 64 x 64
    assert _where(pixels, class_color("cat")).any()  # a label without a box: a tag in the corner
    with pytest.raises(ValueError, match="one image per item"):
        render_grid([record], [])
    with pytest.raises(ValueError, match="nothing to draw"):
        render_grid([], [])


# -- bad input: one line that says what was wrong and what to do ----------------------------------


def _mixed_store(tmp_path: Path) -> str:
    """A store with a text item and a PNG whose header is fine but whose pixels are cut off."""
    store = Store(tmp_path / "mixed")
    png = tmp_path / "whole.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(png)
    cut = png.read_bytes()[:60]
    text = b"not a picture\n"
    records = [
        ItemRecord(id="notes.txt", blob=store.put_blob(text), size=len(text), media_type="text/plain"),
        ItemRecord(
            id="cut.png", blob=store.put_blob(cut), size=len(cut), media_type="image/png", width=32, height=32
        ),
    ]
    store.commit(lambda _: records_to_table(records))
    return store.uri


def test_bad_input_says_what_to_do(store: str, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert (
        "did you mean 'labels.car'" in run("dataset", "preview", store, "labels.cra > 0", "-o", str(out))[2]
    )
    assert "has no versions yet; import data into it first" in _fails(
        "dataset", "preview", str(tmp_path / "not-a-store"), "-o", str(out)
    )
    err = _fails("dataset", "preview", store, "labels.car > 5", "-o", str(out))
    assert "no item of version 1 matches 'labels.car > 5'" in err
    assert "sluicegate dataset query" in err
    assert "has no version 7" in _fails("dataset", "preview", store, "-o", str(out), "-v", "7")

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    err = _fails("dataset", "preview", store, "-o", str(a_file / "grid.png"))
    assert "is not a directory; create it or pick another -o" in err
    assert "is a directory; name a file in it" in _fails("dataset", "preview", store, "-o", str(tmp_path))
    assert ".txt is not an image format; end it in .png or .jpg" in _fails(
        "dataset", "preview", store, "-o", str(tmp_path / "grid.txt")
    )
    assert "no extension" in _fails("dataset", "preview", store, "-o", str(tmp_path / "grid"))
    assert not out.exists()

    mixed = _mixed_store(tmp_path)
    err = _fails("dataset", "preview", mixed, "-o", str(out))
    assert "item 'notes.txt' is text/plain, not an image" in err
    assert 'file.type = "image/jpeg"' in err
    err = _fails("dataset", "preview", mixed, 'file.type = "image/png"', "-o", str(out))
    assert "item 'cut.png' (image/png) is not an image PIL can decode" in err
    assert 'leave it out, e.g. add `and file.id != "cut.png"`' in err
    assert not out.exists()

    # Usage errors (a limit of 0, a tiny tile) are click's, exit 2, before anything is read.
    assert run("dataset", "preview", store, "-o", str(out), "--limit", "0")[0] == 2
    assert run("dataset", "preview", store, "-o", str(out), "--size", "8")[0] == 2
    assert run("dataset", "preview", store)[0] == 2  # -o is required


def test_real_subprocess(store: str, tmp_path: Path, venv_bin: Path) -> None:
    """The installed command, in its own process (another hash seed): the same picture as in-process."""
    exe = str(venv_bin / "sluicegate")
    out, here = tmp_path / "grid.png", tmp_path / "here.png"
    done = subprocess.run(
        [exe, "dataset", "preview", store, "labels.car >= 1", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, f"{out}\n"), done.stderr
    assert run("dataset", "preview", store, "labels.car >= 1", "-o", str(here))[0] == 0
    assert np.array_equal(_picture(out), _picture(here))
    done = subprocess.run(
        [exe, "dataset", "preview", store, "labels.dog >= 'x'", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: type mismatch")
    assert "Traceback" not in done.stderr
