"""AdmissionReview in, AdmissionReview response out: uid, JSON Patch, warnings, status.

Pure: the HTTP handler hands over bytes and gets back a response document plus what happened, for
logs and metrics. A malformed review raises ``BadReviewError`` (the API server's problem, HTTP
400); everything a user should know travels in ``warnings`` of an HTTP 200 answer.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import orjson

from mirrorgate.webhook.core.config import Config
from mirrorgate.webhook.core.mutation import (
    CONTAINER_FIELDS,
    Checks,
    ContainerDecision,
    MutationResult,
    mutate_ephemeral_containers,
    mutate_pod,
)

API_VERSION = "admission.k8s.io/v1"
MAX_BODY_BYTES = 3 * 1024 * 1024
MUTATED_OPERATIONS = ("CREATE", "UPDATE")


class BadReviewError(ValueError):
    """The request body is not a usable AdmissionReview v1; the message is a one-line reason."""


@dataclass(slots=True)  # not frozen: built per admission, and frozen __init__ costs 2.5x
class AdmissionRequest:
    uid: str
    kind: str  # request.kind.kind, e.g. Pod or EphemeralContainers
    resource: str  # request.resource.resource, e.g. pods
    sub_resource: str  # "" or e.g. ephemeralcontainers
    operation: str
    namespace: str | None
    name: str | None
    obj: Any
    old_obj: Any
    dry_run: bool


@dataclass(slots=True)
class ReviewResult:
    """The response document and what was decided, for the caller's logs and metrics."""

    response: dict[str, Any]
    outcome: str  # mutated | unchanged | skipped | excluded | ignored
    operation: str
    containers: list[ContainerDecision] = field(default_factory=list)
    patch: list[dict[str, Any]] = field(default_factory=list)
    patched: Any = None


def parse_review(body: bytes | str) -> AdmissionRequest:
    """Decode and check an AdmissionReview v1 request body."""
    if len(body) > MAX_BODY_BYTES:
        raise BadReviewError(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        doc = orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadReviewError(f"body is not JSON: {err}") from err
    if not isinstance(doc, dict):
        raise BadReviewError("body is not a JSON object")
    if doc.get("kind") != "AdmissionReview" or doc.get("apiVersion") != API_VERSION:
        raise BadReviewError(
            f"expected kind AdmissionReview, apiVersion {API_VERSION}; got kind "
            f"{_short(doc.get('kind'))}, apiVersion {_short(doc.get('apiVersion'))}"
        )
    req = doc.get("request")
    if not isinstance(req, dict):
        raise BadReviewError("AdmissionReview has no request object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReviewError("request.uid is missing or not a string")
    kind = _object(req.get("kind"))
    resource = _object(req.get("resource"))
    return AdmissionRequest(
        uid=uid,
        kind=str(kind.get("kind", "")),
        resource=str(resource.get("resource", "")),
        sub_resource=str(req.get("subResource") or ""),
        operation=str(req.get("operation", "")),
        namespace=req.get("namespace") if isinstance(req.get("namespace"), str) else None,
        name=req.get("name") if isinstance(req.get("name"), str) else None,
        obj=req.get("object"),
        old_obj=req.get("oldObject"),
        dry_run=bool(req.get("dryRun", False)),
    )


def review_mutation(
    req: AdmissionRequest, config: Config, *, own_namespace: str, checks: Checks | None = None
) -> ReviewResult:
    """Decide the mutation for one admission request; never raises on odd but valid input."""
    op = req.operation
    if req.resource != "pods" or req.sub_resource not in ("", "ephemeralcontainers"):
        return _unchanged(req, "ignored")
    if op not in MUTATED_OPERATIONS or not isinstance(req.obj, dict):
        return _unchanged(req, "ignored")
    if config.namespaces.excluded(req.namespace, own_namespace=own_namespace):
        return _unchanged(req, "excluded")

    if req.kind == "EphemeralContainers":
        result = mutate_ephemeral_containers(req.obj, config, checks=checks)
    elif req.kind == "Pod":
        old = req.old_obj if isinstance(req.old_obj, dict) else None
        # pods/ephemeralcontainers is an UPDATE of the whole Pod on Kubernetes >= 1.22.
        result = mutate_pod(req.obj, config, operation=op, old_pod=old, checks=checks)
    else:
        return _unchanged(req, "ignored")
    return _respond(req, result)


def mirror_candidates(result: ReviewResult) -> list[str]:
    """The mirror references a first pass would rewrite to and that must be checked first."""
    seen: dict[str, None] = {}
    for c in result.containers:
        if c.applied and c.decision.needs_check and c.decision.candidate:
            seen[c.decision.candidate] = None
    return list(seen)


def images_to_validate(req: AdmissionRequest, config: Config, *, own_namespace: str) -> list[str]:
    """The images this request brings into the cluster and that the gate must judge.

    CREATE: every image. UPDATE (and ephemeral containers): only images that differ from the
    stored pod, so an unrelated edit of a running pod is never denied because its image has
    since become vulnerable. Excluded namespaces and other resources: none.
    """
    if req.resource != "pods" or req.sub_resource not in ("", "ephemeralcontainers"):
        return []
    if req.operation not in MUTATED_OPERATIONS or not isinstance(req.obj, dict):
        return []
    if config.namespaces.excluded(req.namespace, own_namespace=own_namespace):
        return []
    if req.kind == "EphemeralContainers":
        containers = _listed(req.obj, ("ephemeralContainers",))
        old = (
            _listed(req.old_obj, ("ephemeralContainers",)) if isinstance(req.old_obj, dict) else {}
        )
    elif req.kind == "Pod":
        spec = req.obj.get("spec") if isinstance(req.obj.get("spec"), dict) else {}
        containers = _listed(spec, CONTAINER_FIELDS)
        old_spec = (req.old_obj or {}).get("spec") if isinstance(req.old_obj, dict) else None
        old = _listed(old_spec, CONTAINER_FIELDS) if req.operation == "UPDATE" else {}
    else:
        return []
    images = [img for key, img in containers.items() if old.get(key) != img]
    return list(dict.fromkeys(images))


def _listed(spec: Any, fields: tuple[str, ...]) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    if not isinstance(spec, dict):
        return out
    for fld in fields:
        for c in spec.get(fld) or []:
            if isinstance(c, dict) and isinstance(c.get("image"), str) and c["image"]:
                out[(fld, str(c.get("name", "")))] = c["image"]
    return out


def _respond(req: AdmissionRequest, result: MutationResult) -> ReviewResult:
    patch = result.patch
    response = build_response(req.uid, patch=patch, warnings=result.warnings)
    if result.skipped_pod:
        outcome = "skipped"
    else:
        outcome = "mutated" if patch else "unchanged"
    return ReviewResult(
        response=response,
        outcome=outcome,
        operation=req.operation,
        containers=result.containers,
        patch=patch,
        patched=result.obj,
    )


def _unchanged(req: AdmissionRequest, outcome: str) -> ReviewResult:
    return ReviewResult(
        response=build_response(req.uid), outcome=outcome, operation=req.operation, patched=req.obj
    )


def build_response(
    uid: str,
    *,
    allowed: bool = True,
    patch: list[dict[str, Any]] | None = None,
    warnings: list[str] | None = None,
    status: dict[str, Any] | None = None,
    audit_annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An AdmissionReview v1 response document that echoes ``uid``."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(patch)).decode("ascii")
    if warnings:
        response["warnings"] = list(warnings)
    if status:
        response["status"] = status
    if audit_annotations:
        response["auditAnnotations"] = dict(audit_annotations)
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
