"""The pull secret in every namespace that needs it: propagation, rotation, creation at admission.

Owns keeping a copy of ``pullSecret.source`` (a ``kubernetes.io/dockerconfigjson`` Secret) named
``pullSecret.name`` in every namespace in scope, current with the source, labelled
``app.kubernetes.io/managed-by: mirrorgate``; optionally listing it on the ServiceAccounts there;
creating it during ``/mutate`` when a pod needs it before the reconciler got there; and the exact
RBAC rules all of that needs (``rbac_rules``; the deployer renders them, the tests bind them).

Two halves, kept apart:

- Decisions are pure functions over plain data (``plan``: namespaces, the source, the Secrets of
  that name and the ServiceAccounts -> actions, conflicts, counts). They never see the API.
- ``PullSecretSync`` is the I/O around them: watches (through ``webhook.kube``) keep an in-memory
  view on every replica; the replica that holds the lease (``webhook.leader``) applies the plan;
  any replica may create a missing copy at admission (a create is safe to race: the API server
  lets exactly one win).

A Secret of that name that mirrorgate does not manage is never changed or deleted: its namespace
is reported (admission warning, metric, log) and skipped. Secret data is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from webhook.config import DEFAULT_OWN_NAMESPACE, Config, Namespaces
from webhook.kube import (
    Kube,
    KubeError,
    Watch,
    WatchEvent,
    secret_path,
    service_account_path,
)
from webhook.leader import LEASE_NAME
from webhook.logs import get_logger
from webhook.mutation import WARNING_PREFIX

if TYPE_CHECKING:
    from webhook.metrics import Metrics

log = get_logger("pullsecrets")

OPT_IN_LABEL = "mirrorgate.io/enabled"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "mirrorgate"
SOURCE_ANNOTATION = "mirrorgate.io/pull-secret-source"  # "<namespace>/<name>" of the source
SOURCE_VERSION_ANNOTATION = "mirrorgate.io/pull-secret-source-resource-version"
SOURCE_HASH_ANNOTATION = "mirrorgate.io/pull-secret-source-hash"  # sha256 of type and data
# On a ServiceAccount: the pull secret mirrorgate added to its imagePullSecrets (and may remove).
SERVICE_ACCOUNT_ANNOTATION = "mirrorgate.io/added-pull-secret"
DOCKER_CONFIG_TYPE = "kubernetes.io/dockerconfigjson"
DOCKER_CONFIG_KEY = ".dockerconfigjson"


# --- plain data ----------------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


@dataclass(frozen=True, slots=True)
class NamespaceState:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    terminating: bool = False

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> NamespaceState:
        meta = _meta(obj)
        status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
        return cls(
            name=str(meta.get("name", "")),
            labels=_strings(meta.get("labels")),
            terminating=bool(meta.get("deletionTimestamp")) or status.get("phase") == "Terminating",
        )


@dataclass(frozen=True, slots=True)
class SecretState:
    namespace: str
    name: str
    type: str = DOCKER_CONFIG_TYPE
    data: Mapping[str, str] = field(default_factory=dict)  # base64, as the API server sends it
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""
    immutable: bool = False

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> SecretState:
        meta = _meta(obj)
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            type=str(obj.get("type") or "Opaque"),
            data=_strings(obj.get("data")),
            labels=_strings(meta.get("labels")),
            annotations=_strings(meta.get("annotations")),
            resource_version=str(meta.get("resourceVersion", "")),
            immutable=bool(obj.get("immutable")),
        )

    def __repr__(self) -> str:
        # Never print secret data, whatever ends up in a log or an assertion message.
        return (
            f"SecretState({self.namespace}/{self.name}, type={self.type}, "
            f"keys={sorted(self.data)}, rv={self.resource_version})"
        )


@dataclass(frozen=True, slots=True)
class ServiceAccountState:
    namespace: str
    name: str
    image_pull_secrets: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ServiceAccountState:
        meta = _meta(obj)
        refs = obj.get("imagePullSecrets") or []
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            image_pull_secrets=tuple(
                str(r.get("name", "")) for r in refs if isinstance(r, Mapping)
            ),
            annotations=_strings(meta.get("annotations")),
            resource_version=str(meta.get("resourceVersion", "")),
        )


@dataclass(frozen=True, slots=True)
class Target:
    """What to keep where: from ``pullSecret`` and ``namespaces`` of the config."""

    name: str
    source_namespace: str
    source_name: str
    namespaces: Namespaces = field(default_factory=Namespaces)
    own_namespace: str = DEFAULT_OWN_NAMESPACE
    patch_service_accounts: bool = False

    @classmethod
    def from_config(cls, config: Config, *, own_namespace: str) -> Target | None:
        """None when the config names no ``pullSecret.source``: nothing to propagate."""
        ps = config.pull_secret
        if ps is None or not ps.source_namespace or not ps.source_name:
            return None
        return cls(
            name=ps.name,
            source_namespace=ps.source_namespace,
            source_name=ps.source_name,
            namespaces=config.namespaces,
            own_namespace=own_namespace,
            patch_service_accounts=ps.patch_service_accounts,
        )

    @property
    def source(self) -> str:
        return f"{self.source_namespace}/{self.source_name}"

    def is_source(self, namespace: str) -> bool:
        """The source itself is the Secret wanted in ``namespace``: nothing to copy there."""
        return namespace == self.source_namespace and self.name == self.source_name

    def in_scope(self, namespace: NamespaceState) -> bool:
        if namespace.terminating:
            return False
        if self.namespaces.excluded(namespace.name, own_namespace=self.own_namespace):
            return False
        if self.namespaces.mode == "clusterWide":
            return True
        return namespace.labels.get(OPT_IN_LABEL) == "true"


# --- decisions (pure) ----------------------------------------------------------------------------


def content_hash(secret: SecretState) -> str:
    """sha256 over type and data: equal exactly when a copy holds what the source holds."""
    canonical = json.dumps(
        {"type": secret.type, "data": dict(sorted(secret.data.items()))},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def is_managed(secret: SecretState) -> bool:
    return secret.labels.get(MANAGED_BY_LABEL) == MANAGED_BY


def is_current(copy: SecretState, source: SecretState, target: Target) -> bool:
    """A managed copy with the source's content and mirrorgate's labels and annotations intact."""
    wanted = content_hash(source)
    return (
        is_managed(copy)
        and copy.annotations.get(SOURCE_ANNOTATION) == target.source
        and copy.annotations.get(SOURCE_HASH_ANNOTATION) == wanted
        and content_hash(copy) == wanted
    )


def source_problem(source: SecretState | None, target: Target) -> str | None:
    """Why ``source`` cannot be copied, or None when it can."""
    if source is None:
        return f"source Secret {target.source} does not exist"
    if source.type != DOCKER_CONFIG_TYPE:
        return f"source Secret {target.source} has type {source.type}, not {DOCKER_CONFIG_TYPE}"
    if DOCKER_CONFIG_KEY not in source.data:
        return f"source Secret {target.source} has no {DOCKER_CONFIG_KEY} key"
    return None


def copy_manifest(
    source: SecretState, target: Target, namespace: str, *, resource_version: str | None = None
) -> dict[str, Any]:
    """The copy of ``source`` for ``namespace``; ``resource_version`` makes it a replacement."""
    metadata: dict[str, Any] = {
        "name": target.name,
        "namespace": namespace,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY},
        "annotations": {
            SOURCE_ANNOTATION: target.source,
            SOURCE_VERSION_ANNOTATION: source.resource_version,
            SOURCE_HASH_ANNOTATION: content_hash(source),
        },
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": source.type,
        "data": dict(source.data),
    }


def service_account_patch(
    account: ServiceAccountState, secret: str, *, add: bool
) -> dict[str, Any]:
    """A JSON merge patch that adds ``secret`` to (or removes it from) ``imagePullSecrets``.

    ``imagePullSecrets`` has no merge key, so the patch carries the whole list, and the
    resourceVersion makes the API server refuse it if the list changed since it was read.
    """
    names = [n for n in account.image_pull_secrets if n != secret]
    if add:
        names = [*account.image_pull_secrets, secret]
    return {
        "metadata": {
            "resourceVersion": account.resource_version,
            "annotations": {SERVICE_ACCOUNT_ANNOTATION: secret if add else None},
        },
        "imagePullSecrets": [{"name": n} for n in names] or None,
    }


@dataclass(frozen=True, slots=True)
class CreateCopy:
    namespace: str
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class UpdateCopy:
    namespace: str
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RecreateCopy:
    """Type and immutability can't be changed by an update: delete, then create."""

    namespace: str
    resource_version: str = field(default="", compare=False)
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DeleteCopy:
    namespace: str
    resource_version: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class PatchServiceAccount:
    namespace: str
    name: str
    add: bool
    patch: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


