"""pytest fixtures for the versitygw S3 server.

Use from a test module or conftest with `from tests.s3server.fixtures import s3_server  # noqa: F401`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from . import GoUnavailable, S3Server, build


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    capture = request.config.pluginmanager.getplugin("capturemanager")
    try:
        # A cold build takes minutes; show its progress instead of a silent hang.
        with capture.global_and_fixture_disabled():
            binary = build()
    except GoUnavailable as error:
        # CI must exercise the real server, so there a missing toolchain is an error, not a quiet skip.
        if os.environ.get("CI") == "true":
            pytest.fail(f"S3 server unavailable and CI=true, so this is not skipped: {error}", pytrace=False)
        pytest.skip(f"S3 server unavailable: {error}")
    with S3Server(binary=binary) as server:
        yield server
