"""Prometheus metrics: the engine's counters, read at scrape time (the engine itself has no dependency)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sluicegate.core.engine import Engine
from sluicegate.core.protocol import Info

__all__ = ["SidecarCollector"]

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    # metric (without _total), EngineStats field, help
    ("sluicegate_items_served", "items_served", "Items served to the trainer"),
    ("sluicegate_bytes_served", "bytes_served", "Bytes served to the trainer"),
    ("sluicegate_cache_hits", "cache_hits", "Items served from the memory cache"),
    ("sluicegate_cache_misses", "cache_misses", "Items not in the memory cache when asked for"),
    ("sluicegate_disk_cache_hits", "disk_hits", "Blobs read back from the disk cache"),
    ("sluicegate_cache_evictions", "evictions", "Blobs evicted from a cache tier"),
    ("sluicegate_upstream_fetches", "upstream_fetches", "Successful upstream blob fetches"),
    ("sluicegate_upstream_bytes", "upstream_bytes", "Bytes fetched from upstream"),
    ("sluicegate_upstream_errors", "upstream_errors", "Failed upstream fetch attempts"),
    ("sluicegate_upstream_retries", "retries", "Upstream fetches retried after a transient fault"),
    ("sluicegate_integrity_failures", "integrity_failures", "Fetched blobs whose sha256 did not match"),
    ("sluicegate_prefetched", "prefetched", "Blobs fetched ahead of the trainer"),
    ("sluicegate_consumer_wait_seconds", "wait_seconds", "Time requests waited for data not yet cached"),
)


class SidecarCollector(Collector):
    """Reads the engine's stats and the request counts on every scrape."""

    def __init__(
        self,
        engine: Engine,
        info: Callable[[], Info | None],
        trainer_waited_s: Callable[[], float],
        requests: Counter[tuple[str, int]],
        renewals: Counter[str] | None = None,
    ) -> None:
        self._engine = engine
        self._info = info
        self._trainer_waited_s = trainer_waited_s
        self._requests = requests
        self._renewals = renewals  # broker mode: URL window requests by reason

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats
        for name, attr, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=getattr(stats, attr))
        yield CounterMetricFamily(
            "sluicegate_trainer_data_wait_seconds",
            "Time the trainer spent blocked waiting for data, as its SDK reports it; rate() of it is the "
            "fraction of wall time the trainer waited",
            value=self._trainer_waited_s(),
        )
        cache = GaugeMetricFamily("sluicegate_cache_bytes", "Bytes held by a cache tier", labels=["tier"])
        cache.add_metric(["memory"], self._engine.memory.nbytes)
        if self._engine.disk is not None:
            cache.add_metric(["disk"], self._engine.disk.nbytes)
        yield cache
        budget = GaugeMetricFamily(
            "sluicegate_cache_budget_bytes", "Byte budget of a cache tier", labels=["tier"]
        )
        budget.add_metric(["memory"], self._engine.memory.budget)
        if self._engine.disk is not None:
            budget.add_metric(["disk"], self._engine.disk.budget)
        yield budget
        yield from stats.upstream_latency.collect()
        requests = CounterMetricFamily(
            "sluicegate_requests", "HTTP requests by path and status", labels=["path", "code"]
        )
        for (path, code), n in sorted(self._requests.items()):
            requests.add_metric([path, str(code)], n)
        yield requests
        if self._renewals is not None:
            renewals = CounterMetricFamily(
                "sluicegate_url_renewals",
                "Requests to the broker for a window of presigned blob URLs: ahead of the reads, for a fetch "
                "that found no usable URL, or after the store refused one",
                labels=["reason"],
            )
            for reason in ("ahead", "missing", "refused"):
                renewals.add_metric([reason], self._renewals[reason])
            yield renewals
        info = self._info()
        if info is not None:
            shard = GaugeMetricFamily(
                "sluicegate_shard_items",
                "Items in this sidecar's shard",
                labels=["dataset", "version", "rank", "world_size"],
            )
            shard.add_metric(
                [info.dataset, str(info.version), str(info.rank), str(info.world_size)], info.items
            )
            yield shard
