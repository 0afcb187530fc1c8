"""Data-path benchmarks of the engine and the sidecar (peer comparisons live in the stream benchmark).

(a) Time to first item on a 1,000,000-item manifest (the store_query benchmark's synthetic manifest),
    embedded, in a fresh process: ``open()`` then ``next(iter(ds))``; plain and sliced+shuffled+sharded.
(b) Embedded, warm (in the memory cache): items/s against a plain loop reading the same files and a
    torch DataLoader (no workers) over them, same run, interleaved. Target >= 0.9x the DataLoader.
    Also uncached: a fresh dataset whose cache is smaller than the data reads and sha256-verifies every
    blob from the local store (the files themselves in the page cache, as for the plain loop).
(c) Sidecar over loopback TCP and a unix socket, warm: GB/s for 4 MB items (target >= 1 GB/s) and
    items/s for 100 KB items; peak RSS of the sidecar and of the client.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench import machine, write_results

_PY = sys.executable
_SIDECAR = str(Path(sys.executable).parent / "sluicegate-sidecar")


def _store(root: Path, n: int, size: int) -> None:
    from sluicegate import Store
    from sluicegate.core.manifest import ItemRecord, records_to_table

    store = Store(root)
    records = []
    for i in range(n):
        data = os.urandom(size)
        records.append(
            ItemRecord(
                id=f"i{i:07d}", blob=store.put_blob(data), size=size, media_type="application/octet-stream"
            )
        )
    store.commit(lambda _: records_to_table(records))


def _million(root: Path) -> None:
    """The synthetic 1M manifest, with real blobs behind every 1000th row (enough for any first batch)."""
    from sluicegate import Store

    from bench.store_query import synthetic_manifest

    store = Store(root)
    table = synthetic_manifest(1_000_000)
    blobs = [store.put_blob(os.urandom(100_000) + i.to_bytes(4, "big")) for i in range(1000)]
    column = pa.array([blobs[i % 1000] for i in range(table.num_rows)], pa.string())
    for name, values in (("blob", column), ("size", pa.array([100_004] * table.num_rows, pa.int64()))):
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), values)
    store.commit(lambda _: table)


_PRELUDE = """
import json, sys, time
def peak_rss_mb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report the parent's peak.
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmHWM")).split()[1]) / 1024
"""

_TTFI = """
import json, sys, time
t0 = time.perf_counter()
import sluicegate
t1 = time.perf_counter()
ds = sluicegate.open(sys.argv[1])
if len(sys.argv) > 2:
    ds = ds.slice(sys.argv[2]).shuffle(7).shard(3, 8)
item = next(iter(ds))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_item_s": t2 - t1, "items": len(ds)}))
"""

_EMBEDDED = (
    _PRELUDE
    + """

from pathlib import Path
import torch
import sluicegate
root = Path(sys.argv[1])
files = sorted(str(p) for p in (root / "blobs").iterdir())

class Files(torch.utils.data.Dataset):
    def __len__(self): return len(files)
    def __getitem__(self, i): return Path(files[i]).read_bytes()

loader = torch.utils.data.DataLoader(Files(), batch_size=64, num_workers=0, collate_fn=lambda b: b)
ds = sluicegate.open(root, cache_bytes=4 * 2**30)

def rate(run):
    t = time.perf_counter(); n = run(); return n / (time.perf_counter() - t)

plain = lambda: sum(1 for f in files if Path(f).read_bytes())
torch_ = lambda: sum(len(b) for b in loader)
embedded = lambda: sum(1 for item in ds if item.data)

def uncached():
    with sluicegate.open(root, cache_bytes=64 * 2**20) as fresh:
        return sum(1 for item in fresh if item.data)

runs = (("plain", plain), ("dataloader", torch_), ("sluicegate", embedded), ("sluicegate_uncached", uncached))
out = {name: [] for name, _ in runs}
embedded(); plain(); torch_()  # warm: page cache for files, memory cache for sluicegate
for _ in range(5):
    for name, run in runs:
        out[name].append(rate(run))
out["rss_mb"] = peak_rss_mb()
print(json.dumps(out))
"""
)

_CLIENT = (
    _PRELUDE
    + """

import sluicegate
ds = sluicegate.connect(sys.argv[1])
for _ in ds: pass  # warms the sidecar's cache
rates, gbs = [], []
for _ in range(8):
    t = time.perf_counter(); n = b = 0
    for item in ds:
        n += 1; b += len(item.data)
    dt = time.perf_counter() - t
    rates.append(n / dt); gbs.append(b / dt / 1e9)
