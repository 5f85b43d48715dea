"""Pod in, mutated pod and warnings out: image rewriting, ``imagePullSecrets``, the originals
annotation.

Pure: no HTTP, no Kubernetes client. Mutation changes a copy of the submitted object and records
each change as an RFC 6902 operation in ``MutationResult.patch`` at the moment it makes it: the
patch is the answer's JSON Patch, with no diff of whole pods (jsonpatch's diff cost 60-75% of a
``/mutate``, bench/README.md). tests/test_mutation.py applies it with jsonpatch and checks that it
yields exactly ``MutationResult.obj``. A second pass over its own output changes nothing
(``reinvocationPolicy: IfNeeded`` relies on that).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import orjson
from cachetools import LRUCache

from mirrorgate.webhook.core.config import Config
from mirrorgate.webhook.core.images import (
    REFERENCE_MAX,
    InvalidReferenceError,
    parse_reference,
    with_mirror,
)

ORIGINALS_ANNOTATION = "mirrorgate.io/original-images"
# container name -> the digest pinDigests resolved at admission (the image then ends in @digest).
PINNED_ANNOTATION = "mirrorgate.io/pinned-digests"
SKIP_ANNOTATION = "mirrorgate.io/skip"
# Order of a pod's container lists; Kubernetes requires names to be unique across all three.
CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")
WARNING_PREFIX = "mirrorgate: "
_MAX_QUOTED = 120

Reason = Literal[
    "rewritten",
    "already-mirrored",
    "skipped",
    "no-mirror",
    "invalid",
    "unmirrorable",
    "mirror-unavailable",
]


@dataclass(frozen=True, slots=True)
class MirrorCheck:
    """What the mirror said about a rewritten reference (from the registry client)."""

    ok: bool
    digest: str | None = None  # the digest the mirror serves for it, when ok
    reason: str | None = None  # why not: not_found, timeout, network, auth, ... (bounded)
    detail: str | None = None  # one line for the user


Checks = Mapping[str, MirrorCheck]


@dataclass(frozen=True, slots=True)
class ImageDecision:
    """What mirrorgate does with one image reference, and why."""

    input: str
    reason: Reason
    normalized: str | None = None
    rewritten: str | None = None
    upstream: str | None = None  # the matching mirrors[].upstream, for metrics
    detail: str | None = None  # the parse error for invalid references
    candidate: str | None = None  # the mirror reference that was considered
    pinned: str | None = None  # the digest added by pinDigests
    fallback_reason: str | None = None  # MirrorCheck.reason when the mirror could not serve
    needs_check: bool = False  # the mirror must be asked before this rewrite is final

    @property
    def image(self) -> str:
        return self.rewritten if self.rewritten is not None else self.input

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input": self.input,
            "normalized": self.normalized,
            "rewritten": self.image,
            "reason": self.reason,
        }
        if self.detail:
            out["error"] = self.detail
        return out


_MEMO_LIMIT = 10_000
_memo: tuple[Config, LRUCache[str, ImageDecision]] | None = None


def decide_image(image: str, config: Config, checks: Checks | None = None) -> ImageDecision:
    """Memoized per config for the offline decision (``checks`` None): a config never changes
    after loading and a decision is a pure function of the image and the config."""
    global _memo
    if checks is not None or len(image) > REFERENCE_MAX:
        return _decide_image(image, config, checks)
    memo = _memo
    if memo is None or memo[0] is not config:
        memo = _memo = (config, LRUCache(_MEMO_LIMIT))
    decision = memo[1].get(image)
    if decision is None:
        decision = _decide_image(image, config, None)
        # Invalid references are what an attacker varies at will; they cost one failed parse.
        if decision.reason != "invalid":
            memo[1][image] = decision
    return decision


def _decide_image(image: str, config: Config, checks: Checks | None = None) -> ImageDecision:
    """Decide where ``image`` should be pulled from under ``config``.

    ``checks`` maps candidate mirror references to what the mirror answered. Without it (offline
    use, or the first of two passes) the decision assumes the mirror can serve everything. With
    it, a verifying mirror that could not serve the image keeps the original, and ``pinDigests``
    adds the digest the mirror resolved.
    """
    try:
        ref = parse_reference(image)
    except InvalidReferenceError as err:
        return ImageDecision(input=image, reason="invalid", detail=str(err))
    normalized = str(ref)
    if config.mirror_serving(ref) is not None:
        return ImageDecision(input=image, reason="already-mirrored", normalized=normalized)
    if any(fnmatchcase(normalized, pattern) for pattern in config.skip):
        return ImageDecision(input=image, reason="skipped", normalized=normalized)
    mirror = config.mirror_for(ref)
    if mirror is None:
        return ImageDecision(input=image, reason="no-mirror", normalized=normalized)
    try:
        rewritten = with_mirror(ref, mirror.mirror)
    except InvalidReferenceError as err:
        # e.g. the mirror's path prefix pushes the repository past the 255-character limit.
        return ImageDecision(
            input=image,
            reason="unmirrorable",
            normalized=normalized,
            upstream=mirror.upstream,
            detail=f"cannot be rewritten to mirror {mirror.mirror}: {err.reason or err}",
        )
    check = checks.get(rewritten) if checks is not None else None
    if checks is not None and mirror.verify and (check is None or not check.ok):
        reason = check.reason if check else "unchecked"
        return ImageDecision(
            input=image,
            reason="mirror-unavailable",
            normalized=normalized,
            upstream=mirror.upstream,
            candidate=rewritten,
            fallback_reason=reason,
            detail=(check.detail if check and check.detail else f"mirror check: {reason}"),
        )
    candidate, pinned = rewritten, None
    if config.pin_digests and ref.digest is None and check is not None and check.digest:
        pinned = check.digest
        rewritten = f"{rewritten}@{pinned}"
    return ImageDecision(
        input=image,
        reason="rewritten",
        normalized=normalized,
        rewritten=rewritten,
        upstream=mirror.upstream,
        candidate=candidate,
        pinned=pinned,
        needs_check=mirror.verify or config.pin_digests,
    )


@dataclass(slots=True)
class ContainerDecision:
    field: str  # containers | initContainers | ephemeralContainers
    name: str
    decision: ImageDecision
    applied: bool  # False when the image was left alone although it could be rewritten


@dataclass(slots=True)
class MutationResult:
    obj: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    containers: list[ContainerDecision] = field(default_factory=list)
    skipped_pod: bool = False
    # RFC 6902 operations that turn the submitted object into ``obj``.
    patch: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rewritten(self) -> list[ContainerDecision]:
        return [c for c in self.containers if c.applied and c.decision.reason == "rewritten"]


def mutate_pod(
    pod: dict[str, Any],
    config: Config,
    *,
    operation: str = "CREATE",
    old_pod: dict[str, Any] | None = None,
    checks: Checks | None = None,
) -> MutationResult:
    """Rewrite the images of ``pod`` (a Pod object as the API server sends it).

    CREATE rewrites every image and adds the pull secret. UPDATE (including the
    ``ephemeralcontainers`` subresource, which sends the whole Pod from Kubernetes 1.22 on)
    rewrites only images that differ from ``old_pod``: rewriting an unchanged image would restart a
    running container on an unrelated edit, and the API server forbids adding ``imagePullSecrets``
    on update, so a pod without the secret keeps its images.
    """
    out = _copy_mutable_parts(pod)
    result = MutationResult(obj=out)
    metadata = out.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    if str(annotations.get(SKIP_ANNOTATION, "")).lower() == "true":
        result.skipped_pod = True
        result.warnings.append(
            f"{WARNING_PREFIX}pod not mutated: annotation {SKIP_ANNOTATION}=true"
        )
        return result

    spec = out.get("spec")
    if not isinstance(spec, dict):
        return result
    old_images = _images_by_name((old_pod or {}).get("spec")) if operation == "UPDATE" else {}
    secret = config.pull_secret.name if config.pull_secret else None
    has_secret = secret is None or any(
        isinstance(s, dict) and s.get("name") == secret for s in spec.get("imagePullSecrets") or []
    )
    may_rewrite = operation != "UPDATE" or has_secret

    originals: dict[str, str] = {}
    pinned: dict[str, str] = {}
    patch = result.patch
    for fld in CONTAINER_FIELDS:
        for index, container in _indexed(spec, fld):
            name = str(container.get("name", ""))
            image = container.get("image")
            if not isinstance(image, str) or not image:
                continue
            if operation == "UPDATE" and old_images.get((fld, name)) == image:
                continue
            decision = decide_image(image, config, checks)
            applied = decision.reason == "rewritten" and may_rewrite
            result.containers.append(ContainerDecision(fld, name, decision, applied))
            if applied:
                container["image"] = decision.image
                patch.append(
                    {"op": "replace", "path": f"/spec/{fld}/{index}/image", "value": decision.image}
                )
                originals[name] = image
                if decision.pinned:
                    pinned[name] = decision.pinned
            else:
                result.warnings.extend(_warnings_for(fld, name, decision, may_rewrite, secret))

    if originals:
        if operation != "UPDATE" and secret is not None and not has_secret:
            patch.append(_add_pull_secret(spec, secret))
        _record(out, ORIGINALS_ANNOTATION, originals)
        if pinned:
            _record(out, PINNED_ANNOTATION, pinned)
        patch.extend(_annotation_ops(pod, out, _RECORDED))
    return result


def mutate_ephemeral_containers(
    obj: dict[str, Any], config: Config, *, checks: Checks | None = None
) -> MutationResult:
    """Rewrite a Kubernetes 1.20/1.21 ``EphemeralContainers`` object (pods/ephemeralcontainers).

    That object carries only the ephemeral container list: the pod's ``imagePullSecrets`` and
    annotations are not part of it and the API server ignores anything but the list, so only images
    change. Ephemeral containers can only be added, never changed, so existing ones keep their
    images
    as they were admitted.
    """
    out = _json_copy(obj)
    result = MutationResult(obj=out)
    for index, container in _indexed(out, "ephemeralContainers"):
        name = str(container.get("name", ""))
        image = container.get("image")
        if not isinstance(image, str) or not image:
            continue
        decision = decide_image(image, config, checks)
        applied = decision.reason == "rewritten"
        result.containers.append(ContainerDecision("ephemeralContainers", name, decision, applied))
        if applied:
            container["image"] = decision.image
            result.patch.append(
                {
                    "op": "replace",
                    "path": f"/ephemeralContainers/{index}/image",
                    "value": decision.image,
                }
            )
        else:
            result.warnings.extend(_warnings_for("ephemeralContainers", name, decision, True, None))
    return result


def _copy_mutable_parts(pod: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``pod`` in which everything mutate_pod may change is new (metadata and its
    annotations, spec, imagePullSecrets, the container lists and their containers) and the rest is
    shared with ``pod``, read-only: the result must never be changed anywhere else."""
    out = dict(pod)
    metadata = out.get("metadata")
    if isinstance(metadata, dict):
        metadata = out["metadata"] = dict(metadata)
        if isinstance(metadata.get("annotations"), dict):
            metadata["annotations"] = dict(metadata["annotations"])
    spec = out.get("spec")
    if isinstance(spec, dict):
        spec = out["spec"] = dict(spec)
        if isinstance(spec.get("imagePullSecrets"), list):
            spec["imagePullSecrets"] = list(spec["imagePullSecrets"])
        for fld in CONTAINER_FIELDS:
            if isinstance(spec.get(fld), list):
                spec[fld] = [dict(c) if isinstance(c, dict) else c for c in spec[fld]]
    return out


