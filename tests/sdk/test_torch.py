"""The PyTorch adapter on real datasets (local directory and the S3 server) and real DataLoaders."""
# ruff: noqa: F811 - the fixtures imported from adapter_fixtures are test parameters here

from __future__ import annotations

import gc
import io
import os
import pickle
from typing import Any

import numpy as np
import pytest
import sluicegate.torch
import torch
from PIL import Image
from sluicegate import ConfigError, Dataset
from sluicegate.torch import IterDataset, MapDataset, Packed, collate, detection_collate
from torch.utils.data import DataLoader, DistributedSampler

from tests.sdk.adapter_fixtures import N, ds, expected, images  # noqa: F401 - fixtures


def test_map_style_samples_carry_bytes_as_tensors(ds: Dataset, expected: dict[str, bytes]) -> None:
    tds = ds.to_pytorch()
    assert isinstance(tds, MapDataset)
    assert len(tds) == N
    sample = tds[5]
    assert sample["id"] == "item000005"
    assert sample["index"] == 5
    assert isinstance(sample["data"], torch.Tensor)
    assert sample["data"].dtype == torch.uint8
    assert sample["data"].numpy().tobytes() == expected["item000005"]
    assert sample["metadata"] == {"split": "train", "index": 5}
    assert sample["labels"] == {"car": 2}
    assert [a["bbox"] for a in sample["annotations"]] == [[1.0, 2.0, 3.0, 4.0]] * 2
    assert tds[-1]["id"] == "item000036"
    assert set(ds.to_pytorch(fields=())[0]) == {"id", "index", "data"}
    assert set(ds.to_pytorch(fields=["labels"])[1]) == {"id", "index", "data", "labels"}
    with pytest.raises(ConfigError, match="fields must be"):
        ds.to_pytorch(fields=["annotation"])
    with pytest.raises(IndexError, match="out of range"):
        tds[N]


def test_distributed_sampler_ranks_cover_the_dataset_once(ds: Dataset, expected: dict[str, bytes]) -> None:
    tds = ds.to_pytorch()
    seen: list[str] = []
    for rank in range(3):
        sampler = DistributedSampler(tds, num_replicas=3, rank=rank, shuffle=True, seed=4, drop_last=True)
        for batch in tds.loader(batch_size=4, sampler=sampler):
            assert isinstance(batch["data"], Packed)
            assert batch["data"].tobytes() == [expected[i] for i in batch["id"]]
            seen += batch["id"]
    assert len(seen) == len(set(seen)) == N - N % 3


@pytest.mark.slow
def test_iterable_workers_follow_the_epoch_order_across_epochs(
    ds: Dataset, expected: dict[str, bytes]
) -> None:
    view = ds.shuffle(9)
    tds = view.to_pytorch(iterable=True)
    assert isinstance(tds, IterDataset)
    # batch_size=1 with in-order workers interleaves worker w's every-k-th positions back into the
    # epoch order, so the output must be exactly that order: no gap, no overlap, no reordering.
    loader = tds.loader(batch_size=1, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in (0, 1):
        tds.set_epoch(epoch)
        view.set_epoch(epoch)
        want = [f"item{p:06d}" for p in view.epoch_positions()]
        batches = list(loader)
        got = [b["id"][0] for b in batches]
        assert got == want
        assert all(b["data"][0].numpy().tobytes() == expected[b["id"][0]] for b in batches)
        orders.append(got)
    assert orders[0] != orders[1]


def test_iterable_without_workers_reads_this_shard(ds: Dataset) -> None:
    parts = [ds.shard(rank, 2).to_pytorch(iterable=True) for rank in range(2)]
    ids = [[s["id"] for s in part] for part in parts]
    assert len(ids[0]) == len(ids[1]) == -(-N // 2)  # padded to equal length
    assert set(ids[0]) | set(ids[1]) == {f"item{i:06d}" for i in range(N)}
    with pytest.raises(ConfigError, match="epoch"):
        parts[0].set_epoch(-1)


@pytest.mark.slow
def test_worker_batches_of_bytes_arrive_packed_in_shared_memory(
    ds: Dataset, expected: dict[str, bytes]
) -> None:
    loader = ds.to_pytorch().loader(batch_size=8, num_workers=1)
    batch = next(iter(loader))
    packed = batch["data"]
    assert isinstance(packed, Packed)
    assert packed.values.is_shared()
    assert [bytes(t.numpy()) for t in packed] == [expected[i] for i in batch["id"]]
    assert packed[-1].numpy().tobytes() == expected[batch["id"][-1]]


def test_decode_modes_and_transform(images: Dataset) -> None:
    raw = images[1].data
    want = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    image = images.to_pytorch(decode="image")[1]["image"]
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 16, 24)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), want)
    gray = images.to_pytorch(decode="image", image_mode="L")[1]["image"]
    assert tuple(gray.shape) == (1, 16, 24)
    pil = images.to_pytorch(decode="pil")[1]["image"]
    assert pil.size == (24, 16)
    assert pil.mode == "RGB"
    custom = images.to_pytorch(decode=lambda item: len(item.data))[1]["data"]
    assert custom == len(raw)

    def size_only(sample: dict[str, Any]) -> tuple[int, int]:
        return sample["width"], sample["height"]

    assert images.to_pytorch(transform=size_only)[0] == (20, 16)
    with pytest.raises(ConfigError, match="decode must be"):
        images.to_pytorch(decode="jpeg")
    with pytest.raises(ConfigError, match="image_mode"):
        images.to_pytorch(decode="image", image_mode="CMYK")


