"""Throwaway local infrastructure for `mirrorgate demo` and the end-to-end test suite.

Owns running, on 127.0.0.1 only, a real Kubernetes control plane (`etcd` + `kube-apiserver`) and
a real container registry (Debian's `docker-registry`, i.e. CNCF distribution). Each one lives in
a work directory that holds its configuration, data, logs and credentials; the processes are
started with `subprocess.Popen` and stopped by the PIDs started here.

The control plane alone runs no scheduler or kubelet: pods are stored, never run. It is always
ready to take a node (`mirrorgate.devtools.node.LocalNode`): it has a client CA whose
certificates it accepts (`issue_client_certificate`), a client certificate of its own for the
kubelet API (`kubectl logs`), the Node authorizer, and no endpoint reconciler (its 127.0.0.1
address means nothing inside a pod).

No kind/k3s/envtest download is reachable, so the binaries come from the `KUBEBUILDER_ASSETS`
convention (a folder holding `kube-apiserver` and `etcd`, enough for the API server) or from the
cache that `scripts/control-plane-assets` fills (which also holds the node's binaries).
Credentials (tokens, keys, the registry password) are written to files with mode 0600 and never
logged.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import kubernetes.client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

K8S_VERSION = "1.20.2"
# Debian bookworm's kubernetes-client: kubectl built from the same source as the binaries above.
KUBECTL_PACKAGE = "kubernetes-client"
KUBECTL_TIMEOUT = 60.0
# Matches RECIPE in scripts/control-plane-assets: a cache built by another recipe lives elsewhere.
ASSETS_RECIPE = 2
ASSET_BINARIES = ("kube-apiserver", "etcd")
# What a node needs on top (recipe 2 builds them; a KUBEBUILDER_ASSETS folder usually lacks them).
NODE_BINARIES = ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler")
# The identity kube-apiserver presents to kubelets (`kubectl logs`, `exec`): system:masters, so
# the kubelet's webhook authorizer allows it.
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"
CERT_DAYS = 7
# Where Services get their ClusterIPs; the first address is the `kubernetes` Service's.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
STOP_GRACE_SECONDS = 10.0
_LOG_TAIL_LINES = 40


class LocalClusterError(RuntimeError):
    """A local control plane or registry could not be found, started or reached."""


def cache_root() -> Path:
    """The cache root: `MIRRORGATE_CACHE`, else `~/.cache/mirrorgate`."""
    configured = os.environ.get("MIRRORGATE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "mirrorgate"


def _missing_binaries(folder: Path, names: Sequence[str]) -> list[str]:
    return [
        name
        for name in names
        if not ((folder / name).is_file() and os.access(folder / name, os.X_OK))
    ]


def assets_cache_dir() -> Path:
    """Where `scripts/control-plane-assets` puts the binaries of this recipe."""
    return cache_root() / "control-plane" / f"k8s-{K8S_VERSION}-r{ASSETS_RECIPE}"


def find_assets(*, node: bool = False) -> Path:
    """The folder holding executable `kube-apiserver` and `etcd` (and, with `node`, the kubelet,
    kube-proxy, kube-controller-manager and kube-scheduler).

    `KUBEBUILDER_ASSETS` wins when it holds them all; otherwise the cache filled by
    `scripts/control-plane-assets`. The error names, per folder, exactly what is missing.
    """
    wanted = ASSET_BINARIES + NODE_BINARIES if node else ASSET_BINARIES
    searched = []
    env_assets = os.environ.get("KUBEBUILDER_ASSETS")
    if env_assets:
        missing = _missing_binaries(Path(env_assets), wanted)
        if not missing:
            return Path(env_assets)
        searched.append(f"KUBEBUILDER_ASSETS={env_assets} lacks {', '.join(missing)}")
    cached = assets_cache_dir()
    missing = _missing_binaries(cached, wanted)
    if not missing:
        return cached
    searched.append(f"{cached} lacks {', '.join(missing)}")
    what = "the binaries a node needs" if node else "executable kube-apiserver and etcd"
    raise LocalClusterError(
        f"{what} not found ({'; '.join(searched)}). Run scripts/control-plane-assets (builds "
        f"kube-apiserver and the node binaries {K8S_VERSION} from Debian's source package once, "
        "about 17 minutes, needs root for apt)"
        + (
            "; an envtest KUBEBUILDER_ASSETS folder holds only kube-apiserver and etcd."
            if node
            else " or set KUBEBUILDER_ASSETS to a folder holding both binaries."
        )
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# klog's fatal line ("F1203 07:58:39.522428 16093 server.go:269] ..."), which Go follows with a
# dump of every goroutine's stack.
_KLOG_FATAL = re.compile(r"^F\d{4} ")


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log; for a Kubernetes component that died of a klog fatal
    error, the lines up to that error instead of the goroutine dump after it."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    all_lines = text.splitlines()
    fatal = [i for i, line in enumerate(all_lines) if _KLOG_FATAL.match(line)]
    if fatal:
        all_lines = all_lines[: fatal[-1] + 1]
    return "\n".join(all_lines[-lines:]) or "(empty log)"


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file only its owner can read: it holds a token, key or password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o600)


def _private_key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """A CA certificate (no issuer: self-signed) or a client certificate signed by `issuer`."""
    now = datetime.datetime.now(datetime.UTC)
    is_ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A minute of slack for clocks read by other processes a moment later.
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _unverified_context() -> ssl.SSLContext:
    # Readiness probes only ask "is something answering?"; trust is checked by the real clients.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class ChildProcess:
    """One child process, its log file, and how to stop it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=None if env is None else {**os.environ, **env},
            )
        except OSError as err:
            self._log.close()
            raise LocalClusterError(f"could not start {name} ({argv[0]}): {err}") from err

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise LocalClusterError(
                f"{self.name} exited with code {code} during start-up; last lines of "
                f"{self.log_path}:\n{log_tail(self.log_path)}"
            )

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Terminate, wait up to `grace` seconds, then kill; always reap the child."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.pid)
                self.popen.kill()
                self.popen.wait()
        if not self._log.closed:
            self._log.close()


