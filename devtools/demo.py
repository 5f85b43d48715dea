"""`mirrorgate demo`: the whole admission flow on one machine, without a cluster.

Starts a real kube-apiserver + etcd and a real registry (see ``localcluster``), runs ``mirrorgate
serve`` with a freshly issued certificate, registers it with a ``MutatingWebhookConfiguration``
(``clientConfig.url`` + ``caBundle``), creates pods through the API server and shows what was
stored. ``LocalWebhook`` is shared with the end-to-end
tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mirrorgate.certs.pki import generate_ca, issue_serving
from mirrorgate.deploy.config import load_config
from mirrorgate.deploy.webhooks import mutating_webhook_configuration
from mirrorgate.devtools.images import app_image, push_image
from mirrorgate.devtools.localcluster import (
    ControlPlane,
    Kubectl,
    LocalClusterError,
    LocalRegistry,
    find_kubectl,
    free_port,
)
from mirrorgate.devtools.node import LocalNode, NodeUnavailableError, node_unavailable_reason
from mirrorgate.webhook.adapters.kube import SyncKube, collection_path, resource_path, secret_path
from mirrorgate.webhook.adapters.registry import RegistryClient
from mirrorgate.webhook.core.config import RegistryAccess
from mirrorgate.webhook.core.mutation import ORIGINALS_ANNOTATION, decide_image
from mirrorgate.webhook.infra.logs import FLUSH_DELAY

OPT_IN_LABEL = "mirrorgate.io/enabled"
NAMESPACES = collection_path("v1", "Namespace")
DEMO_OWN_NAMESPACE = "mirrorgate"
SERVE_READY_TIMEOUT = 20.0


class LocalWebhook:
    """``mirrorgate serve`` as a child process on 127.0.0.1 with a CA and certificate made for
    it."""

    def __init__(
        self,
        work_dir: Path | str,
        config_file: Path | str,
        *,
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        args: Sequence[str] = (),
    ) -> None:
        self.work_dir = Path(work_dir)
        self.config_file = Path(config_file)
        self.env = dict(env or {})
        self.args = list(args)  # more `serve` flags, e.g. --lease-duration
        self.log_level = log_level
        self.port = 0
        self.metrics_port = 0
        self.ca_pem = b""
        self.log_file = self.work_dir / "serve.log"
        self.cert_file = self.work_dir / "tls.crt"
        self.key_file = self.work_dir / "tls.key"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    def start(self, *, port: int | None = None) -> Self:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.ca_pem:
            ca = generate_ca("mirrorgate-local-ca", days=2)
            pair = issue_serving(ca, ["127.0.0.1", "localhost"], days=1)
            self.ca_pem = ca.cert_pem
            self.cert_file.write_bytes(pair.cert_pem)
            self.key_file.touch(mode=0o600)
            self.key_file.write_bytes(pair.key_pem)
        self.port = port or self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        argv = [
            sys.executable,
            "-m",
            "mirrorgate.webhook.cli",
            "serve",
            "--config",
            str(self.config_file),
            "--tls-cert",
            str(self.cert_file),
            "--tls-key",
            str(self.key_file),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--log-level",
            self.log_level,
            *self.args,
        ]
        log = self.log_file.open("ab")
        try:
            self._process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Never the developer's own cluster by accident: without an explicit
                # KUBECONFIG the child gets none, and serves without Kubernetes API access.
                env={**os.environ, "KUBECONFIG": os.devnull, **self.env},
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        deadline = time.monotonic() + SERVE_READY_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise LocalClusterError(
                    f"mirrorgate serve exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LocalClusterError(f"mirrorgate serve not ready after {SERVE_READY_TIMEOUT}s")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._process = self._process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines logged so far (non-JSON lines are skipped).

        serve writes info lines in batches at most ``FLUSH_DELAY`` after they were logged
        (webhook.infra.logs); this waits that long first, so a line about what just happened is
        there.
        """
        time.sleep(FLUSH_DELAY + 0.03)
        out: list[dict[str, Any]] = []
        if not self.log_file.exists():
            return out
        for line in self.log_file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- the demo ------------------------------------------------------------------------------------

