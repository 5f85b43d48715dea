"""The Kubernetes permissions ``serve`` needs, and nothing more: the deployer renders them, the
end-to-end tests bind them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mirrorgate.webhook.core.pullsecrets import Target

# The Lease the replicas elect a leader on (mirrorgate.webhook.controllers.leader); RBAC names it.
LEASE_NAME = "mirrorgate-leader"


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


def base_rbac_rules(
    own_namespace: str,
    *,
    lease_name: str = LEASE_NAME,
    events: bool = True,
    running: bool = False,
) -> RBACRules:
    """What ``serve`` needs without pull-secret copies: namespace labels (scan modes), kubelet
    Events (pull failures), its own Events (and the pods they are about) when ``events`` is on,
    every pod's images when ``running`` (the gate: ``scan.running``, running verdicts), and leader
    election."""
    return RBACRules(
        cluster=(_rule("", "namespaces", ("list", "watch")), *_event_rules(events, running)),
        namespaced=((own_namespace, _lease_rules(lease_name)),),
    )


def _event_rules(events: bool, running: bool) -> tuple[dict[str, Any], ...]:
    # The lease holder reads kubelet pull failures (controllers.pullfailures); with ``events``
    # every replica also posts the Events of its admissions (controllers.events).
    verbs = ("list", "watch", "create") if events else ("list", "watch")
    rules = [_rule("", "events", verbs)]
    # Events on a new pod carry its uid (kubectl describe selects by it): read once; the digests
    # pods run (controllers.running): one watch.
    pods = (("get",) if events else ()) + (("list", "watch") if running else ())
    if pods:
        rules.append(_rule("", "pods", pods))
    return tuple(rules)


def _lease_rules(lease_name: str) -> tuple[dict[str, Any], ...]:
    return (
        _rule("coordination.k8s.io", "leases", ("create",)),
        _rule("coordination.k8s.io", "leases", ("get", "update"), (lease_name,)),
    )


def rbac_rules(
    target: Target,
    *,
    lease_name: str = LEASE_NAME,
    events: bool = True,
    running: bool = False,
) -> RBACRules:
    """Exactly what ``PullSecretSync`` and leader election call, and nothing more.

    ``create`` cannot be limited by name (the name is in the body, not the URL), every other verb
    on Secrets is limited to the copy's name; list/watch with ``fieldSelector=metadata.name=...``
    are authorized against resourceNames. The source is only read, in its own namespace.
    """
    cluster = [
        _rule("", "namespaces", ("list", "watch")),
        *_event_rules(events, running),
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