print(json.dumps({"items_s": rates, "gb_s": gbs, "client_rss_mb": peak_rss_mb()}))
"""
)


def _json(cmd: list[str]) -> dict[str, Any]:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _sidecar_case(root: Path, work: Path, kind: str) -> dict[str, Any]:
    sock = work / f"{kind}.sock"
    proc = subprocess.Popen(
        [_SIDECAR, "--store", str(root), "--listen", f"127.0.0.1:0,unix://{sock}", "--cache-memory", "2Gi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        addresses = proc.stdout.readline().split("listening on ")[1].split()
        address = addresses[0] if kind == "tcp" else addresses[1]
        result = _json([_PY, "-c", _CLIENT, address])
        with open(f"/proc/{proc.pid}/status") as status:
            hwm = next(line for line in status if line.startswith("VmHWM"))
        result["sidecar_rss_mb"] = int(hwm.split()[1]) / 1024
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def run() -> dict[str, Any]:
    result: dict[str, Any] = {"machine_before": machine()}
    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        work = Path(tmp)
        _million(work / "m1")
        query = 'meta.split = "train" and labels.car >= 1'
        ttfi = {
            name: [_json([_PY, "-c", _TTFI, str(work / "m1"), *args]) for _ in range(3)]
            for name, args in (("plain", []), ("sliced_shuffled_sharded", [query]))
        }
        result["ttfi"] = {
            name: {
                "first_item_s": statistics.median(r["first_item_s"] for r in runs),
                "import_s": statistics.median(r["import_s"] for r in runs),
                "items": runs[0]["items"],
            }
            for name, runs in ttfi.items()
        }
        _store(work / "small", 3000, 100_000)
        _store(work / "big", 100, 4_000_000)
        embedded = _json([_PY, "-c", _EMBEDDED, str(work / "small")])
        result["embedded_100kb"] = {
            k: statistics.median(v) if isinstance(v, list) else v for k, v in embedded.items()
        }
        result["embedded_100kb_best"] = {k: max(v) for k, v in embedded.items() if isinstance(v, list)}
        result["sidecar"] = {
            f"{size}_{kind}": _sidecar_case(work / size, work, kind)
            for size in ("big", "small")
            for kind in ("tcp", "unix")
        }
    result["machine_after"] = machine()
    write_results("stream_sidecar", result, _markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    m0, m1 = r["machine_before"], r["machine_after"]
    e, b = r["embedded_100kb"], r["embedded_100kb_best"]
    lines = [
        "# stream_sidecar benchmark",
        "",
        f"Command: `python -m bench stream_sidecar` — {m0['date_utc']}, {m0['cpus']} CPUs, load average "
        f"{m0['load_average_1m']} before / {m1['load_average_1m']} after. Medians (best of the rounds in "
        "brackets where the rounds are many: the machine is shared, so the best is the least disturbed).",
        "",
        "## Time to first item, 1,000,000-item manifest, embedded, fresh process",
        "",
        "| view | items | open → first item (s) | import sluicegate (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, t in r["ttfi"].items():
        lines.append(f"| {name} | {t['items']:,} | {t['first_item_s']:.3f} | {t['import_s']:.3f} |")
    lines += [
        "",
        "## Embedded, warm, 3,000 × 100 KB items, no workers (items/s)",
        "",
        "| plain file loop | torch DataLoader over files | sluicegate.open | ratio to DataLoader "
        "| sluicegate.open, uncached (read + sha256) |",
        "|---:|---:|---:|---:|---:|",
        f"| {e['plain']:,.0f} ({b['plain']:,.0f}) | {e['dataloader']:,.0f} ({b['dataloader']:,.0f}) "
        f"| {e['sluicegate']:,.0f} ({b['sluicegate']:,.0f}) | {e['sluicegate'] / e['dataloader']:.2f}x "
        f"| {e['sluicegate_uncached']:,.0f} ({b['sluicegate_uncached']:,.0f}) |",
        "",
        f"Peak RSS of that process: {e['rss_mb']:.0f} MB (300 MB of items cached).",
        "",
        "## Sidecar over loopback, warm (client and sidecar share the 2 CPUs)",
        "",
        "| case | items/s | GB/s | sidecar peak RSS (MB) | client peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in r["sidecar"].items():
        label = name.replace("big", "4 MB ×100").replace("small", "100 KB ×3000").replace("_", ", ")
        lines.append(
            f"| {label} | {statistics.median(c['items_s']):,.0f} ({max(c['items_s']):,.0f}) "
            f"| {statistics.median(c['gb_s']):.2f} ({max(c['gb_s']):.2f}) "
            f"| {c['sidecar_rss_mb']:.0f} | {c['client_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
