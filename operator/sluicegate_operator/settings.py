"""Operator settings: one model for the command line and the environment, validated once at start.

Every field is a flag (``--manifest-max-bytes``) and an environment variable
(``SLUICEGATE_MANIFEST_MAX_BYTES``); a flag wins. ``sluicegate-operator --help`` lists them with
their defaults.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, CliImplicitFlag
from sluicegate import __version__
from sluicegate.core.daemon import settings_config

from .catalog import Limits

# The image published for each release, tagged with the package version (the chart's appVersion).
DEFAULT_IMAGE = f"ghcr.io/sluicegate/sluicegate:{__version__}"


class Settings(BaseSettings):
    """The sluicegate operator: reconciler, admission webhooks and broker. Every flag is also an
    environment variable, SLUICEGATE_ and the flag's name in capitals (--store-timeout-s:
    SLUICEGATE_STORE_TIMEOUT_S); a flag wins."""

    model_config = settings_config("sluicegate-operator")

    namespace: str = Field(default="sluicegate-system", description="namespace the operator runs in")
    service_name: str = Field(default="sluicegate-operator", description="Service in front of the operator")
    listen: str = Field(
        default="0.0.0.0:8443", pattern=r"^[^:]*:[0-9]{1,5}$", description="HOST:PORT to serve on"
    )
    public_url: str | None = Field(
        default=None,
        description="base URL the API server and sidecars reach the webhook and broker at; "
        "default https://SERVICE.NAMESPACE.svc",
        pattern=r"^https://[^/]+$",
    )
    webhook_configuration: str = Field(
        default="sluicegate", description="name of the Mutating- and ValidatingWebhookConfiguration"
    )
    manage_webhook: CliImplicitFlag[bool] = Field(
        default=False,
        description="create and own the whole webhook configuration (development without Helm); "
        "otherwise only its caBundle is kept up to date",
    )
    tls_secret: str = Field(default="sluicegate-operator-tls", description="Secret holding the TLS chain")
    sources_configmap: str = Field(
        default="sluicegate-sources",
        description="ConfigMap (in the operator's namespace) holding the platform's source policy",
    )
    identity: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        description="this replica's name in the leader election (the chart: the pod's name); default "
        "HOST-PID",
    )
    leader_lease: str = Field(
        default="sluicegate-operator",
        description="Lease (in the operator's namespace) whose holder is the one replica that reconciles",
    )
    leader_lease_s: float = Field(
        default=15, ge=2, description="seconds a leader's Lease lasts unrenewed before another takes over"
    )
    leader_renew_s: float = Field(
        default=5,
        gt=0,
        description="seconds between the leader's renewals; it stops reconciling when it has not renewed "
        "for --leader-lease-s less this",
    )
    reuse_port: CliImplicitFlag[bool] = Field(
        default=False,
        description="share the port with the other replicas on this node (SO_REUSEPORT, for hostNetwork): "
        "the kernel spreads connections among them",
    )
    manifest_max_bytes: int = Field(
        default=Limits.manifest_bytes, ge=1024, description="bytes of one manifest"
    )
    manifest_max_rows: int = Field(default=Limits.manifest_rows, ge=1, description="rows of one manifest")
    manifest_max_decoded_bytes: int = Field(
        default=Limits.decoded_bytes, ge=1024, description="bytes of one manifest once decoded"
    )
    cache_bytes: int = Field(
        default=Limits.cache_bytes, ge=0, description="bytes of manifests and shards kept"
    )
    store_timeout_s: float = Field(
        default=Limits.timeout_s, gt=0, description="limit on one store read, seconds"
    )
    metrics_auth: bool = Field(
        default=True, description="/metrics needs a token allowed to get the non-resource URL /metrics"
    )
    admission_auth: bool = Field(
        default=False,
        description="/mutate and /validate need a token allowed to post them: for an API server that "
        "authenticates to webhooks (AdmissionConfiguration), so that no pod can probe streams and grants",
    )
    broker_rate: float = Field(default=50.0, gt=0, description="broker requests per second per pod")
    extra_san: tuple[str, ...] = Field(default=(), description="extra DNS name or IP for the certificate")
    sidecar_image: str = Field(default=DEFAULT_IMAGE, description="image of the injected sidecar")
    scrape_token_file: Path | None = Field(
        default=None,
        description="file holding the token Prometheus sends to sidecars' /metrics; without it, injected "
        "sidecars serve no metrics listener",
    )
    presign_ttl_s: int = Field(
        default=300, ge=1, le=7 * 24 * 3600, description="seconds a presigned URL stays valid"
    )
    cert_valid_days: float = Field(default=90, gt=0, description="days a serving certificate is valid")
    ca_valid_days: float = Field(default=3650, gt=0, description="days the CA is valid")
    tls_check_interval_s: float = Field(default=3600, gt=0, description="seconds between certificate checks")
    dataset_resync_s: float = Field(default=60, gt=0, description="seconds between re-reads of each store")
    kubeconfig: str | None = Field(
        default=None,
        validation_alias=AliasChoices("kubeconfig", "KUBECONFIG"),
        description="kubeconfig (default: in-cluster credentials)",
    )
    log_level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error)$")

    @field_validator("leader_renew_s")
    @classmethod
    def _renew_within_lease(cls, renew_s: float, info: ValidationInfo) -> float:
        # The leader must stop (at lease - renew) no earlier than its next renewal is due.
        lease_s = info.data.get("leader_lease_s")
        if lease_s is not None and renew_s > lease_s / 2:
            raise ValueError(
                f"at most half of --leader-lease-s ({lease_s:g}), so a missed renewal is retried"
            )
        return renew_s

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0] or "0.0.0.0"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def broker_burst(self) -> float:
        """Requests a pod may send at once before the rate applies."""
        return 2 * self.broker_rate

    @property
    def ca_configmap(self) -> str:
        """The ConfigMap publishing the trust bundle (CA certificates only)."""
        return f"{self.tls_secret}-ca"

    @property
    def grant_secret(self) -> str:
        """The Secret holding the key that seals rank grants."""
        return f"{self.tls_secret}-grants"

    def scrape_token_sha256(self) -> str | None:
        """The digest injected sidecars check scrapers' tokens against (they never see the token)."""
        if self.scrape_token_file is None:
            return None
        token = self.scrape_token_file.read_text().strip()
        if not token:
            raise ValueError(f"{self.scrape_token_file} is empty: it must hold the scrape token")
        return hashlib.sha256(token.encode()).hexdigest()

    @property
    def url(self) -> str:
        return self.public_url or f"https://{self.service_name}.{self.namespace}.svc"

    @property
    def hosts(self) -> tuple[str, ...]:
        """Names the serving certificate must cover: the public URL's host first, then the Service's."""
        svc = self.service_name
        names = [
            urlparse(self.url).hostname or "",
            svc,
            f"{svc}.{self.namespace}",
            f"{svc}.{self.namespace}.svc",
            f"{svc}.{self.namespace}.svc.cluster.local",
            *self.extra_san,
        ]
        return tuple(dict.fromkeys(n for n in names if n))
