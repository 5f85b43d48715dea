"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

Owns acquiring, renewing and releasing the Lease, and telling the caller when this replica starts
or stops leading. One replica (the lease holder) performs writes that must not race; every replica
keeps serving admissions. Semantics follow client-go (``LeaseDuration`` 15 s, ``RenewDeadline``
10 s, ``RetryPeriod`` 2 s by default):

- A candidate takes the Lease when nobody holds it, or when the record it observed has not changed
  for the record's ``leaseDurationSeconds``. Expiry is measured on this process's monotonic clock
  from the moment the record was first observed, never by comparing ``renewTime`` with the local
  wall clock, so clock skew between nodes cannot cause two leaders.
- The leader renews every retry period; if it cannot renew for ``renew_deadline`` (shorter than
  the lease duration), or finds another holder, it stops leading before anyone may take over.
- Every write carries the resourceVersion that was read, so two candidates cannot both win.
- A leader that shuts down cleanly releases the Lease (empty holder, duration 1 s) so another
  replica takes over at its next retry instead of after a full lease duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mirrorgate.webhook.adapters.kube import Kube, KubeError, lease_path
from mirrorgate.webhook.core.rbac import LEASE_NAME
from mirrorgate.webhook.infra.backoff import jittered
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("leader")

DEFAULT_LEASE_DURATION = 15.0
# client-go waits up to 1.2 x RetryPeriod between attempts so that candidates spread out.
JITTER = 1.2


