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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

from cachetools import LRUCache

from mirrorgate.webhook.adapters.registry import Manifest, RegistryClient, RegistryError
from mirrorgate.webhook.core.config import Config, Mirror
from mirrorgate.webhook.core.images import ImageReference, InvalidReferenceError, parse_reference
from mirrorgate.webhook.core.mutation import MirrorCheck
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("mirrors")
MAX_BACKGROUND_COPIES = 4
# Bound of the verifier's per-candidate memos (cleared when full; rebuilt on demand).
_MEMO_LIMIT = 10_000


def location(ref: ImageReference) -> tuple[str, str, str]:
    """(host, repository, reference) of ``ref`` for the registry API; the digest wins over a tag."""
    reference = ref.digest or ref.tag or "latest"
    return ref.domain, ref.path, reference


@dataclass
class CopyReport:
    source: str
    target: str
    digest: str = ""
    manifests: int = 0
    blobs_copied: int = 0
    blobs_present: int = 0
    platforms: list[str] = field(default_factory=list)


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
    client: RegistryClient, source: ImageReference, target: ImageReference
) -> CopyReport:
    """Copy ``source`` (all platforms) to ``target``, byte for byte: the digests stay the same.

    Blobs first, then platform manifests by digest, then the top manifest under the tag: a reader
    never sees a manifest whose parts are missing.
    """
    shost, srepo, sref = location(source)
    thost, trepo, _ = location(target)
    report = CopyReport(source=str(source), target=str(target))
    tree = await _manifest_tree(client, shost, srepo, sref)
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


async def warm_proxy(client: RegistryClient, ref: ImageReference) -> CopyReport:
    """Pull ``ref`` through a pull-through mirror (manifests and every layer) so it is cached."""
    host, repo, reference = location(ref)
    report = CopyReport(source=str(ref), target=str(ref))
    tree = await _manifest_tree(client, host, repo, reference)
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
        self._locations: LRUCache[str, tuple[str, str, str]] = LRUCache(_MEMO_LIMIT)
        self._ok: LRUCache[str, MirrorCheck] = LRUCache(_MEMO_LIMIT)

    async def check_all(
        self, candidates: Iterable[str], *, budget: float, allow_copy: bool = True
    ) -> dict[str, MirrorCheck]:
        """One MirrorCheck per candidate; those without an answer within ``budget`` say so.

        ``allow_copy=False`` (dry-run admissions) never starts a background copy.
        """
        unique = list(dict.fromkeys(candidates))
        if not unique:
            return {}
        known = {c: self._known(c) for c in unique}
        if all(known.values()):
            return cast(dict[str, MirrorCheck], known)  # all() just saw no None
        tasks = {c: asyncio.ensure_future(self._check(c, allow_copy)) for c in unique}
        done, pending = await asyncio.wait(tasks.values(), timeout=budget)
        out: dict[str, MirrorCheck] = {}
        for candidate, task in tasks.items():
            if task in done:
                out[candidate] = task.result()
            else:
                # The registry request keeps running (the client shields it) and fills the cache.
                task.cancel()
                out[candidate] = MirrorCheck(
                    ok=False,
                    reason="timeout",
                    detail=f"no answer within verifyTimeout {budget:g}s",
                )
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return out

    def _known(self, candidate: str) -> MirrorCheck | None:
        """A positive answer from the client's cache, without a task or a timer; else None.

        Runs for every rewritten image of every admission: where a candidate lives and the
        answer for a digest are kept (bounded) rather than rebuilt each time."""
        where = self._locations.get(candidate)
        if where is None:
            try:
                where = location(parse_reference(candidate))
            except InvalidReferenceError:
                return None
            self._locations[candidate] = where
        manifest = self.client.cached_manifest(*where, op=self._op)
        if manifest is None:
            return None
        check = self._ok.get(manifest.digest)
        if check is None:
            check = self._ok[manifest.digest] = MirrorCheck(ok=True, digest=manifest.digest)
        return check

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
        task = asyncio.ensure_future(self._copy(source, target))
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

    async def _copy(self, source: ImageReference, target: ImageReference) -> None:
        async with self._copy_limit:
            try:
                report = await copy_image(self.client, source, target)
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
