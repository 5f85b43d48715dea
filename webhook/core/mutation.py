"""Pod in, mutated pod and warnings out: image rewriting (containers of every kind and image
volumes), ``imagePullSecrets``, the originals annotation.

Pure: no HTTP, no Kubernetes client. Mutation changes a copy of the submitted object and records
each change as an RFC 6902 operation in ``MutationResult.patch`` at the moment it makes it: the
patch is the answer's JSON Patch, with no diff of whole pods (jsonpatch's diff cost 60-75% of a
``/mutate``, bench/README.md). tests/test_mutation.py applies it with jsonpatch and checks that it
yields exactly ``MutationResult.obj``. A second pass over its own output changes nothing
(``reinvocationPolicy: IfNeeded`` relies on that).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import orjson

from mirrorgate.webhook.core.config import Config, Mirror
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
# Image volumes (``spec.volumes[].image.reference``, Kubernetes 1.31+) are pulled like images.
VOLUMES = "volumes"
IMAGE_FIELDS = (*CONTAINER_FIELDS, VOLUMES)
# Their key in the originals annotation: container names are DNS labels, never with a slash.
VOLUME_KEY = "volume/"
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
    mirror: str | None = None  # the chosen mirrors[].mirror (or the first tried, when none)
    # What to ask the mirrors before this rewrite is final: ``candidate``, then the references of
    # the lower-priority mirrors, tried in that order if it cannot serve (set with needs_check).
    choices: tuple[str, ...] = ()
    # Higher-priority mirrors that could not serve it: (mirrors[].mirror, MirrorCheck.reason).
    passed_over: tuple[tuple[str, str], ...] = ()

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
_memo: tuple[Config, Callable[[str], ImageDecision]] | None = None


class _NotMemoized(Exception):
    """Carries a decision out of the memo without keeping it there."""

    def __init__(self, decision: ImageDecision) -> None:
        self.decision = decision


def _memoized(config: Config) -> Callable[[str], ImageDecision]:
    # functools' C LRU: a hit costs a dict lookup; cachetools' LRUCache.get was a third of a
    # /mutate's CPU in the decision path (profiled with 30-image pods).
    @functools.lru_cache(maxsize=_MEMO_LIMIT)
    def decide(image: str) -> ImageDecision:
        decision = _decide_image(image, config, None)
        # Invalid references are what an attacker varies at will; they cost one failed parse
        # and are never kept (an exception's result is not cached).
        if decision.reason == "invalid":
            raise _NotMemoized(decision)
        return decision

    return decide


def decide_image(image: str, config: Config, checks: Checks | None = None) -> ImageDecision:
    """Memoized per config for the offline decision (``checks`` None): a config never changes
    after loading and a decision is a pure function of the image and the config. Keys are at
    most ``REFERENCE_MAX`` characters, so the memo is bounded in bytes too."""
    global _memo
    if checks is not None or len(image) > REFERENCE_MAX:
        return _decide_image(image, config, checks)
    memo = _memo
    if memo is None or memo[0] is not config:
        memo = _memo = (config, _memoized(config))
    try:
        return memo[1](image)
    except _NotMemoized as err:
        return err.decision


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
    mirrors = config.mirrors_for(ref)
    if not mirrors:
        return ImageDecision(input=image, reason="no-mirror", normalized=normalized)
    # The mirrors' references in priority order; one whose path prefix pushes the repository
    # past the 255-character limit cannot take this image at all.
    tried: list[tuple[Mirror, str]] = []
    unmirrorable: list[str] = []
    for m in mirrors:
        try:
            tried.append((m, with_mirror(ref, m.mirror)))
        except InvalidReferenceError as err:
            unmirrorable.append(f"cannot be rewritten to mirror {m.mirror}: {err.reason or err}")
    upstream = mirrors[0].upstream
    if not tried:
        return ImageDecision(
            input=image,
            reason="unmirrorable",
            normalized=normalized,
            upstream=upstream,
            detail="; ".join(unmirrorable),
        )
    passed: list[tuple[str, str]] = []
    first_failure: tuple[Mirror, str, MirrorCheck | None] | None = None
    for i, (mirror, rewritten) in enumerate(tried):
        if checks is None:
            # Offline, or the first pass: assume the first mirror can serve it.
            return ImageDecision(
                input=image,
                reason="rewritten",
                normalized=normalized,
                rewritten=rewritten,
                upstream=upstream,
                candidate=rewritten,
                needs_check=mirror.verify or config.pin_digests,
                mirror=mirror.mirror,
                choices=(
                    (rewritten, *(r for _, r in tried[i + 1 :])) if mirror.verify else (rewritten,)
                ),
            )
        check = checks.get(rewritten)
        if mirror.verify and (check is None or not check.ok):
            reason = (check.reason if check else None) or "unchecked"
            passed.append((mirror.mirror, reason))
            if first_failure is None:
                first_failure = (mirror, rewritten, check)
            continue
        pinned = None
        candidate = rewritten
        if config.pin_digests and ref.digest is None and check is not None and check.digest:
            pinned = check.digest
            rewritten = f"{rewritten}@{pinned}"
        return ImageDecision(
            input=image,
            reason="rewritten",
            normalized=normalized,
            rewritten=rewritten,
            upstream=upstream,
            candidate=candidate,
            pinned=pinned,
            needs_check=mirror.verify or config.pin_digests,
            mirror=mirror.mirror,
            passed_over=tuple(passed),
        )
    assert first_failure is not None  # every mirror was tried and failed its check
    mirror, rewritten, check = first_failure
    reason = passed[0][1]
    return ImageDecision(
        input=image,
        reason="mirror-unavailable",
        normalized=normalized,
        upstream=upstream,
        candidate=rewritten,
        fallback_reason=reason,
        detail=(check.detail if check and check.detail else f"mirror check: {reason}"),
        mirror=mirror.mirror,
        passed_over=tuple(passed),
    )


@dataclass(slots=True)
class ContainerDecision:
    field: str  # containers | initContainers | ephemeralContainers | volumes (image volumes)
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

    def visit(fld: str, index: int, name: str, holder: dict[str, Any], key: str) -> None:
        image = holder.get(key)
        if not isinstance(image, str) or not image:
            if fld == VOLUMES and operation != "UPDATE":
                result.warnings.append(
                    f"{WARNING_PREFIX}image volume {_quote(name)} has no image reference; "
                    "left unchanged"
                )
            return
        if operation == "UPDATE" and old_images.get((fld, name)) == image:
            return
        decision = decide_image(image, config, checks)
        applied = decision.reason == "rewritten" and may_rewrite
        result.containers.append(ContainerDecision(fld, name, decision, applied))
        if applied:
            holder[key] = decision.image
            patch.append({"op": "replace", "path": _slot_path(fld, index), "value": decision.image})
            recorded = VOLUME_KEY + name if fld == VOLUMES else name
            originals[recorded] = image
            if decision.pinned:
                pinned[recorded] = decision.pinned
            if decision.passed_over:
                result.warnings.extend(_warnings_for(fld, name, decision, may_rewrite, secret))
        else:
            result.warnings.extend(_warnings_for(fld, name, decision, may_rewrite, secret))

    # image_slots' order, without a generator and a pointer per container on the hot path.
    for fld in CONTAINER_FIELDS:
        items = spec.get(fld)
        if isinstance(items, list):
            for index, c in enumerate(items):
                if isinstance(c, dict):
                    visit(fld, index, str(c.get("name", "")), c, "image")
    volumes = spec.get(VOLUMES)
    if isinstance(volumes, list):
        for index, v in enumerate(volumes):
            if isinstance(v, dict) and isinstance(v.get("image"), dict):
                visit(VOLUMES, index, str(v.get("name", "")), v["image"], "reference")

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
        if not applied or decision.passed_over:
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
        volumes = spec.get(VOLUMES)
        if isinstance(volumes, list) and any(type(v) is dict and "image" in v for v in volumes):
            spec[VOLUMES] = [
                {**v, "image": dict(v["image"])} if _is_image_volume(v) else v for v in volumes
            ]
    return out


def _is_image_volume(volume: Any) -> bool:
    return isinstance(volume, dict) and isinstance(volume.get("image"), dict)


def _slot_path(fld: str, index: int) -> str:
    """The JSON Pointer of image slot ``index`` of ``fld``."""
    if fld == VOLUMES:
        return f"/spec/{VOLUMES}/{index}/image/reference"
    return f"/spec/{fld}/{index}/image"


def image_slots(spec: Any) -> Iterator[tuple[str, str, dict[str, Any], str, int]]:
    """Every place of a pod spec that names an image to pull, in a fixed order: (field, name,
    the dict holding it, its key there, its index in the field's list).

    Containers (init, regular, ephemeral) hold it in ``image``, image volumes in
    ``image.reference``; names are unique within each kind, so (field, name) identifies a slot.
    """
    if not isinstance(spec, dict):
        return
    for fld in CONTAINER_FIELDS:
        items = spec.get(fld)
        if isinstance(items, list):
            for i, c in enumerate(items):
                if isinstance(c, dict):
                    yield fld, str(c.get("name", "")), c, "image", i
    volumes = spec.get(VOLUMES)
    if isinstance(volumes, list):
        for i, v in enumerate(volumes):
            if _is_image_volume(v):
                yield VOLUMES, str(v.get("name", "")), v["image"], "reference", i


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
    return {(fld, name): holder.get(key) for fld, name, holder, key, _ in image_slots(spec)}


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
    if decision.reason == "rewritten" and not may_rewrite:
        return [
            f"{WARNING_PREFIX}{where} image {_quote(decision.input)} left unchanged: the pod lacks "
            f"imagePullSecret {_quote(secret or '')}, which cannot be added on update; "
            "recreate the pod to use the mirror"
        ]
    fallback = fallback_message(fld, name, decision)
    return [WARNING_PREFIX + fallback] if fallback is not None else []


def fallback_message(fld: str, name: str, decision: ImageDecision) -> str | None:
    """What the user is told when a mirror could not serve an image (the admission warning and
    the MirrorFallback Event), or None when every mirror asked could."""
    where = f"{_kind_label(fld)} {_quote(name)}"
    if decision.reason == "mirror-unavailable":
        if len(decision.passed_over) > 1:
            return (
                f"{where} keeps image {_quote(decision.input)}: no mirror can serve it "
                f"({_passed_over(decision)})"
            )
        host = (decision.candidate or "").split("/", 1)[0]
        why = _FALLBACK_WHY.get(decision.fallback_reason or "", decision.fallback_reason or "")
        return (
            f"{where} keeps image {_quote(decision.input)}: mirror {host} cannot serve it ({why})"
        )
    if decision.reason == "rewritten" and decision.passed_over:
        return (
            f"{where} image {_quote(decision.input)} rewritten to mirror {decision.mirror}: "
            f"{_passed_over(decision)}"
        )
    return None


def _passed_over(decision: ImageDecision) -> str:
    """``mirror a.example cannot serve it (not on the mirror), mirror b.example ...``"""
    return ", ".join(
        f"mirror {mirror} cannot serve it ({_FALLBACK_WHY.get(reason, reason)})"
        for mirror, reason in decision.passed_over
    )


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
        VOLUMES: "image volume",
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
