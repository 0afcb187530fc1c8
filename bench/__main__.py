"""``python -m bench [NAME ...]``: run the named benchmarks (all when none is named)."""

from __future__ import annotations

import importlib
import json
import sys

# name -> module with run() -> dict; add a line per benchmark.
BENCHMARKS = {
    "store_query": "bench.store_query",
    "stream": "bench.stream",
    "operator_scale": "bench.operator_scale",
    "stream_sidecar": "bench.stream_sidecar",
    "import_speed": "bench.import_speed",
    "admission_flood": "bench.admission_flood",
    "ledger": "bench.ledger",
    "gil": "bench.gil",
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names:
        result = importlib.import_module(BENCHMARKS[name]).run()
        print(json.dumps({name: result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
