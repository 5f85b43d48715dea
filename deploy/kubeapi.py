"""The deployer's line to the API server: kubeconfig, discovery, server-side apply, list, delete.

Synchronous (a CLI), JSON dicts in and out, through the ``kubernetes`` package's ApiClient so that
every kubeconfig auth method works. Server-side apply is a PATCH with
``application/apply-patch+yaml`` (JSON is YAML), ``fieldManager=mirrorgate&force=true``. Error
messages carry the API server's status and message, never a request body (Secrets pass here).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

FIELD_MANAGER = "mirrorgate"
TIMEOUT = (5.0, 30.0)
PLURALS = {
    "Namespace": "namespaces",
    "Secret": "secrets",
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Service": "services",
    "Pod": "pods",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "CronJob": "cronjobs",
    "Ingress": "ingresses",
    "ServiceMonitor": "servicemonitors",
    "PrometheusRule": "prometheusrules",
    "Issuer": "issuers",
    "Certificate": "certificates",
    "MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
    "ValidatingWebhookConfiguration": "validatingwebhookconfigurations",
}
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)


class KubeAPIError(Exception):
    """An API call failed: ``status`` (0 for network errors), ``reason`` and the server's
    message."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"HTTP {status} {reason}: {message}" if message else f"{status} {reason}")

    @classmethod
    def from_body(cls, status: int, body: bytes | str | None) -> KubeAPIError:
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        return cls(status, str(doc.get("reason") or "Error"), str(doc.get("message") or ""))


class KubeConfigError(Exception):
    """No usable kubeconfig."""


def base_path(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def collection_path(api_version: str, kind: str, namespace: str | None = None) -> str:
    ns = f"/namespaces/{namespace}" if namespace and kind not in CLUSTER_SCOPED else ""
    return f"{base_path(api_version)}{ns}/{PLURALS[kind]}"


def object_path(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    name = urllib.parse.quote(meta["name"], safe="")
    return f"{collection_path(obj['apiVersion'], obj['kind'], meta.get('namespace'))}/{name}"


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, *, context: str | None = None) -> Kube:
        """``path``, else ``$KUBECONFIG``, else ``~/.kube/config``; in a pod, its account."""
        config = kubernetes.client.Configuration()
        chosen = path or os.environ.get("KUBECONFIG")
        try:
            if chosen is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                kubernetes.config.load_incluster_config(client_configuration=config)
            else:
                chosen = os.path.expanduser(chosen or "~/.kube/config")
                kubernetes.config.load_kube_config(
                    config_file=chosen,
                    context=context,
                    client_configuration=config,
                    persist_config=False,
                )
        except (ConfigException, OSError, ValueError, TypeError) as err:
            raise KubeConfigError(f"kubeconfig {chosen}: unusable ({err})") from err
        return cls(kubernetes.client.ApiClient(configuration=config))

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # plain calls -------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[Any, dict[str, str]]:
        """(decoded body, response headers), or KubeAPIError."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = list(query.items() if isinstance(query, Mapping) else (query or []))
        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=TIMEOUT
            )
            data = response.read()
        except ApiException as err:
            raise KubeAPIError.from_body(err.status or 0, err.body) from err
        except urllib3.exceptions.HTTPError as err:
            raise KubeAPIError(0, "network", str(err)) from err
        if not 200 <= response.status < 300:
            raise KubeAPIError.from_body(response.status, data)
        return (json.loads(data) if data else None), dict(response.getheaders() or {})

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)[0]
        except KubeAPIError as err:
            if err.status == 404:
                return None
            raise

    def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PUT", path, body=dict(body))[0]

    def apply(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply ``obj`` as field manager ``mirrorgate`` (forcing conflicts)."""
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        return self.request(
            "PATCH",
            object_path(obj),
            query=query,
            body=dict(obj),
            content_type="application/apply-patch+yaml",
        )[0]

    def delete(self, path: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            self.request("DELETE", path, query={"propagationPolicy": "Background"})
        except KubeAPIError as err:
            if err.status == 404:
                return False
            raise
        return True

    def list(self, path: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        doc = self.request("GET", path, query=query)[0] or {}
        return list(doc.get("items") or [])

    # discovery -----------------------------------------------------------------------------------
    def version(self) -> tuple[int, int, str]:
        doc = self.request("GET", "/version")[0] or {}
        major = int("".join(c for c in str(doc.get("major", "1")) if c.isdigit()) or 1)
        minor = int("".join(c for c in str(doc.get("minor", "0")) if c.isdigit()) or 0)
        return major, minor, str(doc.get("gitVersion", f"v{major}.{minor}"))

    def served_kinds(self, api_versions: Iterable[str]) -> set[str]:
        """``"<apiVersion>/<Kind>"`` for every kind the server serves in ``api_versions``."""
        out: set[str] = set()
        for api_version in dict.fromkeys(api_versions):
            doc = self.get(base_path(api_version))
            for resource in (doc or {}).get("resources") or []:
                if "/" not in resource.get("name", ""):  # not a subresource
                    out.add(f"{api_version}/{resource.get('kind')}")
        return out


class AsyncKube:
    """``get``/``replace`` as coroutines (what certs.rotation.CertRenewer expects)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def get(self, path: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.kube.get, path)

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.kube.replace, path, body)
