"""The real `mirrorgate serve`, registered with the real API server, acting on pods.

Each test works in namespaces of its own; webhook configurations select namespaces by label, so the
tests don't see each other's webhooks. Everything is checked on what the API server stored or
answered, as a kubectl user would see it.
"""

from __future__ import annotations

import base64
import itertools
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mirrorgate.certs.pki import generate_ca, issue_serving
from mirrorgate.deploy.webhooks import mutating_webhook_configuration
from mirrorgate.devtools.demo import LocalWebhook
from mirrorgate.devtools.localcluster import ControlPlane
from tests.helpers.kubehttp import KubeHTTP, Reply
from tests.helpers.waiting import wait_for

OPT_IN = "mirrorgate.io/enabled"
MIRROR = "127.0.0.1:31000"
DIGEST = "sha256:" + "b" * 64
CONFIG = f"""\
# No registry listens on the mirror address: these tests are about admission, not verification.
mirrors:
  - {{upstream: docker.io, mirror: "{MIRROR}", verify: false}}
  - {{upstream: ghcr.io, mirror: "{MIRROR}/ghcr", verify: false}}
pullSecret: {{name: mirrorgate-pull}}
namespaces: {{mode: optIn, exclude: [kube-system]}}
"""
WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
_names = itertools.count(1)


def pod(name: str, *images: str, init: tuple[str, ...] = ()) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    }
    if init:
        spec["initContainers"] = [{"name": f"init{i}", "image": im} for i, im in enumerate(init)]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def images(stored: dict[str, Any], field: str = "containers") -> list[str]:
    return [c["image"] for c in stored["spec"].get(field) or []]


def originals(stored: dict[str, Any]) -> dict[str, str]:
    return json.loads(stored["metadata"]["annotations"]["mirrorgate.io/original-images"])


def register(kapi: KubeHTTP, body: dict[str, Any]) -> None:
    reply = kapi.request("POST", WEBHOOKS, body)
    assert reply.status == 201, reply.body


def unregister(kapi: KubeHTTP, name: str) -> None:
    kapi.request("DELETE", f"{WEBHOOKS}/{name}")


def mutated_in(kapi: KubeHTTP, namespace: str) -> bool:
    """Whether a dry-run pod in ``namespace`` comes back rewritten (the webhook is in effect)."""
    reply = kapi.create_pod(namespace, pod("probe", "nginx:1.25"), dry_run=True)
    return reply.status == 201 and images(reply.body)[0].startswith(MIRROR)


@pytest.fixture(scope="module")
def kapi(control_plane: ControlPlane) -> KubeHTTP:
    return KubeHTTP(control_plane.url, control_plane.admin_token, str(control_plane.ca_file))


@pytest.fixture
def namespace(kapi: KubeHTTP) -> Callable[..., str]:
    def make(**labels: str) -> str:
        name = f"e2e-adm-{next(_names)}"
        kapi.create_namespace(name, labels)
        return name

    return make


def start_webhook(directory: Path) -> LocalWebhook:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "mirrorgate.yaml"
    config.write_text(CONFIG)
    return LocalWebhook(directory, config).start()


@pytest.fixture(scope="module")
def webhook(kapi: KubeHTTP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWebhook]:
    wh = start_webhook(tmp_path_factory.mktemp("webhook"))
    name = "e2e-a-mirrorgate"
    register(
        kapi,
        mutating_webhook_configuration(
            name,
            url=wh.url,
            ca_pem=wh.ca_pem,
            namespace_selector={"matchLabels": {OPT_IN: "true"}},
        ),
    )
    probe = f"e2e-adm-probe-{next(_names)}"
    kapi.create_namespace(probe, {OPT_IN: "true"})
    try:
        wait_for(lambda: mutated_in(kapi, probe), "the webhook configuration to take effect")
        yield wh
    finally:
        unregister(kapi, name)
        wh.stop()


