"""The pull-secret plan: which namespaces get a copy of the pull secret, and what to do about it.

Pure: namespaces, the source Secret, the Secrets of that name and the ServiceAccounts go in;
actions (create, update, recreate, delete copies; patch ServiceAccounts), conflicts and counts come
out. ``mirrorgate.webhook.controllers.pullsecrets`` is the I/O around it. A Secret of that name
that mirrorgate does not manage is never changed or deleted: its namespace is reported and
skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mirrorgate.webhook.core.config import DEFAULT_OWN_NAMESPACE, Config, Namespaces
from mirrorgate.webhook.core.mutation import WARNING_PREFIX

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


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(obj.get("metadata"))


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
        status = _mapping(obj.get("status"))
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
