"""The operator's HTTPS server: admission webhook, broker, health and metrics on one port.

TLS comes from ``certs``: the chain lives in a Secret, is renewed in place before it ages out (the
SSL context loads the new chain; open connections keep the old one), and the CA is published to the
webhook configuration's ``caBundle``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sluicegate.core.broker_protocol import (
    MAX_URLS_PER_REQUEST,
    SOURCE_NAME_PATTERN,
    BrokerError,
    BrokerErrorCode,
    BrokerPaths,
)

from . import certs, webhook
from .access import Refused
from .broker import Broker
from .certs import TLSState
from .kube import Kube
from .metrics import CERT_EXPIRY, CERT_ROTATIONS, REGISTRY
from .settings import Settings

log = logging.getLogger("sluicegate.server")
SOURCE_NAME = re.compile(SOURCE_NAME_PATTERN)
_CODES = {
    400: BrokerErrorCode.BAD_REQUEST,
    401: BrokerErrorCode.UNAUTHENTICATED,
    403: BrokerErrorCode.FORBIDDEN,
    404: BrokerErrorCode.NOT_FOUND,
    409: BrokerErrorCode.NOT_READY,
    413: BrokerErrorCode.TOO_LARGE,
    429: BrokerErrorCode.RATE_LIMITED,
    503: BrokerErrorCode.UNAVAILABLE,
}


def _error(status: int, message: str, retry_after: float | None = None) -> web.Response:
    body = BrokerError(code=_CODES.get(status, BrokerErrorCode.INTERNAL), message=message)
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
    return web.json_response(body.model_dump(mode="json"), status=status, headers=headers)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() or None if header.lower().startswith("bearer ") else None


# Bodies the broker reads, once the caller is authenticated: a plan request is a few bytes, a URL request
# names at most MAX_URLS_PER_REQUEST hashes.
PLAN_BODY_BYTES = 4 * 1024
URLS_BODY_BYTES = MAX_URLS_PER_REQUEST * 80 + 1024
PROGRESS_BODY_BYTES = 256 * 1024  # a report: a rank's passes, each a count per DataLoader worker
LEDGER_BODY_BYTES = 4 * 1024 * 1024  # a ledger report: up to ledger.MAX_RANGES ranges, a random reader's
BODY_LIMITS = {
    BrokerPaths.PLAN: PLAN_BODY_BYTES,
    BrokerPaths.URLS: URLS_BODY_BYTES,
    BrokerPaths.PROGRESS: PROGRESS_BODY_BYTES,
    BrokerPaths.LEDGER: LEDGER_BODY_BYTES,
}
# An AdmissionReview carries the whole object (and for updates the old one too).
REVIEW_BODY_BYTES = 8 * 1024 * 1024


def _body(request: web.Request, limit: int) -> Callable[[], Awaitable[bytes]]:
    """A reader of ``request``'s body that refuses (413) more than ``limit`` bytes, declared or sent."""

    async def read() -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise Refused(
                413, "too_large", f"the request body is {request.content_length} bytes; at most {limit}"
            )
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise Refused(413, "too_large", f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    return read


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
            CERT_EXPIRY.set(current.expires().timestamp())
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
        """The trust bundle (CA certificates only, never a key) for the API server and sidecars."""
        assert self.state is not None, "call ensure() first"
        return self.state.trust_bundle.decode()


GRANT_KEY = "grant.key"


async def grant_key(kube: Kube, settings: Settings) -> bytes:
    """The key that seals admission's rank grants: kept in its own Secret, created once (the first
    replica wins; the others read what it wrote). Pods keep working across certificate rotations."""
    name = settings.grant_secret
    for _ in range(5):
        secret = await kube.read_secret(settings.namespace, name)
        data = kube.secret_data_bytes(secret) if secret is not None else {}
        if len(data.get(GRANT_KEY, b"")) >= 32:
            return data[GRANT_KEY]
        fresh = {GRANT_KEY: secrets.token_bytes(32)}
        if secret is None:
            stored = await kube.create_secret(settings.namespace, name, fresh)
        else:
            stored = await kube.replace_secret(
                settings.namespace, name, fresh, secret["metadata"]["resourceVersion"]
            )
        if stored:
            return fresh[GRANT_KEY]
    raise RuntimeError(
        f"could not settle the grant key Secret {settings.namespace}/{name}: too many conflicts"
    )


# Scraping is a get; the API server posts AdmissionReviews (where it is configured to authenticate
# to webhooks: an AdmissionConfiguration whose kubeconfig gives it a token).
SCRAPE, ADMIT = "get", "post"


class PathGate:
    """Who may call a path: a bearer token the API server vouches for (TokenReview, its default
    audience) whose user may ``verb`` that non-resource URL (SubjectAccessReview). ``/metrics`` names
    streams and refusal reasons, and a forged AdmissionReview answers whether a stream exists or a
    ServiceAccount may stream, so neither may be asked by a pod. A yes is reused for a minute per token
    digest, so the API server's calls cost no review after the first."""

    TTL_S = 60.0

    def __init__(self, kube: Kube, verb: str) -> None:
        self._kube = kube
        self._verb = verb
        self._allowed: dict[tuple[str, str], float] = {}

    async def check(self, path: str, token: str | None) -> None:
        if not token:
            raise Refused(401, "no_token", f"{path} needs a bearer token allowed to {self._verb} {path}")
        key = (hashlib.sha256(token.encode()).hexdigest(), path)
        now = time.monotonic()
        if self._allowed.get(key, 0.0) > now:
            return
        review = await self._kube.token_review(token, [])
        if not review.get("authenticated"):
            raise Refused(401, "token_rejected", "the bearer token was not accepted by TokenReview")
        user = review.get("user") or {}
        allowed = await self._kube.may_use_path(
            user=str(user.get("username", "")),
            groups=list(user.get("groups") or []),
            path=path,
            verb=self._verb,
        )
        if not allowed:
            raise Refused(
                403, "rbac", f"{user.get('username')} may not {self._verb} {path} (a non-resource URL)"
            )
        if len(self._allowed) > 1000:
            self._allowed.clear()
        self._allowed[key] = now + self.TTL_S

    def guard(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        """``handler`` behind this gate: refused before its body is read."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                await self.check(request.path, _bearer(request))
            except Refused as exc:
                return _error(exc.status, exc.message)
            return await handler(request)

        return guarded


def build_app(
    hook: webhook.Webhook,
    broker: Broker,
    metrics: PathGate | None = None,
    admission: PathGate | None = None,
) -> web.Application:
    def gated(gate: PathGate | None, handler: Any) -> Any:
        return handler if gate is None else gate.guard(handler)

    def review_handler(review: Callable[[Any], Awaitable[dict[str, Any]]]) -> Any:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = json.loads(await _body(request, REVIEW_BODY_BYTES)())
            except Refused as exc:
                return web.json_response({"error": exc.message}, status=exc.status)
            except ValueError:
                return web.json_response({"error": "not a JSON AdmissionReview"}, status=400)
            if not isinstance(body, dict):
                return web.json_response({"error": "not a JSON AdmissionReview"}, status=400)
            return web.json_response(await review(body))

        return handler

    def brokered(call: Callable[..., Awaitable[bytes]], limit: int) -> Any:
        """A broker endpoint: the call sees the token, a bounded body reader and the caller's address."""

        async def handler(request: web.Request) -> web.Response:
            try:
                source = request.query.get("source")
                if source is not None and not SOURCE_NAME.fullmatch(source):
                    raise Refused(400, "bad_request", "?source= must name one of the spec.sources of a mix")
                answer = await call(_bearer(request), _body(request, limit), request.remote or "?", source)
            except Refused as exc:
                return _error(exc.status, exc.message, exc.retry_after)
            return web.Response(body=answer, content_type="application/json")

        return handler

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=REVIEW_BODY_BYTES)
    app.add_routes(
        [
            web.post(webhook.PATH, gated(admission, review_handler(hook.review))),
            web.post(webhook.VALIDATE_PATH, gated(admission, review_handler(hook.validate))),
            *(web.post(path, brokered(call, BODY_LIMITS[path])) for path, call in broker.endpoints().items()),
            web.get(BrokerPaths.HEALTHZ, healthz),
            web.get(BrokerPaths.METRICS, gated(metrics, scrape)),
        ]
    )
    return app


async def publish_ca(kube: Kube, settings: Settings, tls: TLS) -> None:
    """Point the API server at us: the whole configuration in dev mode, else the caBundle of the chart's."""
    bundle = base64.b64encode(tls.ca_pem.encode()).decode()
    # The bundle for anyone else who must trust the operator (Prometheus): public, so nobody needs the
    # Secret with the CA's key.
    await kube.put_configmap(settings.namespace, settings.ca_configmap, {"ca.crt": tls.ca_pem})
    if settings.manage_webhook:
        client_config = {"url": f"{settings.url}{webhook.PATH}", "caBundle": bundle}
        await kube.apply_webhook_configuration(
            webhook.configuration(settings.webhook_configuration, client_config)
        )
        validate = {"url": f"{settings.url}{webhook.VALIDATE_PATH}", "caBundle": bundle}
        await kube.apply_validating_configuration(
            webhook.validating_configuration(settings.webhook_configuration, validate)
        )
    elif not await kube.patch_webhook_ca(settings.webhook_configuration, bundle):
        log.warning(
            "Mutating- or ValidatingWebhookConfiguration %s does not exist; pods will not be injected (or "
            "streams and Datasets not checked) until both do "
            "(install the Helm chart, or run with --manage-webhook)",
            settings.webhook_configuration,
        )


async def keep_tls_fresh(
    kube: Kube, settings: Settings, tls: TLS, on_bundle: Callable[[str], None] | None = None
) -> None:
    """Background task: renew the chain when due and republish the CA (runs until cancelled);
    ``on_bundle`` hears of every new trust bundle (what newly injected sidecars must trust)."""
    while True:
        await asyncio.sleep(settings.tls_check_interval_s)
        try:
            await tls.ensure()
            await publish_ca(kube, settings, tls)
            if on_bundle is not None:
                on_bundle(tls.ca_pem)
        except Exception:
            log.exception("TLS renewal failed; retrying in %.0f s", settings.tls_check_interval_s)


async def start(app: web.Application, settings: Settings, tls: TLS) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.listen_host,
        settings.listen_port,
        ssl_context=tls.context,
        reuse_port=settings.reuse_port,
    )
    await site.start()
    return runner
