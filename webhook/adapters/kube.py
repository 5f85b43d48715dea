"""The one way mirrorgate talks to the Kubernetes API: serve, the deployer and cert renewal alike.

Owns client construction (``load_api_client``: a kubeconfig or the pod's service account), the
API paths of the kinds mirrorgate touches, one error type (``KubeError``) and two faces of the
same client:

- ``SyncKube``: blocking calls for the deployer (a CLI) and for the threads below; get, create,
  replace, merge patch, server-side apply, delete, list, discovery.
- ``Kube``: the server's coroutines over a ``SyncKube``. The ``kubernetes`` client is
  synchronous, so every call runs in a worker thread (``asyncio.to_thread``) and every watch in a
  thread of its own that feeds an ``asyncio.Queue`` through ``loop.call_soon_threadsafe``: nothing
  here blocks the event loop.

Objects travel as plain JSON dicts, exactly as the API server sends them: the decisions made on
them are pure functions elsewhere, and the generated model classes would only add a conversion.
A watch behaves like client-go's reflector: list (paged), emit the whole set, watch from the list's
resourceVersion, re-watch from the last seen version when the server closes the stream, relist on
``410 Gone``, and back off exponentially on errors. Plain calls are not retried here: the callers
are loops that retry on their own schedule (a leader's retry period, a reconciler's back-off) or a
user at a CLI. Nothing here logs object contents or request bodies: Secrets pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from mirrorgate.webhook.infra.backoff import Backoff
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("kube")

DEFAULT_KUBECONFIG = "~/.kube/config"
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
LIST_PAGE_SIZE = 500
FIELD_MANAGER = "mirrorgate"
# The API server ends a watch after timeoutSeconds; client-go picks 5-10 minutes at random so that
# replicas don't all re-watch at once.
WATCH_TIMEOUT_RANGE = (300, 600)
WATCH_BACKOFF_INITIAL = 0.5
WATCH_BACKOFF_MAX = 30.0

PLURALS = {
    "Namespace": "namespaces",
    "Secret": "secrets",
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Service": "services",
    "Pod": "pods",
    "Event": "events",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "CronJob": "cronjobs",
    "Ingress": "ingresses",
    "Lease": "leases",
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


class KubeConfigError(RuntimeError):
    """No usable API server configuration: not in a cluster and no readable kubeconfig."""


class KubeError(Exception):
    """An API call failed: ``status`` is the HTTP status, 0 when no answer arrived; ``reason``
    and ``message`` come from the server's ``Status`` (never from the request)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        head = f"HTTP {status} {reason}".rstrip() if status else f"{reason or 'network'} error"
        super().__init__(f"{head}: {message}" if message else head)

    @classmethod
    def from_body(cls, status: int, body: bytes | str | None) -> KubeError:
        """From an error answer; a ``Status`` object gives the reason and message."""
        try:
            doc = json.loads(body or b"")
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("kind") == "Status":
            return cls(status, str(doc.get("reason") or ""), str(doc.get("message") or ""))
        return cls(status, "")


def load_api_client(
    kubeconfig: str | None = None,
    *,
    context: str | None = None,
    in_cluster_first: bool = True,
) -> kubernetes.client.ApiClient:
    """A new ApiClient, never touching the kubernetes package's global configuration.

    ``serve``'s order (``in_cluster_first``): the pod's service account, else ``$KUBECONFIG``,
    else ``~/.kube/config``. The deployer's: ``kubeconfig``, else ``$KUBECONFIG``, else the pod's
    service account when running in one, else ``~/.kube/config``.
    """
    config = kubernetes.client.Configuration()
    chosen = kubeconfig or os.environ.get("KUBECONFIG")
    in_cluster_error: Exception | None = None
    if in_cluster_first or (not chosen and os.environ.get("KUBERNETES_SERVICE_HOST")):
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
            return _client(config)
        except ConfigException as err:
            in_cluster_error = err
    path = os.path.expanduser(chosen or DEFAULT_KUBECONFIG)
    try:
        kubernetes.config.load_kube_config(
            config_file=path, context=context, client_configuration=config, persist_config=False
        )
    except (ConfigException, OSError, ValueError, TypeError) as err:
        if in_cluster_first:
            raise KubeConfigError(
                f"no Kubernetes API access: not in a cluster ({in_cluster_error}) and kubeconfig "
                f"{path} is unusable ({err})"
            ) from err
        raise KubeConfigError(f"kubeconfig {path}: unusable ({err})") from err
    return _client(config)


