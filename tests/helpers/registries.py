"""Real registries for testing mirrorgate's registry v2 client.

Owns the test side of Debian's `docker-registry` (CNCF distribution 2.8.2) and `skopeo` 1.9.3:
small OCI image layouts written directly, pushes with skopeo, a Docker-protocol token server
(RS256 JWTs carrying an `x5c` chain), registries set up the four ways the client meets them
(htpasswd, token auth, pull-through mirror, plain HTTP), a tiny urllib client for checks that must
not go through skopeo, and counting the requests a registry served.

Request counting reads the registry's own Prometheus metrics. `http.debug.prometheus` on a free
port exposes `registry_http_requests_total{code, handler, method}`: `method` is lower-case
(`head`, `get`, ...), `handler` is the route (`base`, `manifest`, `blob`, `blob_upload`,
`blob_upload_chunk`, `tags`, `catalog`). The counter is bumped when the route handler returns,
which is before the server flushes a small response, so once a client holds a complete manifest,
tags or `/v2/` answer the count includes it. The labels carry no repository or reference; for
those, `access_log_requests` counts the registry's access-log lines instead.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import random
import re
import secrets
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mirrorgate.certs.pki import KeyPair, generate_ca, issue_serving
from mirrorgate.devtools.localcluster import LocalClusterError, LocalRegistry, free_port
from mirrorgate.webhook.core.config import RegistryAccess

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# Distribution 2.8 answers an OCI tag only when the Accept header covers its type (else 404) and
# converts a Docker v2 manifest to schema1 (other digest) when it doesn't: always send all four.
ALL_MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
ACCEPT_ALL_MANIFESTS = ", ".join(ALL_MANIFEST_TYPES)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
MULTI_PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))

TOKEN_SERVICE = "mirrorgate-test-registry"
TOKEN_ISSUER = "mirrorgate-test-issuer"
TOKEN_ACTIONS = ("pull", "push", "delete", "*")
DEFAULT_USER = "testuser"
SKOPEO_TIMEOUT = 120.0


class HarnessError(LocalClusterError):
    """A program the registry harness needs is missing, or a harness step failed."""


class SkopeoError(HarnessError):
    """skopeo exited non-zero; the message carries its stderr."""


def require_tools() -> None:
    """Raise HarnessError naming the install step when docker-registry or skopeo is missing."""
    missing = [name for name in ("docker-registry", "skopeo") if shutil.which(name) is None]
    if missing:
        raise HarnessError(
            f"{' and '.join(missing)} not installed: apt-get install -y docker-registry skopeo "
            "(Debian bookworm ships docker-registry 2.8.2 and skopeo 1.9.3)"
        )


# credentials and certificates --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @classmethod
    def random(cls, username: str = DEFAULT_USER) -> Credentials:
        return cls(username, secrets.token_urlsafe(18))

    @property
    def colon(self) -> str:
        """`user:password`, the form skopeo's --creds takes."""
        return f"{self.username}:{self.password}"

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(self.colon.encode()).decode()


@dataclass(frozen=True, slots=True)
class RegistryPKI:
    """One test CA and a serving certificate for 127.0.0.1 and localhost, as files."""

    ca: KeyPair
    ca_file: Path
    cert_file: Path
    key_file: Path
    cert_dir: Path  # holds only ca.crt: skopeo --cert-dir reads *.crt files as CAs


