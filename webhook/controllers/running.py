"""Which image digests run in which namespaces, from one watch on pods.

The gate asks it whether a failing image already runs in a pod's namespace (``scan.running``):
a new pod of a ReplicaSet whose image turned vulnerable after it was deployed is then admitted
with a warning instead of denied. Lookups cost no API request.

What a pod contributes: the digests its containers run (``status.*containerStatuses[].imageID``,
the digest the node pulled, an index's or a manifest's) and the digests its spec pins
(``image@sha256:...``). Pods that ended (Succeeded, Failed) contribute nothing. The watch keeps
only that projection of each pod (``Kube.watch(project=...)``), listed 500 at a time; digests
and namespaces are interned, so the pods of one ReplicaSet share their strings. About 20,000 pods
cost a few MiB (bench figure in the closing note of issue 17). Past ``max_pods`` pods, further
ones are not tracked (counted in ``untracked``): the gate then judges their images as new, the
safe side.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from mirrorgate.webhook.adapters.kube import Kube, Watch

MAX_PODS = 200_000
_DIGEST = re.compile(r"@(sha256:[0-9a-f]{64})$")
_STATUSES = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")
_SPECS = ("initContainers", "containers", "ephemeralContainers")
_ENDED = ("Succeeded", "Failed")

PodKey = tuple[str, str]  # (namespace, name)


def pod_digests(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """The image digests a pod runs or pins; () for a pod that ended."""
    status = _dict(pod.get("status"))
    if status.get("phase") in _ENDED:
        return ()
    found: dict[str, None] = {}
    for key in _STATUSES:
        for cs in _dicts(status.get(key)):
            _add(found, cs.get("imageID"))
    spec = _dict(pod.get("spec"))
    for key in _SPECS:
        for c in _dicts(spec.get(key)):
            _add(found, c.get("image"))
    return tuple(found)


def project(pod: dict[str, Any]) -> dict[str, Any]:
    """What the watch keeps of a pod."""
    meta = _dict(pod.get("metadata"))
    return {
        "metadata": {
            "namespace": meta.get("namespace"),
            "name": meta.get("name"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "digests": pod_digests(pod),
    }


class RunningImages:
    """Digest -> namespace -> number of pods running it, from one watch on every pod."""

    def __init__(self, kube: Kube | None = None, *, max_pods: int = MAX_PODS) -> None:
        self.kube = kube
        self.max_pods = max_pods
        self._pods: dict[PodKey, tuple[str, ...]] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self.untracked = 0
        self.synced = False
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lookups (the gate) ---------------------------------------------------------------------

    def running_in(self, digests: Iterable[str], namespace: str) -> bool:
        """Whether a pod in ``namespace`` runs any of ``digests``."""
        return any(self._counts.get(d, {}).get(namespace, 0) > 0 for d in digests)

    def pods(self) -> int:
        return len(self._pods)

    def namespaces_running(self, digest: str) -> dict[str, int]:
        return dict(self._counts.get(digest, {}))

    # --- the watch ------------------------------------------------------------------------------

    def start(self) -> RunningImages:
        assert self.kube is not None
        self._watch = self.kube.watch("/api/v1/pods", project=project).start()
        self._task = asyncio.create_task(self._consume(self._watch), name="running images")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._watch is not None:
            await self._watch.close()

    async def _consume(self, watch: Watch) -> None:
        async for event in watch:
            if event.type == "RELIST":
                self.replace(event.objects)
            elif event.type == "DELETED":
                self.forget(_key(event.obj))
            else:
                self.update(_key(event.obj), event.obj.get("digests") or ())

    # --- the index (also driven directly by tests) ----------------------------------------------

    def replace(self, pods: Iterable[Mapping[str, Any]]) -> None:
        self._pods.clear()
        self._counts.clear()
        self.untracked = 0
        for pod in pods:
            self.update(_key(pod), pod.get("digests") or ())
        self.synced = True

    def update(self, key: PodKey, digests: Iterable[str]) -> None:
        new = tuple(sys.intern(d) for d in digests)
        old = self._pods.get(key)
        if old == new:
            return
        if old is None and not new:
            return
        if old is None and len(self._pods) >= self.max_pods:
            self.untracked += 1
            return
        if old is not None:
            self._count(key[0], old, -1)
        if new:
            self._pods[(sys.intern(key[0]), key[1])] = new
            self._count(key[0], new, +1)
        else:
            self._pods.pop(key, None)

    def forget(self, key: PodKey) -> None:
        old = self._pods.pop(key, None)
        if old is not None:
            self._count(key[0], old, -1)

    def _count(self, namespace: str, digests: tuple[str, ...], delta: int) -> None:
        for d in digests:
            per = self._counts.setdefault(d, {})
            n = per.get(namespace, 0) + delta
            if n > 0:
                per[sys.intern(namespace)] = n
            else:
                per.pop(namespace, None)
                if not per:
                    del self._counts[d]


def _key(obj: Mapping[str, Any]) -> PodKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _add(found: dict[str, None], ref: Any) -> None:
    if isinstance(ref, str) and (m := _DIGEST.search(ref)):
        found[m.group(1)] = None
