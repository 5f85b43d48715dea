"""AdmissionReviews and configs as the tests send them: pods, reviews, the gate's config."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from mirrorgate.webhook.core.config import parse_config
from tests.helpers.clair_standin import ClairStandIn
from tests.helpers.registries import HarnessRegistry

# Rewriting without registry calls: verify is off, so the tables test rewriting alone
# (tests/e2e/test_mirror_awareness.py covers verification).
REWRITE_CONFIG = parse_config(
    """
mirrors:
  - {upstream: docker.io, mirror: "127.0.0.1:31000", verify: false}
  - {upstream: ghcr.io, mirror: registry.example.org/ghcr, verify: false}
skip: ["registry.example.org/*", "docker.io/library/busybox:*"]
pullSecret: {name: mirrorgate-pull}
namespaces: {exclude: [kube-system, legacy]}
"""
)


def pod(
    *,
    containers=None,
    init=None,
    ephemeral=None,
    secrets=None,
    annotations=None,
    name="web",
    volumes=None,
):
    spec = {"containers": containers or [{"name": "app", "image": "nginx:1.25"}]}
    if volumes is not None:
        spec["volumes"] = volumes
    if init is not None:
        spec["initContainers"] = init
    if ephemeral is not None:
        spec["ephemeralContainers"] = ephemeral
    if secrets is not None:
        spec["imagePullSecrets"] = secrets
    meta = {"name": name, "namespace": "team-a"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def review(obj, *, operation="CREATE", old=None, namespace="team-a", kind="Pod", sub="", uid="u-1"):
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": operation,
            "namespace": namespace,
            "object": obj,
            "oldObject": old,
        },
    }
    if sub:
        body["request"]["subResource"] = sub
    return json.dumps(body).encode()


def pod_review(
    *images: str,
    uid: str = "u1",
    namespace: str = "team-a",
    operation: str = "CREATE",
    old: list[str] | None = None,
) -> dict[str, Any]:
    def pod(imgs: list[str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web"},
            "spec": {"containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(imgs)]},
        }

    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": operation,
            "namespace": namespace,
            "object": pod(list(images)),
            "oldObject": pod(old) if old is not None else None,
        },
    }


def write_gate_config(
    tmp: Path,
    clair: ClairStandIn,
    registry: HarnessRegistry,
    scan: str = "",
    *,
    events_token: str | None = None,
) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "psk").write_text(clair.psk_b64 + "\n")
    (tmp / "user").write_text(registry.credentials.username)
    (tmp / "password").write_text(registry.credentials.password)
    events = ""
    if events_token:
        (tmp / "events-token").write_text(events_token + "\n")
        events = f"  events: {{tokenFile: {tmp / 'events-token'}}}\n"
    path = tmp / "mirrorgate.yaml"
    path.write_text(
        f'registries:\n  "{registry.host}": {{caFile: {registry.ca_file},'
        f" auth: {{usernameFile: {tmp / 'user'}, passwordFile: {tmp / 'password'}}}}}\n"
        "scan:\n"
        f'  clair: {{url: "{clair.url}", pskFile: {tmp / "psk"}, issuer: mirrorgate}}\n'
        + (scan or "  admissionBudget: 5s\n")
        + events
    )
    return path


# --- one-container reviews for the verifying webhook (tests/e2e) ---


def admission(image: str, *, uid: str = "u1", dry_run: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "team-a",
            "dryRun": dry_run,
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web"},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
        },
    }


def patched_image(response: dict[str, Any]) -> str | None:
    if "patch" not in response:
        return None
    for op in json.loads(base64.b64decode(response["patch"])):
        if op["path"] == "/spec/containers/0/image":
            return op["value"]
    return None
