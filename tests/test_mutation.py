"""Pod mutation and AdmissionReview responses: what ends up stored, and what the user is told."""

from __future__ import annotations

import base64
import copy
import json
import re

import jsonpatch
import pytest

from mirrorgate.webhook.core.config import parse_config
from mirrorgate.webhook.core.mutation import ORIGINALS_ANNOTATION, decide_image, mutate_pod
from mirrorgate.webhook.core.reviews import BadReviewError, parse_review, review_mutation
from tests.helpers.admission import REWRITE_CONFIG, pod, review

CONFIG = REWRITE_CONFIG
DIGEST = "sha256:" + "a" * 64


def run(body, *, own="mirrorgate"):
    result = review_mutation(parse_review(body), CONFIG, own_namespace=own)
    return result, result.response["response"]


def apply(obj, response):
    if "patch" not in response:
        return obj
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(obj, patch)


@pytest.mark.parametrize(
    ("image", "reason", "result"),
    [
        pytest.param(
            "nginx:1.25",
            "rewritten",
            "127.0.0.1:31000/library/nginx:1.25",
            id="a docker hub short name gets the mirror and library path",
        ),
        pytest.param(
            "nginx",
            "rewritten",
            "127.0.0.1:31000/library/nginx",
            id="no implicit latest tag is added",
        ),
        pytest.param(
            f"nginx@{DIGEST}",
            "rewritten",
            f"127.0.0.1:31000/library/nginx@{DIGEST}",
            id="a digest is kept",
        ),
        pytest.param(
            f"nginx:1.25@{DIGEST}",
            "rewritten",
            f"127.0.0.1:31000/library/nginx:1.25@{DIGEST}",
            id="tag and digest are both kept",
        ),
        pytest.param(
            "ghcr.io/org/app:v2",
            "rewritten",
            "registry.example.org/ghcr/org/app:v2",
            id="a mirror path prefix is put before the repository path",
        ),
        pytest.param(
            "registry.example.org/ghcr/org/app:v2",
            "already-mirrored",
            "registry.example.org/ghcr/org/app:v2",
            id="an image already on a mirror is left",
        ),
        pytest.param(
            "127.0.0.1:31000/library/nginx:1.25",
            "already-mirrored",
            "127.0.0.1:31000/library/nginx:1.25",
            id="a mirrored docker hub image is left",
        ),
        pytest.param("busybox:1.36", "skipped", "busybox:1.36", id="a skip glob leaves the image"),
        pytest.param(
            "quay.io/x/y:1", "no-mirror", "quay.io/x/y:1", id="an unmatched registry is left"
        ),
        pytest.param("NGINX:1", "invalid", "NGINX:1", id="an invalid reference is never rewritten"),
    ],
)
def test_image_decisions(image, reason, result):
    decision = decide_image(image, CONFIG)
    assert decision.reason == reason
    assert decision.image == result


def test_every_container_kind_is_rewritten_and_originals_recorded():
    obj = pod(
        containers=[
            {"name": "app", "image": "nginx:1.25"},
            {"name": "side", "image": "ghcr.io/o/s:1"},
        ],
        init=[{"name": "init", "image": "alpine:3.19"}],
    )
    result, resp = run(review(obj))
    assert resp["allowed"] is True and resp["uid"] == "u-1"
    assert resp["patchType"] == "JSONPatch"
    stored = apply(obj, resp)
    assert [c["image"] for c in stored["spec"]["containers"]] == [
        "127.0.0.1:31000/library/nginx:1.25",
        "registry.example.org/ghcr/o/s:1",
    ]
    assert stored["spec"]["initContainers"][0]["image"] == "127.0.0.1:31000/library/alpine:3.19"
    assert stored["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS_ANNOTATION]) == {
        "app": "nginx:1.25",
        "side": "ghcr.io/o/s:1",
        "init": "alpine:3.19",
    }
    assert result.outcome == "mutated"


def test_a_second_review_of_the_mutated_pod_yields_no_patch():
    obj = pod(init=[{"name": "init", "image": "alpine"}], secrets=[{"name": "other"}])
    _, first = run(review(obj))
    stored = apply(obj, first)
    result, second = run(review(stored))
    assert "patch" not in second
    assert result.outcome == "unchanged"
    assert stored["spec"]["imagePullSecrets"] == [{"name": "other"}, {"name": "mirrorgate-pull"}]


