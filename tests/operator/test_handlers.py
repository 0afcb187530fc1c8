"""Handler registration: the operator reacts to events only, which is what makes its cheap diff base safe."""

from __future__ import annotations

import kopf
from kubernetes import client
from sluicegate_operator import handlers
from sluicegate_operator.catalog import Catalog
from sluicegate_operator.kube import Kube
from sluicegate_operator.resolve import Sources
from sluicegate_operator.settings import Settings


def test_only_event_handlers_so_no_diff_base_is_needed() -> None:
    registry = kopf.OperatorRegistry()
    kube = Kube(client.ApiClient())
    policies = Sources(kube, "sluicegate-system", "sluicegate-sources")
    ctx = handlers.Context(kube=kube, catalog=Catalog(), settings=Settings(), policies=policies)
    handlers.register(registry, ctx)
    watched = {h.id for h in registry._watching.get_all_handlers()}
    assert {"reconcile", "count"} <= watched
    # A change, spawning or indexing handler would read the diff base EventsOnlyDiffBase leaves empty.
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    assert not registry._indexing.get_all_handlers()
    pod = kopf.Body({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"containers": []}})
    assert handlers.EventsOnlyDiffBase(prefix="sluicegate.io").build(body=pod) == {}
