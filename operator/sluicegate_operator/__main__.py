"""``sluicegate-operator``: reconciler, admission webhook and broker in one process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
from datetime import timedelta
from typing import Any

import kopf

from . import handlers, server
from .broker import Broker, BrokerLimits
from .catalog import Catalog, Limits
from .inject import SidecarTemplate
from .kube import Kube, KubeError
from .resolve import Sources
from .settings import DEFAULT_IMAGE, Settings
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
    p.add_argument("--sidecar-image", default=env("SLUICEGATE_SIDECAR_IMAGE", DEFAULT_IMAGE))
    p.add_argument(
        "--presign-ttl",
        type=int,
        default=int(env("SLUICEGATE_PRESIGN_TTL_S", "300")),
        help="seconds a presigned URL stays valid",
    )
    p.add_argument(
        "--sources-configmap",
        default=env("SLUICEGATE_SOURCES_CONFIGMAP", "sluicegate-sources"),
        help="ConfigMap in --namespace with the platform's source policy (chart value `sources`)",
    )
    p.add_argument(
        "--serve-only",
        action="store_true",
        default=env("SLUICEGATE_SERVE_ONLY", "") == "true",
        help="serve the webhooks and the broker only, without the reconciler (webhook replicas)",
    )
    p.add_argument(
        "--manifest-max-bytes", type=int, default=int(env("SLUICEGATE_MANIFEST_MAX_BYTES", str(64 << 20)))
    )
    p.add_argument(
        "--manifest-max-rows", type=int, default=int(env("SLUICEGATE_MANIFEST_MAX_ROWS", "10000000"))
    )
    p.add_argument(
        "--manifest-max-decoded-bytes",
        type=int,
        default=int(env("SLUICEGATE_MANIFEST_MAX_DECODED_BYTES", str(512 << 20))),
    )
    p.add_argument("--cache-bytes", type=int, default=int(env("SLUICEGATE_CACHE_BYTES", str(1 << 30))))
    p.add_argument("--store-timeout", type=float, default=float(env("SLUICEGATE_STORE_TIMEOUT_S", "10")))
    p.add_argument(
        "--broker-rate",
        type=float,
        default=float(env("SLUICEGATE_BROKER_RATE", "50")),
        help="broker requests per second per pod (bursts of twice that)",
    )
    p.add_argument(
        "--metrics-auth",
        choices=("true", "false"),
        default=env("SLUICEGATE_METRICS_AUTH", "true"),
        help="require a bearer token allowed to get /metrics (true) or serve it to anyone (false)",
    )
    p.add_argument(
        "--admission-auth",
        choices=("true", "false"),
        default=env("SLUICEGATE_ADMISSION_AUTH", "false"),
        help="require the caller of /mutate and /validate to bear a token allowed to post them (true: "
        "for an API server configured to authenticate to webhooks) or answer anyone (false)",
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
        sources_configmap=args.sources_configmap,
        serve_only=args.serve_only,
        manifest_bytes=args.manifest_max_bytes,
        manifest_rows=args.manifest_max_rows,
        manifest_decoded_bytes=args.manifest_max_decoded_bytes,
        cache_bytes=args.cache_bytes,
        store_timeout_s=args.store_timeout,
        metrics_auth=args.metrics_auth == "true",
        admission_auth=args.admission_auth == "true",
        broker_rate=args.broker_rate,
        broker_burst=2 * args.broker_rate,
    )


def _login(kube: Kube) -> Any:
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube.connection_info()

    return login


async def run(settings: Settings) -> None:
    kube = Kube.connect(settings.kubeconfig)
    catalog = Catalog(
        Limits(
            manifest_bytes=settings.manifest_bytes,
            manifest_rows=settings.manifest_rows,
            decoded_bytes=settings.manifest_decoded_bytes,
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


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(run(parse_args(argv)))
    except KubeError as exc:
        # A configuration mistake, not a bug: one line that says what to do, no traceback.
        log.error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
