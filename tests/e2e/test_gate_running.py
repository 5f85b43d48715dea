"""A CVE published after a workload was deployed does not block its next pods (`scan.running`).

Against the real API server, the Clair stand-in serving Clair's real reports and a real
docker-registry: `mirrorgate serve` (with API access, so it watches pods) is registered as the
validating webhook of one namespace. A ReplicaSet's first pod is admitted while its image is
clean and "runs" (the session's control plane has no kubelet, so the test writes the pod status a
kubelet writes, with the imageID containerd reports: `<repository>@<digest it pulled>`). Then the
image's report turns vulnerable, and the next pod of the ReplicaSet is what kubectl shows:

- `scan.running: warn` (default): created, with mirrorgate's warning naming the CVE; counted as
  `mirrorgate_images_rejected_total{reason="fail_running"}`; a new vulnerable image, or the same
  image in a namespace where it does not run, is still denied;
- `scan.running: deny`: denied like a new image.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirrorgate.devtools.demo import LocalWebhook
from mirrorgate.devtools.localcluster import ControlPlane, Kubectl
from tests.helpers.admission import write_gate_config
from tests.helpers.clair_standin import ClairStandIn
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.kubehttp import KubeHTTP
from tests.helpers.node import eventually, metric, scrape
from tests.helpers.registries import HarnessRegistry, push_image

LABEL = "e2e.mirrorgate.io/gate-running"
HOOKS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
CVE = "CVE-2023-44487"


def pod(name: str, image: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"app": "web"}}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": image}]},
    }


def create(kubectl: Kubectl, namespace: str, obj: dict[str, Any], *extra: str):
    """`kubectl create -f -` as a user (or a controller) would; what kubectl printed."""
    return kubectl.run(
        "create", "-n", namespace, "-f", "-", *extra, input=json.dumps(obj), check=False
    )


def run_as_kubelet(kapi: KubeHTTP, namespace: str, name: str, image: str, digest: str) -> None:
    """Write the status a kubelet writes for a running pod (containerd's imageID)."""
    path = f"/api/v1/namespaces/{namespace}/pods/{name}"
    current = kapi.get(path).body
    repository = image.rsplit(":", 1)[0]
    current["status"] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [
            {
                "name": "app",
                "image": image,
                "imageID": f"{repository}@{digest}",
                "ready": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": "2026-12-04T00:00:00Z"}},
            }
        ],
    }
    reply = kapi.request("PUT", f"{path}/status", current)
    assert reply.status == 200, reply.body


@pytest.fixture
def served(
    request: pytest.FixtureRequest,
    control_plane: ControlPlane,
    clair: ClairStandIn,
    htpasswd_registry: HarnessRegistry,
    tmp_path: Path,
) -> Iterator[tuple[LocalWebhook, KubeHTTP, str]]:
    """serve with `scan.running: <param>` validating one new namespace; (webhook, api, ns)."""
    mode = request.param
    config = write_gate_config(
        tmp_path,
        clair,
        htpasswd_registry,
        f"  admissionBudget: 5s\n  verdictTTL: 1s\n  running: {mode}\n",
    )
    kapi = KubeHTTP(control_plane.url, control_plane.admin_token, str(control_plane.ca_file))
    ns = f"e2e-running-{mode}-{secrets.token_hex(3)}"
    system = f"{ns}-mg"
    assert kapi.create_namespace(ns, {LABEL: ns}).status == 201
    assert kapi.create_namespace(system).status == 201
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", token=control_plane.admin_token
    )
    env = {"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": system, "POD_NAME": "gate-0"}
    from mirrorgate.deploy.webhooks import validating_webhook_configuration

    hook = f"e2e-running-{mode}"
    with LocalWebhook(tmp_path / "serve", config, env=env) as webhook:
        body = validating_webhook_configuration(
            hook,
            url=webhook.url,
            ca_pem=webhook.ca_pem,
            failure_policy="Fail",
            namespace_selector={"matchLabels": {LABEL: ns}},
            side_effects="NoneOnDryRun",
        )
        assert kapi.request("POST", HOOKS, body).status == 201
        try:
            yield webhook, kapi, ns
        finally:
            kapi.request("DELETE", f"{HOOKS}/{hook}")
            for name in (ns, system):
                kapi.request("DELETE", f"/api/v1/namespaces/{name}")