def default_identity() -> str:
    """The pod name (downward API ``POD_NAME``), else host name and process id."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ElectionSettings:
    lease_name: str = LEASE_NAME
    identity: str = field(default_factory=default_identity)
    lease_duration: float = DEFAULT_LEASE_DURATION
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        # client-go's own checks: a leader must give up before anyone else may take over.
        if not self.lease_duration > self.renew_deadline > JITTER * self.retry_period > 0:
            raise ValueError(
                "leader election needs lease_duration > renew_deadline > 1.2 x retry_period > 0, "
                f"got {self.lease_duration}, {self.renew_deadline}, {self.retry_period}"
            )

    @classmethod
    def scaled(cls, lease_duration: float, **kwargs: Any) -> ElectionSettings:
        """client-go's 15/10/2 proportions for another lease duration (tests use a few seconds)."""
        return cls(
            lease_duration=lease_duration,
            renew_deadline=lease_duration * 2 / 3,
            retry_period=lease_duration * 2 / 15,
            **kwargs,
        )


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The parts of ``Lease.spec`` that election reads and writes."""

    holder: str
    duration_seconds: int
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_lease(cls, lease: dict[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


def micro_time(now: dt.datetime) -> str:
    """A ``metav1.MicroTime`` as the API server expects it (RFC 3339, microseconds, UTC)."""
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def held_by_other(record: LeaseRecord, *, identity: str, observed_for: float) -> bool:
    """Whether someone else holds the lease: a holder is named and the record we observed has
    not stood still for its whole duration."""
    return record.holder not in ("", identity) and observed_for < record.duration_seconds


def claim(
    record: LeaseRecord | None, *, identity: str, now: dt.datetime, duration_seconds: int
) -> LeaseRecord:
    """The record to write when ``identity`` acquires (or, as holder, renews) the lease."""
    stamp = micro_time(now)
    if record is not None and record.holder == identity:
        return LeaseRecord(
            holder=identity,
            duration_seconds=duration_seconds,
            acquire_time=record.acquire_time or stamp,
            renew_time=stamp,
            transitions=record.transitions,
        )
    transitions = 0 if record is None else record.transitions + 1
    return LeaseRecord(
        holder=identity,
        duration_seconds=duration_seconds,
        acquire_time=stamp,
        renew_time=stamp,
        transitions=transitions,
    )


Attempt = Literal["leading", "held", "failed"]


class LeaderElector:
    """Runs the election for one replica; ``on_change(True/False)`` when leadership changes."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        settings: ElectionSettings,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.settings = settings
        self.on_change = on_change
        self.is_leader = False
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def _duration_seconds(self) -> int:
        return max(1, math.ceil(self.settings.lease_duration))

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="leader election")

    async def stop(self) -> None:
        """Stop campaigning; a leader releases the lease so another replica takes over now."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.is_leader:
            self._set(False)
            try:
                await asyncio.wait_for(self._release(), timeout=self.settings.retry_period)
            except (KubeError, TimeoutError) as err:
                log.warning("could not release the lease", extra={"fields": {"error": str(err)}})

    async def run(self) -> None:
        while True:
            while await self._attempt() != "leading":
                await self._pause()
            self._set(True)
            await self._keep_leading()
            self._set(False)
            await self._pause()

    async def _pause(self) -> None:
        await asyncio.sleep(jittered(self.settings.retry_period, JITTER - 1))

    async def _keep_leading(self) -> None:
        """Renew every retry period; return once renewal failed for the renew deadline or
        another holder appeared."""
        last_renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.retry_period)
            outcome = await self._attempt(deadline=last_renewed + self.settings.renew_deadline)
            if outcome == "leading":
                last_renewed = time.monotonic()
            elif (
                outcome == "held" or time.monotonic() >= last_renewed + self.settings.renew_deadline
            ):
                return

    async def _attempt(self, *, deadline: float | None = None) -> Attempt:
        """One acquire-or-renew round trip, bounded by ``deadline`` (monotonic) when leading."""
        budget = self.settings.renew_deadline if deadline is None else deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self._try(), timeout=max(0.05, budget))
        except TimeoutError:
            return "failed"
        except Exception as err:  # noqa: BLE001 - the election must outlive any one failure
            log.warning(
                "lease update failed",
                extra={
                    "fields": {
                        "lease": self.settings.lease_name,
                        "status": err.status if isinstance(err, KubeError) else None,
                        "error": str(err)[:300],
                    }
                },
            )
            return "failed"

    async def _try(self) -> Attempt:
        path = lease_path(self.namespace, self.settings.lease_name)
        lease = await self.kube.get(path)
        now = dt.datetime.now(dt.UTC)
        identity = self.settings.identity
        if lease is None:
            record = claim(
                None, identity=identity, now=now, duration_seconds=self._duration_seconds
            )
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.settings.lease_name, "namespace": self.namespace},
                "spec": record.spec(),
            }
            try:
                created = await self.kube.create(lease_path(self.namespace), body)
            except KubeError as err:
                if err.status == 409:  # another candidate created it first
                    return "failed"
                raise
            self._observe(LeaseRecord.from_lease(created))
            return "leading"
        current = LeaseRecord.from_lease(lease)
        self._observe(current)
        observed_for = time.monotonic() - self._observed_at
        if held_by_other(current, identity=identity, observed_for=observed_for):
            return "held"
        record = claim(current, identity=identity, now=now, duration_seconds=self._duration_seconds)
        body = {**lease, "spec": {**(lease.get("spec") or {}), **record.spec()}}
        try:
            updated = await self.kube.replace(path, body)
        except KubeError as err:
            if err.status == 409:  # someone else wrote first; look again next round
                return "failed"
            raise
        self._observe(LeaseRecord.from_lease(updated))
        return "leading"

    def _observe(self, record: LeaseRecord) -> None:
        if record != self._observed:
            self._observed = record
            self._observed_at = time.monotonic()

    async def _release(self) -> None:
        path = lease_path(self.namespace, self.settings.lease_name)
        lease = await self.kube.get(path)
        if lease is None or LeaseRecord.from_lease(lease).holder != self.settings.identity:
            return
        now = micro_time(dt.datetime.now(dt.UTC))
        spec = {
            **(lease.get("spec") or {}),
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "renewTime": now,
        }
        await self.kube.replace(path, {**lease, "spec": spec})

    def _set(self, leading: bool) -> None:
        if leading == self.is_leader:
            return
        self.is_leader = leading
        log.info(
            "started leading" if leading else "stopped leading",
            extra={
                "fields": {
                    "lease": f"{self.namespace}/{self.settings.lease_name}",
                    "identity": self.settings.identity,
                }
            },
        )
        if self.on_change is not None:
            self.on_change(leading)
