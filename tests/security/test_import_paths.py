"""An annotation file from someone else cannot make the importer upload files outside the import's roots
(attacks through the CLI, as a user would run it on a file they were sent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sluicegate import Store

from tests.conftest import PngWriter


def _import(*args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).parent / "sluicegate"
    return subprocess.run(
        [str(cli), "dataset", "import", "--no-progress", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_a_jsonl_index_cannot_reach_files_outside_its_directory(
    escape: str, tmp_path: Path, write_png: PngWriter
) -> None:
    secret = tmp_path / "home" / "private" / "passport.png"  # a readable file of the victim's
    secret.parent.mkdir(parents=True)
    write_png(secret)
    sent = tmp_path / "downloads"
    sent.mkdir()
    write_png(sent / "cat.png")
    path = {
        "absolute": str(secret),
        "dotdot": "../home/private/passport.png",
        "symlink": "innocent.png",
    }[escape]
    if escape == "symlink":
        (sent / "innocent.png").symlink_to(secret)
    index = sent / "items.jsonl"
    index.write_text(json.dumps({"path": "cat.png"}) + "\n" + json.dumps({"path": path}) + "\n")
    store = tmp_path / "store"
    refused = _import("--format", "jsonl", str(index), str(store))
    assert refused.returncode != 0
    assert "outside the import's roots" in refused.stderr
    assert "--allow DIR" in refused.stderr
    assert not (store / "versions").exists(), "nothing may be committed"
    assert not store.exists() or not any((store / "blobs").glob("*")), "nothing may be uploaded"
    # Naming the directory lets it in: the rule is a default, not a wall.
    allowed = _import("--format", "jsonl", "--allow", str(secret.parent), str(index), str(store))
    assert allowed.returncode == 0, allowed.stderr
    table, _ = Store(store).manifest()
    assert table.num_rows == 2