def test_an_existing_pull_secret_is_not_added_twice():
    obj = pod(secrets=[{"name": "mirrorgate-pull"}, {"name": "other"}])
    _, resp = run(review(obj))
    stored = apply(obj, resp)
    assert stored["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}, {"name": "other"}]


def test_nothing_rewritten_means_no_secret_and_no_annotation():
    obj = pod(containers=[{"name": "app", "image": "quay.io/x/y:1"}])
    result, resp = run(review(obj))
    assert "patch" not in resp and result.outcome == "unchanged"


def test_an_existing_annotation_and_other_annotations_are_kept():
    obj = pod(annotations={"team": "a", ORIGINALS_ANNOTATION: json.dumps({"old": "x:1"})})
    _, resp = run(review(obj))
    stored = apply(obj, resp)
    assert stored["metadata"]["annotations"]["team"] == "a"
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS_ANNOTATION]) == {
        "old": "x:1",
        "app": "nginx:1.25",
    }


def test_an_invalid_image_is_left_and_explained_in_a_warning():
    obj = pod(containers=[{"name": "app", "image": "Nginx:1"}, {"name": "ok", "image": "redis:7"}])
    _, resp = run(review(obj))
    stored = apply(obj, resp)
    assert stored["spec"]["containers"][0]["image"] == "Nginx:1"
    assert stored["spec"]["containers"][1]["image"] == "127.0.0.1:31000/library/redis:7"
    assert len(resp["warnings"]) == 1
    assert '"app"' in resp["warnings"][0] and '"Nginx:1"' in resp["warnings"][0]
    assert "lowercase" in resp["warnings"][0]


def test_warnings_stay_printable_and_bounded_for_hostile_images():
    obj = pod(containers=[{"name": "app", "image": "bad\x07image" + "A" * 400}])
    _, resp = run(review(obj))
    (warning,) = resp["warnings"]
    assert warning.isprintable() and len(warning) < 400


@pytest.mark.parametrize(
    "namespace",
    [
        pytest.param("kube-system", id="kube-system"),
        pytest.param("legacy", id="a configured exclude"),
        pytest.param("mirrorgate", id="the webhook's own namespace"),
    ],
)
def test_excluded_namespaces_are_allowed_unchanged(namespace):
    result, resp = run(review(pod(), namespace=namespace))
    assert resp == {"uid": "u-1", "allowed": True}
    assert result.outcome == "excluded"


def test_a_pod_annotated_skip_is_allowed_unchanged_with_a_warning():
    result, resp = run(review(pod(annotations={"mirrorgate.io/skip": "true"})))
    assert "patch" not in resp and resp["allowed"]
    assert resp["warnings"] == ["mirrorgate: pod not mutated: annotation mirrorgate.io/skip=true"]
    assert result.outcome == "skipped"