def wait_until(
    ready: Callable[[], bool], *, what: str, timeout: float, processes: Sequence[ChildProcess]
) -> None:
    """Poll `ready()` until true; a dead process or the timeout raises LocalClusterError."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            process.check_alive()
        if ready():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.log_path}:\n{log_tail(p.log_path)}" for p in processes)
            raise LocalClusterError(f"{what} not ready after {timeout:.0f}s\n{tails}")
        time.sleep(0.1)


def http_answers(
    url: str, *, headers: Mapping[str, str] | None = None, expect_ok: bool = False
) -> bool:
    """True when `url` gives an HTTP answer (any status, or only 2xx with expect_ok)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=2, context=_unverified_context()):
            return True
    except urllib.error.HTTPError:
        return not expect_ok
    except (OSError, ssl.SSLError):
        return False


class ControlPlane:
    """etcd + kube-apiserver on free loopback ports, with token auth and RBAC.

    Users: `admin` (group system:masters) always exists; `add_user()` adds more before `start()`.
    Client certificates from `issue_client_certificate()` work at any time (x509 auth against
    `client_ca_file`); that is how a `LocalNode` joins. Without a node, pods are stored, never run.
    TLS: with no serving certificate given, kube-apiserver 1.20 generates a throwaway CA and a
    serving certificate signed by it, and writes both (leaf, then CA) to
    `<work_dir>/certs/apiserver.crt`. Used as a CA bundle, that file lets clients verify the chain
    and the host name: the leaf carries the IP SAN 127.0.0.1 (and kubernetes.default.svc names, but
    not `localhost`), so `url` uses 127.0.0.1. Every client made here verifies both.

    `service_account_admission=True` runs the ServiceAccount admission plugin, as every real
    cluster does: pods get their service account's token and the CA mounted, which in-cluster
    clients (a webhook Deployment) need. It needs a controller-manager (a `LocalNode` runs one)
    to create each namespace's `default` ServiceAccount and the tokens; without one, pods are
    refused. By default the plugin is off, so pods are stored without a node.
    """

    def __init__(
        self,
        work_dir: Path | str,
        *,
        assets: Path | None = None,
        start_timeout: float = 60.0,
        extra_apiserver_args: Sequence[str] = (),
        service_account_admission: bool = False,
    ) -> None:
        self.work_dir = Path(work_dir)
        self._assets = assets
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.service_account_admission = service_account_admission
        self.admin_token = secrets.token_hex(24)
        self._users: dict[str, tuple[str, tuple[str, ...]]] = {
            "admin": (self.admin_token, ("system:masters",)),
        }
        self._etcd: ChildProcess | None = None
        self._apiserver: ChildProcess | None = None
        self.etcd_url = ""
        self.url = ""
        self.cert_dir = self.work_dir / "certs"
        self.ca_file = self.cert_dir / "apiserver.crt"
        self.kubeconfig = self.work_dir / "kubeconfig"
        # The CA behind x509 client authentication, both ways: the API server accepts the
        # certificates it signs (node components), and a kubelet trusts it for the API server's
        # own client certificate.
        self.client_ca_file = self.cert_dir / "client-ca.crt"
        self.sa_key_file = self.work_dir / "sa.key"
        self._client_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    # users -----------------------------------------------------------------------------------
    def add_user(self, name: str, groups: Sequence[str] = ()) -> str:
        """Register a token user (before start) and return its bearer token."""
        if self._apiserver is not None:
            raise LocalClusterError(
                "add_user() must be called before start(): the API server reads its token file once"
            )
        if not name or any(c in name for c in ',"\n') or name in self._users:
            raise LocalClusterError(f"invalid or duplicate user name {name!r}")
        if any(not g or any(c in g for c in ',"\n') for g in groups):
            raise LocalClusterError(f"invalid group names for {name!r}: {list(groups)}")
        token = secrets.token_hex(24)
        self._users[name] = (token, tuple(groups))
        return token

    @property
    def tokens(self) -> dict[str, str]:
        """User name -> bearer token, including `admin`."""
        return {name: token for name, (token, _groups) in self._users.items()}

    def issue_client_certificate(
        self, user: str, groups: Sequence[str] = (), *, directory: Path | str | None = None
    ) -> tuple[Path, Path]:
        """A client certificate for `user` in `groups`, signed by the client CA.

        Unlike tokens this works after start(): the API server checks certificates against
        `client_ca_file`, so it is how node components join a running control plane (the kubelet
        as `system:node:<name>` in `system:nodes`, which the Node authorizer serves). Returns
        (certificate, key) paths in `directory` (default `<work_dir>/certs`), the key mode 0600.
        """
        if self._client_ca is None:
            raise LocalClusterError("the control plane is not started: it has no client CA yet")
        ca_cert, ca_key = self._client_ca
        folder = Path(directory) if directory is not None else self.cert_dir
        folder.mkdir(parents=True, exist_ok=True)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(x509.Name(attributes), key, issuer=ca_cert, issuer_key=ca_key)
        stem = "".join(c if c.isalnum() or c in "-." else "_" for c in user)
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        write_private(key_path, _private_key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def _write_client_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirrorgate-local-client-ca")])
        cert = _certificate(name, key, issuer=None, issuer_key=key)
        self._client_ca = (cert, key)
        self.client_ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # lifecycle -------------------------------------------------------------------------------
    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The child processes started so far, by name (for inspection, not for stopping)."""
        found = {"etcd": self._etcd, "kube-apiserver": self._apiserver}
        return {name: proc.popen for name, proc in found.items() if proc is not None}

    def start(self) -> Self:
        if self._etcd is not None or self._apiserver is not None:
            raise LocalClusterError("this ControlPlane was already started")
        assets = self._assets or find_assets()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.cert_dir.mkdir(exist_ok=True)
        try:
            self._write_client_ca()
            self._start_etcd(assets)
            self._start_apiserver(assets)
        except BaseException:
            self.stop()
            raise
        self.write_kubeconfig(self.kubeconfig, token=self.admin_token, user="admin")
        return self

    def _start_etcd(self, assets: Path) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        self._etcd = ChildProcess(
            "etcd",
            [
                str(assets / "etcd"),
                "--data-dir",
                str(self.work_dir / "etcd-data"),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
            ],
            log_path=self.work_dir / "etcd.log",
        )
        wait_until(
            lambda: http_answers(f"{self.etcd_url}/health", expect_ok=True),
            what="etcd",
            timeout=self.start_timeout,
            processes=[self._etcd],
        )

    def _start_apiserver(self, assets: Path) -> None:
        tokens_csv = self.work_dir / "tokens.csv"
        # token,user,uid[,"group1,group2"]: an empty fourth column would mean a group named "".
        write_private(
            tokens_csv,
            "".join(
                f"{token},{name},{name}" + (f',"{",".join(groups)}"' if groups else "") + "\n"
                for name, (token, groups) in self._users.items()
            ),
        )
        sa_key = self.sa_key_file
        # kube-controller-manager signs service account tokens with it (a node runs one).
        write_private(sa_key, _private_key_pem(rsa.generate_private_key(65537, 2048)))
        kubelet_cert, kubelet_key = self.issue_client_certificate(
            KUBELET_CLIENT_USER, ("system:masters",)
        )
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        self._apiserver = ChildProcess(
            "kube-apiserver",
            [
                str(assets / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                "--insecure-port=0",
                f"--cert-dir={self.cert_dir}",
                f"--token-auth-file={tokens_csv}",
                f"--client-ca-file={self.client_ca_file}",
                # Node: what a kubelet (system:node:<name>) may read and write; RBAC for the rest.
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--allow-privileged=true",
                # Without a controller-manager nothing would create the default ServiceAccount
                # (and every pod would be refused), unless the caller asked for the plugin.
                *(
                    ()
                    if self.service_account_admission
                    else ("--disable-admission-plugins=ServiceAccount",)
                ),
                "--feature-gates=EphemeralContainers=true",
                # `kubectl logs/exec` go API server -> kubelet: this certificate authenticates the
                # API server there; node addresses are the kubelet's own (no DNS for node names).
                f"--kubelet-client-certificate={kubelet_cert}",
                f"--kubelet-client-key={kubelet_key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                # The default reconciler would publish 127.0.0.1 as the endpoint of the
                # `kubernetes` Service; inside a pod that is the pod itself.
                "--endpoint-reconciler-type=none",
                *self.extra_apiserver_args,
            ],
            log_path=self.work_dir / "kube-apiserver.log",
        )
        auth = {"Authorization": f"Bearer {self.admin_token}"}
        wait_until(
            lambda: http_answers(f"{self.url}/readyz", headers=auth, expect_ok=True),
            what="kube-apiserver",
            timeout=self.start_timeout,
            processes=[self._etcd, self._apiserver] if self._etcd else [self._apiserver],
        )
        if not self.ca_file.is_file():
            raise LocalClusterError(f"kube-apiserver is ready but wrote no {self.ca_file}")

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd. Idempotent; safe after a failed start()."""
        for process in (self._apiserver, self._etcd):
            if process is not None:
                process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # clients ---------------------------------------------------------------------------------
    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """A new ApiClient for `token` (default: admin); never touches the global default config."""
        if not self.url:
            raise LocalClusterError("the control plane is not started")
        config = kubernetes.client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.ca_file)
        config.verify_ssl = True
        config.api_key = {"authorization": token or self.admin_token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(configuration=config)

    def kubectl(self) -> Kubectl:
        """Debian's kubectl 1.20 as `admin`, caching discovery under the work dir."""
        if not self.url:
            raise LocalClusterError("the control plane is not started")
        return Kubectl(self.kubeconfig, cache_dir=self.work_dir / "kubectl-cache")

    def write_kubeconfig(
        self,
        path: Path | str,
        *,
        token: str | None = None,
        user: str = "user",
        client_certificate: Path | str | None = None,
        client_key: Path | str | None = None,
    ) -> Path:
        """Write a kubeconfig (JSON, which is valid YAML) with mode 0600.

        The user authenticates with `token`, or with `client_certificate` + `client_key` (from
        issue_client_certificate()).
        """
        if not self.url:
            raise LocalClusterError("the control plane is not started")
        credentials: dict[str, str]
        if token is not None and client_certificate is None and client_key is None:
            credentials = {"token": token}
        elif token is None and client_certificate is not None and client_key is not None:
            credentials = {
                "client-certificate": str(client_certificate),
                "client-key": str(client_key),
            }
        else:
            raise LocalClusterError(
                "write_kubeconfig() needs either token or both client_certificate and client_key"
            )
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "mirrorgate-local",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [
                {
                    "name": "mirrorgate-local",
                    "context": {"cluster": "mirrorgate-local", "user": user},
                }
            ],
            "current-context": "mirrorgate-local",
        }
        path = Path(path)
        write_private(path, json.dumps(document, indent=2) + "\n")
        return path


