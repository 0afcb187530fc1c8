"""Broker mode without a cluster: a stand-in broker over real TLS hands out URLs presigned on the real
SigV4 S3 server (versitygw), so the sidecar meets the store's own refusals. The operator's broker itself is
exercised end to end in tests/e2e/test_stream_e2e.py."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sluicegate
from aiohttp import web
from sluicegate import Store
from sluicegate._exceptions import ConfigError
from sluicegate.core import protocol as proto
from sluicegate.core.broker_protocol import (
    BrokerError,
    BrokerErrorCode,
    BrokerPaths,
    PlanRequest,
    PlanResponse,
    ProgressReport,
    UrlsRequest,
    UrlsResponse,
)
from sluicegate.core.partition import Progress, Remainder, ShardSpec, rank_plan
from sluicegate.core.protocol import Resume
from sluicegate.core.store import blob_key
from sluicegate_sidecar.config import parse_args

from tests.s3server import S3Server
from tests.s3server.fixtures import s3_server  # noqa: F401  (the SigV4 server, not the root conftest's moto)
from tests.sidecar.helpers import InProcessSidecar, make_dataset
from tests.testbed import wait_for
from tests.testbed.pki import CertificateAuthority

pytestmark = pytest.mark.integration

GOOD = "good-token"


class StandInBroker:
    """Serves a whole store's latest version as one shard over HTTPS, URLs only on request like the real
    broker. URLs live ``ttl`` and say so, except the first window's when ``first_lives`` is set: those
    live that long although ``expires_at`` claims ``ttl`` (a broker whose clock is behind the store's:
    only a refusal tells)."""

    def __init__(self, store: Store, pki: Path) -> None:
        self.store = store
        self.ca = CertificateAuthority(pki)
        self._pair = self.ca.issue("broker", "broker", hosts=("127.0.0.1",), server=True)
        self.ttl = timedelta(hours=1)
        self.first_lives: timedelta | None = None
        self.plan_requests: list[PlanRequest] = []
        self.url_windows: list[list[str]] = []  # the blobs of each /v1/urls request
        self.progress: Progress | None = None  # the stream's epoch in progress, when it keeps one
        self.reports: list[ProgressReport] = []  # what the sidecar passed on (POST /v1/progress)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _presign(self, blobs: list[str], ttl: timedelta) -> dict[str, str]:
        return dict(zip(blobs, self.store.presign_many([blob_key(b) for b in blobs], ttl), strict=True))

    @staticmethod
    def _refused(request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") == f"Bearer {GOOD}":
            return None
        error = BrokerError(
            code=BrokerErrorCode.UNAUTHENTICATED, message="the token's audience is not sluicegate.io"
        )
        return web.Response(status=401, text=error.model_dump_json(), content_type="application/json")

    async def _plan(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self.plan_requests.append(PlanRequest.model_validate_json(await request.read()))
        version = self.store.resolve(None)
        rows: list[dict[str, Any]] = self.store.manifest(version)[0].to_pylist()
        resume = None
        if self.progress is not None:
            # As the broker does: this rank's re-cut assignment follows the shard's rows.
            plan = rank_plan(len(rows), ShardSpec(), epoch=self.progress.epoch, progress=self.progress)
            extra = [rows[i] for i in plan.assignment.tolist()] if plan.segment else []
            resume = Resume(progress=self.progress, first=len(rows), items=len(extra))
            rows = rows + extra
        plan = PlanResponse.model_validate(
            {
                "namespace": "team-a",
                "stream": "train",
                "dataset": "data/coco",
                "version": version,
                "query": "",
                "policies": [],
                "total": len(rows),
                "rank": 0,
                "world_size": 1,
                "seed": 0,
                "shuffle": True,
                "remainder": Remainder.PAD,
                "rows": rows,
                "urls": self._presign([r["blob"] for r in rows], self.ttl)
                if self.plan_requests[-1].presign
                else {},
                "expires_at": datetime.now(UTC) + self.ttl,
                "resume": resume,
            }
        )
        return web.Response(text=plan.model_dump_json(), content_type="application/json")

    async def _progress(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self.reports.append(ProgressReport.model_validate_json(await request.read()))
        return web.json_response({})

    async def _urls(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = UrlsRequest.model_validate_json(await request.read())
        lives = self.first_lives if self.first_lives is not None and not self.url_windows else self.ttl
        self.url_windows.append(body.blobs)
        fresh = UrlsResponse(urls=self._presign(body.blobs, lives), expires_at=datetime.now(UTC) + self.ttl)
        return web.Response(text=fresh.model_dump_json(), content_type="application/json")

    def __enter__(self) -> StandInBroker:
        self._thread.start()

        async def start() -> str:
            app = web.Application()
            app.router.add_post(BrokerPaths.PLAN, self._plan)
            app.router.add_post(BrokerPaths.URLS, self._urls)
            app.router.add_post(BrokerPaths.PROGRESS, self._progress)
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self._pair.cert, self._pair.key)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
            await site.start()
            sock: Any = site._server.sockets[0]  # type: ignore[union-attr]
            return f"https://127.0.0.1:{sock.getsockname()[1]}"

        self.url = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def broker(s3_server: S3Server, tmp_path: Path) -> Iterator[tuple[StandInBroker, dict[str, bytes]]]:  # noqa: F811
    bucket = f"broker-{tmp_path.name[-20:].lower().replace('_', '-').strip('-')}"
    s3_server.create_bucket(bucket)
    options = s3_server.options()
    uri = f"s3://{bucket}/ds"
    expected = make_dataset(uri, 12, size=2000, s3=options)
    with StandInBroker(Store(uri, options), tmp_path / "pki") as stand_in:
        yield stand_in, expected


def _argv(broker: StandInBroker, token: Path, ca: str, *more: str) -> list[str]:
    return [
        "--broker-url",
        broker.url,
        "--broker-ca",
        ca,
        "--token-file",
        str(token),
        "--listen",
        "127.0.0.1:0",
        *more,
    ]


def _readyz(sc: InProcessSidecar) -> httpx.Response:
    return httpx.get(sc.tcp + "/readyz", trust_env=False, timeout=10)


def _stream(sc: InProcessSidecar, start: int, count: int) -> dict[str, bytes]:
    """Items ``[start, start + count)`` of epoch 0's order, read like the SDK does."""
    response = httpx.get(
        sc.tcp + proto.Paths.STREAM, params={"start": start, "count": count}, trust_env=False, timeout=30
    )
    assert response.status_code == 200, response.text
    header, blobs = proto.decode_batch(response.content)
    return {row.id: blob for row, blob in zip(header.rows, blobs, strict=True)}


