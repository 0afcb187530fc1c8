"""Operator scale benchmark (issue #6, item 6) on the testbed: a real API server, kwok nodes, the
operator as a local process registered like in the e2e tests, the dataset on the SigV4 S3 server.

(a) Admission: ``pods`` labelled pods created by ``concurrency`` clients, interleaved in rounds with as
    many unlabelled pods (the baseline: same spec, no label, so the webhook never sees them). Reported:
    the webhook's handler time (the operator logs one line per admission; cross-checked against its
    metrics histogram), the API server's own histogram of the webhook call, and the client-observed
    CREATE latency of both kinds, whose ratio is the webhook's cost. Target: handler p99 < 50 ms.
(b) ``streams`` DatasetStreams against one Dataset: from the first create until a watch has seen every
    one Ready. Target < 60 s.
(c) Broker, with real pod-bound tokens, a ``items``-item manifest cut into ``ranks`` shards. The sidecar
    asks for its plan rows only (``presign=false``) and for blob URLs in windows of ``url_window`` as its
    reads reach them (POST /v1/urls), so the two are measured apart: the plan's first request per rank
    (shard not cached yet), repeats one rank at a time (the target: >= 50,000 items/s) and all ranks at
    once; URL windows, items/s; and, for comparison, the plan with every URL presigned (what the sidecar
    asked for before), against the raw ``Store.presign_many`` rate in the same run.

Scale from the environment (defaults are the issue's numbers): SLUICEGATE_BENCH_PODS, _STREAMS, _ITEMS,
_RANKS, _CONCURRENCY, _ROUNDS, _REPEATS, _QUERIES, _URL_WINDOW. ``measure`` runs on a given testbed and S3
server (the e2e test runs it tiny); ``run`` starts both, sized for the pods, and writes
bench/results/operator_scale.*.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import ssl
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sluicegate import Store
from sluicegate.core.broker_protocol import AUDIENCE, BrokerPaths, PlanResponse, UrlsResponse
from sluicegate.core.store import blob_key
from sluicegate_operator.inject import RANK_ANNOTATION, STREAM_LABEL
from sluicegate_operator.webhook import DECISION_TTL_S

from bench import machine, write_results
from bench.store_query import synthetic_manifest
from tests.operator import devcluster
from tests.s3server import S3Server, build
from tests.testbed import Testbed, ensure_binaries, wait_for

GROUP_PATH = "/apis/sluicegate.io/v1alpha1"
TARGET_ADMISSION_P99_MS = 50.0
TARGET_STREAMS_READY_S = 60.0
TARGET_ITEMS_PER_S = 50_000
PODS_PER_NODE = 100  # kwok nodes offer 110 pod slots; leave room for the warm-up pods
WEBHOOK = "inject.sluicegate.io"
# The operator logs "admission NS/NAME: RESULT (REASON) in 12.3 ms" for every review.
_ADMISSION_LINE = re.compile(r"admission (\S+)/(\S+): (\w+) \((\w+)\) in ([\d.]+) ms")
_PLAN_SECONDS = ("sluicegate_broker_duration_seconds", {"endpoint": "plan"})
_URLS_SECONDS = ("sluicegate_broker_duration_seconds", {"endpoint": "urls"})


class BenchError(RuntimeError):
    """The system under test misbehaved (a refused create, a stream that never got Ready...)."""


@dataclass(frozen=True)
class Scale:
    pods: int = 1000
    streams: int = 500
    items: int = 100_000
    ranks: int = 4
    concurrency: int = 16
    # Admission batches per kind, alternating labelled and unlabelled: small batches, so both kinds see the
    # same cluster load, and labelled pods keep coming like those of a running job's pods.
    rounds: int = 50
    repeats: int = 5  # cached plan requests per rank
    queries: int = 50  # distinct stream queries (each is selected over the manifest once)
    url_window: int = 1000  # blobs per POST /v1/urls, as the sidecar asks by default

    @classmethod
    def from_env(cls) -> Scale:
        values: dict[str, int] = {}
        for f in fields(cls):
            raw = os.environ.get(f"SLUICEGATE_BENCH_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise BenchError(f"SLUICEGATE_BENCH_{f.name.upper()}={raw!r} is not an integer") from None
        scale = cls(**values)
        if min(asdict(scale).values()) < 1:
            raise BenchError(f"every SLUICEGATE_BENCH_* value must be >= 1, got {scale}")
        return scale

    @property
    def nodes(self) -> int:
        """kwok nodes so that every pod of the run finds a slot (and so really runs)."""
        return max(3, math.ceil((2 * self.pods + self.ranks) / PODS_PER_NODE))


# -- statistics ------------------------------------------------------------------------------------


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """n, mean and percentiles (nearest rank) of ``seconds``, in milliseconds."""
    if not seconds:
        return {"n": 0}
    ordered = sorted(seconds)

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)], 2)

    return {
        "n": len(ordered),
        "mean": round(1000 * statistics.fmean(ordered), 2),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": round(1000 * ordered[-1], 2),
    }


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)`` buckets (sorted, ending +Inf)."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le  # beyond the largest finite bucket: its bound is all we know
            return lower_le + (le - lower_le) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_le, lower_count = le, count
    return None


def _series(text: str, name: str, suffix: str, match: dict[str, str] | None) -> dict[float, float]:
    """Samples ``name`` + ``suffix`` of a /metrics page whose labels include ``match``, summed per ``le``
    (``nan`` for samples without one, like ``_sum`` and ``_count``)."""
    found: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name == name + suffix and all(labels.get(k) == v for k, v in (match or {}).items()):
                le = float(labels.get("le", "nan"))
                found[le] = found.get(le, 0.0) + sample.value
    return found


def histogram_delta(
    before: str, after: str, name: str, match: dict[str, str] | None = None
) -> list[tuple[float, float]]:
    """Cumulative buckets of histogram ``name`` (series whose labels include ``match``, summed) that
    were observed between two /metrics scrapes."""
    old, new = _series(before, name, "_bucket", match), _series(after, name, "_bucket", match)
    return sorted((le, count - old.get(le, 0.0)) for le, count in new.items())


def histogram_mean_ms(before: str, after: str, name: str, match: dict[str, str] | None = None) -> float:
    """Mean of the observations of histogram ``name`` between two scrapes, in milliseconds."""

    def total(text: str, suffix: str) -> float:
        return sum(_series(text, name, suffix, match).values())

    count = total(after, "_count") - total(before, "_count")
    return round(1000 * (total(after, "_sum") - total(before, "_sum")) / count, 1) if count else math.nan


def _histogram_report(buckets: list[tuple[float, float]], bound_s: float) -> dict[str, Any]:
    total = buckets[-1][1] if buckets else 0.0
    under = next((count for le, count in buckets if le >= bound_s - 1e-12), 0.0)
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    return {
        "count": int(total),
        "p50_ms_estimate": None if p50 is None else round(1000 * p50, 1),
        "p99_ms_estimate": None if p99 is None else round(1000 * p99, 1),
        f"share_within_{int(bound_s * 1000)}ms": round(under / total, 4) if total else None,
        "bucket_bounds_ms": [1000 * le for le, _ in buckets if not math.isinf(le)],
    }


# -- the cluster -----------------------------------------------------------------------------------


@dataclass
class Env:
    """What the phases share: the testbed, the operator, the namespaces and the dataset."""

    testbed: Testbed
    operator: devcluster.Operator
    data_ns: str
    team_ns: str
    streams_ns: str
    store: Store
    concurrency: int

    def _admin(self) -> ssl.SSLContext:
        """TLS for the API server as the testbed's admin (client certificate in system:masters)."""
        context = ssl.create_default_context(cafile=str(self.testbed.ca_bundle))
        pki = self.testbed.pki_dir
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return context

    def api(self) -> httpx.AsyncClient:
        """Admin access to the API server, pooled for ``concurrency`` callers."""
        pool = self.concurrency + 4
        return httpx.AsyncClient(
            base_url=self.testbed.server,
            verify=self._admin(),
            trust_env=False,
            timeout=60,
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        )

    def broker(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.operator.url, verify=self.operator.ca, trust_env=False, timeout=120
        )

    def scrape(self, url: str, client_cert: bool = False) -> str:
        """A /metrics page of the API server (``client_cert``) or of the operator."""
        context = self._admin() if client_cert else self.operator.ca
        return httpx.get(url, verify=context, trust_env=False, timeout=30).raise_for_status().text


