"""The webhook runs in the cluster from its own image: `mirrorgate deploy apply --wait` on a node.

A control plane of this module's own (the ServiceAccount admission plugin on, so pods get their
tokens as in any cluster) and a `LocalNode` with `cluster_services=True` (pods reach Services by
name and the API server through the `kubernetes` Service). The image is the project's Dockerfile
built by `scripts/build-image` and imported with `ctr -n k8s.io images import`, the way the
README says; the registry runs the locally built distribution image. The registry's cache mirrors
an upstream registry that runs in the cluster (nothing on the internet is reachable here).

In order, as a user would go:

1. a probe pod shows what in-cluster workloads need works: DNS for Service names, the API server
   through `kubernetes.default.svc` with the pod's token, pod -> Service -> pod, host -> ClusterIP;
2. `deploy apply --wait` installed registry, cache, webhook Deployment (2 replicas, PDB) and the
   webhook configuration pointing at the in-cluster Service;
3. a pod in an opted-in namespace is rewritten to the cache's NodePort, pulled from there with the
   pull secret and Running; the running webhook made the pull-secret copy; `deploy status` says the
   API server reached the webhook;
4. while a loop keeps creating pods through the API server (every one must come back rewritten:
   the mutating webhook fails open, so a dropped admission is a pod stored unchanged): the
   leader's pod is deleted (the other replica answers, the Lease moves); another pod is deleted
   and drains (readiness 503 while it keeps answering for `--shutdown-delay 5`, after the
   Service has dropped it); `certs rotate-ca` is carried out by the running replicas (new CA
   published, serving certificate switched through the mounted Secret, old CA dropped);
5. `deploy uninstall` removes everything and pods stay creatable.

The tests depend on running in this order (one install for the module). Timings are printed at
the end (`pytest -s`). The host is compared with its state before the node started; a difference
fails the module's teardown.
"""

from __future__ import annotations

import base64
import json
import random
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from cryptography import x509

from mirrorgate.certs.pki import load_certificates, signed_by
from mirrorgate.devtools.images import APP_LINE, app_image, push_image, registry_image
from mirrorgate.devtools.localcluster import ControlPlane, Kubectl, LocalClusterError
from mirrorgate.devtools.node import (
    LocalNode,
    NodeUnavailableError,
    clean_up_after_crashed_run,
    snapshot_host_state,
)
from mirrorgate.webhook import __version__
from tests.helpers.admission import pod_review
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.in_cluster import (
    AdmissionLoop,
    BuiltImage,
    BundleWatch,
    build_webhook_image,
    ca_fingerprints,
    claim_volumes,
    import_archive,
    upstream_manifests,
)

IMAGE = f"mirrorgate:{__version__}"  # deploy.image's default, what the Dockerfile builds
RELEASE = DEPLOY_NS = "mirrorgate"
REGISTRY_NS = "docker-registry"
UPSTREAM_NS = "upstream"
UPSTREAM = "upstream.mirrorgate.test"  # the registry domain the cache mirrors
APP_PATH = "demo/app:1"
SOURCE_IMAGE = f"{UPSTREAM}/{APP_PATH}"
PULL_SECRET = "mirrorgate-pull"
OPT_IN = "mirrorgate.io/enabled"
WEBHOOK_SELECTOR = "app.kubernetes.io/instance=mirrorgate,app.kubernetes.io/component=webhook"
LEASE = "mirrorgate-leader"
SHUTDOWN_DELAY = 5.0  # what deploy/render.py passes to serve
# Steps of a CA rotation are this far apart; longer than the kubelet (sync every 5 s here) plus
# serve's 10 s reload check take to bring a renewed Secret into the pods.
ROTATION_OVERLAP = "40s"
POD_TIMEOUT = 120
NODE_LOCK_WAIT = 900.0
TIMINGS: dict[str, float] = {}
HOST_BEFORE: dict[str, Any] = {}  # the host before the node started


def _fail(message: str) -> NoReturn:
    raise pytest.fail.Exception(message, pytrace=False) from None


def _eventually(check: Callable[[], str | None], *, timeout: float, what: str) -> None:
    """Poll `check()` (None when satisfied, else what is still wrong) until `timeout`."""
    deadline = time.monotonic() + timeout
    while (problem := check()) is not None:
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:.0f}s: {problem}")
        time.sleep(0.3)


def _mirrorgate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mirrorgate_exe(), *args], capture_output=True, text=True, timeout=timeout
    )


def _apply(kubectl: Kubectl, *documents: dict[str, Any]) -> None:
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(documents)}),
    )


def _get(kubectl: Kubectl, *args: str) -> Any:
    return json.loads(kubectl.run("get", *args, "-o", "json").stdout)


