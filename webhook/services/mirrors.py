"""Mirror awareness: can the mirror serve this image, and getting the image there when it can't.

``MirrorVerifier`` answers the admission path's question within a budget: it asks the registry
client (cached, single-flight) and gives up waiting at ``verifyTimeout``, leaving the request
running so the next admission finds the answer cached. For ``type: copy`` mirrors a miss starts a
background copy from the upstream. ``copy_image`` and ``warm_proxy`` are the same operations
``mirrorgate prewarm`` runs from the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mirrorgate.webhook.adapters.registry import Manifest, RegistryClient, RegistryError
from mirrorgate.webhook.core.config import Config, Mirror
from mirrorgate.webhook.core.images import ImageReference, InvalidReferenceError, parse_reference
from mirrorgate.webhook.core.mutation import MirrorCheck
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("mirrors")
MAX_BACKGROUND_COPIES = 4
# Bound of the verifier's memos (least recently used dropped; rebuilt on demand).
_MEMO_LIMIT = 10_000
# Part of the budget a mirror has before the next one of the same upstream is asked as well.
HEDGE_FRACTION = 0.25


def _settled(group: tuple[str, ...], out: dict[str, MirrorCheck]) -> bool:
    """Whether ``out`` decides ``group``: a mirror that can serve after only failed ones, or
    every one failed."""
    for candidate in group:
        check = out.get(candidate)
        if check is None:
            return False
        if check.ok:
            return True
    return True


def location(ref: ImageReference) -> tuple[str, str, str]:
    """(host, repository, reference) of ``ref`` for the registry API; the digest wins over a tag."""
    reference = ref.digest or ref.tag or "latest"
    return ref.domain, ref.path, reference


# Both run for every rewritten image of every admission and are pure: functools' C LRU makes a
# hit a dict lookup (cachetools' LRUCache.get cost more than the work it saved, profiled).
# An invalid reference raises, and lru_cache keeps no exceptions.
@functools.lru_cache(maxsize=_MEMO_LIMIT)
def _location_of(candidate: str) -> tuple[str, str, str]:
    return location(parse_reference(candidate))


@functools.lru_cache(maxsize=_MEMO_LIMIT)
def _served(digest: str) -> MirrorCheck:
    return MirrorCheck(ok=True, digest=digest)


@dataclass
class CopyReport:
    source: str
    target: str
    digest: str = ""
    manifests: int = 0
    blobs_copied: int = 0
    blobs_present: int = 0
    platforms: list[str] = field(default_factory=list)
    # Platforms of the upstream's index that were left out (``platforms`` asked for a subset).
    platforms_left_out: list[str] = field(default_factory=list)
    # The digest of the index written to the mirror differs from the upstream's: a subset.
    new_index: bool = False


def platform_matches(have: str, wanted: Sequence[str]) -> bool:
    """Whether an index entry's ``os/arch[/variant]`` is one of ``wanted``; a wanted entry
    without a variant takes every variant (``linux/arm64`` takes ``linux/arm64/v8``)."""
    parts = have.split("/")
    for want in wanted:
        w = want.split("/")
        if parts[:2] == w[:2] and (len(w) == 2 or parts[2:3] == w[2:3]):
            return True
    return False


def _subset(
    tree: list[tuple[str, Manifest]], wanted: Sequence[str], source: ImageReference
) -> tuple[list[tuple[str, Manifest]], list[str]]:
    """``tree`` with only the ``wanted`` platforms, under a new index listing just those, and the
    platforms left out. Entries without a platform ("unknown", e.g. build attestations) match
    none and are left out of a subset; with nothing left out, ``tree`` is returned as it is."""
    top = tree[-1][1]
    keep = [(p, m) for p, m in tree[:-1] if platform_matches(p, wanted)]
    left_out = [p for p, m in tree[:-1] if not platform_matches(p, wanted)]
    if not keep:
        have = ", ".join(p for p, _ in tree[:-1]) or "none"
        raise RegistryError(
            "not_found",
            f"{source}: none of the platforms {', '.join(wanted)} is in its index (it has {have})",
        )
    if not left_out:
        return tree, []
    doc = top.json()
    digests = {m.digest for _, m in keep}
    doc["manifests"] = [e for e in doc.get("manifests") or [] if e.get("digest") in digests]
    body = json.dumps(doc, separators=(",", ":")).encode()
    index = Manifest(
        digest="sha256:" + hashlib.sha256(body).hexdigest(),
        media_type=top.media_type,
        size=len(body),
        body=body,
        platforms=tuple(pm for pm in top.platforms if pm.digest in digests),
    )
    return [*keep, ("", index)], left_out


async def _manifest_tree(
    client: RegistryClient, host: str, repo: str, reference: str
) -> list[tuple[str, Manifest]]:
    """The manifest at ``reference`` and, for an index, every platform manifest (children first)."""
    top = await client.get_manifest(host, repo, reference)
    out: list[tuple[str, Manifest]] = []
    for platform in top.platforms:
        child = await client.get_manifest(host, repo, platform.digest)
        if child.is_index:
            raise RegistryError(
                "protocol",
                f"{host}/{repo}@{platform.digest}: nested image indexes are not supported",
            )
        out.append((platform.platform, child))
    out.append(("", top))
    return out


def _image_blobs(tree: list[tuple[str, Manifest]], report: CopyReport) -> list[str]:
    """The blobs of every image manifest in ``tree`` (indexes have none of their own), in order;
    each image's platform goes into ``report``."""
    digests: list[str] = []
    for platform, manifest in tree:
        if manifest.is_index:
            continue
        if platform:
            report.platforms.append(platform)
        digests.extend(_blobs(manifest))
    return digests