def find_kubectl() -> Path:
    """Debian's kubectl 1.20 (package kubernetes-client), unpacked once into the cache.

    `/usr/bin/kubectl` may belong to something else (on this kind of machine: google-cloud-sdk's
    1.32 dispatcher), and a client far from the server's version is not what users of a 1.20
    cluster see. So the package is fetched with `apt-get download` and unpacked with `dpkg -x`
    into `<cache>/kubectl-1.20.2/`: nothing is installed system-wide.
    """
    folder = cache_root() / f"kubectl-{K8S_VERSION}"
    binary = folder / "usr" / "bin" / "kubectl"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    apt_get, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if apt_get is None or dpkg is None:
        raise LocalClusterError(
            f"kubectl {K8S_VERSION} is not in {folder} and apt-get/dpkg are missing to fetch "
            f"Debian's {KUBECTL_PACKAGE} package"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kubectl-", dir=folder.parent) as scratch:
        fetched = subprocess.run(
            [apt_get, "download", KUBECTL_PACKAGE],
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        debs = sorted(Path(scratch).glob(f"{KUBECTL_PACKAGE}_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise LocalClusterError(
                f"apt-get download {KUBECTL_PACKAGE} failed ({fetched.stderr.strip()[-500:]}); "
                "run apt-get update first (Debian bookworm ships kubectl 1.20.2 in it)"
            )
        unpacked = Path(scratch) / "root"
        subprocess.run([dpkg, "-x", str(debs[-1]), str(unpacked)], check=True, timeout=120)
        version = subprocess.run(
            [str(unpacked / "usr" / "bin" / "kubectl"), "version", "--client", "--short"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if f"v{K8S_VERSION}" not in version:
            raise LocalClusterError(
                f"{debs[-1].name} holds kubectl {version.strip()!r}, not v{K8S_VERSION}"
            )
        try:
            unpacked.rename(folder)
        except OSError:
            if not binary.is_file():  # else another process unpacked it first
                raise
    return binary


class Kubectl:
    """Runs Debian's kubectl 1.20 with one kubeconfig, as a user of the cluster would.

    Always passes `--kubeconfig` and `--cache-dir` (a private folder): kubectl otherwise reads
    `~/.kube/config` and writes `~/.kube/cache`.
    """

    def __init__(
        self, kubeconfig: Path | str, *, cache_dir: Path | str, binary: Path | None = None
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.cache_dir = Path(cache_dir)
        self.binary = binary or find_kubectl()

    def run(
        self,
        *args: str,
        input: str | None = None,  # noqa: A002 - subprocess's name
        check: bool = True,
        timeout: float = KUBECTL_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl <args>`; with `check`, a non-zero exit raises LocalClusterError with stderr."""
        argv = [
            str(self.binary),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.cache_dir}",
            *args,
        ]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            # No KUBECONFIG from the caller's environment can point kubectl elsewhere.
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )
        if check and result.returncode != 0:
            raise LocalClusterError(
                f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result


def _htpasswd_line(username: str, password: str) -> str:
    """`user:bcrypt-hash`; distribution accepts only bcrypt. Cost 4 keeps each request ~1 ms."""
    try:
        import bcrypt
    except ImportError:
        htpasswd = shutil.which("htpasswd")
        if htpasswd is None:
            raise LocalClusterError(
                "registry auth needs the Python package bcrypt or the htpasswd tool "
                "(pip install bcrypt, or apt-get install apache2-utils)"
            ) from None
        # -i reads the password from stdin, so it never shows up in the process list.
        result = subprocess.run(
            [htpasswd, "-niB", "-C", "4", username],
            input=password,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LocalClusterError(f"htpasswd failed: {result.stderr.strip()}") from None
        return result.stdout.strip()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{username}:{hashed}"


class LocalRegistry:
    """Debian's `docker-registry` (distribution 2.8) on 127.0.0.1:<free port>.

    Plain HTTP unless `tls_cert`/`tls_key` are given (containerd pulls from localhost over plain
    HTTP); htpasswd auth when `username`/`password` are given. Storage lives in `<work_dir>/data`,
    deletes are enabled. `extra_config` is merged at the top level of the config (e.g.
    `notifications`, `proxy`); `env` is added to the process environment (e.g. SSL_CERT_FILE for a
    proxy upstream).
    """

    def __init__(
        self,
        work_dir: Path | str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        if (username is None) != (password is None):
            raise LocalClusterError("registry auth needs both username and password")
        if username is not None and ":" in username:
            raise LocalClusterError("a registry user name cannot contain ':'")
        if (tls_cert is None) != (tls_key is None):
            raise LocalClusterError("registry TLS needs both tls_cert and tls_key")
        self.work_dir = Path(work_dir)
        self.username = username
        self._password = password
        self.tls_cert = Path(tls_cert) if tls_cert is not None else None
        self.tls_key = Path(tls_key) if tls_key is not None else None
        self.port = port
        self.extra_config = dict(extra_config or {})
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.host = ""
        self.url = ""
        self.data_dir = self.work_dir / "data"
        self.config_file = self.work_dir / "config.yml"
        self._process: ChildProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process.popen if self._process is not None else None

    def _config(self, port: int) -> dict[str, Any]:
        http: dict[str, Any] = {
            "addr": f"127.0.0.1:{port}",
            # Signs upload state between requests; random per instance.
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls_cert is not None:
            http["tls"] = {"certificate": str(self.tls_cert), "key": str(self.tls_key)}
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": http,
        }
        if self.username is not None and self._password is not None:
            htpasswd = self.work_dir / "htpasswd"
            write_private(htpasswd, _htpasswd_line(self.username, self._password) + "\n")
            config["auth"] = {"htpasswd": {"realm": "mirrorgate-local", "path": str(htpasswd)}}
        config.update(self.extra_config)
        return config

    def start(self) -> Self:
        if self._process is not None:
            raise LocalClusterError("this LocalRegistry was already started")
        binary = shutil.which("docker-registry")
        if binary is None:
            raise LocalClusterError(
                "docker-registry is not installed: apt-get install docker-registry "
                "(Debian's build of the CNCF distribution registry)"
            )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        port = self.port or free_port()
        # JSON is valid YAML and quotes every path and value safely.
        write_private(self.config_file, json.dumps(self._config(port), indent=2) + "\n")
        self.host = f"127.0.0.1:{port}"
        self.url = f"{'https' if self.tls_cert else 'http'}://{self.host}"
        self._process = ChildProcess(
            "docker-registry",
            [binary, "serve", str(self.config_file)],
            log_path=self.work_dir / "registry.log",
            env=self.env,
        )
        try:
            # Any HTTP status (401 with auth) means it is serving.
            wait_until(
                lambda: http_answers(f"{self.url}/v2/"),
                what="docker-registry",
                timeout=self.start_timeout,
                processes=[self._process],
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the registry by the PID started here. Idempotent."""
        if self._process is not None:
            self._process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