def _stream(name: str, namespace: str, data_ns: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sluicegate.io/v1alpha1",
        "kind": "DatasetStream",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"dataset": {"namespace": data_ns, "name": "bench"}, **spec},
    }


def _pod(name: str, namespace: str, stream: str | None, rank: int) -> dict[str, Any]:
    """A bare pod of the ``trainer`` ServiceAccount; labelled and baseline pods differ only in the label."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "annotations": {RANK_ANNOTATION: str(rank)}}
    if stream is not None:
        meta["labels"] = {STREAM_LABEL: stream}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"serviceAccountName": "trainer", "containers": [{"name": "main", "image": "trainer:bench"}]},
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def _is_ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def _create_all(
    api: httpx.AsyncClient, path: str, bodies: Sequence[dict[str, Any]], concurrency: int
) -> tuple[list[float], list[dict[str, Any]]]:
    """POST every body, ``concurrency`` at a time; each request's latency and the created objects."""
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        async with gate:
            started = time.perf_counter()
            response = await api.post(path, json=body)
            elapsed = time.perf_counter() - started
        if response.status_code != 201:
            raise BenchError(
                f"creating {body['metadata']['name']}: {response.status_code} {response.text[:500]}"
            )
        created: dict[str, Any] = response.json()
        return elapsed, created

    done = await asyncio.gather(*(one(b) for b in bodies))
    return [d[0] for d in done], [d[1] for d in done]