def test_urls_the_store_refuses_are_renewed_once_and_bytes_verified(
    broker: tuple[StandInBroker, dict[str, bytes]], tmp_path: Path
) -> None:
    stand_in, expected = broker
    # Signing times have whole seconds: a URL living 3 s may die 2 s after it was made, not sooner.
    stand_in.first_lives = timedelta(seconds=3)
    token = tmp_path / "token"
    token.write_text(GOOD + "\n")
    # The CA as a file path here (the webhook injects the PEM itself, which the next test uses).
    argv = _argv(stand_in, token, str(stand_in.ca.cert_path), "--readahead", "0")
    with InProcessSidecar(argv) as sc:
        wait_for(lambda: _readyz(sc).status_code == 200, timeout_s=20, what="sidecar ready")
        assert [r.presign for r in stand_in.plan_requests] == [False], "the plan is asked for rows only"
        first = _stream(sc, 0, 1)  # brings the first window: a URL for every blob, each dead in 3 s
        assert [len(w) for w in stand_in.url_windows] == [len(expected)]
        time.sleep(4.5)  # the first window's URLs are past their real expiry now
        ds = sluicegate.connect(sc.tcp)
        assert {item.id: item.data for item in ds} == expected
        assert first.items() <= expected.items()
        assert sc.sidecar is not None
        assert sc.sidecar.broker is not None
        assert sc.sidecar.broker.renewals == Counter(ahead=1, refused=1), "refusals share one renewal"
        assert len(stand_in.url_windows) == 2
        assert len(stand_in.url_windows[1]) == len(expected) - 1, "all but the cached blob, renewed at once"
        assert sc.sidecar.engine.stats.integrity_failures == 0
        scrape = httpx.get(sc.tcp + "/metrics", trust_env=False).text
        assert 'sluicegate_url_renewals_total{reason="refused"} 1.0' in scrape
        info = httpx.get(sc.tcp + "/v1/info", trust_env=False).json()
        assert (info["dataset"], info["items"], info["query"]) == ("data/coco", len(expected), None)


def test_urls_come_in_windows_ahead_of_the_reads_and_are_renewed_before_expiry(
    broker: tuple[StandInBroker, dict[str, bytes]], tmp_path: Path
) -> None:
    stand_in, expected = broker
    stand_in.ttl = timedelta(seconds=4)  # honest: usable for 3 s (three quarters), then renewed in time
    token = tmp_path / "token"
    token.write_text(GOOD)
    argv = _argv(stand_in, token, stand_in.ca.pem.decode(), "--url-window", "4", "--readahead", "0")
    with InProcessSidecar(argv) as sc:
        wait_for(lambda: _readyz(sc).status_code == 200, timeout_s=20, what="sidecar ready")
        assert stand_in.url_windows == [], "no URL is asked for before a read"
        got = _stream(sc, 0, 1)
        assert [len(w) for w in stand_in.url_windows] == [4], "one window ahead of the first read"
        time.sleep(3.5)  # the three unused URLs of that window are past their renewal time, not expiry
        got |= _stream(sc, 1, len(expected) - 1)
        assert got == expected
        assert sc.sidecar is not None
        assert sc.sidecar.broker is not None
        renewals = sc.sidecar.broker.renewals
        assert renewals["refused"] == 0, "no fetch used a URL about to lapse"
        assert renewals["ahead"] == 2, "the stale URLs were renewed ahead of their fetches, not used"
        assert all(1 <= len(w) <= 4 for w in stand_in.url_windows), stand_in.url_windows
        assert len(stand_in.url_windows) >= len(expected) // 4
        assert set().union(*map(set, stand_in.url_windows)) == {
            row["blob"] for row in stand_in.store.manifest()[0].select(["blob"]).to_pylist()
        }
        # A second epoch from the memory cache asks the broker for nothing.
        before = len(stand_in.url_windows)
        assert _stream(sc, 0, len(expected)) == expected
        assert len(stand_in.url_windows) == before


