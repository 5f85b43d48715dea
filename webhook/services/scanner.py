"""The Clair v4 side of the gate: background indexing, verdict cache, notifications.

Clair indexing blocks for seconds to minutes, and an admission may wait at most the API server's
timeout, so scans happen ahead of admission (on push, on first sight) in a bounded background
queue, one index request per manifest digest however many admissions ask. Admission waits at most
``scan.admissionBudget`` and otherwise answers "pending". Verdicts are cached by manifest digest and
policy, and dropped when Clair notifies that a manifest's vulnerabilities changed.

The Clair client itself (PSK auth, the blocking index call, report status codes) is
``mirrorgate.webhook.adapters.clair``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from cachetools import LRUCache

from mirrorgate.webhook.adapters.clair import ClairClient, ClairError
from mirrorgate.webhook.adapters.registry import (
    MANIFEST_TYPES,
    Manifest,
    RegistryClient,
    RegistryError,
)
from mirrorgate.webhook.core.config import Config, ScanSettings
from mirrorgate.webhook.core.images import InvalidReferenceError, parse_reference
from mirrorgate.webhook.core.policy import ImageVerdict, Verdict, evaluate, worst
from mirrorgate.webhook.infra.logs import get_logger
from mirrorgate.webhook.services.mirrors import location

log = get_logger("scanner")
UNAVAILABLE_TTL = 5.0  # reuse "Clair is down" briefly instead of hammering it
SEEN_NOTIFICATIONS = 1024
MAX_VERDICTS = 20_000


@dataclass
class _CachedVerdict:
    verdict: Verdict
    expires: float


class Scanner:
    """Verdicts for images: cached, single-flight, indexed in the background."""

    def __init__(
        self,
        clair: ClairClient,
        registry: RegistryClient,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.UTC).date(),
        on_index: Callable[[str], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        assert config.scan is not None
        self.clair = clair
        self.registry = registry
        self.config = config
        self.policy: ScanSettings = config.scan
        self._clock = clock
        self._today = today
        self._verdicts: LRUCache[str, _CachedVerdict] = LRUCache(MAX_VERDICTS)
        self._reports: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._indexing: dict[str, asyncio.Future[None]] = {}
        self._queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue(self.policy.queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._seen_notifications: LRUCache[str, None] = LRUCache(SEEN_NOTIFICATIONS)
        self._on_index = on_index
        self._on_queue = on_queue
        self.index_requests = 0
        # Called with the manifest digests of each processed Clair notification.
        self.on_notified: Callable[[set[str]], None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.policy.index_concurrency):
            self._workers.append(asyncio.ensure_future(self._worker()))

    async def close(self) -> None:
        for task in [*self._workers, *self._background]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._background, return_exceptions=True)
        self._workers.clear()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + sum(1 for f in self._indexing.values() if not f.done())

    # --- verdicts ------------------------------------------------------------------------------

    async def verdicts(self, images: Sequence[str], *, budget: float) -> list[ImageVerdict]:
        """One verdict per image; nothing waits past ``budget`` seconds.

        Images whose manifest and verdicts are all cached are answered without a task or a timer
        each: that is nearly every admission once an image has been seen.
        """
        known = [self._known_verdict(i) for i in images]
        missing = [i for i, v in zip(images, known, strict=True) if v is None]
        if not missing:
            return cast(list[ImageVerdict], known)  # no None: missing is empty
        deadline = self._clock() + budget
        fetched = iter(
            await asyncio.gather(*(self.image_verdict(i, deadline=deadline) for i in missing))
        )
        return [v if v is not None else next(fetched) for v in known]

    def _known_verdict(self, image: str) -> ImageVerdict | None:
        """The verdict from the caches alone, or None when anything must be asked."""
        try:
            ref = parse_reference(image)
        except InvalidReferenceError:
            return None
        host, repo, reference = location(ref)
        top = self.registry.cached_manifest(host, repo, reference)
        if top is None:
            return None
        targets = self._targets(top)
        if not targets:
            return None
        now = self._clock()
        platform_verdicts = []
        for _platform, digest in targets:
            key = self._key(digest, image)
            cached = self._verdicts.get(key)
            if cached is None or cached.expires <= now:
                return None
            platform_verdicts.append(cached.verdict)
        verdict = worst(platform_verdicts)
        if top.is_index and verdict.outcome == "pass":
            verdict = Verdict("pass", digest=top.digest)
        return ImageVerdict(image, verdict, tuple(platform_verdicts), digest=top.digest)

    async def image_verdict(self, image: str, *, deadline: float) -> ImageVerdict:
        try:
            ref = parse_reference(image)
        except InvalidReferenceError as err:
            return ImageVerdict(image, Verdict("unavailable", detail=f"invalid reference: {err}"))
        host, repo, reference = location(ref)
        try:
            top = await self._wait(self.registry.get_manifest(host, repo, reference), deadline)
        except TimeoutError:
            return ImageVerdict(
                image,
                Verdict(
                    "unavailable",
                    detail=f"registry {host} did not answer within the admission budget",
                ),
            )
        except RegistryError as err:
            what = "image not found" if err.kind == "not_found" else "registry error"
            return ImageVerdict(image, Verdict("unavailable", detail=f"{what}: {err}"))
        targets = self._targets(top)
        if not targets:
            wanted = ", ".join(self.policy.platforms)
            return ImageVerdict(
                image,
                Verdict(
                    "unavailable",
                    digest=top.digest,
                    detail=f"the image index has no manifest for scan.platforms ({wanted})",
                ),
            )
        platform_verdicts = await asyncio.gather(
            *(
                self._manifest_verdict(image, host, repo, digest, platform, deadline)
                for platform, digest in targets
            )
        )
        verdict = worst(platform_verdicts)
        if top.is_index and verdict.outcome == "pass":
            verdict = Verdict("pass", digest=top.digest)
        return ImageVerdict(image, verdict, tuple(platform_verdicts), digest=top.digest)

    def _targets(self, top: Manifest) -> list[tuple[str, str]]:
        if not top.is_index:
            return [("", top.digest)]
        wanted = set(self.policy.platforms)
        out = []
        for p in top.platforms:
            if p.platform.startswith("unknown"):
                continue  # build attestations, not runnable images
            if wanted and p.platform not in wanted and p.platform.rsplit("/", 1)[0] not in wanted:
                continue
            out.append((p.platform, p.digest))
        return out

    async def _manifest_verdict(
        self, image: str, host: str, repo: str, digest: str, platform: str, deadline: float
    ) -> Verdict:
        key = self._key(digest, image)
        cached = self._verdicts.get(key)
        now = self._clock()
        if cached and cached.expires > now:
            return cached.verdict
        try:
            report = await self._wait(self._report(digest), deadline)
            if report is None:
                indexing = self._ensure_indexed(host, repo, digest)
                await self._wait(asyncio.shield(indexing), deadline)
                report = await self._wait(self._report(digest), deadline)
                if report is None:
                    return Verdict(
                        "pending",
                        digest=digest,
                        platform=platform,
                        detail="indexed, but Clair has no report yet",
                    )
        except TimeoutError:
            return Verdict(
                "pending", digest=digest, platform=platform, detail="indexing is still running"
            )
        except ClairError as err:
            verdict = Verdict(
                "unavailable",
                digest=digest,
                platform=platform,
                detail=f"vulnerability scanner unavailable: {err}",
            )
            self._remember(key, verdict, UNAVAILABLE_TTL)
            return verdict
        except RegistryError as err:
            return Verdict(
                "unavailable",
                digest=digest,
                platform=platform,
                detail=f"registry error while preparing the scan: {err}",
            )
        verdict = evaluate(
            report, self.policy, image=image, digest=digest, today=self._today(), platform=platform
        )
        self._remember(key, verdict, self.policy.verdict_ttl)
        return verdict

    def _key(self, digest: str, image: str) -> str:
        # Allow entries match image globs, so the image name is part of the policy's input.
        return f"{digest} {image}"

    def _remember(self, key: str, verdict: Verdict, ttl: float) -> None:
        self._verdicts[key] = _CachedVerdict(verdict, self._clock() + ttl)

    def invalidate(self, digest: str) -> int:
        """Forget verdicts for a manifest digest; returns how many were dropped."""
        keys = [k for k in self._verdicts if k.split(" ", 1)[0] == digest]
        for k in keys:
            del self._verdicts[k]
        return len(keys)

    async def _wait(self, awaitable: Any, deadline: float) -> Any:
        remaining = deadline - self._clock()
        if remaining <= 0:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started: close it rather than leave it unawaited
            raise TimeoutError
        return await asyncio.wait_for(awaitable, remaining)

    def _report(self, digest: str) -> asyncio.Future[dict[str, Any] | None]:
        """Single-flight report fetch; the shared request survives a caller that gives up."""
        future = self._reports.get(digest)
        if future is None:
            future = asyncio.ensure_future(self.clair.vulnerability_report(digest))
            self._reports[digest] = future
            future.add_done_callback(lambda _f: self._reports.pop(digest, None))
        return asyncio.shield(future)

    # --- indexing ------------------------------------------------------------------------------

    def _ensure_indexed(self, host: str, repo: str, digest: str) -> asyncio.Future[None]:
        future = self._indexing.get(digest)
        if future is not None:
            return future
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((host, repo, digest))
        except asyncio.QueueFull:
            future.set_exception(ClairError("server", "the scan queue is full"))
            future.exception()  # retrieved: callers see it through await
            return future
        self._indexing[digest] = future
        if self._on_queue:
            self._on_queue(self.queue_depth)
        return future

    def enqueue(self, host: str, repo: str, digest: str) -> bool:
        """Queue a manifest for indexing ahead of admission (scan-on-push, first sight)."""
        if digest in self._indexing:
            return False
        future = self._ensure_indexed(host, repo, digest)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return True

    async def _worker(self) -> None:
        while True:
            host, repo, digest = await self._queue.get()
            future = self._indexing[digest]
            try:
                await self._index(host, repo, digest)
            except (ClairError, RegistryError) as err:
                log.warning(
                    "indexing failed",
                    extra={
                        "fields": {
                            "digest": digest,
                            "repository": f"{host}/{repo}",
                            "error": str(err),
                        }
                    },
                )
                if self._on_index:
                    self._on_index("failed")
                if not future.done():
                    future.set_exception(err)
                    future.exception()
            except Exception as err:  # a bug must not kill the worker
                log.exception("indexing crashed", extra={"fields": {"digest": digest}})
                if not future.done():
                    future.set_exception(ClairError("server", f"internal error: {err}"))
                    future.exception()
            else:
                if self._on_index:
                    self._on_index("indexed")
                if not future.done():
                    future.set_result(None)
            finally:
                self._indexing.pop(digest, None)
                self._queue.task_done()
                if self._on_queue:
                    self._on_queue(self.queue_depth)

    async def _index(self, host: str, repo: str, digest: str) -> None:
        manifest = await self.registry.get_manifest(host, repo, digest)
        doc = manifest.json()
        auth = await self.registry.authorization(host, repo)
        headers = {"Authorization": [auth]} if auth else {}
        layers = [
            {
                "hash": layer["digest"],
                "uri": self.registry.blob_url(host, repo, layer["digest"]),
                "headers": headers,
            }
            for layer in doc.get("layers") or []
        ]
        self.index_requests += 1
        started = self._clock()
        await self.clair.index({"hash": digest, "layers": layers})
        log.info(
            "indexed",
            extra={
                "fields": {
                    "digest": digest,
                    "repository": f"{host}/{repo}",
                    "layers": len(layers),
                    "seconds": round(self._clock() - started, 3),
                }
            },
        )

    # --- events --------------------------------------------------------------------------------

    def handle_clair_notification(self, notification_id: str, callback: str) -> bool:
        """Start processing a Clair notifier webhook; False if it was already seen."""
        if notification_id in self._seen_notifications:
            return False
        self._seen_notifications[notification_id] = None
        self._spawn(self._process_notification(notification_id, callback))
        return True

    async def _process_notification(self, notification_id: str, callback: str) -> None:
        digests: set[str] = set()
        next_id: str | None = None
        try:
            for _page in range(10_000):
                page = await self.clair.notification_page(callback, page_size=100, next_id=next_id)
                for n in page.get("notifications") or []:
                    if isinstance(n, dict) and isinstance(n.get("manifest"), str):
                        digests.add(n["manifest"])
                next_id = (page.get("page") or {}).get("next")
                if not next_id:
                    break
            dropped = sum(self.invalidate(d) for d in digests)
            if self.on_notified is not None and digests:
                self.on_notified(digests)  # re-judge what runs (services.vulnerable)
            await self.clair.delete_notification(callback)
        except ClairError as err:
            # Not acknowledged: Clair delivers it again, and it is processed again then.
            self._seen_notifications.pop(notification_id, None)
            log.warning(
                "processing a Clair notification failed",
                extra={"fields": {"notification_id": notification_id, "error": str(err)}},
            )
            return
        log.info(
            "Clair notification processed",
            extra={
                "fields": {
                    "notification_id": notification_id,
                    "manifests": len(digests),
                    "verdicts_dropped": dropped,
                }
            },
        )

    def handle_registry_events(self, envelope: Mapping[str, Any]) -> int:
        """Queue pushed manifests (distribution's notification envelope); returns how many."""
        queued = 0
        for event in envelope.get("events") or []:
            if not isinstance(event, dict) or event.get("action") != "push":
                continue
            target = event.get("target")
            if not isinstance(target, dict):
                continue
            media_type = target.get("mediaType")
            digest, repo, url = target.get("digest"), target.get("repository"), target.get("url")
            if media_type not in MANIFEST_TYPES or not _text(digest) or not _text(repo):
                continue
            request = event.get("request")
            host = _host_of(url) or (request.get("host") if isinstance(request, dict) else None)
            if not _text(host):
                continue
            self._spawn(self._scan_pushed(host, repo, digest))
            queued += 1
        return queued

    async def _scan_pushed(self, host: str, repo: str, digest: str) -> None:
        try:
            manifest = await self.registry.get_manifest(host, repo, digest)
        except RegistryError as err:
            log.warning(
                "cannot read a pushed manifest",
                extra={
                    "fields": {"repository": f"{host}/{repo}", "digest": digest, "error": str(err)}
                },
            )
            return
        for platform, child in self._targets(manifest):
            del platform
            self.enqueue(host, repo, child)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait until background work is done (tests, CLI)."""
        while self._background or self._indexing:
            await asyncio.gather(
                *self._background, *self._indexing.values(), return_exceptions=True
            )
            await asyncio.sleep(0)


def _text(value: Any) -> TypeGuard[str]:
    """A non-empty string of a sane length (a digest, a repository, a host)."""
    return isinstance(value, str) and 0 < len(value) <= 1024


def _host_of(url: Any) -> str | None:
    if not isinstance(url, str) or "://" not in url:
        return None
    return url.split("://", 1)[1].split("/", 1)[0] or None


async def scan_images(
    config: Config, images: Sequence[str], *, timeout: float
) -> list[ImageVerdict]:
    """``mirrorgate scan``: the admission path with a long budget, from the command line."""
    assert config.scan is not None
    async with RegistryClient.from_settings(config.registries, config.registry_client) as registry:
        clair = ClairClient(config.scan.clair)
        scanner = Scanner(clair, registry, config)
        scanner.start()
        try:
            return await scanner.verdicts(images, budget=timeout)
        finally:
            await scanner.close()
            await clair.close()
