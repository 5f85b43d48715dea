"""Registry HTTP API v2 client: auth challenges, digest resolution, manifests, blob copies.

What the webhook asks a registry ("can the mirror serve this?", "which digest is this tag?") must be
cheap and bounded: every call has a timeout, requests share a concurrency limit, answers are cached
(positive and negative answers with their own TTLs) and concurrent identical questions share one
request (single-flight), so a burst of admissions of the same image costs one registry round trip.

Facts this code is shaped by (distribution 2.8, see CONTRACTS.md): manifest requests must accept all
four manifest media types, or OCI content answers 404 and Docker v2 content is converted to schema1
with another digest; ``Docker-Content-Digest`` of a multi-arch tag is the index digest; auth is
anonymous, Basic, or a Bearer token obtained from the realm named in ``WWW-Authenticate``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import hashlib
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from cachetools import LRUCache

from mirrorgate.webhook.core.config import RegistryAccess, RegistryClientSettings
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("registry")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_V2)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)
# Docker Hub's API does not live at its reference domain.
API_HOSTS = {"docker.io": "registry-1.docker.io"}
DEFAULT_TOKEN_TTL = 60.0  # the token spec's default when expires_in is absent
TOKEN_MARGIN = 10.0  # renew a little early: a token that expires in flight costs a retry
# Bounds on what pods can make the client remember: registries seen (the gate resolves any
# image's registry) and tokens (one per registry and repository scope).
MAX_HOSTS = 1024
MAX_TOKENS = 4096
FAILURE_LOG_INTERVAL = 60.0

ErrorKind = Literal["auth", "not_found", "network", "timeout", "tls", "server", "protocol"]
# Failures that say the registry itself is unreachable, not that one image is missing.
HOST_FAILURES = frozenset({"network", "timeout", "tls"})


class RegistryError(Exception):
    """A registry call failed; ``kind`` is bounded (for metrics), the message says what to check."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class PlatformManifest:
    digest: str
    media_type: str
    platform: str  # "linux/amd64", "linux/arm64/v8", or "unknown"


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest as the registry answered it. ``body`` is None for a HEAD."""

    digest: str
    media_type: str
    size: int
    body: bytes | None = None
    platforms: tuple[PlatformManifest, ...] = ()

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def json(self) -> dict[str, Any]:
        if self.body is None:
            raise ValueError("a HEAD answer has no body")
        return json.loads(self.body)


@dataclass(slots=True)
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class _WatchedFile:
    """A file re-read when its identity (inode, size, mtime) changes: mounted Secrets are swapped
    by symlink and send no file events."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value: bytes | None = None

    def read(self) -> bytes:
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise RegistryError("auth", f"cannot read {self.path}: {err.strerror or err}") from err
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp or self._value is None:
            try:
                self._value = Path(self.path).read_bytes()
            except OSError as err:
                raise RegistryError("auth", f"cannot read {self.path}: {err.strerror}") from err
            self._stamp = stamp
        return self._value

    @property
    def stamp(self) -> tuple[int, int, int] | None:
        return self._stamp


class _HostAccess:
    """Credentials and TLS trust for one registry host, from the ``registries`` config."""

    def __init__(self, host: str, access: RegistryAccess | None) -> None:
        self.host = host
        self.access = access or RegistryAccess()
        a = self.access
        self._user = _WatchedFile(a.username_file) if a.username_file else None
        self._password = _WatchedFile(a.password_file) if a.password_file else None
        self._docker_config = _WatchedFile(a.docker_config_file) if a.docker_config_file else None
        self._ca = _WatchedFile(a.ca_file) if a.ca_file else None
        self._ssl: ssl.SSLContext | None = None
        self._ssl_stamp: tuple[int, int, int] | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.access.plain_http else "https"

    def credentials(self) -> tuple[str, str] | None:
        if self._user and self._password:
            user = self._user.read().decode().strip()
            password = self._password.read().decode().strip()
            return (user, password) if user else None
        if self._docker_config:
            return _docker_config_credentials(
                self._docker_config.read(), self.host, source=self._docker_config.path
            )
        return None

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.access.plain_http:
            return False
        if self._ca is None:
            return True  # aiohttp's default: system trust store, hostname checked
        pem = self._ca.read()
        if self._ssl is None or self._ca.stamp != self._ssl_stamp:
            ctx = ssl.create_default_context()
            try:
                ctx.load_verify_locations(cadata=pem.decode())
            except (ssl.SSLError, ValueError) as err:
                raise RegistryError(
                    "tls", f"caFile {self._ca.path} holds no usable PEM certificate for {self.host}"
                ) from err
            self._ssl, self._ssl_stamp = ctx, self._ca.stamp
        return self._ssl