def write_registry_pki(
    directory: Path | str, *, names: Iterable[str] = ("127.0.0.1", "localhost")
) -> RegistryPKI:
    directory = Path(directory)
    cert_dir = directory / "cert-dir"
    cert_dir.mkdir(parents=True, exist_ok=True)
    ca = generate_ca("mirrorgate-test-registry-ca", days=2)
    serving = issue_serving(ca, list(names), days=2)
    ca_file, cert_file, key_file = (directory / name for name in ("ca.crt", "tls.crt", "tls.key"))
    ca_file.write_bytes(ca.cert_pem)
    (cert_dir / "ca.crt").write_bytes(ca.cert_pem)
    cert_file.write_bytes(serving.cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(serving.key_pem)
    return RegistryPKI(ca, ca_file, cert_file, key_file, cert_dir)


# OCI image layouts ---------------------------------------------------------------------------
def _canonical_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if not path.exists():
        path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _layer_tar(seed: str, platform: str, size_mb: int) -> bytes:
    """A tar with a small text file (and N MiB of seeded random payload); fixed metadata."""
    files = [("mirrorgate/hello.txt", f"mirrorgate test image {seed} for {platform}\n".encode())]
    if size_mb:
        payload = random.Random(f"{seed}/{platform}").randbytes(size_mb * 1024 * 1024)
        files.append(("mirrorgate/payload.bin", payload))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _write_image(layout: Path, *, seed: str, os_name: str, arch: str, size_mb: int) -> dict:
    platform = f"{os_name}/{arch}"
    tar_bytes = _layer_tar(seed, platform, size_mb)
    # mtime=0 keeps the gzip header, and so every digest, a function of the seed alone.
    layer = _put_blob(layout, gzip.compress(tar_bytes, compresslevel=1, mtime=0))
    config = _put_blob(
        layout,
        _canonical_json(
            {
                "architecture": arch,
                "os": os_name,
                "created": "1970-01-01T00:00:00Z",
                "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"mirrorgate.test": seed}},
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar_bytes)]},
                "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "mirrorgate tests"}],
            }
        ),
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config},
        "layers": [{"mediaType": OCI_LAYER_GZIP, **layer}],
    }
    return {"mediaType": OCI_MANIFEST, **_put_blob(layout, _canonical_json(manifest))}


def write_oci_layout(
    directory: Path | str,
    *,
    tag: str = "v1",
    multi: bool = False,
    size_mb: int = 0,
    seed: str | None = None,
) -> Path:
    """Write (or add `tag` to) an OCI image layout at `directory` and return it.

    The image is one gzip layer holding a small file whose content comes from `seed` (default:
    the tag), so equal seeds give equal digests and different seeds different ones. `multi` makes
    the tag an OCI image index of linux/amd64 and linux/arm64 images, each with its own layer.
    `size_mb` adds that many MiB of incompressible payload to every layer. A tag written again
    replaces the earlier entry.
    """
    layout = Path(directory)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    seed = tag if seed is None else seed
    platforms = MULTI_PLATFORMS if multi else MULTI_PLATFORMS[:1]
    images = [
        _write_image(layout, seed=seed, os_name=os_name, arch=arch, size_mb=size_mb)
        for os_name, arch in platforms
    ]
    if multi:
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**image, "platform": {"architecture": arch, "os": os_name}}
                for image, (os_name, arch) in zip(images, platforms, strict=True)
            ],
        }
        top = {"mediaType": OCI_INDEX, **_put_blob(layout, _canonical_json(index))}
    else:
        top = dict(images[0])
    top["annotations"] = {REF_NAME: tag}
    index_file = layout / "index.json"
    entries = []
    if index_file.exists():
        entries = [
            entry
            for entry in json.loads(index_file.read_text()).get("manifests", [])
            if entry.get("annotations", {}).get(REF_NAME) != tag
        ]
    index_file.write_text(json.dumps({"schemaVersion": 2, "manifests": [*entries, top]}, indent=2))
    return layout


# skopeo -----------------------------------------------------------------------------------
def _skopeo() -> str:
    binary = shutil.which("skopeo")
    if binary is None:
        raise HarnessError("skopeo is not installed: apt-get install -y skopeo")
    return binary


def _creds_text(creds: Credentials | str | None) -> str | None:
    return creds.colon if isinstance(creds, Credentials) else creds


