"""meshctl.cluster.pki: the cluster CA, node certificates with an empty subject and their identity
in SAN URIs, verification, key files written 0600 atomically, and a real TLS handshake with
python's ssl between a manager and a worker certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshctl.cluster import pki
from meshctl.model import MeshctlError


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.make_ca()


@pytest.fixture(scope="module")
def other_ca() -> tuple[bytes, bytes]:
    return pki.make_ca("another cluster")


def load(cert_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_pem)


def one_line_error(excinfo: pytest.ExceptionInfo[MeshctlError]) -> str:
    message = str(excinfo.value)
    assert message
    assert "\n" not in message
    return message


def test_ca_is_a_ca_that_signs_certificates_only(ca: tuple[bytes, bytes]) -> None:
    cert = load(ca[0])
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert pki.verify(ca[0], ca[0])


def test_ca_digest_is_sha256_of_der(ca: tuple[bytes, bytes]) -> None:
    digest = pki.ca_digest(ca[0])
    assert len(digest) == 64 and digest == digest.lower()
    assert bytes.fromhex(digest) == load(ca[0]).fingerprint(hashes.SHA256())
    assert pki.ca_digest(pki.make_ca()[0]) != digest


def test_issued_cert_verifies_against_its_ca_only(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    cert, _ = pki.make_node_cert(*ca, node="n1", role="worker")
    assert pki.verify(cert, ca[0])
    assert not pki.verify(cert, other_ca[0])
    foreign, _ = pki.make_node_cert(*other_ca, node="n1", role="worker")
    assert not pki.verify(foreign, ca[0])


def test_same_named_ca_with_another_key_does_not_verify(ca: tuple[bytes, bytes]) -> None:
    impostor = pki.make_ca()
    assert load(impostor[0]).subject == load(ca[0]).subject
    cert, _ = pki.make_node_cert(*ca, node="n1", role="worker")
    assert not pki.verify(cert, impostor[0])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_accepts_the_certificates_strictly(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    """Another implementation's opinion: RFC 5280 strict checks (an empty subject needs a
    critical SAN, the AKI...) and the TLS server and client purposes."""
    pki.write_public(str(tmp_path / "ca.crt"), ca[0])
    for role, purpose in (("manager", "sslserver"), ("worker", "sslclient")):
        cert, _ = pki.make_node_cert(*ca, node="n1", role=role)
        pki.write_public(str(tmp_path / "node.crt"), cert)
        result = subprocess.run(
            [
                "openssl",
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                str(tmp_path / "ca.crt"),
                str(tmp_path / "node.crt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_node_cert_names(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = pki.make_node_cert(
        *ca, node="node-1.example", role="manager", addresses=["10.0.0.5", "fd00::5"]
    )
    cert = load(cert_pem)
    assert list(cert.subject) == []
    assert pki.identity(cert_pem) == ("node-1.example", "manager")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("fd00::5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", pki.PEER_NAME]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = load(ca[0]).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_serials_are_random(ca: tuple[bytes, bytes]) -> None:
    serials = {load(pki.make_node_cert(*ca, node="n", role="worker")[0]).serial_number}
    serials.add(load(pki.make_node_cert(*ca, node="n", role="worker")[0]).serial_number)
    assert len(serials) == 2


def test_signer_decides_the_names_not_the_request(ca: tuple[bytes, bytes]) -> None:
    key = pki.make_key()
    csr = pki.make_csr(key, "evil")
    cert_pem = pki.issue(*ca, csr, node="good", role="worker")
    assert pki.identity(cert_pem) == ("good", "worker")
    assert b"evil" not in load(cert_pem).public_bytes(serialization.Encoding.DER)
    # The certificate is for the request's key.
    node_key = serialization.load_pem_private_key(key, password=None)
    assert load(cert_pem).public_key() == node_key.public_key()


def test_csr_has_empty_subject_and_node_uri() -> None:
    csr = x509.load_pem_x509_csr(pki.make_csr(pki.make_key(), "n7"))
    assert list(csr.subject) == []
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["meshctl://node/n7"]


def test_tampered_csr_is_refused(ca: tuple[bytes, bytes]) -> None:
    csr = x509.load_pem_x509_csr(pki.make_csr(pki.make_key(), "nodea"))
    der = csr.public_bytes(serialization.Encoding.DER).replace(b"node/nodea", b"node/nodeb")
    forged = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(MeshctlError) as excinfo:
        pki.issue(*ca, forged, node="nodeb", role="worker")
    assert "signature" in one_line_error(excinfo)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"csr_pem": b"not a request"}, "request"),
        ({"role": "admin"}, "role"),
        ({"node": "a/b"}, "node name"),
        ({"node": ""}, "node name"),
        ({"addresses": ["10.0.0.300"]}, "address"),
        ({"ca_cert_pem": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "CA"),
    ],
)
def test_bad_input_is_one_line_error(
    ca: tuple[bytes, bytes], change: dict[str, object], says: str
) -> None:
    args: dict[str, object] = {
        "ca_cert_pem": ca[0],
        "ca_key_pem": ca[1],
        "csr_pem": pki.make_csr(pki.make_key(), "n1"),
        "node": "n1",
        "role": "worker",
        "addresses": ["10.0.0.1"],
    }
    args.update(change)
    with pytest.raises(MeshctlError) as excinfo:
        pki.issue(**args)  # type: ignore[arg-type]
    assert says in one_line_error(excinfo)


def test_ca_key_must_match_ca_cert(ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]) -> None:
    csr = pki.make_csr(pki.make_key(), "n1")
    with pytest.raises(MeshctlError) as excinfo:
        pki.issue(ca[0], other_ca[1], csr, node="n1", role="worker")
    assert "CA key" in one_line_error(excinfo)


def test_non_ec_key_is_refused() -> None:
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(MeshctlError) as excinfo:
        pki.make_csr(rsa_pem, "n1")
    assert "EC" in one_line_error(excinfo)


def test_identity_of_a_cert_without_meshctl_names(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(MeshctlError) as excinfo:
        pki.identity(ca[0])
    one_line_error(excinfo)


def test_expiry_honours_fractional_days(ca: tuple[bytes, bytes]) -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    csr = pki.make_csr(pki.make_key(), "n1")
    cert = pki.issue(*ca, csr, node="n1", role="worker", days=0.5, now=now)
    assert pki.expires(cert) == now + dt.timedelta(hours=12)
    assert load(cert).not_valid_before_utc == now - pki.CLOCK_SKEW
    assert pki.verify(cert, ca[0], now=now + dt.timedelta(hours=11))
    assert not pki.verify(cert, ca[0], now=now + dt.timedelta(hours=13))
    assert not pki.verify(cert, ca[0], now=now - dt.timedelta(minutes=6))


def test_default_lifetime(ca: tuple[bytes, bytes]) -> None:
    cert, _ = pki.make_node_cert(*ca, node="n1", role="worker")
    left = pki.expires(cert) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < left <= dt.timedelta(days=90)


def test_short_lived_cert_stops_verifying(ca: tuple[bytes, bytes]) -> None:
    cert, _ = pki.make_node_cert(*ca, node="n1", role="worker", days=-1 / 86400)
    assert not pki.verify(cert, ca[0])


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_private_is_0600_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    modes_at_rename: list[int] = []
    replace = os.replace

    def watching_replace(src: str, dst: str) -> None:
        modes_at_rename.append(mode(Path(src)))
        assert path.read_bytes() == b"old"
        replace(src, dst)

    monkeypatch.setattr(pki.os, "replace", watching_replace)
    old_umask = os.umask(0)
    try:
        pki.write_private(str(path), b"secret key")
    finally:
        os.umask(old_umask)
    assert modes_at_rename == [0o600]
    assert mode(path) == 0o600
    assert path.read_bytes() == b"secret key"
    assert os.listdir(tmp_path) == ["node.key"]


def test_write_public_is_0644_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    old_umask = os.umask(0o077)
    try:
        pki.write_public(str(path), b"cert")
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o644
    assert path.read_bytes() == b"cert"


def test_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pki.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        pki.write_private(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["node.key"]


def tls_context(
    tmp_path: Path, ca_cert: bytes, cert_key: tuple[bytes, bytes], *, server: bool
) -> ssl.SSLContext:
    """A context that trusts ca_cert and presents cert_key, requiring the peer's certificate."""
    name = "server" if server else "client"
    pki.write_public(str(tmp_path / f"{name}.crt"), cert_key[0])
    pki.write_private(str(tmp_path / f"{name}.key"), cert_key[1])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_cert.decode())
    context.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def handshake(client_context: ssl.SSLContext, server_context: ssl.SSLContext) -> dict:
    """A TLS handshake through memory BIOs, then one message from client to server; the client
    certificate as the server sees it."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    server = server_context.wrap_bio(to_server, to_client, server_side=True)
    done: set[ssl.SSLObject] = set()
    for _ in range(10):
        for side in (client, server):
            if side not in done:
                try:
                    side.do_handshake()
                    done.add(side)
                except ssl.SSLWantReadError:
                    pass
        if len(done) == 2:
            break
    client.write(b"ping")
    assert server.read(4) == b"ping"
    peer = server.getpeercert()
    assert peer is not None
    return peer


def test_tls_handshake_between_manager_and_worker(
    tmp_path: Path, ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    manager = pki.make_node_cert(*ca, node="m1", role="manager", addresses=["10.1.2.3"])
    worker = pki.make_node_cert(*ca, node="w1", role="worker")
    server = tls_context(tmp_path, ca[0], manager, server=True)
    client = tls_context(tmp_path, ca[0], worker, server=False)
    peer = handshake(client, server)
    assert peer["subject"] == ()
    assert ("URI", "meshctl://node/w1") in peer["subjectAltName"]
    assert ("URI", "meshctl://role/worker") in peer["subjectAltName"]

    # A worker certificate from another cluster's CA is refused by the manager...
    stranger = pki.make_node_cert(*other_ca, node="w1", role="worker")
    client = tls_context(tmp_path, ca[0], stranger, server=False)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        handshake(client, server)
    # ...and a client trusting only another CA refuses the manager.
    client = tls_context(tmp_path, other_ca[0], stranger, server=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client, server)


def test_a_workers_certificate_does_not_name_the_etcd_peers_name(ca: tuple[bytes, bytes]) -> None:
    """Only managers' do (test_node_cert_names): etcd's peer port admits no worker."""
    cert_pem, _ = pki.make_node_cert(*ca, node="node1", role="worker", addresses=["10.0.0.1"])
    san = load(cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
