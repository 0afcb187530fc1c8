"""The sidecar's configuration: CLI flags, each defaulting to a ``SLUICEGATE_*`` environment variable.

Two modes, exactly one of them configured: *store mode* (``--store``: read the dataset store directly,
pick the shard from the query and rank given here) and *broker mode* (``--broker-url``: in a cluster,
where the operator's broker decides the shard from the pod's token and hands out presigned URLs; the
sidecar then holds no storage credentials and takes no query, version or rank).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, PydanticBaseSettingsSource
from sluicegate import ConfigError
from sluicegate.core.broker_protocol import (
    MAX_URLS_PER_REQUEST,
    SOURCE_NAME_PATTERN,
    TOKEN_PATH,
    SidecarEnv,
    env_var,
)
from sluicegate.core.daemon import problems, settings_config
from sluicegate.core.engine import EngineConfig
from sluicegate.core.env import detect
from sluicegate.core.partition import Progress, ShardSpec
from sluicegate.core.quantity import parse_bytes

__all__ = ["Listen", "MetricsListen", "SidecarConfig", "parse_args", "quantity"]

_ENGINE = EngineConfig.model_fields  # the engine's defaults are the sidecar's


def quantity(value: str | int) -> int:
    """Bytes from a Kubernetes quantity (``512Mi``, ``2G``) or a plain number: the CRD's own grammar."""
    return parse_bytes(value)


class Listen(BaseModel):
    """One address to serve on: a loopback TCP port or a unix socket."""

    model_config = ConfigDict(frozen=True)

    host: str | None = None
    port: int | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> Listen:
        parsed = urlparse(text if "://" in text else f"http://{text}")
        if parsed.scheme == "unix":
            path = parsed.path or parsed.netloc
            if not path:
                raise ValueError(f"{text!r} names no socket path; write unix:///PATH")
            return cls(path=Path(path))
        if parsed.scheme != "http" or parsed.hostname is None or parsed.port is None:
            raise ValueError(f"{text!r} is not HOST:PORT, http://HOST:PORT or unix:///PATH")
        host = parsed.hostname
        if host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    f"the sidecar serves only on loopback; {host!r} is not a loopback address (use 127.0.0.1)"
                )
        return cls(host=host, port=parsed.port)


