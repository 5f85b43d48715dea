"""The pure half of pull-secret propagation: what to change, given what the watches see."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt

import pytest

from mirrorgate.webhook.controllers.leader import (
    ElectionSettings,
    LeaseRecord,
    claim,
    held_by_other,
    micro_time,
)
from mirrorgate.webhook.controllers.pullsecrets import (
    CopyResult,
    CreateCopy,
    DeleteCopy,
    NamespaceState,
    PatchServiceAccount,
    RecreateCopy,
    SecretState,
    ServiceAccountState,
    Target,
    UpdateCopy,
    copy_manifest,
    plan,
)
from mirrorgate.webhook.core.config import Namespaces, config_from_dict
from mirrorgate.webhook.core.pullsecrets import (
    MANAGED_BY_LABEL,
    SERVICE_ACCOUNT_ANNOTATION,
    SOURCE_ANNOTATION,
    SOURCE_HASH_ANNOTATION,
    SOURCE_VERSION_ANNOTATION,
    admission_warning,
    content_hash,
    injected_pull_secret,
    service_account_patch,
)
from mirrorgate.webhook.core.rbac import rbac_rules

NAME = "mirrorgate-pull"
TARGET = Target(name=NAME, source_namespace="mirrorgate", source_name="registry-pull")
WIDE = dataclasses.replace(
    TARGET, namespaces=Namespaces(mode="clusterWide", exclude=("kube-system", "legacy"))
)
WITH_ACCOUNTS = dataclasses.replace(TARGET, patch_service_accounts=True)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


SOURCE = SecretState(
    namespace="mirrorgate",
    name="registry-pull",
    data={".dockerconfigjson": b64('{"auths":{"m":{"auth":"djE="}}}')},
    resource_version="42",
)
ROTATED = dataclasses.replace(
    SOURCE,
    data={".dockerconfigjson": b64('{"auths":{"m":{"auth":"djI="}}}')},
    resource_version="43",
)


def ns(name: str, *, opted_in: bool = False, terminating: bool = False) -> NamespaceState:
    labels = {"mirrorgate.io/enabled": "true"} if opted_in else {}
    return NamespaceState(name, labels, terminating)


def copy_of(source: SecretState, namespace: str, **changes: object) -> SecretState:
    """The copy mirrorgate writes, as the watch would deliver it."""
    body = copy_manifest(source, TARGET, namespace)
    secret = SecretState(
        namespace=namespace,
        name=NAME,
        type=body["type"],
        data=body["data"],
        labels=body["metadata"]["labels"],
        annotations=body["metadata"]["annotations"],
        resource_version="7",
    )
    return dataclasses.replace(secret, **changes)


def unmanaged(namespace: str) -> SecretState:
    return SecretState(namespace, NAME, data={".dockerconfigjson": b64("{}")}, resource_version="9")


def account(namespace: str, name: str = "default", *pulls: str, added: bool = False):
    annotations = {SERVICE_ACCOUNT_ANNOTATION: NAME} if added else {}
    return ServiceAccountState(namespace, name, tuple(pulls), annotations, resource_version="5")


PLANS = {
    "an opted-in namespace without the secret gets a copy": (
        TARGET,
        [ns("shop", opted_in=True)],
        SOURCE,
        [],
        [CreateCopy("shop")],
    ),
    "an unlabelled namespace gets nothing in optIn mode": (TARGET, [ns("shop")], SOURCE, [], []),
    "clusterWide covers every namespace but the excluded ones and mirrorgate's own": (
        WIDE,
        [ns("shop"), ns("kube-system"), ns("legacy"), ns("mirrorgate"), ns("web")],
        SOURCE,
        [],
        [CreateCopy("shop"), CreateCopy("web")],
    ),
    "a current copy needs nothing": (
        TARGET,
        [ns("shop", opted_in=True)],
        SOURCE,
        [copy_of(SOURCE, "shop")],
        [],
    ),
    "a rotated source updates every copy": (
        TARGET,
        [ns("a", opted_in=True), ns("b", opted_in=True)],
        ROTATED,
        [copy_of(SOURCE, "a"), copy_of(SOURCE, "b")],
        [UpdateCopy("a"), UpdateCopy("b")],
    ),
    "a copy whose data was edited by hand is restored": (
        TARGET,
        [ns("shop", opted_in=True)],
        SOURCE,
        [copy_of(SOURCE, "shop", data={".dockerconfigjson": b64("{}")})],
        [UpdateCopy("shop")],
    ),
    "a copy whose annotations were removed is restored": (
        TARGET,
        [ns("shop", opted_in=True)],
        SOURCE,
        [copy_of(SOURCE, "shop", annotations={})],
        [UpdateCopy("shop")],
    ),
    "a copy whose type was changed is recreated": (
        TARGET,
        [ns("shop", opted_in=True)],
        SOURCE,
        [copy_of(SOURCE, "shop", type="Opaque")],
        [RecreateCopy("shop")],
    ),
    "an immutable stale copy is recreated": (
        TARGET,
        [ns("shop", opted_in=True)],
        ROTATED,
        [copy_of(SOURCE, "shop", immutable=True)],
        [RecreateCopy("shop")],
    ),
    "an unmanaged secret of the same name is left alone": (
        TARGET,
        [ns("shop", opted_in=True)],
        ROTATED,
        [unmanaged("shop")],
        [],
    ),
    "a namespace that opted out loses its managed copy": (
        TARGET,
        [ns("shop")],
        SOURCE,
        [copy_of(SOURCE, "shop")],
        [DeleteCopy("shop")],
    ),
    "an unmanaged secret in an opted-out namespace is never deleted": (
        TARGET,
        [ns("shop")],
        SOURCE,
        [unmanaged("shop")],
        [],
    ),
    "a managed copy in a namespace that became excluded is deleted": (
        WIDE,
        [ns("legacy")],
        SOURCE,
        [copy_of(SOURCE, "legacy")],
        [DeleteCopy("legacy")],
    ),
    "a copy in a namespace the watch has not delivered yet is kept": (
        TARGET,
        [],
        SOURCE,
        [copy_of(SOURCE, "brand-new")],
        [],
    ),
    "a terminating namespace is left alone": (
        TARGET,
        [ns("old", terminating=True), ns("gone", opted_in=True, terminating=True)],
        SOURCE,
        [copy_of(SOURCE, "old")],
        [],
    ),
    "without a source nothing is created or updated, but opted-out copies still go": (
        TARGET,
        [ns("a", opted_in=True), ns("b", opted_in=True), ns("c")],
        None,
        [copy_of(SOURCE, "b"), copy_of(SOURCE, "c")],
        [DeleteCopy("c")],
    ),
    "a source that is not a dockerconfigjson is not copied": (
        TARGET,
        [ns("a", opted_in=True)],
        dataclasses.replace(SOURCE, type="Opaque"),
        [],
        [],
    ),
    "the source's own namespace needs no copy when the names are the same": (
        dataclasses.replace(TARGET, source_namespace="shared", source_name=NAME),
        [ns("shared", opted_in=True)],
        dataclasses.replace(SOURCE, namespace="shared", name=NAME),
        [],
        [],
    ),
}


@pytest.mark.parametrize(
    ("target", "namespaces", "source", "secrets", "expected"), PLANS.values(), ids=PLANS.keys()
)
def test_plan(target, namespaces, source, secrets, expected):
    assert list(plan(target, namespaces=namespaces, source=source, secrets=secrets).actions) == (
        expected
    )


def test_a_conflict_is_reported_and_current_copies_are_counted():
    result = plan(
        TARGET,
        namespaces=[ns("a", opted_in=True), ns("b", opted_in=True), ns("c")],
        source=SOURCE,
        secrets=[unmanaged("a"), copy_of(SOURCE, "b"), unmanaged("c")],
    )
    assert result.conflicts == ("a",)  # c is out of scope: its Secret is none of our business
    assert result.current == 1
    assert result.problem is None and result.actions == ()


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        (None, "source Secret mirrorgate/registry-pull does not exist"),
        (
            dataclasses.replace(SOURCE, type="Opaque"),
            "source Secret mirrorgate/registry-pull has type Opaque, not "
            "kubernetes.io/dockerconfigjson",
        ),
        (
            dataclasses.replace(SOURCE, data={"config.json": "e30="}),
            "source Secret mirrorgate/registry-pull has no .dockerconfigjson key",
        ),
    ],
    ids=["missing", "wrong type", "no dockerconfigjson key"],
)
def test_an_unusable_source_is_named_as_the_problem(source, problem):
    result = plan(TARGET, namespaces=[ns("a", opted_in=True)], source=source, secrets=[])
    assert result.problem == problem


ACCOUNT_PLANS = {
    "every service account in a namespace getting a copy lists the secret": (
        [ns("shop", opted_in=True)],
        [],
        [account("shop"), account("shop", "builder", "other")],
        [
            PatchServiceAccount("shop", "builder", True),
            PatchServiceAccount("shop", "default", True),
        ],
    ),
    "an account that already lists it is left alone": (
        [ns("shop", opted_in=True)],
        [copy_of(SOURCE, "shop")],
        [account("shop", "default", NAME)],
        [],
    ),
    "an account in a conflicting namespace is left alone": (
        [ns("shop", opted_in=True)],
        [unmanaged("shop")],
        [account("shop")],
        [],
    ),
    "an opted-out namespace loses the entry where mirrorgate added it, not elsewhere": (
        [ns("shop")],
        [],
        [account("shop", "default", NAME, added=True), account("shop", "own", NAME)],
        [PatchServiceAccount("shop", "default", False)],
    ),
    "an account in an unlabelled namespace is never touched": (
        [ns("plain")],
        [],
        [account("plain")],
        [],
    ),
}


@pytest.mark.parametrize(
    ("namespaces", "secrets", "accounts", "expected"),
    ACCOUNT_PLANS.values(),
    ids=ACCOUNT_PLANS.keys(),
)
def test_service_account_plan(namespaces, secrets, accounts, expected):
    result = plan(
        WITH_ACCOUNTS,
        namespaces=namespaces,
        source=SOURCE,
        secrets=secrets,
        service_accounts=accounts,
    )
    assert [a for a in result.actions if isinstance(a, PatchServiceAccount)] == expected


def test_service_accounts_are_not_touched_unless_configured():
    result = plan(
        TARGET,
        namespaces=[ns("shop", opted_in=True)],
        source=SOURCE,
        secrets=[],
        service_accounts=[account("shop")],
    )
    assert result.actions == (CreateCopy("shop"),)


def test_a_service_account_patch_keeps_the_other_entries_and_guards_the_version():
    sa = account("shop", "default", "other")
    assert service_account_patch(sa, NAME, add=True) == {
        "metadata": {"resourceVersion": "5", "annotations": {SERVICE_ACCOUNT_ANNOTATION: NAME}},
        "imagePullSecrets": [{"name": "other"}, {"name": NAME}],
    }
    added = account("shop", "default", "other", NAME, added=True)
    assert service_account_patch(added, NAME, add=False) == {
        "metadata": {"resourceVersion": "5", "annotations": {SERVICE_ACCOUNT_ANNOTATION: None}},
        "imagePullSecrets": [{"name": "other"}],
    }
    only = account("shop", "default", NAME, added=True)
    assert service_account_patch(only, NAME, add=False)["imagePullSecrets"] is None


def test_the_copy_is_labelled_annotated_and_holds_the_source_data():
    body = copy_manifest(SOURCE, TARGET, "shop")
    assert body["metadata"] == {
        "name": NAME,
        "namespace": "shop",
        "labels": {MANAGED_BY_LABEL: "mirrorgate"},
        "annotations": {
            SOURCE_ANNOTATION: "mirrorgate/registry-pull",
            SOURCE_VERSION_ANNOTATION: "42",
            SOURCE_HASH_ANNOTATION: content_hash(SOURCE),
        },
    }
    assert body["type"] == "kubernetes.io/dockerconfigjson"
    assert body["data"] == dict(SOURCE.data)
    replacing = copy_manifest(SOURCE, TARGET, "shop", resource_version="7")
    assert replacing["metadata"]["resourceVersion"] == "7"


def test_the_content_hash_follows_data_and_type_but_not_key_order_or_metadata():
    reordered = dataclasses.replace(SOURCE, data={"b": "Yg==", "a": "YQ=="})
    same = dataclasses.replace(SOURCE, data={"a": "YQ==", "b": "Yg=="}, resource_version="99")
    assert content_hash(reordered) == content_hash(same)
    assert content_hash(SOURCE) != content_hash(ROTATED)
    assert content_hash(SOURCE) != content_hash(dataclasses.replace(SOURCE, type="Opaque"))


def test_secret_data_never_appears_in_a_repr():
    assert SOURCE.data[".dockerconfigjson"] not in repr(SOURCE)
    assert ".dockerconfigjson" in repr(SOURCE)


def pod(*pulls: str) -> dict:
    return {"spec": {"imagePullSecrets": [{"name": p} for p in pulls]}}


@pytest.mark.parametrize(
    ("before", "after", "injected"),
    [
        (pod(), pod(NAME), True),
        ({"spec": {}}, pod("other", NAME), True),
        (pod(NAME), pod(NAME), False),
        (pod(), pod(), False),
        ({"kind": "EphemeralContainers"}, {"kind": "EphemeralContainers"}, False),
    ],
    ids=[
        "added to a pod without pull secrets",
        "added next to another secret",
        "already referenced by the submitted pod",
        "nothing added",
        "an ephemeral containers object has no pull secrets",
    ],
)
def test_injected_pull_secret(before, after, injected):
    assert injected_pull_secret(before, after, NAME) is injected


def test_admission_warnings_say_what_happened_and_what_to_do():
    conflict = admission_warning(CopyResult("conflict"), namespace="shop", name=NAME)
    assert conflict is not None
    assert conflict.startswith('mirrorgate: namespace "shop" has a Secret "mirrorgate-pull"')
    assert "app.kubernetes.io/managed-by=mirrorgate" in conflict
    failed = admission_warning(CopyResult("failed", "403 Forbidden"), namespace="shop", name=NAME)
    assert failed is not None and "(403 Forbidden)" in failed
    for quiet in ("present", "created", "skipped"):
        assert admission_warning(CopyResult(quiet), namespace="shop", name=NAME) is None


def test_the_target_comes_from_the_config_only_with_a_source():
    plain = config_from_dict({"pullSecret": {"name": NAME}})
    assert Target.from_config(plain, own_namespace="mirrorgate") is None
    with_source = config_from_dict(
        {
            "pullSecret": {
                "name": NAME,
                "source": "mirrorgate/registry-pull",
                "patchServiceAccounts": True,
            },
            "namespaces": {"mode": "clusterWide", "exclude": ["legacy"]},
        }
    )
    target = Target.from_config(with_source, own_namespace="mg")
    assert target == Target(
        name=NAME,
        source_namespace="mirrorgate",
        source_name="registry-pull",
        namespaces=Namespaces(mode="clusterWide", exclude=("kube-system", "legacy")),
        own_namespace="mg",
        patch_service_accounts=True,
    )


def test_rbac_rules_name_every_secret_verb_but_create_and_keep_leases_and_source_local():
    rules = rbac_rules(WITH_ACCOUNTS, lease_name="mirrorgate-leader")
    assert rules.cluster == (
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch", "create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [NAME],
            "verbs": ["get", "list", "watch", "update", "delete"],
        },
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["list", "watch", "patch"]},
    )
    # Source and lease both live in mirrorgate's own namespace here: one Role holds both.
    assert rules.namespaced == (
        (
            "mirrorgate",
            (
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": ["registry-pull"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["create"],
                },
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "resourceNames": ["mirrorgate-leader"],
                    "verbs": ["get", "update"],
                },
            ),
        ),
    )


def test_rbac_rules_without_service_accounts_and_with_a_source_elsewhere():
    target = dataclasses.replace(TARGET, source_namespace="registry", own_namespace="mg")
    rules = rbac_rules(target, lease_name="l")
    assert all("serviceaccounts" not in r["resources"] for r in rules.cluster)
    assert [ns for ns, _ in rules.namespaced] == ["registry", "mg"]


# --- leader election decisions --------------------------------------------------------------------

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def test_a_new_lease_is_claimed_from_scratch():
    assert claim(None, identity="a", now=NOW, duration_seconds=15) == LeaseRecord(
        holder="a",
        duration_seconds=15,
        acquire_time="2026-01-02T03:04:05.678901Z",
        renew_time="2026-01-02T03:04:05.678901Z",
        transitions=0,
    )


def test_renewing_keeps_the_acquire_time_and_taking_over_counts_a_transition():
    held = LeaseRecord("a", 15, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:10.000000Z", 3)
    renewed = claim(held, identity="a", now=NOW, duration_seconds=15)
    assert renewed.acquire_time == held.acquire_time and renewed.transitions == 3
    assert renewed.renew_time == micro_time(NOW)
    taken = claim(held, identity="b", now=NOW, duration_seconds=15)
    assert taken.holder == "b" and taken.transitions == 4 and taken.acquire_time == micro_time(NOW)


@pytest.mark.parametrize(
    ("record", "observed_for", "held"),
    [
        (LeaseRecord("b", 15), 3.0, True),
        (LeaseRecord("b", 15), 15.0, False),
        (LeaseRecord("a", 15), 3.0, False),
        (LeaseRecord("", 1), 0.0, False),
    ],
    ids=[
        "another holder renewing recently keeps it",
        "another holder silent for the whole duration has lost it",
        "our own lease is ours to renew",
        "a released lease is free at once",
    ],
)
def test_held_by_other(record, observed_for, held):
    assert held_by_other(record, identity="a", observed_for=observed_for) is held


def test_election_timings_scale_like_client_go_and_reject_impossible_ones():
    s = ElectionSettings.scaled(15.0, identity="x")
    assert (s.lease_duration, s.renew_deadline, s.retry_period) == (15.0, 10.0, 2.0)
    with pytest.raises(ValueError, match="lease_duration > renew_deadline"):
        ElectionSettings(lease_duration=10, renew_deadline=10, retry_period=2, identity="x")


def test_without_pull_secret_copies_serve_needs_only_namespaces_events_and_its_lease():
    from mirrorgate.webhook.core.rbac import base_rbac_rules

    rules = base_rbac_rules("mg", lease_name="l")
    assert [(r["resources"], r["verbs"]) for r in rules.cluster] == [
        (["namespaces"], ["list", "watch"]),
        (["events"], ["list", "watch", "create"]),
        (["pods"], ["get"]),
    ]
    ((ns, lease_rules),) = rules.namespaced
    assert ns == "mg" and {r["resources"][0] for r in lease_rules} == {"leases"}


def test_with_events_off_serve_neither_creates_events_nor_reads_pods():
    from mirrorgate.webhook.core.rbac import base_rbac_rules

    for rules in (
        base_rbac_rules("mg", lease_name="l", events=False),
        rbac_rules(WITH_ACCOUNTS, lease_name="l", events=False),
    ):
        assert {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]} in (
            rules.cluster
        )
        assert not any(
            "create" in r["verbs"] for r in rules.cluster if r["resources"] != ["secrets"]
        )
        assert all(r["resources"] != ["pods"] for r in rules.cluster)