def _json_copy(value: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, immutable scalars), several times faster than
    copy.deepcopy; anything else falls back to it."""
    t = type(value)
    if t is dict:
        return {k: _json_copy(v) for k, v in value.items()}
    if t is list:
        return [_json_copy(v) for v in value]
    if t in (str, int, float, bool) or value is None:
        return value
    return copy.deepcopy(value)


def _containers(spec: dict[str, Any], fld: str) -> list[dict[str, Any]]:
    items = spec.get(fld)
    if not isinstance(items, list):
        return []
    return [c for c in items if isinstance(c, dict)]


def _indexed(spec: dict[str, Any], fld: str) -> list[tuple[int, dict[str, Any]]]:
    """The containers of ``spec[fld]`` with their positions in that list, for patch paths."""
    items = spec.get(fld)
    if not isinstance(items, list):
        return []
    return [(i, c) for i, c in enumerate(items) if isinstance(c, dict)]


def _add_pull_secret(spec: dict[str, Any], secret: str) -> dict[str, Any]:
    """Append the pull secret to ``spec`` (a copy); the operation that does the same."""
    current = spec.get("imagePullSecrets")
    if isinstance(current, list):
        current.append({"name": secret})
        return {
            "op": "add",
            "path": f"/spec/imagePullSecrets/{len(current) - 1}",
            "value": {"name": secret},
        }
    op = "replace" if "imagePullSecrets" in spec else "add"  # null counts as absent
    spec["imagePullSecrets"] = [{"name": secret}]
    return {"op": op, "path": "/spec/imagePullSecrets", "value": [{"name": secret}]}


def _annotation_ops(
    before: dict[str, Any], after: dict[str, Any], keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The operations that turn ``before``'s annotations into ``after``'s, where ``after`` only
    added or changed some of ``keys`` (``_record``)."""
    meta = before.get("metadata")
    if not isinstance(meta, dict):
        op = "replace" if "metadata" in before else "add"
        return [{"op": op, "path": "/metadata", "value": after["metadata"]}]
    old = meta.get("annotations")
    new = after["metadata"]["annotations"]
    if not isinstance(old, dict):
        op = "replace" if "annotations" in meta else "add"
        return [{"op": op, "path": "/metadata/annotations", "value": new}]
    return [
        {
            "op": "replace" if key in old else "add",
            "path": f"/metadata/annotations/{_pointer(key)}",
            "value": new[key],
        }
        for key in keys
        if key in new and old.get(key, _ABSENT) != new[key]
    ]