def _node_ports(count: int) -> list[int]:
    """Ports in the NodePort range that nothing on 127.0.0.1 uses (NodePorts answer there)."""
    found: list[int] = []
    while len(found) < count:
        port = random.randint(30000, 32767)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in found:
            found.append(port)
    return found


def _namespace(kubectl: Kubectl, name: str, *, opted_in: bool = False) -> str:
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    if opted_in:
        doc["metadata"]["labels"] = {OPT_IN: "true"}
    _apply(kubectl, doc)
    # The ServiceAccount admission plugin refuses pods until the controller-manager has made
    # the namespace's default ServiceAccount and its token.
    _eventually(
        lambda: (
            None
            if kubectl.run(
                "get",
                "serviceaccount",
                "default",
                "-n",
                name,
                "-o",
                "jsonpath={.secrets[0].name}",
                check=False,
            ).stdout
            else "no token yet"
        ),
        timeout=60,
        what=f"ServiceAccount {name}/default",
    )
    return name


def _wait_ready(kubectl: Kubectl, namespace: str, pod: str) -> None:
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


def _webhook_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    """The webhook's pods that are not being deleted."""
    pods = _get(kubectl, "pods", "-n", DEPLOY_NS, "-l", WEBHOOK_SELECTOR)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _rollout(kubectl: Kubectl) -> None:
    kubectl.run(
        "rollout", "status", "-n", DEPLOY_NS, f"deploy/{RELEASE}", "--timeout=120s", timeout=150
    )


def _lease_holder(kubectl: Kubectl) -> str:
    return kubectl.run(
        "get",
        "lease",
        "-n",
        DEPLOY_NS,
        LEASE,
        "-o",
        "jsonpath={.spec.holderIdentity}",
        check=False,
    ).stdout.strip()


def _metrics(pod_ip: str) -> str:
    with urllib.request.urlopen(f"http://{pod_ip}:9090/metrics", timeout=5) as response:
        return response.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _lost(admissions: list[Any]) -> str:
    lost = [a for a in admissions if not a.rewritten]
    return "; ".join(f"{a.pod}: {a.detail}" for a in lost[:5]) + (
        f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""
    )


def _apiserver_webhook_failures(plane: ControlPlane, since_bytes: int) -> list[str]:
    """The API server's log lines about failed webhook calls written after `since_bytes`."""
    with open(plane.work_dir / "kube-apiserver.log", "rb") as log_file:
        log_file.seek(since_bytes)
        text = log_file.read().decode(errors="replace")
    return [line for line in text.splitlines() if "failed calling webhook" in line.lower()]


def _apiserver_log_size(plane: ControlPlane) -> int:
    return (plane.work_dir / "kube-apiserver.log").stat().st_size


# --- the cluster ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def timings() -> Iterator[dict[str, float]]:
    yield TIMINGS
    print("\nin-cluster timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    control_plane = ControlPlane(
        tmp_path_factory.mktemp("ic-plane"), service_account_admission=True
    )
    try:
        control_plane.start()
    except LocalClusterError as err:
        _fail(str(err))
    try:
        yield control_plane
    finally:
        control_plane.stop()


def _when_no_node_runs(step: Callable[[], Any]) -> Any:
    """`step()`, retried while another LocalNode holds this machine (one node at a time)."""
    deadline = time.monotonic() + NODE_LOCK_WAIT
    while True:
        try:
            return step()
        except NodeUnavailableError as err:
            if "another LocalNode runs" not in str(err):
                _fail(str(err))
            if time.monotonic() > deadline:
                _fail(f"{err} (waited {NODE_LOCK_WAIT:.0f}s)")
            time.sleep(5)


def _host_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return snapshot_host_state(work_dirs=[tmp_path_factory.getbasetemp()])