def test_non_images_fail_clearly_when_decoded(ds: Dataset) -> None:
    with pytest.raises(ConfigError, match="not an image"):
        ds.to_pytorch(decode="image")[0]


def test_packed_bytes_keep_their_boundaries_in_and_out_of_one_buffer() -> None:
    parts = [torch.tensor(list(b), dtype=torch.uint8) for b in (b"ab", b"", b"cdef")]
    packed = collate(parts)
    assert isinstance(packed, Packed)
    assert len(packed) == 3
    assert packed.nbytes == 6
    assert packed.tobytes() == [b"ab", b"", b"cdef"]
    assert packed.offsets.tolist() == [0, 2, 2, 6]
    assert bytes(packed.values.numpy()) == b"abcdef"
    # Crossing a process boundary sends the one buffer; the other side sees the same tensors.
    again = pickle.loads(pickle.dumps(packed))
    assert again.tobytes() == [b"ab", b"", b"cdef"]
    assert again[-1].tolist() == list(b"cdef")
    with pytest.raises(IndexError):
        again[3]
    # Bytes of one length are still bytes, not a 2-D tensor.
    assert isinstance(collate([torch.ones(3, dtype=torch.uint8)] * 2), Packed)


def test_collate_stacks_what_it_can_and_lists_the_rest() -> None:
    batch = [
        {"x": torch.ones(2, 2), "y": 1, "name": "a", "ragged": torch.ones(2, 2), "w": None},
        {"x": torch.zeros(2, 2), "y": 2, "name": "b", "ragged": torch.ones(2, 3), "w": 4},
    ]
    out = collate(batch)
    assert out["x"].shape == (2, 2, 2)
    assert out["y"].tolist() == [1, 2]
    assert out["name"] == ["a", "b"]
    assert isinstance(out["ragged"], list)
    assert len(out["ragged"]) == 2
    assert out["w"] == [None, 4]
    pairs = collate([(torch.ones(3), 0), (torch.ones(3), 1)])
    assert isinstance(pairs, tuple)
    assert pairs[0].shape == (2, 3)
    assert pairs[1].tolist() == [0, 1]


def test_detection_collate_gives_torchvision_targets(images: Dataset) -> None:
    loader = images.to_pytorch(decode="image").loader(
        batch_size=3, collate_fn=detection_collate(["cat", "dog"])
    )
    imgs, targets = next(iter(loader))
    assert [tuple(i.shape) for i in imgs] == [(3, 16, 20), (3, 16, 24), (3, 16, 20)]
    first = targets[0]
    assert first["boxes"].dtype == torch.float32
    # x, y, w, h -> x1, y1, x2, y2; the zero-width box is dropped.
    assert first["boxes"].tolist() == [[1, 2, 6, 8], [3, 3, 7, 5]]
    assert first["labels"].dtype == torch.int64
    assert first["labels"].tolist() == [1, 2]
    assert first["iscrowd"].tolist() == [False, True]
    assert first["image_id"] == "img0"
    explicit = detection_collate({"cat": 7, "dog": 9})(images.to_pytorch(decode="image").__getitems__([1]))
    assert explicit[1][0]["labels"].tolist() == [7, 9]
    with pytest.raises(ConfigError, match="'dog' is not in the label map"):
        detection_collate(["cat"])(images.to_pytorch(decode="image").__getitems__([0]))
    with pytest.raises(ConfigError, match="decode='image'"):
        detection_collate(["cat", "dog"])(images.to_pytorch().__getitems__([0]))