def prepare(testbed: Testbed, s3: S3Server, scale: Scale, log: Path) -> Env:
    """Namespaces, the operator, a Dataset of ``scale.items`` items, a ServiceAccount that may stream it."""
    suffix = uuid.uuid4().hex[:6]
    data_ns, team_ns, streams_ns = f"bench-data-{suffix}", f"bench-team-{suffix}", f"bench-streams-{suffix}"
    bucket = f"bench-{suffix}"
    s3.create_bucket(bucket)
    options = s3.options()
    store = Store(f"s3://{bucket}/bench", options)
    # Blob hashes are synthetic (nothing to download); plan and presign never read blobs.
    store.commit(lambda _: synthetic_manifest(scale.items), message="bench")
    operator = devcluster.start(
        testbed,
        f"sluicegate-{suffix}",
        f"sgb-{suffix}",
        log,
        extra_args=("--sidecar-image=sluicegate:bench",),
    )
    env = Env(testbed, operator, data_ns, team_ns, streams_ns, store, scale.concurrency)
    try:
        for ns in (data_ns, team_ns, streams_ns):
            testbed.kubectl("create", "namespace", ns)
        devcluster.publish_dataset(testbed, data_ns, store.uri, s3, name="bench")
        testbed.kubectl("create", "serviceaccount", "trainer", "-n", team_ns)
        testbed.kubectl(
            "create", "role", "bench-stream", "-n", data_ns, "--verb=stream",
            "--resource=datasets.sluicegate.io", "--resource-name=bench",
        )  # fmt: skip
        testbed.kubectl(
            "create", "rolebinding", "bench-stream", "-n", data_ns, "--role=bench-stream",
            f"--serviceaccount={team_ns}:trainer",
        )  # fmt: skip
        wait_for(
            lambda: _is_ready(
                json.loads(testbed.kubectl("get", "dataset", "bench", "-n", data_ns, "-o", "json").stdout)
            ),
            timeout_s=120,
            what="Dataset bench Ready",
        )
    except BaseException:
        teardown(env)
        raise
    return env


