"""The shape of mirrorgate's webhook configurations: the one place they are built.

Used by the deployer (in-cluster Service or ``--webhook-url``), by ``mirrorgate demo`` and by the
end-to-end tests. Pure: plain dicts in, plain dicts out.

- ``pods/ephemeralcontainers`` must be named explicitly: ``pods`` alone does not match it.
- Excluded namespaces are matched out by the ``kubernetes.io/metadata.name`` label (set by
  Kubernetes >= 1.21; older servers need the label applied, the webhook's own exclusion covers
  them too), so a fail-closed webhook can never block kube-system or its own pods.
- ``reinvocationPolicy: IfNeeded`` re-calls the mutating webhook after later webhooks changed the
  pod (sidecars), which is safe because a second pass yields an empty patch.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

OPT_IN_LABEL = "mirrorgate.io/enabled"
NAME_LABEL = "kubernetes.io/metadata.name"
MANAGED_BY_LABELS = {"app.kubernetes.io/managed-by": "mirrorgate"}
MUTATE_NAME = "mutate.mirrorgate.io"
VALIDATE_NAME = "validate.mirrorgate.io"
API_VERSION = "admissionregistration.k8s.io/v1"
POD_RULES: tuple[dict[str, Any], ...] = (
    {
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"],
        "resources": ["pods"],
        "scope": "Namespaced",
    },
    {
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "operations": ["UPDATE"],
        "resources": ["pods/ephemeralcontainers"],
        "scope": "Namespaced",
    },
)


def selector_for(*, opt_in: bool | Mapping[str, Any], excluded: Sequence[str]) -> dict[str, Any]:
    """``optIn``: only namespaces labelled ``mirrorgate.io/enabled: "true"`` (or a given
    selector); ``clusterWide``: every namespace. Both without ``excluded``."""
    if isinstance(opt_in, Mapping):
        selector: dict[str, Any] = json.loads(json.dumps(opt_in))
    else:
        selector = {"matchLabels": {OPT_IN_LABEL: "true"}} if opt_in else {}
    if excluded:
        selector.setdefault("matchExpressions", []).append(
            {"key": NAME_LABEL, "operator": "NotIn", "values": list(dict.fromkeys(excluded))}
        )
    return selector


def client_config(
    path: str,
    *,
    url: str | None = None,
    service: tuple[str, str, int] | None = None,
    ca_pem: bytes | None = None,
) -> dict[str, Any]:
    """``url`` (out-of-cluster) or ``service`` = (namespace, name, port); ``caBundle`` when given
    (cert-manager's CA injector fills it otherwise)."""
    if (url is None) == (service is None):
        raise ValueError("give exactly one of url or service")
    if url is not None:
        out: dict[str, Any] = {"url": url.rstrip("/") + path}
    else:
        assert service is not None
        namespace, name, port = service
        out = {"service": {"namespace": namespace, "name": name, "path": path, "port": port}}
    if ca_pem:
        out["caBundle"] = base64.b64encode(ca_pem).decode()
    return out


def mutating_webhook_configuration(
    name: str,
    *,
    url: str | None = None,
    service: tuple[str, str, int] | None = None,
    ca_pem: bytes | None = None,
    namespace_selector: Mapping[str, Any] | None = None,
    failure_policy: str = "Ignore",
    reinvocation_policy: str = "IfNeeded",
    timeout_seconds: int = 5,
    excluded_namespaces: Sequence[str] = ("kube-system",),
    side_effects: str = "None",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A MutatingWebhookConfiguration sending Pod creates/updates and ``kubectl debug`` to
    ``/mutate``.

    ``namespace_selector`` is the opt-in part (None: every namespace); ``excluded_namespaces`` are
    added as a ``NotIn`` on the namespace name. ``side_effects="NoneOnDryRun"`` when admission may
    create the pull secret in the pod's namespace (never for a dry run).
    """
    hook = _hook(
        MUTATE_NAME,
        "/mutate",
        url=url,
        service=service,
        ca_pem=ca_pem,
        namespace_selector=namespace_selector,
        excluded_namespaces=excluded_namespaces,
        failure_policy=failure_policy,
        side_effects=side_effects,
        timeout_seconds=timeout_seconds,
    )
    hook["reinvocationPolicy"] = reinvocation_policy
    return _configuration("MutatingWebhookConfiguration", name, hook, labels, annotations)


def validating_webhook_configuration(
    name: str,
    *,
    url: str | None = None,
    service: tuple[str, str, int] | None = None,
    ca_pem: bytes | None = None,
    namespace_selector: Mapping[str, Any] | None = None,
    failure_policy: str = "Ignore",
    timeout_seconds: int = 10,
    excluded_namespaces: Sequence[str] = ("kube-system",),
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    side_effects: str = "None",
) -> dict[str, Any]:
    """A ValidatingWebhookConfiguration sending the same requests to ``/validate``.

    ``timeoutSeconds`` must exceed ``scan.admissionBudget``: the gate answers "pending" when the
    budget runs out, which is better than the API server's timeout error. ``side_effects`` is
    ``"NoneOnDryRun"`` when the gate records denials as Events (never for dry runs).
    """
    hook = _hook(
        VALIDATE_NAME,
        "/validate",
        url=url,
        service=service,
        ca_pem=ca_pem,
        namespace_selector=namespace_selector,
        excluded_namespaces=excluded_namespaces,
        failure_policy=failure_policy,
        side_effects=side_effects,
        timeout_seconds=timeout_seconds,
    )
    return _configuration("ValidatingWebhookConfiguration", name, hook, labels, annotations)


def _hook(
    name: str,
    path: str,
    *,
    url: str | None,
    service: tuple[str, str, int] | None,
    ca_pem: bytes | None,
    namespace_selector: Mapping[str, Any] | None,
    excluded_namespaces: Sequence[str],
    failure_policy: str,
    side_effects: str,
    timeout_seconds: int,
) -> dict[str, Any]:
    """What both webhooks share: Pod requests, the namespace selector, the client config."""
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "clientConfig": client_config(path, url=url, service=service, ca_pem=ca_pem),
        "rules": [dict(rule) for rule in POD_RULES],
        "namespaceSelector": selector_for(
            opt_in=namespace_selector or False, excluded=excluded_namespaces
        ),
        "failurePolicy": failure_policy,
        "matchPolicy": "Equivalent",
        "sideEffects": side_effects,
        "timeoutSeconds": timeout_seconds,
    }


def _configuration(
    kind: str,
    name: str,
    hook: dict[str, Any],
    labels: Mapping[str, str] | None,
    annotations: Mapping[str, str] | None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": dict(labels or MANAGED_BY_LABELS)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "webhooks": [hook]}
