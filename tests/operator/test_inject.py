"""Pure admission logic: ranks from where Kubernetes puts them, idempotent injection, the JSON patch."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from sluicegate.core.broker_protocol import AUDIENCE, SOCKET_PATH, MixEnv, SidecarEnv, TrainerEnv
from sluicegate_operator import inject, webhook
from sluicegate_operator.inject import AdmissionDenied, SidecarTemplate
from sluicegate_operator.models import RankSource

from .conftest import stream

CONFIG = SidecarTemplate(image="sluicegate:test", broker_url="https://broker:8443", broker_ca_pem="PEM")


def pod(
    annotations: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "generateName": "job-",
            "labels": {"sluicegate.io/stream": "train", **(labels or {})},
            "annotations": annotations or {},
        },
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "trainer",
                    "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                }
            ]
        },
    }


def apply(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON-patch applier for the only op the webhook emits ("add" of an object member)."""
    out = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "add"
        *parents, last = op["path"].strip("/").split("/")
        target = out
        for part in parents:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        target[last.replace("~1", "/").replace("~0", "~")] = op["value"]
    return out


INDEX = inject.JOB_INDEX_ANNOTATION


@pytest.mark.parametrize(
    ("spec", "annotations", "env", "completions", "expected"),
    [
        ({}, {INDEX: "2"}, {}, 4, (2, 4, RankSource.INDEXED_JOB)),
        ({"worldSize": 8}, {INDEX: "5"}, {}, 4, (5, 8, RankSource.INDEXED_JOB)),
        ({}, {}, {"PET_NODE_RANK": "1", "PET_NNODES": "2:3", "RANK": "7"}, None, (1, 3, RankSource.TORCHRUN)),
        ({}, {}, {"RANK": "3", "WORLD_SIZE": "4"}, None, (3, 4, RankSource.TORCHRUN)),
        ({}, {}, {}, None, (0, 1, RankSource.SPEC)),
        (
            {"rankSource": "spec", "worldSize": 3},
            {"sluicegate.io/rank": "2", INDEX: "0"},
            {},
            None,
            (2, 3, RankSource.SPEC),
        ),
    ],
)
def test_detect_rank(
    spec: dict[str, Any],
    annotations: dict[str, str],
    env: dict[str, str],
    completions: int | None,
    expected: tuple[int, int, RankSource],
) -> None:
    rank = inject.detect_rank(pod(annotations, env), stream(sharding=spec), completions)
    assert (rank.rank, rank.world_size, rank.source) == expected


