"""Keeps watching what already runs: the verdicts of running images, as a gauge and Events.

``RunningVerdicts`` re-judges every image digest that runs in the cluster (from
``controllers.running``): at once for the digests Clair's notifier reported new or removed
vulnerabilities for (``Scanner.on_notified``) and for digests that start running, and every
``interval`` for all of them (a verdict cached at admission that changed, an allow entry that
expired). It then

- sets ``mirrorgate_running_pods{namespace, severity}``: pods by namespace and by the worst
  blocking severity of their images (``none`` when every image passes, ``unknown`` while one is
  not scanned yet or Clair is down: never "clean" for what is not known);
- posts one ``VulnerableImageRunning`` Warning Event per pod that runs an image whose verdict
  turned to fail, naming the CVEs, packages and fixed versions.

Only the lease holder does this (one set of Events and one gauge per cluster); the others export
nothing. Off the admission path: re-judging goes through the scanner's caches and queue, with a
budget per round, and never holds up ``/validate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from mirrorgate.webhook.core.config import ScanSettings
from mirrorgate.webhook.core.events import EVENT_MESSAGE_MAX, EventNote, Subject
from mirrorgate.webhook.core.policy import SEVERITY_RANK, ImageVerdict, explain
from mirrorgate.webhook.core.reviews import printable
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("vulnerable")
VULNERABLE = "VulnerableImageRunning"
DEFAULT_INTERVAL = 60.0
ROUND_BUDGET = 30.0  # seconds one re-judging round may wait for verdicts
ROUND_IMAGES = 200  # digests judged at once


class Running(Protocol):
    def digests(self) -> dict[str, str]: ...

    def pods_by_digests(self) -> Iterator[tuple[tuple[str, str], str, tuple[str, ...]]]: ...


class Judge(Protocol):
    async def verdicts(self, images: list[str], *, budget: float) -> list[ImageVerdict]: ...


# (namespace, severity) -> pods; called with the complete set each round ({} when not leading)
SetGauge = Callable[[dict[tuple[str, str], int]], None]
Record = Callable[[Iterable[EventNote]], None]


class RunningVerdicts:
    def __init__(
        self,
        running: Running,
        judge: Judge,
        policy: ScanSettings,
        *,
        set_gauge: SetGauge,
        record: Record | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        interval: float = DEFAULT_INTERVAL,
        clair_url: str = "",
    ) -> None:
        self.running = running
        self.judge = judge
        self.policy = policy
        self.set_gauge = set_gauge
        self.record = record
        self.is_leader = is_leader
        self.interval = interval
        self.clair_url = clair_url
        self._verdicts: dict[str, ImageVerdict] = {}  # running digest -> its last verdict
        self._pending: set[str] = set()  # digests to re-judge at once
        self._all = True  # the next round judges every running digest
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    # --- triggers ------------------------------------------------------------------------------

    def notified(self, digests: set[str]) -> None:
        """Clair reported changes for these manifests (an index's platform manifests too)."""
        by_platform = {
            d: top for top, iv in self._verdicts.items() for d in iv.digests if d in digests
        }
        self._pending |= {by_platform.get(d, d) for d in digests}
        self._wake.set()

    def started(self, digests: set[str]) -> None:
        """These digests started running somewhere: judge them now."""
        self._pending |= digests
        self._wake.set()

    # --- the loop ------------------------------------------------------------------------------

    def start(self) -> RunningVerdicts:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                self._all = True  # an interval passed: judge everything
            self._wake.clear()
            if not self.is_leader():
                self._verdicts.clear()
                self._all = True
                self.set_gauge({})
                continue
            try:
                await self.judge_round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the view must outlive any one round
                log.exception("re-judging running images failed; retrying next round")
                self._all = True

    async def judge_round(self) -> None:
        """Re-judge what is due (everything, or the triggered digests), then publish."""
        refs = self.running.digests()
        due = set(refs) if self._all else self._pending & set(refs)
        self._pending -= due
        self._all = False
        started = time.monotonic()
        turned: list[str] = []
        ordered = sorted(due)
        for i in range(0, len(ordered), ROUND_IMAGES):
            batch = [d for d in ordered[i : i + ROUND_IMAGES] if refs.get(d)]
            found = await self.judge.verdicts([refs[d] for d in batch], budget=ROUND_BUDGET)
            for digest, iv in zip(batch, found, strict=True):
                before = self._verdicts.get(digest)
                self._verdicts[digest] = iv
                if iv.outcome == "fail" and (before is None or before.outcome != "fail"):
                    turned.append(digest)
        for gone in set(self._verdicts) - set(refs):
            del self._verdicts[gone]
        self.rounds += 1
        self.set_gauge(self.counts())
        if turned and self.record is not None:
            self.record(self._events(set(turned)))
        if due:
            log.info(
                "running images re-judged",
                extra={
                    "fields": {
                        "images": len(due),
                        "turned_failing": len(turned),
                        "seconds": round(time.monotonic() - started, 3),
                    }
                },
            )

    # --- what is published ---------------------------------------------------------------------

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for (namespace, _name), _uid, digests in self.running.pods_by_digests():
            key = (namespace, self._severity(digests))
            out[key] = out.get(key, 0) + 1
        return out

    def _severity(self, digests: tuple[str, ...]) -> str:
        worst, rank = "none", 0
        for d in digests:
            iv = self._verdicts.get(d)
            if iv is None or iv.outcome in ("pending", "unavailable"):
                if rank == 0:
                    worst = "unknown"
                continue
            if iv.outcome == "fail":
                severity = iv.verdict.worst_severity
                if SEVERITY_RANK.get(severity, 0) + 1 > rank:
                    worst, rank = severity, SEVERITY_RANK.get(severity, 0) + 1
        return worst

    def _events(self, turned: set[str]) -> Iterator[EventNote]:
        for (namespace, name), uid, digests in self.running.pods_by_digests():
            for d in digests:
                if d in turned:
                    iv = self._verdicts[d]
                    text = explain(iv, self.policy, clair_url=self.clair_url)
                    new_pods = (
                        "admitted with a warning" if self.policy.running == "warn" else "denied"
                    )
                    one_line = " ".join(part.strip() for part in text.splitlines())
                    message = printable(
                        "running image now fails the vulnerability policy (new pods of it are "
                        f"{new_pods}): {one_line}",
                        EVENT_MESSAGE_MAX,
                    )
                    subject = Subject("v1", "Pod", namespace, name, uid)
                    yield EventNote(subject, VULNERABLE, message, "Warning")
                    break
