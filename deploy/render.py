"""Every manifest ``mirrorgate deploy`` installs, as a pure function of the config.

``render(config, material, capabilities=..., webhook_url=...)`` returns the objects in apply order
(namespaces, secrets, RBAC, config, storage, services, workloads, webhook configurations last)
plus notes on what was left out and why. Nothing here talks to the API server or generates
secrets: ``material`` carries every secret value, ``capabilities`` what the server serves.

Pitfalls fixed here, by default:

- nodes cannot resolve ``*.svc``: mirrors are ``127.0.0.1:<nodePort>`` or an Ingress host, and the
  webhook reaches the same registries through their Services (``registries.<host>.endpoint``);
- 413 behind nginx: ``proxy-body-size: "0"``, request buffering off, long timeouts;
- plain-text htpasswd: bcrypt only, the password kept in a Secret, never in a manifest;
- one upstream per proxy: one distribution instance (Deployment, Service, storage) per upstream;
- certificates nobody rotates: see ``certs.rotation``;
- fail-closed webhooks that lock the cluster: ``kube-system`` and mirrorgate's own namespaces are
  never selected, the mutating webhook fails open, the webhook has a PodDisruptionBudget;
- a ReadWriteOnce volume: the hosted registry is replaced, not rolled (``Recreate``), and the
  garbage collector runs on the node that has the volume mounted.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirrorgate.certs.rotation import CA_BUNDLE, ca_config_map_name, tls_secret_name
from mirrorgate.deploy.config import (
    DeployConfig,
    DeploySettings,
    FilesystemStorage,
    RegistryProxy,
    RegistrySettings,
    S3Storage,
    config_from_dict,
)
from mirrorgate.deploy.material import (
    CREDENTIALS_SECRET,
    HTPASSWD_SECRET,
    REGISTRY_SECRET,
    Material,
    deploy_settings,
    events_secret_name,
    registry_auth_secret_name,
    serving_names,
)
from mirrorgate.deploy.webhooks import (
    mutating_webhook_configuration,
    validating_webhook_configuration,
)
from mirrorgate.webhook.core.pullsecrets import Target
from mirrorgate.webhook.core.rbac import base_rbac_rules
from mirrorgate.webhook.core.rbac import rbac_rules as serve_rules

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
PART_OF = "app.kubernetes.io/part-of"
# Objects that hold data: kept by `deploy uninstall --keep-data`.
DATA_LABEL = "mirrorgate.io/data"
CONFIG_HASH = "mirrorgate.io/config-hash"
METADATA_NAME = "kubernetes.io/metadata.name"

REGISTRY_PORT = 5000
WEBHOOK_PORT = 8443
METRICS_PORT = 9090
SERVICE_PORT = 443
REGISTRY_UID = 1000
SHUTDOWN_DELAY = 5
WEBHOOK_UID = 65532

CONFIG_DIR = "/etc/mirrorgate/config"
CONFIG_FILE = f"{CONFIG_DIR}/mirrorgate.yaml"
TLS_DIR = "/etc/mirrorgate/tls"
REGISTRY_AUTH_DIR = "/etc/mirrorgate/registry"
EVENTS_DIR = "/etc/mirrorgate/events"
REGISTRY_CONFIG_DIR = "/etc/docker/registry"
REGISTRY_HTPASSWD_DIR = "/etc/docker/registry-auth"
REGISTRY_DATA = "/var/lib/registry"
REGISTRY_CA_DIR = "/etc/mirrorgate-ca"
DOCKER_CONFIG_KEY = ".dockerconfigjson"

# Apply order: what others depend on first, webhook configurations last (so the webhook they
# call exists), uninstall in reverse (webhook configurations first).
KIND_ORDER = (
    "Namespace",
    "Secret",
    "Issuer",
    "Certificate",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "CronJob",
    "Ingress",
    "ServiceMonitor",
    "PrometheusRule",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
)
# The API versions each kind may be served as, preferred first. Core kinds are always there.
KIND_VERSIONS: dict[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Secret": ("v1",),
    "ServiceAccount": ("v1",),
    "ConfigMap": ("v1",),
    "PersistentVolumeClaim": ("v1",),
    "Service": ("v1",),
    "ClusterRole": ("rbac.authorization.k8s.io/v1",),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1",),
    "Role": ("rbac.authorization.k8s.io/v1",),
    "RoleBinding": ("rbac.authorization.k8s.io/v1",),
    "Deployment": ("apps/v1",),
    # Kubernetes 1.20 serves PodDisruptionBudget and CronJob only as v1beta1.
    "PodDisruptionBudget": ("policy/v1", "policy/v1beta1"),
    "CronJob": ("batch/v1", "batch/v1beta1"),
    "Ingress": ("networking.k8s.io/v1",),
    "ServiceMonitor": ("monitoring.coreos.com/v1",),
    "PrometheusRule": ("monitoring.coreos.com/v1",),
    "Issuer": ("cert-manager.io/v1",),
    "Certificate": ("cert-manager.io/v1",),
    "MutatingWebhookConfiguration": ("admissionregistration.k8s.io/v1",),
    "ValidatingWebhookConfiguration": ("admissionregistration.k8s.io/v1",),
}
NOTIFICATION_TIMEOUT = "5s"


class RenderError(ValueError):
    """The config cannot be rendered for this API server (e.g. a needed API is not served)."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the API server serves: ``served`` holds ``"<apiVersion>/<Kind>"`` strings."""

    version: tuple[int, int]
    served: frozenset[str]

    @classmethod
    def for_version(
        cls, major: int, minor: int, *, monitoring: bool = False, cert_manager: bool = False
    ) -> Capabilities:
        """A stock API server of that version (for ``render`` without a cluster)."""
        served = {
            f"{versions[-1] if (major, minor) < (1, 21) else versions[0]}/{kind}"
            for kind, versions in KIND_VERSIONS.items()
            if not versions[0].startswith(("monitoring.", "cert-manager."))
        }
        if monitoring:
            served |= {"monitoring.coreos.com/v1/ServiceMonitor"}
            served |= {"monitoring.coreos.com/v1/PrometheusRule"}
        if cert_manager:
            served |= {"cert-manager.io/v1/Issuer", "cert-manager.io/v1/Certificate"}
        return cls(version=(major, minor), served=frozenset(served))

    def api_version(self, kind: str) -> str | None:
        return next((v for v in KIND_VERSIONS[kind] if f"{v}/{kind}" in self.served), None)

    @property
    def labels_namespace_names(self) -> bool:
        """Whether the server labels every namespace with its name (1.21+)."""
        return self.version >= (1, 21)


