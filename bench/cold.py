"""The cold path: a burst of concurrent admissions of images mirrorgate has never seen.

Owns the single-flight check. 20 new images (every fourth one multi-arch) are pushed to the
registry; then 200 pod creates run at once, each as the API server does it: ``/mutate``, apply the
patch, ``/validate`` the mutated pod. The registry's access log says how many manifest requests
mirrorgate made per image (by tag: digest resolutions; by digest: manifest reads for indexing), the
Clair stand-in how many index and report requests per manifest. Clair takes ``INDEX_DELAY``
seconds per index (``QUICK_INDEX_DELAY`` with ``--quick``), so the burst really waits on
in-flight work. Verdicts not known when the burst is answered are asked for again until they are;
the time from the first request until every verdict is known is reported.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.bodies import admission_review, encode, pod
from bench.hot import QUERY, mutated
from bench.stack import Backends, PinnedServer
from tests.helpers.clair_standin import VULN_REPORT_PREFIX
from tests.helpers.registries import access_log_requests

INDEX_DELAY = 1.0  # seconds the stand-in takes per index, like Clair on a small image
QUICK_INDEX_DELAY = 0.25
KNOWN_TIMEOUT = 60.0
REPOSITORY = "cold/app-{}"
TAG = "1.0"


@dataclass
class ColdResult:
    images: int
    manifests: int
    admissions: int
    index_delay: float
    burst_seconds: float
    all_known_seconds: float
    answers: dict[str, int]
    per_image: dict[str, dict[str, int]]  # "HEAD tag" etc. -> {min, max, total}
    per_manifest: dict[str, dict[str, int]]

    @property
    def resolutions_per_image(self) -> tuple[int, int]:
        r = self.per_image["digest resolutions (manifest by tag)"]
        return r["min"], r["max"]

    @property
    def indexes_per_manifest(self) -> tuple[int, int]:
        r = self.per_manifest["Clair index requests"]
        return r["min"], r["max"]

    @property
    def meets_target(self) -> bool:
        return self.resolutions_per_image == (1, 1) and self.indexes_per_manifest == (1, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "manifests": self.manifests,
            "admissions": self.admissions,
            "concurrency": self.admissions,
            "clair_index_delay_s": self.index_delay,
            "burst_seconds": round(self.burst_seconds, 3),
            "all_verdicts_known_seconds": round(self.all_known_seconds, 3),
            "answers": self.answers,
            "per_image": self.per_image,
            "per_manifest": self.per_manifest,
            "target_met": self.meets_target,
        }


def _spread(values: list[int]) -> dict[str, int]:
    return {"min": min(values), "max": max(values), "total": sum(values)}


async def _burst(
    server: PinnedServer, images: list[str], admissions: int
) -> tuple[list[tuple[str, str, float]], float]:
    """Run the admissions at once; returns [(image, outcome, seconds)] and the wall time."""
    context = ssl.create_default_context(cadata=server.ca_pem.decode())
    connector = aiohttp.TCPConnector(limit=admissions, ssl=context)
    timeout = aiohttp.ClientTimeout(total=30)
    started = time.monotonic()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def admit(i: int) -> tuple[str, str, float]:
            image = images[i % len(images)]
            review = admission_review(pod("1c", [image]), uid=f"cold-{i:04d}")
            async with session.post(
                server.url + "/mutate" + QUERY,
                data=encode(review),
                headers={"Content-Type": "application/json"},
            ) as r:
                answer = await r.json()
            after = mutated(review, answer)
            async with session.post(
                server.url + "/validate" + QUERY,
                data=encode(admission_review(after, uid=f"cold-{i:04d}")),
                headers={"Content-Type": "application/json"},
            ) as r:
                verdict = (await r.json())["response"]
            audit = verdict.get("auditAnnotations", {}).get("image-0", "")
            outcome = audit.split()[1] if len(audit.split()) > 1 else "unknown"
            return image, outcome, time.monotonic() - started

        results = await asyncio.gather(*(admit(i) for i in range(admissions)))
    return list(results), time.monotonic() - started


def run(
    server: PinnedServer,
    backends: Backends,
    *,
    images: int = 20,
    admissions: int = 200,
    index_delay: float = INDEX_DELAY,
) -> ColdResult:
    pushed = backends.push([(REPOSITORY.format(i), TAG, i % 4 == 0) for i in range(images)])
    written = [f"{REPOSITORY.format(i)}:{TAG}" for i in range(images)]  # docker.io/cold/...
    clair = backends.clair
    clair.index_delay = index_delay
    try:
        results, burst = asyncio.run(_burst(server, written, admissions))
        known = {image: t for image, outcome, t in results if outcome in ("pass", "fail")}
        started = time.monotonic() - burst
        while len(known) < images:
            if time.monotonic() - started > KNOWN_TIMEOUT:
                break
            missing = [i for i in written if i not in known]
            retry, _ = asyncio.run(_burst(server, missing, len(missing)))
            for image, outcome, _t in retry:
                if outcome in ("pass", "fail"):
                    known[image] = time.monotonic() - started
            if len(known) < images:
                time.sleep(0.05)
        all_known = max(known.values()) if len(known) == images else float("nan")
    finally:
        clair.index_delay = 0.0
    time.sleep(0.5)  # the registry writes its access log line after the answer
    answers: dict[str, int] = {}
    for _image, outcome, _t in results:
        answers[outcome] = answers.get(outcome, 0) + 1

    registry = backends.registry
    by_tag_head, by_tag_get, by_digest_get, blob_get = [], [], [], []
    for image in pushed:
        tag_path = f"/v2/{image.repository}/manifests/{image.tag}"
        by_tag_head.append(access_log_requests(registry, method="HEAD", path=tag_path))
        by_tag_get.append(access_log_requests(registry, method="GET", path=tag_path))
        digest_paths = re.compile(rf"/v2/{re.escape(image.repository)}/manifests/sha256:[0-9a-f]+")
        by_digest_get.append(access_log_requests(registry, method="GET", path=digest_paths))
        blobs = re.compile(rf"/v2/{re.escape(image.repository)}/blobs/sha256:[0-9a-f]+")
        blob_get.append(access_log_requests(registry, method="GET", path=blobs))
    resolutions = [h + g for h, g in zip(by_tag_head, by_tag_get, strict=True)]
    manifests = [m for image in pushed for m in image.manifests]
    per_manifest_digest = [
        access_log_requests(registry, method="GET", path=f"/v2/{image.repository}/manifests/{m}")
        for image in pushed
        for m in image.manifests
    ]
    return ColdResult(
        images=images,
        manifests=len(manifests),
        admissions=admissions,
        index_delay=index_delay,
        burst_seconds=burst,
        all_known_seconds=all_known,
        answers=answers,
        per_image={
            "digest resolutions (manifest by tag)": _spread(resolutions),
            "  of which HEAD": _spread(by_tag_head),
            "  of which GET": _spread(by_tag_get),
            "manifest GETs by digest": _spread(by_digest_get),
            "blob GETs (Clair fetching layers)": _spread(blob_get),
        },
        per_manifest={
            "Clair index requests": _spread([clair.index_count(m) for m in manifests]),
            "Clair report requests": _spread(
                [clair.request_count("GET", VULN_REPORT_PREFIX + m) for m in manifests]
            ),
            "registry GETs of the manifest by digest": _spread(per_manifest_digest),
        },
    )