def test_a_pod_in_an_opted_in_namespace_is_stored_rewritten_with_secret_and_warnings(
    kapi, webhook, namespace
):
    ns = namespace(**{OPT_IN: "true"})
    reply = kapi.create_pod(
        ns,
        pod(
            "web",
            "nginx:1.25",
            f"ghcr.io/acme/api:2.1@{DIGEST}",
            "quay.io/other/x:1",
            "Bad/Name:1",
            init=("alpine:3.19",),
        ),
    )
    assert reply.status == 201, reply.body
    stored = kapi.get(f"/api/v1/namespaces/{ns}/pods/web").body
    assert images(stored) == [
        f"{MIRROR}/library/nginx:1.25",
        f"{MIRROR}/ghcr/acme/api:2.1@{DIGEST}",
        "quay.io/other/x:1",
        "Bad/Name:1",
    ]
    assert images(stored, "initContainers") == [f"{MIRROR}/library/alpine:3.19"]
    assert stored["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    assert originals(stored) == {
        "c0": "nginx:1.25",
        "c1": f"ghcr.io/acme/api:2.1@{DIGEST}",
        "init0": "alpine:3.19",
    }
    # What `kubectl apply` prints as "Warning: ...": the invalid reference, left alone.
    assert len(reply.warnings) == 1
    assert '"Bad/Name:1"' in reply.warnings[0] and "left unchanged" in reply.warnings[0]


def test_unlabelled_namespaces_and_kube_system_are_never_touched(kapi, webhook, namespace):
    plain = namespace()
    reply = kapi.create_pod(plain, pod("web", "nginx:1.25"))
    assert reply.status == 201 and images(reply.body) == ["nginx:1.25"]
    assert "imagePullSecrets" not in reply.body["spec"]

    # Even a kube-system labelled for opt-in (a mistake) is left alone by the webhook itself.
    patch = {"metadata": {"labels": {OPT_IN: "true"}}}
    labelled = kapi.request(
        "PATCH",
        "/api/v1/namespaces/kube-system",
        patch,
        content_type="application/merge-patch+json",
    )
    assert labelled.status == 200
    try:
        reply = kapi.create_pod("kube-system", pod(f"sys-{next(_names)}", "nginx:1.25"))
        assert reply.status == 201 and images(reply.body) == ["nginx:1.25"]
        assert not reply.warnings
    finally:
        kapi.request(
            "PATCH",
            "/api/v1/namespaces/kube-system",
            {"metadata": {"labels": {OPT_IN: None}}},
            content_type="application/merge-patch+json",
        )


def test_an_image_update_and_an_ephemeral_container_are_rewritten(kapi, webhook, namespace):
    ns = namespace(**{OPT_IN: "true"})
    assert kapi.create_pod(ns, pod("web", "nginx:1.25", "redis:7")).status == 201

    patch = {"spec": {"containers": [{"name": "c0", "image": "nginx:1.26"}]}}
    reply = kapi.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/web",
        patch,
        content_type="application/strategic-merge-patch+json",
    )
    assert reply.status == 200, reply.body
    assert images(reply.body) == [f"{MIRROR}/library/nginx:1.26", f"{MIRROR}/library/redis:7"]
    assert originals(reply.body)["c0"] == "nginx:1.26"

    # kubectl debug on a 1.20 API server: PUT an EphemeralContainers object to the subresource.
    debug = {
        "apiVersion": "v1",
        "kind": "EphemeralContainers",
        "metadata": {"name": "web", "namespace": ns},
        "ephemeralContainers": [
            {
                "name": "debugger",
                "image": "busybox:1.36",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
            }
        ],
    }
    reply = kapi.request("PUT", f"/api/v1/namespaces/{ns}/pods/web/ephemeralcontainers", debug)
    assert reply.status == 200, reply.body
    stored = kapi.get(f"/api/v1/namespaces/{ns}/pods/web").body
    assert images(stored, "ephemeralContainers") == [f"{MIRROR}/library/busybox:1.36"]