DEFAULT_CAPABILITIES = Capabilities.for_version(1, 30, monitoring=True)


@dataclass(frozen=True, slots=True)
class Rendered:
    objects: tuple[dict[str, Any], ...]
    notes: tuple[str, ...] = ()


# --- names and labels ----------------------------------------------------------------------------
def labels(release: str, component: str, *, name: str = "mirrorgate") -> dict[str, str]:
    return {
        NAME: name,
        INSTANCE: release,
        COMPONENT: component,
        PART_OF: "mirrorgate",
        MANAGED_BY: "mirrorgate",
    }


def selector(release: str, component: str, *, name: str = "mirrorgate") -> dict[str, str]:
    return {NAME: name, INSTANCE: release, COMPONENT: component}


def instance_name(proxy: RegistryProxy | None) -> str:
    return "registry" if proxy is None else f"registry-proxy-{proxy.slug}"


def service_host(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc"


def _meta(
    name: str,
    namespace: str | None,
    lbls: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(lbls)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def secret(
    name: str,
    namespace: str,
    lbls: Mapping[str, str],
    data: Mapping[str, str | bytes],
    *,
    secret_type: str = "Opaque",
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, namespace, lbls, annotations),
        "type": secret_type,
        "data": {k: _b64(v) for k, v in data.items()},
    }


# --- the in-cluster copy of mirrorgate.yaml ----------------------------------------------------
def registry_endpoints(registry: RegistrySettings) -> dict[str, str]:
    """Node-side host -> the Service URL the webhook (and Clair) use for the same registry."""
    out = {registry.hosted_host: f"http://{service_host('registry', registry.namespace)}:5000"}
    for p in registry.proxies:
        svc = service_host(instance_name(p), registry.namespace)
        out[registry.proxy_host(p)] = f"http://{svc}:{REGISTRY_PORT}"
    return out


def in_cluster_config(config: DeployConfig) -> dict[str, Any]:
    """The config file as the webhook pod reads it: the user's document, plus how to reach the
    deployed registry from inside the cluster and where the deployer mounts its secrets."""
    if config.raw is None:
        raise RenderError("the config was not loaded from a document (config.raw is unset)")
    doc: dict[str, Any] = copy.deepcopy(dict(config.raw))
    if config.registry is not None:
        registries = dict(doc.get("registries") or {})
        for host, endpoint in registry_endpoints(config.registry).items():
            registries.setdefault(
                host,
                {
                    "endpoint": endpoint,
                    "plainHTTP": True,
                    "dockerConfigFile": f"{REGISTRY_AUTH_DIR}/{DOCKER_CONFIG_KEY}",
                },
            )
        doc["registries"] = registries
        auth = dict((doc.get("registry") or {}).get("auth") or {})
        # A path on the deployer's machine; the password lives in the credentials Secret.
        if auth.pop("passwordFile", None) is not None:
            doc["registry"] = {**doc["registry"], "auth": auth}
    if config.scan is not None:
        scan = dict(doc["scan"])
        events = dict(scan.get("events") or {})
        events["tokenFile"] = f"{EVENTS_DIR}/token"
        scan["events"] = events
        doc["scan"] = scan
    config_from_dict(doc, source="in-cluster mirrorgate.yaml")  # must stay valid
    return doc


# --- the registry ------------------------------------------------------------------------------
def registry_config(
    registry: RegistrySettings, *, proxy: RegistryProxy | None = None
) -> dict[str, Any]:
    """A distribution ``config.yml``. Secrets come from the environment: ``http.secret`` as
    REGISTRY_HTTP_SECRET, the notification endpoint (it carries a token) as
    REGISTRY_NOTIFICATIONS_ENDPOINTS, S3 and upstream credentials likewise."""
    storage: dict[str, Any]
    if isinstance(registry.storage, S3Storage):
        s3: dict[str, Any] = {
            "bucket": registry.storage.bucket,
            "region": registry.storage.region,
            "rootdirectory": f"/{instance_name(proxy)}",
        }
        if registry.storage.region_endpoint:
            s3["regionendpoint"] = registry.storage.region_endpoint
        storage = {"s3": s3}
    else:
        storage = {"filesystem": {"rootdirectory": REGISTRY_DATA}}
    storage["cache"] = {"blobdescriptor": "inmemory"}
    storage["maintenance"] = {
        "uploadpurging": {"enabled": True, "age": "168h", "interval": "24h", "dryrun": False}
    }
    if proxy is None:
        storage["delete"] = {"enabled": True}
    http: dict[str, Any] = {
        "addr": f":{REGISTRY_PORT}",
        "headers": {"X-Content-Type-Options": ["nosniff"]},
    }
    if registry.ingress is not None:
        # TLS ends at the ingress: upload Locations must not name the registry's own scheme.
        http["relativeurls"] = True
    config: dict[str, Any] = {
        "version": "0.1",
        # "info" would log the notification endpoint's Authorization header at start-up;
        # requests are still logged by the access log.
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": storage,
        "http": http,
        "auth": {
            "htpasswd": {
                "realm": "mirrorgate-registry",
                "path": f"{REGISTRY_HTPASSWD_DIR}/htpasswd",
            }
        },
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
    }
    if proxy is not None:
        config["proxy"] = {"remoteurl": proxy.remote_url}
    return config


def notification_endpoints(url: str, token: str) -> list[dict[str, Any]]:
    """Push events to the webhook's ``/events/registry`` (scan-on-push); pulls are ignored."""
    return [
        {
            "name": "mirrorgate",
            "url": url,
            "headers": {"Authorization": [f"Bearer {token}"]},
            "timeout": NOTIFICATION_TIMEOUT,
            "threshold": 5,
            "backoff": "10s",
            "ignoredmediatypes": ["application/octet-stream"],
            "ignore": {"actions": ["pull"]},
        }
    ]


def docker_config(hosts: Iterable[str], username: str, password: str) -> str:
    auth = _b64(f"{username}:{password}")
    return json.dumps({"auths": {h: {"auth": auth} for h in hosts}}, sort_keys=True)


def _env_secret(name: str, secret_name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}


def _restricted(*, read_only: bool = True) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


class _Registry:
    """The registry's objects: one distribution instance per role (hosted, each cache)."""

    def __init__(
        self,
        config: DeployConfig,
        material: Material,
        caps: Capabilities,
        *,
        events_url: str | None,
    ) -> None:
        assert config.registry is not None
        self.config = config
        self.r = config.registry
        self.m = material
        self.caps = caps
        self.release = deploy_settings(config).name
        self.ns = self.r.namespace
        self.events_url = events_url
        self.notify = config.scan is not None and events_url is not None

    def objects(self) -> list[dict[str, Any]]:
        out = self.secrets_()
        if self.notify:
            out.append(self.ca_config_map())
        for proxy in (None, *self.r.proxies):
            out += self.instance(proxy)
        out.append(self.gc_cronjob())
        if self.r.ingress is not None:
            out.append(self.ingress())
        return out

    def lbl(self, component: str) -> dict[str, str]:
        return labels(self.release, component, name="registry")

    def secrets_(self) -> list[dict[str, Any]]:
        data_labels = {**self.lbl("registry"), DATA_LABEL: "true"}
        registry_data = {"http-secret": self.m.http_secret}
        if self.notify:
            assert self.events_url is not None and self.m.events_token is not None
            endpoints = notification_endpoints(self.events_url, self.m.events_token)
            registry_data["notifications"] = yaml.safe_dump(endpoints, sort_keys=False)
        ps = self.config.pull_secret
        assert ps is not None and ps.source_namespace and ps.source_name
        pull = docker_config(self.r.hosts, self.m.username, self.m.password)
        out = [
            secret(
                CREDENTIALS_SECRET,
                self.ns,
                data_labels,
                {"username": self.m.username, "password": self.m.password},
            ),
            secret(HTPASSWD_SECRET, self.ns, self.lbl("registry"), {"htpasswd": self.m.htpasswd}),
            secret(REGISTRY_SECRET, self.ns, self.lbl("registry"), registry_data),
            secret(
                ps.source_name,
                ps.source_namespace,
                labels(self.release, "pull-secret"),
                {DOCKER_CONFIG_KEY: pull},
                secret_type="kubernetes.io/dockerconfigjson",
            ),
        ]
        return out

    def ca_config_map(self) -> dict[str, Any]:
        bundle = self.m.ca_bundle.decode()
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(ca_config_map_name(self.release), self.ns, self.lbl("registry")),
            "data": {CA_BUNDLE: bundle},
        }

    def instance(self, proxy: RegistryProxy | None) -> list[dict[str, Any]]:
        name = instance_name(proxy)
        component = "registry" if proxy is None else "proxy"
        lbl = {**self.lbl(component), "mirrorgate.io/registry": name}
        sel = {**selector(self.release, component, name="registry"), "mirrorgate.io/registry": name}
        config_text = yaml.safe_dump(registry_config(self.r, proxy=proxy), sort_keys=False)
        out: list[dict[str, Any]] = [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _meta(f"{name}-config", self.ns, lbl),
                "data": {"config.yml": config_text},
            }
        ]
        if isinstance(self.r.storage, FilesystemStorage):
            spec: dict[str, Any] = {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": self.r.storage.size}},
            }
            if self.r.storage.storage_class:
                spec["storageClassName"] = self.r.storage.storage_class
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": _meta(f"{name}-data", self.ns, {**lbl, DATA_LABEL: "true"}),
                    "spec": spec,
                }
            )
        node_port = self.r.node_port if proxy is None else proxy.node_port
        port: dict[str, Any] = {
            "name": "http",
            "port": REGISTRY_PORT,
            "targetPort": "http",
            # Kubernetes 1.20's server-side apply needs the protocol (part of the list map key).
            "protocol": "TCP",
        }
        service_spec: dict[str, Any] = {"type": "ClusterIP", "selector": sel, "ports": [port]}
        if self.r.pull_path == "nodePort" and node_port is not None:
            service_spec["type"] = "NodePort"
            port["nodePort"] = node_port
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(name, self.ns, lbl),
                "spec": service_spec,
            }
        )
        out.append(self.deployment(name, proxy, lbl, sel, config_text))
        return out

    def env(self, proxy: RegistryProxy | None) -> list[dict[str, Any]]:
        env = [_env_secret("REGISTRY_HTTP_SECRET", REGISTRY_SECRET, "http-secret")]
        if proxy is None and self.notify:
            env.append(
                _env_secret("REGISTRY_NOTIFICATIONS_ENDPOINTS", REGISTRY_SECRET, "notifications")
            )
            # Go reads extra roots from SSL_CERT_DIR next to the system bundle, so the webhook's
            # private CA is trusted without losing the public roots (S3, upstreams).
            env.append({"name": "SSL_CERT_DIR", "value": f"/etc/ssl/certs:{REGISTRY_CA_DIR}"})
        if isinstance(self.r.storage, S3Storage) and self.r.storage.secret_ref:
            env.append(
                _env_secret("REGISTRY_STORAGE_S3_ACCESSKEY", self.r.storage.secret_ref, "accessKey")
            )
            env.append(
                _env_secret("REGISTRY_STORAGE_S3_SECRETKEY", self.r.storage.secret_ref, "secretKey")
            )
        if proxy is not None and proxy.credentials_secret:
            env.append(_env_secret("REGISTRY_PROXY_USERNAME", proxy.credentials_secret, "username"))
            env.append(_env_secret("REGISTRY_PROXY_PASSWORD", proxy.credentials_secret, "password"))
        return env

    def volumes(
        self, name: str, proxy: RegistryProxy | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        mounts: list[dict[str, Any]] = [
            {"name": "config", "mountPath": REGISTRY_CONFIG_DIR, "readOnly": True},
            {"name": "htpasswd", "mountPath": REGISTRY_HTPASSWD_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
        volumes: list[dict[str, Any]] = [
            {"name": "config", "configMap": {"name": f"{name}-config"}},
            {
                "name": "htpasswd",
                "secret": {"secretName": HTPASSWD_SECRET, "defaultMode": 0o440},
            },
            {"name": "tmp", "emptyDir": {}},
        ]
        if isinstance(self.r.storage, FilesystemStorage):
            mounts.append({"name": "data", "mountPath": REGISTRY_DATA})
            volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": f"{name}-data"}})
        if proxy is None and self.notify:
            mounts.append({"name": "webhook-ca", "mountPath": REGISTRY_CA_DIR, "readOnly": True})
            volumes.append(
                {"name": "webhook-ca", "configMap": {"name": ca_config_map_name(self.release)}}
            )
        return mounts, volumes

    def container(self, name: str, proxy: RegistryProxy | None, **extra: Any) -> dict[str, Any]:
        mounts, _ = self.volumes(name, proxy)
        return {
            "name": "registry",
            "image": self.r.image,
            "imagePullPolicy": "IfNotPresent",
            "env": self.env(proxy),
            "volumeMounts": mounts,
            "securityContext": _restricted(),
            **extra,
        }

    def deployment(
        self,
        name: str,
        proxy: RegistryProxy | None,
        lbl: dict[str, str],
        sel: dict[str, str],
        config_text: str,
    ) -> dict[str, Any]:
        _, volumes = self.volumes(name, proxy)
        probe = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10}
        container = self.container(
            name,
            proxy,
            ports=[{"name": "http", "containerPort": REGISTRY_PORT, "protocol": "TCP"}],
            readinessProbe={**probe, "failureThreshold": 3},
            livenessProbe={**probe, "failureThreshold": 6, "initialDelaySeconds": 10},
            resources={
                "requests": {"cpu": "50m", "memory": "64Mi"},
                "limits": {"memory": "512Mi"},
            },
        )
        # A ReadWriteOnce volume can't be attached to the old and the new pod on two nodes.
        rwo = isinstance(self.r.storage, FilesystemStorage)
        strategy = {"type": "Recreate"} if rwo else {"type": "RollingUpdate"}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(name, self.ns, lbl),
            "spec": {
                "replicas": 1,
                "strategy": strategy,
                "selector": {"matchLabels": sel},
                "template": {
                    "metadata": {
                        "labels": lbl,
                        # Restart when the config or the htpasswd changes: both are read at start.
                        "annotations": {CONFIG_HASH: _digest(config_text, self.m.htpasswd)},
                    },
                    "spec": {
                        "automountServiceAccountToken": False,
                        # distribution reads every REGISTRY_* variable as a config override, and
                        # Kubernetes would inject REGISTRY_SERVICE_HOST & co. for our Services.
                        "enableServiceLinks": False,
                        "securityContext": _pod_security(REGISTRY_UID),
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }

    def gc_cronjob(self) -> dict[str, Any]:
        name = instance_name(None)
        _, volumes = self.volumes(name, None)
        volumes = [v for v in volumes if v["name"] != "webhook-ca"]
        container = self.container(
            name,
            None,
            command=[
                "registry",
                "garbage-collect",
                f"{REGISTRY_CONFIG_DIR}/config.yml",
                "--delete-untagged=false",
            ],
            resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
        )
        container["env"] = [
            e for e in container["env"] if e["name"] != "REGISTRY_NOTIFICATIONS_ENDPOINTS"
        ]
        container["volumeMounts"] = [
            m for m in container["volumeMounts"] if m["name"] != "webhook-ca"
        ]
        pod: dict[str, Any] = {
            "restartPolicy": "OnFailure",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security(REGISTRY_UID),
            "containers": [container],
            "volumes": volumes,
        }
        if isinstance(self.r.storage, FilesystemStorage):
            # The volume is ReadWriteOnce: run next to the registry pod that has it attached.
            pod["affinity"] = {
                "podAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "labelSelector": {
                                "matchLabels": {
                                    **selector(self.release, "registry", name="registry"),
                                    "mirrorgate.io/registry": name,
                                }
                            },
                            "topologyKey": "kubernetes.io/hostname",
                        }
                    ]
                }
            }
        api = self.caps.api_version("CronJob")
        return {
            "apiVersion": api,
            "kind": "CronJob",
            "metadata": _meta("registry-gc", self.ns, self.lbl("registry-gc")),
            "spec": {
                "schedule": self.r.gc_schedule,
                "concurrencyPolicy": "Forbid",
                "successfulJobsHistoryLimit": 1,
                "failedJobsHistoryLimit": 3,
                "jobTemplate": {
                    "spec": {
                        "backoffLimit": 2,
                        "template": {
                            "metadata": {"labels": self.lbl("registry-gc")},
                            "spec": pod,
                        },
                    }
                },
            },
        }

    def ingress(self) -> dict[str, Any]:
        ing = self.r.ingress
        assert ing is not None
        hosts = [(ing.host, "registry")]
        if self.r.pull_path == "ingress":
            hosts += [(self.r.proxy_host(p), instance_name(p)) for p in self.r.proxies]
        annotations = {
            # distribution takes layer uploads of any size; nginx's default 1m gives 413s.
            "nginx.ingress.kubernetes.io/proxy-body-size": "0",
            "nginx.ingress.kubernetes.io/proxy-request-buffering": "off",
            "nginx.ingress.kubernetes.io/proxy-buffering": "off",
            "nginx.ingress.kubernetes.io/proxy-read-timeout": "900",
            "nginx.ingress.kubernetes.io/proxy-send-timeout": "900",
        }
        secret_name = ing.tls.secret_name or f"{ing.host.replace('.', '-')}-tls"
        if ing.tls.issuer:
            key = "cluster-issuer" if ing.tls.issuer_kind == "ClusterIssuer" else "issuer"
            annotations[f"cert-manager.io/{key}"] = ing.tls.issuer
        return {
            "apiVersion": self.caps.api_version("Ingress"),
            "kind": "Ingress",
            "metadata": _meta("registry", self.ns, self.lbl("registry"), annotations),
            "spec": {
                "ingressClassName": ing.class_name,
                "tls": [{"hosts": [h for h, _ in hosts], "secretName": secret_name}],
                "rules": [
                    {
                        "host": host,
                        "http": {
                            "paths": [
                                {
                                    "path": "/",
                                    "pathType": "Prefix",
                                    "backend": {
                                        "service": {
                                            "name": svc,
                                            "port": {"number": REGISTRY_PORT},
                                        }
                                    },
                                }
                            ]
                        },
                    }
                    for host, svc in hosts
                ],
            },
        }


