"""The throwaway PKI of the secure test services (tools/pki.py): each certificate does
what its name promises in a real TLS handshake, and a second call reuses the files."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from tools.pki import CLIENT_CN, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between two in-memory endpoints, as over a socket: the
    verification error of whichever side refuses, else the two connected ends."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    server_end = server.wrap_bio(s_in, s_out, server_side=True)
    done = {client_end: False, server_end: False}
    for _ in range(20):
        for end in (client_end, server_end):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client's certificate after the client
            # finished; a refusal reaches the client at its first read.
            client_end.write(b"x")
            s_in.write(c_out.read())
            server_end.read()
            return client_end, server_end
    raise AssertionError("handshake did not finish")


def _server(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_the_server_and_client_certificates_verify_both_ways(pki: Pki, hostname: str) -> None:
    server = _server(pki.server_cert, pki.server_key, pki.ca)
    client = _client(pki.ca, pki.client_cert, pki.client_key)
    _, server_end = _handshake(server, client, hostname)
    peer = server_end.getpeercert()
    assert peer is not None
    assert peer["subject"] == ((("commonName", CLIENT_CN),),)


def test_a_hostname_outside_the_certificate_is_refused(pki: Pki) -> None:
    server = _server(pki.server_cert, pki.server_key, pki.ca)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(server, _client(pki.ca), "example.com")


def test_the_other_ca_trusts_none_of_the_servers(pki: Pki) -> None:
    server = _server(pki.server_cert, pki.server_key, pki.ca)
    # The server sends the CA it was signed by with its certificate: the client finds a
    # self-signed root it does not trust.
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in"):
        _handshake(server, _client(pki.other_ca))


def test_the_expired_server_certificate_is_refused(pki: Pki) -> None:
    server = _server(pki.expired_server_cert, pki.expired_server_key, pki.ca)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        _handshake(server, _client(pki.ca))


def test_the_expired_client_certificate_is_refused(pki: Pki) -> None:
    server = _server(pki.server_cert, pki.server_key, pki.ca)
    client = _client(pki.ca, pki.expired_client_cert, pki.expired_client_key)
    # Refused by the server's end of the handshake.
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        _handshake(server, client)


def test_keys_are_private_and_a_second_call_reuses_the_files(pki: Pki) -> None:
    keys = [path for path in pki.files() if path.suffix == ".key"]
    assert len(keys) == 6
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    before = {path: path.read_bytes() for path in pki.files()}
    assert make_pki(pki.directory) == pki
    assert {path: path.read_bytes() for path in pki.files()} == before


def test_a_missing_file_makes_every_file_anew(tmp_path: Path) -> None:
    first = make_pki(tmp_path)
    ca = first.ca.read_bytes()
    first.client_key.unlink()
    second = make_pki(tmp_path)
    assert second.client_key.exists()
    # A new CA, and certificates that it signed: the old CA no longer trusts them.
    assert second.ca.read_bytes() != ca
    _handshake(
        _server(second.server_cert, second.server_key, second.ca),
        _client(second.ca, second.client_cert, second.client_key),
    )