def _run_skopeo(argv: list[str], *, what: str, secrets_: Iterable[str | None]) -> bytes:
    # --insecure-policy: don't depend on /etc/containers/policy.json being permissive.
    command = [_skopeo(), "--insecure-policy", *argv]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            timeout=SKOPEO_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as err:
        raise SkopeoError(f"{what}: skopeo did not finish in {SKOPEO_TIMEOUT:.0f}s") from err
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        for creds in secrets_:
            password = (creds or "").partition(":")[2]
            if len(password) >= 4:  # masking a one-letter password would garble the message
                stderr = stderr.replace(password, "***")
        raise SkopeoError(f"{what} failed (skopeo exit {result.returncode}): {stderr}")
    return result.stdout


def _side_flags(
    side: str, creds: Credentials | str | None, cert_dir: Path | str | None, tls_verify: bool
) -> list[str]:
    prefix = f"--{side}-" if side else "--"
    flags = [f"{prefix}tls-verify={'true' if tls_verify else 'false'}"]
    if creds is not None:
        flags.append(f"{prefix}creds={_creds_text(creds)}")
    if cert_dir is not None:
        flags.append(f"{prefix}cert-dir={cert_dir}")
    return flags


def skopeo_copy(
    src: str,
    dest: str,
    *,
    src_creds: Credentials | str | None = None,
    dest_creds: Credentials | str | None = None,
    src_cert_dir: Path | str | None = None,
    dest_cert_dir: Path | str | None = None,
    src_tls_verify: bool = True,
    dest_tls_verify: bool = True,
    all: bool = False,  # noqa: A002 - named after skopeo's --all
    format: str | None = None,  # noqa: A002 - named after skopeo's --format
) -> None:
    """`skopeo copy src dest`; SkopeoError (with skopeo's stderr, passwords masked) on failure.

    `tls_verify=False` is what a plain-HTTP registry needs. `format="v2s2"` converts to Docker
    schema2 (with `all`, an index becomes a Docker manifest list).
    """
    argv = ["copy", "--quiet"]
    argv += _side_flags("src", src_creds, src_cert_dir, src_tls_verify)
    argv += _side_flags("dest", dest_creds, dest_cert_dir, dest_tls_verify)
    if all:
        argv.append("--all")
    if format is not None:
        argv.append(f"--format={format}")
    _run_skopeo(
        [*argv, src, dest],
        what=f"skopeo copy {src} {dest}",
        secrets_=(_creds_text(src_creds), _creds_text(dest_creds)),
    )


def skopeo_inspect_raw(
    ref: str,
    *,
    creds: Credentials | str | None = None,
    cert_dir: Path | str | None = None,
    tls_verify: bool = True,
) -> bytes:
    """The manifest (or index) bytes exactly as the registry serves them for `ref`."""
    return _run_skopeo(
        ["inspect", "--raw", *_side_flags("", creds, cert_dir, tls_verify), ref],
        what=f"skopeo inspect --raw {ref}",
        secrets_=(_creds_text(creds),),
    )


class RegistryEndpoint(Protocol):
    host: str
    url: str
    credentials: Credentials | None
    ca_file: Path | None
    cert_dir: Path | None


_UNSET: Any = object()


def push_image(
    registry: RegistryEndpoint,
    repo: str,
    tag: str,
    *,
    multi: bool = False,
    creds: Credentials | str | None = _UNSET,
    cert_dir: Path | str | None = _UNSET,
    format: str | None = None,  # noqa: A002 - named after skopeo's --format
    seed: str | None = None,
    size_mb: int = 0,
) -> str:
    """Write an image (seed default: `repo:tag`), push it as `repo:tag`; return its digest.

    The digest is the sha256 of the manifest (index, for `multi`) bytes the registry serves
    after the push, i.e. what it reports as Docker-Content-Digest. `creds` and `cert_dir` default
    to the registry's own.
    """
    creds = registry.credentials if creds is _UNSET else creds
    cert_dir = registry.cert_dir if cert_dir is _UNSET else cert_dir
    tls_verify = registry.url.startswith("https://")
    ref = f"docker://{registry.host}/{repo}:{tag}"
    with tempfile.TemporaryDirectory(prefix="mirrorgate-oci-") as scratch:
        layout = write_oci_layout(
            Path(scratch) / "layout",
            tag=tag,
            multi=multi,
            size_mb=size_mb,
            seed=f"{repo}:{tag}" if seed is None else seed,
        )
        skopeo_copy(
            f"oci:{layout}:{tag}",
            ref,
            dest_creds=creds,
            dest_cert_dir=cert_dir,
            dest_tls_verify=tls_verify,
            all=multi,
            format=format,
        )
    raw = skopeo_inspect_raw(ref, creds=creds, cert_dir=cert_dir, tls_verify=tls_verify)
    return sha256_digest(raw)


