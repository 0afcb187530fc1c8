"""The sluicegate demo (``make demo``): a real dataset into a versioned store, then sliced by queries.

1. ``prepare_digits()`` writes scikit-learn's handwritten digits (1,797 8x8 scans that ship inside
   the package) as 32x32 grayscale PNGs into ``.demo/digits/digit_<n>/`` plus an ``index.jsonl``
   that gives each image its label and metadata (a train/test split fixed per item, the ink ratio).
2. ``import_digits()`` imports that index into the local store ``.demo/store``. Re-running is
   idempotent: when the store already holds exactly these items, no new version is written.
3. ``show_queries()`` counts a few slices, e.g. ``labels.digit_3 >= 1 and meta.split = "test"``.
4. ``train()`` streams the ``meta.split = "train"`` slice through ``to_pytorch()`` into a small CNN,
   then streams the test slice and prints the held-out accuracy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sluicegate
from PIL import Image
from rich.progress import Progress, TextColumn
from sklearn.datasets import load_digits

if TYPE_CHECKING:
    import torch

DEMO = Path(__file__).resolve().parents[1] / ".demo"
DIGITS = DEMO / "digits"
STORE = DEMO / "store"
SIZE = 32
QUERIES = [
    "labels.digit_3 >= 1",
    'labels.digit_3 >= 1 and meta.split = "test"',
    'meta.split = "train"',
    "(labels.digit_0 >= 1 or labels.digit_1 >= 1) and meta.ink > 0.3",
    "file.width = 32 and not labels.digit_7 >= 1",
]


def _split(item_id: str) -> str:
    """A train/test split (about 80/20) fixed per item: it depends on the id only."""
    return "test" if hashlib.sha256(item_id.encode()).digest()[0] < 52 else "train"


def prepare_digits(root: Path = DIGITS) -> Path:
    """Write the digits as PNGs (one folder per digit) and ``index.jsonl``; returns the index path."""
    digits = load_digits()
    lines = []
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        item_id = f"digit_{target}/{index:04d}.png"
        path = root / item_id
        gray = (pixels / 16.0 * 255).round().astype(np.uint8)  # the scans hold 0..16
        if not path.exists():  # PNG encoding is deterministic: an existing file has these bytes
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gray).resize((SIZE, SIZE), Image.Resampling.NEAREST).save(path)
        lines.append(
            {
                "path": item_id,
                "id": item_id,
                "labels": [f"digit_{target}"],
                "metadata": {
                    "split": _split(item_id),
                    "index": index,
                    "ink": round(float((gray > 127).mean()), 4),
                },
            }
        )
    index_file = root / "index.jsonl"
    index_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {len(lines)} digit images under {root}")
    return index_file


def import_digits(index_file: Path, uri: Path = STORE) -> str:
    """Import the digits into the store at ``uri`` (idempotent) and return the store's URI."""
    result = sluicegate.import_dataset("jsonl", index_file, uri, message="scikit-learn digits", progress=True)
    if result.committed:
        print(
            f"imported {result.items} items as version {result.version} "
            f"({result.blobs_uploaded} files uploaded, {result.blobs_present} already stored)"
        )
    else:
        print(f"version {result.version} already holds these {result.items} items: no new version needed")
    return str(uri)


def show_queries(uri: str) -> None:
    """Print the versions and the size of a few slices of the latest version."""
    log = sluicegate.Store(uri).log()
    print(f"{uri}: versions {', '.join(str(v.version) for v in log)}; latest has {log[-1].items} items")
    for query in QUERIES:
        print(f"  {len(sluicegate.open(uri, query=query)):5d}  {query}")


CLASSES = [f"digit_{d}" for d in range(10)]


def to_xy(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """A streamed sample -> (1x32x32 float image in [0, 1], class index)."""
    return sample["image"].float().div_(255.0), CLASSES.index(sample["annotations"][0]["label"])


def model() -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, len(CLASSES)),
    )


def train(uri: str, epochs: int = 3, batch_size: int = 32, seed: int = 0) -> float:
    """Train on the streamed train slice, then return the accuracy on the streamed test slice."""
    import torch  # here, so that the import part of the demo runs without it

    torch.manual_seed(seed)
    ds = sluicegate.open(uri)
    # Iterable form: this rank's shuffled epoch order, fetched with read-ahead; set_epoch reshuffles.
    train_set = ds.slice('meta.split = "train"').shuffle(seed)
    train_data = train_set.to_pytorch(iterable=True, decode="image", image_mode="L", transform=to_xy)
    test_data = ds.slice('meta.split = "test"').to_pytorch(decode="image", image_mode="L", transform=to_xy)
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = train_data.loader(batch_size=batch_size)
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[loss]}")) as progress:
        task = progress.add_task("training", total=epochs * len(loader), loss="")
        for epoch in range(epochs):
            train_data.set_epoch(epoch)
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(net(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress.update(
                    task, advance=1, description=f"epoch {epoch + 1}/{epochs}", loss=f"loss {loss.item():.3f}"
                )
    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_data.loader(batch_size=256):
            correct += int((net(x).argmax(1) == y).sum())
    accuracy = correct / len(test_data)
    print(f"held-out accuracy on {len(test_data)} streamed test digits: {accuracy:.1%} (chance: 10%)")
    return accuracy


def main() -> None:
    index_file = prepare_digits()
    uri = import_digits(index_file)
    show_queries(uri)
    train(uri)


if __name__ == "__main__":
    main()
