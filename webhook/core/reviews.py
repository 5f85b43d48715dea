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
    image_slots,
    mutate_ephemeral_containers,
    mutate_pod,
)

API_VERSION = "admission.k8s.io/v1"
MAX_BODY_BYTES = 3 * 1024 * 1024
MUTATED_OPERATIONS = ("CREATE", "UPDATE")
# Work per review is bounded by what a review may hold: pods far past any real one (the API server
# itself caps nothing but the object's size) are refused before any decision is made.
MAX_CONTAINERS = 1000
MAX_VOLUMES = 1000
# Distinct images one admission asks registries (or Clair) about; the rest are "not checked"
# (mutate: kept, warned; validate: unavailable). Real pods have a handful; thousands of checks
# would only queue behind each other past any budget.
MAX_CHECKS = 256
# What the API server passes on to kubectl (k8s.io/apiserver's warning recorder): printable text,
# 4 KiB in all before it starts cutting each warning to 256 characters; so each is kept to 512
# and the list to 4 KiB, the rest counted in a last line.
WARNING_MAX = 512
WARNINGS_TOTAL_MAX = 4096
MESSAGE_MAX = 8192
AUDIT_VALUE_MAX = 1024


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
        obj=_checked_object(req.get("object"), "request.object"),
        old_obj=_checked_object(req.get("oldObject"), "request.oldObject"),
        dry_run=req.get("dryRun") is True,
    )


def _checked_object(obj: Any, where: str) -> Any:
    """``obj`` when the parts mirrorgate reads have the types the API server gives them.

    The API server decodes every object into its typed struct before calling a webhook, so a
    review whose pod has a number for an image, or a list for its annotations, is not from it:
    BadReviewError names the first such field, once, here, and nothing after this point has to
    guess. Fields mirrorgate never reads are not looked at.
    """
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise BadReviewError(f"{where}: expected an object, got {_kind(obj)}")
    meta = obj.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            raise BadReviewError(f"{where}.metadata: expected an object, got {_kind(meta)}")
        for key in ("name", "namespace", "generateName"):
            _optional(meta.get(key), str, f"{where}.metadata.{key}")
        for key in ("annotations", "labels"):
            _string_map(meta.get(key), f"{where}.metadata.{key}")
    if "ephemeralContainers" in obj and "spec" not in obj:  # EphemeralContainers (1.20, 1.21)
        _containers(obj, "ephemeralContainers", where)
        return obj
    spec = obj.get("spec")
    if spec is None:
        return obj
    if not isinstance(spec, dict):
        raise BadReviewError(f"{where}.spec: expected an object, got {_kind(spec)}")
    count = 0
    for fld in CONTAINER_FIELDS:
        count += _containers(spec, fld, f"{where}.spec")
    if count > MAX_CONTAINERS:
        raise BadReviewError(
            f"{where}.spec has {count} containers; mirrorgate reviews pods of up to "
            f"{MAX_CONTAINERS}"
        )
    secrets = _optional(spec.get("imagePullSecrets"), list, f"{where}.spec.imagePullSecrets")
    for i, ref in enumerate(secrets or ()):
        if not isinstance(ref, dict):
            raise BadReviewError(
                f"{where}.spec.imagePullSecrets[{i}]: expected an object, got {_kind(ref)}"
            )
        _optional(ref.get("name"), str, f"{where}.spec.imagePullSecrets[{i}].name")
    volumes = _optional(spec.get("volumes"), list, f"{where}.spec.volumes")
    if volumes is not None and len(volumes) > MAX_VOLUMES:
        raise BadReviewError(
            f"{where}.spec has {len(volumes)} volumes; mirrorgate reviews pods of up to "
            f"{MAX_VOLUMES}"
        )
    for i, v in enumerate(volumes or ()):
        at = f"{where}.spec.volumes[{i}]"
        if not isinstance(v, dict):
            raise BadReviewError(f"{at}: expected an object, got {_kind(v)}")
        image = _optional(v.get("image"), dict, f"{at}.image")
        if image is not None:
            _optional(v.get("name"), str, f"{at}.name")
            _optional(image.get("reference"), str, f"{at}.image.reference")
    return obj