def test_update_rewrites_only_a_changed_image_and_never_touches_pull_secrets():
    old = pod(
        containers=[
            {"name": "app", "image": "127.0.0.1:31000/library/nginx:1.25"},
            {"name": "legacy", "image": "redis:6"},
        ],
        secrets=[{"name": "mirrorgate-pull"}],
    )
    new = copy.deepcopy(old)
    new["spec"]["containers"][0]["image"] = "nginx:1.26"
    _, resp = run(review(new, operation="UPDATE", old=old))
    stored = apply(new, resp)
    assert stored["spec"]["containers"][0]["image"] == "127.0.0.1:31000/library/nginx:1.26"
    # redis:6 was not changed by this update: rewriting it would restart a running container.
    assert stored["spec"]["containers"][1]["image"] == "redis:6"
    assert stored["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    patch = json.loads(base64.b64decode(resp["patch"]))
    assert not any(op["path"].startswith("/spec/imagePullSecrets") for op in patch)


def test_update_of_a_pod_without_the_pull_secret_leaves_images_and_warns():
    old = pod(containers=[{"name": "app", "image": "nginx:1.25"}])
    new = copy.deepcopy(old)
    new["spec"]["containers"][0]["image"] = "nginx:1.26"
    result, resp = run(review(new, operation="UPDATE", old=old))
    assert "patch" not in resp
    assert "lacks imagePullSecret" in resp["warnings"][0]
    assert result.outcome == "unchanged"


def test_ephemeral_container_in_a_whole_pod_subresource_update_is_rewritten():
    old = pod(
        secrets=[{"name": "mirrorgate-pull"}],
        containers=[{"name": "app", "image": "127.0.0.1:31000/library/nginx:1.25"}],
    )
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [
        {"name": "debug", "image": "busybox:latest"},
        {"name": "shell", "image": "alpine:3"},
    ]
    _, resp = run(review(new, operation="UPDATE", old=old, sub="ephemeralcontainers"))
    stored = apply(new, resp)
    assert [c["image"] for c in stored["spec"]["ephemeralContainers"]] == [
        "busybox:latest",
        "127.0.0.1:31000/library/alpine:3",
    ]


def test_kubernetes_1_20_ephemeral_containers_object_is_rewritten():
    obj = {
        "apiVersion": "v1",
        "kind": "EphemeralContainers",
        "metadata": {"name": "web", "namespace": "team-a"},
        "ephemeralContainers": [{"name": "debug", "image": "alpine:3"}],
    }
    _, resp = run(
        review(
            obj, operation="UPDATE", old=None, kind="EphemeralContainers", sub="ephemeralcontainers"
        )
    )
    stored = apply(obj, resp)
    assert stored["ephemeralContainers"][0]["image"] == "127.0.0.1:31000/library/alpine:3"
    assert "metadata" in stored and "annotations" not in stored["metadata"]


@pytest.mark.parametrize(
    ("operation", "kind", "resource"),
    [
        pytest.param("DELETE", "Pod", "pods", id="a delete is ignored"),
        pytest.param("CREATE", "Deployment", "deployments", id="a deployment is never mutated"),
        pytest.param("CREATE", "Binding", "pods", id="an unknown kind on pods is ignored"),
    ],
)
def test_other_requests_are_allowed_unchanged(operation, kind, resource):
    body = json.loads(review(pod(), operation=operation, kind=kind))
    body["request"]["resource"]["resource"] = resource
    result, resp = run(json.dumps(body).encode())
    assert resp == {"uid": "u-1", "allowed": True}
    assert result.outcome == "ignored"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"not json", "body is not JSON", id="a non-JSON body"),
        pytest.param(b"[1]", "not a JSON object", id="a JSON array"),
        pytest.param(
            json.dumps(
                {
                    "apiVersion": "admission.k8s.io/v1beta1",
                    "kind": "AdmissionReview",
                    "request": {"uid": "x"},
                }
            ).encode(),
            "apiVersion admission.k8s.io/v1",
            id="an AdmissionReview v1beta1",
        ),
        pytest.param(
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            "no request object",
            id="a review without request",
        ),
        pytest.param(
            json.dumps(
                {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {"uid": ""},
                }
            ).encode(),
            "request.uid",
            id="an empty uid",
        ),
        pytest.param(b"{" + b" " * (3 * 1024 * 1024) + b"}", "exceeds", id="a body over 3 MiB"),
        # Shapes the API server never sends (it decodes into typed structs first).
        pytest.param(
            review(pod(containers=["not a container", {"name": "app", "image": "nginx:1.25"}])),
            "request.object.spec.containers[0]: expected an object, got a string",
            id="a container that is not an object",
        ),
        pytest.param(
            review(pod(containers=[{"name": "app", "image": 5}])),
            "request.object.spec.containers[0].image: expected a string, got a number",
            id="an image that is a number",
        ),
        pytest.param(
            review(pod(annotations={"a": {"b": 1}})),
            "request.object.metadata.annotations['a']: expected a string, got an object",
            id="an annotation value that is not a string",
        ),
        pytest.param(
            review(pod(annotations=["x"])),
            "request.object.metadata.annotations: expected a map of strings, got a list",
            id="annotations that are a list",
        ),
        pytest.param(
            review(pod(secrets=["mirrorgate-pull"])),
            "request.object.spec.imagePullSecrets[0]: expected an object, got a string",
            id="a pull secret that is a bare string",
        ),
        pytest.param(
            review({"apiVersion": "v1", "kind": "Pod", "spec": [1]}),
            "request.object.spec: expected an object, got a list",
            id="a spec that is a list",
        ),
        pytest.param(
            review(pod(containers=[{"name": f"c{i}", "image": "nginx"} for i in range(1001)])),
            "request.object.spec has 1001 containers; mirrorgate reviews pods of up to 1000",
            id="a pod with more containers than any real one",
        ),
        pytest.param(
            review(pod(), old=[1]),
            "request.oldObject: expected an object, got a list",
            id="an old object that is a list",
        ),
    ],
)
def test_malformed_reviews_are_rejected_with_a_reason(body, reason):
    with pytest.raises(BadReviewError) as info:
        parse_review(body)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_an_image_the_mirror_prefix_would_push_past_the_length_limit_is_left_with_a_warning():
    cfg = parse_config("mirrors: [{upstream: ghcr.io, mirror: 'reg.example.org/" + "p" * 60 + "'}]")
    image = "ghcr.io/" + "a" * 200 + ":1"
    decision = decide_image(image, cfg)
    assert decision.reason == "unmirrorable" and decision.image == image
    result = mutate_pod(pod(containers=[{"name": "app", "image": image}]), cfg)
    assert result.obj["spec"]["containers"][0]["image"] == image
    assert "255" in result.warnings[0] or "long" in result.warnings[0]