Action = CreateCopy | UpdateCopy | RecreateCopy | DeleteCopy | PatchServiceAccount


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...] = ()
    conflicts: tuple[str, ...] = ()  # namespaces in scope holding an unmanaged Secret of the name
    current: int = 0  # managed copies already equal to the source
    problem: str | None = None  # why nothing can be copied right now


def plan(
    target: Target,
    *,
    namespaces: Iterable[NamespaceState],
    source: SecretState | None,
    secrets: Iterable[SecretState],
    service_accounts: Iterable[ServiceAccountState] = (),
) -> Plan:
    """What to change so that every namespace in scope holds a current copy, and nothing else does.

    - in scope, no Secret of the name: create the copy; a stale or hand-edited copy: update it
      (recreate when its type or immutability differs);
    - in scope, a Secret of the name that mirrorgate does not manage: a conflict, left alone;
    - out of scope (opted out, excluded, mirrorgate's own): delete a managed copy;
    - a namespace that is unknown here (not listed yet, or already deleted) or terminating is left
      alone: deletion takes its Secrets with it, and a copy created at admission for a namespace
      the watch has not delivered yet must survive;
    - without a usable source nothing is created or updated, but opted-out copies still go.
    """
    problem = source_problem(source, target)
    by_namespace = {s.namespace: s for s in secrets if s.name == target.name}
    known = {ns.name: ns for ns in namespaces}
    actions: list[Action] = []
    conflicts: list[str] = []
    current = 0
    with_copy: set[str] = set()
    for name in sorted(known):
        ns = known[name]
        existing = by_namespace.get(name)
        if ns.terminating or target.is_source(name):
            continue
        if not target.in_scope(ns):
            if existing is not None and is_managed(existing):
                actions.append(DeleteCopy(name, existing.resource_version))
            continue
        if existing is not None and not is_managed(existing):
            conflicts.append(name)
            continue
        if existing is not None:
            with_copy.add(name)
        if problem is not None or source is None:
            continue
        if existing is None:
            actions.append(CreateCopy(name, copy_manifest(source, target, name)))
            with_copy.add(name)
        elif is_current(existing, source, target):
            current += 1
        elif existing.type != source.type or existing.immutable:
            body = copy_manifest(source, target, name)
            actions.append(RecreateCopy(name, existing.resource_version, body))
        else:
            body = copy_manifest(source, target, name, resource_version=existing.resource_version)
            actions.append(UpdateCopy(name, body))
    if target.patch_service_accounts:
        actions.extend(_service_account_actions(target, known, service_accounts, with_copy))
    return Plan(tuple(actions), tuple(conflicts), current, problem)