def _blobs(manifest: Manifest) -> list[str]:
    doc = manifest.json()
    digests = []
    if isinstance(doc.get("config"), dict):
        digests.append(doc["config"]["digest"])
    digests.extend(layer["digest"] for layer in doc.get("layers") or [])
    return digests


async def copy_image(
    client: RegistryClient,
    source: ImageReference,
    target: ImageReference,
    *,
    platforms: Sequence[str] = (),
) -> CopyReport:
    """Copy ``source`` to ``target``, byte for byte: the digests stay the same.

    ``platforms`` (``os/arch[/variant]``) copies only those platforms of an image index, under
    a new index that lists just them: its digest differs from the upstream's, so a reference
    pinned by digest (which names the whole index) is always copied whole. A single-platform
    image is copied as it is. Blobs first, then platform manifests by digest, then the top
    manifest under the tag: a reader never sees a manifest whose parts are missing.
    """
    shost, srepo, sref = location(source)
    thost, trepo, _ = location(target)
    report = CopyReport(source=str(source), target=str(target))
    tree = await _manifest_tree(client, shost, srepo, sref)
    if platforms and tree[-1][1].is_index and source.digest is None:
        tree, report.platforms_left_out = _subset(tree, platforms, source)
        report.new_index = bool(report.platforms_left_out)
    for digest in _image_blobs(tree, report):
        copied = await client.copy_blob((shost, srepo), (thost, trepo), digest)
        report.blobs_copied += copied
        report.blobs_present += not copied
    for _, manifest in tree:
        assert manifest.body is not None
        is_top = manifest is tree[-1][1]
        reference = (target.tag or manifest.digest) if is_top else manifest.digest
        await client.put_manifest(thost, trepo, reference, manifest.body, manifest.media_type)
        report.manifests += 1
        if is_top and target.tag and target.digest is None:
            client.forget(thost, trepo, target.tag)
    report.digest = tree[-1][1].digest
    return report


async def warm_proxy(
    client: RegistryClient, ref: ImageReference, *, platforms: Sequence[str] = ()
) -> CopyReport:
    """Pull ``ref`` through a pull-through mirror (manifests and every layer) so it is cached;
    ``platforms`` pulls only those platforms' layers (the index stays the upstream's)."""
    host, repo, reference = location(ref)
    report = CopyReport(source=str(ref), target=str(ref))
    tree = await _manifest_tree(client, host, repo, reference)
    if platforms and tree[-1][1].is_index:
        kept, report.platforms_left_out = _subset(tree, platforms, ref)
        tree = [*kept[:-1], tree[-1]]
    for digest in _image_blobs(tree, report):
        await client.fetch_blob(host, repo, digest)
        report.blobs_copied += 1
    report.manifests = sum(not manifest.is_index for _, manifest in tree)
    report.digest = tree[-1][1].digest
    return report