def _replica_set(kapi: KubeHTTP, namespace: str, image: str) -> dict[str, Any]:
    rs = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": "web-7d9f"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": pod("", image) | {"metadata": {"labels": {"app": "web"}}},
        },
    }
    reply = kapi.request("POST", f"/apis/apps/v1/namespaces/{namespace}/replicasets", rs)
    assert reply.status == 201, reply.body
    meta = reply.body["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


@pytest.mark.parametrize("served", ["warn", "deny"], indirect=True, ids=["warn", "deny"])
def test_a_replicasets_next_pod_after_its_image_turned_vulnerable(
    served: tuple[LocalWebhook, KubeHTTP, str],
    control_plane: ControlPlane,
    clair: ClairStandIn,
    htpasswd_registry: HarnessRegistry,
) -> None:
    webhook, kapi, ns = served
    mode = "warn" if "-warn-" in ns else "deny"
    kubectl = control_plane.kubectl()
    tag = secrets.token_hex(4)
    digest = push_image(htpasswd_registry, "running/web", tag)
    other_digest = push_image(htpasswd_registry, "running/other", tag)
    image = f"{htpasswd_registry.host}/running/web:{tag}"
    other = f"{htpasswd_registry.host}/running/other:{tag}"
    clair.set_report(other_digest, "trimmed")  # a new image that fails from the start

    def gate_on() -> str | None:
        probe = create(kubectl, ns, pod("probe", other), "--dry-run=server")
        return None if "denied the request" in probe.stderr else probe.stdout + probe.stderr

    eventually(gate_on, timeout=30, what="the validating webhook is not called yet")

    owner = _replica_set(kapi, ns, image)
    first = create(kubectl, ns, pod("web-7d9f-a", image, owner))
    assert first.returncode == 0 and "Warning" not in first.stderr, first.stderr
    run_as_kubelet(kapi, ns, "web-7d9f-a", image, digest)

    # A CVE is published for the image: its report now has a High finding.
    clair.set_report(digest, "trimmed")
    time.sleep(1.2)  # past verdictTTL: the next admission asks Clair again

    def next_pod(extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return create(kubectl, ns, pod("web-7d9f-b", image, owner), *extra)

    if mode == "warn":
        # The watch has seen the first pod's status once a dry run gets the warning.
        def warned() -> str | None:
            dry = next_pod(("--dry-run=server",))
            return None if "already running" in dry.stderr else dry.stderr

        eventually(warned, timeout=15, what="the running pod was not seen")
        created = next_pod()
        assert created.returncode == 0, created.stderr
        assert created.stdout.strip() == "pod/web-7d9f-b created"
        (warning,) = [line for line in created.stderr.splitlines() if "mirrorgate" in line]
        assert warning.startswith(
            "Warning: mirrorgate: already running in this namespace, admitted (scan.running: "
            f"warn): image {image} ("
        ), warning
        assert CVE in warning and "libnghttp2" in warning, warning
        # Counted apart from denials (the dry runs above were judged, and counted, too).
        text = scrape(webhook.metrics_port)
        running = metric(
            text, "mirrorgate_images_rejected_total", namespace=ns, reason="fail_running"
        )
        assert running >= 2, text
    else:
        denied = next_pod()
        assert denied.returncode != 0
        assert 'admission webhook "validate.mirrorgate.io" denied the request' in denied.stderr
        assert CVE in denied.stderr

    # Never an exception for images that do not run here yet.
    new = create(kubectl, ns, pod("new-image", other))
    assert new.returncode != 0 and "denied the request" in new.stderr, new.stderr


# --- the continuous view: a Clair notification about a running digest -----------------------------
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "monitoring" / "mirrorgate.rules.yml"
ALERT = "MirrorgateVulnerableImagesRunning"


@pytest.mark.parametrize("served", ["warn"], indirect=True, ids=["warn"])
def test_a_clair_notification_about_a_running_image_raises_the_gauge_the_event_and_the_alert(
    served: tuple[LocalWebhook, KubeHTTP, str],
    control_plane: ControlPlane,
    clair: ClairStandIn,
    htpasswd_registry: HarnessRegistry,
    tmp_path: Path,
) -> None:
    from tests.helpers.node import Prometheus

    webhook, kapi, ns = served
    kubectl = control_plane.kubectl()
    tag = secrets.token_hex(4)
    digest = push_image(htpasswd_registry, "running/notified", tag)
    image = f"{htpasswd_registry.host}/running/notified:{tag}"
    # Clair's notifier calls serve over TLS: trust serve's CA as well as the registry's.
    bundle = tmp_path / "clair-trust.pem"
    bundle.write_bytes(Path(clair.ca_file).read_bytes() + webhook.ca_pem)
    clair.ca_file = bundle

    def gauge(severity: str) -> float:
        text = scrape(webhook.metrics_port)
        return metric(text, "mirrorgate_running_pods", namespace=ns, worst_severity=severity)

    prometheus = Prometheus(
        tmp_path / "prometheus",
        target=f"127.0.0.1:{webhook.metrics_port}",
        rule_files=[RULES],
        evaluation_interval=1,
    ).start()
    try:
        assert create(kubectl, ns, pod("web-1", image)).returncode == 0
        run_as_kubelet(kapi, ns, "web-1", image, digest)
        eventually(
            lambda: None if gauge("none") == 1 else f"none={gauge('none')}",
            timeout=15,
            what="the running pod never showed as clean",
        )

        # Clair matches a new vulnerability to the running manifest and notifies.
        clair.set_report(digest, "trimmed")
        started = time.monotonic()
        assert clair.notify(f"{webhook.url}/events/clair", {digest: "added"}) == 200
        eventually(
            lambda: None if gauge("High") == 1 else f"High={gauge('High')}",
            timeout=10,
            what="the gauge did not show the vulnerable pod",
        )
        took_gauge = time.monotonic() - started

        def described() -> str | None:
            text = kubectl.run("describe", "pod", "-n", ns, "web-1").stdout
            return None if "VulnerableImageRunning" in text else text[-600:]

        eventually(described, timeout=10, what="no VulnerableImageRunning Event on the pod")
        text = kubectl.run("describe", "pod", "-n", ns, "web-1").stdout
        (line,) = [ln for ln in text.splitlines() if "VulnerableImageRunning" in ln]
        assert "Warning" in line and "mirrorgate" in line and CVE in line, line

        def firing() -> str | None:
            alerts = [a for a in prometheus.alerts() if a["labels"].get("alertname") == ALERT]
            ours = [
                a for a in alerts if a["labels"].get("namespace") == ns and a["state"] == "firing"
            ]
            return None if ours else repr(alerts)

        eventually(firing, timeout=20, what=f"{ALERT} did not fire")
        took_alert = time.monotonic() - started
        (alert,) = [
            a
            for a in prometheus.alerts()
            if a["labels"].get("alertname") == ALERT and a["labels"].get("namespace") == ns
        ]
        assert alert["labels"]["worst_severity"] == "High"
        print(f"\nnotification -> gauge {took_gauge:.1f}s, -> alert firing {took_alert:.1f}s")

        # The same view from a shell: what runs in the cluster, with its verdict.
        kubeconfig = control_plane.write_kubeconfig(
            tmp_path / "cli-kubeconfig", token=control_plane.admin_token
        )
        listed = subprocess.run(
            [mirrorgate_exe(), "scan", "--running", "--config", str(tmp_path / "mirrorgate.yaml")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            check=False,
        )
        assert listed.returncode == 1, listed.stdout + listed.stderr  # an image fails
        (row,) = [
            ln for ln in listed.stdout.splitlines() if ln.endswith(f"running/notified@{digest}")
        ]
        assert row.split()[:4] == ["fail", "High", "1", ns], row

        # The vulnerability is withdrawn: Clair's report now has only Unknown findings, which
        # do not block, and the gauge and the alert clear.
        clair.set_report(digest, "alpine")
        assert clair.notify(f"{webhook.url}/events/clair", {digest: "removed"}) == 200
        eventually(
            lambda: None if gauge("none") == 1 and gauge("High") == 0 else "still High",
            timeout=10,
            what="the gauge did not clear",
        )

        def resolved() -> str | None:
            alerts = [
                a
                for a in prometheus.alerts()
                if a["labels"].get("alertname") == ALERT and a["labels"].get("namespace") == ns
            ]
            return None if not alerts else repr(alerts)

        eventually(resolved, timeout=20, what=f"{ALERT} did not resolve")
    finally:
        prometheus.stop()
