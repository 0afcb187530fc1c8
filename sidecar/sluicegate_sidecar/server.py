"""The sidecar's HTTP server: one shard of one pinned dataset version, on loopback TCP and a unix socket.

The shard plan comes from the store and the configured query (store mode) or from the operator's broker
(broker mode, see :mod:`.broker`); everything after that is the same.

The paths, models and batch framing are :mod:`sluicegate.core.protocol`'s; fetching, verifying, caching and
prefetching are the :class:`~sluicegate.core.engine.Engine`'s, the same one embedded mode runs. Every error
is a JSON ``{code, message}``; a bad request gets a 4xx and the sidecar keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import socket
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from pydantic import ValidationError
from sluicegate import (
    ConfigError,
    IntegrityError,
    ItemNotInShard,
    NotFoundError,
    QueryError,
    SluicegateError,
    StoreError,
)
from sluicegate.core import backoff
from sluicegate.core import partition as _partition
from sluicegate.core import protocol as proto
from sluicegate.core.engine import BlobRef, Engine, Plan, StoreUpstream, Upstream, engine_store, read_manifest
from sluicegate.core.query import Query
from sluicegate.core.store import Store

from .broker import BrokerClient, BrokerRefused, BrokerUpstream, plan_of
from .config import SidecarConfig
from .fdsocket import FdServer, memory_file
from .ledger import LedgerWriter
from .metrics import SidecarCollector

__all__ = ["Sidecar"]

log = logging.getLogger("sluicegate.sidecar")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: tuple[tuple[type[Exception], int, proto.ErrorCode], ...] = (
    # most specific first
    (ItemNotInShard, 404, proto.ErrorCode.NOT_IN_SHARD),
    (QueryError, 400, proto.ErrorCode.QUERY),
    (ConfigError, 400, proto.ErrorCode.BAD_REQUEST),
    (IntegrityError, 502, proto.ErrorCode.INTEGRITY),
    (NotFoundError, 502, proto.ErrorCode.UPSTREAM),
    (StoreError, 502, proto.ErrorCode.UPSTREAM),
)


def _error_of(exc: Exception, what: str) -> tuple[int, proto.ErrorBody]:
    """The status and error body that answer a request that raised ``exc`` (HTTP and the fd socket)."""
    if isinstance(exc, _NotReady):
        return 503, proto.ErrorBody(code=proto.ErrorCode.NOT_READY, message=str(exc))
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return 400, proto.ErrorBody(
            code=proto.ErrorCode.BAD_REQUEST, message=f"malformed request: {problems}"
        )
    if isinstance(exc, SluicegateError):
        for kind, status, code in _STATUS:
            if isinstance(exc, kind):
                return status, proto.ErrorBody(code=code, message=str(exc))
        log.exception("request %s failed", what)
        return 500, proto.ErrorBody(code=proto.ErrorCode.INTERNAL, message=str(exc))
    log.exception("request %s failed", what)
    message = f"internal error: {type(exc).__name__}: {exc}"
    return 500, proto.ErrorBody(code=proto.ErrorCode.INTERNAL, message=message)


def _error(status: int, code: proto.ErrorCode, message: str) -> web.Response:
    body = proto.ErrorBody(code=code, message=message).model_dump_json()
    return web.Response(status=status, text=body, content_type="application/json")


class _NotReady(Exception):
    pass


class Sidecar:
    """Construction is cheap; :meth:`start` loads the plan and opens the listeners."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.store: Store | None = None
        self.broker: BrokerUpstream | None = None
        upstream: Upstream
        if config.broker_url is None:
            assert config.store is not None  # the config holds exactly one of the two
            self.store = engine_store(config.store, None)
            upstream = StoreUpstream(self.store)
        else:
            client = BrokerClient(
                config.broker_url,
                config.broker_ca,
                config.token_file,
                config.stream,
                config.timeout_s,
                source=config.source,
            )
            upstream = self.broker = BrokerUpstream(
                client,
                config.timeout_s,
                window=config.url_window,
                # Ask for the next window while the prefetcher still has URLs for all it may fetch.
                lead=max(config.url_window // 2, config.readahead),
                cached=lambda sha: sha in self.engine.memory,
            )
        self.engine = Engine(upstream, config.engine())
        # Store mode records what its trainers report consuming; broker mode passes it on to the broker.
        self.ledger = (
            None if self.store is None else LedgerWriter(self.store, config.namespace, config.stream)
        )
        self.plan: Plan | None = None
        self.info: proto.Info | None = None
        self.requests: Counter[tuple[str, int]] = Counter()
        self.trainer_waited_s = 0.0  # what the trainer reports (POST /v1/wait)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(
            SidecarCollector(
                self.engine,
                lambda: self.info,
                lambda: self.trainer_waited_s,
                self.requests,
                self.broker.renewals if self.broker is not None else None,
            )
        )
        self._orders: OrderedDict[tuple[int, int, int], _partition.Positions] = OrderedDict()
        # per client: the plan, positions and refs its last request announced as read-ahead
        self._announced: OrderedDict[str, tuple[Plan, list[int], list[BlobRef]]] = OrderedDict()
        self.progress: proto.ProgressReport | None = None  # the trainer's latest report (POST /v1/progress)
        self._progress_sent: proto.ProgressReport | None = None
        self._progress_wake = asyncio.Event()
        self._forwarding: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._fd_servers: list[FdServer] = []
        self._loading: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.failure: str | None = None  # why the plan is not loaded (yet)

    # -- the plan ------------------------------------------------------------------------------

    def _load_plan(self) -> tuple[Plan, proto.Info]:
        """The shard's manifest rows from the store and the query (a broker response is the other source)."""
        cfg, store = self.config, self.store
        assert store is not None
        version = store.resolve(cfg.version)
        everything = Plan(version, read_manifest(store, version))
        selected = (
            everything.select([Query.parse(cfg.query)])
            if cfg.query
            else np.arange(len(everything), dtype=np.int64)
        )
        spec = cfg.shard_spec()
        mine = spec.positions(len(selected))
        index, resume = selected[mine], None
        if cfg.progress is not None:
            # The epoch's rest, re-cut for this world size: this rank's part follows its shard's rows.
            progress = cfg.progress.recut(spec.world_size)
            ranked = _partition.rank_plan(len(selected), spec, epoch=progress.epoch, progress=progress)
            extra = selected[ranked.assignment] if ranked.segment else selected[:0]
            index = np.concatenate([index, extra])
            resume = proto.Resume(progress=progress, first=len(mine), items=len(extra))
        plan = Plan(version, everything.manifest, index=index)
        info = proto.Info(
            dataset=store.uri,
            version=version,
            query=cfg.query,
            total=len(selected),
            items=len(mine),
            resume=resume,
            **spec.model_dump(),
        )
        return plan, info

    async def _fetch_plan(self) -> tuple[Plan, proto.Info]:
        if self.broker is None:
            return await asyncio.to_thread(self._load_plan)
        response = await self.broker.broker.plan()
        plan, info = await asyncio.to_thread(plan_of, response)
        self.broker.adopt(response)
        return plan, info

    async def load(self) -> None:
        """Load the plan. Store mode: transient store faults are retried, a permanent problem stops the
        sidecar. Broker mode: everything is retried (with backoff), because every refusal can pass: a
        RoleBinding gets added, the stream becomes Ready, the kubelet rotates the token."""
        attempt = 0
        while True:
            try:
                plan, info = await self._fetch_plan()
                break
            except (ConfigError, QueryError, StoreError) as exc:
                if self.broker is None and isinstance(exc, ConfigError | QueryError | NotFoundError):
                    # Retrying cannot fix a bad query or a missing version: exit so the pod shows the reason.
                    self.failure = f"cannot serve: {exc}"
                    log.error("%s", self.failure)
                    self.stopping.set()
                    return
                delay = backoff.delay(attempt, first_s=1.0, max_s=30.0)
                attempt += 1
                self.failure = f"cannot load the shard plan yet (retrying in {delay:.1f}s): {exc}"
                refused = isinstance(exc, BrokerRefused | ConfigError)
                log.log(logging.ERROR if refused else logging.WARNING, "%s", self.failure)
                await asyncio.sleep(delay)
        self.plan, self.info, self.failure = plan, info, None
        log.info(
            "serving %s version %s, rank %s of %s: %s items of %s",
            info.dataset,
            info.version,
            info.rank,
            info.world_size,
            info.items,
            info.total,
        )

    def _ready(self) -> tuple[Plan, proto.Info]:
        if self.plan is None or self.info is None:
            raise _NotReady(self.failure or "the sidecar is still loading its shard plan; retry shortly")
        return self.plan, self.info

    # -- HTTP ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=16 * 2**20)
        app.router.add_get(proto.Paths.INFO, self._info)
        app.router.add_get(proto.Paths.ITEM, self._item)
        app.router.add_get(proto.Paths.ITEM_BY_ID, self._item_by_id)
        app.router.add_post(proto.Paths.BATCH, self._batch)
        app.router.add_get(proto.Paths.STREAM, self._stream)
        app.router.add_post(proto.Paths.SELECT, self._select)
        app.router.add_post(proto.Paths.WAIT, self._wait)
        app.router.add_post(proto.Paths.LEDGER, self._ledger)
        app.router.add_post(proto.Paths.PROGRESS, self._progress)
        app.router.add_get(proto.Paths.METRICS, self._metrics)
        app.router.add_get(proto.Paths.HEALTHZ, self._healthz)
        app.router.add_get(proto.Paths.READYZ, self._readyz)
        return app

    def metrics_app(self) -> web.Application:
        """What the metrics listener serves: ``/metrics`` alone, to a bearer of the scrape token."""
        app = web.Application(middlewares=[self._scrape_token], client_max_size=4096)
        app.router.add_get(proto.Paths.METRICS, self._metrics)
        return app

    @web.middleware
    async def _scrape_token(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        digest = self.config.metrics_token_sha256
        if digest is not None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            sent = hashlib.sha256(token.encode()).hexdigest() if scheme.lower() == "bearer" else ""
            if not hmac.compare_digest(sent, digest):
                return _error(
                    401,
                    proto.ErrorCode.UNAUTHENTICATED,
                    "send the scrape token as Authorization: Bearer TOKEN (the chart's PodMonitor does)",
                )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            what = f"{request.method} {request.path}: {exc.reason}"
            return _error(exc.status, proto.ErrorCode.BAD_REQUEST, what)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405: answer in the protocol's shape
            response = _error(
                exc.status, proto.ErrorCode.BAD_REQUEST, f"{request.method} {request.path}: {exc.reason}"
            )
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client went away mid-response; nothing to answer
        except Exception as exc:
            status, body = _error_of(exc, f"{request.method} {request.path}")
            response = web.Response(
                status=status, text=body.model_dump_json(), content_type="application/json"
            )
        self.requests[(path, response.status)] += 1
        return response

    async def _info(self, request: web.Request) -> web.Response:
        _, info = self._ready()
        return web.Response(text=info.model_dump_json(), content_type="application/json")

    async def _item(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["index"]
        try:
            index = int(raw)
        except ValueError:
            raise ConfigError(f"item index must be an integer, got {raw!r}") from None
        return await self._serve(request, [index], [], "")

    async def _item_by_id(self, request: web.Request) -> web.StreamResponse:
        plan, info = self._ready()
        item_id = request.query.get("id")
        if not item_id:
            raise ConfigError("give the item's id: GET /v1/items?id=ITEM_ID (or GET /v1/items/INDEX)")
        position = plan.position_of(item_id)
        if position is None:
            raise ItemNotInShard(
                f"item {item_id!r} is not in this sidecar's shard (rank {info.rank} of {info.world_size}, "
                f"{info.items} items); another rank serves it, or the query excludes it"
            )
        return await self._serve(request, [position], [], "")

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        body = proto.BatchRequest.model_validate_json(await request.read())
        return await self._serve(request, body.indexes, body.readahead, body.client)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        params = proto.StreamParams.model_validate(dict(request.query))
        _, info = self._ready()
        key = (params.epoch, params.worker, params.num_workers)
        order = self._orders.get(key)
        if order is None:
            if params.worker >= params.num_workers:
                raise ConfigError(f"worker must be in [0, {params.num_workers}), got {params.worker}")
            full = _partition.epoch_order(
                info.items, seed=info.seed, epoch=params.epoch, rank=info.rank, shuffle=info.shuffle
            )
            order = _partition.worker_split(full, params.worker, params.num_workers)
            self._orders[key] = order
            while len(self._orders) > 8:
                self._orders.popitem(last=False)
        end = params.start + params.count
        ahead = order[end : end + self.config.readahead]
        client = f"stream:{params.epoch}:{params.worker}:{params.num_workers}"
        # The rest of the epoch's order goes along (a view), so broker URLs can be asked for ahead.
        return await self._serve(
            request, order[params.start : end].tolist(), ahead.tolist(), client, order[params.start :]
        )

    async def _select(self, request: web.Request) -> web.Response:
        body = proto.SelectRequest.model_validate_json(await request.read())
        plan, info = self._ready()
        found = await asyncio.to_thread(plan.select, [Query.parse(q) for q in body.queries])
        found = found[found < info.items]  # the shard's own rows: a re-cut's rows are read by epoch only
        return web.Response(
            text=proto.SelectResponse(indexes=found.tolist()).model_dump_json(),
            content_type="application/json",
        )

    async def _payload(
        self,
        indexes: Sequence[int],
        readahead: Sequence[int],
        client: str,
        upcoming: Sequence[int] | _partition.Positions | None = None,
    ) -> tuple[proto.Info, list[dict[str, Any]], list[bytes]]:
        """The rows and bytes of ``indexes``, with ``readahead`` announced for ``client``.

        ``upcoming``: the positions the client reads from here on, as far as known (default: the requested
        and the read-ahead ones)."""
        plan, info = self._ready()
        n = len(plan)
        for index in (*indexes, *readahead):
            if not 0 <= index < n:
                raise ItemNotInShard(
                    f"index {index} is outside this sidecar's shard: it holds {n} items (0..{n - 1}) "
                    f"for rank {info.rank} of {info.world_size}"
                )
        if self.broker is not None:
            fetching = len(indexes) + len(readahead)
            self.broker.expect(client, [*indexes, *readahead] if upcoming is None else upcoming, fetching)
        # A client's next request mostly asks for what its last one announced: those refs are kept.
        last = self._announced.pop(client, None)
        refs = last[2] if last is not None and last[0] is plan and last[1] == list(indexes) else None
        ahead = (client, plan.refs(readahead)) if readahead else None
        if ahead is not None:
            self._announced[client] = (plan, list(readahead), ahead[1])
            while len(self._announced) > _ANNOUNCED_CLIENTS:
                self._announced.popitem(last=False)
        if not indexes:
            if ahead is not None:
                self.engine.readahead(*ahead)
            return info, [], []
        blobs = await self.engine.get_many(plan.refs(indexes) if refs is None else refs, ahead)
        return info, plan.rows(indexes), blobs

    async def _serve(
        self,
        request: web.Request,
        indexes: Sequence[int],
        readahead: Sequence[int],
        client: str,
        upcoming: Sequence[int] | _partition.Positions | None = None,
    ) -> web.StreamResponse:
        client = client or str(id(request.transport))
        info, rows, blobs = await self._payload(indexes, readahead, client, upcoming)
        header = proto.encode_header(info.version, rows)
        response = web.StreamResponse(headers={"Content-Type": proto.BATCH_CONTENT_TYPE})
        response.content_length = len(header) + sum(len(b) for b in blobs)
        _widen_send_buffer(request)
        await response.prepare(request)
        await response.write(header)
        for blob in blobs:
            # Memoryview slices: the transport sends them as they are, where bytes would be sliced (a copy)
            # and the unsent rest copied again into its buffer; a slice small enough to go out in one send
            # (see _widen_send_buffer) is usually never buffered at all.
            view = memoryview(blob)
            for start in range(0, len(view), _WRITE_SLICE):
                await response.write(view[start : start + _WRITE_SLICE])
        await response.write_eof()
        return response

    async def _fd_batch(self, body: bytes) -> tuple[bytes, list[bytes]]:
        """One request on the fd socket: the framed answer, and the bytes its memory file holds."""
        path = "fd:" + proto.Paths.BATCH
        try:
            request = proto.BatchRequest.model_validate_json(body)
            info, rows, blobs = await self._payload(
                request.indexes, request.readahead, request.client or "fd-socket"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status, error = _error_of(exc, path)
            self.requests[(path, status)] += 1
            return proto.frame(proto.FdAnswer(status=status, error=error).model_dump_json().encode()), []
        self.requests[(path, 200)] += 1
        return proto.encode_fd_answer(info.version, rows), blobs

    async def _memory_file(self, blobs: Sequence[bytes], fd: int | None, client: bool) -> int:
        return await self.engine.workers.run(memory_file, blobs, fd, client)

    async def _ledger(self, request: web.Request) -> web.Response:
        report = proto.LedgerReport.model_validate_json(await request.read())
        plan, info = self._ready()
        if self.broker is not None:
            try:
                await self.broker.broker.ledger(report)
            except BrokerRefused as exc:
                if exc.status in (400, 403, 404):  # retrying cannot help: the trainer stops recording
                    raise ConfigError(f"the broker does not record this report: {exc.message}") from exc
                raise
            return web.Response(status=204)
        assert self.ledger is not None  # store mode
        # The store write blocks (obstore, or files): off the loop, like every other blocking step.
        await asyncio.to_thread(self.ledger.write, report, info, plan.manifest.digest)
        return web.Response(status=204)

    async def _progress(self, request: web.Request) -> web.Response:
        report = proto.ProgressReport.model_validate_json(await request.read())
        _, info = self._ready()
        if (report.rank, report.world_size) != (info.rank, info.world_size):
            raise ConfigError(
                f"this sidecar serves rank {info.rank} of {info.world_size}; a report for rank "
                f"{report.rank} of {report.world_size} is not its to pass on"
            )
        self.progress = report
        self._progress_wake.set()
        return web.Response(status=204)

    async def _forward_progress(self) -> None:
        """Broker mode: pass the trainer's latest report on to the broker, at most once a second (each
        report says it all, so only the latest matters); a refusal is logged and not sent again."""
        assert self.broker is not None
        while True:
            await self._progress_wake.wait()
            self._progress_wake.clear()
            await self._send_progress()
            await asyncio.sleep(_PROGRESS_EVERY_S)

    async def _send_progress(self) -> None:
        report = self.progress
        if self.broker is None or report is None or report == self._progress_sent:
            return
        try:
            await self.broker.broker.progress(report)
            self._progress_sent = report
        except BrokerRefused as exc:
            self._progress_sent = report  # the broker will refuse it again: wait for the next one
            log.warning("the broker did not take this rank's progress: %s", exc.message)
        except StoreError as exc:
            log.warning("cannot report progress to the broker yet (will retry): %s", exc)
            self._progress_wake.set()

    async def _wait(self, request: web.Request) -> web.Response:
        report = proto.WaitReport.model_validate_json(await request.read())
        self.trainer_waited_s += report.waited_s
        return web.Response(status=204)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        _, info = self._ready()
        return web.json_response({"status": "ready", "items": info.items})

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Open the listeners (so probes answer at once) and load the plan in the background."""
        cfg = self.config
        self._runner = web.AppRunner(
            self.app(), handle_signals=False, shutdown_timeout=cfg.shutdown_timeout_s, access_log=None
        )
        await self._runner.setup()
        addresses: list[str] = []
        for listen in cfg.listen:
            if listen.path is not None:
                listen.path.parent.mkdir(parents=True, exist_ok=True)
                listen.path.unlink(missing_ok=True)  # a stale socket from a killed predecessor
                site: web.BaseSite = web.UnixSite(self._runner, str(listen.path))
                await site.start()
                # Any user of the pod may connect (a trainer often runs as another UID): the socket lives
                # in the pod's own volume, which nothing outside the pod can reach.
                os.chmod(listen.path, _SOCKET_MODE)
                addresses.append(f"unix://{listen.path}")
                if hasattr(os, "memfd_create"):
                    fds = FdServer(_fd_path(listen.path), self._fd_batch, self._memory_file)
                    await fds.start()
                    os.chmod(fds.path, _SOCKET_MODE)
                    self._fd_servers.append(fds)
            else:
                site = web.TCPSite(self._runner, listen.host, listen.port)
                await site.start()
                addresses.extend(f"http://{_host(s)}" for s in self._sockets(site))
        if cfg.metrics_listen is not None:
            self._metrics_runner = web.AppRunner(
                self.metrics_app(), handle_signals=False, shutdown_timeout=1.0, access_log=None
            )
            await self._metrics_runner.setup()
            metrics = web.TCPSite(self._metrics_runner, cfg.metrics_listen.host, cfg.metrics_listen.port)
            await metrics.start()
            addresses.extend(f"metrics=http://{_host(s)}" for s in self._sockets(metrics))
        self._loading = asyncio.get_running_loop().create_task(self.load())
        if self.broker is not None:
            self._forwarding = asyncio.get_running_loop().create_task(self._forward_progress())
        return addresses

    @staticmethod
    def _sockets(site: web.BaseSite) -> list[Any]:
        server = site._server  # aiohttp keeps the bound sockets there; needed to report port 0's choice
        return list(getattr(server, "sockets", []) or [])

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), then stop the engine."""
        for fds in self._fd_servers:
            await fds.stop()
        self._fd_servers.clear()
        for runner in (self._runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._metrics_runner = None
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._forwarding is not None:
            self._forwarding.cancel()
            # What the trainer got to last reaches the broker, if it answers within a moment.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_progress(), _PROGRESS_FLUSH_S)
        await self.engine.aclose()
        for listen in self.config.listen:
            if listen.path is not None:
                listen.path.unlink(missing_ok=True)

    async def run(self) -> bool:
        """Serve until SIGTERM or SIGINT; False when the sidecar stopped because it cannot serve."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        addresses = await self.start()
        # One line a supervisor (or a test) can parse to find the ports.
        print(f"sluicegate-sidecar listening on {' '.join(addresses)}", flush=True)
        try:
            await self.stopping.wait()
        finally:
            log.info("stopping")
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        return self.plan is not None or self.failure is None


_WRITE_SLICE = 1 << 20
_PROGRESS_EVERY_S = 1.0
_PROGRESS_FLUSH_S = 3.0
_SOCKET_MODE = 0o666
_ANNOUNCED_CLIENTS = 16  # clients whose last read-ahead refs are kept (one per trainer process)
_SOCKET_BUFFER = 4 << 20  # Linux caps it at net.core.wmem_max (4 MiB by default) and doubles it


def _widen_send_buffer(request: web.Request) -> None:
    """A send buffer that holds several MB: big items go out in a few syscalls instead of ~20 per MB."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)


def _fd_path(path: Path) -> Path:
    return path.with_name(path.name + proto.FD_SOCKET_SUFFIX)


def _host(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