def teardown(env: Env) -> None:
    env.operator.stop(env.testbed)
    for ns in (env.data_ns, env.team_ns, env.streams_ns, env.operator.namespace):
        env.testbed.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def _wait_stream_ready(
    api: httpx.AsyncClient, namespace: str, name: str, timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = await api.get(f"{GROUP_PATH}/namespaces/{namespace}/datasetstreams/{name}")
        if response.status_code == 200 and _is_ready(response.json()):
            return
        await asyncio.sleep(0.2)
    raise BenchError(f"DatasetStream {namespace}/{name} not Ready after {timeout_s:.0f} s")


# -- (a) admission ---------------------------------------------------------------------------------


async def _admission(env: Env, scale: Scale) -> dict[str, Any]:
    ns = env.team_ns
    path = f"/api/v1/namespaces/{ns}/pods"
    async with env.api() as api:
        created_stream = await api.post(
            f"{GROUP_PATH}/namespaces/{ns}/datasetstreams",
            json=_stream("admit", ns, env.data_ns, sharding={"worldSize": 8, "rankSource": "spec"}),
        )
        created_stream.raise_for_status()
        await _wait_stream_ready(api, ns, "admit")
        # The API server picks up the webhook configuration asynchronously; a dry run shows when it calls us.
        deadline = time.monotonic() + 60
        while True:
            probe = await api.post(path, params={"dryRun": "All"}, json=_pod("probe", ns, "admit", 0))
            if probe.status_code == 201 and probe.json()["spec"].get("initContainers"):
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the webhook never injected a dry-run pod: {probe.status_code} {probe.text[:300]}"
                )
            await asyncio.sleep(0.25)
        warm = 2 * scale.concurrency  # connections, caches and the operator's threads warmed on both paths
        for stream, prefix in (("admit", "warm-l"), (None, "warm-u")):
            await _create_all(
                api, path, [_pod(f"{prefix}-{i}", ns, stream, i % 8) for i in range(warm)], scale.concurrency
            )

        operator_before = env.scrape(env.operator.url + BrokerPaths.METRICS)
        apiserver_before = env.scrape(env.testbed.server + "/metrics", client_cert=True)
        latencies: dict[str, list[float]] = {"labelled": [], "unlabelled": []}
        per_round = math.ceil(scale.pods / scale.rounds)
        started, cpu = time.perf_counter(), cpu_seconds(env.operator.process.pid)
        for r in range(scale.rounds):
            batch = range(r * per_round, min(scale.pods, (r + 1) * per_round))
            kinds = [("labelled", "adm-l", "admit"), ("unlabelled", "adm-u", None)]
            for kind, prefix, stream in kinds if r % 2 == 0 else reversed(kinds):
                times, created = await _create_all(
                    api, path, [_pod(f"{prefix}-{i}", ns, stream, i % 8) for i in batch], scale.concurrency
                )
                injected = sum(1 for p in created if p["spec"].get("initContainers"))
                if injected != (len(created) if stream else 0):
                    raise BenchError(f"{injected} of {len(created)} {kind} pods were injected")
                latencies[kind] += times
        wall = time.perf_counter() - started
        operator_cpu = cpu_seconds(env.operator.process.pid) - cpu
        operator_after = env.scrape(env.operator.url + BrokerPaths.METRICS)
        apiserver_after = env.scrape(env.testbed.server + "/metrics", client_cert=True)
        # The webhook remembers a yes for DECISION_TTL_S: a burst after a pause waits for the API server.
        await asyncio.sleep(DECISION_TTL_S + 1)
        cold = [_pod(f"cold-l-{i}", ns, "admit", i % 8) for i in range(scale.concurrency)]
        cold_client, _ = await _create_all(api, path, cold, scale.concurrency)

    log_text = env.operator.log.read_text(errors="replace")

    def handler_times(prefix: str, expected: int) -> list[float]:
        found = [
            float(m[5]) / 1000
            for m in _ADMISSION_LINE.finditer(log_text)
            if m[1] == ns and m[2].startswith(prefix)
        ]
        if len(found) != expected:
            raise BenchError(f"the operator logged {len(found)} admissions of {expected} {prefix}* pods")
        return found

    webhook = summary_ms(handler_times("adm-l-", scale.pods))
    labelled, unlabelled = summary_ms(latencies["labelled"]), summary_ms(latencies["unlabelled"])
    op_hist = histogram_delta(operator_before, operator_after, "sluicegate_admission_duration_seconds")
    api_hist = histogram_delta(
        apiserver_before,
        apiserver_after,
        "apiserver_admission_webhook_admission_duration_seconds",
        {"name": WEBHOOK, "operation": "CREATE"},
    )
    return {
        "pods_per_kind": scale.pods,
        "concurrency": scale.concurrency,
        "rounds": scale.rounds,
        "wall_seconds": round(wall, 2),
        "creates_per_second": round(2 * scale.pods / wall, 1),
        "operator_cpu_share": round(operator_cpu / wall, 3),  # of one core, webhook and kopf together
        "webhook_handler_ms": webhook,
        "after_pause": {
            "pods": scale.concurrency,
            "pause_seconds": DECISION_TTL_S + 1,
            "webhook_handler_ms": summary_ms(handler_times("cold-l-", scale.concurrency)),
            "client_create_ms": summary_ms(cold_client),
        },
        "operator_histogram": _histogram_report(op_hist, TARGET_ADMISSION_P99_MS / 1000),
        "apiserver_webhook_call": _histogram_report(api_hist, TARGET_ADMISSION_P99_MS / 1000),
        "client_create_ms": {"labelled": labelled, "unlabelled": unlabelled},
        "webhook_added_ms": {
            k: round(float(labelled[k]) - float(unlabelled[k]), 2) for k in ("p50", "p99", "mean")
        },
        "labelled_vs_unlabelled": {
            k: round(float(labelled[k]) / max(float(unlabelled[k]), 1e-9), 2) for k in ("p50", "p99", "mean")
        },
        "target_p99_ms": TARGET_ADMISSION_P99_MS,
        "meets_target": float(webhook["p99"]) < TARGET_ADMISSION_P99_MS,
    }


# -- (b) streams Ready -----------------------------------------------------------------------------