def test_plain_dataloader_works_with_a_transform(images: Dataset) -> None:
    def to_xy(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return sample["image"][:, :16, :16].float() / 255, len(sample["annotations"])

    x, y = next(iter(DataLoader(images.to_pytorch(decode="image", transform=to_xy), batch_size=6)))
    assert x.shape == (6, 3, 16, 16)
    assert float(x.min()) >= 0
    assert float(x.max()) <= 1
    assert y.tolist() == [3] * 6


class _Ragged(torch.utils.data.Dataset[torch.Tensor]):
    """Ragged 1-D tensors: uint8 bytes (the first empty, every other one a strided view) and, in every
    other batch of two, float32 values (which stay a list)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        if i % 4 >= 2:
            return torch.arange(i, dtype=torch.float32) / 3
        if i % 4 == 1:
            return torch.arange(i * 2000, dtype=torch.int64).to(torch.uint8)[::2]  # not contiguous
        return torch.full((i * 1000,), i, dtype=torch.uint8)


def test_packed_in_workers_arrives_whole_in_the_trainer() -> None:
    """In a worker, collate writes the batch into a memory file handed to torch as shared storage."""
    data = _Ragged()
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)
    seen = 0
    for b, batch in enumerate(loader):
        if isinstance(batch, Packed):
            assert [t.tolist() for t in batch] == [data[2 * b].tolist(), data[2 * b + 1].tolist()]
            assert batch.values.untyped_storage().is_shared()
            seen += 1
        else:  # a float32 tensor and a uint8 one do not pack together
            assert [t.tolist() for t in batch] == [data[2 * b].tolist(), data[2 * b + 1].tolist()]
    assert seen == 3


class _Images(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Same-shape tensors as decoders make them (CHW views of HWC arrays, so not contiguous), with every
    third one laid out afresh, so a batch mixes strided and contiguous parts."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        hwc = torch.arange(4 * 5 * 3, dtype=torch.int64).reshape(4, 5, 3) + i
        image = hwc.permute(2, 0, 1).to(torch.uint8)
        return {"image": image.contiguous() if i % 3 == 1 else image, "weight": torch.tensor([i / 2, i])}


def test_stacked_in_workers_match_torchs_own_stack() -> None:
    data = _Images()
    loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate)
    for b, batch in enumerate(loader):
        samples = [data[3 * b + k] for k in range(3)]
        for key in ("image", "weight"):
            want = torch.stack([s[key] for s in samples])
            assert batch[key].shape == want.shape
            assert batch[key].dtype == want.dtype
            assert torch.equal(batch[key], want)
            assert batch[key].untyped_storage().is_shared()


_RECEIVE = sluicegate.torch._received_packed
_HANDED: list[int] = []


def _counting_receive(*args: Any) -> Packed:
    """``_received_packed``, counting the hand-offs (module level: a worker pickles it by name)."""
    _HANDED.append(args[1])
    return _RECEIVE(*args)


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [True, False])
def test_worker_batches_cross_by_the_loaders_own_hand_off_and_arrive_whole(
    ds: Dataset, expected: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, persistent: bool
) -> None:
    """Each worker batch's memory file reaches the trainer over the loader's own socket pair (not torch's
    per-storage connection and handshake), every byte intact, epoch after epoch."""
    monkeypatch.setattr(sluicegate.torch, "_received_packed", _counting_receive)
    _HANDED.clear()
    tds = ds.to_pytorch()
    loader = tds.loader(batch_size=3, num_workers=2, persistent_workers=persistent)
    batches = 0
    for epoch in range(2):
        tds.set_epoch(epoch)
        seen = {}
        for batch in loader:
            assert isinstance(batch["data"], Packed)
            seen.update({i: bytes(t.numpy()) for i, t in zip(batch["id"], batch["data"], strict=True)})
            batches += 1
        assert seen == expected
    assert len(_HANDED) == batches
    assert sorted(set(_HANDED)) == [0, 1]  # both workers


@pytest.mark.slow
def test_a_loader_dropped_while_its_pass_runs_still_hands_every_batch_over(
    ds: Dataset, expected: dict[str, bytes]
) -> None:
    """``for batch in tds.loader(...)`` keeps no reference to the loader: the pass keeps its hand-off."""
    seen = {}
    for batch in ds.to_pytorch().loader(batch_size=3, num_workers=2):
        gc.collect()
        seen.update({i: bytes(t.numpy()) for i, t in zip(batch["id"], batch["data"], strict=True)})
    assert seen == expected


@pytest.mark.slow
def test_passes_left_early_leave_no_descriptors_behind(ds: Dataset) -> None:
    """A pass abandoned after one batch drops its loader's hand-off with the workers: what the workers had
    already sent for batches nobody asked for is closed, not kept."""
    loader = ds.to_pytorch().loader(batch_size=2, num_workers=2)

    def open_fds() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    next(iter(loader))
    before = open_fds()
    for _ in range(4):
        next(iter(loader))
    assert open_fds() <= before + 2