def _service_account_actions(
    target: Target,
    namespaces: Mapping[str, NamespaceState],
    accounts: Iterable[ServiceAccountState],
    with_copy: set[str],
) -> list[Action]:
    """List the secret on every ServiceAccount where a managed copy is (or is being) kept; take it
    off again where mirrorgate added it and the namespace left the scope."""
    out: list[Action] = []
    for account in sorted(accounts, key=lambda a: (a.namespace, a.name)):
        ns = namespaces.get(account.namespace)
        if ns is None or ns.terminating:
            continue
        listed = target.name in account.image_pull_secrets
        added_by_us = account.annotations.get(SERVICE_ACCOUNT_ANNOTATION) == target.name
        if account.namespace in with_copy:
            if not listed:
                patch = service_account_patch(account, target.name, add=True)
                out.append(PatchServiceAccount(account.namespace, account.name, True, patch))
        elif not target.in_scope(ns) and added_by_us:
            patch = service_account_patch(account, target.name, add=False)
            out.append(PatchServiceAccount(account.namespace, account.name, False, patch))
    return out


def injected_pull_secret(before: Any, after: Any, name: str) -> bool:
    """Whether a mutation added ``name`` to the pod's ``imagePullSecrets``."""
    return name in _pull_secret_names(after) and name not in _pull_secret_names(before)