def stream_queries(n: int) -> list[str]:
    """``n`` distinct, valid queries over the synthetic manifest (label counts, metadata, file size)."""
    shapes = [
        "meta.frame < {k}000",
        'labels.car >= {m} and meta.split = "train" and meta.frame >= {k}00',
        "file.width >= 640 and meta.frame < {k}000",
        "not meta.blurry and labels.person >= {m} and meta.frame < {k}500",
    ]
    return [shapes[i % len(shapes)].format(k=i // len(shapes) + 1, m=i % 3) for i in range(n)]


async def _streams(env: Env, scale: Scale) -> dict[str, Any]:
    ns = env.streams_ns
    queries = stream_queries(min(scale.queries, scale.streams))
    bodies = [
        _stream(
            f"s-{i:04d}", ns, env.data_ns, query=queries[i % len(queries)], sharding={"worldSize": 1 + i % 8}
        )
        for i in range(scale.streams)
    ]
    path = f"{GROUP_PATH}/namespaces/{ns}/datasetstreams"
    ready_at: dict[str, float] = {}
    names = {b["metadata"]["name"] for b in bodies}
    async with env.api() as api:
        version = (await api.get(path)).raise_for_status().json()["metadata"]["resourceVersion"]
        all_ready = asyncio.Event()

        async def watch() -> None:
            params = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "false"}
            async with api.stream("GET", path, params=params, timeout=None) as response:
                async for line in response.aiter_lines():
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    name = str((obj.get("metadata") or {}).get("name"))
                    if name in names and name not in ready_at and _is_ready(obj):
                        ready_at[name] = time.perf_counter()
                        if len(ready_at) == len(names):
                            all_ready.set()
                            return

        watcher = asyncio.create_task(watch())
        started = time.perf_counter()
        create_times, _ = await _create_all(api, path, bodies, scale.concurrency)
        created = time.perf_counter()
        try:
            await asyncio.wait_for(all_ready.wait(), timeout=max(180.0, 4 * TARGET_STREAMS_READY_S))
        except TimeoutError:
            pass
        finally:
            watcher.cancel()
    seconds = max(ready_at.values()) - started if len(ready_at) == len(names) else None
    # Per stream, from the first create: the streams are created at once and queue behind each other.
    since_first = [t - started for t in ready_at.values()]
    return {
        "streams": scale.streams,
        "distinct_queries": len(queries),
        "manifest_items": scale.items,
        "create_seconds": round(created - started, 2),
        "create_ms": summary_ms(create_times),
        "ready": len(ready_at),
        "seconds_to_all_ready": None if seconds is None else round(seconds, 2),
        "ready_since_first_create_ms": summary_ms(since_first),
        "streams_per_second": None if seconds is None else round(scale.streams / seconds, 1),
        "target_seconds": TARGET_STREAMS_READY_S,
        "meets_target": seconds is not None and seconds < TARGET_STREAMS_READY_S,
    }


# -- (c) broker ------------------------------------------------------------------------------------


async def _token(api: httpx.AsyncClient, pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [AUDIENCE],
            "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]},
        },
    }
    response = await api.post(
        f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/trainer/token", json=body
    )
    token: str = response.raise_for_status().json()["status"]["token"]
    return token


def _rate(items: float, seconds: float) -> float:
    return round(items / seconds) if seconds > 0 else 0.0


