"""Manifest schema, records <-> table, Parquet round trip and merge semantics."""

from __future__ import annotations

import pyarrow as pa
import pytest
from sluicegate import Annotation, ImportError_, ItemRecord, StoreError
from sluicegate.core import manifest as _manifest
from sluicegate.core.manifest import FieldType, VersionInfo
from sluicegate.core.store import sha256_hex


def _rec(item: str, **kw: object) -> ItemRecord:
    return ItemRecord.model_validate(
        {"id": item, "blob": sha256_hex(item.encode()), "size": 3, "media_type": "image/png", **kw}
    )


def test_records_to_table_has_flat_typed_columns() -> None:
    table = _manifest.records_to_table(
        [
            _rec(
                "a", labels={"car": 2}, metadata={"split": "train", "score": 1, "ok": True}, width=4, height=3
            ),
            _rec("b", labels={"traffic light": 1}, metadata={"score": 0.5}),
        ]
    )
    assert table.column_names == [
        "id",
        "blob",
        "size",
        "media_type",
        "width",
        "height",
        "annotations",
        "labels.car",
        "labels.traffic light",
        "meta.ok",
        "meta.score",
        "meta.split",
    ]
    assert table.column("labels.car").to_pylist() == [2, 0]  # a missing label counts 0
    assert table.schema.field("labels.car").type == pa.int32()
    assert table.column("meta.score").type == pa.float64()  # ints widen to floats
    assert table.column("meta.split").to_pylist() == ["train", None]  # missing metadata is null
    assert table.column("meta.ok").type == pa.bool_()
    fields = _manifest.query_fields(table.schema)
    assert fields["labels.traffic light"] == ("labels.traffic light", FieldType.INT)
    assert fields["file.width"] == ("width", FieldType.INT)
    assert fields["meta.split"][1] is FieldType.STRING


def test_records_reject_bad_input() -> None:
    with pytest.raises(ImportError_, match="'a' appears twice"):
        _manifest.records_to_table([_rec("a"), _rec("a")])
    with pytest.raises(ImportError_, match="mixes types"):
        _manifest.records_to_table([_rec("a", metadata={"k": 1}), _rec("b", metadata={"k": "x"})])
    with pytest.raises(ValueError, match="sha256"):
        ItemRecord(id="x", blob="nothex", size=1, media_type="image/png")
    with pytest.raises(ValueError, match=">= 0"):
        Annotation(label="car", bbox=(0, 0, -1, 2))


def test_rows_round_trip_through_parquet() -> None:
    records = [
        _rec(
            "a",
            width=10,
            height=8,
            labels={"car": 1, "person": 1},
            metadata={"split": "val", "n": 3},
            annotations=[
                Annotation(label="car", bbox=(1, 2, 3, 4), attributes={"coco_id": 7}),
                Annotation(label="person", polygon=[[0, 0, 1, 0, 1, 1]], iscrowd=True),
            ],
        ),
        _rec("b"),
    ]
    table = _manifest.records_to_table(records)
    info = VersionInfo(version=3, parent=2, items=2, created_at=_manifest.now(), message="m")
    back, back_info = _manifest.from_parquet(_manifest.to_parquet(table, info), "test")
    assert back_info == info
    assert back.equals(table)
    assert _manifest.rows(back) == records


def test_from_parquet_rejects_foreign_files() -> None:
    with pytest.raises(StoreError, match="not a readable Parquet"):
        _manifest.from_parquet(b"garbage", "x")
    buf = pa.BufferOutputStream()
    pa.parquet.write_table(pa.table({"a": [1]}), buf)
    with pytest.raises(StoreError, match="not a sluicegate manifest"):
        _manifest.from_parquet(buf.getvalue().to_pybytes(), "x")


def test_merge_replaces_in_place_and_appends_new_ids() -> None:
    base = _manifest.records_to_table(
        [_rec("a", labels={"car": 1}), _rec("b", labels={"car": 2}), _rec("c", metadata={"split": "train"})]
    )
    new = _manifest.records_to_table([_rec("d", labels={"bus": 1}), _rec("b", metadata={"split": "val"})])
    merged = _manifest.merge(base, new)
    assert merged.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert merged.column("labels.car").to_pylist() == [1, 0, 0, 0]  # b's row now comes from `new`
    assert merged.column("labels.bus").to_pylist() == [0, 0, 0, 1]
    assert merged.column("meta.split").to_pylist() == [None, "val", "train", None]
    assert merged.column_names[:7] == list(_manifest.BASE_SCHEMA.names)


def test_merge_is_identity_for_identical_items_and_none_base() -> None:
    base = _manifest.records_to_table([_rec(i, labels={"x": 1}) for i in "abc"])
    assert _manifest.merge(base, base.slice(1, 1)).equals(base)
    assert _manifest.merge(base, base).equals(base)
    assert _manifest.merge(None, base) is base


def test_merge_types() -> None:
    ints = _manifest.records_to_table([_rec("a", metadata={"k": 1})])
    floats = _manifest.records_to_table([_rec("b", metadata={"k": 0.5})])
    assert _manifest.merge(ints, floats).column("meta.k").to_pylist() == [1.0, 0.5]
    strings = _manifest.records_to_table([_rec("c", metadata={"k": "x"})])
    with pytest.raises(ImportError_, match=r"'meta\.k' is int in the dataset but string"):
        _manifest.merge(ints, strings)