@pytest.fixture(scope="module")
def node(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    # The host as it was before any node: what a killed earlier run left is undone first.
    _when_no_node_runs(clean_up_after_crashed_run)
    before = _host_state(tmp_path_factory)
    HOST_BEFORE.update(before)
    local = LocalNode(
        plane,
        tmp_path_factory.mktemp("ic-node"),
        images=[registry_image(), app_image()],
        cluster_services=True,
        kubelet_sync_seconds=5,
    )
    try:
        _when_no_node_runs(local.start)
    except LocalClusterError as err:
        _fail(str(err))
    TIMINGS["node ready"] = local.timings["start"]
    try:
        yield local
    finally:
        local.stop()
        after = _host_state(tmp_path_factory)
        if after != before:
            # Another node may have taken the machine the moment this one let go: compare once
            # it is gone too (every node puts the host back).
            _when_no_node_runs(clean_up_after_crashed_run)
            after = _host_state(tmp_path_factory)
        differs = [key for key in before if after[key] != before[key]]
        assert not differs, f"the host differs after the node stopped: {differs}"


@pytest.fixture(scope="module")
def kubectl(plane: ControlPlane) -> Kubectl:
    return plane.kubectl()


@pytest.fixture(scope="module")
def webhook_image(node: LocalNode, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    built = build_webhook_image(tmp_path_factory.mktemp("ic-image") / "mirrorgate.tar", IMAGE)
    TIMINGS["image build" + (" (cached)" if built.cached else " (cold)")] = built.seconds
    TIMINGS["image import"] = import_archive(node.containerd_socket, built.archive)
    built.archive.unlink()  # 300 MB, imported now
    return built


@dataclass
class Setup:
    """Where everything is once `deploy apply` ran."""

    config: Path
    kubeconfig: Path
    hosted_port: int
    cache_port: int
    upstream_port: int
    apply_output: str = ""
    apply_started: float = 0.0
    log_offset: int = 0  # of the API server's log when the webhook started answering
    first_pod_namespace: str = "shop"
    loop_namespace: str = "loop"

    @property
    def cache_host(self) -> str:
        return f"127.0.0.1:{self.cache_port}"

    @property
    def rewritten(self) -> str:
        return f"{self.cache_host}/{APP_PATH}"


def _config_text(hosted: int, cache: int) -> str:
    return f"""\
pullSecret: {{name: {PULL_SECRET}, source: {REGISTRY_NS}/{PULL_SECRET}}}
namespaces: {{mode: optIn}}
registry:
  namespace: {REGISTRY_NS}
  image: {registry_image().reference}
  nodePort: {hosted}
  auth: {{bcryptCost: 4}}
  storage: {{filesystem: {{size: 1Gi}}}}
  proxies:
    - upstream: {UPSTREAM}
      remoteURL: "http://registry.{UPSTREAM_NS}.svc:5000"
      nodePort: {cache}
deploy: {{name: {RELEASE}, namespace: {DEPLOY_NS}, image: "{IMAGE}"}}
certs: {{rotationOverlap: {ROTATION_OVERLAP}}}
"""


@pytest.fixture(scope="module")
def setup(
    plane: ControlPlane,
    node: LocalNode,
    kubectl: Kubectl,
    webhook_image: BuiltImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("ic-deploy")
    hosted, cache, upstream = _node_ports(3)
    config = work / "mirrorgate.yaml"
    config.write_text(_config_text(hosted, cache))
    result = Setup(config, plane.kubeconfig, hosted, cache, upstream)

    # The upstream the cache mirrors, with the app image pushed to it.
    _namespace(kubectl, UPSTREAM_NS)
    _apply(
        kubectl,
        *upstream_manifests(UPSTREAM_NS, image=registry_image().reference, node_port=upstream),
    )
    kubectl.run(
        "rollout", "status", "-n", UPSTREAM_NS, "deploy/registry", "--timeout=90s", timeout=120
    )
    _eventually(
        lambda: _http_problem(f"http://127.0.0.1:{upstream}/v2/"),
        timeout=30,
        what="the upstream registry's NodePort",
    )
    push_image(app_image(), f"127.0.0.1:{upstream}/{APP_PATH}")
    # Volumes for the claims the deployer renders (no provisioner here).
    claims = [
        (REGISTRY_NS, "registry-data"),
        (REGISTRY_NS, f"registry-proxy-{UPSTREAM.replace('.', '-')}-data"),
    ]
    _apply(kubectl, *claim_volumes(claims, folder=work / "volumes", size="1Gi", prefix="ic"))
    for name in (result.first_pod_namespace, result.loop_namespace):
        _namespace(kubectl, name, opted_in=True)
    try:
        yield result
    finally:
        kubectl.run("delete", "pv", "-l", "mirrorgate.test/volume=ic", "--wait=false", check=False)


def _http_problem(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return None
    except urllib.error.HTTPError:
        return None  # any HTTP answer: it is serving
    except OSError as err:
        return str(err)


@pytest.fixture(scope="module")
def installed(plane: ControlPlane, kubectl: Kubectl, setup: Setup) -> Setup:
    """`deploy apply --wait`, then the first pod of an opted-in namespace, until Running."""
    started = time.monotonic()
    setup.apply_started = started
    applied = _mirrorgate(
        "deploy",
        "apply",
        "--config",
        str(setup.config),
        "--kubeconfig",
        str(setup.kubeconfig),
        "--wait",
        "--timeout",
        "240",
        timeout=300,
    )
    TIMINGS["deploy apply --wait"] = time.monotonic() - started
    setup.apply_output = applied.stdout
    if applied.returncode != 0:
        pods = kubectl.run("get", "pods", "-A", "-o", "wide", check=False).stdout
        events = kubectl.run("get", "events", "-A", check=False).stdout
        _fail(
            f"deploy apply --wait exited {applied.returncode}:\n{applied.stdout}\n"
            f"{applied.stderr}\n{pods}\n{events[-6000:]}"
        )
    setup.log_offset = _apiserver_log_size(plane)
    _apply(
        kubectl,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "storefront", "namespace": setup.first_pod_namespace},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                # Always: the pull itself, with the pull secret, is part of what is checked.
                "containers": [{"name": "app", "image": SOURCE_IMAGE, "imagePullPolicy": "Always"}],
            },
        },
    )
    _wait_ready(kubectl, setup.first_pod_namespace, "storefront")
    TIMINGS["apply -> first rewritten pod Running"] = time.monotonic() - started
    return setup


@pytest.fixture(scope="module")
def loop(plane: ControlPlane, installed: Setup) -> Iterator[AdmissionLoop]:
    """Pods created through the API server, 4 a second, from the install to the uninstall."""
    admissions = AdmissionLoop(
        plane,
        installed.loop_namespace,
        image=SOURCE_IMAGE,
        rewritten_image=installed.rewritten,
        pull_secret=PULL_SECRET,
    ).start()
    try:
        yield admissions
    finally:
        admissions.stop()


@pytest.fixture(scope="module")
def bundles(plane: ControlPlane, installed: Setup) -> Iterator[BundleWatch]:
    watch = BundleWatch(plane, RELEASE).start()
    try:
        yield watch
    finally:
        watch.stop()


# --- 1. what in-cluster workloads need -----------------------------------------------------------
PROBE = r"""
import json, socket, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
out = {
    "kubernetes": socket.gethostbyname("kubernetes.default.svc.cluster.local"),
    "upstream": socket.gethostbyname("registry.upstream.svc"),
}
context = ssl.create_default_context(cafile=sa + "/ca.crt")
request = urllib.request.Request(
    "https://kubernetes.default.svc/version",
    headers={"Authorization": "Bearer " + open(sa + "/token").read()},
)
out["version"] = json.load(urllib.request.urlopen(request, context=context, timeout=5))
out["through_service"] = [
    urllib.request.urlopen("http://registry.upstream.svc:5000/v2/", timeout=5).status
    for _ in range(20)
]
try:
    socket.gethostbyname("nothing.upstream.svc")
    out["missing"] = "resolved"
except socket.gaierror as err:
    out["missing"] = err.strerror
print(json.dumps(out))
"""


def test_pods_reach_services_by_name_and_the_api_server_with_their_token(
    node: LocalNode, kubectl: Kubectl, setup: Setup
) -> None:
    namespace = _namespace(kubectl, "probe")
    _apply(
        kubectl,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "probe", "namespace": namespace},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "probe",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", PROBE],
                    }
                ],
            },
        },
    )

    def finished() -> str | None:
        phase = kubectl.run(
            "get", "pod", "-n", namespace, "probe", "-o", "jsonpath={.status.phase}"
        ).stdout
        return None if phase in ("Succeeded", "Failed") else f"phase {phase!r}"

    _eventually(finished, timeout=POD_TIMEOUT, what="the probe pod not finished")
    logs = kubectl.run("logs", "-n", namespace, "probe").stdout
    try:
        out = json.loads(logs.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pytest.fail(f"the probe pod failed:\n{logs}")
    upstream_ip = kubectl.run(
        "get", "service", "-n", UPSTREAM_NS, "registry", "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    assert out["kubernetes"] == "10.0.0.1"
    assert out["upstream"] == upstream_ip
    assert out["version"]["gitVersion"] == "v1.20.2"
    assert out["through_service"] == [200] * 20
    assert out["missing"] == "Name or service not known"
    # The API server's side: it dials a webhook's ClusterIP from this machine.
    assert _http_problem(f"http://{upstream_ip}:5000/v2/") is None
    # Forwarding only for what arrives on the node's bridge; the machine's setting is untouched.
    assert (Path("/proc/sys/net/ipv4/conf") / node.bridge / "forwarding").read_text() == "1\n"
    sysctls = HOST_BEFORE["sysctls"]
    assert (
        Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == sysctls["net/ipv4/ip_forward"]
    )
    endpoints = kubectl.run("get", "endpoints", "-n", "default", "kubernetes").stdout
    assert node.api_endpoint is not None
    assert f"{node.node_ip}:{node.api_endpoint[1]}" in endpoints, endpoints


# --- 2. deploy apply --wait ---------------------------------------------------------------------
def test_deploy_apply_wait_installs_the_registry_the_cache_and_the_webhook_behind_its_service(
    kubectl: Kubectl, installed: Setup
) -> None:
    created = re.findall(r"^created\s+(.+)$", installed.apply_output, re.M)
    for what in (
        f"Namespace {DEPLOY_NS}",
        f"Deployment {REGISTRY_NS}/registry",
        f"Deployment {REGISTRY_NS}/registry-proxy-upstream-mirrorgate-test",
        f"Deployment {DEPLOY_NS}/{RELEASE}",
        f"PodDisruptionBudget {DEPLOY_NS}/{RELEASE}",
        f"Service {DEPLOY_NS}/{RELEASE}",
        f"MutatingWebhookConfiguration {RELEASE}",
    ):
        assert what in created, installed.apply_output
    assert created[-1] == f"MutatingWebhookConfiguration {RELEASE}", "webhooks go last"

    deployments = kubectl.run("get", "deployments", "-A").stdout
    for namespace, name, ready in (
        (REGISTRY_NS, "registry", "1/1"),
        (REGISTRY_NS, "registry-proxy-upstream-mirrorgate-test", "1/1"),
        (DEPLOY_NS, RELEASE, "2/2"),
    ):
        assert re.search(rf"^{namespace}\s+{name}\s+{ready}\s", deployments, re.M), deployments
    images = kubectl.run(
        "get",
        "deployment",
        "-n",
        DEPLOY_NS,
        RELEASE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image} "
        "{.spec.template.spec.containers[0].args}",
    ).stdout
    assert images.startswith(f"{IMAGE} ") and '"--shutdown-delay","5"' in images, images
    pdb = kubectl.run("get", "pdb", "-n", DEPLOY_NS, RELEASE).stdout
    # NAME  MIN AVAILABLE  MAX UNAVAILABLE  ALLOWED DISRUPTIONS  AGE
    assert re.search(rf"^{RELEASE}\s+1\s+N/A\s+1\s", pdb, re.M), pdb

    hook = _get(kubectl, "mutatingwebhookconfiguration", RELEASE)["webhooks"][0]
    assert hook["clientConfig"]["service"] == {
        "namespace": DEPLOY_NS,
        "name": RELEASE,
        "path": "/mutate",
        "port": 443,
    }
    assert "url" not in hook["clientConfig"]
    assert hook["failurePolicy"] == "Ignore"
    # ... and that Service's endpoints are the two webhook pods.
    pod_ips = sorted(p["status"]["podIP"] for p in _webhook_pods(kubectl))
    endpoints = _get(kubectl, "endpoints", "-n", DEPLOY_NS, RELEASE)
    addresses = sorted(a["ip"] for s in endpoints["subsets"] for a in s.get("addresses", []))
    assert len(pod_ips) == 2 and addresses == pod_ips


# --- 3. a pod is rewritten and runs from the mirror ---------------------------------------------
def test_a_pod_in_an_opted_in_namespace_is_rewritten_and_runs_from_the_mirror(
    node: LocalNode, kubectl: Kubectl, installed: Setup
) -> None:
    ns = installed.first_pod_namespace
    pod = _get(kubectl, "pod", "-n", ns, "storefront")
    assert pod["spec"]["containers"][0]["image"] == installed.rewritten
    assert pod["spec"]["imagePullSecrets"] == [{"name": PULL_SECRET}]
    originals = json.loads(pod["metadata"]["annotations"]["mirrorgate.io/original-images"])
    assert originals == {"app": SOURCE_IMAGE}
    assert pod["status"]["phase"] == "Running"
    assert kubectl.run("logs", "-n", ns, "storefront").stdout.strip() == APP_LINE
    events = kubectl.run(
        "get", "events", "-n", ns, "--field-selector=involvedObject.name=storefront"
    ).stdout
    assert f'Successfully pulled image "{installed.rewritten}"' in events, events
    # containerd asked the cache's pod, with the pull secret's credentials: the cache answers
    # 401 without them. (The blobs are on the node already: the app image was imported there
    # under another name, and containerd stores content by digest.)
    cache_log = kubectl.run(
        "logs", "-n", REGISTRY_NS, "deploy/registry-proxy-upstream-mirrorgate-test"
    ).stdout
    # NodePort traffic from the node itself arrives from the node IP.
    by_containerd = [
        line
        for line in cache_log.splitlines()
        if line.startswith(f"{node.node_ip} ")
        and "/v2/demo/app/manifests/" in line
        and "containerd/" in line
    ]
    assert any(' HTTP/1.1" 200 ' in line for line in by_containerd), cache_log[-3000:]
    # The webhook's own account of it, from its metrics port.
    rewritten = sum(
        _metric(
            _metrics(p["status"]["podIP"]), "mirrorgate_images_rewritten_total", upstream=UPSTREAM
        )
        for p in _webhook_pods(kubectl)
    )
    assert rewritten >= 1
    print(
        f"apply -> first rewritten pod Running: "
        f"{TIMINGS['apply -> first rewritten pod Running']:.1f}s"
    )


def test_the_running_webhook_keeps_the_pull_secret_copy_in_the_namespace(
    kubectl: Kubectl, installed: Setup
) -> None:
    ns = installed.first_pod_namespace
    copy = _get(kubectl, "secret", "-n", ns, PULL_SECRET)
    source = _get(kubectl, "secret", "-n", REGISTRY_NS, PULL_SECRET)
    assert copy["type"] == "kubernetes.io/dockerconfigjson"
    assert copy["data"] == source["data"]
    assert copy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mirrorgate"
    annotations = copy["metadata"]["annotations"]
    assert annotations["mirrorgate.io/pull-secret-source"] == f"{REGISTRY_NS}/{PULL_SECRET}"
    auths = json.loads(base64.b64decode(copy["data"][".dockerconfigjson"]))["auths"]
    assert installed.cache_host in auths and f"127.0.0.1:{installed.hosted_port}" in auths


def test_deploy_status_reports_the_in_cluster_webhook_reachable(installed: Setup) -> None:
    result = _mirrorgate(
        "deploy",
        "status",
        "--config",
        str(installed.config),
        "--kubeconfig",
        str(installed.kubeconfig),
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"Deployment {DEPLOY_NS}/{RELEASE}: 2/2 available, image {IMAGE}" in out, out
    assert (
        f"MutatingWebhookConfiguration {RELEASE}: mutate.mirrorgate.io -> service "
        f"{DEPLOY_NS}/{RELEASE}:443, failurePolicy Ignore, caBundle 1 CA(s)"
    ) in out, out
    assert re.search(r"^reachability: the API server reached the webhook \(namespace ", out, re.M)


# --- 4. changes while pods keep being created ----------------------------------------------------
def test_deleting_the_leader_webhook_pod_fails_no_pod_creation_and_moves_the_lease(
    plane: ControlPlane, kubectl: Kubectl, installed: Setup, loop: AdmissionLoop
) -> None:
    _rollout(kubectl)
    leader = _lease_holder(kubectl)
    names = [p["metadata"]["name"] for p in _webhook_pods(kubectl)]
    assert leader in names, (leader, names)
    window = time.monotonic()
    time.sleep(2)  # admissions before the deletion count too
    kubectl.run("delete", "pod", "-n", DEPLOY_NS, leader, "--wait=false")
    deleted = time.monotonic()
    _eventually(
        lambda: None if _lease_holder(kubectl) not in ("", leader) else "still held by it",
        timeout=30,
        what=f"the Lease {LEASE} not moving from {leader}",
    )
    TIMINGS["leader pod deleted -> Lease moved"] = time.monotonic() - deleted
    holder = _lease_holder(kubectl)
    assert holder in [p["metadata"]["name"] for p in _webhook_pods(kubectl)]
    _rollout(kubectl)
    time.sleep(2)
    admissions = loop.results(since=window)
    assert len(admissions) >= 20, "the loop is not creating pods"
    assert all(a.rewritten for a in admissions), _lost(admissions)
    # The new leader reconciles: a removed pull-secret copy is put back.
    ns = installed.first_pod_namespace
    kubectl.run("delete", "secret", "-n", ns, PULL_SECRET)
    _eventually(
        lambda: (
            None
            if kubectl.run("get", "secret", "-n", ns, PULL_SECRET, check=False).returncode == 0
            else "missing"
        ),
        timeout=20,
        what=f"the copy {ns}/{PULL_SECRET} not put back by the new leader {holder}",
    )


def test_a_deleted_webhook_pod_fails_readiness_but_keeps_answering_for_its_shutdown_delay(
    plane: ControlPlane, kubectl: Kubectl, installed: Setup, loop: AdmissionLoop
) -> None:
    _rollout(kubectl)
    leader = _lease_holder(kubectl)
    victim = next(p for p in _webhook_pods(kubectl) if p["metadata"]["name"] != leader)
    name, ip = victim["metadata"]["name"], victim["status"]["podIP"]
    bundle = base64.b64decode(
        _get(kubectl, "mutatingwebhookconfiguration", RELEASE)["webhooks"][0]["clientConfig"][
            "caBundle"
        ]
    )
    context = ssl.create_default_context(cadata=bundle.decode())
    server_name = f"{RELEASE}.{DEPLOY_NS}.svc"
    logs = subprocess.Popen(
        [
            str(kubectl.binary),
            f"--kubeconfig={kubectl.kubeconfig}",
            f"--cache-dir={kubectl.cache_dir}",
            "logs",
            "-f",
            "-n",
            DEPLOY_NS,
            name,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    window = time.monotonic()
    samples: list[tuple[float, str, str, bool]] = []  # (t, readyz, mutate, in endpoints)
    try:
        time.sleep(1)
        kubectl.run("delete", "pod", "-n", DEPLOY_NS, name, "--wait=false")
        deleted = time.monotonic()
        while time.monotonic() - deleted < 30:
            ready = _https(context, ip, server_name, "GET", "/readyz")
            mutate = _https(
                context,
                ip,
                server_name,
                "POST",
                "/mutate",
                body=json.dumps(pod_review(SOURCE_IMAGE, namespace="loop")).encode(),
            )
            listed = (
                ip
                in kubectl.run(
                    "get", "endpoints", "-n", DEPLOY_NS, RELEASE, "-o", "jsonpath={..ip}"
                ).stdout
            )
            samples.append((time.monotonic() - deleted, ready, mutate, listed))
            # Gone: nothing answers HTTP at that address any more (refused, or once the pod's
            # network is torn down, a timeout).
            if not ready.isdigit() and not mutate.isdigit():
                break
            time.sleep(0.2)
        output, _ = logs.communicate(timeout=30)
    finally:
        if logs.poll() is None:
            logs.kill()
    draining = [s for s in samples if s[1] == "503"]
    assert draining, f"readiness never answered 503 after the delete: {samples}"
    answered = [s for s in draining if s[2] == "200"]
    assert answered, f"/mutate not answered while readiness failed: {samples}"
    # It answered after its endpoint was gone: the Service had moved on before it stopped.
    assert any(not s[3] for s in answered), f"never answered once out of the endpoints: {samples}"
    assert not samples[-1][2].isdigit(), f"still serving 30s after the delete: {samples}"
    last_answer = answered[-1][0]
    assert last_answer >= SHUTDOWN_DELAY - 1, f"stopped {last_answer:.1f}s after the delete"
    TIMINGS["webhook pod deleted -> last answer"] = last_answer
    for line in (
        "draining: readiness fails, still serving",
        "shutting down: finishing requests in flight",
        '"stopped"',
    ):
        assert line in output, output[-3000:]
    _rollout(kubectl)
    admissions = loop.results(since=window)
    assert admissions and all(a.rewritten for a in admissions), _lost(admissions)


def _https(
    context: ssl.SSLContext,
    ip: str,
    server_name: str,
    method: str,
    path: str,
    body: bytes | None = None,
) -> str:
    """The HTTP status a request straight to one webhook pod gets, or what went wrong."""
    try:
        with (
            socket.create_connection((ip, 8443), timeout=1) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            head = f"{method} {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            tls.sendall(head.encode() + b"\r\n" + (body or b""))
            status_line = tls.recv(64).decode(errors="replace")
        return status_line.split()[1] if status_line.startswith("HTTP/") else status_line
    except ConnectionRefusedError:
        return "refused"
    except OSError as err:
        return f"error {err}"


def test_certs_rotate_ca_is_carried_out_by_the_running_webhook_without_dropping_admissions(
    plane: ControlPlane,
    kubectl: Kubectl,
    installed: Setup,
    loop: AdmissionLoop,
    bundles: BundleWatch,
) -> None:
    """The running replicas publish a new CA next to the old one, switch their serving
    certificate (the renewed Secret reaches them through the mount), then drop the old CA:
    `certs.rotationOverlap` apart, while pods keep being created."""
    _rollout(kubectl)
    pods_before = {p["metadata"]["name"] for p in _webhook_pods(kubectl)}
    assert bundles.wait_for(lambda seen: len(seen) >= 1, timeout=10)
    first = bundles.history[-1][1]
    assert len(first) == 1, bundles.history
    requested = time.monotonic()
    result = _mirrorgate(
        "certs",
        "rotate-ca",
        "--config",
        str(installed.config),
        "--kubeconfig",
        str(installed.kubeconfig),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("CA rotation requested"), result.stdout

    def rotated(seen: list[tuple[str, ...]]) -> bool:
        return len(seen[-1]) == 1 and seen[-1] != first

    # Three steps 40 s apart, each taken at a replica's next reconcile (every 60 s).
    assert bundles.wait_for(rotated, timeout=300), bundles.history
    TIMINGS["certs rotate-ca -> old CA dropped"] = bundles.history[-1][0] - requested
    seen = [bundle for when, bundle in bundles.history if when >= requested]
    new_ca = seen[-1][0]
    # As the API server saw it: never a bundle without the CA of the certificate being served.
    assert seen == [(first[0], new_ca), (new_ca,)], bundles.history
    secret = _get(kubectl, "secret", "-n", DEPLOY_NS, f"{RELEASE}-tls")
    assert ca_fingerprints(secret["data"]["ca.crt"]) == (new_ca,)
    ca = load_certificates(base64.b64decode(secret["data"]["ca.crt"]))[0]
    server_name = f"{RELEASE}.{DEPLOY_NS}.svc"

    def serving_new() -> str | None:
        wrong = [
            p["metadata"]["name"]
            for p in _webhook_pods(kubectl)
            if not signed_by(_served_certificate(p["status"]["podIP"], server_name), ca)
        ]
        return f"still the old CA's certificate: {wrong}" if wrong else None

    _eventually(serving_new, timeout=60, what="the webhook pods not serving the new certificate")
    # The same processes, which loaded the switched certificate from their mount (a second
    # load) without a restart.
    pods = _webhook_pods(kubectl)
    assert {p["metadata"]["name"] for p in pods} == pods_before
    for pod in pods:
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        text = _metrics(pod["status"]["podIP"])
        loaded = _metric(text, "mirrorgate_certificate_reloads_total", result="loaded")
        assert loaded >= 2, (pod["metadata"]["name"], loaded)
    admissions = loop.results(since=requested)
    assert len(admissions) >= 100, f"only {len(admissions)} pods created during the rotation"
    assert all(a.rewritten for a in admissions), _lost(admissions)
    failures = _apiserver_webhook_failures(plane, installed.log_offset)
    assert not failures, "\n".join(failures[:10])
    status = _mirrorgate(
        "deploy",
        "status",
        "--config",
        str(installed.config),
        "--kubeconfig",
        str(installed.kubeconfig),
    ).stdout
    assert "caBundle 1 CA(s)" in status and "CA rotation in progress" not in status, status


def _served_certificate(ip: str, server_name: str) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # read what it presents; trust is checked by signed_by
    with (
        socket.create_connection((ip, 8443), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# --- 5. uninstall ---------------------------------------------------------------------------------
def test_deploy_uninstall_removes_everything_and_pods_stay_creatable(
    plane: ControlPlane, kubectl: Kubectl, installed: Setup, loop: AdmissionLoop
) -> None:
    loop.stop()
    everything = loop.results()
    TIMINGS["pods created through the webhook"] = float(len(everything))
    assert all(a.rewritten for a in everything), _lost(everything)
    result = _mirrorgate(
        "deploy",
        "uninstall",
        "--config",
        str(installed.config),
        "--kubeconfig",
        str(installed.kubeconfig),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"deleted    MutatingWebhookConfiguration {RELEASE}", result.stdout
    for copy in (installed.first_pod_namespace, installed.loop_namespace):
        assert f"deleted    Secret {copy}/{PULL_SECRET} (copy)" in lines, result.stdout
    started = time.monotonic()

    def gone() -> str | None:
        left = kubectl.run(
            "get",
            "all,secrets,configmaps,pvc,serviceaccounts,roles,rolebindings,pdb",
            "-A",
            "-l",
            "app.kubernetes.io/managed-by=mirrorgate",
            "-o",
            "name",
        ).stdout.split()
        left += [
            ns
            for ns in (DEPLOY_NS, REGISTRY_NS)
            if kubectl.run("get", "namespace", ns, check=False).returncode == 0
        ]
        left += kubectl.run(
            "get",
            "clusterroles,clusterrolebindings,mutatingwebhookconfigurations",
            "-l",
            "app.kubernetes.io/managed-by=mirrorgate",
            "-o",
            "name",
        ).stdout.split()
        return f"left: {left}" if left else None

    _eventually(gone, timeout=120, what="deploy uninstall did not remove everything")
    TIMINGS["uninstall -> namespaces gone"] = time.monotonic() - started
    status = _mirrorgate(
        "deploy",
        "status",
        "--config",
        str(installed.config),
        "--kubeconfig",
        str(installed.kubeconfig),
    )
    assert status.returncode == 1 and "mirrorgate is not installed" in status.stdout
    # Pods are created (and run) as if mirrorgate had never been there.
    ns = installed.first_pod_namespace
    _apply(
        kubectl,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "after", "namespace": ns},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {"name": "app", "image": app_image().reference, "imagePullPolicy": "Never"}
                ],
            },
        },
    )
    _wait_ready(kubectl, ns, "after")
    pod = _get(kubectl, "pod", "-n", ns, "after")
    assert pod["spec"]["containers"][0]["image"] == app_image().reference
    assert "imagePullSecrets" not in pod["spec"]
    assert "mirrorgate.io/original-images" not in (pod["metadata"].get("annotations") or {})
