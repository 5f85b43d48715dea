"""The only place the server calls the Kubernetes API.

Owns client construction (in-cluster service account, else ``$KUBECONFIG``, else
``~/.kube/config``) and async wrappers that never block the event loop: the ``kubernetes`` client
is synchronous, so every call runs in a worker thread (``asyncio.to_thread``) and every watch runs
in a thread of its own that feeds an ``asyncio.Queue`` through ``loop.call_soon_threadsafe``.

Objects travel as plain JSON dicts, exactly as the API server sends them: the decisions made on
them are pure functions elsewhere, and the generated model classes would only add a conversion.
A watch behaves like client-go's reflector: list (paged), emit the whole set, watch from the list's
resourceVersion, re-watch from the last seen version when the server closes the stream, relist on
``410 Gone``, and back off exponentially on errors. Nothing here logs object contents: Secrets
pass through this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("kube")

DEFAULT_KUBECONFIG = "~/.kube/config"
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
LIST_PAGE_SIZE = 500
# The API server ends a watch after timeoutSeconds; client-go picks 5-10 minutes at random so that
# replicas don't all re-watch at once.
WATCH_TIMEOUT_RANGE = (300, 600)
WATCH_BACKOFF_INITIAL = 0.5
WATCH_BACKOFF_MAX = 30.0


class KubeConfigError(RuntimeError):
    """No usable API server configuration: not in a cluster and no readable kubeconfig."""


class KubeError(Exception):
    """An API call failed: ``status`` is the HTTP status, 0 when no answer arrived."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")

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


def load_api_client() -> kubernetes.client.ApiClient:
    """A new ApiClient: in-cluster config, else ``$KUBECONFIG``, else ``~/.kube/config``.

    Never touches the kubernetes package's global default configuration.
    """
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except ConfigException as in_cluster:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser(DEFAULT_KUBECONFIG)
        try:
            kubernetes.config.load_kube_config(
                config_file=path, client_configuration=config, persist_config=False
            )
        except (ConfigException, OSError, ValueError) as err:
            raise KubeConfigError(
                f"no Kubernetes API access: not in a cluster ({in_cluster}) and kubeconfig "
                f"{path} is unusable ({err})"
            ) from err
    # Watches each hold a connection for minutes; calls must not queue behind them.
    config.connection_pool_maxsize = 32
    return kubernetes.client.ApiClient(configuration=config)


def _path(*segments: str) -> str:
    return "/" + "/".join(urllib.parse.quote(s, safe="") for s in segments)


def secret_path(namespace: str, name: str | None = None) -> str:
    parts = ["api", "v1", "namespaces", namespace, "secrets"]
    return _path(*parts, name) if name else _path(*parts)


def lease_path(namespace: str, name: str | None = None) -> str:
    parts = ["apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases"]
    return _path(*parts, name) if name else _path(*parts)


def service_account_path(namespace: str, name: str) -> str:
    return _path("api", "v1", "namespaces", namespace, "serviceaccounts", name)


class Kube:
    """Async access to the API server through one ``ApiClient``; objects are JSON dicts."""

    def __init__(
        self, api: kubernetes.client.ApiClient, *, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self.api = api
        self.timeout = timeout

    # plain calls -----------------------------------------------------------------------------
    async def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call in a worker thread; the decoded answer, or KubeError."""
        return await asyncio.to_thread(
            self._call, method, path, query=query, body=body, content_type=content_type
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        response = self._send(
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
        return json.loads(data) if data else None

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None,
        body: Any,
        content_type: str,
        timeout: tuple[float, float],
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            return self.api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=timeout
            )
        except ApiException as err:
            raise KubeError(err.status or 0, str(err.reason or "error")) from err
        except urllib3.exceptions.HTTPError as err:
            raise KubeError(0, "network", str(err)) from err

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None when it does not exist."""
        try:
            return await self.call("GET", path)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call("POST", path, body=body)

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT; ``metadata.resourceVersion`` in ``body`` makes it fail with 409 if stale."""
        return await self.call("PUT", path, body=body)

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str, *, resource_version: str | None = None) -> None:
        """DELETE; with ``resource_version`` only that version is deleted (else 409)."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if resource_version:
            body["preconditions"] = {"resourceVersion": resource_version}
        await self.call("DELETE", path, body=body)

    # watches ---------------------------------------------------------------------------------
    def watch(
        self,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> Watch:
        """List and watch the collection at ``path`` (``query``: fieldSelector, labelSelector)."""
        return Watch(self, path, query=dict(query or {}), on_restart=on_restart)

    def close(self) -> None:
        self.api.close()


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
        kube: Kube,
        path: str,
        *,
        query: dict[str, str],
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.kube = kube
        self.path = path
        self.query = query
        self.on_restart = on_restart
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
        delay = WATCH_BACKOFF_INITIAL
        while not self._stop.is_set():
            try:
                if version is None:
                    items, version = self._list()
                    self._emit(WatchEvent("RELIST", objects=tuple(items)))
                version = self._stream(version)
                delay = WATCH_BACKOFF_INITIAL
            except _GoneError:
                version = None
                self._restarted("gone")
            except Exception as err:  # noqa: BLE001 - a watch must survive anything and retry
                if self._stop.is_set():
                    break
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
                self._stop.wait(delay * random.uniform(1.0, 1.2))
                delay = min(delay * 2, WATCH_BACKOFF_MAX)

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = {**self.query, "limit": str(LIST_PAGE_SIZE)}
            if token:
                query["continue"] = token
            try:
                page = self.kube._call("GET", self.path, query=query)
            except KubeError as err:
                if err.status == 410:
                    raise _GoneError() from err
                raise
            items.extend(page.get("items") or [])
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
        response = self.kube._send(
            "GET",
            self.path,
            query=query,
            body=None,
            content_type="application/json",
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
            self._emit(WatchEvent(kind, obj=obj))
        return new_version
