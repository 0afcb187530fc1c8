"""Operator settings: command-line flags with environment defaults, validated once at start."""

from __future__ import annotations

from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field
from sluicegate import __version__

# The image published for each release, tagged with the package version (the chart's appVersion).
DEFAULT_IMAGE = f"ghcr.io/sluicegate/sluicegate:{__version__}"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field(default="sluicegate-system", description="namespace the operator runs in")
    service_name: str = Field(default="sluicegate-operator", description="Service in front of the operator")
    listen_host: str = "0.0.0.0"
    listen_port: int = Field(default=8443, ge=0, le=65535)
    public_url: str | None = Field(
        default=None,
        description="base URL the API server and sidecars reach the webhook and broker at; "
        "default https://SERVICE.NAMESPACE.svc",
        pattern=r"^https://[^/]+$",
    )
    webhook_configuration: str = Field(default="sluicegate", description="MutatingWebhookConfiguration name")
    manage_webhook: bool = Field(
        default=False,
        description="create and own the whole webhook configuration (development without Helm); "
        "otherwise only its caBundle is kept up to date",
    )
    tls_secret: str = "sluicegate-operator-tls"
    sources_configmap: str = Field(
        default="sluicegate-sources",
        description="ConfigMap (in the operator's namespace) holding the platform's source policy",
    )
    serve_only: bool = Field(
        default=False, description="serve webhook and broker only, no reconciler (the webhook replicas)"
    )
    manifest_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    manifest_rows: int = Field(default=10_000_000, ge=1)
    manifest_decoded_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    cache_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)
    store_timeout_s: float = Field(default=10.0, gt=0)
    metrics_auth: bool = Field(
        default=True, description="/metrics needs a token allowed to get the non-resource URL /metrics"
    )
    admission_auth: bool = Field(
        default=False,
        description="/mutate and /validate need a token allowed to post them: for an API server that "
        "authenticates to webhooks (AdmissionConfiguration), so that no pod can probe streams and grants",
    )
    broker_rate: float = Field(default=50.0, gt=0, description="requests per second per pod")
    broker_burst: float = Field(default=100.0, ge=1)
    extra_sans: tuple[str, ...] = ()
    sidecar_image: str = DEFAULT_IMAGE
    presign_ttl_s: int = Field(default=300, ge=1, le=7 * 24 * 3600)
    cert_valid_days: float = Field(default=90, gt=0)
    ca_valid_days: float = Field(default=3650, gt=0)
    tls_check_interval_s: float = Field(default=3600, gt=0)
    dataset_resync_s: float = Field(default=60, gt=0)
    kubeconfig: str | None = None

    @property
    def ca_configmap(self) -> str:
        """The ConfigMap publishing the trust bundle (CA certificates only)."""
        return f"{self.tls_secret}-ca"

    @property
    def grant_secret(self) -> str:
        """The Secret holding the key that seals rank grants."""
        return f"{self.tls_secret}-grants"

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
            *self.extra_sans,
        ]
        return tuple(dict.fromkeys(n for n in names if n))
