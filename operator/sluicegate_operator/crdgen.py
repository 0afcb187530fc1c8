"""Generate ``crds/*.yaml`` from the pydantic models (``python -m sluicegate_operator.crdgen``).

pydantic writes JSON Schema; a CRD wants a *structural* OpenAPI v3 schema: no ``$ref``, no
``anyOf`` with null for optional fields (absent is how Kubernetes says unset), ``const`` spelled as
an ``enum``, exclusive bounds as OpenAPI 3.0 flags. This module does that translation and wraps the
schemas in CRDs with the status subresource and printer columns. ``--check`` exits non-zero when the
committed files differ, and ``tests/operator/test_crdgen.py`` runs the same comparison.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel

from .models import GROUP, VERSION, DatasetSpec, DatasetStatus, DatasetStreamSpec, DatasetStreamStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
# Helm reads files only from inside the chart, so the chart carries identical copies.
CHART_CRD_DIR = REPO_ROOT / "charts" / "sluicegate" / "files" / "crds"
_DROP = {"title"}


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    description: str
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: tuple[dict[str, Any], ...]

    @property
    def filename(self) -> str:
        return f"{GROUP}_{self.plural}.yaml"


def _column(name: str, type_: str, path: str, description: str, priority: int = 0) -> dict[str, Any]:
    """An additionalPrinterColumn (``priority`` 1: shown by ``kubectl get -o wide`` only)."""
    column: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path, "description": description}
    if priority:
        column["priority"] = priority
    return column


_READY = _column(
    "Ready",
    "string",
    '.status.conditions[?(@.type=="Ready")].status',
    "Whether the object is ready to be streamed.",
)
_AGE: dict[str, Any] = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
_REASON = _column(
    "Reason", "string", '.status.conditions[?(@.type=="Ready")].reason', "Why the object is (not) ready.", 1
)

KINDS = (
    Kind(
        "Dataset",
        "datasets",
        ("sgds",),
        "A versioned dataset store that streams can read, with its credentials and row-level policies. "
        "Grant the verb 'stream' on it to let a ServiceAccount read it.",
        DatasetSpec,
        DatasetStatus,
        (
            _READY,
            _column("Version", "integer", ".status.latestVersion", "Newest version of the store."),
            _column("Items", "integer", ".status.items", "Items in the newest version."),
            _column("Source", "string", ".spec.source.uri", "Store URI.", 1),
            _REASON,
            _AGE,
        ),
    ),
    Kind(
        kind="DatasetStream",
        plural="datasetstreams",
        short_names=("sgs",),
        description="A query slice of one pinned Dataset version, sharded across the pods labelled "
        "sluicegate.io/stream=<name> in this namespace.",
        spec=DatasetStreamSpec,
        status=DatasetStreamStatus,
        columns=(
            _READY,
            _column("Dataset", "string", ".spec.dataset.name", "The Dataset streamed."),
            _column("Version", "integer", ".status.resolvedVersion", "The pinned manifest version."),
            _column("Items", "integer", ".status.matchedItems", "Items matching the query."),
            _column("Shards", "integer", ".status.shards", "Shards (ranks) when the world size is known."),
            _column("Pods", "integer", ".status.injectedPods", "Live pods with the sidecar injected."),
            _REASON,
            _AGE,
        ),
    ),
)


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema as a structural OpenAPI v3 schema."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    converted: dict[str, Any] = _convert(schema, defs)
    return converted


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # Keywords beside the $ref (description, default) describe this use and win over the target's.
        node = {**target, **node}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {any_of} structurally; use WithJsonSchema")
        node = {**_convert(options[0], defs), **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            # JSON Schema's exclusive bound is a number; OpenAPI v3.0's is a flag on the inclusive one.
            node[limit], node[bound] = value, True
    if node.get("default", 0) is None:
        del node["default"]
    if isinstance(node.get("default"), dict) and node.get("type") == "object":
        node["default"] = {}  # the API server fills nested defaults itself
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _convert(value, defs)
    return out


def crd(kind: Kind) -> dict[str, Any]:
    spec = structural(kind.spec)
    status = structural(kind.status)
    root = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: sluicegate.io/v1alpha1."},
            "kind": {"type": "string", "description": f"Kind: {kind.kind}."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "sluicegate"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": list(kind.short_names),
                "categories": ["sluicegate"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in kind.columns],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


_HEADER = (
    "# Generated by `python -m sluicegate_operator.crdgen` from sluicegate_operator/models.py; do not edit.\n"
)


def render(kind: Kind) -> str:
    body: str = yaml.safe_dump(crd(kind), sort_keys=False, width=100, allow_unicode=True)
    return _HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, action="append", help="directory to write (default: crds/ and the chart's copy)"
    )
    parser.add_argument("--check", action="store_true", help="fail if the files there are out of date")
    args = parser.parse_args(argv)
    stale = []
    for out in args.out or [CRD_DIR, CHART_CRD_DIR]:
        for kind in KINDS:
            path = out / kind.filename
            text = render(kind)
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
                continue
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m sluicegate_operator.crdgen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
