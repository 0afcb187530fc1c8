"""The sidecar's side of the ledger (store mode): records what its trainers report they consumed.

A trainer's dataset counts what it hands out and reports each stretch (``POST /v1/ledger``); the sidecar,
which holds the store's credentials, writes it as a record of :mod:`sluicegate.core.ledger`: the trainer's
reading with the sidecar's own cut (its query and shard) in front, the dataset, version and manifest digest
it serves, and the pod it runs in. Each trainer chain gets a chain of this sidecar session (a restarted
sidecar starts new ones, since it no longer knows their heads), and a report sent twice is written once.

In broker mode the sidecar has no store credentials and passes each report on to the broker, which
records it for the pod its token names (``sluicegate_operator.broker``), the cut it serves that pod in front.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading

from sluicegate import ConfigError
from sluicegate.core import protocol as proto
from sluicegate.core.ledger import ChainWriter, View
from sluicegate.core.store import Store

__all__ = ["LedgerWriter"]


class LedgerWriter:
    """Writes trainers' reports into the store's ledger; called from worker threads, one report at a time."""

    def __init__(self, store: Store, namespace: str | None, stream: str | None) -> None:
        self.store = store
        self._namespace, self._stream = namespace, stream
        self._pod = socket.gethostname() if os.environ.get("KUBERNETES_SERVICE_HOST") else None
        self._session = secrets.token_hex(3)
        self._chains: dict[tuple[str, str], tuple[ChainWriter, int]] = {}  # -> (writer, next number)
        self._lock = threading.Lock()

    def write(self, report: proto.LedgerReport, info: proto.Info, manifest: str | None) -> None:
        """Record ``report``; :class:`ConfigError` for one this sidecar cannot take (out of order)."""
        key = (report.run, report.chain)
        with self._lock:
            # A chain this session has not seen starts wherever the trainer is (this sidecar restarted).
            writer, expected = self._chains.get(key) or (
                ChainWriter(self.store, report.run, f"{report.chain}-s{self._session}"),
                report.number,
            )
            if report.number < expected:
                return  # sent again after its answer was lost: written already
            if report.number > expected:
                raise ConfigError(
                    f"ledger report {report.number} of chain {report.chain} came before report {expected}; "
                    "reports of one chain are recorded in order"
                )
            mine = View(queries=(info.query,) if info.query else (), shard=info.shard_spec())
            consumed, who = report.recorded(
                mine, namespace=self._namespace, stream=self._stream, pod=self._pod
            )
            writer.append(consumed, writer=who, dataset=info.dataset, version=info.version, manifest=manifest)
            self._chains[key] = (writer, expected + 1)
