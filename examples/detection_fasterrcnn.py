"""Train torchvision's Faster R-CNN on a COCO dataset streamed through sluicegate.

1. ``make_coco()`` draws synthetic images with coloured rectangles and writes their COCO JSON;
2. ``sluicegate.import_dataset("coco", ...)`` imports them into a versioned store (the same as
   ``sluicegate dataset import --format coco``);
3. ``train()`` streams the store with ``to_pytorch(iterable=True, decode="image")`` and
   ``detection_collate`` (torchvision targets: boxes x1 y1 x2 y2, int64 labels) into
   ``fasterrcnn_mobilenet_v3_large_320_fpn`` built from scratch (no weights are downloaded).

    python examples/detection_fasterrcnn.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import sluicegate
import torch
from PIL import Image, ImageDraw
from sluicegate.torch import detection_collate
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

CLASSES = ["red", "green", "blue"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def make_coco(root: Path, count: int = 24, size: int = 160, seed: int = 0) -> Path:
    """``count`` images of 1-3 rectangles on grey noise under ``root/images`` and ``root/coco.json``."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        pixels = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        name = f"shapes_{index:04d}.jpg"
        for _ in range(int(rng.integers(1, 4))):
            label = CLASSES[int(rng.integers(len(CLASSES)))]
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=COLORS[label])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": CLASSES.index(label) + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        image.save(images_dir / name, quality=92)
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    coco = root / "coco.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return coco


def _as_float(sample: dict[str, object]) -> dict[str, object]:
    """uint8 CHW -> float in [0, 1] (in the DataLoader worker, before collation)."""
    image = sample["image"]
    assert isinstance(image, torch.Tensor)
    return {**sample, "image": image.float().div_(255.0)}


def train(uri: str, steps: int, batch_size: int = 4, workers: int = 0, seed: int = 0) -> list[float]:
    """Run ``steps`` optimiser steps on the streamed dataset; returns the loss of each step."""
    torch.manual_seed(seed)
    data = sluicegate.open(uri).shuffle(seed).to_pytorch(iterable=True, decode="image", transform=_as_float)
    loader = data.loader(batch_size=batch_size, num_workers=workers, collate_fn=detection_collate(CLASSES))
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=len(CLASSES) + 1, min_size=160, max_size=160
    )
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        data.set_epoch(epoch)
        for images, targets in loader:
            parts = model(images, targets)
            loss = sum(parts.values())
            assert isinstance(loss, torch.Tensor)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            terms = ", ".join(f"{name} {float(value.detach()):.3f}" for name, value in parts.items())
            print(f"step {len(losses):3d}  loss {losses[-1]:.3f}  ({terms})")
            if len(losses) == steps:
                break
        epoch += 1
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--work-dir", type=Path, help="where to write images and the store (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sluicegate-detection-"))
    coco = make_coco(work / "coco", count=args.images)
    result = sluicegate.import_dataset("coco", coco, work / "store", images=coco.parent / "images")
    print(f"imported {result.items} images as version {result.version} of {work / 'store'}")
    losses = train(str(work / "store"), args.steps, args.batch_size, args.workers)
    if not all(math.isfinite(v) for v in losses):
        raise SystemExit(f"a loss is not finite: {losses}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
