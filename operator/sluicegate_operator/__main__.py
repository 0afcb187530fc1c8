"""``sluicegate-operator``: reconciler, admission webhook and broker in one process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import kopf
from pydantic import ValidationError
from sluicegate.core.daemon import problems

from . import handlers, server
from .broker import Broker, BrokerLimits
from .catalog import Catalog, Limits
from .inject import SidecarTemplate
from .kube import Kube, KubeError
from .resolve import Sources
from .settings import Settings
from .webhook import Webhook

log = logging.getLogger("sluicegate.operator")


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Flags, then ``SLUICEGATE_*`` variables, then defaults; a bad value exits 2 with one line per field."""
    try:
        settings = Settings(_cli_parse_args=list(sys.argv[1:] if argv is None else argv))
    except ValidationError as exc:
        print(f"sluicegate-operator: invalid settings: {problems(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return settings


def _login(kube: Kube) -> Any:
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube.connection_info()

    return login


async def run(settings: Settings) -> None:
    kube = Kube.connect(settings.kubeconfig)
    catalog = Catalog(
        Limits(
            manifest_bytes=settings.manifest_max_bytes,
            manifest_rows=settings.manifest_max_rows,
            decoded_bytes=settings.manifest_max_decoded_bytes,
            cache_bytes=settings.cache_bytes,
            timeout_s=settings.store_timeout_s,
        )
    )
    policies = Sources(kube, settings.namespace, settings.sources_configmap)
    tls = server.TLS(kube, settings)
    await tls.ensure()
    key = await server.grant_key(kube, settings)
    sidecar = SidecarTemplate(image=settings.sidecar_image, broker_url=settings.url, broker_ca_pem=tls.ca_pem)
    broker = Broker(
        kube,
        catalog,
        timedelta(seconds=settings.presign_ttl_s),
        policies=policies,
        grant_key=key,
        limits=BrokerLimits(rate_per_s=settings.broker_rate, burst=settings.broker_burst),
    )
    hook = Webhook(kube, sidecar, grant_key=key, policies=policies)
    app = server.build_app(
        hook,
        broker,
        metrics=server.PathGate(kube, server.SCRAPE) if settings.metrics_auth else None,
        admission=server.PathGate(kube, server.ADMIT) if settings.admission_auth else None,
    )

    def on_bundle(pem: str) -> None:  # pods admitted from now on trust the CA's successor too
        hook.sidecar = dataclasses.replace(hook.sidecar, broker_ca_pem=pem)

    runner = await server.start(app, settings, tls)
    log.info(
        "serving webhook and broker on %s:%d as %s", settings.listen_host, settings.listen_port, settings.url
    )
    await server.publish_ca(kube, settings, tls)
    if settings.serve_only:
        try:
            await server.keep_tls_fresh(kube, settings, tls, on_bundle)
        finally:
            await runner.cleanup()
        return

    ctx = handlers.Context(kube=kube, catalog=catalog, settings=settings, policies=policies)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(_login(kube))
    kopf.on.startup(registry=registry)(handlers.configure_on_startup)
    handlers.register(registry, ctx)
    background = [
        asyncio.create_task(server.keep_tls_fresh(kube, settings, tls, on_bundle)),
        asyncio.create_task(handlers.flush_pod_counts(ctx)),
        asyncio.create_task(handlers.resync(ctx)),
    ]
    try:
        await kopf.operator(registry=registry, clusterwide=True, standalone=True)
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    try:
        asyncio.run(run(parse_args(argv)))
    except KubeError as exc:
        # A configuration mistake, not a bug: one line that says what to do, no traceback.
        log.error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
