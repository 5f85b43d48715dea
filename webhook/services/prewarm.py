"""`mirrorgate prewarm`: put images on their mirrors ahead of the pods that need them."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from mirrorgate.webhook.adapters.registry import RegistryClient, RegistryError
from mirrorgate.webhook.core.config import Config
from mirrorgate.webhook.core.images import parse_reference
from mirrorgate.webhook.core.mutation import CONTAINER_FIELDS, decide_image
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

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", [])}

    def line(self) -> str:
        target = f" -> {self.mirror}" if self.mirror else ""
        return f"{self.image}{target}: {self.status}" + (f" ({self.detail})" if self.detail else "")


async def prewarm(
    config: Config, images: list[str], *, concurrency: int = 4
) -> list[PrewarmResult]:
    limit = asyncio.Semaphore(concurrency)
    async with RegistryClient.from_settings(config.registries, config.registry_client) as client:

        async def one(image: str) -> PrewarmResult:
            async with limit:
                return await _prewarm_one(client, config, image)

        return list(await asyncio.gather(*(one(i) for i in images)))


async def _prewarm_one(client: RegistryClient, config: Config, image: str) -> PrewarmResult:
    decision = decide_image(image, config)
    if decision.reason == "invalid":
        return PrewarmResult(image, "failed", detail=decision.detail or "invalid reference")
    if decision.reason != "rewritten" or decision.rewritten is None:
        return PrewarmResult(image, "skipped", detail=decision.reason)
    source = parse_reference(image)
    target = parse_reference(decision.rewritten)
    mirror = config.mirror_for(source)
    assert mirror is not None
    try:
        if mirror.type in ("copy", "hosted"):
            report = await copy_image(client, source, target)
            status = "copied"
        else:
            report = await warm_proxy(client, target)
            status = "warmed"
    except RegistryError as err:
        return PrewarmResult(image, "failed", mirror=decision.rewritten, detail=str(err))
    return _result(image, status, decision.rewritten, report)


def _result(image: str, status: str, mirror: str, report: CopyReport) -> PrewarmResult:
    platforms = f"{len(report.platforms)} platforms, " if report.platforms else ""
    what = "blobs copied" if status == "copied" else "blobs pulled through"
    detail = f"{report.digest}, {platforms}{report.blobs_copied} {what}"
    if report.blobs_present:
        detail += f", {report.blobs_present} already there"
    return PrewarmResult(
        image,
        status,
        mirror=mirror,
        detail=detail,
        digest=report.digest,
        platforms=report.platforms or None,
        blobs_copied=report.blobs_copied,
        blobs_present=report.blobs_present,
    )


def images_in_manifests(folder: Path) -> tuple[list[str], list[str]]:
    """Every container image in the YAML/JSON files under ``folder`` (any workload kind), and
    the files that could not be read."""
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
            else:
                _collect(value, out)
    elif isinstance(node, list):
        for item in node:
            _collect(item, out)
