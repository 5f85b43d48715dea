"""`mirrorgate deploy` against the real kube-apiserver 1.20, real docker-registry and real serve.

- apply creates every rendered object, a second apply changes nothing (not even resourceVersions),
  a smaller config prunes what it no longer renders, status reports, uninstall removes the webhook
  configurations first and keeps only what --keep-data keeps;
- the rendered registry configs run under the real docker-registry (paths and ports adjusted), take
  a skopeo push with the rendered htpasswd credentials, mirror a local upstream, and notify the
  webhook of pushes over TLS with the rendered token and CA;
- `deploy apply --webhook-url` + a local serve (running with only the rendered RBAC) rewrites and
  gates pods in an opted-in namespace;
- a CA rotation while serving: a request loop through the API server sees no failure and the
  webhook configurations trust old and new CA while the serving certificate switches.

There is no controller manager: deleted namespaces and claims stay Terminating here, so every test
uses namespaces of its own (prefix e2e-deploy-) and a release name of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from mirrorgate.certs.pki import load_certificates, signed_by
from mirrorgate.certs.rotation import RenewalPolicy
from mirrorgate.deploy.config import load_config
from mirrorgate.devtools.demo import LocalWebhook
from mirrorgate.devtools.localcluster import ControlPlane, free_port
from mirrorgate.webhook.adapters.kube import Kube, SyncKube
from mirrorgate.webhook.controllers.certs import CertRenewal, CertRenewer
from tests.helpers.clair_standin import ClairStandIn
from tests.helpers.cluster import WEBHOOK_USER
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.kubehttp import KubeHTTP
from tests.helpers.registries import (
    Credentials,
    HarnessRegistry,
    push_image,
    sha256_digest,
    skopeo_inspect_raw,
)
from tests.helpers.waiting import node_ports, wait_for

OPT_IN = "mirrorgate.io/enabled"
MANAGED = "app.kubernetes.io/managed-by=mirrorgate"
HOOKS = "/apis/admissionregistration.k8s.io/v1"
RBAC = "/apis/rbac.authorization.k8s.io/v1"


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [mirrorgate_exe(), *args], capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def pod(name: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": image}]},
    }


def managed(kube: SyncKube, release: str) -> list[str]:
    """Every object labelled as installed by `release` that is not already being deleted."""
    from mirrorgate.deploy.apply import capabilities, installed

    caps, _ = capabilities(kube)
    return sorted(
        f"{o['kind']} {o['metadata'].get('namespace', '')}/{o['metadata']['name']}"
        for o in installed(kube, caps, release)
    )


def versions(kube: SyncKube, release: str) -> dict[str, str]:
    from mirrorgate.deploy.apply import capabilities, installed

    caps, _ = capabilities(kube)
    return {
        f"{o['kind']} {o['metadata'].get('namespace', '')}/{o['metadata']['name']}": o["metadata"][
            "resourceVersion"
        ]
        for o in installed(kube, caps, release)
    }


def secret_value(kube: SyncKube, namespace: str, name: str, key: str) -> bytes:
    obj = kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    assert obj is not None, f"Secret {namespace}/{name} missing"
    return base64.b64decode(obj["data"][key])


def finish_namespace_deletion(kube: SyncKube, name: str) -> None:
    """What the namespace controller (not running here) does once a namespace is empty: drop
    its finalizer, so the namespace goes away."""
    live = kube.get(f"/api/v1/namespaces/{name}")
    assert live is not None and live["metadata"].get("deletionTimestamp")
    remaining = kube.list(f"/api/v1/namespaces/{name}/secrets") + kube.list(
        f"/api/v1/namespaces/{name}/configmaps"
    )
    assert remaining == [], "uninstall left objects in the namespace"
    kube.request("PUT", f"/api/v1/namespaces/{name}/finalize", body={**live, "spec": {}})
    wait_for(lambda: kube.get(f"/api/v1/namespaces/{name}") is None, f"namespace {name} to go")


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> Iterator[SyncKube]:
    with SyncKube.from_kubeconfig(str(control_plane.kubeconfig)) as k:
        yield k


@pytest.fixture(scope="module")
def kapi(control_plane: ControlPlane) -> KubeHTTP:
    return KubeHTTP(control_plane.url, control_plane.admin_token, str(control_plane.ca_file))


# --- apply, apply again, prune, status, uninstall ---------------------------------------------
def lifecycle_config(suffix: str, ports: list[int], *, with_ghcr: bool = True) -> str:
    ghcr = (
        f"    - {{upstream: ghcr.io, remoteURL: https://ghcr.io, nodePort: {ports[2]}}}\n"
        if with_ghcr
        else ""
    )
    return (
        f"pullSecret: {{name: mirrorgate-pull, source: e2e-deploy-{suffix}-reg/mirrorgate-pull}}\n"
        "namespaces: {mode: optIn}\n"
        "registry:\n"
        f"  namespace: e2e-deploy-{suffix}-reg\n"
        f"  nodePort: {ports[0]}\n"
        "  auth: {bcryptCost: 4}\n"
        "  storage: {filesystem: {size: 1Gi}}\n"
        "  proxies:\n"
        "    - {upstream: docker.io, remoteURL: https://registry-1.docker.io, "
        f"nodePort: {ports[1]}}}\n"
        + ghcr
        + "  ingress: {host: registry.example.org, tls: {issuer: letsencrypt}}\n"
        f"deploy: {{name: e2e-deploy-{suffix}, namespace: e2e-deploy-{suffix}-mg}}\n"
        "scan:\n"
        "  clair: {url: 'http://clair.invalid:6060', pskFile: /etc/mirrorgate/clair/psk}\n"
    )


def test_apply_is_idempotent_prunes_reports_status_and_uninstalls_webhooks_first(
    kube, kapi, control_plane, tmp_path
):
    suffix = secrets.token_hex(3)
    release, reg_ns = f"e2e-deploy-{suffix}", f"e2e-deploy-{suffix}-reg"
    ports = node_ports(3)
    config = tmp_path / "mirrorgate.yaml"
    config.write_text(lifecycle_config(suffix, ports))
    kc = str(control_plane.kubeconfig)
    probe_ns = f"e2e-deploy-{suffix}-apps"
    kapi.create_namespace(probe_ns, {OPT_IN: "true"})
    try:
        first = run("deploy", "apply", "--config", str(config), "--kubeconfig", kc)
        created = re.findall(r"^created\s+(.+)$", first.stdout, re.M)
        assert len(created) == 37, first.stdout  # everything but the monitoring objects
        assert created[0] == f"Namespace {release}-mg"
        assert created[-2:] == [
            f"MutatingWebhookConfiguration {release}",
            f"ValidatingWebhookConfiguration {release}",
        ]
        assert "ServiceMonitor and PrometheusRule skipped" in first.stdout
        assert "registry password: generated" in first.stdout
        password = secret_value(kube, reg_ns, "registry-credentials", "password").decode()
        assert password not in first.stdout + first.stderr
        pdb = kube.get(
            f"/apis/policy/v1beta1/namespaces/{release}-mg/poddisruptionbudgets/{release}"
        )
        cron = kube.get(f"/apis/batch/v1beta1/namespaces/{reg_ns}/cronjobs/registry-gc")
        assert pdb is not None and cron is not None  # 1.20 serves them only as v1beta1

        before = versions(kube, release)
        second = run("deploy", "apply", "--config", str(config), "--kubeconfig", kc)
        assert "0 changed, 37 unchanged" in second.stdout, second.stdout
        assert not re.search(r"^(created|configured|deleted)", second.stdout, re.M)
        assert versions(kube, release) == before  # not even a resourceVersion moved

        # One cache fewer: its workload goes, its volume stays until uninstall.
        config.write_text(lifecycle_config(suffix, ports, with_ghcr=False))
        third = run("deploy", "apply", "--config", str(config), "--kubeconfig", kc)
        assert f"deleted    Deployment {reg_ns}/registry-proxy-ghcr-io (no longer rendered)" in (
            third.stdout
        )
        assert f"kept       PersistentVolumeClaim {reg_ns}/registry-proxy-ghcr-io-data" in (
            third.stdout
        )
        # The pull secret no longer names the removed cache's host.
        auths = json.loads(secret_value(kube, reg_ns, "mirrorgate-pull", ".dockerconfigjson"))
        assert sorted(auths["auths"]) == sorted(f"127.0.0.1:{p}" for p in ports[:2])

        status = run(
            "deploy",
            "status",
            "--config",
            str(config),
            "--kubeconfig",
            kc,
            "--json",
            "--probe-namespace",
            probe_ns,
            check=False,
        )
        doc = json.loads(status.stdout)
        assert doc["server"] == "v1.20.2" and doc["installed"] is True
        assert {h["webhook"]: h["failurePolicy"] for h in doc["webhooks"]} == {
            "mutate.mirrorgate.io": "Ignore",
            "validate.mirrorgate.io": "Fail",
        }
        assert doc["certificates"]["serving"]["names"][2] == f"{release}.{release}-mg.svc"
        assert {w["name"]: w["images"] for w in doc["workloads"]}[
            f"Deployment {release}-mg/{release}"
        ] == ["mirrorgate:0.1.0"]
        # No pod runs here (no kubelet), so the API server cannot reach the webhook: status says
        # so and exits 1.
        assert status.returncode == 1
        assert doc["reachability"]["probed"] is True and doc["reachability"]["reachable"] is False
        assert 'failed calling webhook "validate.mirrorgate.io"' in doc["reachability"]["detail"]

        # Nothing runs pods here: --wait names what is not ready and fails.
        waited = run(
            "deploy",
            "apply",
            "--config",
            str(config),
            "--kubeconfig",
            kc,
            "--wait",
            "--timeout",
            "1",
            check=False,
        )
        assert waited.returncode == 1
        assert f"Deployment {reg_ns}/registry 0/1 available" in waited.stderr

        kept = run(
            "deploy", "uninstall", "--config", str(config), "--kubeconfig", kc, "--keep-data"
        )
        lines = kept.stdout.splitlines()
        assert lines[0] == f"deleted    MutatingWebhookConfiguration {release}"
        assert lines[1] == f"deleted    ValidatingWebhookConfiguration {release}"
        assert managed(kube, release) == [
            f"Namespace /{reg_ns}",
            f"PersistentVolumeClaim {reg_ns}/registry-data",
            f"PersistentVolumeClaim {reg_ns}/registry-proxy-docker-io-data",
            f"PersistentVolumeClaim {reg_ns}/registry-proxy-ghcr-io-data",
            f"Secret {reg_ns}/registry-credentials",
        ]
        # Reinstalling over kept data keeps the password, once the webhook's namespace is gone.
        early = run("deploy", "apply", "--config", str(config), "--kubeconfig", kc, check=False)
        assert early.returncode == 1
        assert f"namespace {release}-mg is still being deleted" in early.stderr
        finish_namespace_deletion(kube, f"{release}-mg")
        run("deploy", "apply", "--config", str(config), "--kubeconfig", kc)
        again = secret_value(kube, reg_ns, "registry-credentials", "password").decode()
        assert again == password
    finally:
        run("deploy", "uninstall", "--config", str(config), "--kubeconfig", kc)
    assert managed(kube, release) == []
    assert kube.get(f"{HOOKS}/mutatingwebhookconfigurations/{release}") is None


# --- certificate rotation while serving ---------------------------------------------------------
class Kubelet:
    """Projects the TLS Secret's serving pair into files the way the kubelet updates a mounted
    Secret: a new timestamped folder, then one atomic swap of the ``..data`` symlink."""

    def __init__(self, kube: SyncKube, namespace: str, name: str, root: Path) -> None:
        self.kube, self.path, self.root = (
            kube,
            f"/api/v1/namespaces/{namespace}/secrets/{name}",
            root,
        )
        root.mkdir(parents=True, exist_ok=True)
        self.version = ""
        self.stop = threading.Event()
        self.sync()
        for key in ("tls.crt", "tls.key"):
            (root / key).symlink_to(f"..data/{key}")
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def sync(self) -> None:
        secret = self.kube.get(self.path)
        assert secret is not None
        if secret["metadata"]["resourceVersion"] == self.version:
            return
        folder = self.root / f"..{time.monotonic_ns()}"
        folder.mkdir()
        for key in ("tls.crt", "tls.key"):
            (folder / key).write_bytes(base64.b64decode(secret["data"][key]))
        link = self.root / "..data_tmp"
        link.symlink_to(folder.name)
        os.replace(link, self.root / "..data")
        self.version = secret["metadata"]["resourceVersion"]

    def loop(self) -> None:
        while not self.stop.wait(0.2):
            self.sync()


def admitted(kapi: KubeHTTP, namespace: str) -> bool:
    """A dry-run pod came back rewritten: the API server called the webhook over TLS."""
    reply = kapi.create_pod(namespace, pod("probe", "nginx:1.25"), dry_run=True)
    assert reply.status == 201, reply.body
    return reply.body["spec"]["containers"][0]["image"] == "127.0.0.1:31999/library/nginx:1.25"


def served_certificate(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def test_a_ca_rotation_while_serving_fails_no_request_and_overlaps_the_ca_bundle(
    kube, kapi, control_plane, tmp_path
):
    suffix = secrets.token_hex(3)
    release, ns = f"e2e-deploy-rot-{suffix}", f"e2e-deploy-rot-{suffix}"
    port = free_port()
    config = tmp_path / "mirrorgate.yaml"
    config.write_text(
        "mirrors: [{upstream: docker.io, mirror: '127.0.0.1:31999', verify: false}]\n"
        "namespaces: {mode: optIn}\n"
        f"deploy: {{name: {release}, namespace: {ns}}}\n"
        "certs: {rotationOverlap: 2s}\n"
    )
    kc = str(control_plane.kubeconfig)
    url = f"https://127.0.0.1:{port}"
    run("deploy", "apply", "--config", str(config), "--kubeconfig", kc, "--webhook-url", url)
    apps = f"{ns}-apps"
    kapi.create_namespace(apps, {OPT_IN: "true"})
    kubelet = Kubelet(kube, ns, f"{release}-tls", tmp_path / "tls")
    wh = LocalWebhook(tmp_path / "serve", config, args=["--cert-reload-interval", "0.2"])
    wh.cert_file, wh.key_file = tmp_path / "tls" / "tls.crt", tmp_path / "tls" / "tls.key"
    secret = kube.get(f"/api/v1/namespaces/{ns}/secrets/{release}-tls")
    wh.ca_pem = base64.b64decode(secret["data"]["ca.crt"])
    old_ca = load_certificates(wh.ca_pem)[0]
    hook_path = f"{HOOKS}/mutatingwebhookconfigurations/{release}"

    def bundle() -> list[x509.Certificate]:
        obj = kube.get(hook_path)
        return load_certificates(base64.b64decode(obj["webhooks"][0]["clientConfig"]["caBundle"]))

    results: list[bool] = []
    stop = threading.Event()

    def admit_continuously() -> None:
        while not stop.is_set():
            try:
                results.append(admitted(kapi, apps))
            except Exception:  # an API error is a failed request too
                results.append(False)

    async def rotate(observed: list[int]) -> None:
        # What the running webhook does (see docs/deploy.md: wiring it into serve).
        certs = load_config(config).certs
        policy = RenewalPolicy.from_seconds(
            ca=certs.ca_duration, serving=certs.serving_duration, overlap=certs.rotation_overlap
        )
        renewer = CertRenewer.for_release(
            Kube(control_plane.api_client()),
            CertRenewal(release=release, namespace=ns, policy=policy),
            interval=0.25,
        )
        async with renewer.running():
            run("certs", "rotate-ca", "--config", str(config), "--kubeconfig", kc)
            deadline = time.monotonic() + 30
            while True:
                count = len(await asyncio.to_thread(bundle))
                if not observed or observed[-1] != count:
                    observed.append(count)
                if observed[-3:] == [1, 2, 1]:
                    break
                assert time.monotonic() < deadline, observed
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # requests keep flowing after the old CA is gone

    loop_thread = threading.Thread(target=admit_continuously, daemon=True)
    try:
        wh.port = port  # the port the applied webhook configurations name
        with wh:
            wait_for(lambda: admitted(kapi, apps), "the webhook to take effect")
            assert signed_by(served_certificate(port), old_ca)
            loop_thread.start()
            observed: list[int] = []
            asyncio.run(rotate(observed))
            stop.set()
            loop_thread.join(timeout=30)
            new_ca = bundle()
            assert len(new_ca) == 1 and new_ca[0] != old_ca
            assert signed_by(served_certificate(port), new_ca[0])
    finally:
        stop.set()
        kubelet.stop.set()
        run("deploy", "uninstall", "--config", str(config), "--kubeconfig", kc, check=False)
    # caBundle went from one CA to old + new (published before the switch), then to the new one.
    assert observed == [1, 2, 1]
    assert len(results) >= 20 and all(results), f"{results.count(False)} of {len(results)} failed"


# --- the rendered registries and an out-of-cluster serve --------------------------------------
# These run last in the module: the stack's webhook configurations (validating: Fail) stay
# registered until the module ends, and they select every opted-in namespace.
class RenderedRegistry:
    """A registry Deployment of `deploy render` run under the real docker-registry: its
    config.yml from the ConfigMap, its environment from the Secrets, paths and port adjusted."""

    def __init__(self, work: Path, manifests: list[dict[str, Any]], name: str, **adjust: Any):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        by_key = {(o["kind"], o["metadata"]["name"]): o for o in manifests}
        deployment = by_key[("Deployment", name)]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        config = yaml.safe_load(by_key[("ConfigMap", f"{name}-config")]["data"]["config.yml"])
        self.port = adjust["port"]
        config["http"]["addr"] = f"127.0.0.1:{self.port}"
        config["storage"]["filesystem"]["rootdirectory"] = str(work / "data")
        htpasswd_secret = by_key[("Secret", volumes["htpasswd"]["secret"]["secretName"])]
        (work / "htpasswd").write_bytes(base64.b64decode(htpasswd_secret["data"]["htpasswd"]))
        config["auth"]["htpasswd"]["path"] = str(work / "htpasswd")
        if "remoteurl" in adjust:
            config["proxy"]["remoteurl"] = adjust["remoteurl"]
        self.config = config
        env = {}
        for item in container["env"]:
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = base64.b64decode(
                    by_key[("Secret", ref["name"])]["data"][ref["key"]]
                ).decode()
            else:
                env[item["name"]] = item["value"]
        if "SSL_CERT_DIR" in env:
            ca_dir = work / "webhook-ca"
            ca_dir.mkdir(exist_ok=True)
            ca_map = by_key[("ConfigMap", volumes["webhook-ca"]["configMap"]["name"])]
            (ca_dir / "ca.crt").write_text(ca_map["data"]["ca.crt"])
            env["SSL_CERT_DIR"] = env["SSL_CERT_DIR"].replace("/etc/mirrorgate-ca", str(ca_dir))
        self.env = env
        (work / "config.yml").write_text(json.dumps(config))
        self.log = work / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"

    def start(self) -> RenderedRegistry:
        binary = shutil.which("docker-registry")
        assert binary, "apt-get install docker-registry"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "serve", str(self.work / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
            )

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/", timeout=1) as r:
                    return r.status == 200  # the probe path the Deployment uses
            except OSError:
                return False

        wait_for(up, f"docker-registry on {self.host}", timeout=15)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve_config(suffix: str, ports: dict[str, int], files: Path, clair: ClairStandIn) -> str:
    """The one file both `deploy apply` and the local serve read. The registries section gives
    the local serve what the deployer mounts in the cluster (credentials, events token)."""
    hosted, proxy = f"127.0.0.1:{ports['hosted']}", f"127.0.0.1:{ports['proxy']}"
    access = f"{{plainHTTP: true, dockerConfigFile: {files / 'dockerconfig.json'}}}"
    return (
        f"pullSecret: {{name: mirrorgate-pull, source: e2e-deploy-{suffix}-reg/mirrorgate-pull}}\n"
        "namespaces: {mode: optIn}\n"
        "registry:\n"
        f"  namespace: e2e-deploy-{suffix}-reg\n"
        f"  nodePort: {ports['hosted']}\n"
        "  auth: {bcryptCost: 4}\n"
        "  proxies:\n"
        f"    - {{upstream: docker.io, remoteURL: https://registry-1.docker.io, "
        f"nodePort: {ports['proxy']}}}\n"
        f"deploy: {{name: e2e-deploy-{suffix}, namespace: e2e-deploy-{suffix}-mg}}\n"
        "registries:\n"
        f'  "{hosted}": {access}\n'
        f'  "{proxy}": {access}\n'
        "scan:\n"
        f"  clair: {{url: '{clair.url}', pskFile: {files / 'psk'}, issuer: mirrorgate}}\n"
        "  admissionBudget: 5s\n"
        f"  events: {{tokenFile: {files / 'events-token'}}}\n"
    )


def bind_webhook_user(kube: SyncKube, manifests: list[dict[str, Any]], *, name: str) -> list[str]:
    """Bind mirrorgate's test user to exactly the rendered ClusterRole and Roles."""
    subject = [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": WEBHOOK_USER}]
    paths = []
    for o in manifests:
        if o["kind"] not in ("ClusterRole", "Role"):
            continue
        ns = o["metadata"].get("namespace")
        base = f"{RBAC}/namespaces/{ns}/rolebindings" if ns else f"{RBAC}/clusterrolebindings"
        body = {
            "metadata": {"name": name},
            "subjects": subject,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": o["kind"],
                "name": o["metadata"]["name"],
            },
        }
        kube.request("POST", base, body=body)
        paths.append(f"{base}/{name}")
    return paths


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HarnessRegistry]:
    """Stands in for registry-1.docker.io: what the rendered cache mirrors."""
    registry = HarnessRegistry(tmp_path_factory.mktemp("deploy-upstream"))
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def installed_stack(
    kube, kapi, control_plane, upstream, tmp_path_factory
) -> Iterator[dict[str, Any]]:
    """`deploy apply --webhook-url` to the API server; the rendered registries at their node
    ports; nginx and busybox on the upstream. The local serve is started per test."""
    tmp = tmp_path_factory.mktemp("deploy-stack")
    suffix = secrets.token_hex(3)
    hosted_port, proxy_port = node_ports(2)
    ports = {"hosted": hosted_port, "proxy": proxy_port, "webhook": free_port()}
    files = tmp / "files"
    files.mkdir()
    clair = ClairStandIn(base64.b64encode(secrets.token_bytes(32)).decode(), ["mirrorgate"])
    clair.start()
    config = tmp / "mirrorgate.yaml"
    config.write_text(serve_config(suffix, ports, files, clair))
    (files / "psk").write_text(clair.psk_b64 + "\n")
    kc = str(control_plane.kubeconfig)
    url = f"https://127.0.0.1:{ports['webhook']}"
    stack: dict[str, Any] = {"suffix": suffix, "ports": ports, "config": config, "clair": clair}
    registries: list[RenderedRegistry] = []
    bindings: list[str] = []
    try:
        t0 = time.monotonic()
        applied = run(
            "deploy",
            "apply",
            "--config",
            str(config),
            "--kubeconfig",
            kc,
            "--webhook-url",
            url,
            "--cert-out",
            str(tmp / "certs"),
        )
        stack["apply_seconds"] = time.monotonic() - t0
        assert "no webhook Deployment, Service or PodDisruptionBudget" in applied.stdout
        # What the cluster now holds, secrets included: the same render the apply used.
        rendered = run(
            "deploy",
            "render",
            "--config",
            str(config),
            "--kubeconfig",
            kc,
            "--webhook-url",
            url,
            "--include-secrets",
        )
        manifests = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        stack["manifests"] = manifests
        reg_ns = f"e2e-deploy-{suffix}-reg"
        pull = secret_value(kube, reg_ns, "mirrorgate-pull", ".dockerconfigjson")
        (files / "dockerconfig.json").write_bytes(pull)
        token = secret_value(
            kube, f"e2e-deploy-{suffix}-mg", f"e2e-deploy-{suffix}-events", "token"
        )
        (files / "events-token").write_bytes(token)
        stack["password"] = secret_value(kube, reg_ns, "registry-credentials", "password").decode()

        stack["nginx"] = push_image(upstream, "library/nginx", "1.25")
        stack["busybox"] = push_image(upstream, "library/busybox", "1.36")
        hosted = RenderedRegistry(tmp / "hosted", manifests, "registry", port=hosted_port)
        registries.append(hosted.start())
        proxy = RenderedRegistry(
            tmp / "proxy",
            manifests,
            "registry-proxy-docker-io",
            port=proxy_port,
            remoteurl=upstream.url,
        )
        registries.append(proxy.start())
        stack["hosted"], stack["proxy"] = hosted, proxy
        stack["certs"] = tmp / "certs"
        bindings = bind_webhook_user(kube, manifests, name=f"e2e-deploy-{suffix}-user")
        stack["serve_kubeconfig"] = control_plane.write_kubeconfig(
            tmp / "webhook-kubeconfig", token=control_plane.tokens[WEBHOOK_USER], user=WEBHOOK_USER
        )
        stack["work"] = tmp
        stack["admin_kubeconfig"] = kc
        yield stack
    finally:
        run("deploy", "uninstall", "--config", str(config), "--kubeconfig", kc, check=False)
        for path in bindings:
            kube.delete(path)
        for r in registries:
            r.stop()
        clair.stop()