def _pull_secret_names(pod: Any) -> set[str]:
    spec = pod.get("spec") if isinstance(pod, Mapping) else None
    refs = spec.get("imagePullSecrets") if isinstance(spec, Mapping) else None
    if not isinstance(refs, list):
        return set()
    return {str(r.get("name")) for r in refs if isinstance(r, Mapping)}


CopyStatus = Literal["present", "created", "conflict", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What ``ensure_copy`` found or did; ``detail`` says why it failed."""

    status: CopyStatus
    detail: str | None = None


def admission_warning(result: CopyResult, *, namespace: str, name: str) -> str | None:
    """What the pod's creator should read about the pull secret, if anything."""
    if result.status == "conflict":
        return (
            f'{WARNING_PREFIX}namespace "{namespace}" has a Secret "{name}" that mirrorgate does '
            "not manage: it was left unchanged and this pod pulls with it; delete it (or label it "
            f"{MANAGED_BY_LABEL}={MANAGED_BY}) to let mirrorgate keep it current"
        )
    if result.status == "failed":
        return (
            f'{WARNING_PREFIX}pull secret "{name}" could not be created in namespace '
            f'"{namespace}" ({result.detail}); mirrorgate keeps trying, and images cannot be '
            "pulled from the mirror until it exists"
        )
    return None


# --- RBAC ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RBACRules:
    """The PolicyRules mirrorgate needs: ``cluster`` for a ClusterRole (+ ClusterRoleBinding),
    ``namespaced`` as (namespace, rules) pairs for a Role (+ RoleBinding) in each namespace."""

    cluster: tuple[dict[str, Any], ...]
    namespaced: tuple[tuple[str, tuple[dict[str, Any], ...]], ...]


def _rule(
    group: str, resource: str, verbs: Iterable[str], names: Iterable[str] = ()
) -> dict[str, Any]:
    rule: dict[str, Any] = {"apiGroups": [group], "resources": [resource]}
    if names:
        rule["resourceNames"] = list(names)
    rule["verbs"] = list(verbs)
    return rule


def base_rbac_rules(own_namespace: str, *, lease_name: str = LEASE_NAME) -> RBACRules:
    """What ``serve`` needs without pull-secret copies: namespace labels (scan modes), kubelet
    Events (pull failures) and its leader election."""
    return RBACRules(
        cluster=(
            _rule("", "namespaces", ("list", "watch")),
            _rule("", "events", ("list", "watch")),
        ),
        namespaced=((own_namespace, _lease_rules(lease_name)),),
    )


def _lease_rules(lease_name: str) -> tuple[dict[str, Any], ...]:
    return (
        _rule("coordination.k8s.io", "leases", ("create",)),
        _rule("coordination.k8s.io", "leases", ("get", "update"), (lease_name,)),
    )


def rbac_rules(target: Target, *, lease_name: str = LEASE_NAME) -> RBACRules:
    """Exactly what ``PullSecretSync`` and leader election call, and nothing more.

    ``create`` cannot be limited by name (the name is in the body, not the URL), every other verb
    on Secrets is limited to the copy's name; list/watch with ``fieldSelector=metadata.name=...``
    are authorized against resourceNames. The source is only read, in its own namespace.
    """
    cluster = [
        _rule("", "namespaces", ("list", "watch")),
        # The lease holder counts kubelet pull failures from Events (webhook.pullfailures).
        _rule("", "events", ("list", "watch")),
        _rule("", "secrets", ("create",)),
        _rule("", "secrets", ("get", "list", "watch", "update", "delete"), (target.name,)),
    ]
    if target.patch_service_accounts:
        cluster.append(_rule("", "serviceaccounts", ("list", "watch", "patch")))
    source = _rule("", "secrets", ("get", "list", "watch"), (target.source_name,))
    leases = list(_lease_rules(lease_name))
    namespaced: dict[str, list[dict[str, Any]]] = {target.source_namespace: [source]}
    namespaced.setdefault(target.own_namespace, []).extend(leases)
    return RBACRules(
        cluster=tuple(cluster),
        namespaced=tuple((ns, tuple(rules)) for ns, rules in namespaced.items()),
    )


# --- I/O -----------------------------------------------------------------------------------------

RESYNC_INTERVAL = 300.0
MAX_PARALLEL_WRITES = 8
RETRY_INITIAL = 0.5
RETRY_MAX = 30.0


K = TypeVar("K")
V = TypeVar("V")


def _follow(
    store: dict[K, V],
    event: WatchEvent,
    parse: Callable[[Mapping[str, Any]], V],
    key: Callable[[V], K],
) -> None:
    """Keep ``store`` equal to what a watch reports: a RELIST replaces it, DELETED removes the
    object, anything else sets it."""
    if event.type == "RELIST":
        store.clear()
    for obj in event.objects if event.type == "RELIST" else (event.obj,):
        item = parse(obj)
        if event.type == "DELETED":
            store.pop(key(item), None)
        else:
            store[key(item)] = item


class PullSecretSync:
    """Watches on every replica, writes by the leader, ``ensure_copy`` for ``/mutate``."""

    def __init__(
        self,
        kube: Kube,
        target: Target,
        *,
        metrics: Metrics,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        self.kube = kube
        self.target = target
        self.metrics = metrics
        self.resync_interval = resync_interval
        self.leading = False
        self._namespaces: dict[str, NamespaceState] = {}
        self._source: SecretState | None = None
        self._secrets: dict[str, SecretState] = {}  # namespace -> the Secret named target.name
        self._accounts: dict[tuple[str, str], ServiceAccountState] = {}
        self._watches: dict[str, Watch] = {}
        self._synced: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = asyncio.Event()
        self._writes = asyncio.Semaphore(MAX_PARALLEL_WRITES)
        self._pending: dict[str, asyncio.Task[CopyResult]] = {}
        self._failures = 0
        self._retry: asyncio.TimerHandle | None = None
        self._conflicts: tuple[str, ...] = ()
        self._problem: str | None = None

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        t = self.target
        watches = {
            "namespaces": ("/api/v1/namespaces", {}),
            "source": (
                secret_path(t.source_namespace),
                {"fieldSelector": f"metadata.name={t.source_name}"},
            ),
            "copies": ("/api/v1/secrets", {"fieldSelector": f"metadata.name={t.name}"}),
        }
        if t.patch_service_accounts:
            watches["serviceaccounts"] = ("/api/v1/serviceaccounts", {})
        for kind, (path, query) in watches.items():
            watch = self.kube.watch(
                path,
                query=query,
                on_restart=lambda reason, kind=kind: self.metrics.pullsecret_watch_restarts.labels(
                    kind, reason
                ).inc(),
            ).start()
            self._watches[kind] = watch
            self._tasks.append(
                asyncio.create_task(self._consume(kind, watch), name=f"{kind} watch")
            )
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="pull secret sync"))
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="pull secret resync"))

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(w.close() for w in self._watches.values()))

    def set_leading(self, leading: bool) -> None:
        """Called by leader election: only the lease holder applies the plan."""
        self.leading = leading
        self.metrics.pullsecret_leader.set(1 if leading else 0)
        if leading:
            self._dirty.set()

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        """The labels of ``namespace`` as this replica's watch sees them; None while unknown.

        The gate's scan-mode lookup uses this view when pull secrets are synced, so serve holds
        one watch on Namespaces, not two."""
        state = self._namespaces.get(namespace)
        return state.labels if state is not None else None

    @property
    def synced(self) -> bool:
        """Every watch has delivered its first complete list."""
        return self._synced >= set(self._watches)

    # the view --------------------------------------------------------------------------------
    async def _consume(self, kind: str, watch: Watch) -> None:
        async for event in watch:
            try:
                self._apply(kind, event)
            except Exception:
                # One odd object must not stop the view from following the cluster.
                log.exception("watch event not understood", extra={"fields": {"watch": kind}})
            self._dirty.set()

    def _apply(self, kind: str, event: WatchEvent) -> None:
        if kind == "namespaces":
            _follow(self._namespaces, event, NamespaceState.from_object, lambda ns: ns.name)
        elif kind == "source":
            objects = event.objects if event.type == "RELIST" else (event.obj,)
            if event.type == "RELIST":
                self._source = None
            for obj in objects:
                secret = SecretState.from_object(obj)
                self._source = None if event.type == "DELETED" else secret
        elif kind == "copies":
            _follow(self._secrets, event, SecretState.from_object, lambda s: s.namespace)
        elif kind == "serviceaccounts":
            _follow(
                self._accounts,
                event,
                ServiceAccountState.from_object,
                lambda account: (account.namespace, account.name),
            )
        if event.type == "RELIST":
            self._synced.add(kind)

    def plan(self) -> Plan:
        return plan(
            self.target,
            namespaces=self._namespaces.values(),
            source=self._source,
            secrets=self._secrets.values(),
            service_accounts=self._accounts.values(),
        )

    # reconciling -----------------------------------------------------------------------------
    async def _resync_loop(self) -> None:
        # A safety net, not the mechanism: it re-reads nothing, it re-runs the plan on the view.
        while True:
            await asyncio.sleep(self.resync_interval)
            self._dirty.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._reconcile()
            except Exception:
                self.metrics.pullsecret_sync_errors.labels("reconcile").inc()
                log.exception("pull secret reconcile failed")
                self._retry_later()

    async def _reconcile(self) -> None:
        if not self.synced:
            return
        p = self.plan()
        self._publish(p)
        if not self.leading or not p.actions:
            return
        results = await asyncio.gather(*(self._execute(a) for a in p.actions))
        if all(results):
            self._failures = 0
        else:
            self._retry_later()

    def _retry_later(self) -> None:
        self._failures += 1
        delay = min(RETRY_MAX, RETRY_INITIAL * 2 ** (self._failures - 1))
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(
            delay * random.uniform(1.0, 1.2), self._dirty.set
        )

    def _publish(self, p: Plan) -> None:
        m = self.metrics
        m.pullsecret_copies.set(p.current)
        m.pullsecret_conflicts.set(len(p.conflicts))
        m.pullsecret_source_ready.labels(self.target.source).set(0 if p.problem else 1)
        for ns in sorted(set(p.conflicts) - set(self._conflicts)):
            log.warning(
                "namespace skipped: it has a Secret of the pull secret's name that mirrorgate "
                "does not manage",
                extra={"fields": {"namespace": ns, "secret": self.target.name}},
            )
        for ns in sorted(set(self._conflicts) - set(p.conflicts)):
            log.info(
                "namespace no longer in conflict",
                extra={"fields": {"namespace": ns, "secret": self.target.name}},
            )
        self._conflicts = p.conflicts
        if p.problem != self._problem:
            if p.problem:
                log.error("pull secret cannot be copied", extra={"fields": {"problem": p.problem}})
            else:
                log.info(
                    "pull secret source is usable", extra={"fields": {"source": self.target.source}}
                )
            self._problem = p.problem

    async def _execute(self, action: Action) -> bool:
        """Apply one action; False when it failed in a way worth retrying."""
        name = self.target.name
        ns = action.namespace
        operation = {
            CreateCopy: "create",
            UpdateCopy: "update",
            RecreateCopy: "recreate",
            DeleteCopy: "delete",
            PatchServiceAccount: "patch_service_account",
        }[type(action)]
        async with self._writes:
            try:
                if isinstance(action, CreateCopy):
                    self._remember(await self.kube.create(secret_path(ns), action.body))
                elif isinstance(action, UpdateCopy):
                    try:
                        self._remember(await self.kube.replace(secret_path(ns, name), action.body))
                    except KubeError as err:
                        if err.status != 422:
                            raise
                        # Made immutable (or otherwise unchangeable) since we looked: recreate.
                        operation = "recreate"
                        body = {**action.body, "metadata": {**action.body["metadata"]}}
                        version = body["metadata"].pop("resourceVersion", None)
                        await self._recreate(ns, version, body)
                elif isinstance(action, RecreateCopy):
                    await self._recreate(ns, action.resource_version, action.body)
                elif isinstance(action, DeleteCopy):
                    await self.kube.delete(
                        secret_path(ns, name), resource_version=action.resource_version
                    )
                    self._secrets.pop(ns, None)
                else:
                    updated = await self.kube.merge_patch(
                        service_account_path(ns, action.name), action.patch
                    )
                    account = ServiceAccountState.from_object(updated)
                    self._accounts[(account.namespace, account.name)] = account
            except KubeError as err:
                if err.status in (404, 409):
                    # The object changed or vanished since the view was taken: the watch brings
                    # the news and the next pass decides again.
                    log.debug(
                        "pull secret write raced a change",
                        extra={"fields": {"namespace": ns, "operation": operation}},
                    )
                    return True
                self.metrics.pullsecret_sync_errors.labels(operation).inc()
                log.warning(
                    "pull secret write failed",
                    extra={
                        "fields": {
                            "namespace": ns,
                            "operation": operation,
                            "status": err.status,
                            "reason": err.reason,
                            "error": err.message[:300],
                        }
                    },
                )
                return False
        self.metrics.pullsecret_writes.labels(operation).inc()
        fields: dict[str, Any] = {"namespace": ns, "secret": name, "operation": operation}
        if isinstance(action, PatchServiceAccount):
            fields["service_account"] = action.name
        elif not isinstance(action, DeleteCopy) and self._source is not None:
            fields["source_resource_version"] = self._source.resource_version
        log.info("pull secret synced", extra={"fields": fields})
        return True

    async def _recreate(self, namespace: str, version: str | None, body: dict[str, Any]) -> None:
        try:
            await self.kube.delete(
                secret_path(namespace, self.target.name), resource_version=version or None
            )
        except KubeError as err:
            if err.status != 404:
                raise
        self._secrets.pop(namespace, None)
        self._remember(await self.kube.create(secret_path(namespace), body))

    def _remember(self, obj: Mapping[str, Any]) -> SecretState:
        # Written objects enter the view at once, so the next pass doesn't repeat the write
        # before the watch event arrives.
        secret = SecretState.from_object(obj)
        self._secrets[secret.namespace] = secret
        return secret

    # admission -------------------------------------------------------------------------------
    async def ensure_copy(self, namespace: str, *, dry_run: bool = False) -> CopyResult:
        """Make sure ``namespace`` holds the pull secret before a pod that references it is
        admitted. A dry run only looks. Concurrent calls for one namespace share one create.
        Never raises: a failure is a result, and the reconciler keeps trying."""
        existing = self._secrets.get(namespace)
        if existing is not None:
            return CopyResult("present" if is_managed(existing) else "conflict")
        if self.target.is_source(namespace):
            return CopyResult("present")
        if dry_run:
            return CopyResult("skipped")
        task = self._pending.get(namespace)
        if task is None:
            task = asyncio.create_task(self._create_at_admission(namespace))
            self._pending[namespace] = task
            task.add_done_callback(lambda _: self._pending.pop(namespace, None))
        # Shielded: an admission that runs out of time must not cancel the create for others.
        return await asyncio.shield(task)

    async def _create_at_admission(self, namespace: str) -> CopyResult:
        t = self.target
        try:
            source = self._source
            if "source" not in self._synced:
                found = await self.kube.get(secret_path(t.source_namespace, t.source_name))
                source = SecretState.from_object(found) if found is not None else None
            problem = source_problem(source, t)
            if problem is not None or source is None:
                self.metrics.pullsecret_sync_errors.labels("admission").inc()
                return CopyResult("failed", problem)
            try:
                created = await self.kube.create(
                    secret_path(namespace), copy_manifest(source, t, namespace)
                )
            except KubeError as err:
                if err.status != 409:
                    raise
                # Created meanwhile, by the reconciler, another replica, or someone else.
                found = await self.kube.get(secret_path(namespace, t.name))
                if found is None:
                    return CopyResult("failed", "it was deleted while being created")
                secret = self._remember(found)
                return CopyResult("present" if is_managed(secret) else "conflict")
        except KubeError as err:
            self.metrics.pullsecret_sync_errors.labels("admission").inc()
            log.warning(
                "pull secret could not be created at admission",
                extra={
                    "fields": {
                        "namespace": namespace,
                        "status": err.status,
                        "reason": err.reason,
                        "error": err.message[:300],
                    }
                },
            )
            return CopyResult("failed", f"{err.status} {err.reason}".strip())
        self._remember(created)
        self.metrics.pullsecret_writes.labels("admission_create").inc()
        log.info(
            "pull secret created at admission",
            extra={
                "fields": {
                    "namespace": namespace,
                    "secret": t.name,
                    "source_resource_version": source.resource_version,
                }
            },
        )
        return CopyResult("created")
