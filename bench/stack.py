"""The processes the benchmark runs, where they run, and the state it puts in them.

Owns: choosing cores; the two servers under test (``mirrorgate serve`` and ``bench.baseline``), each
a child process started as ``taskset -c <core> python -m ...`` on 127.0.0.1 with one certificate
made for the run, and stopped by its PID; the real docker-registry (TLS + htpasswd, with Prometheus
debug metrics and an access log, via ``tests.helpers.registries.HarnessRegistry``) the mirrors point
at; the Clair v4 stand-in (``tests.helpers.clair_standin``); pushing images; and the mirrorgate.yaml
that ties them together.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import secrets
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirrorgate.certs.pki import generate_ca, issue_serving
from mirrorgate.devtools.localcluster import free_port
from mirrorgate.webhook.adapters.registry import OCI_INDEX, OCI_MANIFEST, RegistryClient
from mirrorgate.webhook.core.config import RegistryAccess
from tests.helpers.clair_standin import ClairStandIn
from tests.helpers.registries import Credentials, HarnessRegistry, write_registry_pki

PROJECT_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


class StackError(RuntimeError):
    """A process of the benchmark could not be started or did not become ready."""


@dataclass(frozen=True, slots=True)
class Cores:
    """``server``: where each server under test runs; ``load``: load generator, registry, Clair."""

    server: int | None
    load: int | None

    @property
    def pinned(self) -> bool:
        return self.server is not None

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (fewer than 2 usable cores): numbers are only indicative"
        return (
            f"servers under test: core {self.server} (one at a time); load generator, "
            f"docker-registry, Clair stand-in and this process: core {self.load}"
        )


def choose_cores() -> Cores:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return Cores(None, None)
    return Cores(server=usable[0], load=usable[1])


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise StackError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True, slots=True)
class ServingPKI:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def write_serving_pki(directory: Path) -> ServingPKI:
    """One CA and one serving certificate for 127.0.0.1, shared by both servers under test."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = generate_ca("mirrorgate-bench-ca", days=2)
    pair = issue_serving(ca, ["127.0.0.1", "localhost"], days=1)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(pair.cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(pair.key_pem)
    return ServingPKI(ca.cert_pem, cert_file, key_file)


class PinnedServer:
    """One server under test: ``taskset -c core <argv>``, its log, readiness and RSS."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        core: int | None,
        work_dir: Path,
        ca_pem: bytes,
        env: Mapping[str, str] | None = None,
        metrics_url: str | None = None,
    ) -> None:
        self.name = name
        self.metrics_url = metrics_url
        self.argv = list(argv)
        self.port = port
        self.core = core
        self.work_dir = work_dir
        self.ca_pem = ca_pem
        self.env = dict(env or {})
        self.log_file = work_dir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise StackError(f"{self.name} is not running")
        return self._process.pid  # taskset execs the server: same PID

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def start(self) -> PinnedServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        pin = ["taskset", "-c", str(self.core)] if self.core is not None else []
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [*pin, *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.work_dir,
                env={**os.environ, **self.env},
            )
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise StackError(
                    f"{self.name} exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=context, timeout=2):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"{self.name} not ready after {READY_TIMEOUT:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL after STOP_TIMEOUT; always reaped. Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


def import_tree(checkout: Path, work_dir: Path) -> Path:
    """A folder that imports as the ``mirrorgate`` package of ``checkout``: setuptools maps the
    card's folders under the one import root, a path entry needs them where the name says."""
    root = work_dir / "import-tree"
    (root / "mirrorgate").mkdir(parents=True, exist_ok=True)
    for pkg in ("webhook", "deploy", "certs"):
        if not (checkout / pkg / "__init__.py").is_file():
            raise FileNotFoundError(f"{checkout} is not a mirrorgate checkout (no {pkg}/)")
        link = root / "mirrorgate" / pkg
        link.unlink(missing_ok=True)
        link.symlink_to((checkout / pkg).resolve())
    return root


def _python_env(checkout: str | None, work_dir: Path) -> dict[str, str]:
    # The servers run with cwd = their work dir, so the project must be on the path explicitly;
    # a modified checkout's import tree goes first and wins over the installed package.
    extra = str(import_tree(Path(checkout), work_dir)) if checkout else None
    paths = [p for p in (extra, str(PROJECT_ROOT)) if p]
    current = os.environ.get("PYTHONPATH")
    if current:
        paths.append(current)
    return {"PYTHONPATH": os.pathsep.join(paths)}


def mirrorgate_server(
    work_dir: Path,
    *,
    config_file: Path,
    pki: ServingPKI,
    core: int | None,
    pythonpath: str | None = None,
    log_level: str = "info",
    args: Sequence[str] = (),
) -> PinnedServer:
    port, metrics_port = free_port(), free_port()
    return PinnedServer(
        "mirrorgate",
        [
            sys.executable,
            "-m",
            "mirrorgate.webhook.cli",
            "serve",
            "--config",
            str(config_file),
            "--tls-cert",
            str(pki.cert_file),
            "--tls-key",
            str(pki.key_file),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            "--log-level",
            log_level,
            *args,
        ],
        port=port,
        core=core,
        work_dir=work_dir,
        ca_pem=pki.ca_pem,
        env=_python_env(pythonpath, work_dir),
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )


def baseline_server(
    work_dir: Path,
    *,
    pki: ServingPKI,
    core: int | None,
    uvloop: bool = False,
    pythonpath: str | None = None,
) -> PinnedServer:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.baseline",
        "--tls-cert",
        str(pki.cert_file),
        "--tls-key",
        str(pki.key_file),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    if uvloop:
        argv.append("--uvloop")
    return PinnedServer(
        "baseline",
        argv,
        port=port,
        core=core,
        work_dir=work_dir,
        ca_pem=pki.ca_pem,
        env=_python_env(pythonpath, work_dir),
    )


def metric_total(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on a Prometheus text page whose labels include ``labels``."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


# --- images ---------------------------------------------------------------------------------------


def _layer(seed: str) -> tuple[bytes, str]:
    """A gzip tar layer whose content names ``seed``; returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = f"mirrorgate bench image {seed}\n".encode()
        info = tarfile.TarInfo("etc/mirrorgate-bench")
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0), "sha256:" + hashlib.sha256(
        raw.getvalue()
    ).hexdigest()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class PushedImage:
    repository: str
    tag: str
    digest: str  # what the tag resolves to: the index digest for a multi-arch image
    manifests: tuple[str, ...]  # the platform manifests Clair indexes


async def push_image(
    client: RegistryClient, host: str, repository: str, tag: str, *, multi: bool
) -> PushedImage:
    """Push a tiny OCI image (an index of linux/amd64 + linux/arm64 when ``multi``)."""
    platforms = (("linux", "amd64"), ("linux", "arm64")) if multi else (("linux", "amd64"),)
    descriptors = []
    for os_name, arch in platforms:
        layer, diff_id = _layer(f"{repository}:{tag} {os_name}/{arch}")
        config = json.dumps(
            {
                "architecture": arch,
                "os": os_name,
                "config": {"Cmd": ["/bin/true"]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode()
        await client.upload_blob(host, repository, layer)
        await client.upload_blob(host, repository, config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": _digest(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": _digest(layer),
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        digest = _digest(manifest)
        reference = digest if multi else tag
        await client.put_manifest(host, repository, reference, manifest, OCI_MANIFEST)
        descriptors.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest),
                "platform": {"os": os_name, "architecture": arch},
            }
        )
    if not multi:
        digest = descriptors[0]["digest"]
        return PushedImage(repository, tag, digest, (digest,))
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    ).encode()
    await client.put_manifest(host, repository, tag, index, OCI_INDEX)
    return PushedImage(repository, tag, _digest(index), tuple(d["digest"] for d in descriptors))


# --- registry, Clair and the config ------------------------------------------------------------


@dataclass
class Backends:
    """The registry (the mirror) and Clair, and the files mirrorgate reads to reach them."""

    work_dir: Path
    registry: HarnessRegistry
    clair: ClairStandIn
    access: RegistryAccess
    psk_file: Path
    token_file: Path
    pushed: dict[str, PushedImage] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.registry.host

    def push(self, images: Sequence[tuple[str, str, bool]]) -> list[PushedImage]:
        """Push ``(repository, tag, multi)`` images; remember them by ``repository:tag``."""

        async def go() -> list[PushedImage]:
            async with RegistryClient({self.host: self.access}) as client:
                return [
                    await push_image(client, self.host, repo, tag, multi=multi)
                    for repo, tag, multi in images
                ]

        out = asyncio.run(go())
        for image in out:
            self.pushed[f"{image.repository}:{image.tag}"] = image
        return out

    def close(self) -> None:
        self.clair.stop()
        self.registry.stop()


def start_backends(work_dir: Path, *, index_delay: float = 0.0) -> Backends:
    work_dir.mkdir(parents=True, exist_ok=True)
    pki = write_registry_pki(work_dir / "registry-pki")
    credentials = Credentials.random("mirrorgate")
    registry = HarnessRegistry(work_dir / "registry", pki=pki, credentials=credentials)
    registry.start()
    psk = base64.b64encode(secrets.token_bytes(32)).decode()
    clair = ClairStandIn(psk, ["mirrorgate"], ca_file=pki.ca_file, index_delay=index_delay)
    try:
        clair.start()
    except BaseException:
        registry.stop()
        raise
    secrets_dir = work_dir / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    files = {
        "username": credentials.username,
        "password": credentials.password,
        "clair-psk": psk,
        "events-token": secrets.token_urlsafe(24),
    }
    for name, value in files.items():
        path = secrets_dir / name
        path.touch(mode=0o600)
        path.write_text(value + "\n")
    access = RegistryAccess(
        ca_file=str(pki.ca_file),
        username_file=str(secrets_dir / "username"),
        password_file=str(secrets_dir / "password"),
    )
    return Backends(
        work_dir=work_dir,
        registry=registry,
        clair=clair,
        access=access,
        psk_file=secrets_dir / "clair-psk",
        token_file=secrets_dir / "events-token",
    )


def write_config(backends: Backends, path: Path, *, prefixes: Mapping[str, str]) -> Path:
    """A production-shaped mirrorgate.yaml: verifying hosted mirrors on a TLS registry with
    credentials, and the vulnerability gate on Clair.

    Cache lifetimes are raised from the defaults (60 s registry answers) to 10 minutes so that a
    full run measures the warm path throughout; the registry is asked again only when they expire.
    """
    host = backends.host
    access = backends.access
    mirrors = [
        {
            "upstream": upstream,
            "mirror": f"{host}/{prefix}" if prefix else host,
            "type": "hosted",
            "verify": True,
        }
        for upstream, prefix in prefixes.items()
    ]
    config: dict[str, Any] = {
        "mirrors": mirrors,
        "skip": ["registry.example.org/*", "docker.io/library/hello-world:*"],
        "pullSecret": {"name": "mirrorgate-pull"},
        "namespaces": {"mode": "optIn", "exclude": ["kube-system", "monitoring"]},
        "registries": {
            host: {
                "caFile": access.ca_file,
                "auth": {
                    "usernameFile": access.username_file,
                    "passwordFile": access.password_file,
                },
            }
        },
        "verifyTimeout": "2s",
        "registryClient": {
            "timeout": "5s",
            "maxConcurrency": 32,
            "positiveTTL": "10m",
            "negativeTTL": "10s",
            "maxEntries": 10000,
        },
        "scan": {
            "clair": {
                "url": backends.clair.url,
                "pskFile": str(backends.psk_file),
                "issuer": "mirrorgate",
            },
            "blockSeverity": "High",
            "fixableOnly": False,
            "allow": [
                {
                    "id": "CVE-2024-1234",
                    "images": ["*/library/nginx*"],
                    "until": "2099-12-31",
                    "reason": "the vulnerable code path is not reachable",
                }
            ],
            "onPending": "deny",
            "onUnavailable": "warn",
            "admissionBudget": "3s",
            "verdictTTL": "10m",
            "mode": "enforce",
            "events": {"tokenFile": str(backends.token_file)},
        },
    }
    # JSON is YAML; every path and host is quoted safely.
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
