"""The images and AdmissionReview bodies the benchmark sends.

Owns what the load looks like: a catalogue of 20 upstream images (half of them multi-arch, as most
public images are), the three pod shapes the issue names (1 container; 5 with init containers; 30)
and AdmissionReview v1 CREATE requests shaped like the ones kube-apiserver sends for a
ReplicaSet's pod: defaulted containers, a projected service-account volume, tolerations,
managedFields and userInfo. Pure: no I/O.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from mirrorgate.webhook.core.images import parse_reference, with_mirror


@dataclass(frozen=True, slots=True)
class CatalogImage:
    written: str  # as a user writes it in a pod spec
    multi: bool  # an OCI image index of linux/amd64 and linux/arm64


CATALOG: tuple[CatalogImage, ...] = (
    CatalogImage("nginx:1.25.3", True),
    CatalogImage("redis:7.2.4", True),
    CatalogImage("postgres:16.2", True),
    CatalogImage("alpine:3.19.1", True),
    CatalogImage("istio/proxyv2:1.21.0", True),
    CatalogImage("fluent/fluent-bit:2.2.2", True),
    CatalogImage("grafana/promtail:2.9.5", False),
    CatalogImage("bitnami/kubectl:1.29.2", False),
    CatalogImage("openpolicyagent/opa:0.62.0", False),
    CatalogImage("ghcr.io/acme/storefront:2.3.1", False),
    CatalogImage("ghcr.io/acme/storefront-migrations:2.3.1", False),
    CatalogImage("ghcr.io/acme/api:4.0.2", False),
    CatalogImage("ghcr.io/acme/worker:4.0.2", False),
    CatalogImage("ghcr.io/acme/search-indexer:1.8.0", False),
    CatalogImage("quay.io/prometheus/node-exporter:v1.7.0", True),
    CatalogImage("quay.io/prometheus/statsd-exporter:v0.26.0", True),
    CatalogImage("quay.io/jetstack/cert-manager-controller:v1.14.4", True),
    CatalogImage("registry.k8s.io/pause:3.9", True),
    CatalogImage("registry.k8s.io/kube-state-metrics/kube-state-metrics:v2.10.1", False),
    CatalogImage("docker.io/library/busybox:1.36.1", False),
)

# upstream -> mirror path prefix on the benchmark's registry ("" = the registry's root).
MIRROR_PREFIXES = {"docker.io": "", "ghcr.io": "ghcr", "quay.io": "quay", "registry.k8s.io": "k8s"}

NAMESPACE = "shop"
SHAPES = ("1c", "5c", "30c")
SHAPE_TITLES = {
    "1c": "1 container",
    "5c": "5 containers (2 init)",
    "30c": "30 containers",
}


def mirror_location(image: str, registry_host: str) -> str:
    """Where mirrorgate rewrites ``image`` to on ``registry_host`` (``host/path:tag``)."""
    ref = parse_reference(image)
    prefix = MIRROR_PREFIXES[ref.domain]
    return with_mirror(ref, f"{registry_host}/{prefix}" if prefix else registry_host)


def mirror_repository(image: str) -> tuple[str, str]:
    """(repository, tag) of ``image``'s copy on the mirror registry."""
    ref = parse_reference(image)
    prefix = MIRROR_PREFIXES[ref.domain]
    assert ref.tag is not None
    return (f"{prefix}/{ref.path}" if prefix else ref.path), ref.tag


def _container(name: str, image: str, index: int, *, init: bool = False) -> dict[str, Any]:
    """A container as the API server hands it to admission: every default filled in."""
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {
                "name": "POD_NAME",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
            },
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
            },
            {"name": "LOG_LEVEL", "value": "info"},
            {
                "name": "OTEL_EXPORTER_OTLP_ENDPOINT",
                "value": "http://otel-collector.observability:4317",
            },
        ],
        "resources": {
            "limits": {"cpu": "500m", "memory": "256Mi"},
            "requests": {"cpu": "50m", "memory": "64Mi"},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app", "readOnly": True},
            {
                "name": "kube-api-access-7xk2p",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            },
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if not init:
        port = 8080 + index
        c["ports"] = [{"name": f"http-{index}", "containerPort": port, "protocol": "TCP"}]
        probe = {
            "httpGet": {"path": "/healthz", "port": port, "scheme": "HTTP"},
            "timeoutSeconds": 1,
            "periodSeconds": 10,
            "successThreshold": 1,
            "failureThreshold": 3,
        }
        c["livenessProbe"] = probe
        c["readinessProbe"] = copy.deepcopy(probe)
    return c


def pod(shape: str, images: list[str] | None = None) -> dict[str, Any]:
    """A Pod of ``shape`` (``1c``, ``5c``, ``30c``) as created by a ReplicaSet controller.

    ``images`` overrides the catalogue (one per container, cycled).
    """
    written = images or [c.written for c in CATALOG]
    if shape == "1c":
        inits, mains = 0, 1
    elif shape == "5c":
        inits, mains = 2, 3
    elif shape == "30c":
        inits, mains = 2, 28
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    picks = [written[i % len(written)] for i in range(inits + mains)]
    init_containers = [_container(f"init-{i}", picks[i], i, init=True) for i in range(inits)]
    containers = [_container(f"app-{i}", picks[inits + i], i) for i in range(mains)]
    spec: dict[str, Any] = {
        "volumes": [
            {"name": "config", "configMap": {"name": "storefront-config", "defaultMode": 420}},
            {
                "name": "kube-api-access-7xk2p",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {
                                            "apiVersion": "v1",
                                            "fieldPath": "metadata.namespace",
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            },
        ],
        "containers": containers,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "storefront",
        "serviceAccount": "storefront",
        "securityContext": {"fsGroup": 2000, "seccompProfile": {"type": "RuntimeDefault"}},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    if init_containers:
        spec["initContainers"] = init_containers
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "storefront-6d4cf56db6-",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "storefront", "pod-template-hash": "6d4cf56db6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2024-03-01T10:00:00Z"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "storefront-6d4cf56db6",
                    "uid": "5a0c7c1e-2b7d-4f4e-9a8e-0f3c2b1a9d77",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2024-03-01T10:00:01Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:generateName": {},
                            "f:labels": {".": {}, "f:app.kubernetes.io/name": {}},
                            "f:ownerReferences": {".": {}},
                        },
                        "f:spec": {
                            "f:containers": {
                                f'k:{{"name":"{c["name"]}"}}': {".": {}, "f:image": {}}
                                for c in containers
                            },
                        },
                    },
                }
            ],
        },
        "spec": spec,
        "status": {"phase": "Pending", "qosClass": "Burstable"},
    }


def admission_review(obj: dict[str, Any], *, uid: str = "bench-0001") -> dict[str, Any]:
    """The AdmissionReview v1 request kube-apiserver sends for a pod CREATE by a controller."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "namespace": (obj.get("metadata") or {}).get("namespace", NAMESPACE),
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "0b4e1b53-8d1a-4b8e-b0a6-2d7a3f1c9e21",
                "groups": [
                    "system:serviceaccounts",
                    "system:serviceaccounts:kube-system",
                    "system:authenticated",
                ],
            },
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def encode(doc: dict[str, Any]) -> bytes:
    """Compact JSON, as Go's encoding/json writes it."""
    return json.dumps(doc, separators=(",", ":")).encode()