VERIFYING = parse_config(
    """
mirrors:
  - {upstream: docker.io, mirror: "127.0.0.1:31000"}
pullSecret: {name: mirrorgate-pull}
pinDigests: true
"""
)


def test_a_mirror_that_cannot_serve_keeps_the_original_image_and_warns():
    from mirrorgate.webhook.core.mutation import MirrorCheck

    checks = {
        "127.0.0.1:31000/library/nginx:1.25": MirrorCheck(
            ok=False, reason="not_found", detail="127.0.0.1:31000/v2/library/nginx: not found"
        )
    }
    result = mutate_pod(pod(), VERIFYING, checks=checks)
    assert result.obj["spec"]["containers"][0]["image"] == "nginx:1.25"
    assert "imagePullSecrets" not in result.obj["spec"]
    (warning,) = result.warnings
    assert warning == (
        'mirrorgate: container "app" keeps image "nginx:1.25": mirror 127.0.0.1:31000 '
        "cannot serve it (not on the mirror)"
    )


def test_an_unchecked_candidate_counts_as_unavailable():
    result = mutate_pod(pod(), VERIFYING, checks={})
    assert result.obj["spec"]["containers"][0]["image"] == "nginx:1.25"
    assert result.containers[0].decision.fallback_reason == "unchecked"


def test_pin_digests_adds_the_resolved_digest_and_records_it():
    from mirrorgate.webhook.core.mutation import PINNED_ANNOTATION, MirrorCheck

    digest = "sha256:" + "c" * 64
    checks = {"127.0.0.1:31000/library/nginx:1.25": MirrorCheck(ok=True, digest=digest)}
    result = mutate_pod(pod(), VERIFYING, checks=checks)
    assert result.obj["spec"]["containers"][0]["image"] == (
        f"127.0.0.1:31000/library/nginx:1.25@{digest}"
    )
    annotations = result.obj["metadata"]["annotations"]
    assert json.loads(annotations[PINNED_ANNOTATION]) == {"app": digest}
    assert json.loads(annotations[ORIGINALS_ANNOTATION]) == {"app": "nginx:1.25"}
    # The pinned pod is already on the mirror: a second pass changes nothing.
    again = mutate_pod(result.obj, VERIFYING, checks={})
    assert again.obj == result.obj


