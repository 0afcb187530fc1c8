"""Pure access rules: who a token is, which row-level policies apply, what a refusal says.

The broker and the webhook do the API calls (TokenReview, SubjectAccessReview) in ``kube`` and hand
the answers here; these functions decide and word the decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .models import STREAM_VERB, Policy, SubjectKind

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
_SA_PREFIX = "system:serviceaccount:"


class Refused(Exception):
    """A refused request: ``status`` is the HTTP status (401, 403...), ``reason`` a metric label."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.pod: Identity | None = None  # the pod, once the token has been identified
        self.retry_after: float | None = None  # seconds, for 429


def rate_limited(message: str, wait_s: float) -> Refused:
    refused = Refused(429, "rate_limited", message)
    refused.retry_after = wait_s
    return refused


@dataclass(frozen=True)
class Identity:
    """A ServiceAccount token bound to a pod, as TokenReview vouched for it."""

    username: str
    uid: str
    groups: tuple[str, ...]
    extra: Mapping[str, Sequence[str]]
    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str


def identity(review_status: Mapping[str, Any], audience: str | None = None) -> Identity:
    """The identity of an accepted TokenReview, or :class:`Refused` (401) saying why not.

    With ``audience``, the review must also say the token is meant for it (``status.audiences``): an
    API server that ignores the requested audiences would otherwise accept any token of the pod.
    """
    if not review_status.get("authenticated"):
        error = review_status.get("error") or "token not accepted"
        raise Refused(401, "token_rejected", f"token rejected by TokenReview: {error}")
    if audience is not None and audience not in (review_status.get("audiences") or []):
        raise Refused(
            401,
            "wrong_audience",
            f"the token is not meant for {audience} (TokenReview audiences: "
            f"{list(review_status.get('audiences') or [])}); present the projected token the webhook mounts",
        )
    user = review_status.get("user") or {}
    username = str(user.get("username", ""))
    if not username.startswith(_SA_PREFIX) or username.count(":") != 3:
        raise Refused(
            401, "not_service_account", f"{username!r} is not a ServiceAccount; present a pod's token"
        )
    namespace, service_account = username[len(_SA_PREFIX) :].split(":")
    extra = {k: list(v) for k, v in (user.get("extra") or {}).items()}
    pod_name = (extra.get(POD_NAME_EXTRA) or [""])[0]
    pod_uid = (extra.get(POD_UID_EXTRA) or [""])[0]
    if not pod_name or not pod_uid:
        raise Refused(
            401,
            "not_pod_bound",
            "the token is not bound to a pod: present the projected token the webhook mounts "
            "(a TokenRequest for the ServiceAccount alone is not enough)",
        )
    return Identity(
        username=username,
        uid=str(user.get("uid", "")),
        groups=tuple(user.get("groups") or ()),
        extra=extra,
        namespace=namespace,
        service_account=service_account,
        pod_name=pod_name,
        pod_uid=pod_uid,
    )


def applicable_policies(policies: Sequence[Policy], username: str, groups: Sequence[str]) -> list[Policy]:
    """The policies naming this user, one of its groups, or (for a ServiceAccount) itself."""
    found = []
    for policy in policies:
        for subject in policy.subjects:
            if subject.kind is SubjectKind.GROUP:
                hit = subject.name in groups
            else:
                hit = subject.username() == username
            if hit:
                found.append(policy)
                break
    return found


def missing_stream_permission(subject: str, ns: str, name: str, reason: str = "") -> str:
    """Why ``subject`` may not stream Dataset ``ns/name``, and the commands that grant it."""
    sa = subject[len(_SA_PREFIX) :].split(":") if subject.startswith(_SA_PREFIX) else None
    who = f"--serviceaccount={sa[0]}:{sa[1]}" if sa else f"--user={subject}"
    binding = f"kubectl create rolebinding {name}-stream -n {ns} --role={name}-stream {who}"
    why = f" ({reason})" if reason else ""
    return (
        f"{subject} is not allowed to {STREAM_VERB} datasets.sluicegate.io/{name} in namespace {ns}{why}. "
        f"Grant it with: kubectl create role {name}-stream -n {ns} --verb={STREAM_VERB} "
        f"--resource=datasets.sluicegate.io --resource-name={name} && {binding}"
    )


class RateLimit:
    """Token buckets per key (a pod's UID): ``rate`` requests per second, bursts of ``burst``; pure
    bookkeeping, the caller passes the clock. Keys idle long enough to have refilled are forgotten."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self._max = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def peek(self, key: str, now: float) -> float:
        """The tokens ``key`` has now (at least 1 means a request may go ahead), taking none."""
        tokens, since = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - since) * self.rate) - (1 - 1e-9)

    def take(self, key: str, now: float) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        tokens, since = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - since) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self._max:
            full = self.burst / self.rate
            for k in [k for k, (_, t) in self._buckets.items() if now - t > full]:
                del self._buckets[k]
        return 0.0
