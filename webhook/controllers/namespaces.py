"""Every namespace's labels, from one watch: lookups at admission cost no API request.

The gate reads ``mirrorgate.io/scan-mode`` from them; when pull secrets are on, the same view
comes from ``PullSecretSync``'s Namespace watch instead (one watch, not two).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from mirrorgate.webhook.adapters.kube import Kube, Watch


class NamespaceLabels:
    """Labels of every namespace, from one watch: lookups at admission cost no API request."""

    def __init__(self, kube: Kube, *, on_restart: Callable[[str], None] | None = None) -> None:
        self.kube = kube
        self._labels: dict[str, dict[str, str]] = {}
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_restart = on_restart

    def get(self, namespace: str) -> dict[str, str] | None:
        """The namespace's labels, or None while unknown (not yet listed, or no such namespace)."""
        return self._labels.get(namespace)

    def start(self) -> None:
        self._watch = self.kube.watch("/api/v1/namespaces", on_restart=self._on_restart).start()
        self._task = asyncio.create_task(self._consume(self._watch), name="namespace labels")

    async def _consume(self, watch: Watch) -> None:
        async for event in watch:
            if event.type == "RELIST":
                self._labels = {_name(o): _labels(o) for o in event.objects}
            elif event.type == "DELETED":
                self._labels.pop(_name(event.obj), None)
            else:
                self._labels[_name(event.obj)] = _labels(event.obj)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._watch is not None:
            await self._watch.close()


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})
