"""The CRDs in crds/ are generated from the pydantic models and are structural."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from sluicegate_operator import crdgen

FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"}


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("directory", [crdgen.CRD_DIR, crdgen.CHART_CRD_DIR], ids=["crds", "chart"])
@pytest.mark.parametrize("kind", crdgen.KINDS, ids=lambda k: k.kind)
def test_committed_crd_equals_generated(kind: crdgen.Kind, directory: Path) -> None:
    committed = directory / kind.filename
    assert committed.read_text() == crdgen.render(kind), "run: python -m sluicegate_operator.crdgen"


def test_check_mode_detects_stale_files(tmp_path: Path) -> None:
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 1
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / crdgen.KINDS[0].filename).write_text("edited")
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("kind", crdgen.KINDS, ids=lambda k: k.kind)
def test_schema_is_structural_and_described(kind: crdgen.Kind) -> None:
    crd = yaml.safe_load(crdgen.render(kind))
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    root = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert not FORBIDDEN & node.keys(), f"{path} has {FORBIDDEN & node.keys()}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        # kubectl explain shows these: every field under spec and status says what it is.
        if path.startswith((".spec", ".status")) and not path.endswith("{}"):
            assert node.get("description"), f"{path} has no description"
    assert next(c["name"] for c in version["additionalPrinterColumns"]) == "Ready"


def test_stream_schema_carries_cel_rules() -> None:
    crd = yaml.safe_load(crdgen.render(crdgen.KINDS[1]))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["version"]["x-kubernetes-int-or-string"] is True
    rules = {
        name: [r["rule"] for r in node.get("x-kubernetes-validations", [])] for name, node in spec.items()
    }
    assert "type(self) == int ? self >= 1 : self == 'latest'" in rules["version"]
    assert "self == oldSelf" in rules["dataset"]
    assert any("worldSize" in r for r in rules["sharding"])
    assert spec["sharding"]["properties"]["rankSource"]["enum"] == ["auto", "indexedJob", "torchrun", "spec"]
    assert spec["sharding"]["properties"]["worldSize"]["minimum"] == 1
    assert spec["sharding"]["default"] == {}
