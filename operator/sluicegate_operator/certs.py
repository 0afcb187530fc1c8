"""Webhook and broker TLS without manual steps: a private CA and a serving certificate, rotated early.

The CA (long-lived) signs a short-lived serving certificate for the operator's Service names. Both
live in one Secret, readable by the operator alone, so that every replica and every restart serves the
same chain. What others trust is the *trust bundle* (the CA certificates only, published in a ConfigMap
for scrapers, in ``caBundle`` for the API server and in ``SLUICEGATE_BROKER_CA`` for sidecars), so
rotating the serving certificate changes nothing for them.

The CA itself rolls over without breaking anyone: once a third of its life has passed, the *next* CA is
made and added to the bundle, so every pod admitted from then on trusts both; only at two thirds does
the next CA start signing. A pod breaks only if it outlives a third of the CA's lifetime (over three
years by default). ``TLSState.needs_rotation`` and ``renew`` are pure; ``TLS`` in ``server`` does the I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
NEXT_CA_CERT, NEXT_CA_KEY = "next-ca.crt", "next-ca.key"
# Rotate once two thirds of a certificate's lifetime have passed, so a failed renewal has time to retry.
ROTATE_AT = 2 / 3
# Make (and start trusting) the CA's successor once a third of the CA's lifetime has passed.
NEXT_CA_AT = 1 / 3
# The key usages a CA does not need (x509.KeyUsage wants every one of them said).
_KEY_USAGES = dict.fromkeys(
    (
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "encipher_only",
        "decipher_only",
    ),
    False,
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class TLSState:
    """PEM bytes of the CA and the serving certificate with their keys."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes
    next_ca_cert: bytes = b""
    next_ca_key: bytes = b""

    @classmethod
    def from_secret_data(cls, data: Mapping[str, bytes]) -> TLSState | None:
        if not all(data.get(k) for k in (CA_CERT, CA_KEY, TLS_CERT, TLS_KEY)):
            return None
        nxt = (
            (data.get(NEXT_CA_CERT, b""), data.get(NEXT_CA_KEY, b"")) if data.get(NEXT_CA_KEY) else (b"", b"")
        )
        return cls(data[CA_CERT], data[CA_KEY], data[TLS_CERT], data[TLS_KEY], *nxt)

    def expires(self) -> datetime:
        """When the serving certificate expires."""
        return x509.load_pem_x509_certificate(self.cert).not_valid_after_utc

    def secret_data(self) -> dict[str, bytes]:
        data = {CA_CERT: self.ca_cert, CA_KEY: self.ca_key, TLS_CERT: self.cert, TLS_KEY: self.key}
        if self.next_ca_cert:
            data |= {NEXT_CA_CERT: self.next_ca_cert, NEXT_CA_KEY: self.next_ca_key}
        return data

    @property
    def trust_bundle(self) -> bytes:
        """The CA certificates clients should trust: the signing CA and, once made, its successor."""
        return self.ca_cert + self.next_ca_cert

    def needs_rotation(self, hosts: Sequence[str], now: datetime) -> bool:
        """True when the serving certificate is past two thirds of its life, expired, not signed by this CA,
        or does not cover ``hosts``; or when the CA is due for its successor or its replacement."""
        cert = x509.load_pem_x509_certificate(self.cert)
        ca = x509.load_pem_x509_certificate(self.ca_cert)
        if cert.issuer != ca.subject or _past(ca, now):
            return True
        if not self.next_ca_cert and _past(ca, now, NEXT_CA_AT):
            return True
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if not all(_san(h) in sans for h in hosts):
            return True
        return _past(cert, now)


def _past(cert: x509.Certificate, now: datetime, fraction: float = ROTATE_AT) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= start + (end - start) * fraction


def new_ca(now: datetime, valid: timedelta) -> tuple[bytes, bytes]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluicegate-operator-ca")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(**_KEY_USAGES, digital_signature=True, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue(
    ca_cert_pem: bytes, ca_key_pem: bytes, hosts: Sequence[str], now: datetime, valid: timedelta
) -> tuple[bytes, bytes]:
    """A serving certificate for ``hosts`` (DNS names or IPs) signed by the CA."""
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + valid, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def renew(
    current: TLSState | None,
    hosts: Sequence[str],
    now: datetime,
    *,
    ca_valid: timedelta,
    cert_valid: timedelta,
) -> TLSState:
    """``current`` with a fresh serving certificate; the CA's successor made at a third of its life and
    promoted to signing at two thirds (a fresh CA when there is none, or no successor to promote)."""
    nxt = (b"", b"")
    if current is None:
        ca = new_ca(now, ca_valid)
    elif _past(x509.load_pem_x509_certificate(current.ca_cert), now):
        ca = (current.next_ca_cert, current.next_ca_key) if current.next_ca_cert else new_ca(now, ca_valid)
    else:
        ca = current.ca_cert, current.ca_key
        nxt = current.next_ca_cert, current.next_ca_key
    if not nxt[0] and _past(x509.load_pem_x509_certificate(ca[0]), now, NEXT_CA_AT):
        nxt = new_ca(now, ca_valid)
    cert, key = issue(ca[0], ca[1], hosts, now, cert_valid)
    return TLSState(ca[0], ca[1], cert, key, *nxt)