def _client(config: kubernetes.client.Configuration) -> kubernetes.client.ApiClient:
    # Watches each hold a connection for minutes; calls must not queue behind them.
    config.connection_pool_maxsize = 32
    return kubernetes.client.ApiClient(configuration=config)


# --- paths ----------------------------------------------------------------------------------------
def _path(*segments: str) -> str:
    return "/" + "/".join(urllib.parse.quote(s, safe="") for s in segments)


def base_path(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def collection_path(api_version: str, kind: str, namespace: str | None = None) -> str:
    """Where objects of ``kind`` live: in ``namespace`` unless the kind is cluster-scoped."""
    ns = _path("namespaces", namespace) if namespace and kind not in CLUSTER_SCOPED else ""
    return f"{base_path(api_version)}{ns}/{PLURALS[kind]}"


def resource_path(api_version: str, kind: str, name: str, *, namespace: str | None = None) -> str:
    return collection_path(api_version, kind, namespace) + _path(name)


def object_path(obj: Mapping[str, Any]) -> str:
    """The path of a manifest (``apiVersion``, ``kind``, ``metadata.name/namespace``)."""
    meta = obj["metadata"]
    return resource_path(
        obj["apiVersion"], obj["kind"], meta["name"], namespace=meta.get("namespace")
    )


def secret_path(namespace: str, name: str | None = None) -> str:
    path = collection_path("v1", "Secret", namespace)
    return path + _path(name) if name else path


def lease_path(namespace: str, name: str | None = None) -> str:
    path = collection_path("coordination.k8s.io/v1", "Lease", namespace)
    return path + _path(name) if name else path


def service_account_path(namespace: str, name: str) -> str:
    return resource_path("v1", "ServiceAccount", name, namespace=namespace)


# --- blocking calls -------------------------------------------------------------------------------
Query = Mapping[str, str] | Iterable[tuple[str, str]] | None


class SyncKube:
    """Blocking access to the API server through one ``ApiClient``; objects are JSON dicts."""

    def __init__(
        self, api: kubernetes.client.ApiClient, *, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self.api = api
        self.timeout = timeout

    @classmethod
    def from_kubeconfig(
        cls, path: str | None = None, *, context: str | None = None, timeout: float = 30.0
    ) -> SyncKube:
        """``path``, else ``$KUBECONFIG``, else ``~/.kube/config``; in a pod, its account."""
        client = load_api_client(path, context=context, in_cluster_first=False)
        return cls(client, timeout=timeout)

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> SyncKube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call: the decoded answer, or KubeError."""
        return self.exchange(method, path, query=query, body=body, content_type=content_type)[0]

    def exchange(
        self,
        method: str,
        path: str,
        *,
        query: Query = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[Any, dict[str, str]]:
        """One API call: the decoded answer and the response headers (``Warning`` carries what
        admission webhooks told the client), or KubeError."""
        response = self.open(
            method,
            path,
            query=query,
            body=body,
            content_type=content_type,
            timeout=(CONNECT_TIMEOUT, self.timeout),
        )
        try:
            data = response.read()
        except urllib3.exceptions.HTTPError as err:
            raise KubeError(0, "network", str(err)) from err
        if not 200 <= response.status < 300:
            raise KubeError.from_body(response.status, data)
        return (json.loads(data) if data else None), dict(response.getheaders() or {})

    def open(
        self,
        method: str,
        path: str,
        *,
        query: Query = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: tuple[float, float],
    ) -> Any:
        """The raw response of one call, unread (watches stream it); KubeError when none came."""
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
            return self.api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=timeout
            )
        except ApiException as err:
            status = err.status or 0
            found = KubeError.from_body(status, err.body)
            raise KubeError(status, found.reason or str(err.reason or ""), found.message) from err
        except urllib3.exceptions.HTTPError as err:
            raise KubeError(0, "network", str(err)) from err

    def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None when it does not exist."""
        try:
            return _object(self.request("GET", path), path)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return _object(self.request("POST", path, body=dict(body)), path)

    def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT; ``metadata.resourceVersion`` in ``body`` makes it fail with 409 if stale."""
        return _object(self.request("PUT", path, body=dict(body)), path)

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return _object(
            self.request(
                "PATCH", path, body=dict(patch), content_type="application/merge-patch+json"
            ),
            path,
        )

    def apply(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply ``obj`` as field manager ``mirrorgate`` (forcing conflicts): a PATCH
        with ``application/apply-patch+yaml`` (JSON is YAML)."""
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        path = object_path(obj)
        return _object(
            self.request(
                "PATCH",
                path,
                query=query,
                body=dict(obj),
                content_type="application/apply-patch+yaml",
            ),
            path,
        )

    def delete(
        self, path: str, *, resource_version: str | None = None, background: bool = False
    ) -> bool:
        """DELETE; False when it was already gone. With ``resource_version`` only that version
        is deleted (else 409); ``background``: dependents are deleted after the object."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if resource_version:
            body["preconditions"] = {"resourceVersion": resource_version}
        if background:
            body["propagationPolicy"] = "Background"
        try:
            self.request("DELETE", path, body=body)
        except KubeError as err:
            if err.status == 404:
                return False
            raise
        return True

    def list(self, path: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        doc = self.request("GET", path, query=query) or {}
        return list(doc.get("items") or [])

    def version(self) -> tuple[int, int, str]:
        doc = self.request("GET", "/version") or {}
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


def _object(doc: Any, path: str) -> dict[str, Any]:
    """An answer that must be one object: anything else is the server's (or a proxy's) fault."""
    if not isinstance(doc, dict):
        raise KubeError(0, "unexpected answer", f"{path}: expected a JSON object")
    return doc


# --- the server's coroutines --------------------------------------------------------------------
class Kube:
    """Async access for the server: each call runs ``SyncKube`` in a worker thread."""

    def __init__(
        self, api: kubernetes.client.ApiClient | SyncKube, *, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self.sync = api if isinstance(api, SyncKube) else SyncKube(api, timeout=timeout)

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None when it does not exist."""
        return await asyncio.to_thread(self.sync.get, path)

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.create, path, body)

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT; ``metadata.resourceVersion`` in ``body`` makes it fail with 409 if stale."""
        return await asyncio.to_thread(self.sync.replace, path, body)

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.merge_patch, path, patch)

    async def delete(self, path: str, *, resource_version: str | None = None) -> bool:
        """DELETE; with ``resource_version`` only that version is deleted (else 409)."""
        return await asyncio.to_thread(self.sync.delete, path, resource_version=resource_version)

    def watch(
        self,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        on_restart: Callable[[str], None] | None = None,
        project: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> Watch:
        """List and watch the collection at ``path`` (``query``: fieldSelector, labelSelector).

        ``project`` keeps only what the caller needs of each object, page by page as it is
        listed and event by event, so a watch of 20,000 pods never holds 20,000 whole pods.
        """
        return Watch(
            self.sync, path, query=dict(query or {}), on_restart=on_restart, project=project
        )

    def close(self) -> None:
        self.sync.close()


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """``RELIST``: ``objects`` is the complete current set (replace what you had); otherwise
    ``ADDED``, ``MODIFIED`` or ``DELETED`` of ``obj``."""

    type: str
    obj: dict[str, Any] = field(default_factory=dict)
    objects: tuple[dict[str, Any], ...] = ()


class _GoneError(Exception):
    """The resourceVersion to watch from is too old (410): list again."""


class Watch:
    """One list+watch loop in a daemon thread; ``async for event in watch`` reads it."""

    def __init__(
        self,
        kube: SyncKube,
        path: str,
        *,
        query: dict[str, str],
        on_restart: Callable[[str], None] | None = None,
        project: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.kube = kube
        self.path = path
        self.query = query
        self.on_restart = on_restart
        self.project = project
        self._queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._response: Any = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Watch:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"watch {self.path}", daemon=True)
        self._thread.start()
        return self

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._thread is None:
            self.start()
        return await self._queue.get()

    async def close(self) -> None:
        """Stop the thread: end the stream it is reading and wait briefly for it."""
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            # Wakes the thread's blocking read; it may already have released the connection.
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                response.shutdown()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)

    # the thread ------------------------------------------------------------------------------
    def _emit(self, event: WatchEvent) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            # The loop is closed: nobody is listening any more.
            self._stop.set()

    def _restarted(self, reason: str) -> None:
        if self.on_restart is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_restart, reason)
            except RuntimeError:
                self._stop.set()

    def _run(self) -> None:
        version: str | None = None
        backoff = Backoff(WATCH_BACKOFF_INITIAL, WATCH_BACKOFF_MAX)
        while not self._stop.is_set():
            try:
                if version is None:
                    items, version = self._list()
                    self._emit(WatchEvent("RELIST", objects=tuple(items)))
                version = self._stream(version)
                backoff.reset()
            except _GoneError:
                version = None
                self._restarted("gone")
            except Exception as err:  # noqa: BLE001 - a watch must survive anything and retry
                if self._stop.is_set():
                    break
                delay = backoff.next()
                status = err.status if isinstance(err, KubeError) else None
                log.warning(
                    "watch failed; retrying",
                    extra={
                        "fields": {
                            "path": self.path,
                            "status": status,
                            "error": str(err)[:300],
                            "retry_in_s": round(delay, 2),
                        }
                    },
                )
                self._restarted("error")
                self._stop.wait(delay)

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = {**self.query, "limit": str(LIST_PAGE_SIZE)}
            if token:
                query["continue"] = token
            try:
                page = self.kube.request("GET", self.path, query=query)
            except KubeError as err:
                if err.status == 410:
                    raise _GoneError() from err
                raise
            found = page.get("items") or []
            items.extend(map(self.project, found) if self.project is not None else found)
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def _stream(self, version: str) -> str:
        """Watch from ``version`` until the server ends the stream; the last version seen."""
        low, high = WATCH_TIMEOUT_RANGE
        timeout = random.randint(low, high)
        query = {
            **self.query,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout),
        }
        response = self.kube.open(
            "GET",
            self.path,
            query=query,
            # A connection that died without a FIN must not hang the watch forever.
            timeout=(CONNECT_TIMEOUT, timeout + 30.0),
        )
        if response.status == 410:
            response.read()
            raise _GoneError()
        if response.status != 200:
            raise KubeError.from_body(response.status, response.read())
        raw = response.response
        with self._lock:
            self._response = raw
        finished = False
        try:
            if self._stop.is_set():
                return version
            buffer = b""
            for chunk in raw.stream(64 * 1024, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        version = self._handle(json.loads(line), version)
                if self._stop.is_set():
                    return version
            finished = True
            return version
        except (urllib3.exceptions.HTTPError, OSError) as err:
            if self._stop.is_set():
                return version
            raise KubeError(0, "network", str(err)) from err
        finally:
            with self._lock:
                self._response = None
            # Only a stream the server ended cleanly leaves a connection worth reusing.
            if finished:
                raw.release_conn()
            else:
                raw.close()

    def _handle(self, event: dict[str, Any], version: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                raise _GoneError()
            raise KubeError(code, str(obj.get("reason") or ""), str(obj.get("message") or ""))
        new_version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._emit(WatchEvent(kind, obj=self.project(obj) if self.project is not None else obj))
        return new_version