class MirrorVerifier:
    """Answers "can the mirror serve these references?" within the admission budget."""

    def __init__(
        self,
        client: RegistryClient,
        config: Config,
        *,
        on_copy: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self._copies: dict[str, asyncio.Task[None]] = {}
        self._copy_limit = asyncio.Semaphore(MAX_BACKGROUND_COPIES)
        self._on_copy = on_copy
        # With the gate on, /validate needs the manifest itself next: one GET serves both.
        self._op = "get" if config.scan else "head"

    async def check_all(
        self, candidates: Iterable[str], *, budget: float, allow_copy: bool = True
    ) -> dict[str, MirrorCheck]:
        """One MirrorCheck per candidate; those without an answer within ``budget`` say so.

        ``allow_copy=False`` (dry-run admissions) never starts a background copy.
        """
        return await self.check_choices(
            [(c,) for c in candidates], budget=budget, allow_copy=allow_copy
        )

    async def check_choices(
        self, choices: Iterable[tuple[str, ...]], *, budget: float, allow_copy: bool = True
    ) -> dict[str, MirrorCheck]:
        """For each image, its mirror references in priority order: enough MirrorChecks to pick
        the first that can serve it, within ``budget``.

        A mirror is asked when the one before it has failed, or has not answered within a
        quarter of the budget (a hedge: a healthy first mirror answers in milliseconds, so the
        others are rarely asked; a hanging one still leaves time for the next). A mirror whose
        host is unreachable (``RegistryClient.unreachable``) is passed over without asking.
        Whatever was asked and has not answered by the end of ``budget`` counts as a timeout; the
        request keeps running (the client shields it) and fills the cache for the next admission.
        """
        groups = [g for g in dict.fromkeys(choices) if g]
        if not groups:
            return {}
        out: dict[str, MirrorCheck] = {}
        settled = True
        for group in groups:
            if not self._settled_from_cache(group, out):
                settled = False
                break
        if settled:
            return out
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline, hedge = start + budget, budget * HEDGE_FRACTION
        tasks: dict[str, asyncio.Future[MirrorCheck]] = {}
        since: dict[str, float] = {}
        try:
            while True:
                now = loop.time()
                wake = deadline
                for group in groups:
                    if _settled(group, out):
                        continue
                    for candidate in group:
                        if candidate in out:
                            if out[candidate].ok:
                                break
                            continue
                        if candidate not in tasks:
                            known = self._known(candidate)
                            if known is not None:
                                out[candidate] = known
                                if known.ok:
                                    break
                                continue
                            tasks[candidate] = asyncio.ensure_future(
                                self._check(candidate, allow_copy)
                            )
                            since[candidate] = now
                        if now < since[candidate] + hedge:
                            wake = min(wake, since[candidate] + hedge)
                            break  # the next mirror only after the hedge delay
                running = [t for c, t in tasks.items() if c not in out]
                if not running or now >= deadline:
                    break
                done, _ = await asyncio.wait(
                    running, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
                )
                for candidate, task in tasks.items():
                    if task in done and candidate not in out:
                        out[candidate] = task.result()
                if all(_settled(g, out) for g in groups) or loop.time() >= deadline:
                    break
        finally:
            pending = [t for t in tasks.values() if not t.done()]
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for candidate, task in tasks.items():
            if candidate in out:
                continue
            if task.done() and not task.cancelled():
                out[candidate] = task.result()  # answered just as the budget ran out
            else:
                out[candidate] = MirrorCheck(
                    ok=False, reason="timeout", detail=f"no answer within verifyTimeout {budget:g}s"
                )
        return out

    def _settled_from_cache(self, group: tuple[str, ...], out: dict[str, MirrorCheck]) -> bool:
        """Answer ``group`` from what is already known, in order, while that settles it."""
        for candidate in group:
            known = self._known(candidate)
            if known is None:
                return False
            out[candidate] = known
            if known.ok:
                return True
        return True

    def _known(self, candidate: str) -> MirrorCheck | None:
        """What can be said without a task or a timer: a positive answer from the client's cache,
        or a failure when the mirror's host is unreachable; else None.

        Runs for every rewritten image of every admission: where a candidate lives and the
        answer for a digest are kept (bounded) rather than rebuilt each time."""
        try:
            where = _location_of(candidate)
        except InvalidReferenceError:
            return None
        down = self.client.unreachable(where[0])
        if down is not None:
            return MirrorCheck(
                ok=False,
                reason=down.kind,
                detail=f"{down} (passed over for registryClient.negativeTTL, "
                f"{self.client.cache_settings.negative_ttl:g}s)",
            )
        manifest = self.client.cached_manifest(*where, op=self._op)
        if manifest is None:
            return None
        return _served(manifest.digest)

    async def _check(self, candidate: str, allow_copy: bool) -> MirrorCheck:
        try:
            ref = parse_reference(candidate)
        except InvalidReferenceError as err:
            return MirrorCheck(ok=False, reason="invalid", detail=str(err))
        host, repo, reference = location(ref)
        try:
            fetch = self.client.get_manifest if self._op == "get" else self.client.head_manifest
            manifest = await fetch(host, repo, reference)
        except RegistryError as err:
            if err.kind == "not_found" and allow_copy:
                self._maybe_copy(ref)
            return MirrorCheck(ok=False, reason=err.kind, detail=str(err))
        return MirrorCheck(ok=True, digest=manifest.digest)

    def _maybe_copy(self, target: ImageReference) -> None:
        mirror = self._mirror_of(target)
        if mirror is None or mirror.type != "copy":
            return
        key = str(target)
        if key in self._copies:
            return
        source = self._source_of(target, mirror)
        if source is None:
            return
        task = asyncio.ensure_future(self._copy(source, target, mirror.platforms))
        self._copies[key] = task
        task.add_done_callback(lambda _t: self._copies.pop(key, None))

    def _mirror_of(self, target: ImageReference) -> Mirror | None:
        return self.config.mirror_serving(target)

    @staticmethod
    def _source_of(target: ImageReference, mirror: Mirror) -> ImageReference | None:
        """The upstream reference a mirror reference was rewritten from."""
        prefix = mirror.mirror.partition("/")[2]
        path = target.path[len(prefix) + 1 :] if prefix else target.path
        upstream = mirror.upstream
        if upstream == "*":
            return None  # the original registry is not recoverable from the mirror path
        domain = upstream.split("/", 1)[0]
        return ImageReference(domain=domain, path=path, tag=target.tag, digest=target.digest)

    async def _copy(
        self, source: ImageReference, target: ImageReference, platforms: Sequence[str]
    ) -> None:
        async with self._copy_limit:
            try:
                report = await copy_image(self.client, source, target, platforms=platforms)
            except RegistryError as err:
                log.warning(
                    "background copy to the mirror failed",
                    extra={
                        "fields": {
                            "source": str(source),
                            "target": str(target),
                            "reason": err.kind,
                            "error": str(err),
                        }
                    },
                )
                if self._on_copy:
                    self._on_copy("failed")
                return
            host, repo, reference = location(target)
            self.client.forget(host, repo, reference)
            log.info(
                "copied image to the mirror",
                extra={
                    "fields": {
                        "source": str(source),
                        "target": str(target),
                        "digest": report.digest,
                        "blobs": report.blobs_copied,
                    }
                },
            )
            if self._on_copy:
                self._on_copy("copied")

    async def drain(self) -> None:
        """Wait for background copies (tests, shutdown)."""
        while self._copies:
            await asyncio.gather(*list(self._copies.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._copies.values()):
            task.cancel()
        await asyncio.gather(*list(self._copies.values()), return_exceptions=True)
