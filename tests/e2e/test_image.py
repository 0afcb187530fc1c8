"""The container image built from the Dockerfile (tests/testbed/image.py), run under runc: what it holds,
who it runs as, and that both entrypoints behave as the chart and the webhook expect them to. The session
fixture `image` (conftest) builds it, or skips without buildah (fails under CI=true)."""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

import httpx
import pytest
from sluicegate.core import protocol as proto

from tests.sidecar.helpers import make_dataset
from tests.testbed.cluster import free_ports, wait_for
from tests.testbed.image import Image, run_container, run_in_image

pytestmark = pytest.mark.e2e

NON_ROOT = 65532
# Measured at 643 MiB (pyarrow and duckdb are most of it); the bound catches torch or a toolchain sneaking in.
MAX_SIZE_BYTES = 800 * 2**20

_INSPECT = """
import importlib.util, json, os, shutil
import sluicegate, sluicegate_sidecar, sluicegate_operator
print(json.dumps({
    "uid": os.getuid(),
    "gid": os.getgid(),
    "compilers": [c for c in ("gcc", "cc", "c++", "clang", "make") if shutil.which(c)],
    "frameworks": [m for m in ("torch", "tensorflow") if importlib.util.find_spec(m)],
    "native": importlib.util.find_spec("sluicegate.core.engine._native") is not None,
    "entrypoints": {e: shutil.which(e) for e in ("sluicegate", "sluicegate-sidecar", "sluicegate-operator")},
}))
"""


def test_archive_is_tagged_with_the_image_name(image: Image) -> None:
    # `ctr images import` names a docker-archive's image after its RepoTags.
    with tarfile.open(image.archive) as tar:
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        assert [entry["RepoTags"] for entry in json.load(manifest)] == [[image.name]]
    assert image.name.startswith("localhost/sluicegate:")


def test_non_root_with_the_native_reader_without_compilers_or_ml_frameworks(image: Image) -> None:
    assert image.user == f"{NON_ROOT}:{NON_ROOT}"
    result = run_in_image(image, ["python", "-c", _INSPECT])
    assert result.returncode == 0, result.stdout
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (found["uid"], found["gid"]) == (NON_ROOT, NON_ROOT)
    assert found["compilers"] == []
    assert found["frameworks"] == []
    # Built in the Dockerfile's build stage, whose compiler stays behind.
    assert found["native"]
    assert found["entrypoints"] == {
        e: f"/opt/sluicegate/bin/{e}" for e in ("sluicegate", "sluicegate-sidecar", "sluicegate-operator")
    }
    print(f"image size: {image.size_bytes} bytes ({image.size_bytes / 2**20:.0f} MiB)")
    assert image.size_bytes < MAX_SIZE_BYTES


def test_sidecar_serves_a_local_store(image: Image, tmp_path: Path) -> None:
    store = tmp_path / "store"
    expected = make_dataset(str(store), 12, size=3000)
    (port,) = free_ports(1)
    command = [
        "sluicegate-sidecar",
        "--store=/data/store",
        f"--listen=127.0.0.1:{port}",
        "--rank=0",
        "--world-size=1",
    ]
    with run_container(image, command, volumes=[(store, "/data/store")]) as proc:
        output: list[str] = []
        assert proc.stdout is not None
        # Drained all along, so a chatty log never blocks the sidecar on a full pipe.
        threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:

            def ready() -> bool:
                assert proc.poll() is None, f"sidecar exited {proc.returncode}:\n{''.join(output)}"
                try:
                    return client.get(proto.Paths.READYZ).status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, timeout_s=60, what=f"the sidecar's /readyz on {base}")
            assert client.get(proto.Paths.READYZ).json() == {"status": "ready", "items": 12}
            response = client.get(proto.Paths.ITEM_BY_ID, params={"id": "item000007"})
            assert response.status_code == 200, response.text
            header, blobs = proto.decode_batch(response.content)
        assert [row.id for row in header.rows] == ["item000007"]
        assert blobs == [expected["item000007"]]


def test_operator_without_cluster_config_fails_clearly(image: Image) -> None:
    result = run_in_image(image, ["sluicegate-operator"], timeout_s=60)
    assert result.returncode != 0, result.stdout
    # Neither in-cluster credentials nor a kubeconfig: one line saying so and what to do, no traceback.
    assert "no cluster to connect to" in result.stdout, result.stdout
    assert "pass --kubeconfig or set KUBECONFIG" in result.stdout
    assert "Traceback" not in result.stdout
