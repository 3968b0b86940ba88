"""The cluster's certificates (#26): a CA the first manager makes, and the node certificates it
signs for the nodes that join. Keys are EC P-256: small and fast to make.

A node certificate's subject is EMPTY: etcd's JSON gateway, which meshctl talks to, refuses a
client certificate with a CommonName (etcd PR #10392). The node's identity is in SAN URIs
instead, `meshctl://node/<node>` and `meshctl://role/<role>`; etcd users and passwords
authenticate on top of mutual TLS. Every function takes and returns PEM bytes and has no side
effects, except write_private and write_public, which write files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshctl.model import MeshctlError

ROLES = ("manager", "worker")
NODE_URI = "meshctl://node/"
ROLE_URI = "meshctl://role/"
# A DNS name only managers' certificates carry: etcd's peer port admits no other
# (--peer-cert-allowed-hostname), so a worker's certificate, signed by the same CA, cannot speak
# to the members as one of them. ".invalid" is reserved: it never resolves (RFC 2606).
PEER_NAME = "etcd-peer.meshctl.invalid"
# What a node name may be in a SAN URI: no scheme characters, spaces or slashes to escape.
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
# not_before this far back, so a peer whose clock is a little behind accepts a fresh cert.
CLOCK_SKEW = dt.timedelta(minutes=5)
# x509.KeyUsage's arguments, every one required.
_KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)
# A node certificate serves TLS (a manager's etcd and join endpoint) and authenticates as a client.
_NODE_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def make_key() -> bytes:
    """A new EC P-256 private key: PEM, PKCS8, unencrypted (the file's mode protects it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(name: str = "meshctl cluster CA", days: int = 3650) -> tuple[bytes, bytes]:
    """A new self-signed cluster CA that signs node certificates only: (cert PEM, key PEM)."""
    key_pem = make_key()
    key = _load_key(key_pem)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ca_digest(ca_cert_pem: bytes) -> str:
    """The sha256 of the CA certificate's DER, lowercase hex: what a join token pins."""
    der = _load_cert(ca_cert_pem, "CA certificate").public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def make_csr(key_pem: bytes, node: str) -> bytes:
    """A certificate request for the node's key: empty subject, the node's identity as SAN URI.
    The signer decides the certificate's names; the request proves the node holds the key."""
    key = _load_key(key_pem)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(_node_uri(node))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    csr_pem: bytes,
    *,
    node: str,
    role: str,
    addresses: Sequence[str] = (),
    days: float = 90,
    now: dt.datetime | None = None,
) -> bytes:
    """Sign a node certificate for the request's key, valid `days` from `now`.

    The names are the signer's, whatever the request asked for: an empty subject, SAN URIs of the
    node and its role, an IP address for each of `addresses` and 127.0.0.1, and DNS localhost.
    It serves and authenticates TLS both ways: a manager's also serves etcd and the join endpoint,
    and names PEER_NAME, which etcd's peers require.
    """
    if role not in ROLES:
        raise MeshctlError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")
    csr = _load_csr(csr_pem)
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    ca_key = _load_key(ca_key_pem)
    if ca_key.public_key() != ca_cert.public_key():
        raise MeshctlError("the CA key does not belong to the CA certificate")
    now = now or dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(_node_uri(node)),
        x509.UniformResourceIdentifier(ROLE_URI + role),
        x509.DNSName("localhost"),
    ]
    if role == "manager":
        names.append(x509.DNSName(PEER_NAME))
    names += [x509.IPAddress(ip) for ip in _ips(addresses)]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage("digital_signature"), critical=True)
        .add_extension(_NODE_EKU, critical=False)
        # An empty subject makes the SAN the only names, so RFC 5280 wants it critical.
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_node_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    node: str,
    role: str,
    addresses: Sequence[str] = (),
    days: float = 90,
) -> tuple[bytes, bytes]:
    """A new key and its node certificate: (cert PEM, key PEM). For a manager's own certificate,
    which it signs itself, and for tests."""
    key_pem = make_key()
    csr_pem = make_csr(key_pem, node)
    cert_pem = issue(
        ca_cert_pem, ca_key_pem, csr_pem, node=node, role=role, addresses=addresses, days=days
    )
    return cert_pem, key_pem


def identity(cert_pem: bytes) -> tuple[str, str]:
    """The (node, role) a node certificate names in its SAN URIs."""
    san = _san(_load_cert(cert_pem, "node certificate"))
    if san is None:
        raise MeshctlError("the node certificate has no subject alternative names")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    nodes = [uri.removeprefix(NODE_URI) for uri in uris if uri.startswith(NODE_URI)]
    roles = [uri.removeprefix(ROLE_URI) for uri in uris if uri.startswith(ROLE_URI)]
    if len(nodes) != 1 or len(roles) != 1 or roles[0] not in ROLES:
        raise MeshctlError("the certificate does not name one meshctl node and role")
    return nodes[0], roles[0]


def ip_addresses(cert_pem: bytes) -> list[str]:
    """The IP addresses a certificate names, but loopback (issue() adds 127.0.0.1 itself)."""
    san = _san(_load_cert(cert_pem, "certificate"))
    if san is None:
        return []
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress) if not ip.is_loopback]


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    """A certificate's subject alternative names, if it has them."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def valid_from(cert_pem: bytes) -> dt.datetime:
    """When the certificate starts being valid (aware, UTC)."""
    return _load_cert(cert_pem, "certificate").not_valid_before_utc


def expires(cert_pem: bytes) -> dt.datetime:
    """When the certificate stops being valid (aware, UTC)."""
    return _load_cert(cert_pem, "certificate").not_valid_after_utc


def verify(cert_pem: bytes, ca_cert_pem: bytes, now: dt.datetime | None = None) -> bool:
    """True if the CA signed the certificate and it is valid at `now` (default: this moment)."""
    cert = _load_cert(cert_pem, "certificate")
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    now = now or dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def write_private(path: str, data: bytes) -> None:
    """Write a key file atomically, mode 0600 from its first byte: never readable by others."""
    _write_atomic(path, data, 0o600)


def write_public(path: str, data: bytes) -> None:
    """Write a certificate file atomically, mode 0644."""
    _write_atomic(path, data, 0o644)


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """A temp file in the same directory (mkstemp makes it 0600), fsynced, then renamed over
    `path`, and the directory fsynced: a reader sees the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".meshctl-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _usage(*set_bits: str) -> x509.KeyUsage:
    """KeyUsage with the named bits set and every other bit clear."""
    return x509.KeyUsage(**{bit: bit in set_bits for bit in _KEY_USAGE_BITS})


def _node_uri(node: str) -> str:
    if not _NODE_RE.fullmatch(node):
        raise MeshctlError(
            f"invalid node name {node!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return NODE_URI + node


def _ips(addresses: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses and 127.0.0.1, each once, in order."""
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in [*addresses, "127.0.0.1"]:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise MeshctlError(f"invalid address {text!r}: write an IPv4 or IPv6 address") from None
        if ip not in ips:
            ips.append(ip)
    return ips


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise MeshctlError(f"the {what} is not a PEM X.509 certificate") from None


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise MeshctlError("the key is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise MeshctlError("the key is not an EC key: meshctl makes EC P-256 keys")
    return key


def _load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    """The request, if it parses and its signature proves it was made with its key."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise MeshctlError("the certificate request is not a PEM PKCS#10 request") from None
    if not csr.is_signature_valid:
        raise MeshctlError("the certificate request's signature does not match its key")
    return csr
