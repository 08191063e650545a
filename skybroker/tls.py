"""TLS between the broker and its replicas: one self-signed certificate per replica, pinned.

The broker makes each cloud replica's key pair and certificate (`self_signed`), ships the
private key to the replica as a secret, and keeps only the certificate (public) in the
replica's handle. Whoever talks to the replica (the router, the controller's probe) trusts
that one certificate and nothing else (`pinned_context`): no CA, and no hostname check, since
a replica is reached by its IP. A replica showing any other certificate fails the handshake.

Making certificates needs `cryptography` (the `cloud` extra); pinning needs only `ssl`.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
from dataclasses import dataclass

VALID_DAYS = 3650  # a replica lives as long as its deployment; the pin, not the date, protects


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, both PEM."""

    cert_pem: str
    key_pem: str

    @property
    def sha256(self) -> str:
        return fingerprint(self.cert_pem)


def self_signed(common_name: str) -> CertPair:
    """A fresh P-256 key and a self-signed certificate for it (serverAuth, not a CA)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        from skybroker.provision import MissingExtraError

        raise MissingExtraError(
            f"replica certificates need the cryptography package ({e}): "
            "pip install 'skybroker[cloud]'"
        ) from e

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks drift
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


def fingerprint(cert_pem: str) -> str:
    """The SHA-256 of a certificate's DER bytes, hex (what `openssl x509 -fingerprint` shows)."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest()


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context that accepts exactly this certificate (hostname not checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # replicas are reached by IP; the pin says who they are
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert_pem)
    return ctx


@functools.cache
def default_context() -> ssl.SSLContext:
    """The system's default TLS context, made once (a fresh one costs ~0.4 s of CPU): what
    clients of plain-HTTP replicas pass as `verify` so httpx does not build one each time."""
    return ssl.create_default_context()