RICH = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "web",
        "namespace": "team-a",
        "labels": {"app": "web"},
        "annotations": {"a/b": "1", "x~y": "2"},
        "ownerReferences": [{"kind": "RS"}],
    },
    "spec": {
        "volumes": [{"name": "v", "emptyDir": {}}],
        "initContainers": [{"name": "init", "image": "alpine:3", "command": ["sh"]}],
        "containers": [
            {
                "name": "app",
                "image": "nginx:1.25",
                "env": [{"name": "A", "value": "1"}],
                "ports": [{"containerPort": 80}],
            },
            {"name": "ok", "image": "quay.io/a/b:1", "resources": {"limits": {"cpu": "1"}}},
            {"image": "redis:7"},
        ],
        "imagePullSecrets": [{"name": "other"}],
        "tolerations": [{"key": "k", "operator": "Exists"}],
    },
}


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(RICH, id="a pod with many fields mutation does not touch"),
        pytest.param(
            {k: v for k, v in RICH.items() if k != "metadata"}, id="a pod without metadata"
        ),
        pytest.param({**RICH, "metadata": {"name": "web"}}, id="a pod without annotations"),
        pytest.param(
            {**RICH, "spec": {**RICH["spec"], "imagePullSecrets": None}},
            id="a pod whose imagePullSecrets is null",
        ),
        pytest.param(
            pod(containers=[{"name": "a", "image": "127.0.0.1:31000/library/x:1"}]),
            id="a pod already on the mirror",
        ),
        pytest.param({**RICH, "metadata": None}, id="a pod whose metadata is null"),
        pytest.param(
            {**RICH, "metadata": {"name": "web", "annotations": None}},
            id="a pod whose annotations are null",
        ),
        pytest.param(
            {k: v for k, v in RICH.items() if k != "spec"}
            | {"spec": {k: v for k, v in RICH["spec"].items() if k != "imagePullSecrets"}},
            id="a pod without imagePullSecrets",
        ),
        pytest.param(
            pod(
                containers=[
                    {"name": "app", "image": "127.0.0.1:31000/library/nginx:1.25"},
                    {"name": "sidecar", "image": "envoyproxy/envoy:v1.29"},
                ],
                secrets=[{"name": "mirrorgate-pull"}],
                annotations={ORIGINALS_ANNOTATION: '{"app":"nginx:1.25"}'},
            ),
            id="a reinvocation after a sidecar was injected",
        ),
    ],
)
def test_the_patch_turns_the_submitted_pod_into_exactly_the_mutated_pod(obj):
    submitted = copy.deepcopy(obj)
    result, resp = run(review(obj))
    assert obj == submitted, "the request object must not be changed"
    assert apply(copy.deepcopy(obj), resp) == result.patched
    # Everything mutation does not own is untouched.
    stored = apply(copy.deepcopy(obj), resp)
    for key in ("volumes", "tolerations"):
        assert stored.get("spec", {}).get(key) == obj.get("spec", {}).get(key)


def test_megabyte_long_distinct_images_are_refused_fast_and_never_remembered():
    """100 pods each with a distinct invalid 1 MB image: each is answered with a warning and
    nothing of them is kept (on c698f4d the decision memo kept every one: +100 MiB)."""
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            image = f"{i}" + "A" * (1 << 20)
            _, response = run(
                review(pod(containers=[{"name": "app", "image": image}]), uid=f"u{i}")
            )
            assert "patch" not in response
            assert "no image reference is longer than 1024 characters" in response["warnings"][0]
            assert len(response["warnings"][0]) < 512
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 8 << 20, f"{kept / (1 << 20):.1f} MiB kept after 100 distinct 1 MB images"


# --- several mirrors per upstream --------------------------------------------------------------

MIRRORS = parse_config(
    """
mirrors:
  - upstream: docker.io
    mirror: [eu.mirror.example/hub, us.mirror.example/hub]
  - {upstream: docker.io, mirror: backup.example/hub, verify: false}
pullSecret: {name: mirrorgate-pull}
"""
)
EU, US, BACKUP = (
    "eu.mirror.example/hub/library/nginx:1.25",
    "us.mirror.example/hub/library/nginx:1.25",
    "backup.example/hub/library/nginx:1.25",
)


def _check(ok, reason=None):
    from mirrorgate.webhook.core.mutation import MirrorCheck

    return MirrorCheck(ok=ok, reason=reason, digest=DIGEST if ok else None)