DEMO_PODS: list[dict[str, Any]] = [
    {
        "metadata": {"name": "storefront", "namespace": "shop", "labels": {"app": "storefront"}},
        "spec": {
            "initContainers": [
                {
                    "name": "migrate",
                    "image": "ghcr.io/acme/storefront-migrations:2.3.1",
                    # An init container must finish: it prints its line and exits.
                    "command": ["/bin/sh", "-c", 'echo "$APP_LINE (done)"'],
                }
            ],
            "containers": [
                {"name": "web", "image": "nginx:1.25.3"},
                {"name": "app", "image": "ghcr.io/acme/storefront:2.3.1"},
            ],
        },
    },
    {
        "metadata": {"name": "cache", "namespace": "shop"},
        "spec": {"containers": [{"name": "redis", "image": "redis:7.2@sha256:" + "3" * 64}]},
    },
    {
        "metadata": {"name": "metrics", "namespace": "shop"},
        "spec": {
            "containers": [
                {"name": "exporter", "image": "quay.io/prometheus/node-exporter:v1.7.0"},
                {"name": "typo", "image": "Prom/Statsd-Exporter:v0.26"},
            ]
        },
    },
    {
        "metadata": {"name": "legacy-app", "namespace": "legacy"},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.25.3"}]},
    },
]


# What the demo puts on its mirror before creating pods; redis is left out on purpose, to show
# what happens when the mirror cannot serve an image.
DEMO_MIRRORED = (
    "library/nginx:1.25.3",
    "ghcr/acme/storefront:2.3.1",
    "ghcr/acme/storefront-migrations:2.3.1",
)


def demo_config(registry_host: str, *, username_file: Path, password_file: Path) -> str:
    return textwrap.dedent(
        f"""\
        # Written by `mirrorgate demo`: docker.io and ghcr.io are mirrored on the local registry.
        mirrors:
          - upstream: docker.io
            mirror: {registry_host}
            type: hosted        # images are pushed to it; mirrorgate only reads
          - upstream: ghcr.io
            mirror: {registry_host}/ghcr
            type: hosted
        pullSecret: {{name: mirrorgate-pull}}
        namespaces:
          mode: optIn
          exclude: [kube-system]
        registries:
          {registry_host}:
            plainHTTP: true     # 127.0.0.1: containerd also pulls from it over plain HTTP
            auth: {{usernameFile: {username_file}, passwordFile: {password_file}}}
        verifyTimeout: 2s       # rewrite only what the mirror can serve, decided within 2 s
        """
    )


