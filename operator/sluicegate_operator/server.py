"""The operator's HTTPS server: admission webhook, broker, health and metrics on one port.

TLS comes from ``certs``: the chain lives in a Secret, is renewed in place before it ages out (the
SSL context loads the new chain; open connections keep the old one), and the CA is published to the
webhook configuration's ``caBundle``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from sluicegate._broker_protocol import BrokerError, BrokerErrorCode, BrokerPaths, PlanRequest, UrlsRequest

from . import certs, webhook
from .access import Refused
from .broker import Broker
from .certs import TLSState
from .kube import Kube
from .metrics import CERT_ROTATIONS, REGISTRY
from .settings import Settings

log = logging.getLogger("sluicegate.server")
_CODES = {
    400: BrokerErrorCode.BAD_REQUEST,
    401: BrokerErrorCode.UNAUTHENTICATED,
    403: BrokerErrorCode.FORBIDDEN,
    404: BrokerErrorCode.NOT_FOUND,
    409: BrokerErrorCode.NOT_READY,
    503: BrokerErrorCode.UNAVAILABLE,
}


def _error(status: int, message: str) -> web.Response:
    body = BrokerError(code=_CODES.get(status, BrokerErrorCode.INTERNAL), message=message)
    return web.json_response(body.model_dump(mode="json"), status=status)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() or None if header.lower().startswith("bearer ") else None


async def _parse(request: web.Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.read()
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise Refused(
            400, "bad_request", f"malformed {model.__name__}: {exc.errors(include_url=False)}"
        ) from exc


class TLS:
    """Keeps the serving chain in the Secret fresh and the SSL context loaded with it."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self._kube = kube
        self._settings = settings
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.state: TLSState | None = None

    async def ensure(self, now: datetime | None = None) -> TLSState:
        """Load the chain from the Secret, renewing it (and winning or losing the race to) when due."""
        s = self._settings
        now = now or datetime.now(UTC)
        for _ in range(5):
            secret = await self._kube.read_secret(s.namespace, s.tls_secret)
            data = {k: base64.b64decode(v) for k, v in ((secret or {}).get("data") or {}).items()}
            current = TLSState.from_secret_data(data)
            if current is not None and not current.needs_rotation(s.hosts, now):
                break
            fresh = certs.renew(
                current,
                s.hosts,
                now,
                ca_valid=timedelta(days=s.ca_valid_days),
                cert_valid=timedelta(days=s.cert_valid_days),
            )
            if secret is None:
                stored = await self._kube.create_secret(s.namespace, s.tls_secret, fresh.secret_data())
            else:
                stored = await self._kube.replace_secret(
                    s.namespace, s.tls_secret, fresh.secret_data(), secret["metadata"]["resourceVersion"]
                )
            if stored:
                CERT_ROTATIONS.inc()
                log.info("issued a serving certificate for %s", ", ".join(s.hosts))
                current = fresh
                break
        else:
            raise RuntimeError(
                f"could not settle the TLS Secret {s.namespace}/{s.tls_secret}: too many conflicts"
            )
        assert current is not None
        if current != self.state:
            self._load(current)
            self.state = current
        return current

    def _load(self, state: TLSState) -> None:
        # load_cert_chain reads files only; the directory is private to this process and removed at once.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
            cert.write_bytes(state.cert + state.ca_cert)
            key.write_bytes(state.key)
            self.context.load_cert_chain(cert, key)

    @property
    def ca_pem(self) -> str:
        assert self.state is not None, "call ensure() first"
        return self.state.ca_cert.decode()


def build_app(hook: webhook.Webhook, broker: Broker) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "not a JSON AdmissionReview"}, status=400)
        return web.json_response(await hook.review(body))

    async def plan(request: web.Request) -> web.Response:
        try:
            answer = await broker.plan(_bearer(request), await _parse(request, PlanRequest))
        except Refused as exc:
            return _error(exc.status, exc.message)
        return web.Response(body=answer, content_type="application/json")

    async def urls(request: web.Request) -> web.Response:
        try:
            answer = await broker.urls(_bearer(request), await _parse(request, UrlsRequest))
        except Refused as exc:
            return _error(exc.status, exc.message)
        return web.Response(body=answer.model_dump_json(), content_type="application/json")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.add_routes(
        [
            web.post(webhook.PATH, mutate),
            web.post(BrokerPaths.PLAN, plan),
            web.post(BrokerPaths.URLS, urls),
            web.get(BrokerPaths.HEALTHZ, healthz),
            web.get(BrokerPaths.METRICS, metrics),
        ]
    )
    return app


async def publish_ca(kube: Kube, settings: Settings, tls: TLS) -> None:
    """Point the API server at us: the whole configuration in dev mode, else the caBundle of the chart's."""
    bundle = base64.b64encode(tls.ca_pem.encode()).decode()
    if settings.manage_webhook:
        client_config = {"url": f"{settings.url}{webhook.PATH}", "caBundle": bundle}
        await kube.apply_webhook_configuration(
            webhook.configuration(settings.webhook_configuration, client_config)
        )
    elif not await kube.patch_webhook_ca(settings.webhook_configuration, bundle):
        log.warning(
            "MutatingWebhookConfiguration %s does not exist; pods will not be injected until it does "
            "(install the Helm chart, or run with --manage-webhook)",
            settings.webhook_configuration,
        )


async def keep_tls_fresh(kube: Kube, settings: Settings, tls: TLS) -> None:
    """Background task: renew the chain when due and republish the CA (runs until cancelled)."""
    while True:
        await asyncio.sleep(settings.tls_check_interval_s)
        try:
            await tls.ensure()
            await publish_ca(kube, settings, tls)
        except Exception:
            log.exception("TLS renewal failed; retrying in %.0f s", settings.tls_check_interval_s)


async def start(app: web.Application, settings: Settings, tls: TLS) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_host, settings.listen_port, ssl_context=tls.context)
    await site.start()
    return runner
