"""mirrorgate on a real node, as a kubectl 1.20 user sees it: pods are admitted by the real
`mirrorgate serve`, pulled by containerd and run.

The module runs its own control plane and node (`LocalNode`: containerd, kubelet, kube-proxy,
controller-manager, scheduler), never the session's control plane, whose other tests fake a
kubelet. One node runs per machine, so this module must not run in parallel with test_node.py.
Shared by every test: a registry pod (the locally built docker-registry image, htpasswd auth)
behind a NodePort, reached by the node as `127.0.0.1:<nodePort>`, which is the mirror; a plain
host registry on 127.0.0.1, which is an upstream the node can pull from.

Each test starts its own `serve` (as a host process, registered by URL with a
MutatingWebhookConfiguration that selects only its own namespaces) and proves one thing:

1. an upstream image is rewritten to the mirror, the pull secret is copied into the namespace by
   serve, containerd pulls with it (the registry's access log shows it) and the pod runs;
2. with wrong credentials in the source Secret the kubelet's real 401 Event is counted as
   `mirror_auth` and the shipped MirrorgateMirrorPullsFailing alert fires in a real Prometheus;
3. an image the mirror lacks keeps its upstream reference (kubectl prints mirrorgate's warning)
   and the pod pulls it from the upstream and runs;
4. a Deployment in a namespace that opts in after serve started runs from the mirror without a
   failed pull, because the pull secret is created at admission (serve is not the leader there,
   so no reconcile could have made it). The one failure tolerated, here and wherever a pod names
   a pull secret, is Kubernetes' own: a kubelet that asks for the existing secret before the Node
   authorizer knows the pod is bound to it pulls without credentials once
   (`assert_no_failed_pull` checks the kubelet's log for exactly that, and warns);
5. `mirrorgate deploy apply --wait` installs the hosted registry and a pull-through cache (the
   locally built image) that become available, take a skopeo push with the generated
   credentials, and serve pods: one pulls the pushed image, one is rewritten to the cache, which
   fetches it from its upstream on the node IP;
6. with two mirrors for docker.io, a pod runs from the first; once the first is stopped, the next
   pod runs from the second, kubectl prints why the first was passed over, and
   `kubectl describe pod` shows mirrorgate's MirrorFallback and ImageRewritten Events (the
   dry-run probes left none).

A machine that cannot run a node fails every test with the reason, never skips.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirrorgate.deploy.webhooks import mutating_webhook_configuration
from mirrorgate.devtools.demo import LocalWebhook
from mirrorgate.devtools.images import ImageBuildError, OciImage, app_image, push_image
from mirrorgate.devtools.images import registry_image as local_registry_image
from mirrorgate.devtools.localcluster import (
    ControlPlane,
    Kubectl,
    LocalClusterError,
    LocalRegistry,
    free_port,
)
from mirrorgate.devtools.node import LocalNode
from mirrorgate.webhook.core.rbac import LEASE_NAME
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.node import (
    ClusterRegistry,
    HostRegistry,
    PendingSince,
    Prometheus,
    apply,
    create_namespace,
    dockerconfigjson,
    eventually,
    fail,
    free_node_ports,
    metric,
    pull_secret,
    require_node,
    scrape,
    start_cluster_registry,
    start_node,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "monitoring" / "mirrorgate.rules.yml"
OPT_IN = "mirrorgate.io/enabled"
# Each test's webhook configuration selects only namespaces carrying its own value here, so the
# serves of different tests never see each other's pods.
SCENARIO_LABEL = "e2e.mirrorgate.io/scenario"
MANAGED_BY = "app.kubernetes.io/managed-by"
REGISTRY_USER = "mirrorgate"
SOURCE = "registry-pull"
PULL_FAILURES_ALERT = "MirrorgateMirrorPullsFailing"

# What each image prints: `kubectl logs` tells which registry a pod's image really came from.
MIRROR_LINE = "mirrorgate node scenarios: pulled from the mirror"
UPSTREAM_LINE = "mirrorgate node scenarios: pulled from the upstream"
CACHE_LINE = "mirrorgate node scenarios: pulled through the deployed cache"
HOSTED_LINE = "mirrorgate node scenarios: pushed to the deployed registry"
FIRST_LINE = "mirrorgate node scenarios: pulled from the first of two mirrors"
# docker.io/library/app:1 as the user writes it; pushed to the mirror beforehand.
UPSTREAM_APP = "app:1"
MIRROR_PATH = "library/app:1"
# Only on the upstream registry: the mirror never has it.
UPSTREAM_ONLY_PATH = "team/upstream-only:1"
TIMINGS: dict[str, float] = {}


def _image(line: str, name: str) -> OciImage:
    try:
        return app_image(line=line, reference=f"mirrorgate.local/{name}:1")
    except LocalClusterError as err:
        fail(err)


# --- the module's cluster: control plane, node, mirror, upstream ---------------------------------
@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    require_node()  # say why before starting anything
    control_plane = ControlPlane(tmp_path_factory.mktemp("scenarios-plane"))
    started = time.monotonic()
    try:
        control_plane.start()
    except LocalClusterError as err:
        control_plane.stop()
        fail(err)
    TIMINGS["control plane ready"] = time.monotonic() - started
    try:
        yield control_plane
    finally:
        control_plane.stop()


@pytest.fixture(scope="module")
def node(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    try:
        images = [local_registry_image()]
    except LocalClusterError as err:
        fail(err)
    local = start_node(plane, tmp_path_factory.mktemp("scenarios-node"), images=images)
    TIMINGS["node ready"] = local.timings.get("ready", 0.0)
    try:
        yield local
    finally:
        started = time.monotonic()
        local.stop()
        TIMINGS["node stop"] = time.monotonic() - started
        print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def kubectl(plane: ControlPlane, node: LocalNode) -> Kubectl:
    try:
        return plane.kubectl()
    except LocalClusterError as err:
        fail(err)


@pytest.fixture(scope="module")
def mirror(kubectl: Kubectl) -> ClusterRegistry:
    """The registry pod behind a NodePort, holding docker.io's library/app:1."""
    started = time.monotonic()
    registry = start_cluster_registry(
        kubectl,
        create_namespace(kubectl, "scenarios-mirror"),
        image=local_registry_image().reference,
        username=REGISTRY_USER,
    )
    TIMINGS["mirror registry available"] = time.monotonic() - started
    push_image(
        _image(MIRROR_LINE, "app-mirror"),
        f"{registry.host}/{MIRROR_PATH}",
        username=registry.username,
        password=registry.password,
    )
    return registry


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry on 127.0.0.1 without auth: an upstream the node can pull from."""
    registry = LocalRegistry(tmp_path_factory.mktemp("scenarios-upstream"))
    try:
        registry.start()
    except LocalClusterError as err:
        fail(err)
    try:
        push_image(_image(UPSTREAM_LINE, "app-upstream"), f"{registry.host}/{UPSTREAM_ONLY_PATH}")
        yield registry
    finally:
        registry.stop()


# --- kubectl views --------------------------------------------------------------------------------
def jsonpath(kubectl: Kubectl, namespace: str, what: str, path: str) -> str:
    return kubectl.run("get", "-n", namespace, what, "-o", f"jsonpath={path}").stdout.strip()


def events(kubectl: Kubectl, namespace: str) -> str:
    return kubectl.run("get", "events", "-n", namespace).stdout


def containerd_requests(access_log: str, repository: str) -> list[str]:
    """Access-log lines of containerd's successful requests for `repository`."""
    return [
        line
        for line in access_log.splitlines()
        if "containerd/" in line
        and re.search(rf'"(GET|HEAD) /v2/{re.escape(repository)}/\S+ HTTP/1.1" 200 ', line)
    ]