def _docker_config_credentials(raw: bytes, host: str, *, source: str) -> tuple[str, str] | None:
    """Credentials for ``host`` from a ``.dockerconfigjson`` (keys may carry a scheme or path)."""
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise RegistryError("auth", f"{source} is not valid JSON") from err
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise RegistryError("auth", f"{source} has no 'auths' object")
    for key, entry in auths.items():
        k = re.sub(r"^https?://", "", str(key)).split("/", 1)[0]
        if k != host and not (
            host == "docker.io" and k in ("index.docker.io", "registry-1.docker.io")
        ):
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("username") and entry.get("password"):
            return str(entry["username"]), str(entry["password"])
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as err:
                raise RegistryError(
                    "auth", f"{source}: the auth entry for {host} is not base64 of user:password"
                ) from err
            return user, password
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


@dataclass(slots=True, eq=False)
class _Inflight:
    """One registry fetch, shared by every admission that asked for the same answer."""

    task: asyncio.Future[Any] = field(init=False)
    waiters: int = 0
    # It holds (or held) a connection slot: let it finish, its answer is worth caching.
    started: bool = False


_FILL: contextvars.ContextVar[_Inflight | None] = contextvars.ContextVar(
    "mirrorgate_registry_fill", default=None
)


class _FailureLog:
    """One warning per registry and kind of failure per interval, with how many it stands for:
    a failing registry must not turn every abandoned check into an error line."""

    def __init__(self, clock: Callable[[], float], *, interval: float = FAILURE_LOG_INTERVAL):
        self._clock = clock
        self.interval = interval
        self._last: LRUCache[tuple[str, str], list[float]] = LRUCache(MAX_HOSTS)

    def note(self, host: str, err: RegistryError) -> None:
        if err.kind == "not_found":
            return  # an answer (the mirror does not have it), not a failure
        key = (host, err.kind)
        now = self._clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return
        log.warning(
            "registry calls failing",
            extra={
                "fields": {
                    "registry": host[:255],
                    "kind": err.kind,
                    "error": str(err)[:300],
                    "also_failed": int(seen[1]) if seen else 0,
                    "interval_s": self.interval,
                }
            },
        )
        self._last[key] = [now, 0]


@dataclass(slots=True)
class _CacheEntry:
    expires: float
    value: Any
    error: RegistryError | None = None


@dataclass
class CacheSettings:
    positive_ttl: float = 60.0
    negative_ttl: float = 10.0
    max_entries: int = 10_000


@dataclass
class ClientStats:
    """Counters the metrics module exports and the tests read."""

    requests: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0

    def count(self, operation: str) -> None:
        self.requests[operation] = self.requests.get(operation, 0) + 1