@pytest.mark.parametrize(
    ("checks", "image", "passed_over", "warning"),
    [
        pytest.param({EU: _check(True)}, EU, (), None, id="the first mirror serves: it wins"),
        pytest.param(
            {EU: _check(False, "network"), US: _check(True)},
            US,
            (("eu.mirror.example/hub", "network"),),
            'mirrorgate: container "app" image "nginx:1.25" rewritten to mirror '
            "us.mirror.example/hub: mirror eu.mirror.example/hub cannot serve it "
            "(mirror unreachable)",
            id="a down first mirror: the second wins and the warning says why",
        ),
        pytest.param(
            {EU: _check(True), US: _check(False, "not_found")},
            EU,
            (),
            None,
            id="priority, not speed: the first wins when it can serve",
        ),
        pytest.param(
            {EU: _check(False, "timeout"), US: _check(False, "not_found")},
            BACKUP,
            (("eu.mirror.example/hub", "timeout"), ("us.mirror.example/hub", "not_found")),
            'mirrorgate: container "app" image "nginx:1.25" rewritten to mirror '
            "backup.example/hub: mirror eu.mirror.example/hub cannot serve it (no answer within "
            "verifyTimeout), mirror us.mirror.example/hub cannot serve it (not on the mirror)",
            id="both verified mirrors fail: the unverified backup is used unasked",
        ),
        pytest.param(
            {US: _check(True)},
            US,
            (("eu.mirror.example/hub", "unchecked"),),
            None,
            id="a mirror without an answer counts as unable to serve",
        ),
    ],
)
def test_several_mirrors_are_tried_in_priority_order(checks, image, passed_over, warning):
    result = mutate_pod(pod(), MIRRORS, checks=checks)
    decision = result.containers[0].decision
    assert result.obj["spec"]["containers"][0]["image"] == image
    assert decision.passed_over == passed_over
    assert decision.mirror == image.split("/library/")[0]
    if warning is not None:
        assert result.warnings == [warning]
    elif not passed_over:
        assert result.warnings == []
    # Whichever mirror served it, the pod is marked as mirrored: a second pass changes nothing.
    assert mutate_pod(result.obj, MIRRORS, checks={}).patch == []


def test_when_no_mirror_can_serve_the_original_is_kept_and_each_is_named():
    cfg = parse_config(
        "mirrors: [{upstream: docker.io, mirror: [eu.mirror.example/hub, us.mirror.example/hub]}]"
    )
    checks = {EU: _check(False, "network"), US: _check(False, "not_found")}
    result = mutate_pod(pod(), cfg, checks=checks)
    assert result.obj["spec"]["containers"][0]["image"] == "nginx:1.25"
    assert result.patch == []
    assert result.warnings == [
        'mirrorgate: container "app" keeps image "nginx:1.25": no mirror can serve it (mirror '
        "eu.mirror.example/hub cannot serve it (mirror unreachable), mirror us.mirror.example/hub "
        "cannot serve it (not on the mirror))"
    ]
    assert result.containers[0].decision.fallback_reason == "network"


def test_the_first_pass_asks_for_the_first_mirror_and_offers_the_others_in_order():
    from mirrorgate.webhook.core.reviews import mirror_candidates

    result = review_mutation(parse_review(review(pod())), MIRRORS, own_namespace="mirrorgate")
    assert result.containers[0].decision.image == EU
    assert mirror_candidates(result) == [(EU, US, BACKUP)]
    # One mirror per upstream: one candidate, as before.
    verifying = parse_config("mirrors: [{upstream: docker.io, mirror: eu.mirror.example/hub}]")
    one = review_mutation(parse_review(review(pod())), verifying, own_namespace="mirrorgate")
    assert mirror_candidates(one) == [(EU,)]


def test_a_mirror_whose_prefix_cannot_take_the_image_is_skipped_for_the_next():
    long_prefix = "a.example/" + "p" * 250
    cfg = parse_config(
        f"mirrors: [{{upstream: docker.io, mirror: [{long_prefix}, b.example], verify: false}}]"
    )
    decision = decide_image("nginx:1.25", cfg)
    assert decision.reason == "rewritten" and decision.image == "b.example/library/nginx:1.25"


# --- image volumes (Kubernetes 1.31+) ----------------------------------------------------------
# Reviews shaped as a 1.33 API server sends them: the 1.20 API server of the e2e suite does not
# know spec.volumes[].image and prunes it before admission, so these tables are where it is tested.