async def _broker(env: Env, scale: Scale) -> dict[str, Any]:
    ns = env.team_ns
    async with env.api() as api:
        created_stream = await api.post(
            f"{GROUP_PATH}/namespaces/{ns}/datasetstreams",
            json=_stream("plan", ns, env.data_ns, sharding={"worldSize": scale.ranks, "rankSource": "spec"}),
        )
        created_stream.raise_for_status()
        await _wait_stream_ready(api, ns, "plan")
        _, pods = await _create_all(
            api,
            f"/api/v1/namespaces/{ns}/pods",
            [_pod(f"plan-{r}", ns, "plan", r) for r in range(scale.ranks)],
            scale.ranks,
        )
        tokens = [await _token(api, pod) for pod in pods]

    async with env.broker() as broker:

        async def post(path: str, rank: int, body: dict[str, Any]) -> tuple[float, bytes]:
            started = time.perf_counter()
            response = await broker.post(path, json=body, headers={"Authorization": f"Bearer {tokens[rank]}"})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise BenchError(f"{path} of rank {rank}: {response.status_code} {response.text[:500]}")
            return elapsed, response.content

        async def plan(rank: int, presign: bool = False) -> tuple[float, bytes]:
            return await post(BrokerPaths.PLAN, rank, {"stream": "plan", "presign": presign})

        n = scale.repeats * scale.ranks
        first = [await plan(r) for r in range(scale.ranks)]  # one at a time: each builds its shard
        shards = [PlanResponse.model_validate_json(body) for _, body in first]
        shard_items = [len(p.rows) for p in shards]
        if any(p.urls for p in shards) or sum(shard_items) < scale.items:
            raise BenchError(f"plans of {shard_items} rows and {[len(p.urls) for p in shards]} URLs")
        blobs = [list(dict.fromkeys(row.blob for row in p.rows)) for p in shards]
        # The operator's own histogram splits each series into time in the broker and time on the wire.
        metrics = [env.scrape(env.operator.url + BrokerPaths.METRICS)]
        rows_only = [await plan(r % scale.ranks) for r in range(n)]
        metrics.append(env.scrape(env.operator.url + BrokerPaths.METRICS))
        windows = []  # consecutive windows of each rank's blobs, as a sidecar reading its epoch asks
        for i in range(n):
            rank, k = i % scale.ranks, i // scale.ranks
            mine = blobs[rank]
            start = (k * scale.url_window) % max(1, len(mine) - scale.url_window + 1)
            window = mine[start : start + scale.url_window]
            elapsed, body = await post(BrokerPaths.URLS, rank, {"blobs": window})
            windows.append((elapsed, len(window), body))
        metrics.append(env.scrape(env.operator.url + BrokerPaths.METRICS))
        presigned = [await plan(r % scale.ranks, presign=True) for r in range(n)]
        metrics.append(env.scrape(env.operator.url + BrokerPaths.METRICS))
        concurrent_times = []
        for _ in range(scale.repeats):
            started = time.perf_counter()
            await asyncio.gather(*(plan(r) for r in range(scale.ranks)))
            concurrent_times.append(time.perf_counter() - started)
    urls = UrlsResponse.model_validate_json(windows[0][2]).urls
    if len(urls) != windows[0][1]:
        raise BenchError(f"a window of {windows[0][1]} blobs got {len(urls)} URLs")
    with_urls = PlanResponse.model_validate_json(presigned[0][1])
    if len(with_urls.urls) != len(blobs[0]):
        raise BenchError(f"the presigned plan of rank 0 has {len(with_urls.urls)} URLs, not {len(blobs[0])}")
    with httpx.Client(trust_env=False) as http:
        # The blobs are synthetic: 404 NoSuchKey shows the storage server accepted the signature (403 if not).
        url_status = http.get(next(iter(urls.values()))).status_code
    if url_status != 404:
        raise BenchError(f"a presigned URL of a window got {url_status} from the storage server, not 404")

    # Baseline: the same number of URLs presigned in-process, no HTTP, no Kubernetes, no JSON.
    keys = [blob_key(blob) for blob in blobs[0]]
    raw_times = []
    for _ in range(scale.repeats):
        started = time.perf_counter()
        env.store.presign_many(keys, timedelta(minutes=15))
        raw_times.append(time.perf_counter() - started)
    per_rank = statistics.fmean(shard_items)
    rows_s = [t for t, _ in rows_only]
    window_s = [t for t, _, _ in windows]
    presigned_s = [t for t, _ in presigned]
    raw = _rate(len(keys), statistics.median(raw_times))
    cached = _rate(per_rank, statistics.median(rows_s))
    window_rate = _rate(statistics.fmean(w for _, w, _ in windows), statistics.median(window_s))
    concurrent = _rate(per_rank * scale.ranks, statistics.median(concurrent_times))
    return {
        "manifest_items": scale.items,
        "ranks": scale.ranks,
        "items_per_rank": per_rank,
        "response_mb": round(len(first[0][1]) / 1e6, 1),
        "presigned_response_mb": round(len(presigned[0][1]) / 1e6, 1),
        "first_ms": summary_ms([t for t, _ in first]),
        "first_items_per_second": _rate(sum(shard_items), sum(t for t, _ in first)),
        "cached_ms": summary_ms(rows_s),
        "cached_items_per_second": cached,
        "cached_best_items_per_second": _rate(per_rank, min(rows_s)),
        "cached_broker_mean_ms": histogram_mean_ms(metrics[0], metrics[1], *_PLAN_SECONDS),
        "url_window": scale.url_window,
        "url_window_ms": summary_ms(window_s),
        "url_window_items_per_second": window_rate,
        "url_window_broker_mean_ms": histogram_mean_ms(metrics[1], metrics[2], *_URLS_SECONDS),
        "presigned_ms": summary_ms(presigned_s),
        "presigned_items_per_second": _rate(per_rank, statistics.median(presigned_s)),
        "presigned_broker_mean_ms": histogram_mean_ms(metrics[2], metrics[3], *_PLAN_SECONDS),
        "concurrent_ranks_ms": summary_ms(concurrent_times),
        "concurrent_items_per_second": concurrent,
        "baseline_presign_many_urls_per_second": raw,
        "url_window_vs_baseline": round(window_rate / raw, 3) if raw else None,
        "target_items_per_second": TARGET_ITEMS_PER_S,
        "meets_target": cached >= TARGET_ITEMS_PER_S,
    }