def test_refused_token_keeps_readiness_false_until_the_rotated_token_is_accepted(
    broker: tuple[StandInBroker, dict[str, bytes]], tmp_path: Path
) -> None:
    stand_in, _ = broker
    token = tmp_path / "token"
    token.write_text("stale-token")
    with InProcessSidecar(_argv(stand_in, token, stand_in.ca.pem.decode())) as sc:

        def refusal() -> str | None:
            response = _readyz(sc)
            assert response.status_code in (200, 503)
            assert response.status_code == 503, "a refused sidecar must not report ready"
            message = str(response.json()["message"])
            return message if "refused" in message else None

        message = wait_for(refusal, timeout_s=20, what="the broker's refusal in /readyz")
        assert "HTTP 401 unauthenticated" in message
        assert "audience is not sluicegate.io" in message
        token.write_text(GOOD)  # the kubelet rotates the projected token in place
        wait_for(lambda: _readyz(sc).status_code == 200, timeout_s=20, what="ready with the rotated token")


def test_a_stream_recut_epoch_is_served_and_progress_passed_on(
    broker: tuple[StandInBroker, dict[str, bytes]], tmp_path: Path
) -> None:
    """The broker's plan continues an epoch re-cut from 2 ranks to this one: the sidecar serves the
    re-cut rows, the trainer reads exactly them, and its progress reaches the broker."""
    stand_in, expected = broker
    stand_in.progress = Progress.start(3, 2).lockstep(((4,),)).recut(1)
    token = tmp_path / "token"
    token.write_text(GOOD)
    with InProcessSidecar(_argv(stand_in, token, stand_in.ca.pem.decode())) as sc:
        wait_for(lambda: _readyz(sc).status_code == 200, timeout_s=20, what="sidecar ready")
        ds = sluicegate.connect(sc.tcp)
        assert ds.epoch == 3
        assert len(ds) == len(expected), "the shard itself is unchanged"
        got = [item.id for item in ds]
        assert len(got) == len(expected) - 8, "what the two ranks left, each item once"
        assert len(set(got)) == len(got)
        ds.close()

        def passed_on() -> ProgressReport | None:
            return next((r for r in stand_in.reports if r.consumed == ((len(got),),)), None)

        report = wait_for(passed_on, timeout_s=20, what="the progress passed on to the broker")
        assert (report.epoch, report.segment, report.world_size, report.rank) == (3, 1, 1, 0)


def test_broker_mode_configuration() -> None:
    broker = {"SLUICEGATE_BROKER_URL": "https://sluicegate-operator.sluicegate-system.svc"}
    cfg = parse_args([], {**broker, "SLUICEGATE_STREAM": "train", "JOB_COMPLETION_INDEX": "3"})
    assert (cfg.store, cfg.stream, cfg.rank) == (None, "train", 0), "the rank comes from the broker"
    assert cfg.token_file == Path("/var/run/secrets/sluicegate.io/token")
    with pytest.raises(ConfigError, match=r"exactly one of --store .* both are set"):
        parse_args(["--store", "/data"], broker)
    with pytest.raises(ConfigError, match="neither is set"):
        parse_args([], {})
    with pytest.raises(ConfigError, match="--query, --rank: the broker decides these"):
        parse_args(["--query", "labels.car > 0"], {**broker, "SLUICEGATE_RANK": "3"})
    with pytest.raises(ConfigError, match="broker-url"):
        parse_args(["--broker-url", "http://plain.example"], {})


def test_every_variable_the_webhook_sets_is_a_sidecar_setting() -> None:
    """The webhook writes SidecarEnv; the sidecar reads ENV_PREFIX + the name of each of its settings."""
    from sluicegate.core.broker_protocol import SidecarEnv, env_var
    from sluicegate_sidecar.config import SidecarConfig

    names = {env_var(field) for field in SidecarConfig.model_fields}
    injected = {v for k, v in vars(SidecarEnv).items() if k.isupper()}
    assert injected <= names, injected - names