class RegistryClient:
    """One client per process; share it. ``close()`` (or ``async with``) releases the session."""

    def __init__(
        self,
        registries: Mapping[str, RegistryAccess] | None = None,
        *,
        timeout: float = 5.0,
        max_concurrency: int = 32,
        cache: CacheSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_request: Callable[[str, float, str | None], None] | None = None,
    ) -> None:
        self._access_config = dict(registries or {})
        self._hosts: LRUCache[str, _HostAccess] = LRUCache(MAX_HOSTS)
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        # One queue per registry: a registry that hangs fills its own slots, never another's.
        # Hosts, schemes and tokens are keyed by what pods name (the gate resolves any image's
        # registry), so they are bounded like the answers.
        self._limits: LRUCache[str, asyncio.Semaphore] = LRUCache(MAX_HOSTS)
        self.cache_settings = cache or CacheSettings()
        self._cache: LRUCache[tuple[str, ...], _CacheEntry] = LRUCache(
            self.cache_settings.max_entries
        )
        self._inflight: dict[tuple[str, ...], _Inflight] = {}
        self._tokens: LRUCache[tuple[str, str], tuple[str, float]] = LRUCache(MAX_TOKENS)
        # host -> "basic" | "bearer" | "none", learned
        self._schemes: LRUCache[str, str] = LRUCache(MAX_HOSTS)
        self._failures = _FailureLog(clock)
        # host -> (until, error): manifest requests that could not reach it (HOST_FAILURES). A
        # plain dict, bounded by hand: every admission's mirror check looks here, nearly always
        # at an empty one.
        self._unreachable: dict[str, tuple[float, RegistryError]] = {}
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._on_request = on_request
        self.stats = ClientStats()

    @classmethod
    def from_settings(
        cls,
        registries: Mapping[str, RegistryAccess],
        settings: RegistryClientSettings,
        **kwargs: Any,
    ) -> RegistryClient:
        """A client configured by ``registries`` and ``registryClient`` of mirrorgate.yaml."""
        return cls(
            registries,
            timeout=settings.timeout,
            max_concurrency=settings.max_concurrency,
            cache=CacheSettings(settings.positive_ttl, settings.negative_ttl, settings.max_entries),
            **kwargs,
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _host(self, host: str) -> _HostAccess:
        access = self._hosts.get(host)
        if access is None:
            access = self._hosts[host] = _HostAccess(host, self._access_config.get(host))
        return access

    def _base(self, host: str) -> str:
        access = self._host(host)
        if access.access.endpoint:
            return access.access.endpoint
        return f"{access.scheme}://{API_HOSTS.get(host, host)}"

    def blob_url(self, host: str, repository: str, digest: str) -> str:
        return f"{self._base(host)}/v2/{repository}/blobs/{digest}"

    async def authorization(self, host: str, repository: str) -> str | None:
        """The Authorization header value that pulls from ``repository`` now, or None.

        Handed to Clair so it can fetch layers itself. A Bearer token is obtained (or reused) for
        the repository's pull scope.
        """
        scope = f"repository:{repository}:pull"
        header = await self._auth_header(host, scope, challenge=None)
        if header is not None:
            return header
        # Not known yet (or a Bearer token for another scope): one ping reveals the challenge.
        reply = await self._request(
            "GET", host, f"/v2/{repository}/tags/list", scope=scope, operation="ping"
        )
        if reply.status not in (200, 401, 404):
            raise _status_error(reply, host, "/v2/")
        return await self._auth_header(host, scope, challenge=None)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Per-request timeouts are set on each call; this is only a backstop.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
                auto_decompress=False,
            )
        return self._session

    # --- cached, single-flight questions --------------------------------------------------------

    async def head_manifest(self, host: str, repository: str, reference: str) -> Manifest:
        """Digest and media type of ``reference`` (a tag or digest), cached and single-flight."""
        key = ("head", host, repository, reference)
        return await self._cached(
            key, lambda: self._fetch_manifest("HEAD", host, repository, reference)
        )

    async def get_manifest(self, host: str, repository: str, reference: str) -> Manifest:
        """The manifest with its body (platforms parsed for an index), cached and single-flight."""
        key = ("get", host, repository, reference)
        return await self._cached(
            key, lambda: self._fetch_manifest("GET", host, repository, reference)
        )

    def cached_manifest(
        self, host: str, repository: str, reference: str, *, op: str = "get"
    ) -> Manifest | None:
        """What ``get_manifest`` (``op="head"``: ``head_manifest``) would answer from the cache
        right now, without waiting: None unless a fresh positive answer is cached."""
        key = (op, host, repository, reference)
        entry = self._cache.get(key)
        if entry is None or entry.error is not None or entry.expires <= self._clock():
            return None
        self.stats.cache_hits += 1
        return entry.value

    def unreachable(self, host: str) -> RegistryError | None:
        """Why ``host`` could not be reached, if a manifest request to it failed that way within
        the negative TTL and none succeeded since; else None. Callers that can go elsewhere
        (the next mirror) skip it instead of waiting on it again."""
        if not self._unreachable:
            return None
        seen = self._unreachable.get(host)
        if seen is None:
            return None
        if seen[0] <= self._clock():
            self._unreachable.pop(host, None)
            return None
        return RegistryError(seen[1].kind, str(seen[1]))

    def forget(self, host: str, repository: str, reference: str) -> None:
        for op in ("head", "get"):
            self._cache.pop((op, host, repository, reference), None)

    async def _cached(self, key: tuple[str, ...], fetch: Callable[[], Awaitable[Any]]) -> Any:
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now:
            self.stats.cache_hits += 1
            if entry.error is not None:
                # A new exception each time: raising the cached one would add this frame to
                # its traceback, and so keep every admission that ever hit it alive.
                raise RegistryError(entry.error.kind, str(entry.error))
            return entry.value
        self.stats.cache_misses += 1
        fill = self._inflight.get(key)
        if fill is None:
            fill = _Inflight()
            fill.task = asyncio.ensure_future(self._fill(key, fetch, fill))
            self._inflight[key] = fill
            fill.task.add_done_callback(functools.partial(self._filled, key, fill))
        fill.waiters += 1
        try:
            # shield: a caller that gives up (admission budget) must not cancel the others'
            # request; one that is already talking to the registry finishes and fills the cache.
            return await asyncio.shield(fill.task)
        finally:
            fill.waiters -= 1
            if fill.waiters == 0 and not fill.started and not fill.task.done():
                # Still queued for a slot of a busy registry and nobody waits for the answer:
                # drop it, or one pod with thousands of images keeps the queue full for minutes.
                self._inflight.pop(key, None)
                fill.task.cancel()

    def _filled(self, key: tuple[str, ...], fill: _Inflight, task: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is fill:
            self._inflight.pop(key)
        if not task.cancelled():
            task.exception()  # retrieved: an answer nobody awaited is cached, not logged as lost

    async def _fill(
        self, key: tuple[str, ...], fetch: Callable[[], Awaitable[Any]], fill: _Inflight
    ) -> Any:
        _FILL.set(fill)  # this task's context only: _slot marks it started
        settings = self.cache_settings
        try:
            value = await fetch()
        except RegistryError as err:
            # The kind and message only: not the traceback and the frames it holds.
            error = RegistryError(err.kind, str(err))
            self._store(key, _CacheEntry(self._clock() + settings.negative_ttl, None, error))
            self._failures.note(key[1], err)
            if err.kind in HOST_FAILURES:
                if len(self._unreachable) >= MAX_HOSTS and key[1] not in self._unreachable:
                    self._unreachable.pop(next(iter(self._unreachable)))
                self._unreachable[key[1]] = (self._clock() + settings.negative_ttl, error)
            raise
        if self._unreachable:
            self._unreachable.pop(key[1], None)
        self._store(key, _CacheEntry(self._clock() + settings.positive_ttl, value))
        if key[0] == "get" and isinstance(value, Manifest) and key[3] != value.digest:
            # Content-addressed: the manifest a tag resolved to is also the one its digest names.
            entry = _CacheEntry(self._clock() + settings.positive_ttl, value)
            self._store((*key[:3], value.digest), entry)
        return value

    def _store(self, key: tuple[str, ...], entry: _CacheEntry) -> None:
        self._cache[key] = entry

    # --- uncached operations -------------------------------------------------------------------

    async def _fetch_manifest(
        self, method: str, host: str, repository: str, reference: str
    ) -> Manifest:
        path = f"/v2/{repository}/manifests/{reference}"
        reply = await self._request(
            method,
            host,
            path,
            scope=f"repository:{repository}:pull",
            headers={"Accept": MANIFEST_ACCEPT},
            operation=f"manifest_{method.lower()}",
        )
        if reply.status != 200:
            raise _status_error(reply, host, path)
        media_type = reply.headers.get("Content-Type", "").split(";")[0].strip()
        digest = reply.headers.get("Docker-Content-Digest", "")
        body = reply.body if method == "GET" else None
        if body is not None:
            computed = "sha256:" + hashlib.sha256(body).hexdigest()
            if digest and digest.startswith("sha256:") and digest != computed:
                raise RegistryError(
                    "protocol",
                    f"{host}{path}: body does not match its Docker-Content-Digest {digest}",
                )
            digest = digest or computed
        if not digest:
            if reference.startswith("sha256:"):
                digest = reference
            else:
                raise RegistryError("protocol", f"{host}{path}: no Docker-Content-Digest header")
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(
                "protocol", f"{host}{path}: unexpected manifest type {media_type or '(none)'}"
            )
        size = int(reply.headers.get("Content-Length") or (len(body) if body else 0))
        platforms: tuple[PlatformManifest, ...] = ()
        if body is not None and media_type in INDEX_TYPES:
            platforms = _platforms(body)
        return Manifest(
            digest=digest, media_type=media_type, size=size, body=body, platforms=platforms
        )

    async def blob_exists(self, host: str, repository: str, digest: str) -> bool:
        path = f"/v2/{repository}/blobs/{digest}"
        reply = await self._request(
            "HEAD", host, path, scope=f"repository:{repository}:pull", operation="blob_head"
        )
        if reply.status == 200:
            return True
        if reply.status == 404:
            return False
        raise _status_error(reply, host, path)

    async def copy_blob(
        self, source: tuple[str, str], target: tuple[str, str], digest: str
    ) -> bool:
        """Stream one blob from ``source`` to ``target`` unless the target has it already.

        Returns True when bytes were copied. The target registry checks the uploaded bytes against
        ``digest`` (distribution answers DIGEST_INVALID otherwise), so nothing corrupt is stored.
        """
        (shost, srepo), (thost, trepo) = source, target
        if await self.blob_exists(thost, trepo, digest):
            return False
        push_scope = f"repository:{trepo}:pull,push"
        finish = await self._start_upload(thost, trepo, digest)

        async with self._open_blob(shost, srepo, digest) as resp:
            try:
                done = await self._request(
                    "PUT",
                    thost,
                    finish,
                    scope=push_scope,
                    data=resp.content.iter_chunked(1 << 20),
                    operation="blob_put",
                    headers={"Content-Type": "application/octet-stream"},
                    absolute_ok=True,
                )
            except (aiohttp.ClientError, OSError) as err:
                raise RegistryError(
                    "network", f"copying {digest} from {shost}: {_short_error(err)}"
                ) from err
        if done.status != 201:
            raise _status_error(done, thost, f"/v2/{trepo}/blobs/uploads/")
        return True

    @contextlib.asynccontextmanager
    async def _open_blob(
        self, host: str, repository: str, digest: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streaming GET of a blob (status 200), answering one auth challenge.

        No HEAD first: a pull-through cache answers a HEAD of an uncached blob by fetching it from
        its upstream, and the GET would fetch it a second time.
        """
        path = f"/v2/{repository}/blobs/{digest}"
        scope = f"repository:{repository}:pull"
        access = self._host(host)
        challenge: str | None = None
        for _attempt in range(2):
            headers = {}
            auth = await self._auth_header(host, scope, challenge=challenge)
            if auth:
                headers["Authorization"] = auth
            self.stats.count("blob_get")
            try:
                async with self.session.get(
                    self._base(host) + path,
                    headers=headers,
                    ssl=access.ssl_context(),
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout),
                ) as resp:
                    if (
                        resp.status == 401
                        and challenge is None
                        and "WWW-Authenticate" in resp.headers
                    ):
                        challenge = resp.headers["WWW-Authenticate"]
                        continue
                    if resp.status != 200:
                        body = await resp.read()
                        raise _status_error(_Reply(resp.status, resp.headers, body), host, path)
                    yield resp
                    return
            except (aiohttp.ClientError, OSError) as err:
                raise RegistryError(
                    "network", f"reading {digest} from {host}: {_short_error(err)}"
                ) from err
        raise RegistryError("auth", f"{host} rejected the configured credentials")

    async def fetch_blob(self, host: str, repository: str, digest: str) -> int:
        """Download a blob and check its digest, discarding the bytes (warms a pull-through cache).

        Returns the number of bytes read.
        """
        algo, _, expected = digest.partition(":")
        hasher = hashlib.new(algo)
        size = 0
        async with self._open_blob(host, repository, digest) as resp:
            try:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    hasher.update(chunk)
                    size += len(chunk)
            except (aiohttp.ClientError, OSError) as err:
                raise RegistryError(
                    "network", f"reading {digest} from {host}: {_short_error(err)}"
                ) from err
        if hasher.hexdigest() != expected:
            raise RegistryError(
                "protocol", f"{host}/v2/{repository}/blobs/{digest}: content does not match"
            )
        return size

    async def _start_upload(self, host: str, repository: str, digest: str) -> str:
        """Open an upload session; returns the URL that a PUT of the bytes completes."""
        path = f"/v2/{repository}/blobs/uploads/"
        start = await self._request(
            "POST",
            host,
            path,
            scope=f"repository:{repository}:pull,push",
            operation="blob_upload",
        )
        if start.status != 202 or "Location" not in start.headers:
            raise _status_error(start, host, path)
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self._base(host) + location
        sep = "&" if "?" in location else "?"
        return f"{location}{sep}digest={digest}"

    async def upload_blob(self, host: str, repository: str, data: bytes) -> str:
        """Monolithic upload of ``data``; returns its digest (a no-op if the blob exists)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if await self.blob_exists(host, repository, digest):
            return digest
        scope = f"repository:{repository}:pull,push"
        finish = await self._start_upload(host, repository, digest)
        done = await self._request(
            "PUT",
            host,
            finish,
            scope=scope,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            operation="blob_put",
            absolute_ok=True,
        )
        if done.status != 201:
            raise _status_error(done, host, f"/v2/{repository}/blobs/uploads/")
        return digest

    async def put_manifest(
        self, host: str, repository: str, reference: str, body: bytes, media_type: str
    ) -> str:
        """Upload manifest bytes unchanged (so the digest is preserved); return the digest."""
        path = f"/v2/{repository}/manifests/{reference}"
        reply = await self._request(
            "PUT",
            host,
            path,
            scope=f"repository:{repository}:pull,push",
            data=body,
            headers={"Content-Type": media_type},
            operation="manifest_put",
        )
        if reply.status != 201:
            raise _status_error(reply, host, path)
        self.forget(host, repository, reference)
        return reply.headers.get("Docker-Content-Digest") or (
            "sha256:" + hashlib.sha256(body).hexdigest()
        )

    # --- transport and auth --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self, host: str) -> AsyncIterator[None]:
        """One of ``max_concurrency`` connections to ``host``; marks a shared fetch as started."""
        limit = self._limits.get(host)
        if limit is None:
            limit = self._limits[host] = asyncio.Semaphore(self.max_concurrency)
        async with limit:
            fill = _FILL.get()
            if fill is not None:
                fill.started = True
            yield

    async def _request(
        self,
        method: str,
        host: str,
        path: str,
        *,
        scope: str | None,
        operation: str,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        absolute_ok: bool = False,
    ) -> _Reply:
        access = self._host(host)
        url = (
            path
            if (absolute_ok and path.startswith(("http://", "https://")))
            else (self._base(host) + path)
        )
        hdrs = dict(headers or {})
        auth = await self._auth_header(host, scope, challenge=None)
        if auth:
            hdrs["Authorization"] = auth
        reply = await self._send(method, url, hdrs, data, access, operation)
        if reply.status == 401 and "WWW-Authenticate" in reply.headers and not _is_stream(data):
            challenge = reply.headers["WWW-Authenticate"]
            auth = await self._auth_header(host, scope, challenge=challenge)
            if auth is None:
                raise RegistryError(
                    "auth",
                    f"{host} requires credentials and none are configured "
                    f"(registries.{host} in mirrorgate.yaml)",
                )
            hdrs["Authorization"] = auth
            reply = await self._send(method, url, hdrs, data, access, operation)
            if reply.status == 401:
                raise RegistryError("auth", f"{host} rejected the configured credentials")
        return reply

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: Any,
        access: _HostAccess,
        operation: str,
    ) -> _Reply:
        started = self._clock()
        error: str | None = None
        self.stats.count(operation)
        try:
            async with (
                self._slot(access.host),
                self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    ssl=access.ssl_context(),
                    timeout=aiohttp.ClientTimeout(
                        total=self.timeout if not _is_stream(data) else None, sock_read=self.timeout
                    ),
                    allow_redirects=True,
                ) as resp,
            ):
                body = await resp.read()
                return _Reply(resp.status, resp.headers, body)
        except TimeoutError as err:
            error = "timeout"
            raise RegistryError(
                "timeout", f"{access.host} did not answer within {self.timeout:g}s"
            ) from err
        except aiohttp.ClientConnectorCertificateError as err:
            error = "tls"
            raise RegistryError(
                "tls",
                f"{access.host}: certificate not trusted "
                f"({err.certificate_error}); set registries.{access.host}"
                ".caFile",
            ) from err
        except aiohttp.ClientSSLError as err:
            error = "tls"
            raise RegistryError("tls", f"{access.host}: TLS failed ({err})") from err
        except (aiohttp.ClientError, OSError) as err:
            error = "network"
            raise RegistryError(
                "network", f"{access.host} unreachable: {_short_error(err)}"
            ) from err
        finally:
            if self._on_request:
                self._on_request(operation, self._clock() - started, error)

    async def _auth_header(
        self, host: str, scope: str | None, *, challenge: str | None
    ) -> str | None:
        access = self._host(host)
        if challenge is None:
            # Pre-emptive auth once the host's scheme is known: saves a 401 round trip per call.
            scheme = self._schemes.get(host)
            if scheme == "basic":
                creds = access.credentials()
                return _basic(creds) if creds else None
            if scheme == "bearer" and scope:
                cached = self._tokens.get((host, scope))
                if cached and cached[1] > self._clock():
                    return f"Bearer {cached[0]}"
            return None
        kind, params = parse_challenge(challenge)
        self._schemes[host] = kind
        creds = access.credentials()
        if kind == "basic":
            return _basic(creds) if creds else None
        if kind == "bearer":
            token = await self._fetch_token(host, params, scope, creds)
            return f"Bearer {token}"
        raise RegistryError("auth", f"{host} asks for unsupported auth scheme {kind!r}")

    async def _fetch_token(
        self, host: str, params: Mapping[str, str], scope: str | None, creds: tuple[str, str] | None
    ) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryError("auth", f"{host}: Bearer challenge without realm")
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        wanted = scope or params.get("scope")
        if wanted:
            query["scope"] = wanted
        headers = {"Authorization": _basic(creds)} if creds else {}
        access = self._host(host)
        self.stats.count("token")
        try:
            async with (
                self._slot(host),
                self.session.get(
                    realm,
                    params=query,
                    headers=headers,
                    ssl=access.ssl_context(),
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                ) as resp,
            ):
                body = await resp.read()
                status = resp.status
        except TimeoutError as err:
            raise RegistryError("timeout", f"token service of {host} did not answer") from err
        except (aiohttp.ClientError, OSError) as err:
            raise RegistryError(
                "network", f"token service of {host} unreachable: {_short_error(err)}"
            ) from err
        if status in (401, 403):
            raise RegistryError(
                "auth",
                f"{host}: the token service rejected the configured credentials"
                if creds
                else f"{host}: the token service requires credentials",
            )
        if status != 200:
            raise RegistryError("auth", f"{host}: token service answered HTTP {status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            ttl = float(doc.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError) as err:
            raise RegistryError("auth", f"{host}: token service answered no token") from err
        if not token:
            raise RegistryError("auth", f"{host}: token service answered no token")
        if wanted:
            self._tokens[(host, wanted)] = (token, self._clock() + max(ttl - TOKEN_MARGIN, 1.0))
        return str(token)


def _basic(creds: tuple[str, str] | None) -> str:
    assert creds is not None
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _is_stream(data: Any) -> bool:
    return data is not None and not isinstance(data, (bytes, str))


def _short_error(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) < 200 else text[:197] + "..."


def _status_error(reply: _Reply, host: str, path: str) -> RegistryError:
    code = ""
    try:
        errors = json.loads(reply.body).get("errors") or []
        if errors:
            code = f" ({errors[0].get('code')}: {errors[0].get('message')})"
    except (ValueError, AttributeError):
        pass
    where = f"{host}{path}"
    if reply.status == 404:
        return RegistryError("not_found", f"{where}: not found{code}")
    if reply.status in (401, 403):
        return RegistryError("auth", f"{where}: access denied (HTTP {reply.status}){code}")
    if reply.status >= 500 or reply.status == 429:
        return RegistryError("server", f"{where}: registry answered HTTP {reply.status}{code}")
    return RegistryError("protocol", f"{where}: unexpected HTTP {reply.status}{code}")


def _platforms(body: bytes) -> tuple[PlatformManifest, ...]:
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise RegistryError("protocol", "image index is not JSON") from err
    out = []
    for m in doc.get("manifests") or []:
        p = m.get("platform") or {}
        parts = [p.get("os"), p.get("architecture"), p.get("variant")]
        platform = "/".join(x for x in parts if x) or "unknown"
        out.append(
            PlatformManifest(
                digest=m["digest"], media_type=m.get("mediaType", ""), platform=platform
            )
        )
    return tuple(out)