def assert_pulled(access_log: str, repository: str, image: OciImage) -> None:
    """containerd fetched the manifest and the config of `image` as `repository`, and no blob
    of another image. (The app images share their busybox layer: one already on the node is
    not fetched again; the config, which holds the printed line, is each image's own.)"""
    lines = containerd_requests(access_log, repository)
    assert any("/manifests/" in line for line in lines), access_log[-3000:]
    fetched = set(re.findall(r"/blobs/(sha256:[0-9a-f]{64}) ", "\n".join(lines)))
    config, *_layers = image.blob_digests()
    assert config in fetched and fetched <= set(image.blob_digests()), access_log[-3000:]


def assert_no_failed_pull(node: LocalNode, events_text: str, namespace: str, secret: str) -> None:
    """No pull in `namespace` failed, or each failure is Kubernetes' own race and not a missing
    secret: the kubelet asked for the (existing) pull secret before the API server's Node
    authorizer knew the pod was bound to it ("no relationship found between node ... and this
    object"), gave up after its one-second wait and pulled without credentials
    (kubernetes/kubernetes#133269). A failure for any other reason fails the test."""
    failing = sorted(set(re.findall(r"pod/(\S+)\s+Failed to pull image", events_text)))
    if not failing:
        assert "Failed" not in events_text and "BackOff" not in events_text, events_text
        return
    kubelet_log = node.log_path("kubelet").read_text(errors="replace")
    denied = re.search(
        rf'object-"{namespace}"/"{secret}": Failed to watch \*v1.Secret: .*'
        "no relationship found between node",
        kubelet_log,
    )
    unexplained = [
        pod
        for pod in failing
        if f"Unable to retrieve pull secret {namespace}/{secret} for {namespace}/{pod} due to "
        "failed to sync secret cache" not in kubelet_log
    ]
    assert denied and not unexplained, events_text
    warnings.warn(
        f"pods {', '.join(failing)} failed their first pull: the kubelet could not read the pull "
        "secret yet (Node authorizer race, kubernetes/kubernetes#133269), not a missing secret",
        stacklevel=2,
    )


