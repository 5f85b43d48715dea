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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from mirrorgate.webhook.adapters.kube import LIST_PAGE_SIZE, Kube, SyncKube, Watch

MAX_PODS = 200_000
_DIGEST = re.compile(r"@(sha256:[0-9a-f]{64})$")
_SCHEME = re.compile(r"^[a-z-]+://")  # docker-pullable://
_STATUSES = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")
_SPECS = ("initContainers", "containers", "ephemeralContainers")
_ENDED = ("Succeeded", "Failed")

PodKey = tuple[str, str]  # (namespace, name)


def pod_refs(pod: Mapping[str, Any]) -> dict[str, str]:
    """digest -> a reference to fetch it by (``repository@digest``), for every image digest a
    pod runs or pins; {} for a pod that ended."""
    status = _dict(pod.get("status"))
    if status.get("phase") in _ENDED:
        return {}
    found: dict[str, str] = {}
    for key in _STATUSES:
        for cs in _dicts(status.get(key)):
            _add(found, cs.get("imageID"))
    spec = _dict(pod.get("spec"))
    for key in _SPECS:
        for c in _dicts(spec.get(key)):
            _add(found, c.get("image"))
    return found


def pod_digests(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """The image digests a pod runs or pins; () for a pod that ended."""
    return tuple(pod_refs(pod))


def project(pod: dict[str, Any]) -> dict[str, Any]:
    """What the watch keeps of a pod."""
    meta = _dict(pod.get("metadata"))
    return {
        "metadata": {
            "namespace": meta.get("namespace"),
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "refs": pod_refs(pod),
    }


class RunningImages:
    """Digest -> namespace -> number of pods running it, from one watch on every pod."""

    def __init__(self, kube: Kube | None = None, *, max_pods: int = MAX_PODS) -> None:
        self.kube = kube
        self.max_pods = max_pods
        self._pods: dict[PodKey, tuple[str, ...]] = {}
        self._uids: dict[PodKey, str] = {}
        self._counts: dict[str, dict[str, int]] = {}
        # digest -> a reference to fetch it by (the first pod's), for re-judging it
        self._refs: dict[str, str] = {}
        # Called with the digests that started running somewhere new (controllers.vulnerable).
        self.on_new: Callable[[set[str]], None] | None = None
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

    def digests(self) -> dict[str, str]:
        """Every running digest -> a reference to fetch it by."""
        return {d: self._refs.get(d, "") for d in self._counts}

    def pods_by_digests(self) -> Iterator[tuple[PodKey, str, tuple[str, ...]]]:
        """(namespace, name), uid and digests of every tracked pod."""
        for key, digests in self._pods.items():
            yield key, self._uids.get(key, ""), digests

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
                self.update(_key(event.obj), event.obj.get("refs") or {}, uid=_uid(event.obj))

    # --- the index (also driven directly by tests) ----------------------------------------------

    def replace(self, pods: Iterable[Mapping[str, Any]]) -> None:
        self.synced = False
        self._pods.clear()
        self._uids.clear()
        self._counts.clear()
        self._refs.clear()
        self.untracked = 0
        for pod in pods:
            self.update(_key(pod), pod.get("refs") or {}, uid=_uid(pod))
        self.synced = True
        if self.on_new is not None:
            self.on_new(set(self._counts))

    def update(
        self, key: PodKey, refs: Iterable[str] | Mapping[str, str], *, uid: str = ""
    ) -> None:
        """Pod ``key`` now runs ``refs`` (digests, or digest -> reference)."""
        new = tuple(sys.intern(d) for d in refs)
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
            fresh = {d for d in new if d not in self._counts}
            if isinstance(refs, Mapping):
                for d, ref in refs.items():
                    self._refs.setdefault(d, ref)
            self._pods[(sys.intern(key[0]), key[1])] = new
            if uid:
                self._uids[key] = uid
            self._count(key[0], new, +1)
            if fresh and self.synced and self.on_new is not None:
                self.on_new(fresh)
        else:
            self._pods.pop(key, None)
            self._uids.pop(key, None)

    def forget(self, key: PodKey) -> None:
        old = self._pods.pop(key, None)
        self._uids.pop(key, None)
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
                    self._refs.pop(d, None)


def snapshot(kube: SyncKube, *, max_pods: int = MAX_PODS) -> RunningImages:
    """Every pod of the cluster, listed page by page and projected (``mirrorgate scan
    --running``)."""
    running = RunningImages(max_pods=max_pods)
    pods: list[dict[str, Any]] = []
    token = ""
    while True:
        query = {"limit": str(LIST_PAGE_SIZE), **({"continue": token} if token else {})}
        page = kube.request("GET", "/api/v1/pods", query=query) or {}
        pods.extend(project(p) for p in page.get("items") or [] if isinstance(p, dict))
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token:
            break
    running.replace(pods)
    return running


def _key(obj: Mapping[str, Any]) -> PodKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _add(found: dict[str, str], ref: Any) -> None:
    if isinstance(ref, str) and (m := _DIGEST.search(ref)):
        found.setdefault(sys.intern(m.group(1)), _SCHEME.sub("", ref))