def demo_image(name: str) -> tuple[bytes, bytes, bytes]:
    """A tiny single-layer OCI image (layer, config, manifest) whose content names ``name``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = f"mirrorgate demo image {name}\n".encode()
        info = tarfile.TarInfo("etc/mirrorgate-demo")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest(),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    return layer, config, manifest


async def push_demo_images(host: str, access: RegistryAccess) -> None:
    """Tiny images that only exist to be admitted (no node here: nothing runs them)."""
    async with RegistryClient({host: access}) as client:
        for ref in DEMO_MIRRORED:
            repository, _, tag = ref.partition(":")
            layer, config, manifest = demo_image(ref)
            await client.upload_blob(host, repository, layer)
            await client.upload_blob(host, repository, config)
            await client.put_manifest(
                host, repository, tag, manifest, "application/vnd.oci.image.manifest.v1+json"
            )


def push_runnable_images(host: str, *, username: str, password: str) -> None:
    """For the node: a busybox app per mirrored image, built locally, printing which it is."""
    for ref in DEMO_MIRRORED:
        image = app_image(line=f"{ref} from the mirror: up and running", reference=f"demo/{ref}")
        push_image(image, f"{host}/{ref}", username=username, password=password)


def add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the whole flow locally: API server, registry, webhook, pods (no cluster needed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Start a real kube-apiserver + etcd, a real node (containerd, kubelet, kube-proxy,
            scheduler, controller-manager) and a real docker-registry on 127.0.0.1, run
            `mirrorgate serve` with a fresh certificate, register it with the API server, create an
            opted-in namespace and a few pods, and print what the API server stored (images before
            and after, pull secrets, the warnings a kubectl user would see) and what the node did
            with them (pod phase, container state, the registry each image was pulled from).

            Everything is real; only the internet is out of reach, so images the mirror does not
            have cannot be pulled. Where no node can run (not root, no cgroup v1, missing Debian
            packages) the demo says why and shows admission only.

            Needs the Kubernetes binaries (scripts/control-plane-assets builds and caches them;
            $KUBEBUILDER_ASSETS with kube-apiserver and etcd runs admission only) and Debian's
            docker-registry; scripts/setup installs everything."""
        ),
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running and print a kubeconfig; Ctrl-C stops it",
    )
    demo.add_argument(
        "--workdir",
        default=None,
        help="folder for configs, data and logs (default: a new temporary folder)",
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mirrorgate-demo-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    # SIGTERM stops the demo like Ctrl-C: everything started is stopped by the ExitStack.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ExitStack() as stack:
            _step(out, "starting kube-apiserver + etcd (real, v1.20)")
            plane = stack.enter_context(ControlPlane(workdir / "control-plane"))
            no_node = node_unavailable_reason()
            if no_node is None:
                _step(out, "starting a node: containerd, kubelet, kube-proxy, scheduler (v1.20)")
                try:
                    stack.enter_context(LocalNode(plane, workdir / "node"))
                except NodeUnavailableError as err:
                    no_node = str(err)
            if no_node is not None:
                _step(out, f"no node on this machine ({no_node}): pods are admitted, not run")
            _step(out, "starting docker-registry as the mirror (real, plain HTTP on 127.0.0.1)")
            password = secrets.token_urlsafe(18)
            registry = stack.enter_context(
                LocalRegistry(workdir / "registry", username="mirrorgate", password=password)
            )
            creds = workdir / "registry-credentials"
            creds.mkdir(exist_ok=True, mode=0o700)
            (creds / "username").write_text("mirrorgate\n")
            (creds / "password").touch(mode=0o600)
            (creds / "password").write_text(password + "\n")
            config_file = workdir / "mirrorgate.yaml"
            config_file.write_text(
                demo_config(
                    registry.host,
                    username_file=creds / "username",
                    password_file=creds / "password",
                )
            )
            config = load_config(config_file)
            _step(out, "pushing " + ", ".join(DEMO_MIRRORED) + " to the mirror")
            if no_node is None:
                push_runnable_images(registry.host, username="mirrorgate", password=password)
            else:
                asyncio.run(push_demo_images(registry.host, config.registries[registry.host]))
            _step(out, f"starting mirrorgate serve with {config_file}")
            kube = stack.enter_context(SyncKube(plane.api_client()))
            # serve holds its lease in its own namespace, which must exist.
            kube.create(NAMESPACES, {"metadata": {"name": DEMO_OWN_NAMESPACE}})
            env = {"KUBECONFIG": str(plane.kubeconfig), "POD_NAMESPACE": DEMO_OWN_NAMESPACE}
            webhook = stack.enter_context(LocalWebhook(workdir / "webhook", config_file, env=env))
            _run_demo(
                out,
                kube,
                webhook,
                registry,
                password,
                kubectl=plane.kubectl() if no_node is None else None,
            )
            if args.keep:
                kubectl = f"{find_kubectl()} --cache-dir {workdir / 'kubectl-cache'}"
                out.write(
                    f"\nEverything is still running. Try (Debian's kubectl 1.20, as the server):\n"
                    f"  export KUBECONFIG={plane.kubeconfig}\n"
                    f"  alias kubectl='{kubectl}'\n"
                    f"  kubectl get pods -A -o wide\n"
                    f"  kubectl run demo -n shop --image=ghcr.io/acme/storefront:2.3.1\n"
                    f"Logs and configs: {workdir}\nPress Ctrl-C to stop and clean up.\n"
                )
                out.flush()
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        out.write("\nstopped.\n")
    except LocalClusterError as err:
        print(f"mirrorgate demo: {err}", file=sys.stderr)
        return 2
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out.write("Cleaned up: every process the demo started is stopped.\n")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _step(out: Any, text: str) -> None:
    out.write(f"==> {text}\n")
    out.flush()


def _run_demo(
    out: Any,
    kube: SyncKube,
    webhook: LocalWebhook,
    registry: LocalRegistry,
    password: str,
    *,
    kubectl: Kubectl | None,
) -> None:
    """Register the webhook, create the demo pods, show what was stored and, with a node
    (``kubectl`` given), what the node did with them."""
    _step(
        out,
        f"registering the MutatingWebhookConfiguration (namespaces labelled {OPT_IN_LABEL}=true)",
    )
    hooks = mutating_webhook_configuration(
        "mirrorgate",
        url=webhook.url,
        ca_pem=webhook.ca_pem,
        namespace_selector={"matchLabels": {OPT_IN_LABEL: "true"}},
    )
    kube.create(collection_path(hooks["apiVersion"], hooks["kind"]), hooks)
    kube.create(NAMESPACES, {"metadata": {"name": "shop", "labels": {OPT_IN_LABEL: "true"}}})
    kube.create(NAMESPACES, {"metadata": {"name": "legacy"}})
    auth = base64.b64encode(f"mirrorgate:{password}".encode()).decode()
    dockerconfig = {"auths": {registry.host: {"auth": auth}}}
    kube.create(
        secret_path("shop"),
        {
            "metadata": {"name": "mirrorgate-pull"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {
                ".dockerconfigjson": base64.b64encode(json.dumps(dockerconfig).encode()).decode()
            },
        },
    )
    _step(out, "creating pods in 'shop' (opted in) and 'legacy' (not opted in)")
    config = load_config(webhook.config_file)
    rows: list[tuple[str, ...]] = []
    warnings: list[str] = []
    for manifest in DEMO_PODS:
        before = {c["name"]: c["image"] for c in _all_containers(manifest["spec"])}
        ns = manifest["metadata"]["namespace"]
        pods = collection_path("v1", "Pod", ns)
        for _attempt in range(50):
            # The API server picks up a new webhook configuration within about a second.
            probe, _ = kube.exchange("POST", pods, query={"dryRun": "All"}, body=manifest)
            if ns != "shop" or _was_mutated(probe):
                break
            time.sleep(0.2)
        stored, headers = kube.exchange("POST", pods, body=manifest)
        warnings.extend(_warnings(headers))
        pull = ",".join(s["name"] for s in stored["spec"].get("imagePullSecrets") or []) or "-"
        for c in _all_containers(stored["spec"]):
            submitted = before[c["name"]]
            if ns != "shop":
                why = "namespace not opted in: never sent to the webhook"
            elif c["image"] != submitted:
                why = _WHY["rewritten"]
            else:
                reason = decide_image(submitted, config).reason
                # Would have been rewritten, but the mirror check said no.
                why = _WHY["mirror-unavailable" if reason == "rewritten" else reason]
            rows.append(
                (
                    f"{ns}/{manifest['metadata']['name']}",
                    _short(submitted),
                    _short(c["image"]),
                    pull,
                    why,
                )
            )
    out.write(
        "\n" + _table(("POD", "IMAGE AS SUBMITTED", "IMAGE AS STORED", "PULL SECRETS", "WHY"), rows)
    )
    if warnings:
        out.write("\nWarnings the API server returned to the client (as kubectl prints them):\n")
        for w in warnings:
            out.write(f"  Warning: {w}\n")
    what = textwrap.dedent(
        f"""
        What happened: the API server sent each pod in 'shop' to mirrorgate. It asked the mirror
        {registry.host} for every image, rewrote those the mirror can serve, added the pull secret
        and recorded the originals in the annotation mirrorgate.io/original-images. redis is not on
        the mirror, so its pod keeps the original image instead of failing to pull from a mirror
        that lacks it. 'legacy' is not opted in, so the API server never asked.
        """
    )
    if kubectl is None:
        out.write(what + "There is no kubelet here: the pods are stored, not run.\n")
        return
    _step(out, "waiting for the node to pull and start the pods")
    names = [(m["metadata"]["namespace"], m["metadata"]["name"]) for m in DEMO_PODS]
    out.write("\n" + _table(NODE_COLUMNS, _node_rows(kube, names)) + "\n")
    for container in ("migrate", "web", "app"):
        logs = kubectl.run("logs", "-n", "shop", "storefront", "-c", container, check=False)
        line = (logs.stdout or logs.stderr).strip().splitlines()[-1:] or ["(no output)"]
        out.write(f"$ kubectl logs -n shop storefront -c {container}\n{line[0]}\n")
    out.write(
        what
        + textwrap.dedent(
            f"""
            On the node, containerd pulled the rewritten images from {registry.host} with the
            pull secret, and shop/storefront runs. The images that kept their upstream reference
            could only come from the internet, which this machine cannot reach, so those pods wait
            in ErrImagePull (then ImagePullBackOff): with a real upstream they would run as they
            did before mirrorgate. The kubelet refuses the invalid reference as well.
            """
        )
    )


_WHY = {
    "rewritten": "rewritten to the mirror",
    "mirror-unavailable": "mirror does not have it: kept, warned",
    "already-mirrored": "already on the mirror",
    "skipped": "matches a skip glob",
    "no-mirror": "no mirror configured for this registry",
    "invalid": "invalid reference: left alone, warned",
    "unmirrorable": "cannot be expressed on the mirror: left alone, warned",
}


NODE_COLUMNS = ("POD", "PHASE", "CONTAINER", "STATE", "PULLED FROM")
# Container states that will not change by waiting longer here (no internet to pull from).
_STUCK = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
POD_WAIT = 90.0


def _node_rows(kube: SyncKube, names: Sequence[tuple[str, str]]) -> list[tuple[str, ...]]:
    """Pod phase and, per container, its state and the registry its image came from, once each
    pod has settled (running, done, or stuck on an image it cannot get)."""
    deadline = time.monotonic() + POD_WAIT
    while True:
        pods = {(ns, n): kube.get(resource_path("v1", "Pod", n, namespace=ns)) for ns, n in names}
        if all(_settled(p) for p in pods.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    rows: list[tuple[str, ...]] = []
    for (ns, name), pod in pods.items():
        status = (pod or {}).get("status") or {}
        phase = str(status.get("phase") or "-")
        for cs in _container_statuses(status):
            # containerd reports the image it ran as <registry>/<repository>@<digest>.
            source = str(cs.get("imageID") or "").split("/", 1)[0] or "-"
            rows.append((f"{ns}/{name}", phase, str(cs.get("name")), _state(cs), source))
    return rows


def _container_statuses(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def _state(cs: Mapping[str, Any]) -> str:
    state = cs.get("state") or {}
    if "running" in state:
        return "running"
    if "terminated" in state:
        return f"terminated: {(state['terminated'] or {}).get('reason') or 'done'}"
    waiting = state.get("waiting") or {}
    return f"waiting: {waiting.get('reason') or 'starting'}"


def _settled(pod: Mapping[str, Any] | None) -> bool:
    status = (pod or {}).get("status") or {}
    statuses = _container_statuses(status)
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    if status.get("phase") == "Running" and all(
        "running" in (c.get("state") or {}) for c in status.get("containerStatuses") or []
    ):
        return True
    return bool(statuses) and any(
        ((c.get("state") or {}).get("waiting") or {}).get("reason") in _STUCK for c in statuses
    )


def _short(image: str) -> str:
    """Abbreviate a digest for the table: the full reference is in the stored pod."""
    name, at, digest = image.partition("@")
    if at and len(digest) > 19:
        return f"{name}@{digest[:19]}..."
    return image


def _was_mutated(pod: Mapping[str, Any]) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return ORIGINALS_ANNOTATION in annotations


def _all_containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for fld in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(fld) or []


def _warnings(headers: Mapping[str, str]) -> list[str]:
    """Decode ``Warning: 299 - "text"`` response headers (RFC 7234) into their texts."""
    raw = headers.get("Warning") or headers.get("warning")
    if not raw:
        return []
    return parse_warning_header(raw)


def parse_warning_header(raw: str) -> list[str]:
    out: list[str] = []
    i = 0
    while True:
        start = raw.find('"', i)
        if start == -1:
            return out
        j = start + 1
        text = []
        while j < len(raw) and raw[j] != '"':
            if raw[j] == "\\" and j + 1 < len(raw):
                j += 1
            text.append(raw[j])
            j += 1
        out.append("".join(text))
        i = j + 1


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"
