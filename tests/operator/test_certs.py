"""Webhook/broker TLS: a private CA, a serving certificate that a real TLS client accepts, early rotation."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from sluicegate_operator import certs

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HOSTS = ["sluicegate-operator.sluicegate-system.svc", "127.0.0.1"]


def fresh() -> certs.TLSState:
    return certs.renew(None, HOSTS, NOW, ca_valid=timedelta(days=3650), cert_valid=timedelta(days=90))


def test_serving_cert_is_signed_by_ca_and_covers_hosts() -> None:
    state = fresh()
    cert = x509.load_pem_x509_certificate(state.cert)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(state.ca_cert))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [HOSTS[0]]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert certs.TLSState.from_secret_data(state.secret_data()) == state


def test_rotation_after_two_thirds_of_life_keeps_the_ca() -> None:
    state = fresh()
    assert not state.needs_rotation(HOSTS, NOW + timedelta(days=59))
    assert state.needs_rotation(HOSTS, NOW + timedelta(days=61))
    assert state.needs_rotation([*HOSTS, "new.example"], NOW), "a new name needs a new certificate"
    renewed = certs.renew(
        state, HOSTS, NOW + timedelta(days=61), ca_valid=timedelta(days=3650), cert_valid=timedelta(days=90)
    )
    assert renewed.ca_cert == state.ca_cert
    assert renewed.cert != state.cert
    assert not renewed.needs_rotation(HOSTS, NOW + timedelta(days=61))


def test_real_tls_handshake_trusts_only_the_ca(tmp_path: Path) -> None:
    state = certs.renew(
        None, ["127.0.0.1"], datetime.now(UTC), ca_valid=timedelta(days=1), cert_valid=timedelta(hours=1)
    )
    (tmp_path / "chain.pem").write_bytes(state.cert + state.ca_cert)
    (tmp_path / "key.pem").write_bytes(state.key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")

    async def handshake(cadata: str) -> bool:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        try:
            client_ctx = ssl.create_default_context(cadata=cadata)
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            writer.close()
            return True
        except ssl.SSLCertVerificationError:
            return False
        finally:
            srv.close()

    assert asyncio.run(handshake(state.ca_cert.decode()))
    other = fresh()
    assert not asyncio.run(handshake(other.ca_cert.decode()))


def test_ca_rolls_over_without_breaking_pods_that_trust_the_bundle() -> None:
    """Low finding: a CA rotation broke running sidecars. The successor CA is trusted (in the bundle a
    pod is admitted with) long before it signs, so a pod admitted in between keeps working after."""
    life = timedelta(days=300)

    def renew(state: certs.TLSState | None, at: datetime) -> certs.TLSState:
        return certs.renew(state, HOSTS, at, ca_valid=life, cert_valid=timedelta(days=30))

    state = renew(None, NOW)
    assert state.trust_bundle == state.ca_cert, "no successor yet"
    early = NOW + timedelta(days=110)
    assert not state.needs_rotation(HOSTS, NOW + timedelta(days=19))
    state = renew(state, early)
    assert state.next_ca_cert, "past a third of its life the CA gets a successor"
    assert state.trust_bundle == state.ca_cert + state.next_ca_cert
    bundle_of_a_pod = state.trust_bundle  # what a sidecar admitted now trusts
    assert certs.TLSState.from_secret_data(state.secret_data()) == state
    late = NOW + timedelta(days=210)
    rolled = renew(state, late)
    assert rolled.ca_cert == state.next_ca_cert, "at two thirds the successor starts signing"
    cert = x509.load_pem_x509_certificate(rolled.cert)
    trusted = x509.load_pem_x509_certificates(bundle_of_a_pod)
    assert any(cert.issuer == ca.subject and _signed_by(cert, ca) for ca in trusted)
    assert b"PRIVATE KEY" not in rolled.trust_bundle


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        return False
    return True
