"""``sluicegate-operator``: admission webhooks and broker in every replica; the reconciler in the one
replica that holds the leader Lease (``leader``), the others standing by to take over."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import kopf
from pydantic import ValidationError
from sluicegate.core.daemon import problems

from . import handlers, leader, server
from .broker import Broker, BrokerLimits
from .catalog import Catalog, Limits
from .inject import SidecarTemplate
from .kube import Kube, KubeError
from .metrics import LEADER, STREAM_READY
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
    sidecar = SidecarTemplate(
        image=settings.sidecar_image,
        broker_url=settings.url,
        broker_ca_pem=tls.ca_pem,
        metrics_token_sha256=settings.scrape_token_sha256(),
    )
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
    stopping = asyncio.Event()
    _stop_on_signals(stopping)
    renewals = asyncio.create_task(server.keep_tls_fresh(kube, settings, tls, on_bundle))
    timing = leader.Timing(
        lease_s=settings.leader_lease_s,
        renew_s=settings.leader_renew_s,
        retry_s=min(leader.Timing.retry_s, settings.leader_renew_s),
    )
    elector = leader.Elector(kube, settings.namespace, settings.leader_lease, settings.identity, timing)
    try:
        await reconcile_while_leader(
            elector,
            stopping,
            lambda: _registry(
                kube, handlers.Context(kube=kube, catalog=catalog, settings=settings, policies=policies)
            ),
        )
    finally:
        renewals.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewals
        await runner.cleanup()


def _stop_on_signals(stopping: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stopping`` (kopf takes them over while it starts; they are taken back)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signum, stopping.set)


Term = tuple[kopf.OperatorRegistry, handlers.Context]


def _registry(kube: Kube, ctx: handlers.Context) -> Term:
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(_login(kube))
    kopf.on.startup(registry=registry)(handlers.configure_on_startup)
    handlers.register(registry, ctx)
    return registry, ctx


async def reconcile_while_leader(
    elector: leader.Elector, stopping: asyncio.Event, new_term: Callable[[], Term]
) -> None:
    """Stand by until this replica holds the Lease, reconcile while it does, stand by again when it is
    lost; return once ``stopping`` is set, the Lease handed back so that a standby takes over at once.
    Webhooks and the broker are served throughout, by every replica."""
    while True:
        acquiring = asyncio.create_task(elector.acquire())
        halt = asyncio.create_task(stopping.wait())
        await asyncio.wait({acquiring, halt}, return_when=asyncio.FIRST_COMPLETED)
        for task in (acquiring, halt):
            task.cancel()
        await asyncio.gather(acquiring, halt, return_exceptions=True)
        if stopping.is_set():
            return
        acquiring.result()
        LEADER.set(1)
        try:
            lost = await _lead(elector, stopping, *new_term())
        except Exception:
            await elector.release()
            raise
        finally:
            LEADER.set(0)
            STREAM_READY.clear()  # the reconciler's view: a standby exports none, rather than a stale one
        if lost is None:
            await elector.release()
            return
        log.warning(
            "lost the Lease %s/%s (%s): stopped reconciling; standing by",
            elector.namespace,
            elector.name,
            lost,
        )


async def _lead(
    elector: leader.Elector, stopping: asyncio.Event, registry: kopf.OperatorRegistry, ctx: handlers.Context
) -> str | None:
    """One term as the leader: kopf and the periodic work run until the Lease is lost (returns why) or
    a stop is asked for, or kopf ends by itself (returns ``None``)."""
    # Created before kopf, which on stopping cancels every task it finds started during its run
    # (among them this replica's open webhook and broker connections: a lost Lease drops those).
    holding = asyncio.create_task(elector.hold())
    periodic = [
        asyncio.create_task(handlers.flush_pod_counts(ctx)),
        asyncio.create_task(handlers.resync(ctx)),
    ]
    halt = asyncio.create_task(stopping.wait())
    started, stop_flag = asyncio.Event(), asyncio.Event()

    async def take_signals_back() -> None:
        await started.wait()
        _stop_on_signals(stopping)

    retake = asyncio.create_task(take_signals_back())
    operator = asyncio.create_task(
        kopf.operator(
            registry=registry, clusterwide=True, standalone=True, stop_flag=stop_flag, ready_flag=started
        )
    )
    try:
        done, _ = await asyncio.wait({holding, operator, halt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # At once: kopf is cancelled, not drained, as a lost Lease may leave only seconds before another
        # replica takes over (the stop flag keeps kopf from arming its forced exit).
        stop_flag.set()
        rest = [t for t in (operator, holding, halt, retake, *periodic) if not t.done()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        _stop_on_signals(stopping)
    if holding in done:
        return holding.result()
    if operator in done:
        operator.result()  # kopf's own failure ends the process, as before
    return None


def main(argv: Sequence[str] | None = None) -> None:
    try:
        asyncio.run(run(parse_args(argv)))
    except KubeError as exc:
        # A configuration mistake, not a bug: one line that says what to do, no traceback.
        log.error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