# -- driver ----------------------------------------------------------------------------------------


def measure(testbed: Testbed, s3: S3Server, scale: Scale, log: Path) -> dict[str, Any]:
    """Every phase on ``testbed``; the operator logs to ``log``."""
    started = time.perf_counter()
    env = prepare(testbed, s3, scale, log)
    try:
        setup = time.perf_counter() - started
        result: dict[str, Any] = {
            "scale": asdict(scale),
            "nodes": len(testbed.api("GET", "/api/v1/nodes")["items"]),
        }
        result["admission"] = asyncio.run(_admission(env, scale))
        result["streams"] = asyncio.run(_streams(env, scale))
        result["broker"] = asyncio.run(_broker(env, scale))
    finally:
        teardown(env)
    result["setup_seconds"] = round(setup, 1)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    return result


def run() -> dict[str, Any]:
    scale = Scale.from_env()
    before = machine()
    with tempfile.TemporaryDirectory(prefix="sluicegate-bench-") as tmp, S3Server(binary=build()) as s3:
        testbed = Testbed(Path(tmp, "testbed"), ensure_binaries(), node_count=scale.nodes)
        started = time.perf_counter()
        try:
            testbed.start()
            boot = time.perf_counter() - started
            result = measure(testbed, s3, scale, Path(tmp, "operator.log"))
        finally:
            testbed.stop()
    result = {"machine": before, "testbed_start_seconds": round(boot, 1), **result}
    result["machine_after"] = machine()["load_average_1m"]
    write_results("operator_scale", result, markdown(result))
    return result


