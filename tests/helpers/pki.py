"""Test certificates on files: a throwaway CA and serving certificates, issued by ``certs.pki``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from mirrorgate.certs.pki import KeyPair, generate_ca, issue_serving


@dataclass
class Issued:
    cert_file: Path
    key_file: Path
    cert_pem: bytes
    not_after: dt.datetime


@dataclass
class CA:
    pair: KeyPair
    cert_file: Path

    @property
    def pem(self) -> bytes:
        return self.pair.cert_pem

    def issue(
        self,
        directory: Path,
        *,
        names: tuple[str, ...] = ("127.0.0.1", "localhost"),
        stem: str = "tls",
        not_before: dt.datetime | None = None,
        days: float = 1,
    ) -> Issued:
        """Write ``<stem>.crt``/``<stem>.key`` for ``names`` (IP-looking names become IP SANs)."""
        pair = issue_serving(
            self.pair, list(names), lifetime=dt.timedelta(days=days), now=not_before
        )
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
        # Key first, certificate last: a reader polling the certificate sees a matching pair
        # once the certificate changes (as with a Secret's atomic symlink swap).
        key_file.write_bytes(pair.key_pem)
        cert_file.write_bytes(pair.cert_pem)
        return Issued(cert_file, key_file, pair.cert_pem, pair.certificate.not_valid_after_utc)


def make_ca(directory: Path, *, name: str = "mirrorgate-test-ca") -> CA:
    # Valid from a week ago, so certificates backdated by the tests still fall inside it.
    now = dt.datetime.now(dt.UTC)
    pair = generate_ca(name, lifetime=dt.timedelta(days=9), now=now - dt.timedelta(days=7))
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / f"{name}.crt"
    cert_file.write_bytes(pair.cert_pem)
    return CA(pair=pair, cert_file=cert_file)


def issue_client(ca: CA, directory: Path, *, name: str = "clair-notifier") -> Issued:
    """A client certificate (EKU clientAuth, CN ``name``) signed by ``ca``, as a caller of
    ``/events/*`` authenticating with ``scan.events.clientCAFile`` presents it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(ca.pair.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.pair.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "client.crt", directory / "client.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file.write_bytes(cert_pem)
    return Issued(cert_file, key_file, cert_pem, cert.not_valid_after_utc)