class MetricsListen(BaseModel):
    """Where the metrics-only listener binds: any address (Prometheus scrapes it from outside the pod)."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int = Field(ge=0, le=65535, description="0: any free port (tests)")

    @classmethod
    def parse(cls, text: str) -> MetricsListen:
        parsed = urlparse(f"http://{text}")
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.hostname is None or port is None:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:9464)")
        return cls(host=parsed.hostname, port=port)

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


class SidecarConfig(BaseSettings, ShardSpec):
    """Serve one shard of one pinned dataset version on loopback. Every flag is also an environment
    variable, SLUICEGATE_ and the flag's name in capitals (--cache-memory: SLUICEGATE_CACHE_MEMORY); a flag
    wins. Rank, world size, seed, shuffle, remainder, version and query are store mode's: in broker mode
    the broker decides them."""

    model_config = settings_config("sluicegate-sidecar")

    store: str | None = Field(
        default=None, min_length=1, description="dataset store URI: local path, file://, s3:// (store mode)"
    )
    broker_url: str | None = Field(
        default=None,
        pattern=r"^https://\S+$",
        description="https:// base URL of the operator's broker (broker mode)",
    )
    broker_ca: str | None = Field(
        default=None, description="PEM of the CA that signed the broker's certificate, or a file holding it"
    )
    token_file: Path = Field(
        default=Path(TOKEN_PATH),
        description="the pod's projected token, re-read for every broker request (broker mode)",
    )
    stream: str | None = Field(
        default=None, description="DatasetStream the broker must find the pod in (broker mode)"
    )
    source: str | None = Field(
        default=None,
        pattern=SOURCE_NAME_PATTERN,
        description="broker mode, a stream mixing several Datasets: the source (of spec.sources) it serves",
    )
    namespace: str | None = Field(default=None, description="namespace of this pod (broker mode)")
    version: int | None = Field(default=None, ge=1, description="version to pin; latest at start if unset")
    query: str | None = Field(default=None, description="slice query")
    progress: Progress | None = Field(
        default=None,
        description="store mode: an epoch to continue (JSON of sluicegate.Dataset.progress_of(state), or a "
        "file holding it), re-cut for this world size if it was saved at another",
    )
    listen: list[Listen] = Field(
        default_factory=lambda: [Listen(host="127.0.0.1", port=7070)],
        min_length=1,
        description="comma-separated: 127.0.0.1:PORT, http://127.0.0.1:PORT, unix:///PATH",
    )
    cache_memory: int = Field(
        default=_ENGINE["memory_bytes"].default,
        ge=0,
        description="memory cache budget: bytes or a quantity like 512Mi",
    )
    cache_dir: Path | None = Field(default=None, description="disk cache directory")
    cache_disk: int = Field(default=0, ge=0, description="disk tier budget; 0: no disk tier")
    concurrency: int = Field(
        default=_ENGINE["concurrency"].default, ge=1, description="upstream fetches in flight"
    )
    attempts: int = Field(
        default=_ENGINE["attempts"].default, ge=1, description="tries per blob on transient upstream faults"
    )
    timeout_s: float = Field(
        default=_ENGINE["timeout_s"].default, gt=0, description="limit on one upstream fetch, seconds"
    )
    readahead: int = Field(
        default=256, ge=0, description="items the sidecar prefetches past a stream request"
    )
    url_window: int = Field(
        default=1000,
        ge=1,
        le=MAX_URLS_PER_REQUEST,
        description="broker mode: blob URLs asked for at once, ahead of the read position",
    )
    shutdown_timeout_s: float = Field(default=10.0, ge=0, description="grace period for requests on SIGTERM")
    metrics_listen: MetricsListen | None = Field(
        default=None, description="HOST:PORT of a listener that serves /metrics only, for Prometheus"
    )
    metrics_token_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 (hex) of the bearer token a scraper must send to the metrics listener",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # parse_args reads the environment it is given (a test's, or the process'), never on its own.
        return (init_settings,)

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list) and all(isinstance(part, str) for part in v):
            return [Listen.parse(part.strip()) for part in v if part.strip()]
        return v

    @field_validator("progress", mode="before")
    @classmethod
    def _progress(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if not text:
                return None
            if not text.startswith("{"):
                try:
                    text = Path(text).read_text()
                except OSError as exc:
                    raise ValueError(f"cannot read the progress file {text}: {exc.strerror or exc}") from exc
            return Progress.model_validate_json(text)
        return v

    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _metrics_listen(cls, v: object) -> object:
        return MetricsListen.parse(v) if isinstance(v, str) else v

    @field_validator("cache_memory", "cache_disk", mode="before")
    @classmethod
    def _bytes(cls, v: object) -> object:
        return quantity(v) if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _one_mode(cls, data: object) -> object:
        # Before the fields (the shard spec among them) are checked: a wrong mode is the first thing to fix.
        if not isinstance(data, Mapping):
            return data
        store, broker = data.get("store"), data.get("broker_url")
        if (store is None) == (broker is None):
            raise ValueError(
                "give exactly one of --store (read a dataset store directly) and --broker-url (in a "
                f"cluster: the injected {SidecarEnv.BROKER_URL}); "
                + ("both are set" if store else "neither is set")
            )
        if broker is not None:
            # The broker decides these from the pod's token: a value here would be silently ignored.
            decided = sorted(_BROKER_DECIDES & set(data))
            if decided:
                flags = ", ".join("--" + name.replace("_", "-") for name in decided)
                raise ValueError(f"{flags}: the broker decides these in broker mode; remove them")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SidecarConfig:
        if self.cache_disk and self.cache_dir is None:
            raise ValueError("cache-disk is set but cache-dir is not: give the disk tier a directory")
        listen = self.metrics_listen
        if listen is not None and not listen.loopback and self.metrics_token_sha256 is None:
            # Other pods reach that port: the metrics name the dataset and count its items.
            raise ValueError(
                f"metrics-listen {listen.host}:{listen.port} is reachable from other pods: give "
                "metrics-token-sha256 (the digest of the token the scraper sends), or listen on 127.0.0.1"
            )
        return self

    def engine(self) -> EngineConfig:
        return EngineConfig(
            memory_bytes=self.cache_memory,
            disk_dir=self.cache_dir if self.cache_disk else None,
            disk_bytes=self.cache_disk,
            concurrency=self.concurrency,
            attempts=self.attempts,
            timeout_s=self.timeout_s,
        )


_BROKER_DECIDES = frozenset({"version", "query", "progress", *ShardSpec.model_fields})


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Flags win over environment variables; in store mode rank and world size default to
    :func:`sluicegate.core.env.detect` of the same environment."""
    env = os.environ if environ is None else environ
    flags = CliSettingsSource(SidecarConfig, cli_parse_args=list(sys.argv[1:] if argv is None else argv))()
    raw: dict[str, Any] = {
        name: env[env_var(name)] for name in SidecarConfig.model_fields if env_var(name) in env
    }
    raw.update(flags)
    if "broker_url" not in raw and ("rank" not in raw or "world_size" not in raw):
        where = detect(env)
        raw.setdefault("rank", str(where.rank))
        raw.setdefault("world_size", str(where.world_size))
    if raw.get("version") == "":
        del raw["version"]
    try:
        return SidecarConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid sidecar configuration: {problems(exc)}") from None
