"""A real node: pods are scheduled, pulled by containerd and run, as a kubectl 1.20 user sees it.

The node (`LocalNode`: containerd, kubelet, kube-proxy, controller-manager, scheduler) joins the
session's control plane. A registry built from Debian's `docker-registry` runs as a pod behind a
NodePort; an image pushed to it through `127.0.0.1:<nodePort>` is pulled by containerd with the
pod's `imagePullSecrets`, and without them the kubelet reports the registry's 401. Everything is
checked through Debian's real kubectl 1.20 (`kubectl get/logs/describe/get events`).

The first tests check what a machine that cannot run a node is told. The next two run nodes of
their own and check the host is left exactly as found (also after a run that died without stopping
its node); they come before any test using the module's `node`, because only one node can run on
a machine at a time. A machine that cannot run a node fails these tests with the reason, never
skips them: CI installs everything a node needs.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import bcrypt
import pytest

from mirrorgate.devtools.images import (
    APP_LINE,
    REGISTRY_PORT,
    OciImage,
    app_image,
    push_image,
    registry_image,
)
from mirrorgate.devtools.localcluster import ControlPlane, Kubectl, LocalClusterError, find_assets
from mirrorgate.devtools.node import (
    DEFAULT_NODE_NAME,
    LocalNode,
    NodeUnavailableError,
    clean_up_after_crashed_run,
    node_unavailable_reason,
    snapshot_host_state,
)

POD_TIMEOUT = 90
REGISTRY_USER = "mirrorgate"
# Where the tests push the app image on the registry pod.
APP_IMAGE_PATH = "demo/app:1"


def _fail(err: Exception) -> NoReturn:
    # Fail, don't skip, and show only the reason and what to do (no chained traceback).
    raise pytest.fail.Exception(str(err), pytrace=False) from None


def _start(node: LocalNode) -> LocalNode:
    try:
        return node.start()
    except LocalClusterError as err:
        _fail(err)


def _apply(kubectl: Kubectl, *documents: dict[str, Any]) -> None:
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(documents)}),
    )


def _eventually(check: Callable[[], str | None], *, timeout: float, what: str) -> None:
    """Poll `check()` (None when satisfied, else what is still wrong) until `timeout`."""
    deadline = time.monotonic() + timeout
    while (problem := check()) is not None:
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:.0f}s: {problem}")
        time.sleep(0.3)


def _namespace(kubectl: Kubectl, prefix: str) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", name)
    return name


def _pod(
    name: str, namespace: str, image: str, *, pull_secret: str | None = None, **spec: Any
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always"}],
        # A pod deleted at the end goes at once (the app traps TERM anyway).
        "terminationGracePeriodSeconds": 1,
        **spec,
    }
    if pull_secret is not None:
        pod_spec["imagePullSecrets"] = [{"name": pull_secret}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": pod_spec,
    }


def _wait_running(kubectl: Kubectl, namespace: str, pod: str) -> float:
    """Seconds until the pod is Ready; on timeout the failure shows `kubectl describe`."""
    started = time.monotonic()
    result = kubectl.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        f"pod/{pod}",
        f"--timeout={POD_TIMEOUT}s",
        check=False,
        timeout=POD_TIMEOUT + 30,
    )
    if result.returncode != 0:
        described = kubectl.run("describe", "pod", "-n", namespace, pod, check=False).stdout
        pytest.fail(f"pod {namespace}/{pod} not Ready: {result.stderr.strip()}\n{described}")
    return time.monotonic() - started


# --- a machine that cannot run a node says why ----------------------------------------------------
def test_a_node_without_its_binaries_names_them_and_how_to_get_them(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = find_assets()
    envtest = tmp_path / "envtest"
    envtest.mkdir()
    for name in ("kube-apiserver", "etcd"):
        (envtest / name).symlink_to(real / name)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(envtest))
    monkeypatch.setenv("MIRRORGATE_CACHE", str(tmp_path / "empty-cache"))
    # An envtest folder still runs the API server alone.
    assert find_assets() == envtest
    reason = node_unavailable_reason()
    assert reason is not None and "\n" not in reason
    assert "lacks kubelet, kube-proxy, kube-controller-manager, kube-scheduler" in reason
    assert "scripts/control-plane-assets" in reason
    with pytest.raises(NodeUnavailableError, match="lacks kubelet"):
        LocalNode(control_plane, tmp_path / "node").start()


def test_missing_debian_packages_are_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed
    reason = node_unavailable_reason()
    assert reason is not None and "\n" not in reason
    assert reason.startswith("missing Debian packages for a local node: "), reason
    for package in ("conntrack", "containerd", "iproute2", "iptables", "runc", "mount"):
        assert package in reason
    assert "apt-get install -y " in reason


# --- the host is left as found -------------------------------------------------------------------
def _assert_host_changed(during: dict[str, Any], node: LocalNode) -> None:
    """The snapshot taken while a node ran shows what it changed (so the comparison can fail)."""
    assert during["bridge_exists"]
    assert any(line.startswith(":KUBE-SERVICES") for line in during["iptables"]["iptables nat"])
    assert during["sysctls"]["net/ipv4/conf/all/route_localnet"] == "1"
    assert any(
        " tmpfs " in mount and str(node.kubelet_dir) in mount for mount in during["mounts"]
    ), "no secret volume (tmpfs) mounted under the kubelet's root dir"
    assert during["folders"]["/var/log/pods"]


def _assert_host_as_before(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert after[key] == before[key], f"host {key} differs after the node stopped"


def _run_pod_with_volume_and_service(kubectl: Kubectl, image: str) -> None:
    namespace = _namespace(kubectl, "node-host")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "data", "namespace": namespace},
        "stringData": {"greeting": "hello"},
    }
    pod = _pod(
        "app",
        namespace,
        image,
        volumes=[{"name": "data", "secret": {"secretName": "data"}}],
    )
    pod["spec"]["containers"][0].update(
        imagePullPolicy="Never", volumeMounts=[{"name": "data", "mountPath": "/data"}]
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {"type": "NodePort", "selector": {"app": "app"}, "ports": [{"port": 80}]},
    }
    _apply(kubectl, secret, pod, service)
    _wait_running(kubectl, namespace, "app")


def _host_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # Every node of this session works under the session's base temp folder.
    return snapshot_host_state(work_dirs=[tmp_path_factory.getbasetemp()])


def _pristine_host_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The host as it was before any node: first undo what a killed earlier run left."""
    try:
        clean_up_after_crashed_run()
    except LocalClusterError as err:
        _fail(err)
    return _host_state(tmp_path_factory)


