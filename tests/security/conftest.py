"""The adversarial suite: every multi-tenant attack of issue #11, run through the public surfaces.

One control plane per module (the operator as a local process under the chart's ServiceAccount, on the
testbed's real API server), with a victim (the Dataset ``coco`` in ``data_ns``, streamed by ``trainer``
in ``team_ns``) and an attacker: the user ``mallory`` with the built-in ``edit`` role in her own
namespace ``evil`` (which aggregates sluicegate's), acting through ``kubectl --as``, the broker's HTTPS
and real pod-bound tokens. Nothing here reaches into the operator's process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import s3 as s3
from tests.e2e.conftest import shared_testbed
from tests.s3server.fixtures import s3_server as s3_server
from tests.testbed import Testbed, pytest_plugin

from .tenants import Tenants, tenant_plane

pytest_runtest_makereport = pytest_plugin.pytest_runtest_makereport


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: needs the Kubernetes testbed (built from Go modules on first use)"
    )


@pytest.fixture(scope="session")
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    yield from shared_testbed(request)


@pytest.fixture(scope="package")
def tenants(testbed: Testbed, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    with tenant_plane(testbed, s3, tmp_path_factory.mktemp("operator") / "operator.log") as planted:
        yield planted
