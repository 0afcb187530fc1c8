"""e2e tests run against the real control plane from tests/testbed (issue #4)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.testbed import Testbed, pytest_plugin, wait_for  # noqa: E402

# The session fixture and the hook attaching component logs to failures.
testbed = pytest_plugin.testbed
pytest_runtest_makereport = pytest_plugin.pytest_runtest_makereport


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: needs the Kubernetes testbed (built from Go modules on first use)"
    )


@pytest.fixture
def namespace(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists, deleted afterwards."""
    name = f"e2e-{request.node.name[5:25].replace('_', '-').strip('-').lower()}-{uuid.uuid4().hex[:6]}"
    testbed.kubectl("create", "namespace", name)
    wait_for(
        lambda: testbed.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        what=f"the default ServiceAccount in {name}",
    )
    yield name
    testbed.kubectl("delete", "namespace", name, "--wait=false")