_ABSENT = object()
# The annotations mutate_pod writes.
_RECORDED = (ORIGINALS_ANNOTATION, PINNED_ANNOTATION)


def _pointer(key: str) -> str:
    """``key`` as one JSON Pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _images_by_name(spec: Any) -> dict[tuple[str, str], Any]:
    if not isinstance(spec, dict):
        return {}
    return {
        (fld, str(c.get("name", ""))): c.get("image")
        for fld in CONTAINER_FIELDS
        for c in _containers(spec, fld)
    }


def _warnings_for(
    fld: str, name: str, decision: ImageDecision, may_rewrite: bool, secret: str | None
) -> list[str]:
    where = f"{_kind_label(fld)} {_quote(name)}"
    if decision.reason == "invalid":
        return [
            f"{WARNING_PREFIX}{where} image {_quote(decision.input)} is not a valid image "
            f"reference ({_reason_only(decision.detail)}); left unchanged"
        ]
    if decision.reason == "unmirrorable":
        return [
            f"{WARNING_PREFIX}{where} image {_quote(decision.input)} left unchanged: "
            f"{decision.detail}"
        ]
    if decision.reason == "mirror-unavailable":
        host = (decision.candidate or "").split("/", 1)[0]
        why = _FALLBACK_WHY.get(decision.fallback_reason or "", decision.fallback_reason or "")
        return [
            f"{WARNING_PREFIX}{where} keeps image {_quote(decision.input)}: mirror {host} "
            f"cannot serve it ({why})"
        ]
    if decision.reason == "rewritten" and not may_rewrite:
        return [
            f"{WARNING_PREFIX}{where} image {_quote(decision.input)} left unchanged: the pod lacks "
            f"imagePullSecret {_quote(secret or '')}, which cannot be added on update; "
            "recreate the pod to use the mirror"
        ]
    return []


def _record(pod: dict[str, Any], annotation: str, values: dict[str, str]) -> None:
    """Merge ``values`` into the JSON object held by ``annotation`` (compact, sorted keys)."""
    if not isinstance(pod.get("metadata"), dict):
        pod["metadata"] = {}
    metadata = pod["metadata"]
    if not isinstance(metadata.get("annotations"), dict):
        metadata["annotations"] = {}
    annotations = metadata["annotations"]
    try:
        recorded = orjson.loads(annotations.get(annotation, "{}"))
    except (TypeError, ValueError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    recorded.update(values)
    annotations[annotation] = orjson.dumps(recorded, option=orjson.OPT_SORT_KEYS).decode()


def _kind_label(fld: str) -> str:
    return {
        "containers": "container",
        "initContainers": "init container",
        "ephemeralContainers": "ephemeral container",
    }[fld]


def _quote(text: str) -> str:
    """Quote user-controlled text for a warning: printable, bounded, one line.

    The API server drops warnings with non-printable characters and truncates long ones.
    """
    clean = "".join(c if c.isprintable() else "?" for c in text)
    if len(clean) > _MAX_QUOTED:
        clean = clean[: _MAX_QUOTED - 3] + "..."
    return f'"{clean}"'


# MirrorCheck.reason -> what the user reads; the full registry error goes to the log.
_FALLBACK_WHY = {
    "not_found": "not on the mirror",
    "timeout": "no answer within verifyTimeout",
    "network": "mirror unreachable",
    "tls": "mirror certificate not trusted",
    "auth": "access denied: check the registries credentials",
    "server": "mirror answered with an error",
    "protocol": "unexpected answer from the mirror",
    "unchecked": "not checked",
    "too_many": "too many distinct images in one pod to check",
}


def _reason_only(detail: str | None) -> str:
    # InvalidReferenceError messages repeat the reference; the warning already quotes it.
    if not detail:
        return "unparseable"
    return detail.rsplit(": ", 1)[-1]