def test_an_image_volume_is_rewritten_recorded_and_gets_the_pull_secret():
    obj = pod(
        containers=[{"name": "app", "image": "127.0.0.1:31000/library/nginx:1.25"}],
        volumes=[
            {"name": "cfg", "configMap": {"name": "c"}},
            {
                "name": "models",
                "image": {"reference": "ghcr.io/o/models:v2", "pullPolicy": "Always"},
            },
        ],
    )
    result, resp = run(review(obj))
    stored = apply(obj, resp)
    assert stored["spec"]["volumes"][1] == {
        "name": "models",
        "image": {"reference": "registry.example.org/ghcr/o/models:v2", "pullPolicy": "Always"},
    }
    assert stored["spec"]["volumes"][0] == {"name": "cfg", "configMap": {"name": "c"}}
    assert stored["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    # "volume/" keeps a volume and a container of the same name apart.
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS_ANNOTATION]) == {
        "volume/models": "ghcr.io/o/models:v2"
    }
    assert stored == result.patched
    assert obj["spec"]["volumes"][1]["image"]["reference"] == "ghcr.io/o/models:v2"
    assert [(c.field, c.name) for c in result.containers][-1] == ("volumes", "models")
    # The stored pod needs nothing more.
    assert "patch" not in run(review(stored))[1]


def test_an_image_volume_follows_the_container_rules():
    obj = pod(
        volumes=[
            {"name": "skip", "image": {"reference": "busybox:1.36"}},
            {"name": "bad", "image": {"reference": "Nginx"}},
            {"name": "none", "image": {"pullPolicy": "IfNotPresent"}},
            {"name": "app", "image": {"reference": "alpine:3.19"}},
        ]
    )
    result, resp = run(review(obj))
    stored = apply(obj, resp)
    refs = [v["image"].get("reference") for v in stored["spec"]["volumes"]]
    assert refs == [
        "busybox:1.36",  # skip: docker.io/library/busybox:*
        "Nginx",
        None,
        "127.0.0.1:31000/library/alpine:3.19",
    ]
    assert json.loads(stored["metadata"]["annotations"][ORIGINALS_ANNOTATION]) == {
        "app": "nginx:1.25",
        "volume/app": "alpine:3.19",
    }
    assert resp["warnings"] == [
        'mirrorgate: image volume "bad" image "Nginx" is not a valid image reference '
        "(repository name must be lowercase); left unchanged",
        'mirrorgate: image volume "none" has no image reference; left unchanged',
    ]


def test_an_unchanged_image_volume_is_left_alone_on_update():
    old = pod(
        secrets=[{"name": "mirrorgate-pull"}],
        volumes=[{"name": "m", "image": {"reference": "ghcr.io/o/m:1"}}],
    )
    result, resp = run(review(old, operation="UPDATE", old=old))
    assert "patch" not in resp and result.outcome == "unchanged"


def test_image_volumes_are_judged_by_the_gate_and_checked_on_the_mirror():
    from mirrorgate.webhook.core.reviews import images_to_validate, mirror_candidates

    obj = pod(volumes=[{"name": "m", "image": {"reference": "ghcr.io/o/m:1"}}])
    req = parse_review(review(obj))
    assert images_to_validate(req, CONFIG, own_namespace="mirrorgate") == [
        "nginx:1.25",
        "ghcr.io/o/m:1",
    ]
    verifying = parse_config("mirrors: [{upstream: ghcr.io, mirror: m.example/ghcr}]")
    result = review_mutation(req, verifying, own_namespace="mirrorgate")
    assert mirror_candidates(result) == [("m.example/ghcr/o/m:1",)]


@pytest.mark.parametrize(
    ("volumes", "reason"),
    [
        pytest.param(["v"], "request.object.spec.volumes[0]: expected an object", id="a string"),
        pytest.param(
            [{"name": "v", "image": "nginx"}],
            "request.object.spec.volumes[0].image: expected an object, got a string",
            id="an image that is a string",
        ),
        pytest.param(
            [{"name": "v", "image": {"reference": 7}}],
            "request.object.spec.volumes[0].image.reference: expected a string, got a number",
            id="a reference that is a number",
        ),
    ],
)
def test_malformed_image_volumes_are_rejected_with_the_field(volumes, reason):
    with pytest.raises(BadReviewError, match=re.escape(reason)):
        parse_review(review(pod(volumes=volumes)))
