"""Pure source authorisation: which storage a namespace's Datasets may read, and with which identity.

The platform team writes the rules (chart value ``sources``, rendered into the ConfigMap the operator
reads); a tenant's Dataset names a store (``spec.source``) and maybe a credentials Secret. Nothing
reaches a store unless a rule for the Dataset's namespace allows its URI (the same root or below it),
its endpoint, and its identity: a Dataset without ``spec.credentials`` would read with the operator's
own environment (instance role, ``AWS_*``), so that needs ``ambientCredentials: true`` on the rule.
Without any rule everything is refused: the operator never lends its own reach to a tenant by default.

URIs and endpoints are compared in canonical form, so ``s3://b/a/../c``, ``file:///data/../etc`` or
``https://MinIO:443`` cannot slip past a rule written for something else.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

ANY_NAMESPACE = "*"
CREDENTIALS_LABEL = "sluicegate.io/credentials"
"""The label a Secret must carry (value ``"true"``) before a Dataset may use it as credentials."""


class SourceRefused(Exception):
    """A Dataset's source is not one its namespace may use; the message says what to ask for."""


def canonical_uri(uri: str) -> str:
    """``uri`` in the one form rules are compared in; :class:`SourceRefused` for ``.``/``..``/empty
    path segments, which a store would resolve somewhere other than where the text seems to point."""
    parts = urlsplit(uri)
    if parts.scheme not in ("s3", "file") or parts.query or parts.fragment:
        raise SourceRefused(f"{uri!r} is not an s3://BUCKET/PREFIX or file:///PATH store root")
    if parts.scheme == "s3":
        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
            raise SourceRefused(f"{uri!r} names no plain bucket: write s3://BUCKET/PREFIX")
        head, path = f"s3://{parts.netloc.lower()}", parts.path
    else:
        if parts.netloc not in ("", "localhost"):
            raise SourceRefused(f"{uri!r} names a host: write file:///ABSOLUTE/PATH")
        head, path = "file://", parts.path
    segments = path.split("/")
    inner = segments[1:-1] if path.endswith("/") else segments[1:]
    if any(s in ("", ".", "..") for s in inner):
        raise SourceRefused(f"{uri!r} has an empty, '.' or '..' path segment: write the plain path")
    clean = posixpath.normpath(path) if path.strip("/") else ""
    clean = "" if clean in ("/", ".") else clean.rstrip("/")
    if head == "file://":
        if not clean:
            raise SourceRefused(f"{uri!r} is the file system root, which no rule may allow")
        return head + clean
    return head + clean


def canonical_endpoint(endpoint: str) -> str:
    """``scheme://host:port`` of an S3 endpoint URL; :class:`SourceRefused` for anything else in it."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceRefused(f"endpoint {endpoint!r} is not an http(s)://HOST[:PORT] URL")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise SourceRefused(
            f"endpoint {endpoint!r} carries more than scheme, host and port: write only those"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise SourceRefused(f"endpoint {endpoint!r} has an invalid port") from exc
    host = parts.hostname.lower()
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _within(uri: str, root: str) -> bool:
    return uri == root or uri.startswith(root.rstrip("/") + "/")


class SourceRule(BaseModel):
    """One grant of the platform team: these namespaces may read stores under these roots."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    namespaces: list[str] = Field(min_length=1, description='namespaces the rule applies to; "*" for all')
    uris: list[str] = Field(
        min_length=1,
        description="store roots allowed, e.g. s3://team-a-data or s3://shared/coco; below them too",
    )
    endpoints: list[str] = Field(
        default_factory=list,
        description="S3 endpoints allowed (scheme://host[:port]); empty: only Datasets without an endpoint "
        "(the default AWS endpoint)",
    )
    ambient_credentials: bool = Field(
        default=False,
        description="let Datasets without spec.credentials read with the operator's own identity",
    )

    @field_validator("uris")
    @classmethod
    def _uris(cls, value: list[str]) -> list[str]:
        try:
            return [canonical_uri(u) for u in value]
        except SourceRefused as exc:
            raise ValueError(str(exc)) from None

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        try:
            return [canonical_endpoint(e) for e in value]
        except SourceRefused as exc:
            raise ValueError(str(exc)) from None

    def applies_to(self, namespace: str) -> bool:
        return ANY_NAMESPACE in self.namespaces or namespace in self.namespaces


class SourcePolicy(BaseModel):
    """Every rule of the platform team (chart value ``sources``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[SourceRule] = Field(default_factory=list)

    def credential_namespaces(self) -> Sequence[str]:
        return sorted({ns for r in self.rules for ns in r.namespaces})


def authorise(
    policy: SourcePolicy,
    *,
    namespace: str,
    uri: str,
    endpoint: str | None,
    has_credentials: bool,
    where: str,
) -> tuple[str, str]:
    """The canonical (uri, endpoint) a Dataset in ``namespace`` may read, or :class:`SourceRefused`.

    ``where`` names the policy's home (e.g. the ConfigMap) for the refusal. The refusal names only what
    was asked for and the rule that would allow it, never another namespace's rules.
    """
    canon_uri = canonical_uri(uri)
    canon_endpoint = canonical_endpoint(endpoint) if endpoint else ""
    if canon_uri.startswith("file://") and canon_endpoint:
        raise SourceRefused(f"a file:// source takes no endpoint (got {endpoint!r})")
    for rule in policy.rules:
        if not rule.applies_to(namespace) or not any(_within(canon_uri, root) for root in rule.uris):
            continue
        if canon_uri.startswith("s3://") and canon_endpoint not in (rule.endpoints or [""]):
            continue
        if not has_credentials and not rule.ambient_credentials:
            continue
        return canon_uri, canon_endpoint
    ask = f"namespaces: [{namespace}], uris: [{canon_uri}]"
    if canon_endpoint:
        ask += f", endpoints: [{canon_endpoint}]"
    if not has_credentials:
        ask += ", ambientCredentials: true"
    what = f"{canon_uri}" + (f" at {canon_endpoint}" if canon_endpoint else "")
    identity = (
        "with its own credentials"
        if has_credentials
        else "without spec.credentials (the operator's identity)"
    )
    return_hint = (
        ""
        if has_credentials
        else f" or give the Dataset spec.credentials with a Secret labelled {CREDENTIALS_LABEL}=true"
    )
    raise SourceRefused(
        f"namespace {namespace} may not read {what} {identity}: no rule of the platform's source policy "
        f"({where}) allows it. Ask the platform team to add a rule {{{ask}}} to the chart value "
        f"`sources.rules`{return_hint}"
    )


def secret_refusal(namespace: str, name: str, labels: dict[str, str] | None) -> str | None:
    """Why the Secret ``namespace/name`` may not serve as Dataset credentials, or ``None`` when it may."""
    if (labels or {}).get(CREDENTIALS_LABEL) == "true":
        return None
    return (
        f"Secret {namespace}/{name} (spec.credentials.secretRef) is not marked for sluicegate: its owner "
        f"opts it in with `kubectl label secret {name} -n {namespace} {CREDENTIALS_LABEL}=true`"
    )
