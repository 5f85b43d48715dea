"""Pull secrets that are always there, proven on the real API server with the real `serve`.

`mirrorgate serve` runs as the user `mirrorgate-webhook`, bound to exactly the rules
`webhook.core.rbac.rbac_rules` documents (never admin), with a short lease so that takeovers fit
in a test. The main instance first runs while a placeholder holds its Lease: it answers admissions
but may not reconcile, so whatever exists after an admission was created by the admission itself.
Then the placeholder goes and the same instance leads. The leader-election test runs two more
instances on a second configuration (own copy name, own Lease) so they never touch the first.

Every timing is asserted as "within N seconds" by polling what a kubectl user would see.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirrorgate.deploy.webhooks import mutating_webhook_configuration
from mirrorgate.devtools.demo import LocalWebhook
from mirrorgate.devtools.localcluster import ControlPlane
from mirrorgate.webhook.controllers.leader import LEASE_NAME
from mirrorgate.webhook.controllers.pullsecrets import Target
from mirrorgate.webhook.core.config import load_config
from mirrorgate.webhook.core.pullsecrets import MANAGED_BY_LABEL, SOURCE_VERSION_ANNOTATION
from mirrorgate.webhook.core.rbac import rbac_rules
from mirrorgate.webhook.server.gate import SCAN_MODE_LABEL as SCAN_MODE
from tests.helpers.cluster import WEBHOOK_USER
from tests.helpers.kubehttp import KubeHTTP, Reply
from tests.helpers.registries import push_image

OPT_IN = "mirrorgate.io/enabled"
MIRROR = "127.0.0.1:31000"
SYSTEM = "e2e-ps-system"  # the main instance's POD_NAMESPACE: source Secret and Lease
COPY = "e2e-ps-pull"
HA_SYSTEM = "e2e-ps-ha-system"
HA_COPY = "e2e-ps-ha-pull"
SOURCE = "registry-pull"
LEASE_SECONDS = 3  # --lease-duration: renew deadline 2 s, retry period 0.4 s
WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
RBAC = "/apis/rbac.authorization.k8s.io/v1"
# How fast a watch-driven change must show; polling is every 0.1 s.
PROMPT = 5.0
_names = itertools.count(1)
TIMINGS: dict[str, float] = {}


def config_text(copy: str, system: str, *, accounts: bool) -> str:
    return f"""\
mirrors:
  - {{upstream: docker.io, mirror: "{MIRROR}", verify: false}}
pullSecret:
  name: {copy}
  source: {system}/{SOURCE}
  patchServiceAccounts: {str(accounts).lower()}
namespaces: {{mode: optIn, exclude: [kube-system]}}
"""


def docker_config(password: str) -> str:
    auth = base64.b64encode(f"puller:{password}".encode()).decode()
    doc = {"auths": {MIRROR: {"auth": auth}}}
    return base64.b64encode(json.dumps(doc).encode()).decode()


def within(seconds: float, check: Callable[[], bool], what: str) -> float:
    """Poll ``check`` until true; fail after ``seconds``; return how long it took."""
    started = time.monotonic()
    while not check():
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"not within {seconds:.0f} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}]},
    }


def admit(
    wh: LocalWebhook, endpoint: str, namespace: str, obj: dict[str, Any], *, uid: str
) -> dict[str, Any]:
    """POST a pod CREATE AdmissionReview to ``wh``'s ``/mutate`` or ``/validate`` as the API
    server does (``?timeout=10s``); its response."""
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": namespace,
            "object": obj,
        },
    }
    request = urllib.request.Request(
        f"{wh.url}/{endpoint}?timeout=10s",
        json.dumps(review).encode(),
        {"Content-Type": "application/json"},
    )
    ctx = ssl.create_default_context(cadata=wh.ca_pem.decode())
    with urllib.request.urlopen(request, context=ctx, timeout=10) as r:
        return json.loads(r.read())["response"]


def secret_path(namespace: str, name: str = COPY) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{name}"


def hold_lease(kapi: KubeHTTP, namespace: str) -> None:
    """A placeholder holds the namespace's Lease for an hour: serve there follows, never leads."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    placeholder = {
        "metadata": {"name": LEASE_NAME},
        "spec": {
            "holderIdentity": "e2e-placeholder",
            "leaseDurationSeconds": 3600,
            "renewTime": now,
        },
    }
    reply = kapi.request(
        "POST", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", placeholder
    )
    assert reply.status == 201, reply.body