def _containers(parent: dict[str, Any], fld: str, where: str) -> int:
    items = _optional(parent.get(fld), list, f"{where}.{fld}")
    for i, c in enumerate(items or ()):
        if not isinstance(c, dict):
            raise BadReviewError(f"{where}.{fld}[{i}]: expected an object, got {_kind(c)}")
        _optional(c.get("name"), str, f"{where}.{fld}[{i}].name")
        _optional(c.get("image"), str, f"{where}.{fld}[{i}].image")
    return len(items or ())


def _optional(value: Any, kind: type, where: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise BadReviewError(f"{where}: expected {_KIND_NAMES[kind]}, got {_kind(value)}")
    return value


def _string_map(value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise BadReviewError(f"{where}: expected a map of strings, got {_kind(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise BadReviewError(f"{where}[{_short(key)}]: expected a string, got {_kind(item)}")


_KIND_NAMES: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _KIND_NAMES.get(type(value), type(value).__name__)


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


def mirror_candidates(result: ReviewResult) -> list[tuple[str, ...]]:
    """What must be checked before a first pass's rewrites are final: per image, the mirror
    reference it would rewrite to, then those of the lower-priority mirrors of its upstream."""
    seen: dict[tuple[str, ...], None] = {}
    for c in result.containers:
        d = c.decision
        if c.applied and d.needs_check and d.choices:
            seen[d.choices] = None
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
        # The 1.20/1.21 object: its ephemeralContainers list is shaped like a pod spec's.
        containers = _listed(req.obj, ephemeral_only=True)
        old = _listed(req.old_obj, ephemeral_only=True)
    elif req.kind == "Pod":
        containers = _listed(req.obj.get("spec"))
        old_spec = (req.old_obj or {}).get("spec") if isinstance(req.old_obj, dict) else None
        old = _listed(old_spec) if req.operation == "UPDATE" else {}
    else:
        return []
    images = [img for key, img in containers.items() if old.get(key) != img]
    return list(dict.fromkeys(images))


def _listed(spec: Any, *, ephemeral_only: bool = False) -> dict[tuple[str, str], str]:
    """(field, name) -> image of every container and image volume of ``spec`` that names one."""
    out: dict[tuple[str, str], str] = {}
    for fld, name, holder, key, _ in image_slots(spec):
        image = holder.get(key)
        if (
            isinstance(image, str)
            and image
            and (fld == "ephemeralContainers" or not ephemeral_only)
        ):
            out[(fld, name)] = image
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
        response["warnings"] = bounded_warnings(warnings)
    if status:
        if isinstance(status.get("message"), str):
            status = {**status, "message": printable(status["message"], MESSAGE_MAX, lines=True)}
        response["status"] = status
    if audit_annotations:
        response["auditAnnotations"] = {
            k: printable(v, AUDIT_VALUE_MAX) for k, v in audit_annotations.items()
        }
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def printable(text: str, limit: int, *, lines: bool = False) -> str:
    """``text`` with control characters (newlines too, unless ``lines``) shown as ``?`` and cut
    to ``limit`` characters: the API server drops a warning that is not printable."""
    if len(text) > limit:
        text = text[: limit - 15] + "... (truncated)"
    if text.isprintable():
        return text
    keep = "\n" if lines else ""
    return "".join(c if (c.isprintable() or c in keep) else "?" for c in text)


def bounded_warnings(warnings: list[str]) -> list[str]:
    """Each warning printable and at most WARNING_MAX characters, at most WARNINGS_TOTAL_MAX in
    all; what does not fit is counted in a last line instead of being cut by the API server."""
    out: list[str] = []
    total = 0
    for i, warning in enumerate(warnings):
        text = printable(warning, WARNING_MAX)
        if total + len(text) > WARNINGS_TOTAL_MAX - 100:
            out.append(f"mirrorgate: {len(warnings) - i} more warnings not shown (see its log)")
            break
        out.append(text)
        total += len(text)
    return out


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
