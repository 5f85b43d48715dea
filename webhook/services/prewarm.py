"""`mirrorgate prewarm`: put images on their mirrors ahead of the pods that need them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from mirrorgate.webhook.adapters.registry import RegistryClient, RegistryError
from mirrorgate.webhook.core.config import Config, Mirror
from mirrorgate.webhook.core.images import InvalidReferenceError, parse_reference, with_mirror
from mirrorgate.webhook.core.mutation import CONTAINER_FIELDS, VOLUMES, decide_image
from mirrorgate.webhook.services.mirrors import CopyReport, copy_image, warm_proxy

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class PrewarmResult:
    image: str
    status: str  # copied | warmed | skipped | failed
    mirror: str | None = None
    detail: str = ""
    digest: str | None = None
    platforms: list[str] | None = None
    blobs_copied: int = 0
    blobs_present: int = 0
    platforms_left_out: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", [])}

    def line(self) -> str:
        target = f" -> {self.mirror}" if self.mirror else ""
        return f"{self.image}{target}: {self.status}" + (f" ({self.detail})" if self.detail else "")


async def prewarm(
    config: Config,
    images: list[str],
    *,
    concurrency: int = 4,
    platforms: Sequence[str] | None = None,
) -> list[PrewarmResult]:
    """Each image onto every mirror of its upstream (the fallbacks too: a mirror only helps
    when it already has the image). ``platforms`` overrides each mirror's ``platforms``."""
    limit = asyncio.Semaphore(concurrency)
    async with RegistryClient.from_settings(config.registries, config.registry_client) as client:

        async def one(image: str, mirror: Mirror | None) -> PrewarmResult:
            async with limit:
                return await _prewarm_one(client, config, image, mirror, platforms)

        jobs = [(image, mirror) for image in images for mirror in _targets(config, image)]
        return list(await asyncio.gather(*(one(i, m) for i, m in jobs)))


def _targets(config: Config, image: str) -> list[Mirror | None]:
    """The mirrors ``image`` goes to, in priority order; [None] when it goes to none."""
    decision = decide_image(image, config)
    if decision.reason != "rewritten":
        return [None]
    return list(config.mirrors_for(parse_reference(image))) or [None]


async def _prewarm_one(
    client: RegistryClient,
    config: Config,
    image: str,
    mirror: Mirror | None,
    platforms: Sequence[str] | None,
) -> PrewarmResult:
    decision = decide_image(image, config)
    if decision.reason == "invalid":
        return PrewarmResult(image, "failed", detail=decision.detail or "invalid reference")
    if decision.reason != "rewritten" or mirror is None:
        return PrewarmResult(image, "skipped", detail=decision.reason)
    source = parse_reference(image)
    try:
        rewritten = with_mirror(source, mirror.mirror)
    except InvalidReferenceError as err:
        return PrewarmResult(image, "skipped", mirror=mirror.mirror, detail=str(err))
    target = parse_reference(rewritten)
    wanted = mirror.platforms if platforms is None else tuple(platforms)
    try:
        if mirror.type in ("copy", "hosted"):
            report = await copy_image(client, source, target, platforms=wanted)
            status = "copied"
        else:
            report = await warm_proxy(client, target, platforms=wanted)
            status = "warmed"
    except RegistryError as err:
        return PrewarmResult(image, "failed", mirror=rewritten, detail=str(err))
    return _result(image, status, rewritten, report)


def _result(image: str, status: str, mirror: str, report: CopyReport) -> PrewarmResult:
    platforms = f"{len(report.platforms)} platforms, " if report.platforms else ""
    if report.platforms_left_out:
        platforms = (
            f"{len(report.platforms)} of "
            f"{len(report.platforms) + len(report.platforms_left_out)} platforms, "
        )
    what = "blobs copied" if status == "copied" else "blobs pulled through"
    detail = f"{report.digest}, {platforms}{report.blobs_copied} {what}"
    if report.blobs_present:
        detail += f", {report.blobs_present} already there"
    if report.new_index:
        detail += ", a new index: its digest differs from the upstream's"
    return PrewarmResult(
        image,
        status,
        mirror=mirror,
        detail=detail,
        digest=report.digest,
        platforms=report.platforms or None,
        blobs_copied=report.blobs_copied,
        blobs_present=report.blobs_present,
        platforms_left_out=report.platforms_left_out or None,
    )


def images_in_manifests(folder: Path) -> tuple[list[str], list[str]]:
    """Every container and image-volume image in the YAML/JSON files under ``folder`` (any
    workload kind), and the files that could not be read."""
    images: list[str] = []
    problems: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in MANIFEST_SUFFIXES):
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            problems.append(f"skipped {path}: {str(err).splitlines()[0]}")
            continue
        for doc in docs:
            _collect(doc, images)
    return list(dict.fromkeys(images)), problems


def _collect(node: Any, out: list[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CONTAINER_FIELDS and isinstance(value, list):
                out.extend(
                    c["image"]
                    for c in value
                    if isinstance(c, dict) and isinstance(c.get("image"), str)
                )
            elif key == VOLUMES and isinstance(value, list):
                out.extend(
                    v["image"]["reference"]
                    for v in value
                    if isinstance(v, dict)
                    and isinstance(v.get("image"), dict)
                    and isinstance(v["image"].get("reference"), str)
                )
            else:
                _collect(value, out)
    elif isinstance(node, list):
        for item in node:
            _collect(item, out)
