"""What mirrorgate tells ``kubectl describe``: the Kubernetes Events an admission leads to.

Pure: an admission's decisions in, ``EventNote``s out; ``controllers.events`` posts them off the
admission path. Three reasons:

- ``ImageRewritten`` (Normal), once per pod, on CREATE: which images went to which mirror.
- ``MirrorFallback`` (Warning): a mirror could not serve an image, so the next mirror or the
  original registry was used (the same text as the admission warning).
- ``ImageDenied`` (Warning), from the gate: the denial message (CVEs, packages, fixed versions).

A pod being created has no uid yet, and ``kubectl describe pod`` shows only Events that carry it:
a named pod's Event waits until the pod exists (``Subject.lookup``). A pod from ``generateName``
(every Deployment's, Job's, ...) has no name either when it is mutated, so its Events go on its
controller (``kubectl describe replicaset``). A denied pod never exists: its ``ImageDenied`` goes
on its controller, or on its name (``kubectl get events``). Dry runs lead to no Events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mirrorgate.webhook.core.mutation import ContainerDecision, fallback_message
from mirrorgate.webhook.core.reviews import AdmissionRequest, ReviewResult, printable

# What the API server and kubectl show of a message without cutting it.
EVENT_MESSAGE_MAX = 1024
EventType = Literal["Normal", "Warning"]
REWRITTEN = "ImageRewritten"
FALLBACK = "MirrorFallback"
DENIED = "ImageDenied"
REASONS = (REWRITTEN, FALLBACK, DENIED)


@dataclass(frozen=True, slots=True)
class Subject:
    """The object an Event is about (its ``involvedObject``)."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str = ""
    # A pod being created: look its uid up once it exists, and drop the Event if it never does.
    lookup: bool = False


@dataclass(frozen=True, slots=True)
class EventNote:
    subject: Subject
    reason: str
    message: str
    type: EventType = "Normal"


@dataclass(frozen=True, slots=True)
class _Owner:
    api_version: str
    kind: str
    name: str
    uid: str


def admission_events(req: AdmissionRequest, result: ReviewResult) -> list[EventNote]:
    """The Events of one /mutate answer."""
    if req.dry_run or not result.containers:
        return []
    subject, pod_label = _subject(req, exists=req.operation != "CREATE")
    if subject is None:
        return []
    notes: list[EventNote] = []
    rewritten = [c for c in result.containers if c.applied and c.decision.reason == "rewritten"]
    if rewritten and req.operation == "CREATE":
        lines = "; ".join(
            f"{_where(c)} {c.decision.input} -> {c.decision.image}" for c in rewritten
        )
        count = f"{len(rewritten)} image{'s' if len(rewritten) != 1 else ''}"
        notes.append(
            EventNote(
                subject, REWRITTEN, _bounded(f"{pod_label}rewrote {count} to mirrors: {lines}")
            )
        )
    fallbacks = [
        text
        for c in result.containers
        if (c.applied or c.decision.reason == "mirror-unavailable")
        and (text := fallback_message(c.field, c.name, c.decision)) is not None
    ]
    if fallbacks:
        text = f"{pod_label}{'; '.join(fallbacks)}"
        notes.append(EventNote(subject, FALLBACK, _bounded(text), "Warning"))
    return notes


def denial_event(req: AdmissionRequest, message: str) -> EventNote | None:
    """The Event of a /validate denial (never for dry runs)."""
    if req.dry_run:
        return None
    # The pod will not exist: on its controller when it has one, else on its name.
    subject, pod_label = _subject(req, exists=True, prefer_owner=True)
    if subject is None:
        return None
    return EventNote(subject, DENIED, _bounded(f"{pod_label}{message}"), "Warning")


def _subject(
    req: AdmissionRequest, *, exists: bool, prefer_owner: bool = False
) -> tuple[Subject | None, str]:
    """Where the Events of ``req`` go, and how their message names the pod when they go on its
    controller ("" when they go on the pod itself)."""
    obj = req.obj if isinstance(req.obj, dict) else {}
    found = obj.get("metadata")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    namespace = req.namespace or _text(meta.get("namespace"))
    name = req.name or _text(meta.get("name"))
    if not namespace:
        return None, ""
    owner = _controller(meta.get("ownerReferences"))
    if owner is not None and (prefer_owner or not name):
        label = f"pod {name}: " if name else _generated(meta)
        return Subject(owner.api_version, owner.kind, namespace, owner.name, owner.uid), label
    if not name:
        return None, ""
    uid = _text(meta.get("uid"))
    return Subject("v1", "Pod", namespace, name, uid, lookup=not uid and not exists), ""


def _controller(refs: Any) -> _Owner | None:
    """The ownerReference with ``controller: true`` (else the first), when it is complete."""
    if not isinstance(refs, list):
        return None
    candidates = [r for r in refs if isinstance(r, dict)]
    candidates.sort(key=lambda r: r.get("controller") is not True)
    for ref in candidates:
        fields = {k: _text(ref.get(k)) for k in ("apiVersion", "kind", "name", "uid")}
        if all(fields.values()):
            return _Owner(fields["apiVersion"], fields["kind"], fields["name"], fields["uid"])
    return None


def _generated(meta: dict[str, Any]) -> str:
    prefix = _text(meta.get("generateName"))
    return f"a new pod {prefix}*: " if prefix else "a new pod: "


def _where(c: ContainerDecision) -> str:
    kind = {
        "containers": "container",
        "initContainers": "init container",
        "ephemeralContainers": "ephemeral container",
        "volumes": "image volume",
    }.get(c.field, c.field)
    return f"{kind} {c.name}"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _bounded(text: str) -> str:
    return printable(text, EVENT_MESSAGE_MAX)
