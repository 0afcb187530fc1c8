"""Prometheus metrics of the operator, in their own registry (served on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

ADMISSIONS = Counter(
    "sluicegate_admission_total",
    "Admission decisions on labelled pods, by result (injected, skipped, denied, error) and reason.",
    ["result", "reason"],
    registry=REGISTRY,
)
ADMISSION_SECONDS = Histogram(
    "sluicegate_admission_duration_seconds",
    "Time to answer one admission review.",
    buckets=_FAST,
    registry=REGISTRY,
)
BROKER_DECISIONS = Counter(
    "sluicegate_broker_decisions_total",
    "Broker decisions by endpoint, decision (allowed, denied, error) and reason.",
    ["endpoint", "decision", "reason"],
    registry=REGISTRY,
)
BROKER_SECONDS = Histogram(
    "sluicegate_broker_duration_seconds",
    "Time to answer one broker request.",
    ["endpoint"],
    buckets=_FAST,
    registry=REGISTRY,
)
BROKER_ITEMS = Counter("sluicegate_broker_items_total", "Items handed out in shard plans.", registry=REGISTRY)
BROKER_URLS = Counter("sluicegate_broker_presigned_urls_total", "Presigned URLs issued.", registry=REGISTRY)
RECONCILES = Counter(
    "sluicegate_reconcile_total",
    "Reconciliations by kind and resulting Ready reason.",
    ["kind", "reason"],
    registry=REGISTRY,
)
CERT_ROTATIONS = Counter(
    "sluicegate_certificate_rotations_total",
    "Serving certificates issued by this process.",
    registry=REGISTRY,
)
CERT_EXPIRY = Gauge(
    "sluicegate_certificate_expiry_timestamp_seconds",
    "When the serving certificate this process presents expires (Unix time).",
    registry=REGISTRY,
)
STREAM_READY = Gauge(
    "sluicegate_stream_ready",
    "1 when the DatasetStream is Ready, 0 when not (exported by the replica that reconciles).",
    ["stream_namespace", "stream"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "sluicegate_leader",
    "1 on the replica that holds the leader Lease and reconciles, 0 on the standbys.",
    registry=REGISTRY,
)