@pytest.mark.parametrize(
    ("spec", "annotations", "env", "message"),
    [
        ({"rankSource": "indexedJob"}, {}, {}, "Indexed"),
        ({}, {INDEX: "1"}, {}, "world size"),
        ({}, {INDEX: "x"}, {}, "not an integer"),
        ({"worldSize": 2}, {INDEX: "2"}, {}, "outside the world size 2"),
        ({"rankSource": "torchrun"}, {}, {}, "PET_NODE_RANK or RANK"),
        ({}, {}, {"RANK": "1"}, "WORLD_SIZE is missing"),
    ],
)
def test_detect_rank_refusals_say_what_to_fix(
    spec: dict[str, Any], annotations: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(AdmissionDenied, match=message):
        inject.detect_rank(pod(annotations, env), stream(sharding=spec))


def test_job_lookup_only_when_world_size_is_unknown() -> None:
    job_pod = pod({INDEX: "0"}, labels={inject.JOB_NAME_LABEL: "trainer"})
    assert inject.job_name_needed(job_pod, stream()) == "trainer"
    assert inject.job_name_needed(job_pod, stream(sharding={"worldSize": 4})) is None
    assert inject.job_name_needed(pod(), stream()) is None


def test_inject_adds_native_sidecar_token_socket_and_env() -> None:
    s = stream(cache={"memory": "1Gi", "disk": "10Gi"}, sidecar={"image": "custom:1"})
    before = pod({INDEX: "1"}, env={"SLUICEGATE_STREAM": "mine"})
    after = inject.inject(before, s, "team-a", inject.Rank(1, 4, RankSource.INDEXED_JOB), CONFIG)
    sidecar = after["spec"]["initContainers"][0]
    assert sidecar["name"] == inject.SIDECAR_NAME
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "custom:1"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env[SidecarEnv.BROKER_URL] == CONFIG.broker_url
    assert env[SidecarEnv.CACHE_DISK] == "10Gi"
    assert not any("SECRET" in k or "AWS" in k for k in env), "no storage credentials in the pod"
    volumes = {v["name"]: v for v in after["spec"]["volumes"]}
    token = volumes[inject.TOKEN_VOLUME]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == AUDIENCE
    assert "emptyDir" in volumes[inject.SOCKET_VOLUME]
    # Finding 9: the kubelet counts blocks and files being written, so the limit leaves headroom over
    # the budget the cache keeps (a limit equal to it evicts the pod at a full cache).
    assert int(volumes[inject.CACHE_VOLUME]["emptyDir"]["sizeLimit"]) == 10 * 2**30 + 2**30
    main = after["spec"]["containers"][0]
    main_env = {e["name"]: e["value"] for e in main["env"]}
    assert main_env[TrainerEnv.ADDRESS] == f"unix://{SOCKET_PATH}"
    assert main_env[TrainerEnv.RANK] == "1"
    assert main_env[TrainerEnv.WORLD_SIZE] == "4"
    assert main_env["SLUICEGATE_STREAM"] == "mine", "a value the user set is kept"
    assert {m["name"] for m in main["volumeMounts"]} == {inject.SOCKET_VOLUME}
    assert after["metadata"]["annotations"][inject.RANK_ANNOTATION] == "1"
    assert after["metadata"]["labels"][inject.INJECTED_LABEL] == "true"
    assert before["spec"].get("initContainers") is None, "the input is not mutated"


def test_a_mix_gets_one_sidecar_per_source_and_its_trainer_the_mix() -> None:
    sources = [
        {"name": "coco", "dataset": {"name": "coco"}, "weight": 0.7},
        {"name": "web", "dataset": {"name": "web", "namespace": "other"}, "weight": 0.3},
    ]
    s = stream(sources=sources, cache={"disk": "1Gi"}, sharding={"seed": 5}, epochLength="all_exhausted")
    config = SidecarTemplate(**{**CONFIG.__dict__, "metrics_token_sha256": "ab" * 32})
    after = inject.inject(pod({INDEX: "1"}), s, "team-a", inject.Rank(1, 2, RankSource.INDEXED_JOB), config)
    sidecars = after["spec"]["initContainers"]
    assert [c["name"] for c in sidecars] == ["sluicegate-sidecar-coco", "sluicegate-sidecar-web"]
    envs = [{e["name"]: e["value"] for e in c["env"]} for c in sidecars]
    assert [e[SidecarEnv.SOURCE] for e in envs] == ["coco", "web"]
    sockets = ["/var/run/sluicegate/coco.sock", "/var/run/sluicegate/web.sock"]
    assert [e[SidecarEnv.LISTEN] for e in envs] == [f"unix://{p}" for p in sockets]
    assert [c["startupProbe"]["exec"]["command"][-1] for c in sidecars] == sockets
    assert [e[SidecarEnv.CACHE_DIR] for e in envs] == [
        "/var/cache/sluicegate/coco",
        "/var/cache/sluicegate/web",
    ]
    # One metrics port each (they share the pod's network), all under the name the PodMonitor scrapes.
    assert [c["ports"] for c in sidecars] == [
        [{"name": inject.METRICS_PORT_NAME, "containerPort": port, "protocol": "TCP"}]
        for port in (9464, 9465)
    ]
    volumes = {v["name"]: v for v in after["spec"]["volumes"]}
    assert int(volumes[inject.CACHE_VOLUME]["emptyDir"]["sizeLimit"]) == 2 * 2**30 + 2**30 // 5
    main_env = {e["name"]: e["value"] for e in after["spec"]["containers"][0]["env"]}
    assert TrainerEnv.ADDRESS not in main_env
    mix = MixEnv.model_validate_json(main_env[TrainerEnv.MIX])
    assert [(x.name, x.address, x.weight) for x in mix.sources] == [
        ("coco", f"unix://{sockets[0]}", 0.7),
        ("web", f"unix://{sockets[1]}", 0.3),
    ]
    assert (mix.epoch_length, mix.seed) == ("all_exhausted", 5)
    assert inject.inject(after, s, "team-a", inject.Rank(1, 2, RankSource.INDEXED_JOB), config) == after
    with pytest.raises(AdmissionDenied, match="sluicegate-sidecar-web, which only the sluicegate webhook"):
        inject.refuse_preinjected({"spec": {"containers": [{"name": "sluicegate-sidecar-web"}]}})


def test_injection_is_idempotent_and_patch_reproduces_it() -> None:
    before = pod({INDEX: "0"})
    rank = inject.Rank(0, 2, RankSource.INDEXED_JOB)
    after = inject.inject(before, stream(), "team-a", rank, CONFIG)
    ops = inject.json_patch(before, after)
    assert apply(before, ops) == after
    assert inject.inject(after, stream(), "team-a", rank, CONFIG) == after
    assert inject.json_patch(after, inject.inject(after, stream(), "team-a", rank, CONFIG)) == []


def test_volume_name_clash_is_refused() -> None:
    clashing = pod()
    clashing["spec"]["volumes"] = [{"name": inject.SOCKET_VOLUME, "emptyDir": {}}]
    with pytest.raises(AdmissionDenied, match="volumes named"):
        inject.inject(clashing, stream(), "team-a", inject.Rank(0, 1, RankSource.SPEC), CONFIG)


def test_webhook_configuration_selects_labelled_pod_creates_only() -> None:
    config = webhook.configuration("sluicegate", {"url": "https://x/mutate"})
    (hook,) = config["webhooks"]
    assert hook["rules"][0]["operations"] == ["CREATE"]
    assert hook["rules"][0]["resources"] == ["pods"]
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": inject.STREAM_LABEL, "operator": "Exists"}]
    }
    assert hook["sideEffects"] == "None"
    denied = webhook.review_response("u1", denied="no")["response"]
    assert denied == {
        "uid": "u1",
        "allowed": False,
        "status": {"code": 403, "reason": "Forbidden", "message": "no"},
    }