class SidecarInjector:
    """A second mutating webhook (another vendor's) that appends a sidecar container."""

    IMAGE = "envoyproxy/envoy:v1.29.0"

    def __init__(self, directory: Path) -> None:
        ca = generate_ca("sidecar-ca", days=1)
        pair = issue_serving(ca, ["127.0.0.1"], days=1)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "s.crt").write_bytes(pair.cert_pem)
        (directory / "s.key").write_bytes(pair.key_pem)
        self.ca_pem = ca.cert_pem
        self.calls = 0
        injector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                injector.calls += 1
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                req = review["request"]
                names = [c["name"] for c in req["object"]["spec"]["containers"]]
                patch = (
                    []
                    if "sidecar" in names
                    else [
                        {
                            "op": "add",
                            "path": "/spec/containers/-",
                            "value": {"name": "sidecar", "image": SidecarInjector.IMAGE},
                        }
                    ]
                )
                response: dict[str, Any] = {"uid": req["uid"], "allowed": True}
                if patch:
                    response["patchType"] = "JSONPatch"
                    response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
                body = json.dumps(
                    {
                        "apiVersion": "admission.k8s.io/v1",
                        "kind": "AdmissionReview",
                        "response": response,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(directory / "s.crt", directory / "s.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_sidecar_added_by_a_later_webhook_is_rewritten_on_reinvocation_without_double_patching(
    kapi, webhook, namespace, tmp_path
):
    injector = SidecarInjector(tmp_path / "sidecar")
    label = "e2e.mirrorgate.io/sidecar"
    name = "z-e2e-sidecar"  # sorts after the mirrorgate configuration: it runs second
    register(
        kapi,
        mutating_webhook_configuration(
            name,
            url=injector.url,
            ca_pem=injector.ca_pem,
            reinvocation_policy="Never",
            namespace_selector={"matchLabels": {label: "true"}},
        ),
    )
    try:
        ns = namespace(**{OPT_IN: "true", label: "true"})

        def injected() -> bool:
            r = kapi.create_pod(ns, pod("probe", "nginx:1.25"), dry_run=True)
            return len(r.body["spec"]["containers"]) == 2

        wait_for(injected, "the sidecar webhook to take effect")
        reply = kapi.create_pod(ns, pod("web", "nginx:1.25"))
        assert reply.status == 201, reply.body
    finally:
        unregister(kapi, name)
        injector.close()
    stored = reply.body
    assert images(stored) == [f"{MIRROR}/library/nginx:1.25", f"{MIRROR}/envoyproxy/envoy:v1.29.0"]
    assert stored["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    assert originals(stored) == {"c0": "nginx:1.25", "sidecar": SidecarInjector.IMAGE}

    # mirrorgate was called twice for this pod; the second pass patched only the sidecar.
    passes = [
        r
        for r in webhook.log_records()
        if r.get("namespace") == ns and r.get("name") == "web" and not r.get("dry_run")
    ]
    assert [[c["container"] for c in r.get("rewritten", [])] for r in passes] == [
        ["c0"],
        ["sidecar"],
    ]


def test_server_side_dry_run_returns_the_mutated_pod_and_stores_nothing(kapi, webhook, namespace):
    ns = namespace(**{OPT_IN: "true"})
    reply = kapi.create_pod(ns, pod("web", "nginx:1.25"), dry_run=True)
    assert reply.status == 201
    assert images(reply.body) == [f"{MIRROR}/library/nginx:1.25"]
    assert reply.body["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    assert kapi.get(f"/api/v1/namespaces/{ns}/pods/web").status == 404


def test_a_stopped_webhook_admits_unchanged_pods_with_ignore_and_rejects_them_with_fail(
    kapi, namespace, tmp_path
):
    down = start_webhook(tmp_path / "down")
    label = "e2e.mirrorgate.io/down"
    configs = {policy: f"e2e-down-{policy.lower()}" for policy in ("Ignore", "Fail")}
    spaces = {}
    for policy, name in configs.items():
        register(
            kapi,
            mutating_webhook_configuration(
                name,
                url=down.url,
                ca_pem=down.ca_pem,
                failure_policy=policy,
                namespace_selector={"matchLabels": {label: policy.lower()}},
            ),
        )
        spaces[policy] = namespace(**{label: policy.lower()})
    try:
        for ns in spaces.values():
            wait_for(lambda ns=ns: mutated_in(kapi, ns), f"the webhook to serve {ns}")
        down.stop()

        ignored = kapi.create_pod(spaces["Ignore"], pod("web", "nginx:1.25"))
        assert ignored.status == 201
        assert images(ignored.body) == ["nginx:1.25"]

        failed: Reply = kapi.create_pod(spaces["Fail"], pod("web", "nginx:1.25"))
        assert failed.status == 500
        assert 'failed calling webhook "mutate.mirrorgate.io"' in failed.message
        assert "connection refused" in failed.message
        assert kapi.get(f"/api/v1/namespaces/{spaces['Fail']}/pods/web").status == 404
    finally:
        down.stop()
        for name in configs.values():
            unregister(kapi, name)
