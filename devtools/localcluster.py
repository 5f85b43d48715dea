"""Throwaway local infrastructure for `mirrorgate demo` and the end-to-end test suite.

Owns running, on 127.0.0.1 only, a real Kubernetes control plane (`etcd` + `kube-apiserver`, no
scheduler or kubelet: pods are stored, never run) and a real container registry (Debian's
`docker-registry`, i.e. CNCF distribution). Each one lives in a work directory that holds its
configuration, data, logs and credentials; the processes are started with `subprocess.Popen` and
stopped by the PIDs started here.

No kind/k3s/envtest download is reachable, so the binaries come from the `KUBEBUILDER_ASSETS`
convention (a folder holding `kube-apiserver` and `etcd`) or from the cache that
`scripts/control-plane-assets` fills. Credentials (tokens, the registry password) are written to
files with mode 0600 and never logged.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import kubernetes.client
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

K8S_VERSION = "1.20.2"
# Matches RECIPE in scripts/control-plane-assets: a cache built by another recipe lives elsewhere.
ASSETS_RECIPE = 1
ASSET_BINARIES = ("kube-apiserver", "etcd")
STOP_GRACE_SECONDS = 10.0
_LOG_TAIL_LINES = 40


class LocalClusterError(RuntimeError):
    """A local control plane or registry could not be found, started or reached."""


def cache_root() -> Path:
    """The cache root: `MIRRORGATE_CACHE`, else `~/.cache/mirrorgate`."""
    configured = os.environ.get("MIRRORGATE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "mirrorgate"


def _has_assets(folder: Path) -> bool:
    return all(
        os.access(folder / name, os.X_OK) and (folder / name).is_file() for name in ASSET_BINARIES
    )


def find_assets() -> Path:
    """The folder holding executable `kube-apiserver` and `etcd`.

    `KUBEBUILDER_ASSETS` wins when it holds both; otherwise the cache filled by
    `scripts/control-plane-assets`.
    """
    searched = []
    env_assets = os.environ.get("KUBEBUILDER_ASSETS")
    if env_assets:
        if _has_assets(Path(env_assets)):
            return Path(env_assets)
        searched.append(f"KUBEBUILDER_ASSETS={env_assets}")
    cached = cache_root() / "control-plane" / f"k8s-{K8S_VERSION}-r{ASSETS_RECIPE}"
    if _has_assets(cached):
        return cached
    searched.append(str(cached))
    raise LocalClusterError(
        "no executable kube-apiserver and etcd found (looked in: " + ", ".join(searched) + "). "
        "Run scripts/control-plane-assets (builds kube-apiserver "
        f"{K8S_VERSION} once, about 5 minutes, needs root for apt) "
        "or set KUBEBUILDER_ASSETS to a folder holding both binaries."
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _write_private(path: Path, data: str | bytes) -> None:
    """Write a file only its owner can read: it holds a token, key or password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o600)


def _unverified_context() -> ssl.SSLContext:
    # Readiness probes only ask "is something answering?"; trust is checked by the real clients.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _Process:
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
                f"{self.log_path}:\n{_log_tail(self.log_path)}"
            )

    def stop(self) -> None:
        """Terminate, wait up to STOP_GRACE_SECONDS, then kill; always reap the child."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.pid)
                self.popen.kill()
                self.popen.wait()
        if not self._log.closed:
            self._log.close()


def _wait_until(
    ready: Callable[[], bool], *, what: str, timeout: float, processes: Sequence[_Process]
) -> None:
    """Poll `ready()` until true; a dead process or the timeout raises LocalClusterError."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            process.check_alive()
        if ready():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.log_path}:\n{_log_tail(p.log_path)}" for p in processes)
            raise LocalClusterError(f"{what} not ready after {timeout:.0f}s\n{tails}")
        time.sleep(0.1)


def _http_answers(
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
    TLS: with no serving certificate given, kube-apiserver 1.20 generates a throwaway CA and a
    serving certificate signed by it, and writes both (leaf, then CA) to
    `<work_dir>/certs/apiserver.crt`. Used as a CA bundle, that file lets clients verify the chain
    and the host name: the leaf carries the IP SAN 127.0.0.1 (and kubernetes.default.svc names, but
    not `localhost`), so `url` uses 127.0.0.1. Every client made here verifies both.
    """

    def __init__(
        self,
        work_dir: Path | str,
        *,
        assets: Path | None = None,
        start_timeout: float = 60.0,
        extra_apiserver_args: Sequence[str] = (),
    ) -> None:
        self.work_dir = Path(work_dir)
        self._assets = assets
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.admin_token = secrets.token_hex(24)
        self._users: dict[str, tuple[str, tuple[str, ...]]] = {
            "admin": (self.admin_token, ("system:masters",)),
        }
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self.etcd_url = ""
        self.url = ""
        self.cert_dir = self.work_dir / "certs"
        self.ca_file = self.cert_dir / "apiserver.crt"
        self.kubeconfig = self.work_dir / "kubeconfig"

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
        self._etcd = _Process(
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
        _wait_until(
            lambda: _http_answers(f"{self.etcd_url}/health", expect_ok=True),
            what="etcd",
            timeout=self.start_timeout,
            processes=[self._etcd],
        )

    def _start_apiserver(self, assets: Path) -> None:
        tokens_csv = self.work_dir / "tokens.csv"
        # token,user,uid[,"group1,group2"]: an empty fourth column would mean a group named "".
        _write_private(
            tokens_csv,
            "".join(
                f"{token},{name},{name}" + (f',"{",".join(groups)}"' if groups else "") + "\n"
                for name, (token, groups) in self._users.items()
            ),
        )
        sa_key = self.work_dir / "sa.key"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(
            sa_key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        )
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        self._apiserver = _Process(
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
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--allow-privileged=true",
                # No controller-manager runs, so nothing would create the default ServiceAccount.
                "--disable-admission-plugins=ServiceAccount",
                "--feature-gates=EphemeralContainers=true",
                *self.extra_apiserver_args,
            ],
            log_path=self.work_dir / "kube-apiserver.log",
        )
        auth = {"Authorization": f"Bearer {self.admin_token}"}
        _wait_until(
            lambda: _http_answers(f"{self.url}/readyz", headers=auth, expect_ok=True),
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

    def write_kubeconfig(self, path: Path | str, *, token: str, user: str = "user") -> Path:
        """Write a kubeconfig for `token` (JSON, which is valid YAML) with mode 0600."""
        if not self.url:
            raise LocalClusterError("the control plane is not started")
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "mirrorgate-local",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "mirrorgate-local",
                    "context": {"cluster": "mirrorgate-local", "user": user},
                }
            ],
            "current-context": "mirrorgate-local",
        }
        path = Path(path)
        _write_private(path, json.dumps(document, indent=2) + "\n")
        return path


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
        self._process: _Process | None = None

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
            _write_private(htpasswd, _htpasswd_line(self.username, self._password) + "\n")
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
        _write_private(self.config_file, json.dumps(self._config(port), indent=2) + "\n")
        self.host = f"127.0.0.1:{port}"
        self.url = f"{'https' if self.tls_cert else 'http'}://{self.host}"
        self._process = _Process(
            "docker-registry",
            [binary, "serve", str(self.config_file)],
            log_path=self.work_dir / "registry.log",
            env=self.env,
        )
        try:
            # Any HTTP status (401 with auth) means it is serving.
            _wait_until(
                lambda: _http_answers(f"{self.url}/v2/"),
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
