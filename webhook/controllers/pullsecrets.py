"""The pull secret in every namespace that needs it: propagation, rotation, creation at admission.

``PullSecretSync`` keeps a copy of ``pullSecret.source`` (a ``kubernetes.io/dockerconfigjson``
Secret) named ``pullSecret.name`` in every namespace in scope, current with the source, labelled
``app.kubernetes.io/managed-by: mirrorgate``; optionally lists it on the ServiceAccounts there; and
creates it during ``/mutate`` when a pod needs it before the reconciler got there.

It is the I/O around ``mirrorgate.webhook.core.pullsecrets.plan``: watches keep an in-memory view
on every replica; the replica that holds the lease (``controllers.leader``) applies the plan; any
replica may create a missing copy at admission (a create is safe to race: the API server lets
exactly one win). Secret data is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from mirrorgate.webhook.adapters.kube import (
    Kube,
    KubeError,
    Watch,
    WatchEvent,
    secret_path,
    service_account_path,
)
from mirrorgate.webhook.core.pullsecrets import (
    Action,
    CopyResult,
    CreateCopy,
    DeleteCopy,
    NamespaceState,
    PatchServiceAccount,
    Plan,
    RecreateCopy,
    SecretState,
    ServiceAccountState,
    Target,
    UpdateCopy,
    copy_manifest,
    is_managed,
    plan,
    source_problem,
)
from mirrorgate.webhook.infra.backoff import Backoff
from mirrorgate.webhook.infra.logs import get_logger

if TYPE_CHECKING:
    from mirrorgate.webhook.infra.metrics import Metrics

log = get_logger("pullsecrets")

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
        self._backoff = Backoff(RETRY_INITIAL, RETRY_MAX)
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
            restarts = self.metrics.pullsecret_watch_restarts
            watch = self.kube.watch(
                path,
                query=query,
                on_restart=functools.partial(_count_restart, restarts, kind),
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
            self._backoff.reset()
        else:
            self._retry_later()

    def _retry_later(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(self._backoff.next(), self._dirty.set)

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


def _count_restart(counter: Any, kind: str, reason: str) -> None:
    counter.labels(kind, reason).inc()