def _cells(stats: dict[str, Any], *keys: str) -> str:
    """Markdown table cells: ``n`` then the given statistics of a :func:`summary_ms` dict."""
    return " | ".join([str(stats["n"]), *(f"{stats[k]:.1f}" if k in stats else "-" for k in keys)])


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(result: dict[str, Any]) -> str:
    a, s, b, m = result["admission"], result["streams"], result["broker"], result["machine"]
    cols = ("p50", "p90", "p99", "max", "mean")
    client, pause = a["client_create_ms"], a["after_pause"]
    op, apis = a["operator_histogram"], a["apiserver_webhook_call"]
    added, ratio = a["webhook_added_ms"], a["labelled_vs_unlabelled"]
    since = s["ready_since_first_create_ms"]
    lines = [
        "# operator_scale benchmark",
        "",
        f"Command: `.venv/bin/python -m bench operator_scale` — {m['date_utc']}, {m['cpus']} CPUs shared "
        "by the testbed, the operator, the S3 server and the clients; load average "
        f"{m['load_average_1m']} before / {result['machine_after']} after. Testbed with {result['nodes']} "
        f"kwok nodes started in {result['testbed_start_seconds']} s; setup (operator, 100k-item Dataset) "
        f"{result['setup_seconds']} s; setup and phases {result['total_seconds']} s.",
        "",
        f"## Admission: {a['pods_per_kind']:,} labelled pods vs {a['pods_per_kind']:,} unlabelled",
        "",
        f"{a['concurrency']} concurrent creators, {a['rounds']} interleaved rounds per kind, "
        f"{a['creates_per_second']} creates/s overall; bare pods scheduled onto kwok nodes. The operator "
        f"process used {a['operator_cpu_share']:.0%} of one core meanwhile. Times in ms.",
        "",
        "| measured | n | p50 | p90 | p99 | max | mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| webhook handler (operator log) | {_cells(a['webhook_handler_ms'], *cols)} |",
        f"| pod CREATE, labelled (client) | {_cells(client['labelled'], *cols)} |",
        f"| pod CREATE, unlabelled baseline (client) | {_cells(client['unlabelled'], *cols)} |",
        f"| webhook handler, burst after a {pause['pause_seconds']:.0f} s pause | "
        f"{_cells(pause['webhook_handler_ms'], *cols)} |",
        f"| pod CREATE, burst after the pause (client) | {_cells(pause['client_create_ms'], *cols)} |",
        "",
        "The webhook reuses a yes (stream exists, SubjectAccessReview allowed) for "
        f"{DECISION_TTL_S:.0f} s and renews it in the background while pods keep coming; the burst after "
        f"the pause ({pause['pods']} pods at once) shares one stream lookup and one SubjectAccessReview.",
        "",
        f"The webhook's cost per CREATE as the client sees it: p50 {added['p50']:+} ms, "
        f"p99 {added['p99']:+} ms "
        f"(labelled / unlabelled: p50 {ratio['p50']}x, p99 {ratio['p99']}x, mean {ratio['mean']}x).",
        "",
        "Histograms, interpolated within their buckets (coarse): the operator's "
        f"`sluicegate_admission_duration_seconds` n={op['count']}, p50 ≈ {op['p50_ms_estimate']} ms, "
        f"p99 ≈ {op['p99_ms_estimate']} ms, {op['share_within_50ms']:.1%} within 50 ms; the API server's "
        "`apiserver_admission_webhook_admission_duration_seconds` (the whole call: TLS, request, response) "
        f"n={apis['count']}, p50 ≈ {apis['p50_ms_estimate']} ms, p99 ≈ {apis['p99_ms_estimate']} ms, "
        f"{apis['share_within_50ms']:.1%} within 50 ms.",
        "",
        f"Target: webhook p99 < {a['target_p99_ms']:.0f} ms: **{_met(a['meets_target'])}** "
        f"(p99 {a['webhook_handler_ms']['p99']} ms), judged on the webhook's own time. The API server's "
        f"view of the call (p99 ≈ {apis['p99_ms_estimate']} ms) also holds both processes' waits for a CPU "
        f"on this shared machine (load average {m['load_average_1m']} on {m['cpus']} CPUs), while the "
        f"operator itself used {a['operator_cpu_share']:.0%} of one core.",
        "",
        f"## {s['streams']} DatasetStreams to Ready",
        "",
        f"One Dataset of {s['manifest_items']:,} items, {s['distinct_queries']} distinct queries; "
        f"the streams were created in {s['create_seconds']} s by {result['scale']['concurrency']} clients; "
        f"{s['ready']} of {s['streams']} Ready, the last **{s['seconds_to_all_ready']} s** after the first "
        f"create ({s['streams_per_second']} streams/s). Each stream was Ready after the first create: "
        f"p50 {since.get('p50')} ms, p99 {since.get('p99')} ms.",
        "",
        f"Target < {s['target_seconds']:.0f} s: **{_met(s['meets_target'])}**.",
        "",
        f"## Broker: {b['manifest_items']:,} items in {b['ranks']} shards",
        "",
        f"{b['items_per_rank']:,.0f} items per rank. The sidecar asks for its plan rows only "
        f"(`presign=false`, {b['response_mb']} MB) and for presigned URLs in windows of "
        f"{b['url_window']:,} blobs (POST /v1/urls) as its reads reach them, so the broker signs at the "
        "rate data is consumed. Real pod-bound tokens: every request runs TokenReview and "
        "SubjectAccessReview. Times in ms.",
        "",
        "| request (client-observed) | n | p50 | p99 | mean in the broker | items/s (median) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| plan, first per rank (shard built) | {_cells(b['first_ms'], 'p50', 'p99')} | - | "
        f"{b['first_items_per_second']:,.0f} |",
        f"| **plan, cached shard, one rank at a time** | {_cells(b['cached_ms'], 'p50', 'p99')} | "
        f"{b['cached_broker_mean_ms']} | **{b['cached_items_per_second']:,.0f}** |",
        f"| plan, cached shard, all {b['ranks']} ranks at once | "
        f"{_cells(b['concurrent_ranks_ms'], 'p50', 'p99')} | - | {b['concurrent_items_per_second']:,.0f} |",
        f"| URL window of {b['url_window']:,} blobs | {_cells(b['url_window_ms'], 'p50', 'p99')} | "
        f"{b['url_window_broker_mean_ms']} | {b['url_window_items_per_second']:,.0f} |",
        f"| for comparison: plan with every URL presigned ({b['presigned_response_mb']} MB) | "
        f"{_cells(b['presigned_ms'], 'p50', 'p99')} | {b['presigned_broker_mean_ms']} | "
        f"{b['presigned_items_per_second']:,.0f} |",
        "",
        "'Mean in the broker' is the operator's `sluicegate_broker_duration_seconds` (token and RBAC checks, "
        "shard, presigning, JSON); the rest of a request is sending and receiving it over TLS. Best cached "
        f"plan: {b['cached_best_items_per_second']:,.0f} items/s.",
        "",
        "Baseline in the same run: `Store.presign_many` of one shard's blobs, in-process "
        f"**{b['baseline_presign_many_urls_per_second']:,.0f} URLs/s**; a URL window runs at "
        f"{b['url_window_vs_baseline']}x that (its fixed cost is the per-request token and RBAC checks). "
        "A sidecar needs URLs only as fast as it reads items.",
        "",
        f"Target >= {b['target_items_per_second']:,} items/s (plan, cached shard, one rank at a time): "
        f"**{_met(b['meets_target'])}**.",
    ]
    return "\n".join(lines)
