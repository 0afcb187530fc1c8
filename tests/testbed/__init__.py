"""A real Kubernetes control plane on loopback for the e2e tests (issue #4); see README.md here."""

from .build import BuildFailed, GoUnavailable, ensure_binaries, pinned_versions
from .cluster import WEBHOOK_CALLER, CommandError, Testbed, TestbedError, stop_process_group, wait_for

__all__ = [
    "WEBHOOK_CALLER",
    "BuildFailed",
    "CommandError",
    "GoUnavailable",
    "Testbed",
    "TestbedError",
    "ensure_binaries",
    "pinned_versions",
    "stop_process_group",
    "wait_for",
]
