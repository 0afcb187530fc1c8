"""pytest integration: a session-scoped `testbed` fixture and component logs attached to failing tests.

Load it from a conftest with `from tests.testbed.pytest_plugin import *  # noqa: F403`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from .build import GoUnavailable, ensure_binaries
from .cluster import Testbed

__all__ = ["pytest_runtest_makereport", "testbed"]


def _unavailable(reason: str) -> NoReturn:
    # CI must exercise the real control plane, so there a missing toolchain is an error, not a quiet skip.
    if os.environ.get("CI") == "true":
        pytest.fail(f"testbed unavailable and CI=true, so this is not skipped: {reason}", pytrace=False)
    pytest.skip(f"testbed unavailable: {reason}")


@pytest.fixture(scope="session")
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    capture = request.config.pluginmanager.getplugin("capturemanager")
    try:
        # A cold build takes many minutes; show its progress instead of a silent hang.
        with capture.global_and_fixture_disabled():
            binaries = ensure_binaries()
    except GoUnavailable as error:
        _unavailable(str(error))
    workdir = Path(tempfile.mkdtemp(prefix="sluicegate-testbed-"))
    bed = Testbed(workdir, binaries)
    try:
        bed.start()
        yield bed
    finally:
        bed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    bed = getattr(item, "funcargs", {}).get("testbed")
    if report.failed and isinstance(bed, Testbed):
        report.sections.append(("testbed component logs (last lines)", bed.log_tails()))
    return report