# a small HTTP client for checks that must not go through skopeo ---------------------------
@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    @property
    def digest(self) -> str | None:
        return self.headers.get("Docker-Content-Digest")

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    ca_file: Path | str | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request with urllib (no Accept header unless given); HTTP errors become a Reply."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.headers, err.read())


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="..."` -> ("bearer", {"realm": ..., "service": ...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


def fetch_token(
    realm: str,
    *,
    service: str | None,
    scopes: Iterable[str] = (),
    credentials: Credentials | None = None,
    ca_file: Path | str | None = None,
) -> Reply:
    """`GET realm?service=...&scope=...` with Basic credentials (anonymous without)."""
    query = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
    url = realm + ("?" + urllib.parse.urlencode(query) if query else "")
    headers = {"Authorization": credentials.basic_header()} if credentials else {}
    return http_request(url, headers=headers, ca_file=ca_file)


def registry_request(
    registry: RegistryEndpoint,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    credentials: Credentials | None = _UNSET,
) -> Reply:
    """`method registry.url+path`; on a 401 answers the Basic or Bearer challenge and retries once.

    For Bearer, the token is fetched with the challenge's `scope`. A failed token fetch is
    returned as the Reply. `credentials` default to the registry's; None means anonymous.
    """
    creds = registry.credentials if credentials is _UNSET else credentials
    url = registry.url + path
    reply = http_request(url, method=method, headers=headers, ca_file=registry.ca_file)
    challenge = reply.headers.get("WWW-Authenticate")
    if reply.status != 401 or not challenge:
        return reply
    scheme, params = parse_challenge(challenge)
    if scheme == "basic":
        if creds is None:
            return reply
        authorization = creds.basic_header()
    elif scheme == "bearer":
        token_reply = fetch_token(
            params["realm"],
            service=params.get("service"),
            scopes=[params["scope"]] if "scope" in params else [],
            credentials=creds,
            ca_file=registry.ca_file,
        )
        if token_reply.status != 200:
            return token_reply
        authorization = "Bearer " + token_reply.json()["token"]
    else:
        return reply
    return http_request(
        url,
        method=method,
        headers={**(headers or {}), "Authorization": authorization},
        ca_file=registry.ca_file,
    )


def head_manifest(
    registry: RegistryEndpoint,
    repo: str,
    reference: str,
    *,
    accept: str | None = ACCEPT_ALL_MANIFESTS,
    credentials: Credentials | None = _UNSET,
) -> Reply:
    """HEAD /v2/<repo>/manifests/<reference>; `accept=None` sends no Accept header at all."""
    return registry_request(
        registry,
        "HEAD",
        f"/v2/{repo}/manifests/{reference}",
        headers={"Accept": accept} if accept is not None else None,
        credentials=credentials,
    )


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, without verifying it (the registry does that)."""
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


# token server -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request the token server answered (username None: anonymous)."""

    username: str | None
    service: str
    scopes: tuple[str, ...]
    status: int
    access: tuple[dict[str, Any], ...] = ()


def _token_signing_pki() -> tuple[bytes, rsa.RSAPrivateKey, bytes]:
    """(token CA PEM, signer key, signer cert DER): the signer is a non-CA leaf of the token CA."""
    ca = generate_ca("mirrorgate-test-token-ca", days=2)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    signer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirrorgate-token-signer")])
        )
        .issuer_name(ca.certificate.subject)
        .public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
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
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return ca.cert_pem, signer_key, cert.public_bytes(serialization.Encoding.DER)


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: TokenServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The listening socket is wrapped with do_handshake_on_connect=False, so the TLS
        # handshake runs here, in the per-connection thread, not in the accept loop.
        request.settimeout(10)
        request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("token server: error serving %s", client_address, exc_info=True)


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TokenHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.owner._serve(self)

    def do_POST(self) -> None:  # noqa: N802
        # The OAuth2 form (POST) is optional in the token spec; clients fall back to GET on 405.
        self.server.owner._count()
        self.server.owner._reply(self, 405, {"errors": [{"code": "UNSUPPORTED"}]}, {"Allow": "GET"})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("token server: " + format, *args)


class TokenServer:
    """The Docker registry token protocol over HTTPS on 127.0.0.1, in a thread.

    `GET /token?service=S&scope=repository:NAME:pull,push` with Basic credentials: a known user
    gets an RS256 JWT granting the requested actions it is allowed (default: all); wrong
    credentials get 401; no credentials get a token granting nothing (as public token servers do
    for anonymous users). The JWT header carries `x5c` = [signer certificate]; the registry
    trusts `root_cert_bundle` (the token CA). `requests` counts every request, thread-safely;
    `history` records each one. `expires_in` may be changed while running.
    """

    def __init__(
        self,
        work_dir: Path | str,
        *,
        tls_cert: Path | str,
        tls_key: Path | str,
        credentials: Credentials | None = None,
        service: str = TOKEN_SERVICE,
        issuer: str = TOKEN_ISSUER,
        expires_in: int = 300,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.tls_cert, self.tls_key = Path(tls_cert), Path(tls_key)
        self.credentials = credentials or Credentials.random()
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.root_cert_bundle = self.work_dir / "token-ca.crt"
        self.url = ""
        self.realm = ""
        self._users: dict[str, tuple[str, frozenset[str]]] = {}
        self.add_user(self.credentials)
        self._lock = threading.Lock()
        self._requests = 0
        self._history: list[TokenRequest] = []
        self._server: _TokenHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._signer_key: rsa.RSAPrivateKey | None = None
        self._signer_der = b""

    def add_user(self, credentials: Credentials, *, actions: Iterable[str] = TOKEN_ACTIONS) -> None:
        self._users[credentials.username] = (credentials.password, frozenset(actions))

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def history(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._history)

    def registry_auth(self) -> dict[str, Any]:
        """The `auth` section of a registry config that trusts this server."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.root_cert_bundle),
            }
        }

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> Self:
        if self._server is not None:
            raise HarnessError("this TokenServer was already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ca_pem, self._signer_key, self._signer_der = _token_signing_pki()
        self.root_cert_bundle.write_bytes(ca_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls_cert, self.tls_key)
        server = _TokenHTTPServer(("127.0.0.1", 0), _TokenHandler)
        server.owner = self
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._server = server
        self.url = f"https://127.0.0.1:{server.server_address[1]}"
        self.realm = f"{self.url}/token"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="token-server"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # protocol ------------------------------------------------------------------------------
    def _count(self) -> None:
        with self._lock:
            self._requests += 1

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self._history.append(entry)

    @staticmethod
    def _reply(
        handler: BaseHTTPRequestHandler,
        status: int,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def _authenticate(self, header: str | None) -> tuple[bool, str | None]:
        """(ok, username): no header is an anonymous success; bad credentials fail."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            username, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        known = self._users.get(username)
        if known is None or not secrets.compare_digest(known[0], password):
            return False, username
        return True, username

    def _grant(self, username: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        allowed = self._users[username][1] if username is not None else frozenset()
        access = []
        for scope in scopes:
            # type:name:actions, where the name may itself hold ':' (host:port/repo).
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a and a in allowed]
            if kind and name and granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def _sign(self, claims: Mapping[str, Any]) -> str:
        assert self._signer_key is not None
        # distribution's token auth: RS256, the signing certificate in x5c (chained to the
        # registry's rootcertbundle).
        x5c = [base64.b64encode(self._signer_der).decode()]
        return jwt.encode(dict(claims), self._signer_key, algorithm="RS256", headers={"x5c": x5c})

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        self._count()
        url = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qs(url.query)
        service = query.get("service", [""])[0]
        scopes = tuple(s for value in query.get("scope", []) for s in value.split())
        ok, username = self._authenticate(handler.headers.get("Authorization"))
        if url.path != "/token":
            self._record(TokenRequest(username, service, scopes, 404))
            self._reply(handler, 404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        if not ok:
            self._record(TokenRequest(username, service, scopes, 401))
            self._reply(
                handler,
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "invalid username/password"}]},
                {"WWW-Authenticate": 'Basic realm="mirrorgate-test-token"'},
            )
            return
        if service != self.service:
            self._record(TokenRequest(username, service, scopes, 400))
            message = f"unknown service {service!r}; this server issues tokens for {self.service!r}"
            self._reply(handler, 400, {"errors": [{"code": "DENIED", "message": message}]})
            return
        access = self._grant(username, scopes)
        now = int(time.time())
        expires_in = int(self.expires_in)
        token = self._sign(
            {
                "iss": self.issuer,
                "sub": username or "",
                "aud": self.service,  # distribution 2.8 reads `aud` as one string
                "exp": now + expires_in,
                "nbf": now - 1,
                "iat": now,
                "jti": secrets.token_hex(16),
                "access": access,
            }
        )
        issued_at = dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z")
        self._record(TokenRequest(username, service, scopes, 200, tuple(access)))
        self._reply(
            handler,
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": expires_in,
                "issued_at": issued_at,
            },
        )


# registries ---------------------------------------------------------------------------------
class HarnessRegistry(LocalRegistry):
    """A LocalRegistry with metrics and an access log, set up as one of the harness's kinds.

    - `pki` given: TLS with its serving certificate; `ca_file`/`cert_dir` point at its CA.
    - `credentials` without `token_server`: htpasswd (bcrypt cost 4) with that user.
    - `token_server`: `auth.token` trusting it; `credentials` default to the server's user.
    - `upstream`: a pull-through cache of that registry (with its credentials), started with
      SSL_CERT_FILE = the upstream's CA. Distribution pings the upstream at start and exits if
      it can't reach or trust it, so start the upstream first.
    Nothing given: plain HTTP, no auth.

    Metrics: `http.debug` on a free port with Prometheus at `metrics_url` (see
    `registry_requests`). Until LocalRegistry takes a debug option, `_config` adds it here.
    """

    def __init__(
        self,
        work_dir: Path | str,
        *,
        pki: RegistryPKI | None = None,
        credentials: Credentials | None = None,
        token_server: TokenServer | None = None,
        upstream: HarnessRegistry | None = None,
        extra_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        config = dict(extra_config or {})
        process_env = dict(env or {})
        if token_server is not None:
            config["auth"] = token_server.registry_auth()
        if upstream is not None:
            proxy: dict[str, Any] = {"remoteurl": upstream.url}
            if upstream.credentials is not None:
                # Sent only to a Bearer (token) upstream: distribution 2.8 never answers Basic.
                proxy["username"] = upstream.credentials.username
                proxy["password"] = upstream.credentials.password
            config["proxy"] = proxy
            if upstream.ca_file is not None:
                process_env.setdefault("SSL_CERT_FILE", str(upstream.ca_file))
        htpasswd = credentials if token_server is None else None
        super().__init__(
            work_dir,
            username=htpasswd.username if htpasswd else None,
            password=htpasswd.password if htpasswd else None,
            tls_cert=pki.cert_file if pki else None,
            tls_key=pki.key_file if pki else None,
            extra_config=config,
            env=process_env,
            start_timeout=start_timeout,
        )
        self.credentials: Credentials | None = credentials or (
            token_server.credentials if token_server else None
        )
        self.ca_file: Path | None = pki.ca_file if pki else None
        self.cert_dir: Path | None = pki.cert_dir if pki else None
        self.token_server = token_server
        self.upstream = upstream
        self.log_path = self.work_dir / "registry.log"
        self.debug_port = 0
        self.metrics_url = ""

    def _config(self, port: int) -> dict[str, Any]:
        config = super()._config(port)
        self.debug_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.debug_port}/metrics"
        config["http"]["debug"] = {
            "addr": f"127.0.0.1:{self.debug_port}",
            "prometheus": {"enabled": True, "path": "/metrics"},
        }
        config["log"] = {**config.get("log", {}), "accesslog": {"disabled": False}}
        return config

    def start(self) -> Self:
        super().start()
        deadline = time.monotonic() + self.start_timeout
        while not _answers(self.metrics_url):
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"registry metrics at {self.metrics_url} never answered")
            time.sleep(0.05)
        return self


def _answers(url: str) -> bool:
    try:
        return http_request(url, timeout=2).status == 200
    except OSError:  # refused, reset or timed out: not serving yet
        return False


# request counting ---------------------------------------------------------------------------
_REQUESTS_SAMPLE = re.compile(r"^registry_http_requests_total\{([^}]*)\}\s+(\S+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def registry_requests(
    registry: HarnessRegistry,
    method: str | None = None,
    handler: str | None = None,
    *,
    code: int | str | None = None,
) -> float:
    """Requests the registry served so far (its `registry_http_requests_total`), filtered.

    `method` is matched case-insensitively (`"HEAD"`), `handler` is the route name (`manifest`,
    `blob`, `base`, `tags`, ...), `code` the status. Counters only grow: take differences.
    """
    if not registry.metrics_url:
        raise HarnessError("the registry is not started")
    reply = http_request(registry.metrics_url)
    if reply.status != 200:
        raise HarnessError(f"{registry.metrics_url} answered {reply.status}")
    total = 0.0
    for label_text, value in _REQUESTS_SAMPLE.findall(reply.body.decode()):
        labels = dict(_LABEL.findall(label_text))
        if method is not None and labels.get("method") != method.lower():
            continue
        if handler is not None and labels.get("handler") != handler:
            continue
        if code is not None and labels.get("code") != str(code):
            continue
        total += float(value)
    return total


_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ',
    re.MULTILINE,
)


def access_log_requests(
    registry: HarnessRegistry,
    *,
    method: str | None = None,
    path: str | re.Pattern[str] | None = None,
    status: int | None = None,
) -> int:
    """Access-log lines (combined log format) of the registry matching method, path and status.

    `path` is compared with the request path without its query; a compiled pattern must match
    the whole path. Use this when the count must name a repository or reference.
    """
    text = registry.log_path.read_text(errors="replace") if registry.log_path.exists() else ""
    count = 0
    for match in _ACCESS_LINE.finditer(text):
        if method is not None and match["method"] != method.upper():
            continue
        target = urllib.parse.urlsplit(match["target"]).path
        if isinstance(path, re.Pattern):
            if not path.fullmatch(target):
                continue
        elif path is not None and target != path:
            continue
        if status is not None and int(match["status"]) != status:
            continue
        count += 1
    return count


def registries_yaml(entries: dict[str, RegistryAccess]) -> str:
    lines = ["registries:"]
    for host, a in entries.items():
        fields = []
        if a.ca_file:
            fields.append(f"caFile: {a.ca_file}")
        if a.plain_http:
            fields.append("plainHTTP: true")
        if a.username_file:
            fields.append(
                f"auth: {{usernameFile: {a.username_file}, passwordFile: {a.password_file}}}"
            )
        if a.docker_config_file:
            fields.append(f"dockerConfigFile: {a.docker_config_file}")
        lines.append(f'  "{host}": {{{", ".join(fields)}}}')
    return "\n".join(lines) + "\n"