def secret_or_none(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    result = kubectl.run("get", "secret", "-n", namespace, name, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return dict(json.loads(result.stdout))


def delete_namespace(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)


# --- one serve per test ---------------------------------------------------------------------------
@dataclass
class Serve:
    """A running `mirrorgate serve` and the webhook configuration that sends it pods."""

    scenario: str
    webhook: LocalWebhook
    system_namespace: str  # POD_NAMESPACE: the source Secret and the Lease
    pull_secret: str

    @property
    def labels(self) -> dict[str, str]:
        """What a namespace needs for this serve's webhook configuration to select it."""
        return {OPT_IN: "true", SCENARIO_LABEL: self.scenario}

    def metrics(self) -> str:
        return scrape(self.webhook.metrics_port)

    def wait_admitting(
        self, kubectl: Kubectl, namespace: str, mirror: ClusterRegistry | LocalRegistry
    ) -> None:
        """Until the API server sends this namespace's pods to serve (its webhook configuration
        and the namespace's labels reach the API server's caches a moment after they change):
        a dry-run pod (named `probe`) comes back rewritten to `mirror`. A dry run has no side
        effects: no pull-secret copy, no Event."""

        def rewritten() -> str | None:
            image = kubectl.run(
                "run",
                "probe",
                "-n",
                namespace,
                f"--image={UPSTREAM_APP}",
                "--restart=Never",
                "--dry-run=server",
                "-o",
                "jsonpath={.spec.containers[0].image}",
            ).stdout
            return None if image.startswith(mirror.host) else f"admitted as {image!r}"

        eventually(rewritten, timeout=30, what=f"serve not admitting pods in {namespace}")


def hold_lease(kubectl: Kubectl, namespace: str) -> None:
    """A placeholder holds the Lease for an hour: a serve there follows and never reconciles."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    apply(
        kubectl,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": namespace},
            "spec": {
                "holderIdentity": "e2e-placeholder",
                "leaseDurationSeconds": 3600,
                "renewTime": now,
            },
        },
    )


@contextlib.contextmanager
def serving(
    plane: ControlPlane,
    kubectl: Kubectl,
    mirror: ClusterRegistry,
    upstream: LocalRegistry,
    work: Path,
    *,
    scenario: str,
    source_password: str | None = None,
    lead: bool = True,
    first_mirror: LocalRegistry | None = None,
) -> Iterator[Serve]:
    """serve with docker.io and the upstream mirrored to the mirror pod, its pull secret copied
    from a source Secret holding `source_password` (default: the right one); `lead=False` keeps
    it from ever holding its Lease; `first_mirror` is tried for docker.io before the mirror pod."""
    system = create_namespace(kubectl, f"mg-{scenario}")
    password = mirror.password if source_password is None else source_password
    apply(
        kubectl,
        pull_secret(system, SOURCE, dockerconfigjson(mirror.host, mirror.username, password)),
    )
    if not lead:
        hold_lease(kubectl, system)
    work.mkdir(parents=True, exist_ok=True)
    # serve's own credentials for the mirror check are always right: a wrong pull secret is
    # what this product can get wrong without noticing at admission.
    (work / "username").write_text(mirror.username)
    (work / "password").write_text(mirror.password)
    name = f"mirror-pull-{scenario}"
    config = work / "mirrorgate.yaml"
    docker_io = f'"{mirror.host}"'
    first = extra = ""
    if first_mirror is not None:
        docker_io = f'["{first_mirror.host}", "{mirror.host}"]'
        first = f'  "{first_mirror.host}": {{plainHTTP: true}}\n'
        # "The first mirror has it" is reused for positiveTTL (60 s by default): a mirror that
        # just stopped is noticed when that answer expires. 1 s keeps the test short.
        extra = "registryClient: {positiveTTL: 1s}\n"
    config.write_text(
        f"""\
mirrors:
  - {{upstream: docker.io, mirror: {docker_io}, type: hosted}}
  - {{upstream: "{upstream.host}", mirror: "{mirror.host}/upstream", type: hosted}}
registries:
{first}  "{mirror.host}":
    plainHTTP: true
    auth: {{usernameFile: {work / "username"}, passwordFile: {work / "password"}}}
pullSecret: {{name: {name}, source: {system}/{SOURCE}}}
namespaces: {{mode: optIn}}
verifyTimeout: 3s
{extra}"""
    )
    kubeconfig = plane.write_kubeconfig(work / "kubeconfig", token=plane.admin_token)
    webhook = LocalWebhook(
        work / "serve",
        config,
        env={"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": system, "POD_NAME": scenario},
    )
    try:
        webhook.start()
    except LocalClusterError as err:
        fail(err)
    hook_name = f"node-scenarios-{scenario}"
    try:
        apply(
            kubectl,
            mutating_webhook_configuration(
                hook_name,
                url=webhook.url,
                ca_pem=webhook.ca_pem,
                namespace_selector={"matchLabels": {OPT_IN: "true", SCENARIO_LABEL: scenario}},
                side_effects="NoneOnDryRun",
                timeout_seconds=10,
            ),
        )
        yield Serve(scenario, webhook, system, name)
    finally:
        kubectl.run("delete", "mutatingwebhookconfiguration", hook_name, check=False)
        webhook.stop()
        delete_namespace(kubectl, system)


def run_app(kubectl: Kubectl, namespace: str, image: str) -> subprocess.CompletedProcess[str]:
    """`kubectl run app` as a user types it; a fresh pull every time (`Always`): an image already
    on the node would otherwise run without any credentials."""
    return kubectl.run(
        "run",
        "app",
        "-n",
        namespace,
        f"--image={image}",
        "--image-pull-policy=Always",
        "--restart=Never",
    )


# --- 1. rewritten, pulled with the copied secret, running ---------------------------------------
def test_an_upstream_image_runs_from_the_mirror_pulled_with_the_secret_serve_copied(
    plane: ControlPlane,
    node: LocalNode,
    kubectl: Kubectl,
    mirror: ClusterRegistry,
    upstream: LocalRegistry,
    tmp_path: Path,
) -> None:
    with serving(plane, kubectl, mirror, upstream, tmp_path, scenario="mirror") as serve:
        namespace = create_namespace(kubectl, "s1-mirror", labels=serve.labels)
        serve.wait_admitting(kubectl, namespace, mirror)

        created = run_app(kubectl, namespace, UPSTREAM_APP)
        assert created.stdout.strip() == "pod/app created", created.stdout
        assert "Warning" not in created.stderr, created.stderr
        pod = json.loads(kubectl.run("get", "pod", "-n", namespace, "app", "-o", "json").stdout)
        assert pod["spec"]["containers"][0]["image"] == f"{mirror.host}/{MIRROR_PATH}"
        assert pod["spec"]["imagePullSecrets"] == [{"name": serve.pull_secret}]
        copy = secret_or_none(kubectl, namespace, serve.pull_secret)
        assert copy is not None and copy["metadata"]["labels"][MANAGED_BY] == "mirrorgate"
        assert copy["type"] == "kubernetes.io/dockerconfigjson"

        TIMINGS["pod Running from the mirror"] = wait_ready(kubectl, namespace, "pod/app")
        listed = kubectl.run("get", "pods", "-n", namespace).stdout
        assert re.search(r"^app\s+1/1\s+Running\s+0\s", listed, re.MULTILINE), listed
        assert kubectl.run("logs", "-n", namespace, "app").stdout.strip() == MIRROR_LINE
        seen = events(kubectl, namespace)
        assert f'Successfully pulled image "{mirror.host}/{MIRROR_PATH}"' in seen, seen
        assert_no_failed_pull(node, seen, namespace, serve.pull_secret)
        # containerd itself fetched the manifest and every blob from the registry pod.
        assert_pulled(mirror.logs(kubectl), "library/app", _image(MIRROR_LINE, "app-mirror"))
        delete_namespace(kubectl, namespace)


# --- 2. wrong credentials: counted, and the shipped alert fires ----------------------------------
def test_a_pull_secret_with_a_wrong_password_is_counted_and_fires_the_pull_failure_alert(
    plane: ControlPlane,
    kubectl: Kubectl,
    mirror: ClusterRegistry,
    upstream: LocalRegistry,
    tmp_path: Path,
) -> None:
    with serving(
        plane,
        kubectl,
        mirror,
        upstream,
        tmp_path / "wrong",
        scenario="wrong",
        source_password="not-" + mirror.password,
    ) as serve:
        # Only the lease holder counts Events.
        eventually(
            lambda: (
                None
                if metric(serve.metrics(), "mirrorgate_pullsecret_leader") == 1
                else "not leading"
            ),
            timeout=30,
            what="serve never became the leader",
        )
        namespace = create_namespace(kubectl, "s2-wrong", labels=serve.labels)
        serve.wait_admitting(kubectl, namespace, mirror)
        run_app(kubectl, namespace, UPSTREAM_APP)
        rewritten = f"{mirror.host}/{MIRROR_PATH}"
        assert jsonpath(kubectl, namespace, "pod/app", "{.spec.containers[0].image}") == rewritten

        def pull_failing() -> str | None:
            reason = jsonpath(
                kubectl,
                namespace,
                "pod/app",
                "{.status.containerStatuses[0].state.waiting.reason}",
            )
            return None if reason in ("ErrImagePull", "ImagePullBackOff") else repr(reason)

        eventually(pull_failing, timeout=60, what="the pod is not failing to pull")
        seen = events(kubectl, namespace)
        failed = [
            line for line in seen.splitlines() if f'Failed to pull image "{rewritten}"' in line
        ]
        assert failed and "401 Unauthorized" in failed[0], seen
        described = kubectl.run("describe", "pod", "-n", namespace, "app").stdout
        assert re.search(r"Reason:\s+(ErrImagePull|ImagePullBackOff)", described), described

        labels = {"namespace": namespace, "registry": mirror.host, "kind": "mirror_auth"}
        eventually(
            lambda: (
                None
                if metric(serve.metrics(), "mirrorgate_image_pull_failures_total", **labels) >= 1
                else "not counted"
            ),
            timeout=30,
            what="the kubelet's 401 Event was not counted as mirror_auth",
        )

        # The alert has `for: 5m`. Prometheus starts with a record of it pending for six minutes
        # for exactly these labels (what a restarted Prometheus finds in its TSDB); the record
        # only turns into a firing alert if the shipped expression, over what serve exposes,
        # yields these labels at Prometheus's first evaluations.
        active_at = time.time() - 6 * 60
        prometheus = Prometheus(
            tmp_path / "prometheus",
            target=f"127.0.0.1:{serve.webhook.metrics_port}",
            rule_files=[RULES],
            history=[PendingSince(PULL_FAILURES_ALERT, labels, active_at=active_at)],
        ).start()
        try:
            started = time.monotonic()

            def firing() -> str | None:
                found = [
                    a
                    for a in prometheus.alerts()
                    if a["labels"]["alertname"] == PULL_FAILURES_ALERT
                ]
                if any(a["state"] == "firing" for a in found):
                    return None
                return f"alerts: {found}"

            eventually(firing, timeout=60, what=f"{PULL_FAILURES_ALERT} did not fire")
            TIMINGS["pull-failure alert firing after Prometheus start"] = time.monotonic() - started
            (alert,) = [
                a for a in prometheus.alerts() if a["labels"]["alertname"] == PULL_FAILURES_ALERT
            ]
        finally:
            prometheus.stop()
        assert alert["labels"] == {
            "alertname": PULL_FAILURES_ALERT,
            **labels,
            "severity": "warning",
        }
        assert alert["annotations"]["summary"] == (
            f"Pulls from mirror {mirror.host} fail in {namespace} (mirror_auth)"
        )
        restored = dt.datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00"))
        assert abs(restored.timestamp() - int(active_at)) < 2, alert
        delete_namespace(kubectl, namespace)


# --- 3. a verify miss keeps the upstream, and the pod still runs ---------------------------------
def test_an_image_the_mirror_lacks_keeps_its_upstream_with_a_warning_and_runs_from_there(
    plane: ControlPlane,
    kubectl: Kubectl,
    mirror: ClusterRegistry,
    upstream: LocalRegistry,
    tmp_path: Path,
) -> None:
    with serving(plane, kubectl, mirror, upstream, tmp_path, scenario="miss") as serve:
        namespace = create_namespace(kubectl, "s3-miss", labels=serve.labels)
        serve.wait_admitting(kubectl, namespace, mirror)
        image = f"{upstream.host}/{UPSTREAM_ONLY_PATH}"

        created = run_app(kubectl, namespace, image)
        assert created.stdout.strip() == "pod/app created", created.stdout
        assert (
            f'Warning: mirrorgate: container "app" keeps image "{image}": mirror {mirror.host} '
            "cannot serve it (not on the mirror)"
        ) in created.stderr, created.stderr
        pod = json.loads(kubectl.run("get", "pod", "-n", namespace, "app", "-o", "json").stdout)
        assert pod["spec"]["containers"][0]["image"] == image
        assert "imagePullSecrets" not in pod["spec"]

        TIMINGS["pod Running from the upstream"] = wait_ready(kubectl, namespace, "pod/app")
        assert kubectl.run("logs", "-n", namespace, "app").stdout.strip() == UPSTREAM_LINE
        seen = events(kubectl, namespace)
        assert f'Successfully pulled image "{image}"' in seen and "Failed" not in seen, seen
        access_log = (upstream.work_dir / "registry.log").read_text(errors="replace")
        assert_pulled(access_log, "team/upstream-only", _image(UPSTREAM_LINE, "app-upstream"))
        fallbacks = metric(
            serve.metrics(),
            "mirrorgate_images_fallback_total",
            upstream=upstream.host,
            reason="not_found",
        )
        assert fallbacks >= 1
        delete_namespace(kubectl, namespace)


# --- 4. opted in late: the secret is made at admission, no pull ever fails -----------------------
def test_a_deployment_in_a_namespace_that_opts_in_late_never_fails_a_pull(
    plane: ControlPlane,
    node: LocalNode,
    kubectl: Kubectl,
    mirror: ClusterRegistry,
    upstream: LocalRegistry,
    tmp_path: Path,
) -> None:
    with serving(plane, kubectl, mirror, upstream, tmp_path, scenario="late", lead=False) as serve:
        namespace = create_namespace(kubectl, "s4-late")
        kubectl.run("label", "namespace", namespace, *(f"{k}={v}" for k, v in serve.labels.items()))
        serve.wait_admitting(kubectl, namespace, mirror)
        # serve follows (a placeholder holds its Lease), so nothing reconciles the namespace,
        # and the dry-run probe created nothing.
        assert metric(serve.metrics(), "mirrorgate_pullsecret_leader") == 0
        assert secret_or_none(kubectl, namespace, serve.pull_secret) is None

        labels = {"app": "late"}
        container = {"name": "app", "image": UPSTREAM_APP, "imagePullPolicy": "Always"}
        output = apply(
            kubectl,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "late", "namespace": namespace},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]},
                    },
                },
            },
        )
        assert "deployment.apps/late created" in output and "Warning" not in output, output
        kubectl.run(
            "rollout", "status", "-n", namespace, "deploy/late", "--timeout=90s", timeout=120
        )
        pods = json.loads(kubectl.run("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        assert len(pods) == 2
        for pod in pods:
            name = pod["metadata"]["name"]
            assert pod["spec"]["containers"][0]["image"] == f"{mirror.host}/{MIRROR_PATH}"
            assert pod["spec"]["imagePullSecrets"] == [{"name": serve.pull_secret}]
            assert kubectl.run("logs", "-n", namespace, name).stdout.strip() == MIRROR_LINE
        listed = kubectl.run("get", "pods", "-n", namespace).stdout
        assert len(re.findall(r"\s1/1\s+Running\s+0\s", listed)) == 2, listed
        seen = events(kubectl, namespace)
        assert_no_failed_pull(node, seen, namespace, serve.pull_secret)
        assert seen.count(f'Successfully pulled image "{mirror.host}/{MIRROR_PATH}"') == 2, seen

        copy = secret_or_none(kubectl, namespace, serve.pull_secret)
        assert copy is not None and copy["metadata"]["labels"][MANAGED_BY] == "mirrorgate"
        # One create for both pods, made while admitting them.
        text = serve.metrics()
        assert metric(text, "mirrorgate_pullsecret_writes_total", operation="admission_create") == 1
        assert metric(text, "mirrorgate_pullsecret_writes_total", operation="create") == 0
        assert [
            r
            for r in serve.webhook.log_records()
            if r.get("msg") == "pull secret created at admission"
            and r.get("namespace") == namespace
        ], serve.webhook.log_tail()
        delete_namespace(kubectl, namespace)


# --- 5. mirrorgate deploy apply --wait on the node ----------------------------------------------
def deploy_config(
    work: Path, *, release: str, node_ports: list[int], cache_upstream: str, registry_image: str
) -> str:
    hosted, cache = node_ports
    # What the deployer mounts in the cluster, for the serve that runs outside it: how to reach
    # the installed registries (plain HTTP on the NodePorts) with the generated pull secret.
    access = f"{{plainHTTP: true, dockerConfigFile: {work / 'dockerconfig.json'}}}"
    return f"""\
pullSecret: {{name: mirrorgate-pull, source: {release}-reg/mirrorgate-pull}}
namespaces: {{mode: optIn}}
registry:
  namespace: {release}-reg
  image: {registry_image}
  pullPath: nodePort
  nodePort: {hosted}
  auth: {{bcryptCost: 4}}
  storage: {{filesystem: {{size: 64Mi}}}}
  proxies:
    - {{upstream: docker.io, remoteURL: "{cache_upstream}", nodePort: {cache}}}
deploy: {{name: {release}, namespace: {release}-mg}}
registries:
  "127.0.0.1:{hosted}": {access}
  "127.0.0.1:{cache}": {access}
"""


def persistent_volumes(work: Path, namespace: str, claims: list[str]) -> list[dict[str, Any]]:
    """A hostPath volume bound to each claim the deployer makes: the node has no provisioner.

    The registry runs as uid 1000 and hostPath ignores fsGroup, so the folders are writable by
    everyone.
    """
    volumes = []
    for claim in claims:
        folder = work / "volumes" / claim
        folder.mkdir(parents=True)
        os.chmod(folder, 0o777)
        volumes.append(
            {
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
        )
    return volumes


def deploy(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mirrorgate_exe(), "deploy", *args], capture_output=True, text=True, timeout=timeout
    )


def test_deploy_apply_wait_installs_registries_that_take_pushes_and_serve_pods(
    plane: ControlPlane,
    node: LocalNode,
    kubectl: Kubectl,
    tmp_path: Path,
) -> None:
    release = f"s5-{secrets.token_hex(3)}"
    registry_ns, webhook_ns = f"{release}-reg", f"{release}-mg"
    hosted_port, cache_port = ports = free_node_ports(kubectl, 2)
    hosted, cache = f"127.0.0.1:{hosted_port}", f"127.0.0.1:{cache_port}"
    # The cache pings its upstream at start and exits if it can't: the upstream listens on the
    # node IP, which a pod reaches (127.0.0.1 inside a pod is the pod itself).
    cache_upstream = HostRegistry(tmp_path / "cache-upstream", address=node.node_ip).start()
    cached_image = _image(CACHE_LINE, "app-cached")
    push_image(cached_image, f"{cache_upstream.host}/library/cached:1")
    config = tmp_path / "mirrorgate.yaml"
    config.write_text(
        deploy_config(
            tmp_path,
            release=release,
            node_ports=ports,
            cache_upstream=cache_upstream.url,
            registry_image=local_registry_image().reference,
        )
    )
    volumes = persistent_volumes(
        tmp_path, registry_ns, ["registry-data", "registry-proxy-docker-io-data"]
    )
    apply(kubectl, *volumes)
    webhook_port = free_port()
    kubeconfig = str(plane.kubeconfig)
    webhook: LocalWebhook | None = None
    try:
        started = time.monotonic()
        applied = deploy(
            "apply",
            "--config",
            str(config),
            "--kubeconfig",
            kubeconfig,
            "--webhook-url",
            f"https://127.0.0.1:{webhook_port}",
            "--cert-out",
            str(tmp_path / "certs"),
            "--wait",
            "--timeout",
            "120",
        )
        TIMINGS["deploy apply --wait"] = time.monotonic() - started
        assert applied.returncode == 0, (
            f"{applied.stdout}\n{applied.stderr}\n"
            + kubectl.run("describe", "pods", "-n", registry_ns, check=False).stdout
        )
        for name in ("registry", "registry-proxy-docker-io"):
            assert f"created    Deployment {registry_ns}/{name}" in applied.stdout, applied.stdout
        listed = kubectl.run("get", "deployments", "-n", registry_ns).stdout
        for name in ("registry", "registry-proxy-docker-io"):
            assert re.search(rf"^{name}\s+1/1\s+1\s+1\s", listed, re.MULTILINE), listed

        # Push with the generated credentials, read back from the Secret the deployer made.
        def credential(key: str) -> str:
            value = jsonpath(
                kubectl, registry_ns, "secret/registry-credentials", f"{{.data.{key}}}"
            )
            return base64.b64decode(value).decode()

        username, password = credential("username"), credential("password")
        hosted_image = _image(HOSTED_LINE, "app-hosted")
        push_image(hosted_image, f"{hosted}/team/app:5", username=username, password=password)
        with pytest.raises(ImageBuildError, match="(?i)unauthorized|authentication required"):
            push_image(hosted_image, f"{hosted}/team/app:6", username=username, password="wrong")

        # The webhook runs outside the cluster, on the certificate apply wrote for it.
        (tmp_path / "dockerconfig.json").write_text(
            base64.b64decode(
                jsonpath(
                    kubectl, registry_ns, "secret/mirrorgate-pull", "{.data.\\.dockerconfigjson}"
                )
            ).decode()
        )
        webhook = LocalWebhook(
            tmp_path / "serve",
            config,
            env={
                "KUBECONFIG": kubeconfig,
                "POD_NAMESPACE": webhook_ns,
                "POD_NAME": "mirrorgate-0",
            },
        )
        certs = tmp_path / "certs"
        webhook.cert_file, webhook.key_file = certs / "tls.crt", certs / "tls.key"
        webhook.ca_pem = (certs / "ca.crt").read_bytes()
        try:
            webhook.start(port=webhook_port)
        except LocalClusterError as err:
            fail(err)

        namespace = create_namespace(kubectl, "s5-apps", labels={OPT_IN: "true"})

        def rewritten_to_cache() -> str | None:
            image = kubectl.run(
                "run",
                "probe",
                "-n",
                namespace,
                "--image=cached:1",
                "--restart=Never",
                "--dry-run=server",
                "-o",
                "jsonpath={.spec.containers[0].image}",
            ).stdout
            return None if image == f"{cache}/library/cached:1" else f"admitted as {image!r}"

        eventually(rewritten_to_cache, timeout=30, what="the deployed webhook configuration")
        # The running serve (the lease holder) copies the pull secret into the namespace.
        eventually(
            lambda: (
                None
                if secret_or_none(kubectl, namespace, "mirrorgate-pull") is not None
                else "no copy yet"
            ),
            timeout=15,
            what="serve did not copy the pull secret",
        )

        # A pod of the pushed image: it is on the hosted registry already, so it is not
        # rewritten and names the pull secret itself.
        hosted_pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "hosted", "namespace": namespace},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "imagePullSecrets": [{"name": "mirrorgate-pull"}],
                "containers": [
                    {"name": "app", "image": f"{hosted}/team/app:5", "imagePullPolicy": "Always"}
                ],
            },
        }
        assert "pod/hosted created" in apply(kubectl, hosted_pod)
        TIMINGS["pod Running from the deployed registry"] = wait_ready(
            kubectl, namespace, "pod/hosted"
        )
        assert kubectl.run("logs", "-n", namespace, "hosted").stdout.strip() == HOSTED_LINE
        registry_log = kubectl.run("logs", "-n", registry_ns, "deploy/registry").stdout
        assert_pulled(registry_log, "team/app", hosted_image)

        # An upstream image: rewritten to the cache, which fetches it from its upstream.
        created = kubectl.run(
            "run",
            "cached",
            "-n",
            namespace,
            "--image=cached:1",
            "--image-pull-policy=Always",
            "--restart=Never",
        )
        assert created.stdout.strip() == "pod/cached created" and "Warning" not in created.stderr
        assert (
            jsonpath(kubectl, namespace, "pod/cached", "{.spec.containers[0].image}")
            == f"{cache}/library/cached:1"
        )
        TIMINGS["pod Running through the deployed cache"] = wait_ready(
            kubectl, namespace, "pod/cached"
        )
        assert kubectl.run("logs", "-n", namespace, "cached").stdout.strip() == CACHE_LINE
        cache_log = kubectl.run("logs", "-n", registry_ns, "deploy/registry-proxy-docker-io").stdout
        assert_pulled(cache_log, "library/cached", cached_image)
        # The cache, not the node, went to the upstream: the request came from the pod network.
        assert re.search(
            r'^10\.217\.0\.\d+ .*"(GET|HEAD) /v2/library/cached/manifests/1 HTTP/1.1" 200 ',
            cache_upstream.log(),
            re.MULTILINE,
        ), cache_upstream.log()[-3000:]
        assert_no_failed_pull(node, events(kubectl, namespace), namespace, "mirrorgate-pull")
        delete_namespace(kubectl, namespace)
    finally:
        if webhook is not None:
            webhook.stop()
        uninstalled = deploy("uninstall", "--config", str(config), "--kubeconfig", kubeconfig)
        for volume in volumes:
            kubectl.run(
                "delete",
                "persistentvolume",
                volume["metadata"]["name"],
                "--wait=false",
                check=False,
            )
        cache_upstream.stop()
    assert uninstalled.returncode == 0, uninstalled.stdout + uninstalled.stderr


# --- 6. two mirrors: the first stops, pods run from the second ----------------------------------
def describe_events(kubectl: Kubectl, namespace: str, pod: str) -> list[tuple[str, str, str, str]]:
    """(type, reason, from, message) rows of `kubectl describe pod`'s Events table."""
    text = kubectl.run("describe", "pod", "-n", namespace, pod).stdout
    _, _, table = text.partition("\nEvents:\n")
    rows = []
    for line in table.splitlines()[2:]:  # past the header and its underline
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=4)
        if len(cells) == 5:
            rows.append((cells[0], cells[1], cells[3], cells[4]))
    return rows


def test_when_the_first_mirror_stops_pods_run_from_the_second_and_describe_says_why(
    plane: ControlPlane,
    node: LocalNode,
    kubectl: Kubectl,
    mirror: ClusterRegistry,
    upstream: LocalRegistry,
    tmp_path: Path,
) -> None:
    first = LocalRegistry(tmp_path / "first-mirror")
    try:
        first.start()
    except LocalClusterError as err:
        fail(err)
    first_host = first.host
    try:
        push_image(_image(FIRST_LINE, "app-first"), f"{first_host}/{MIRROR_PATH}")
        with serving(
            plane, kubectl, mirror, upstream, tmp_path / "s6", scenario="two", first_mirror=first
        ) as serve:
            namespace = create_namespace(kubectl, "s6-two", labels=serve.labels)
            serve.wait_admitting(kubectl, namespace, first)

            # Both mirrors up: the first in priority order wins.
            assert run_app(kubectl, namespace, UPSTREAM_APP).stdout.strip() == "pod/app created"
            image = jsonpath(kubectl, namespace, "pod/app", "{.spec.containers[0].image}")
            assert image == f"{first_host}/{MIRROR_PATH}"
            wait_ready(kubectl, namespace, "pod/app")
            assert kubectl.run("logs", "-n", namespace, "app").stdout.strip() == FIRST_LINE
            kubectl.run("delete", "pod", "-n", namespace, "app", "--wait=true")

            first.stop()  # the first mirror goes away: connections are refused
            time.sleep(1.5)  # past positiveTTL: its last "I have it" is not reused
            created = run_app(kubectl, namespace, UPSTREAM_APP)
            assert created.stdout.strip() == "pod/app created", created.stdout
            warning = (
                f'Warning: mirrorgate: container "app" image "{UPSTREAM_APP}" rewritten to mirror '
                f"{mirror.host}: mirror {first_host} cannot serve it (mirror unreachable)"
            )
            assert warning in created.stderr, created.stderr
            pod = json.loads(kubectl.run("get", "pod", "-n", namespace, "app", "-o", "json").stdout)
            assert pod["spec"]["containers"][0]["image"] == f"{mirror.host}/{MIRROR_PATH}"
            assert pod["spec"]["imagePullSecrets"] == [{"name": serve.pull_secret}]
            TIMINGS["pod Running from the second mirror"] = wait_ready(
                kubectl, namespace, "pod/app"
            )
            assert kubectl.run("logs", "-n", namespace, "app").stdout.strip() == MIRROR_LINE

            # What `kubectl describe pod app` shows of mirrorgate's decision, with the kubelet's.
            def described() -> str | None:
                ours = [
                    r for r in describe_events(kubectl, namespace, "app") if r[2] == "mirrorgate"
                ]
                reasons = sorted(r[1] for r in ours)
                return None if reasons == ["ImageRewritten", "MirrorFallback"] else repr(ours)

            eventually(described, timeout=20, what="mirrorgate's Events not on the pod")
            rows = {r[1]: r for r in describe_events(kubectl, namespace, "app")}
            assert rows["MirrorFallback"][0] == "Warning"
            assert rows["MirrorFallback"][3].startswith(
                f'container "app" image "{UPSTREAM_APP}" rewritten to mirror {mirror.host}: '
                f"mirror {first_host} cannot serve it"
            ), rows
            assert rows["ImageRewritten"][0] == "Normal"
            assert rows["ImageRewritten"][3].startswith(
                f"rewrote 1 image to mirrors: container app {UPSTREAM_APP} -> {mirror.host}/"
            ), rows
            assert "Pulled" in rows or "Started" in rows, rows  # the kubelet's own, alongside
            # The dry-run probes of wait_admitting were admitted too, and left no Event.
            probes = kubectl.run(
                "get", "events", "-n", namespace, "--field-selector=involvedObject.name=probe"
            )
            assert "ImageRewritten" not in probes.stdout + probes.stderr, probes.stdout
            passed_over = metric(
                serve.metrics(),
                "mirrorgate_mirror_passed_over_total",
                upstream="docker.io",
                mirror=first_host,
                reason="network",
            )
            assert passed_over >= 1
            delete_namespace(kubectl, namespace)
    finally:
        first.stop()