def metric(wh: LocalWebhook, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{wh.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_apply_with_webhook_url_and_a_local_serve_rewrite_and_gate_pods_in_an_opted_in_namespace(
    installed_stack, kapi, kube
):
    stack = installed_stack
    suffix, ports = stack["suffix"], stack["ports"]
    clair: ClairStandIn = stack["clair"]
    clair.set_report(stack["nginx"], "trimmed")  # nginx is "vulnerable", busybox is clean
    work: Path = stack["work"] / "serve"
    certs: Path = stack["certs"]
    wh = LocalWebhook(
        work,
        stack["config"],
        env={
            "KUBECONFIG": str(stack["serve_kubeconfig"]),
            "POD_NAMESPACE": f"e2e-deploy-{suffix}-mg",
            "POD_NAME": "mirrorgate-0",
        },
    )
    wh.cert_file, wh.key_file = certs / "tls.crt", certs / "tls.key"
    wh.ca_pem = (certs / "ca.crt").read_bytes()
    ns = f"e2e-deploy-{suffix}-apps"
    kapi.create_namespace(ns, {OPT_IN: "true"})
    proxy_host = f"127.0.0.1:{ports['proxy']}"
    wh.port = ports["webhook"]  # the port the applied webhook configurations name
    with wh:

        def rewritten() -> bool:
            reply = kapi.create_pod(ns, pod("probe", "busybox:1.36"), dry_run=True)
            return reply.status == 201 and reply.body["spec"]["containers"][0]["image"].startswith(
                proxy_host
            )

        wait_for(rewritten, "the applied webhook configurations to take effect", timeout=30)

        clean = kapi.create_pod(ns, pod("clean", "busybox:1.36"))
        assert clean.status == 201, clean.body
        stored = kapi.get(f"/api/v1/namespaces/{ns}/pods/clean").body
        assert stored["spec"]["containers"][0]["image"] == f"{proxy_host}/library/busybox:1.36"
        assert stored["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
        # serve, with only the rendered RBAC, copied the pull secret into the namespace.
        copy = kube.get(f"/api/v1/namespaces/{ns}/secrets/mirrorgate-pull")
        assert copy is not None and copy["type"] == "kubernetes.io/dockerconfigjson"

        denied = kapi.create_pod(ns, pod("vulnerable", "nginx:1.25"))
        assert denied.status == 403, denied.body
        assert denied.message.startswith(
            'admission webhook "validate.mirrorgate.io" denied the request: image '
            f"{proxy_host}/library/nginx:1.25 ("
        )
        assert "RHSA-2023:5837" in denied.message

        # A push to the hosted registry reaches serve's /events/registry: TLS trusted through
        # the rendered CA ConfigMap, authorized by the rendered token.
        hosted: RenderedRegistry = stack["hosted"]
        push_image(
            hosted,
            "team/pushed",
            "2.0",
            creds=Credentials("mirrorgate", stack["password"]),
            cert_dir=None,
        )
        wait_for(
            lambda: (
                metric(wh, "mirrorgate_scan_events_total", source="registry", result="accepted")
                >= 1
            ),
            "the registry's push notification",
        )
        assert (
            metric(wh, "mirrorgate_scan_events_total", source="registry", result="unauthorized")
            == 0
        )

        # status asks the API server to admit a dry-run pod: the webhook's answer proves it.
        status = run(
            "deploy",
            "status",
            "--config",
            str(stack["config"]),
            "--kubeconfig",
            stack["admin_kubeconfig"],
            "--probe-namespace",
            ns,
        )
        assert f"reachability: the API server reached the webhook (namespace {ns})" in status.stdout
        assert f"-> {wh.url}/mutate, failurePolicy Ignore, caBundle 1 CA(s)" in status.stdout


# After the test above: pushed while no serve listens, the registry's notifications back off for
# 10 s, which would slow that test's check of them.
def test_the_rendered_registries_take_a_push_with_the_rendered_credentials_and_mirror_upstream(
    installed_stack, upstream
):
    hosted: RenderedRegistry = installed_stack["hosted"]
    proxy: RenderedRegistry = installed_stack["proxy"]
    creds = Credentials("mirrorgate", installed_stack["password"])
    pushed = push_image(hosted, "team/app", "1.0", creds=creds, cert_dir=None)
    assert pushed.startswith("sha256:")
    assert (hosted.work / "data" / "docker" / "registry" / "v2" / "repositories" / "team").is_dir()
    with pytest.raises(Exception, match="unauthorized|authentication required"):
        push_image(
            hosted, "team/app", "1.1", creds=Credentials("mirrorgate", "wrong"), cert_dir=None
        )
    # The cache serves the upstream's image byte for byte (same digest) and keeps a copy.
    raw = skopeo_inspect_raw(
        f"docker://{proxy.host}/library/nginx:1.25", creds=creds, tls_verify=False
    )
    assert sha256_digest(raw) == installed_stack["nginx"]
    blobs = proxy.work / "data" / "docker" / "registry" / "v2" / "blobs"
    assert any(blobs.rglob("data"))
    # A cache refuses pushes (distribution proxy mode is read-only).
    with pytest.raises(Exception, match="unsupported|denied|405"):
        push_image(proxy, "library/nope", "1", creds=creds, cert_dir=None)