# --- the webhook -------------------------------------------------------------------------------
def _rule(
    group: str, resources: Sequence[str], verbs: Sequence[str], names: Sequence[str] = ()
) -> dict[str, Any]:
    rule: dict[str, Any] = {"apiGroups": [group], "resources": list(resources)}
    if names:
        rule["resourceNames"] = list(names)
    rule["verbs"] = list(verbs)
    return rule


def rbac_rules(
    config: DeployConfig,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(ClusterRole rules, namespace -> Role rules): what the running webhook calls, nothing more.

    ``serve`` itself (namespace labels, kubelet Events, its lease, pull-secret copies):
    ``webhook.core.rbac``. Certificate renewal (builtin certs): its own TLS Secret, the two
    webhook configurations' caBundle and the registry's CA ConfigMap, each by name.
    """
    d = deploy_settings(config)
    target = Target.from_config(config, own_namespace=d.namespace)
    running = config.scan is not None  # the gate watches what runs (controllers.running)
    rules = (
        serve_rules(target, events=config.events, running=running)
        if target is not None
        else base_rbac_rules(d.namespace, events=config.events, running=running)
    )
    cluster = [dict(r) for r in rules.cluster]
    namespaced: dict[str, list[dict[str, Any]]] = {}
    for ns, ns_rules in rules.namespaced:
        namespaced.setdefault(ns, []).extend(dict(r) for r in ns_rules)
    if config.certs.mode == "builtin":
        group = "admissionregistration.k8s.io"
        hooks = ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"]
        cluster.append(_rule(group, hooks, ["get", "update"], [d.name]))
        namespaced.setdefault(d.namespace, []).append(
            _rule("", ["secrets"], ["get", "update"], [tls_secret_name(d.name)])
        )
        if config.registry is not None and config.scan is not None:
            namespaced.setdefault(config.registry.namespace, []).append(
                _rule("", ["configmaps"], ["get", "update"], [ca_config_map_name(d.name)])
            )
    return cluster, namespaced


class _Webhook:
    def __init__(
        self,
        config: DeployConfig,
        material: Material,
        caps: Capabilities,
        *,
        webhook_url: str | None,
    ) -> None:
        self.config = config
        self.d: DeploySettings = deploy_settings(config)
        self.m = material
        self.caps = caps
        self.url = webhook_url
        self.ns = self.d.namespace
        self.release = self.d.name
        self.lbl = labels(self.release, "webhook")
        self.sel = selector(self.release, "webhook")

    def objects(self) -> tuple[list[dict[str, Any]], list[str]]:
        notes: list[str] = []
        out = [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _meta(self.release, self.ns, self.lbl),
                "automountServiceAccountToken": True,
            }
        ]
        out += self.secrets_()
        out += self.rbac()
        out += self.cert_manager()
        doc = in_cluster_config(self.config)
        config_text = yaml.safe_dump(doc, sort_keys=False)
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _meta(f"{self.release}-config", self.ns, self.lbl),
                "data": {"mirrorgate.yaml": config_text},
            }
        )
        if self.caps.api_version("PrometheusRule"):
            dashboard = self.dashboard()
            if dashboard is not None:
                out.append(dashboard)
        if self.url is None:
            out.append(self.service())
            out.append(self.deployment(config_text))
            if self.d.replicas > 1:
                out.append(self.pdb())
            else:
                notes.append("deploy.replicas is 1: no PodDisruptionBudget (it would block drains)")
            if self.caps.api_version("ServiceMonitor"):
                out.append(self.service_monitor())
        else:
            notes.append(
                f"--webhook-url {self.url}: webhooks call that URL; no webhook Deployment, Service "
                "or PodDisruptionBudget is installed"
            )
        if self.caps.api_version("PrometheusRule"):
            rule = self.prometheus_rule()
            if rule is not None:
                out.append(rule)
        else:
            notes.append(
                "monitoring.coreos.com/v1 is not served (no Prometheus Operator CRDs): "
                "ServiceMonitor and PrometheusRule skipped"
            )
        out += self.webhook_configurations()
        return out, notes

    def secrets_(self) -> list[dict[str, Any]]:
        out = []
        if self.config.certs.mode == "builtin":
            assert self.m.tls is not None
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": _meta(
                        tls_secret_name(self.release), self.ns, self.lbl, self.m.tls.annotations()
                    ),
                    "type": "kubernetes.io/tls",
                    "data": self.m.tls.secret_data(),
                }
            )
        if self.config.registry is not None:
            pull = docker_config(self.config.registry.hosts, self.m.username, self.m.password)
            out.append(
                secret(
                    registry_auth_secret_name(self.release),
                    self.ns,
                    self.lbl,
                    {DOCKER_CONFIG_KEY: pull},
                    secret_type="kubernetes.io/dockerconfigjson",
                )
            )
        if self.config.scan is not None:
            assert self.m.events_token is not None
            out.append(
                secret(
                    events_secret_name(self.release),
                    self.ns,
                    self.lbl,
                    {"token": self.m.events_token},
                )
            )
        return out

    def rbac(self) -> list[dict[str, Any]]:
        cluster, namespaced = rbac_rules(self.config)
        subject = {"kind": "ServiceAccount", "name": self.release, "namespace": self.ns}
        rbac = "rbac.authorization.k8s.io/v1"
        out: list[dict[str, Any]] = [
            {
                "apiVersion": rbac,
                "kind": "ClusterRole",
                "metadata": _meta(self.release, None, self.lbl),
                "rules": cluster,
            },
            {
                "apiVersion": rbac,
                "kind": "ClusterRoleBinding",
                "metadata": _meta(self.release, None, self.lbl),
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": self.release,
                },
                "subjects": [subject],
            },
        ]
        for ns, rules in namespaced.items():
            out.append(
                {
                    "apiVersion": rbac,
                    "kind": "Role",
                    "metadata": _meta(self.release, ns, self.lbl),
                    "rules": rules,
                }
            )
            out.append(
                {
                    "apiVersion": rbac,
                    "kind": "RoleBinding",
                    "metadata": _meta(self.release, ns, self.lbl),
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Role",
                        "name": self.release,
                    },
                    "subjects": [subject],
                }
            )
        return out

    def cert_manager(self) -> list[dict[str, Any]]:
        if self.config.certs.mode != "cert-manager":
            return []
        api = self.caps.api_version("Certificate")
        if api is None:
            raise RenderError(
                "certs.mode is cert-manager, but the API server does not serve "
                "cert-manager.io/v1 Certificate: install cert-manager, or use certs.mode: builtin"
            )
        c = self.config.certs

        def hours(seconds: float) -> str:
            return f"{math.ceil(seconds / 3600)}h"

        key = {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
        ca_name, serving = f"{self.release}-ca", f"{self.release}-serving"
        names = serving_names(self.config, webhook_url_host=_url_host(self.url))
        dns = [n for n in names if not _is_ip(n)]
        ips = [n for n in names if _is_ip(n)]
        serving_spec: dict[str, Any] = {
            "secretName": tls_secret_name(self.release),
            "dnsNames": dns,
            "duration": hours(c.serving_duration),
            "renewBefore": hours(c.serving_duration / 3),
            "privateKey": key,
            "usages": ["server auth", "digital signature"],
            "issuerRef": {"name": ca_name, "kind": "Issuer"},
        }
        if ips:
            serving_spec["ipAddresses"] = ips
        return [
            {
                "apiVersion": api,
                "kind": "Issuer",
                "metadata": _meta(f"{self.release}-selfsigned", self.ns, self.lbl),
                "spec": {"selfSigned": {}},
            },
            {
                "apiVersion": api,
                "kind": "Certificate",
                "metadata": _meta(ca_name, self.ns, self.lbl),
                "spec": {
                    "isCA": True,
                    "commonName": "mirrorgate-webhook-ca",
                    "secretName": ca_name,
                    "duration": hours(c.ca_duration),
                    "renewBefore": hours(c.ca_duration / 3),
                    "privateKey": key,
                    "issuerRef": {"name": f"{self.release}-selfsigned", "kind": "Issuer"},
                },
            },
            {
                "apiVersion": api,
                "kind": "Issuer",
                "metadata": _meta(ca_name, self.ns, self.lbl),
                "spec": {"ca": {"secretName": ca_name}},
            },
            {
                "apiVersion": api,
                "kind": "Certificate",
                "metadata": _meta(serving, self.ns, self.lbl),
                "spec": serving_spec,
            },
        ]

    def service(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(self.release, self.ns, self.lbl),
            "spec": {
                "type": "ClusterIP",
                "selector": self.sel,
                "ports": [
                    {
                        "name": "https",
                        "port": SERVICE_PORT,
                        "targetPort": "https",
                        "protocol": "TCP",
                    },
                    {
                        "name": "metrics",
                        "port": METRICS_PORT,
                        "targetPort": "metrics",
                        "protocol": "TCP",
                    },
                ],
            },
        }

    def deployment(self, config_text: str) -> dict[str, Any]:
        mounts = [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
        volumes: list[dict[str, Any]] = [
            {"name": "config", "configMap": {"name": f"{self.release}-config"}},
            {
                "name": "tls",
                "secret": {
                    "secretName": tls_secret_name(self.release),
                    "defaultMode": 0o440,
                    # Only the serving pair: the CA key stays in the API (read by the renewer).
                    "items": [
                        {"key": "tls.crt", "path": "tls.crt"},
                        {"key": "tls.key", "path": "tls.key"},
                    ],
                },
            },
            {"name": "tmp", "emptyDir": {}},
        ]
        if self.config.registry is not None:
            mounts.append(
                {"name": "registry-auth", "mountPath": REGISTRY_AUTH_DIR, "readOnly": True}
            )
            volumes.append(
                {
                    "name": "registry-auth",
                    "secret": {
                        "secretName": registry_auth_secret_name(self.release),
                        "defaultMode": 0o440,
                    },
                }
            )
        if self.config.scan is not None:
            mounts.append({"name": "events", "mountPath": EVENTS_DIR, "readOnly": True})
            volumes.append(
                {
                    "name": "events",
                    "secret": {
                        "secretName": events_secret_name(self.release),
                        "defaultMode": 0o440,
                    },
                }
            )
        for i, sm in enumerate(self.d.secret_mounts):
            mounts.append({"name": f"extra-{i}", "mountPath": sm.path, "readOnly": True})
            volumes.append(
                {"name": f"extra-{i}", "secret": {"secretName": sm.secret, "defaultMode": 0o440}}
            )
        env: list[dict[str, Any]] = [
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]
        if self.config.certs.mode == "builtin":
            # Where the running webhook renews its certificate (webhook.controllers.certs).
            env.append({"name": "MIRRORGATE_TLS_SECRET", "value": tls_secret_name(self.release)})
        probe = {"httpGet": {"path": "/readyz", "port": "https", "scheme": "HTTPS"}}
        container = {
            "name": "webhook",
            "image": self.d.image,
            "imagePullPolicy": "IfNotPresent",
            "args": [
                "--config",
                CONFIG_FILE,
                "--tls-cert",
                f"{TLS_DIR}/tls.crt",
                "--tls-key",
                f"{TLS_DIR}/tls.key",
                "--listen",
                f"0.0.0.0:{WEBHOOK_PORT}",
                "--metrics-listen",
                f"0.0.0.0:{METRICS_PORT}",
                # After SIGTERM, readiness fails and connections close after each answer while
                # serving goes on, so the Service's endpoints move before the socket closes
                # (the grace period below covers this and the 15 s drain).
                "--shutdown-delay",
                str(SHUTDOWN_DELAY),
            ],
            "env": env,
            "ports": [
                {"name": "https", "containerPort": WEBHOOK_PORT, "protocol": "TCP"},
                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            ],
            "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
            "livenessProbe": {
                "httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"},
                "periodSeconds": 10,
                "failureThreshold": 3,
            },
            "resources": {
                "requests": {"cpu": "50m", "memory": "96Mi"},
                "limits": {"memory": "384Mi"},
            },
            "securityContext": _restricted(),
            "volumeMounts": mounts,
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(self.release, self.ns, self.lbl),
            "spec": {
                "replicas": self.d.replicas,
                # Never below the wanted number of ready webhooks during a rollout.
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "selector": {"matchLabels": self.sel},
                "template": {
                    "metadata": {
                        "labels": self.lbl,
                        "annotations": {CONFIG_HASH: _digest(config_text)},
                    },
                    "spec": {
                        "serviceAccountName": self.release,
                        "securityContext": _pod_security(WEBHOOK_UID),
                        "terminationGracePeriodSeconds": 30,
                        "affinity": {
                            "podAntiAffinity": {
                                "preferredDuringSchedulingIgnoredDuringExecution": [
                                    {
                                        "weight": 100,
                                        "podAffinityTerm": {
                                            "labelSelector": {"matchLabels": self.sel},
                                            "topologyKey": "kubernetes.io/hostname",
                                        },
                                    }
                                ]
                            }
                        },
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }

    def pdb(self) -> dict[str, Any]:
        return {
            "apiVersion": self.caps.api_version("PodDisruptionBudget"),
            "kind": "PodDisruptionBudget",
            "metadata": _meta(self.release, self.ns, self.lbl),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": self.sel}},
        }

    def service_monitor(self) -> dict[str, Any]:
        return {
            "apiVersion": self.caps.api_version("ServiceMonitor"),
            "kind": "ServiceMonitor",
            "metadata": _meta(self.release, self.ns, self.lbl),
            "spec": {
                "selector": {"matchLabels": self.sel},
                "namespaceSelector": {"matchNames": [self.ns]},
                "endpoints": [{"port": "metrics", "interval": "30s", "path": "/metrics"}],
            },
        }

    def dashboard(self) -> dict[str, Any] | None:
        """The Grafana dashboard, for Grafana's sidecar (label ``grafana_dashboard: "1"``)."""
        ref = resources.files("mirrorgate.deploy").joinpath("monitoring/mirrorgate-dashboard.json")
        if not ref.is_file():
            return None
        lbl = {**self.lbl, "grafana_dashboard": "1"}
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(f"{self.release}-dashboard", self.ns, lbl),
            "data": {"mirrorgate.json": ref.read_text(encoding="utf-8")},
        }

    def prometheus_rule(self) -> dict[str, Any] | None:
        groups = alert_rule_groups()
        if groups is None:
            return None
        return {
            "apiVersion": self.caps.api_version("PrometheusRule"),
            "kind": "PrometheusRule",
            "metadata": _meta(self.release, self.ns, self.lbl),
            "spec": {"groups": groups},
        }

    def webhook_configurations(self) -> list[dict[str, Any]]:
        config = self.config
        ns = config.namespaces
        opt_in = {"matchLabels": {"mirrorgate.io/enabled": "true"}} if ns.mode == "optIn" else None
        if self.url is not None:
            target: dict[str, Any] = {"url": self.url}
        else:
            target = {"service": (self.ns, self.release, SERVICE_PORT)}
        annotations = None
        ca_pem = None
        if config.certs.mode == "cert-manager":
            annotations = {"cert-manager.io/inject-ca-from": f"{self.ns}/{self.release}-serving"}
        else:
            assert self.m.tls is not None
            ca_pem = self.m.tls.ca_bundle
        common = {
            "ca_pem": ca_pem,
            "namespace_selector": opt_in,
            "excluded_namespaces": ns.exclude,
            "labels": self.lbl,
            "annotations": annotations,
            **target,
        }
        out = [
            mutating_webhook_configuration(
                self.release,
                failure_policy="Ignore",
                reinvocation_policy="IfNeeded",
                # Admission may create the pull secret in the pod's namespace; never on dry runs.
                side_effects="NoneOnDryRun",
                timeout_seconds=_clamp(math.ceil(config.verify_timeout) + 3, 5, 30),
                **common,
            )
        ]
        if config.scan is not None:
            out.append(
                validating_webhook_configuration(
                    self.release,
                    failure_policy=self.d.failure_policy,
                    # A denial is posted as an Event (core.events); never on dry runs.
                    side_effects="NoneOnDryRun" if config.events else "None",
                    timeout_seconds=_clamp(math.ceil(config.scan.admission_budget) + 5, 10, 30),
                    **common,
                )
            )
        return out


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _url_host(url: str | None) -> str | None:
    return urlsplit(url).hostname if url else None


