"""Posting the Events of ``core.events`` to the API server, never on the admission path.

``EventRecorder.record`` only queues (a bounded queue: when it is full the note is dropped and
counted), so an admission answer never waits for an Event. A worker posts them as core/v1 Events,
at most ``rate`` per second with bursts of ``burst``, each the same (object, reason, message) at
most once per ``dedupe_seconds`` (a Deployment whose every pod falls back to the same mirror
leads to one Event on its ReplicaSet, not one per pod). A pod being created is looked up until
it exists (its uid is what ``kubectl describe pod`` selects Events by) for up to
``lookup_timeout``; a pod that never appears (a later webhook denied it) gets no Event.
Failures are counted and logged once per interval; nothing here raises into the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cachetools import TTLCache

from mirrorgate.webhook.adapters.kube import KubeError, collection_path, resource_path
from mirrorgate.webhook.core.events import EventNote, Subject
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("events")
COMPONENT = "mirrorgate"
QUEUE_MAX = 1000
LOOKUPS_MAX = 16  # pods looked up at once
DEDUPE_MAX = 10_000
FAILURE_LOG_INTERVAL = 60.0


class EventsAPI(Protocol):
    async def get(self, path: str) -> dict[str, Any] | None: ...

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]: ...


Count = Callable[[str, str], None]  # (reason, result)


class EventRecorder:
    def __init__(
        self,
        kube: EventsAPI,
        *,
        instance: str | None = None,
        count: Count | None = None,
        rate: float = 10.0,
        burst: int = 50,
        dedupe_seconds: float = 600.0,
        lookup_timeout: float = 10.0,
        lookup_delays: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.instance = instance or socket.gethostname()
        self._count = count if count is not None else (lambda reason, result: None)
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._refilled = clock()
        self._clock = clock
        self.lookup_timeout = lookup_timeout
        self.lookup_delays = lookup_delays
        self._queue: asyncio.Queue[EventNote] = asyncio.Queue(QUEUE_MAX)
        self._seen: TTLCache[tuple[str, ...], None] = TTLCache(
            DEDUPE_MAX, dedupe_seconds, timer=clock
        )
        self._lookups = asyncio.Semaphore(LOOKUPS_MAX)
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._last_failure_log = -FAILURE_LOG_INTERVAL
        self._failures_since_log = 0

    # --- the admission side: never waits ------------------------------------------------------

    def record(self, notes: Iterable[EventNote]) -> None:
        for note in notes:
            key = _key(note)
            if key in self._seen:
                self._count(note.reason, "deduplicated")
                continue
            try:
                self._queue.put_nowait(note)
            except asyncio.QueueFull:
                self._count(note.reason, "dropped")
                continue
            self._seen[key] = None

    # --- the worker ---------------------------------------------------------------------------

    def start(self) -> EventRecorder:
        if self._worker is None:
            self._worker = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        tasks = [t for t in (self._worker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._worker = None

    async def drain(self) -> None:
        """Wait until everything queued so far was posted or given up (tests)."""
        await self._queue.join()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            note = await self._queue.get()
            try:
                await self._take_token()
                if note.subject.lookup:
                    # Looking a new pod up waits for it to exist: off the queue, bounded.
                    await self._lookups.acquire()
                    task = asyncio.ensure_future(self._lookup_and_post(note))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    await self._post(note, note.subject)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - an Event is never worth the worker
                self._failed(note, err)
            finally:
                self._queue.task_done()

    async def _take_token(self) -> None:
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self.rate)

    async def _lookup_and_post(self, note: EventNote) -> None:
        try:
            subject = await self._existing(note.subject)
            if subject is None:
                self._count(note.reason, "no_object")
                return
            await self._post(note, subject)
        except Exception as err:  # noqa: BLE001
            self._failed(note, err)
        finally:
            self._lookups.release()

    async def _existing(self, subject: Subject) -> Subject | None:
        """``subject`` with the uid of the pod once it exists; None if it does not in time."""
        path = resource_path("v1", "Pod", subject.name, namespace=subject.namespace)
        deadline = self._clock() + self.lookup_timeout
        delays = iter(self.lookup_delays)
        delay = next(delays)
        while True:
            await asyncio.sleep(delay)
            pod = await self.kube.get(path)
            uid = ((pod or {}).get("metadata") or {}).get("uid")
            if isinstance(uid, str) and uid:
                return Subject(
                    subject.api_version, subject.kind, subject.namespace, subject.name, uid
                )
            if self._clock() + delay > deadline:
                return None
            delay = next(delays, delay)

    async def _post(self, note: EventNote, subject: Subject) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        involved: dict[str, str] = {
            "apiVersion": subject.api_version,
            "kind": subject.kind,
            "namespace": subject.namespace,
            "name": subject.name,
        }
        if subject.uid:
            involved["uid"] = subject.uid
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{subject.name[:200]}.", "namespace": subject.namespace},
            "involvedObject": involved,
            "reason": note.reason,
            "message": note.message,
            "type": note.type,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.kube.create(collection_path("v1", "Event", subject.namespace), body)
        self._count(note.reason, "created")

    def _failed(self, note: EventNote, err: Exception) -> None:
        self._count(note.reason, "failed")
        self._failures_since_log += 1
        now = self._clock()
        if now - self._last_failure_log < FAILURE_LOG_INTERVAL:
            return
        status = err.status if isinstance(err, KubeError) else None
        log.warning(
            "cannot create Events",
            extra={
                "fields": {
                    "reason": note.reason,
                    "namespace": note.subject.namespace,
                    "status": status,
                    "error": str(err)[:300],
                    "failed_since_last_log": self._failures_since_log,
                    "hint": "the webhook's ServiceAccount needs create on events and get on pods"
                    if status == 403
                    else None,
                }
            },
        )
        self._last_failure_log = now
        self._failures_since_log = 0


def _key(note: EventNote) -> tuple[str, ...]:
    s = note.subject
    return (s.namespace, s.kind, s.name, s.uid, note.reason, note.message)
