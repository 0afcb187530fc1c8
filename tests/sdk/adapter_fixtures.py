"""Datasets the adapter tests (torch and TensorFlow) share: ragged bytes, and PNGs with boxes."""

from __future__ import annotations

from pathlib import Path

import pytest
import sluicegate
from sluicegate import Dataset, Store
from sluicegate.core.manifest import Annotation, ItemRecord, records_to_table

from tests.conftest import Backend, PngWriter
from tests.sidecar.helpers import item_bytes

__all__ = ["N", "ds", "expected", "images"]

N = 37


@pytest.fixture
def expected(store_backend: Backend) -> dict[str, bytes]:
    """N items of different sizes (so batches of bytes are ragged); item i has i % 3 boxed cars."""
    store = store_backend.store()
    records, data = [], {}
    for i in range(N):
        item_id, blob = f"item{i:06d}", item_bytes(i, 200 + 7 * i)
        data[item_id] = blob
        records.append(
            ItemRecord(
                id=item_id,
                blob=store.put_blob(blob),
                size=len(blob),
                media_type="application/octet-stream",
                metadata={"split": "train", "index": i},
                labels={"car": i % 3} if i % 3 else {},
                annotations=[Annotation(label="car", bbox=(1.0, 2.0, 3.0, 4.0))] * (i % 3),
            )
        )
    store.commit(lambda _: records_to_table(records))
    return data


@pytest.fixture
def ds(store_backend: Backend, expected: dict[str, bytes]) -> Dataset:
    return sluicegate.open(store_backend.uri, s3=store_backend.s3)


@pytest.fixture
def images(tmp_path: Path, write_png: PngWriter) -> Dataset:
    """Six PNGs of two sizes with boxes: one box per class, plus a zero-area box that detection drops."""
    store = Store(tmp_path / "images")
    records = []
    for i in range(6):
        width = 20 + 4 * (i % 2)
        data = write_png(tmp_path / f"{i}.png", width=width, height=16, seed=i).read_bytes()
        anns = [
            Annotation(label="cat", bbox=(1, 2, 5, 6)),
            Annotation(label="dog", bbox=(3, 3, 4, 2), iscrowd=i == 0),
            Annotation(label="dog", bbox=(0, 0, 0, 5)),
        ]
        records.append(
            ItemRecord(
                id=f"img{i}",
                blob=store.put_blob(data),
                size=len(data),
                media_type="image/png",
                width=width,
                height=16,
                annotations=anns,
                labels={"cat": 1, "dog": 2},
            )
        )
    store.commit(lambda _: records_to_table(records))
    return sluicegate.open(tmp_path / "images")
