"""Leaving a loop early and exiting the interpreter prints nothing: no tracebacks from the read-ahead
that was still running (embedded and sidecar-free DataLoader workers alike)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.sidecar.helpers import make_dataset

_SCRIPTS = {
    "for-loop": """
        ds = sluicegate.open(URI, cache_bytes=40_000)
        for i, item in enumerate(ds):
            if i == 3:
                break
        print("left after", i + 1)
    """,
    "dataloader-workers": """
        loader = sluicegate.open(URI, cache_bytes=40_000).to_pytorch(iterable=True).loader(
            batch_size=4, num_workers=2
        )
        for i, batch in enumerate(loader):
            if i == 2:
                break
        print("left after", i + 1)
    """,
    "disk-tier": """
        import tempfile
        ds = sluicegate.open(URI, cache_bytes=4_000_000, disk_cache=tempfile.mkdtemp())
        for i, item in enumerate(ds):
            if i == 300:
                break
        print("left after", i + 1)
    """,
    "exception-in-loop": """
        ds = sluicegate.open(URI, cache_bytes=40_000)
        try:
            for item in ds:
                raise KeyError("trainer bug")
        except KeyError:
            print("left after 1")
    """,
}


@pytest.mark.parametrize("case", sorted(_SCRIPTS))
def test_leaving_a_loop_early_exits_quietly(case: str, tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    make_dataset(uri, 400, size=100_000)  # 40 MB through a small cache: read-ahead is busy at exit
    script = f"import sluicegate\nURI = {uri!r}\n" + textwrap.dedent(_SCRIPTS[case])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("left after"), done.stdout
    assert done.stderr == "", done.stderr