def test_stopping_a_node_leaves_the_host_exactly_as_found(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> None:
    before = _pristine_host_state(tmp_path_factory)
    app = app_image()
    node = LocalNode(control_plane, tmp_path_factory.mktemp("node-host"), images=[app])
    _start(node)
    try:
        _run_pod_with_volume_and_service(control_plane.kubectl(), app.reference)
        during = _host_state(tmp_path_factory)
    finally:
        node.stop()
    _assert_host_changed(during, node)
    _assert_host_as_before(before, _host_state(tmp_path_factory))
    print(f"node timings: {node.timings}")


def test_a_node_left_behind_by_a_killed_run_is_cleaned_up_by_the_next_one(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> None:
    before = _pristine_host_state(tmp_path_factory)
    kubectl = control_plane.kubectl()
    app = app_image()
    crashed = LocalNode(
        control_plane, tmp_path_factory.mktemp("node-crashed"), name="crashed", images=[app]
    )
    _start(crashed)
    try:
        _run_pod_with_volume_and_service(kubectl, app.reference)
    finally:
        # What a killed test run leaves: every process running, every host change in place.
        crashed.abandon()
    left_running = crashed.processes
    survivor = LocalNode(control_plane, tmp_path_factory.mktemp("node-next"))
    _start(survivor)
    try:
        for name, process in left_running.items():
            assert process.wait(timeout=10) is not None, f"{name} of the crashed run still runs"
        nodes = kubectl.run("get", "nodes").stdout
        assert re.search(rf"^{DEFAULT_NODE_NAME}\s+Ready\s", nodes, re.MULTILINE), nodes
    finally:
        survivor.stop()
        # The API still lists the crashed node and its pod; nothing else removes them.
        kubectl.run("delete", "node", "crashed", "--wait=false", check=False)
        kubectl.run(
            "delete",
            "pods",
            "--all-namespaces",
            "--field-selector=spec.nodeName=crashed",
            "--force",
            "--grace-period=0",
            check=False,
        )
    _assert_host_as_before(before, _host_state(tmp_path_factory))


def test_a_node_not_ready_in_time_says_why_and_leaves_the_host_as_found(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> None:
    before = _pristine_host_state(tmp_path_factory)
    node = LocalNode(control_plane, tmp_path_factory.mktemp("node-slow"), ready_timeout=0.5)
    with pytest.raises(LocalClusterError) as raised:
        node.start()
    message = str(raised.value)
    assert message.startswith(f"node {DEFAULT_NODE_NAME} not ready after 0.5s: "), message
    assert f"last lines of {node.log_path('kubelet')}" in message
    assert all(process.poll() is not None for process in node.processes.values())
    _assert_host_as_before(before, _host_state(tmp_path_factory))


# --- one node for the rest of the module ---------------------------------------------------------
@pytest.fixture(scope="module")
def node(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    try:
        images = [registry_image()]
    except LocalClusterError as err:
        _fail(err)
    local = _start(LocalNode(control_plane, tmp_path_factory.mktemp("node"), images=images))
    try:
        yield local
    finally:
        local.stop()
        print(f"node timings: {local.timings}")


@pytest.fixture(scope="module")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    try:
        return control_plane.kubectl()
    except LocalClusterError as err:
        _fail(err)


@dataclass(frozen=True)
class ClusterRegistry:
    """The registry pod behind its NodePort, as the node reaches it."""

    namespace: str
    host: str  # 127.0.0.1:<nodePort>
    username: str
    password: str

    def logs(self, kubectl: Kubectl) -> str:
        return kubectl.run("logs", "-n", self.namespace, "deploy/registry").stdout

    def dockerconfigjson_secret(self, namespace: str, name: str) -> dict[str, Any]:
        auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        config = json.dumps({"auths": {self.host: {"auth": auth}}})
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": name, "namespace": namespace},
            "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
        }


def _registry_manifests(namespace: str, htpasswd: str) -> list[dict[str, Any]]:
    labels = {"app": "registry"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "registry-htpasswd", "namespace": namespace},
            "stringData": {"htpasswd": htpasswd},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "registry", "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {
                                "name": "registry",
                                # Imported into the node's containerd: no registry serves it.
                                "image": registry_image().reference,
                                "imagePullPolicy": "Never",
                                "env": [
                                    {"name": "REGISTRY_AUTH", "value": "htpasswd"},
                                    {"name": "REGISTRY_AUTH_HTPASSWD_REALM", "value": "node-e2e"},
                                    {
                                        "name": "REGISTRY_AUTH_HTPASSWD_PATH",
                                        "value": "/auth/htpasswd",
                                    },
                                    {
                                        "name": "REGISTRY_HTTP_SECRET",
                                        "value": secrets.token_hex(16),
                                    },
                                ],
                                "ports": [{"containerPort": REGISTRY_PORT}],
                                "readinessProbe": {
                                    "tcpSocket": {"port": REGISTRY_PORT},
                                    "periodSeconds": 1,
                                },
                                "volumeMounts": [
                                    {"name": "auth", "mountPath": "/auth", "readOnly": True},
                                    {"name": "data", "mountPath": "/var/lib/registry"},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "auth", "secret": {"secretName": "registry-htpasswd"}},
                            {"name": "data", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "registry", "namespace": namespace},
            "spec": {
                "type": "NodePort",
                "selector": labels,
                "ports": [{"port": REGISTRY_PORT, "targetPort": REGISTRY_PORT}],
            },
        },
    ]


def _answers_http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return None
    except urllib.error.HTTPError:
        return None  # 401 without credentials: it is serving
    except OSError as err:
        return str(err)


@pytest.fixture(scope="module")
def cluster_registry(node: LocalNode, kubectl: Kubectl) -> ClusterRegistry:
    namespace = _namespace(kubectl, "node-registry")
    password = secrets.token_urlsafe(18)
    # distribution accepts only bcrypt; cost 4 keeps each authenticated request about 1 ms.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    _apply(kubectl, *_registry_manifests(namespace, f"{REGISTRY_USER}:{hashed}\n"))
    started = time.monotonic()
    kubectl.run(
        "rollout",
        "status",
        "-n",
        namespace,
        "deploy/registry",
        f"--timeout={POD_TIMEOUT}s",
        timeout=POD_TIMEOUT + 30,
    )
    print(f"registry Deployment available after {time.monotonic() - started:.1f}s")
    node_port = kubectl.run(
        "get", "service", "-n", namespace, "registry", "-o", "jsonpath={.spec.ports[0].nodePort}"
    ).stdout.strip()
    host = f"127.0.0.1:{node_port}"
    # kube-proxy writes the NodePort rules shortly after the Service exists.
    _eventually(lambda: _answers_http(f"http://{host}/v2/"), timeout=30, what=f"registry at {host}")
    return ClusterRegistry(namespace, host, REGISTRY_USER, password)


@pytest.fixture(scope="module")
def pushed_app(cluster_registry: ClusterRegistry) -> OciImage:
    image = app_image()
    push_image(
        image,
        f"{cluster_registry.host}/{APP_IMAGE_PATH}",
        username=cluster_registry.username,
        password=cluster_registry.password,
    )
    return image


def test_the_node_is_ready_as_kubectl_shows_it(node: LocalNode, kubectl: Kubectl) -> None:
    wide = kubectl.run("get", "nodes", "-o", "wide").stdout
    row = next((line for line in wide.splitlines() if line.startswith(node.name)), "")
    assert re.search(r"\sReady\s", row), wide
    assert "v1.20.2" in row and node.node_ip in row and "containerd://1.6" in row, wide


def test_a_pod_pulls_its_image_from_the_registry_pod_with_its_pull_secret(
    node: LocalNode,
    kubectl: Kubectl,
    cluster_registry: ClusterRegistry,
    pushed_app: OciImage,
) -> None:
    namespace = _namespace(kubectl, "node-pull")
    image = f"{cluster_registry.host}/{APP_IMAGE_PATH}"
    _apply(
        kubectl,
        cluster_registry.dockerconfigjson_secret(namespace, "registry-pull"),
        _pod("app", namespace, image, pull_secret="registry-pull"),
    )
    seconds = _wait_running(kubectl, namespace, "app")
    print(f"pod Running, pull included, after {seconds:.1f}s")

    assert kubectl.run("logs", "-n", namespace, "app").stdout.strip() == APP_LINE
    # containerd itself fetched the manifest and every blob from the registry pod.
    access_log = [
        line for line in cluster_registry.logs(kubectl).splitlines() if "containerd/" in line
    ]
    assert any(
        re.search(r'"(GET|HEAD) /v2/demo/app/manifests/\S+ HTTP/1.1" 200 ', line)
        for line in access_log
    ), "\n".join(access_log)
    fetched = {
        match.group(1)
        for line in access_log
        if (
            match := re.search(
                r'"GET /v2/demo/app/blobs/(sha256:[0-9a-f]{64}) HTTP/1.1" 200 ', line
            )
        )
    }
    assert fetched == set(pushed_app.blob_digests()), "\n".join(access_log)


def test_without_the_pull_secret_the_kubelet_reports_the_registrys_401(
    node: LocalNode,
    kubectl: Kubectl,
    cluster_registry: ClusterRegistry,
    pushed_app: OciImage,
) -> None:
    namespace = _namespace(kubectl, "node-nosecret")
    image = f"{cluster_registry.host}/{APP_IMAGE_PATH}"
    # imagePullPolicy Always: an image already on the node would otherwise run without a pull.
    _apply(kubectl, _pod("app", namespace, image))

    def waiting_reason() -> str | None:
        reason = kubectl.run(
            "get",
            "pod",
            "-n",
            namespace,
            "app",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
        ).stdout
        return None if reason in ("ErrImagePull", "ImagePullBackOff") else f"reason {reason!r}"

    _eventually(waiting_reason, timeout=POD_TIMEOUT, what="pod app not failing to pull")
    events = kubectl.run(
        "get", "events", "-n", namespace, "--field-selector=involvedObject.name=app"
    ).stdout
    failed = [line for line in events.splitlines() if f'Failed to pull image "{image}"' in line]
    assert failed and "401 Unauthorized" in failed[0], events
    described = kubectl.run("describe", "pod", "-n", namespace, "app").stdout
    assert re.search(r"Reason:\s+(ErrImagePull|ImagePullBackOff)", described), described
    assert "401 Unauthorized" in described
