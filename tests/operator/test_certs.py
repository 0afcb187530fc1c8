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
