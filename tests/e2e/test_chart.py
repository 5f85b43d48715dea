"""The Helm chart installed by Helm's own engine (helm_python, Helm v4) on the real kube-apiserver
1.20 the fixtures start.

- install creates exactly what the chart renders (1.20's beta PodDisruptionBudget and CronJob),
  with certificates the webhook configurations trust;
- an upgrade with changed values changes only the objects those values are in, and keeps every
  secret; a second upgrade with the same values moves not one resourceVersion;
- uninstall removes the webhook configurations, and with ``keepData`` leaves only the registry's
  PersistentVolumeClaims (and the namespace holding them);
- the chart, packaged and pushed as ``oci://<registry>/charts/mirrorgate`` to the registry the
  release installed (its rendered config and htpasswd run under the real docker-registry, as the
  nodes would reach it), installs a second release from there.

There is no controller manager: every test uses namespaces and a release name of its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from mirrorgate.certs.rotation import TLSMaterial
from mirrorgate.deploy.apply import capabilities
from mirrorgate.deploy.render import KIND_ORDER
from mirrorgate.devtools.images import ImageBuildError, app_image, push_image
from mirrorgate.devtools.images import registry_image as local_registry_image
from mirrorgate.devtools.localcluster import ControlPlane, LocalClusterError, free_port
from mirrorgate.devtools.node import LocalNode
from mirrorgate.webhook.adapters.kube import SyncKube, collection_path, object_path
from tests.helpers.node import (
    apply,
    create_namespace,
    fail,
    free_node_ports,
    pull_secret,
    require_node,
    start_node,
    wait_ready,
)
from tests.helpers.waiting import node_ports, wait_for

CHART = Path(__file__).resolve().parents[2] / "deploy" / "chart" / "mirrorgate"
HOOKS = "/apis/admissionregistration.k8s.io/v1"

helm_python.disable_logging()


def values(suffix: str, ports: list[int], **deploy: Any) -> dict[str, Any]:
    reg_ns = f"e2e-chart-{suffix}-reg"
    return {
        "config": {
            "pullSecret": {"name": "mirrorgate-pull", "source": f"{reg_ns}/mirrorgate-pull"},
            "registry": {
                "namespace": reg_ns,
                "nodePort": ports[0],
                "storage": {"filesystem": {"size": "1Gi"}},
                "proxies": [
                    {
                        "upstream": "docker.io",
                        "remoteURL": "https://registry-1.docker.io",
                        "nodePort": ports[1],
                    }
                ],
            },
            # No webhook pod runs here (no kubelet): the gate must not block other tests' pods.
            "deploy": {"replicas": 2, "failurePolicy": "Ignore", **deploy},
            "scan": {
                "clair": {
                    "url": "http://clair.invalid:6060",
                    "pskFile": "/etc/mirrorgate/clair/psk",
                }
            },
        },
    }


def key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def live(kube: SyncKube, release: str) -> dict[str, dict[str, Any]]:
    """Every object labelled as part of ``release`` that is not already being deleted (being
    deleted: only finalizers, which no controller runs here, keep it)."""
    caps, _ = capabilities(kube)
    selector = f"app.kubernetes.io/part-of=mirrorgate,app.kubernetes.io/instance={release}"
    out = {}
    for kind in KIND_ORDER:
        api = caps.api_version(kind)
        if api is None:
            continue
        for obj in kube.list(collection_path(api, kind), label_selector=selector):
            if not obj["metadata"].get("deletionTimestamp"):
                obj.setdefault("apiVersion", api)
                obj.setdefault("kind", kind)
                out[key(obj)] = obj
    return out


def versions(kube: SyncKube, release: str) -> dict[str, str]:
    return {k: version(o) for k, o in live(kube, release).items()}


def version(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["resourceVersion"])


def content(obj: dict[str, Any]) -> dict[str, Any]:
    """What a user would call the object: all but the server's bookkeeping."""
    out = {k: v for k, v in obj.items() if k != "status"}
    bookkeeping = ("resourceVersion", "managedFields", "generation")
    out["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in bookkeeping}
    return out


def manifest_keys(release: dict[str, Any], namespace: str) -> set[str]:
    out = set()
    for doc in yaml.safe_load_all(release["manifest"]):
        if doc:
            doc["metadata"].setdefault("namespace", namespace if _namespaced(doc) else "")
            out.add(key(doc))
    return out


def _namespaced(obj: dict[str, Any]) -> bool:
    cluster = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    return obj["kind"] not in cluster and not obj["kind"].endswith("WebhookConfiguration")


def secret_data(kube: SyncKube, namespace: str, name: str) -> dict[str, str]:
    obj = kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    assert obj is not None, f"Secret {namespace}/{name} missing"
    return dict(obj["data"])


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> Iterator[SyncKube]:
    with SyncKube.from_kubeconfig(str(control_plane.kubeconfig)) as k:
        yield k


@pytest.fixture
def helm_in(control_plane: ControlPlane) -> Iterator[Callable[[str], helm_python.Config]]:
    """Helm for a release namespace (its release records live there)."""
    configs: dict[str, helm_python.Config] = {}

    def for_namespace(namespace: str) -> helm_python.Config:
        if namespace not in configs:
            configs[namespace] = helm_python.Config(
                kubeconfig_path=str(control_plane.kubeconfig), namespace=namespace
            )
        return configs[namespace]

    yield for_namespace
    for cfg in configs.values():
        cfg.close()


# --- install, upgrade, upgrade again, uninstall -------------------------------------------------
def test_install_upgrade_and_uninstall_change_only_what_they_should(kube, helm_in):
    suffix = secrets.token_hex(3)
    release, ns, reg_ns = f"e2e-chart-{suffix}", f"e2e-chart-{suffix}-mg", f"e2e-chart-{suffix}-reg"
    ports = node_ports(2)
    first = values(suffix, ports)
    helm = helm_in(ns)
    try:
        installed_release = helm.install(
            str(CHART), release, first, create_namespace=True, timeout=120
        )
        assert installed_release["status"] == "deployed"
        # Names only in assertions: the objects hold the generated secrets.
        names = sorted(live(kube, release))
        assert set(names) == manifest_keys(installed_release, ns)
        assert len(names) == 31
        # Kubernetes 1.20 serves these only as v1beta1, and the chart asked the server.
        pdb = kube.get(f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets/{release}")
        cron = kube.get(f"/apis/batch/v1beta1/namespaces/{reg_ns}/cronjobs/registry-gc")
        assert pdb is not None and cron is not None
        tls = TLSMaterial.from_secret(kube.get(f"/api/v1/namespaces/{ns}/secrets/{release}-tls"))
        assert tls is not None and tls.serving and tls.signing
        for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
            hook = kube.get(f"{HOOKS}/{kind}/{release}")
            assert hook is not None
            bundle = base64.b64decode(hook["webhooks"][0]["clientConfig"]["caBundle"])
            assert bundle == tls.ca_bundle
        secrets_before = {
            name: secret_data(kube, namespace, name)
            for namespace, name in [
                (reg_ns, "registry-credentials"),
                (reg_ns, "registry-auth"),
                (reg_ns, "registry-secrets"),
                (ns, f"{release}-tls"),
                (ns, f"{release}-events"),
            ]
        }

        # Changed values: only the objects they are in change; every secret is kept.
        before = live(kube, release)
        changed_values = values(suffix, ports, replicas=3)
        changed_values["config"]["registry"]["gcSchedule"] = "15 2 * * *"
        helm.upgrade(str(CHART), release, changed_values, timeout=120)
        after = live(kube, release)
        assert sorted(after) == sorted(before)
        assert sorted(k for k in after if content(after[k]) != content(before[k])) == sorted(
            [
                f"ConfigMap {ns}/{release}-config",  # the webhook's mirrorgate.yaml
                f"Deployment {ns}/{release}",  # replicas, and the config's hash
                f"CronJob {reg_ns}/registry-gc",
            ]
        )
        # Kubernetes 1.20 writes a claim once more on its first re-apply (the pvc-protection
        # finalizer its admission added on create); the content stays the same (above).
        moved = {k for k in after if version(after[k]) != version(before[k])}
        assert {k for k in moved if content(after[k]) == content(before[k])} <= {
            f"PersistentVolumeClaim {reg_ns}/registry-data",
            f"PersistentVolumeClaim {reg_ns}/registry-proxy-docker-io-data",
        }
        webhook = kube.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{release}")
        assert webhook is not None and webhook["spec"]["replicas"] == 3
        for name, data in secrets_before.items():
            namespace = ns if name.startswith(release) else reg_ns
            kept = secret_data(kube, namespace, name) == data  # a flag: never print values
            assert kept, f"Secret {namespace}/{name} changed"

        # The same values again: not one resourceVersion moves.
        settled = versions(kube, release)
        helm.upgrade(str(CHART), release, changed_values, timeout=120)
        assert versions(kube, release) == settled
        assert [r["revision"] for r in helm.history(release)] == [1, 2, 3]

        helm.uninstall(release, timeout=120)
        assert kube.get(f"{HOOKS}/mutatingwebhookconfigurations/{release}") is None
        assert kube.get(f"{HOOKS}/validatingwebhookconfigurations/{release}") is None
        assert sorted(live(kube, release)) == [
            f"Namespace /{reg_ns}",
            f"PersistentVolumeClaim {reg_ns}/registry-data",
            f"PersistentVolumeClaim {reg_ns}/registry-proxy-docker-io-data",
        ]
    finally:
        helm.uninstall(release, ignore_not_found=True, timeout=120)
        for obj in live(kube, release).values():
            kube.delete(object_path(obj), background=True)


def test_uninstall_without_keep_data_leaves_nothing(kube, helm_in):
    suffix = secrets.token_hex(3)
    release, ns = f"e2e-chart-{suffix}", f"e2e-chart-{suffix}-mg"
    chart_values = {**values(suffix, node_ports(2)), "keepData": False}
    helm = helm_in(ns)
    try:
        helm.install(str(CHART), release, chart_values, create_namespace=True)
        assert len(sorted(live(kube, release))) == 31
        helm.uninstall(release, timeout=120)
        # Claims and the namespace are Terminating here (no controllers run their finalizers).
        assert sorted(live(kube, release)) == []
    finally:
        helm.uninstall(release, ignore_not_found=True, timeout=120)


# --- the chart published to the registry the release installs ----------------------------------
class ReleasedRegistry:
    """The installed release's hosted registry run under the real docker-registry: its config.yml
    from the live ConfigMap, its htpasswd and http.secret from the live Secrets, storage and port
    adjusted (no kubelet runs its pod here)."""

    def __init__(self, kube: SyncKube, namespace: str, work: Path, *, port: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        config_map = kube.get(f"/api/v1/namespaces/{namespace}/configmaps/registry-config")
        assert config_map is not None
        config = yaml.safe_load(config_map["data"]["config.yml"])
        config["http"]["addr"] = f"127.0.0.1:{port}"
        config["storage"]["filesystem"]["rootdirectory"] = str(work / "data")
        htpasswd = base64.b64decode(secret_data(kube, namespace, "registry-auth")["htpasswd"])
        (work / "htpasswd").write_bytes(htpasswd)
        config["auth"]["htpasswd"]["path"] = str(work / "htpasswd")
        (work / "config.yml").write_text(json.dumps(config))
        http_secret = secret_data(kube, namespace, "registry-secrets")["http-secret"]
        self.env = {"REGISTRY_HTTP_SECRET": base64.b64decode(http_secret).decode()}
        self.host = f"127.0.0.1:{port}"
        self.log = work / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ReleasedRegistry:
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
                with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as r:
                    return r.status == 200
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


def test_the_chart_pushed_to_the_releases_registry_installs_from_there(
    kube, helm_in, control_plane, tmp_path
):
    kubeconfig = control_plane.kubeconfig
    suffix = secrets.token_hex(3)
    release, ns, reg_ns = f"e2e-chart-{suffix}", f"e2e-chart-{suffix}-mg", f"e2e-chart-{suffix}-reg"
    second = f"{release}-oci"
    ports = node_ports(2)
    registry: ReleasedRegistry | None = None
    try:
        helm_in(ns).install(str(CHART), release, values(suffix, ports), create_namespace=True)
        registry = ReleasedRegistry(kube, reg_ns, tmp_path / "registry", port=free_port()).start()
        creds = secret_data(kube, reg_ns, "registry-credentials")
        username = base64.b64decode(creds["username"]).decode()
        password = base64.b64decode(creds["password"]).decode()

        archive = helm_python.package(CHART, destination=tmp_path)
        assert Path(archive).name == "mirrorgate-0.1.0.tgz"
        with helm_python.RegistryClient(
            plain_http=True, credentials_file=tmp_path / "registry.json"
        ) as client:
            with pytest.raises(helm_python.HelmError):  # the registry requires its htpasswd
                client.push(archive, f"oci://{registry.host}/charts")
            client.login(registry.host, username, password, plain_http=True)
            client.push(archive, f"oci://{registry.host}/charts")
            assert client.tags(f"oci://{registry.host}/charts/mirrorgate") == ["0.1.0"]
            (tmp_path / "pulled").mkdir()
            client.pull(
                f"oci://{registry.host}/charts/mirrorgate",
                version="0.1.0",
                destination=tmp_path / "pulled",
            )
        pulled = tmp_path / "pulled" / "mirrorgate-0.1.0.tgz"
        assert helm_python.digest(pulled) == helm_python.digest(archive)
        with helm_python.Chart.load(pulled) as chart:
            assert chart.metadata["name"] == "mirrorgate"
        # `helm install oci://...` as a user runs it, logged in: an install reads the login from
        # $HELM_CONFIG_HOME/registry/config.json, and the library reads the environment once,
        # when it loads (so: a new process).
        other = values(f"{suffix}o", node_ports(2))
        (tmp_path / "helm" / "registry").mkdir(parents=True)
        shutil.copy(tmp_path / "registry.json", tmp_path / "helm" / "registry" / "config.json")
        script = (
            "import json, sys, helm_python\n"
            "helm_python.disable_logging()\n"
            "ref, name, ns, kubeconfig, chart_values = sys.argv[1:]\n"
            "with helm_python.Config(kubeconfig_path=kubeconfig, namespace=ns) as cfg:\n"
            "    r = cfg.install(ref, name, json.loads(chart_values), chart_version='0.1.0',\n"
            "                    plain_http=True, create_namespace=True)\n"
            "    print(json.dumps({k: r[k] for k in ('status', 'chart_version')}))\n"
        )
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                f"oci://{registry.host}/charts/mirrorgate",
                second,
                f"{ns}-oci",
                str(kubeconfig),
                json.dumps(other),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HELM_CONFIG_HOME": str(tmp_path / "helm")},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == {"status": "deployed", "chart_version": "0.1.0"}
        assert len(sorted(live(kube, second))) == 31
    finally:
        if registry is not None:
            registry.stop()
        helm_in(f"{ns}-oci").uninstall(second, ignore_not_found=True, timeout=120)
        helm_in(ns).uninstall(release, ignore_not_found=True, timeout=120)


# --- on a real node: the release's registry takes a push and serves a pod -----------------------
# Its own control plane and node (containerd, kubelet, scheduler, controller-manager): one node
# per machine, so run this module alone (`flock /tmp/mg/node.turn ...` where others share it).
HOSTED_LINE = "mirrorgate chart: pulled from the release's registry"


@pytest.fixture(scope="module")
def node_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    require_node()  # say why before starting anything
    plane = ControlPlane(tmp_path_factory.mktemp("chart-node-plane"))
    try:
        plane.start()
    except LocalClusterError as err:
        plane.stop()
        fail(err)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def node(node_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    try:
        images = [local_registry_image()]
    except LocalClusterError as err:
        fail(err)
    local = start_node(node_plane, tmp_path_factory.mktemp("chart-node"), images=images)
    try:
        yield local
    finally:
        local.stop()


def host_path_volume(work: Path, namespace: str, claim: str) -> dict[str, Any]:
    """A hostPath volume bound to ``claim``: the node has no provisioner. The registry runs as
    uid 1000 and hostPath ignores fsGroup, so the folder is writable by everyone."""
    folder = work / "volumes" / claim
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{claim}"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "claimRef": {"namespace": namespace, "name": claim},
            "hostPath": {"path": str(folder), "type": "Directory"},
        },
    }


def test_on_a_real_node_the_releases_registry_takes_a_push_and_serves_a_pod(
    node_plane: ControlPlane, node: LocalNode, tmp_path: Path
) -> None:
    kubectl = node_plane.kubectl()
    suffix = secrets.token_hex(3)
    release, ns, reg_ns = f"chart-{suffix}", f"chart-{suffix}-mg", f"chart-{suffix}-reg"
    (hosted_port,) = free_node_ports(kubectl, 1)
    hosted = f"127.0.0.1:{hosted_port}"
    chart_values = {
        "config": {
            "pullSecret": {"name": "mirrorgate-pull", "source": f"{reg_ns}/mirrorgate-pull"},
            "registry": {
                "namespace": reg_ns,
                "image": local_registry_image().reference,
                "nodePort": hosted_port,
                "storage": {"filesystem": {"size": "64Mi"}},
            },
            # The webhook's own image is not on this node: its pod waits, the registry does not.
            "deploy": {"replicas": 1},
        },
        "keepData": False,
    }
    volume = host_path_volume(tmp_path, reg_ns, "registry-data")
    apply(kubectl, volume)
    with helm_python.Config(kubeconfig_path=str(node_plane.kubeconfig), namespace=ns) as helm:
        try:
            helm.install(str(CHART), release, chart_values, create_namespace=True, timeout=120)

            def registry_pod() -> str:
                return kubectl.run(
                    "get",
                    "pods",
                    "-n",
                    reg_ns,
                    "-l",
                    "mirrorgate.io/registry=registry",
                    "-o",
                    "jsonpath={.items[*].metadata.name}",
                ).stdout.strip()

            wait_for(lambda: bool(registry_pod()), "the registry's pod", timeout=60)
            wait_ready(kubectl, reg_ns, f"pod/{registry_pod()}")

            def credential(key: str) -> str:
                value = kubectl.run(
                    "get",
                    "-n",
                    reg_ns,
                    "secret/registry-credentials",
                    "-o",
                    f"jsonpath={{.data.{key}}}",
                ).stdout
                return base64.b64decode(value).decode()

            username, password = credential("username"), credential("password")
            image = app_image(line=HOSTED_LINE, reference="mirrorgate.local/chart-app:1")
            push_image(image, f"{hosted}/team/app:1", username=username, password=password)
            with pytest.raises(ImageBuildError, match="(?i)unauthorized|authentication required"):
                push_image(image, f"{hosted}/team/app:2", username=username, password="wrong")

            # The pod names the release's pull secret (copied into its namespace, which the
            # running webhook would do).
            apps = create_namespace(kubectl, "chart-apps")
            pull = kubectl.run(
                "get",
                "-n",
                reg_ns,
                "secret/mirrorgate-pull",
                "-o",
                "jsonpath={.data.\\.dockerconfigjson}",
            ).stdout
            apply(
                kubectl,
                pull_secret(apps, "mirrorgate-pull", base64.b64decode(pull).decode()),
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "hosted", "namespace": apps},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "imagePullSecrets": [{"name": "mirrorgate-pull"}],
                        "containers": [
                            {
                                "name": "app",
                                "image": f"{hosted}/team/app:1",
                                "imagePullPolicy": "Always",
                            }
                        ],
                    },
                },
            )
            wait_ready(kubectl, apps, "pod/hosted")
            assert kubectl.run("logs", "-n", apps, "hosted").stdout.strip() == HOSTED_LINE
            access_log = kubectl.run("logs", "-n", reg_ns, "deploy/registry").stdout
            assert re.search(
                r'"GET /v2/team/app/manifests/\S+ HTTP/1.1" 200 .*containerd/', access_log
            ), access_log[-3000:]
        finally:
            helm.uninstall(release, ignore_not_found=True, timeout=120)
            kubectl.run(
                "delete",
                "persistentvolume",
                volume["metadata"]["name"],
                "--wait=false",
                check=False,
            )
