"""``sluicegate-operator``: reconciler, admission webhook and broker in one process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from datetime import timedelta
from typing import Any

import kopf

from . import handlers, server
from .broker import Broker
from .catalog import Catalog
from .inject import SidecarConfig
from .kube import Kube
from .settings import Settings
from .webhook import Webhook

log = logging.getLogger("sluicegate.operator")


def parse_args(argv: list[str] | None = None) -> Settings:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="sluicegate-operator", description=__doc__)
    p.add_argument(
        "--namespace",
        default=env("SLUICEGATE_OPERATOR_NAMESPACE", "sluicegate-system"),
        help="namespace of the operator (TLS Secret lives there)",
    )
    p.add_argument("--service-name", default=env("SLUICEGATE_SERVICE_NAME", "sluicegate-operator"))
    p.add_argument(
        "--listen", default=env("SLUICEGATE_LISTEN_ADDRESS", "0.0.0.0:8443"), help="HOST:PORT to serve on"
    )
    p.add_argument(
        "--public-url",
        default=env("SLUICEGATE_PUBLIC_URL"),
        help="https://HOST[:PORT] the API server and sidecars reach this process at",
    )
    p.add_argument("--webhook-configuration", default=env("SLUICEGATE_WEBHOOK_CONFIGURATION", "sluicegate"))
    p.add_argument(
        "--manage-webhook",
        action="store_true",
        default=env("SLUICEGATE_MANAGE_WEBHOOK", "") == "true",
        help="create the MutatingWebhookConfiguration itself (development without Helm)",
    )
    p.add_argument("--tls-secret", default=env("SLUICEGATE_TLS_SECRET", "sluicegate-operator-tls"))
    p.add_argument(
        "--extra-san", action="append", default=[], help="extra DNS name or IP for the certificate"
    )
    p.add_argument(
        "--sidecar-image", default=env("SLUICEGATE_SIDECAR_IMAGE", "ghcr.io/sluicegate/sluicegate:0.1.0")
    )
    p.add_argument(
        "--presign-ttl",
        type=int,
        default=int(env("SLUICEGATE_PRESIGN_TTL_S", "900")),
        help="seconds a presigned URL stays valid",
    )
    p.add_argument("--cert-valid-days", type=float, default=float(env("SLUICEGATE_CERT_VALID_DAYS", "90")))
    p.add_argument(
        "--resync",
        type=float,
        default=float(env("SLUICEGATE_RESYNC_S", "60")),
        help="seconds between re-reads of each Dataset's store",
    )
    p.add_argument(
        "--kubeconfig", default=env("KUBECONFIG"), help="kubeconfig (default: in-cluster credentials)"
    )
    p.add_argument("--log-level", default=env("SLUICEGATE_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, _, port = args.listen.rpartition(":")
    return Settings(
        namespace=args.namespace,
        service_name=args.service_name,
        listen_host=host or "0.0.0.0",
        listen_port=int(port),
        public_url=args.public_url,
        webhook_configuration=args.webhook_configuration,
        manage_webhook=args.manage_webhook,
        tls_secret=args.tls_secret,
        extra_sans=tuple(args.extra_san),
        sidecar_image=args.sidecar_image,
        presign_ttl_s=args.presign_ttl,
        cert_valid_days=args.cert_valid_days,
        dataset_resync_s=args.resync,
        kubeconfig=args.kubeconfig,
    )


def _login(kube: Kube) -> Any:
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube.connection_info()

    return login


async def run(settings: Settings) -> None:
    kube = Kube.connect(settings.kubeconfig)
    catalog = Catalog()
    tls = server.TLS(kube, settings)
    await tls.ensure()
    sidecar = SidecarConfig(image=settings.sidecar_image, broker_url=settings.url, broker_ca_pem=tls.ca_pem)
    app = server.build_app(
        Webhook(kube, sidecar), Broker(kube, catalog, timedelta(seconds=settings.presign_ttl_s))
    )
    runner = await server.start(app, settings, tls)
    log.info(
        "serving webhook and broker on %s:%d as %s", settings.listen_host, settings.listen_port, settings.url
    )
    await server.publish_ca(kube, settings, tls)

    ctx = handlers.Context(kube=kube, catalog=catalog, settings=settings)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(_login(kube))
    kopf.on.startup(registry=registry)(handlers.configure_on_startup)
    handlers.register(registry, ctx)
    background = [
        asyncio.create_task(server.keep_tls_fresh(kube, settings, tls)),
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


def main(argv: list[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