def alert_rule_groups() -> list[dict[str, Any]] | None:
    """The groups of ``deploy/monitoring/mirrorgate.rules.yml`` (shipped as package data)."""
    ref = resources.files("mirrorgate.deploy").joinpath("monitoring/mirrorgate.rules.yml")
    if not ref.is_file():
        return None
    groups = yaml.safe_load(ref.read_text(encoding="utf-8")).get("groups")
    return groups if isinstance(groups, list) else None


def namespace(name: str, release: str) -> dict[str, Any]:
    # kubernetes.io/metadata.name is what the webhook configurations exclude by; 1.21+ sets it
    # on every namespace, and 1.20 needs it set to match.
    lbl = {**labels(release, "namespace"), METADATA_NAME: name}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, lbl)}


def events_url(config: DeployConfig, *, webhook_url: str | None) -> str:
    d = deploy_settings(config)
    if webhook_url:
        return webhook_url.rstrip("/") + "/events/registry"
    return f"https://{service_host(d.name, d.namespace)}:{SERVICE_PORT}/events/registry"


def render(
    config: DeployConfig,
    material: Material,
    *,
    capabilities: Capabilities = DEFAULT_CAPABILITIES,
    webhook_url: str | None = None,
) -> Rendered:
    """Every object for ``config``, in apply order, and notes on what was skipped."""
    d = deploy_settings(config)
    objects: list[dict[str, Any]] = []
    notes: list[str] = []
    spaces = [d.namespace]
    if config.registry is not None and config.registry.namespace not in spaces:
        spaces.append(config.registry.namespace)
    objects += [namespace(ns, d.name) for ns in spaces]
    if config.registry is not None:
        reg = _Registry(
            config, material, capabilities, events_url=events_url(config, webhook_url=webhook_url)
        )
        objects += reg.objects()
    else:
        notes.append("no registry section: only the webhook is installed")
    hook_objects, hook_notes = _Webhook(
        config, material, capabilities, webhook_url=webhook_url
    ).objects()
    objects += hook_objects
    notes += hook_notes
    for obj in objects:
        if obj["apiVersion"] is None:
            raise RenderError(f"the API server serves no version of {obj['kind']}")
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    # Independent copies: builders share label and probe dicts between objects.
    objects = sorted((copy.deepcopy(o) for o in objects), key=lambda o: rank[o["kind"]])
    return Rendered(objects=tuple(objects), notes=tuple(notes))


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj["kind"], meta.get("namespace") or "", meta["name"])


def describe(obj: Mapping[str, Any]) -> str:
    kind, ns, name = object_key(obj)
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"
