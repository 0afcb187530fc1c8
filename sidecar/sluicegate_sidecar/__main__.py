"""``sluicegate-sidecar``: serve one shard of one pinned dataset version on loopback."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from sluicegate import SluicegateError
from sluicegate.core.alloc import keep_freed_memory

from .config import parse_args
from .server import Sidecar


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # this process frees a batch's worth of large blobs at a time
    try:
        config = parse_args(argv)
        served = asyncio.run(Sidecar(config).run())
    except SluicegateError as exc:
        print(f"sluicegate-sidecar: {exc}", file=sys.stderr)
        return 2
    return 0 if served else 2


if __name__ == "__main__":
    sys.exit(main())
