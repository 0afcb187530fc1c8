"""Webhook and broker TLS without manual steps: a private CA and a serving certificate, rotated early.

The CA (long-lived) signs a short-lived serving certificate for the operator's Service names. Both
live in one Secret so that every replica and every restart serves the same chain; the CA is what the
API server (``caBundle``) and the sidecars (``SLUICEGATE_BROKER_CA``) trust, so rotating the serving
certificate changes nothing for them. ``TLSState.needs_rotation`` is pure; ``tls`` in ``server`` does
the Secret I/O.
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
# Rotate once two thirds of a certificate's lifetime have passed, so a failed renewal has time to retry.
ROTATE_AT = 2 / 3


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

    @classmethod
    def from_secret_data(cls, data: Mapping[str, bytes]) -> TLSState | None:
        if not all(data.get(k) for k in (CA_CERT, CA_KEY, TLS_CERT, TLS_KEY)):
            return None
        return cls(data[CA_CERT], data[CA_KEY], data[TLS_CERT], data[TLS_KEY])

    def secret_data(self) -> dict[str, bytes]:
        return {CA_CERT: self.ca_cert, CA_KEY: self.ca_key, TLS_CERT: self.cert, TLS_KEY: self.key}

    def needs_rotation(self, hosts: Sequence[str], now: datetime) -> bool:
        """True when the serving certificate is past two thirds of its life, expired, not signed by this CA,
        or does not cover ``hosts``."""
        cert = x509.load_pem_x509_certificate(self.cert)
        ca = x509.load_pem_x509_certificate(self.ca_cert)
        if cert.issuer != ca.subject or _past(ca, now):
            return True
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if not all(_san(h) in sans for h in hosts):
            return True
        return _past(cert, now)


def _past(cert: x509.Certificate, now: datetime) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= start + (end - start) * ROTATE_AT


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
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
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
    """``current`` with a fresh serving certificate, and a fresh CA too when there is none or it is ageing."""
    if current is None or _past(x509.load_pem_x509_certificate(current.ca_cert), now):
        ca_cert, ca_key = new_ca(now, ca_valid)
    else:
        ca_cert, ca_key = current.ca_cert, current.ca_key
    cert, key = issue(ca_cert, ca_key, hosts, now, cert_valid)
    return TLSState(ca_cert, ca_key, cert, key)