def lease_holder(kapi: KubeHTTP, namespace: str) -> str | None:
    reply = kapi.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{LEASE_NAME}")
    return reply.body["spec"].get("holderIdentity") if reply.status == 200 else None


def merge_patch(kapi: KubeHTTP, path: str, patch: dict[str, Any]) -> Reply:
    reply = kapi.request("PATCH", path, patch, content_type="application/merge-patch+json")
    assert reply.status == 200, reply.body
    return reply


def set_opt_in(kapi: KubeHTTP, namespace: str, value: str | None) -> None:
    merge_patch(kapi, f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": {OPT_IN: value}}})


def metric(wh: LocalWebhook, name: str, labels: dict[str, str] | None = None) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{wh.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total += sample.value
    return total


def logged(wh: LocalWebhook, msg: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in wh.log_records()
        if r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items())
    ]


def bind_rules(kapi: KubeHTTP, target: Target, *, role: str) -> None:
    """ClusterRole/Roles holding exactly the documented rules, bound to the webhook's user."""
    rules = rbac_rules(target, lease_name=LEASE_NAME)
    subject = [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": WEBHOOK_USER}]
    ref = {"apiGroup": "rbac.authorization.k8s.io", "name": role}
    for path, body in [
        (f"{RBAC}/clusterroles", {"metadata": {"name": role}, "rules": list(rules.cluster)}),
        (
            f"{RBAC}/clusterrolebindings",
            {
                "metadata": {"name": role},
                "subjects": subject,
                "roleRef": {**ref, "kind": "ClusterRole"},
            },
        ),
    ]:
        reply = kapi.request("POST", path, body)
        assert reply.status == 201, reply.body
    for namespace, ns_rules in rules.namespaced:
        base = f"{RBAC}/namespaces/{namespace}"
        reply = kapi.request(
            "POST", f"{base}/roles", {"metadata": {"name": role}, "rules": list(ns_rules)}
        )
        assert reply.status == 201, reply.body
        binding = {
            "metadata": {"name": role},
            "subjects": subject,
            "roleRef": {**ref, "kind": "Role"},
        }
        reply = kapi.request("POST", f"{base}/rolebindings", binding)
        assert reply.status == 201, reply.body


def unbind_rules(kapi: KubeHTTP, target: Target, *, role: str) -> None:
    kapi.request("DELETE", f"{RBAC}/clusterrolebindings/{role}")
    kapi.request("DELETE", f"{RBAC}/clusterroles/{role}")


def prepare_system(
    kapi: KubeHTTP, namespace: str, copy: str, *, accounts: bool, tmp: Path
) -> tuple[Path, Target]:
    """Namespace, source Secret, RBAC; returns the config file and its target."""
    kapi.create_namespace(namespace)
    source = {
        "metadata": {"name": SOURCE},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": docker_config("first")},
    }
    reply = kapi.request("POST", f"/api/v1/namespaces/{namespace}/secrets", source)
    assert reply.status == 201, reply.body
    tmp.mkdir(parents=True, exist_ok=True)
    config_file = tmp / "mirrorgate.yaml"
    config_file.write_text(config_text(copy, namespace, accounts=accounts))
    target = Target.from_config(load_config(config_file), own_namespace=namespace)
    assert target is not None
    bind_rules(kapi, target, role=f"mirrorgate-{namespace}")
    return config_file, target


def serve(
    control_plane: ControlPlane,
    token: str,
    config_file: Path,
    *,
    namespace: str,
    pod_name: str,
    work: Path,
) -> LocalWebhook:
    work.mkdir(parents=True, exist_ok=True)
    kubeconfig = control_plane.write_kubeconfig(work / "kubeconfig", token=token, user=WEBHOOK_USER)
    return LocalWebhook(
        work,
        config_file,
        env={"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": namespace, "POD_NAME": pod_name},
        args=["--lease-duration", str(LEASE_SECONDS)],
    ).start()


def new_namespace(kapi: KubeHTTP, *, opted_in: bool = True) -> str:
    name = f"e2e-ps-{next(_names)}"
    kapi.create_namespace(name, {OPT_IN: "true"} if opted_in else {})
    return name


def copy_data(kapi: KubeHTTP, namespace: str, name: str = COPY) -> str | None:
    reply = kapi.get(secret_path(namespace, name))
    return reply.body["data"][".dockerconfigjson"] if reply.status == 200 else None


def rotate(kapi: KubeHTTP, system: str, password: str) -> str:
    data = docker_config(password)
    merge_patch(kapi, secret_path(system, SOURCE), {"data": {".dockerconfigjson": data}})
    return data


@pytest.fixture(scope="module")
def kapi(control_plane: ControlPlane) -> KubeHTTP:
    return KubeHTTP(control_plane.url, control_plane.admin_token, str(control_plane.ca_file))


@pytest.fixture(scope="module")
def webhook_api(control_plane: ControlPlane, webhook_user_token: str) -> KubeHTTP:
    """The API as mirrorgate's own user sees it."""
    return KubeHTTP(control_plane.url, webhook_user_token, str(control_plane.ca_file))


@pytest.fixture(scope="module")
def main(
    kapi: KubeHTTP,
    control_plane: ControlPlane,
    webhook_user_token: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalWebhook]:
    """The main instance, registered as the webhook; a placeholder holds its Lease."""
    tmp = tmp_path_factory.mktemp("pullsecrets")
    config_file, target = prepare_system(kapi, SYSTEM, COPY, accounts=True, tmp=tmp)
    hold_lease(kapi, SYSTEM)
    wh = serve(
        control_plane,
        webhook_user_token,
        config_file,
        namespace=SYSTEM,
        pod_name="mirrorgate-0",
        work=tmp / "serve",
    )
    name = "e2e-ps-mirrorgate"
    reply = kapi.request(
        "POST",
        WEBHOOKS,
        mutating_webhook_configuration(
            name,
            url=wh.url,
            ca_pem=wh.ca_pem,
            namespace_selector={"matchLabels": {OPT_IN: "true"}},
            side_effects="NoneOnDryRun",
        ),
    )
    assert reply.status == 201, reply.body
    try:
        probe = new_namespace(kapi)

        def in_effect() -> bool:
            r = kapi.create_pod(probe, pod("probe"), dry_run=True)
            return r.status == 201 and r.body["spec"].get("imagePullSecrets") == [{"name": COPY}]

        within(20, in_effect, "the webhook configuration to take effect")
        yield wh
    finally:
        kapi.request("DELETE", f"{WEBHOOKS}/{name}")
        wh.stop()
        unbind_rules(kapi, target, role=f"mirrorgate-{SYSTEM}")
        # Copies the instance made in other modules' opted-in namespaces go with it.
        for item in kapi.get(f"/api/v1/secrets?fieldSelector=metadata.name={COPY}").body["items"]:
            meta = item["metadata"]
            kapi.request("DELETE", secret_path(meta["namespace"], COPY))


@pytest.fixture(scope="module")
def follower(kapi: KubeHTTP, main: LocalWebhook) -> LocalWebhook:
    """The main instance while it must not reconcile: the placeholder still holds the Lease."""
    assert lease_holder(kapi, SYSTEM) == "e2e-placeholder"
    return main


@pytest.fixture(scope="module")
def leader(kapi: KubeHTTP, main: LocalWebhook) -> LocalWebhook:
    """The main instance once the placeholder is gone: it takes the Lease and reconciles."""
    kapi.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM}/leases/{LEASE_NAME}")
    within(PROMPT, lambda: lease_holder(kapi, SYSTEM) == "mirrorgate-0", "mirrorgate-0 to lead")
    within(PROMPT, lambda: metric(main, "mirrorgate_pullsecret_leader") == 1, "the leader gauge")
    return main


# --- admission, while nobody reconciles ----------------------------------------------------------


def test_a_pod_created_in_the_same_second_as_its_namespace_gets_the_reference_and_the_secret(
    kapi, follower
):
    source = copy_data(kapi, SYSTEM, SOURCE)
    for _ in range(3):
        ns = new_namespace(kapi)
        reply = kapi.create_pod(ns, pod("web"))
        assert reply.status == 201, reply.body
        assert reply.body["spec"]["imagePullSecrets"] == [{"name": COPY}]
        assert reply.body["spec"]["containers"][0]["image"] == f"{MIRROR}/library/nginx:1.25"
        # The admission answered only after the Secret existed: no race with anyone.
        stored = kapi.get(secret_path(ns))
        assert stored.status == 200, f"no {COPY} in {ns} right after its first pod"
        assert stored.body["type"] == "kubernetes.io/dockerconfigjson"
        assert stored.body["data"][".dockerconfigjson"] == source
        assert stored.body["metadata"]["labels"][MANAGED_BY_LABEL] == "mirrorgate"
        assert logged(follower, "pull secret created at admission", namespace=ns)
    assert lease_holder(kapi, SYSTEM) == "e2e-placeholder"
    assert metric(follower, "mirrorgate_pullsecret_writes_total", {"operation": "create"}) == 0


def test_a_dry_run_shows_the_reference_but_creates_nothing(kapi, follower):
    hooks = kapi.get(f"{WEBHOOKS}/e2e-ps-mirrorgate").body["webhooks"]
    assert hooks[0]["sideEffects"] == "NoneOnDryRun"
    ns = new_namespace(kapi)
    dry = kapi.create_pod(ns, pod("web"), dry_run=True)
    assert dry.status == 201 and dry.body["spec"]["imagePullSecrets"] == [{"name": COPY}]
    assert kapi.get(secret_path(ns)).status == 404
    assert kapi.get(f"/api/v1/namespaces/{ns}/pods/web").status == 404
    # The same pod for real: now, and only now, the Secret is created.
    assert kapi.create_pod(ns, pod("web")).status == 201
    assert kapi.get(secret_path(ns)).status == 200
    assert len(logged(follower, "pull secret created at admission", namespace=ns)) == 1


# --- the reconciler, leading ---------------------------------------------------------------------


def test_a_new_opted_in_namespace_gets_a_current_copy_within_seconds(kapi, leader):
    source = kapi.get(secret_path(SYSTEM, SOURCE)).body
    ns = new_namespace(kapi)
    took = within(PROMPT, lambda: copy_data(kapi, ns) is not None, f"a copy in {ns}")
    TIMINGS["copy after namespace creation"] = took
    copy = kapi.get(secret_path(ns)).body
    assert copy["data"] == source["data"] and copy["type"] == source["type"]
    assert copy["metadata"]["labels"] == {MANAGED_BY_LABEL: "mirrorgate"}
    annotations = copy["metadata"]["annotations"]
    assert annotations[SOURCE_VERSION_ANNOTATION] == source["metadata"]["resourceVersion"]
    assert annotations["mirrorgate.io/pull-secret-source"] == f"{SYSTEM}/{SOURCE}"
    assert annotations["mirrorgate.io/pull-secret-source-hash"].startswith("sha256:")


def test_a_rotated_source_reaches_20_namespaces_within_seconds(kapi, leader):
    spaces = [new_namespace(kapi) for _ in range(20)]
    within(10, lambda: all(copy_data(kapi, ns) is not None for ns in spaces), "20 copies")

    def copies() -> dict[str, str]:
        items = kapi.get(f"/api/v1/secrets?fieldSelector=metadata.name={COPY}").body["items"]
        return {i["metadata"]["namespace"]: i["data"][".dockerconfigjson"] for i in items}

    rotated = rotate(kapi, SYSTEM, f"rotated-{time.time()}")
    took = within(
        PROMPT,
        lambda: all(copies().get(ns) == rotated for ns in spaces),
        "the rotated credentials in all 20 copies",
    )
    TIMINGS["rotation across 20 namespaces"] = took
    version = kapi.get(secret_path(SYSTEM, SOURCE)).body["metadata"]["resourceVersion"]
    annotations = kapi.get(secret_path(spaces[-1])).body["metadata"]["annotations"]
    assert annotations[SOURCE_VERSION_ANNOTATION] == version


def test_a_namespace_that_opts_out_loses_its_copy(kapi, leader):
    ns = new_namespace(kapi)
    within(PROMPT, lambda: copy_data(kapi, ns) is not None, f"a copy in {ns}")
    set_opt_in(kapi, ns, None)
    within(PROMPT, lambda: kapi.get(secret_path(ns)).status == 404, f"the copy in {ns} to go")


def test_a_deleted_or_hand_edited_copy_is_restored(kapi, leader):
    ns = new_namespace(kapi)
    within(PROMPT, lambda: copy_data(kapi, ns) is not None, f"a copy in {ns}")
    current = copy_data(kapi, ns)

    assert kapi.request("DELETE", secret_path(ns)).status == 200
    within(PROMPT, lambda: copy_data(kapi, ns) == current, "the deleted copy to come back")

    merge_patch(kapi, secret_path(ns), {"data": {".dockerconfigjson": docker_config("hand")}})
    within(PROMPT, lambda: copy_data(kapi, ns) == current, "the hand-edited copy to be restored")

    stripped = {"metadata": {"annotations": {"mirrorgate.io/pull-secret-source-hash": None}}}
    merge_patch(kapi, secret_path(ns), stripped)

    def annotated() -> bool:
        annotations = kapi.get(secret_path(ns)).body["metadata"].get("annotations") or {}
        return "mirrorgate.io/pull-secret-source-hash" in annotations

    within(PROMPT, annotated, "the removed annotation to be restored")


def test_an_unmanaged_secret_of_the_same_name_is_never_touched_and_is_reported(kapi, leader):
    ns = new_namespace(kapi, opted_in=False)
    theirs = {
        "metadata": {"name": COPY, "labels": {"team": "payments"}},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": docker_config("theirs")},
    }
    created = kapi.request("POST", f"/api/v1/namespaces/{ns}/secrets", theirs)
    assert created.status == 201
    version = created.body["metadata"]["resourceVersion"]
    set_opt_in(kapi, ns, "true")

    within(
        PROMPT, lambda: metric(leader, "mirrorgate_pullsecret_conflicts") == 1, "the conflict gauge"
    )
    assert logged(
        leader,
        "namespace skipped: it has a Secret of the pull secret's name that "
        "mirrorgate does not manage",
        namespace=ns,
    )
    reply = kapi.create_pod(ns, pod("web"))
    assert reply.status == 201 and reply.body["spec"]["imagePullSecrets"] == [{"name": COPY}]
    assert any(
        f'namespace "{ns}" has a Secret "{COPY}" that mirrorgate does not manage' in w
        for w in reply.warnings
    )
    rotate(kapi, SYSTEM, "rotated-past-the-conflict")
    # Opting out again must not delete it either: wait until the namespace left the scope.
    set_opt_in(kapi, ns, None)
    within(
        PROMPT,
        lambda: metric(leader, "mirrorgate_pullsecret_conflicts") == 0,
        "the conflict to clear",
    )
    stored = kapi.get(secret_path(ns)).body
    assert stored["metadata"]["resourceVersion"] == version
    assert stored["data"] == theirs["data"]
    assert MANAGED_BY_LABEL not in stored["metadata"]["labels"]

    # Once the owner deletes theirs, the namespace is served like any other.
    set_opt_in(kapi, ns, "true")
    assert kapi.request("DELETE", secret_path(ns)).status == 200
    within(PROMPT, lambda: copy_data(kapi, ns) == copy_data(kapi, SYSTEM, SOURCE), "a managed copy")


def test_service_accounts_list_the_secret_while_the_namespace_is_opted_in(kapi, leader):
    ns = new_namespace(kapi, opted_in=False)
    # No controller-manager here: create the accounts it would create.
    for name, pulls in (("default", []), ("builder", [{"name": "their-registry"}])):
        body = {"metadata": {"name": name}, "imagePullSecrets": pulls}
        assert kapi.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", body).status == 201

    def pulls(name: str) -> list[str]:
        sa = kapi.get(f"/api/v1/namespaces/{ns}/serviceaccounts/{name}").body
        return [p["name"] for p in sa.get("imagePullSecrets") or []]

    set_opt_in(kapi, ns, "true")
    within(PROMPT, lambda: pulls("default") == [COPY], "default to list the secret")
    within(PROMPT, lambda: pulls("builder") == ["their-registry", COPY], "builder to list it")
    late = {"metadata": {"name": "late"}}
    assert kapi.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", late).status == 201
    within(PROMPT, lambda: pulls("late") == [COPY], "an account created later to list it")

    set_opt_in(kapi, ns, None)
    within(PROMPT, lambda: pulls("builder") == ["their-registry"], "the entry to be removed again")
    within(PROMPT, lambda: pulls("default") == [] and pulls("late") == [], "all entries removed")


def test_a_missing_source_is_reported_and_leaves_the_copies_alone(kapi, leader):
    ns = new_namespace(kapi)
    within(PROMPT, lambda: copy_data(kapi, ns) is not None, f"a copy in {ns}")
    kept = copy_data(kapi, ns)
    ready = {"source": f"{SYSTEM}/{SOURCE}"}
    assert metric(leader, "mirrorgate_pullsecret_source_ready", ready) == 1
    assert kapi.request("DELETE", secret_path(SYSTEM, SOURCE)).status == 200
    try:
        within(
            PROMPT,
            lambda: metric(leader, "mirrorgate_pullsecret_source_ready", ready) == 0,
            "the missing source to be reported",
        )
        assert logged(leader, "pull secret cannot be copied")
        assert copy_data(kapi, ns) == kept
        # A pod admitted meanwhile where no copy exists is told why it may not pull.
        bare = new_namespace(kapi)
        reply = kapi.create_pod(bare, pod("web"))
        assert reply.status == 201
        assert any(
            "could not be created" in w and f"{SYSTEM}/{SOURCE} does not exist" in w
            for w in reply.warnings
        ), reply.warnings
    finally:
        restored = {
            "metadata": {"name": SOURCE},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": docker_config("restored")},
        }
        assert kapi.request("POST", f"/api/v1/namespaces/{SYSTEM}/secrets", restored).status == 201
    new = restored["data"][".dockerconfigjson"]
    within(
        PROMPT,
        lambda: copy_data(kapi, ns) == new and copy_data(kapi, bare) == new,
        "the restored source in the old and the new namespace",
    )
    assert metric(leader, "mirrorgate_pullsecret_source_ready", ready) == 1


def test_the_webhook_runs_on_exactly_the_documented_rules(kapi, webhook_api, leader):
    ns = new_namespace(kapi)
    within(PROMPT, lambda: copy_data(kapi, ns) is not None, f"a copy in {ns}")
    # Everything above worked with these rules; nothing was refused along the way ...
    refused = [r for r in leader.log_records() if r.get("status") == 403]
    assert refused == []
    for operation in ("create", "update", "recreate", "delete", "patch_service_account"):
        assert (
            metric(leader, "mirrorgate_pullsecret_sync_errors_total", {"operation": operation}) == 0
        )
    assert metric(leader, "mirrorgate_pullsecret_watch_restarts_total", {"reason": "error"}) == 0
    # ... and they grant nothing else: other Secrets stay out of reach.
    other = {"metadata": {"name": "database-password"}, "stringData": {"password": "x"}}
    assert kapi.request("POST", f"/api/v1/namespaces/{ns}/secrets", other).status == 201
    assert webhook_api.get(secret_path(ns, "database-password")).status == 403
    assert webhook_api.get("/api/v1/secrets").status == 403
    assert webhook_api.get(f"/api/v1/namespaces/{SYSTEM}/secrets").status == 403
    assert webhook_api.get(f"/api/v1/namespaces/{ns}/pods").status == 403


# --- leader election -----------------------------------------------------------------------------


def test_two_replicas_one_leader_and_the_other_takes_over_when_it_dies(
    kapi, control_plane, webhook_user_token, tmp_path
):
    config_file, target = prepare_system(kapi, HA_SYSTEM, HA_COPY, accounts=False, tmp=tmp_path)
    replicas = {}
    try:
        for name in ("ha-a", "ha-b"):
            replicas[name] = serve(
                control_plane,
                webhook_user_token,
                config_file,
                namespace=HA_SYSTEM,
                pod_name=name,
                work=tmp_path / name,
            )
        within(PROMPT, lambda: lease_holder(kapi, HA_SYSTEM) in replicas, "a leader")
        first = lease_holder(kapi, HA_SYSTEM)
        (second,) = set(replicas) - {first}
        leader, other = replicas[first], replicas[second]
        within(PROMPT, lambda: metric(leader, "mirrorgate_pullsecret_leader") == 1, "leader gauge")
        assert metric(other, "mirrorgate_pullsecret_leader") == 0

        ns = new_namespace(kapi)
        within(PROMPT, lambda: copy_data(kapi, ns, HA_COPY) is not None, "a copy by the leader")
        # The copy can be seen a moment before the writer logs its success.
        within(PROMPT, lambda: logged(leader, "pull secret synced", namespace=ns), "leader log")
        assert not logged(other, "pull secret synced", namespace=ns)

        # The follower keeps answering admissions (and may create a missing copy itself).
        answer = admit(other, "mutate", ns, pod("web"), uid="ha-1")
        assert answer["allowed"] and answer["patchType"] == "JSONPatch"

        leader.process.kill()  # no clean shutdown: the lease is not released
        killed = time.monotonic()
        leader.process.wait()
        within(LEASE_SECONDS + 3, lambda: lease_holder(kapi, HA_SYSTEM) == second, "the takeover")
        TIMINGS["leader takeover after kill -9"] = time.monotonic() - killed
        within(
            PROMPT, lambda: metric(other, "mirrorgate_pullsecret_leader") == 1, "new leader gauge"
        )

        later = new_namespace(kapi)
        within(
            PROMPT, lambda: copy_data(kapi, later, HA_COPY) is not None, "a copy by the new leader"
        )
        within(PROMPT, lambda: logged(other, "pull secret synced", namespace=later), "its log")

        # A leader that stops cleanly hands the lease over at once instead of letting it expire.
        other.stop()
        assert other.process is None
        assert lease_holder(kapi, HA_SYSTEM) == ""
    finally:
        for wh in replicas.values():
            wh.stop()
        unbind_rules(kapi, target, role=f"mirrorgate-{HA_SYSTEM}")
        for item in kapi.get(f"/api/v1/secrets?fieldSelector=metadata.name={HA_COPY}").body[
            "items"
        ]:
            kapi.request("DELETE", secret_path(item["metadata"]["namespace"], HA_COPY))
    print("pull-secret timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in TIMINGS.items()))


# --- the gate's namespace labels come from the same watch ---------------------------------------

GATE_SYSTEM = "e2e-ps-gate-system"
GATE_COPY = "e2e-ps-gate-pull"


def namespace_watchers(control_plane: ControlPlane, kapi: KubeHTTP) -> float:
    """Watches on Namespaces the API server holds open (its own metric), from every client."""
    request = urllib.request.Request(
        f"{control_plane.url}/metrics",
        headers={"Authorization": f"Bearer {control_plane.admin_token}"},
    )
    with urllib.request.urlopen(request, context=kapi.ctx, timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "apiserver_registered_watchers":
            return sum(s.value for s in family.samples if s.labels.get("kind") == "Namespace")
    raise AssertionError("kube-apiserver exports no apiserver_registered_watchers")


def test_with_pull_secrets_and_the_gate_one_namespace_watch_serves_both(
    kapi, control_plane, webhook_user_token, clair, htpasswd_registry, tmp_path
):
    """scan-mode labels decide /validate from the pull-secret view: no second Namespace watch."""
    tag = f"t{next(_names)}"
    digest = push_image(htpasswd_registry, "gate/vulnerable", tag)
    image = f"{htpasswd_registry.host}/gate/vulnerable:{tag}"
    clair.set_report(digest, "trimmed")

    config_file, target = prepare_system(kapi, GATE_SYSTEM, GATE_COPY, accounts=False, tmp=tmp_path)
    (tmp_path / "psk").write_text(clair.psk_b64 + "\n")
    (tmp_path / "user").write_text(htpasswd_registry.credentials.username)
    (tmp_path / "password").write_text(htpasswd_registry.credentials.password)
    config_file.write_text(
        config_file.read_text()
        + f'registries:\n  "{htpasswd_registry.host}": {{caFile: {htpasswd_registry.ca_file},'
        f" auth: {{usernameFile: {tmp_path / 'user'}, passwordFile: {tmp_path / 'password'}}}}}\n"
        "scan:\n"
        f'  clair: {{url: "{clair.url}", pskFile: {tmp_path / "psk"}, issuer: mirrorgate}}\n'
        "  admissionBudget: 5s\n"
    )
    # A placeholder holds the Lease: this instance only watches and answers, it writes no copies.
    hold_lease(kapi, GATE_SYSTEM)
    audited, strict = new_namespace(kapi), new_namespace(kapi)
    merge_patch(
        kapi, f"/api/v1/namespaces/{audited}", {"metadata": {"labels": {SCAN_MODE: "audit"}}}
    )

    wh = serve(
        control_plane,
        webhook_user_token,
        config_file,
        namespace=GATE_SYSTEM,
        pod_name="mirrorgate-gate-0",
        work=tmp_path / "serve",
    )
    vulnerable = {**pod("web"), "spec": {"containers": [{"name": "c", "image": image}]}}

    def validate(namespace: str) -> dict[str, Any]:
        return admit(wh, "validate", namespace, vulnerable, uid=f"gate-{namespace}")

    try:
        within(PROMPT, lambda: validate(audited)["allowed"], "the audit label to take effect")
        assert validate(audited)["warnings"][0].startswith("mirrorgate: audit mode")
        assert validate(strict)["allowed"] is False
        # Relabelling is seen through the watch, without a restart.
        merge_patch(
            kapi, f"/api/v1/namespaces/{strict}", {"metadata": {"labels": {SCAN_MODE: "audit"}}}
        )
        within(PROMPT, lambda: validate(strict)["allowed"], "the relabelled namespace")
        with_serve = namespace_watchers(control_plane, kapi)
    finally:
        wh.stop()
        unbind_rules(kapi, target, role=f"mirrorgate-{GATE_SYSTEM}")
    # The API server drops a closed watch a moment later; what went away with serve was its own.
    within(
        PROMPT,
        lambda: with_serve - namespace_watchers(control_plane, kapi) >= 1,
        "serve's namespace watch to close",
    )
    time.sleep(1)
    assert with_serve - namespace_watchers(control_plane, kapi) == 1
