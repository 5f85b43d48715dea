"""Issue a CA and serving certificates for the webhook (ECDSA P-256).

Standard library and ``cryptography`` only. IP-looking names become IP SANs; the first DNS name
(else the first name) becomes the subject CN. Keys are returned as PEM bytes and never logged.
A serving certificate never outlives the CA that signs it. ``service_names`` are the four names the
API server may use for an in-cluster Service.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CA_DAYS = 365
DEFAULT_SERVING_DAYS = 90
# Tolerate clocks a little behind ours.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in a log line or a test failure

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_ca(
    common_name: str = "mirrorgate-webhook-ca",
    *,
    days: int = DEFAULT_CA_DAYS,
    lifetime: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> KeyPair:
    """A self-signed CA valid for ``lifetime`` (default ``days``) from ``now``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = now or dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + (lifetime or dt.timedelta(days=days)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_serving(
    ca: KeyPair,
    names: list[str],
    *,
    days: int = DEFAULT_SERVING_DAYS,
    lifetime: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> KeyPair:
    """A serving certificate for ``names`` signed by ``ca``, valid for ``lifetime`` (default
    ``days``) but never past the CA's own notAfter."""
    if not names:
        raise ValueError("a serving certificate needs at least one name")
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key (mirrorgate's CAs are P-256)")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    dns_names: list[str] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
            dns_names.append(n)
    cn = (dns_names or names)[0]
    now = now or dt.datetime.now(dt.UTC)
    not_after = min(now + (lifetime or dt.timedelta(days=days)), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def service_names(service: str, namespace: str) -> list[str]:
    """``svc``, ``svc.ns``, ``svc.ns.svc`` and ``svc.ns.svc.cluster.local``: the API server calls
    a webhook Service as ``svc.ns.svc``; the others cover clients inside the cluster."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in order (empty for no or unparsable data)."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def subject_names(cert: x509.Certificate) -> list[str]:
    """The DNS and IP SANs of ``cert`` as strings, in order."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in sans if isinstance(n, (x509.DNSName, x509.IPAddress))]


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca``'s key signed ``cert``."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def key_matches(pair: KeyPair) -> bool:
    """Whether the private key of ``pair`` belongs to its certificate."""
    try:
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
        cert = pair.certificate
    except (ValueError, TypeError):
        return False
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    return key.public_key().public_bytes(encoding, public) == cert.public_key().public_bytes(
        encoding, public
    )
