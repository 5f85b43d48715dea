"""The serving certificate's renewal and CA rotation, run by the webhook that serves with it.

``CertRenewer`` applies ``mirrorgate.certs.rotation.plan`` to the TLS Secret ``mirrorgate deploy``
created, through the Kubernetes API, and keeps every ``caBundle`` consumer (both webhook
configurations, the registry's CA ConfigMap) in step. The renewed Secret reaches the serving
process through its mount, which ``serve`` re-reads (``server.tls``). No key material is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mirrorgate.certs.rotation import (
    CA_BUNDLE,
    RenewalPolicy,
    RenewalTargets,
    TLSMaterial,
    bundle_with_ca,
    plan,
    with_material,
)
from mirrorgate.webhook.adapters.kube import resource_path, secret_path
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("certs")

DEFAULT_INTERVAL = 60.0
ADMISSION_API = "admissionregistration.k8s.io/v1"
WEBHOOK_KINDS = {
    "mutating": "MutatingWebhookConfiguration",
    "validating": "ValidatingWebhookConfiguration",
}


class KubeObjects(Protocol):
    """What the renewer needs of ``adapters.kube.Kube``."""

    async def get(self, path: str) -> dict[str, Any] | None: ...

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class CertRenewal:
    """What ``serve`` renews when it runs as ``mirrorgate deploy`` installed it: the release
    (``deploy.name``) in ``namespace``, the ``certs`` section's lifetimes, and the registry's
    namespace when the registry trusts the CA for its notifications."""

    release: str
    namespace: str
    policy: RenewalPolicy
    registry_namespace: str | None = None


class CertRenewer:
    """Keeps the TLS Secret renewed and rotated and every caBundle consumer current.

    Every replica may run one: writes carry the resourceVersion they were based on, so of two
    replicas deciding the same step one wins and the other re-reads (HTTP 409). Errors are logged
    and retried on the next tick; the webhook keeps serving whatever it has mounted.
    """

    def __init__(
        self,
        api: KubeObjects,
        targets: RenewalTargets,
        *,
        policy: RenewalPolicy | None = None,
        names: Sequence[str] | None = None,
        interval: float = DEFAULT_INTERVAL,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        on_change: Callable[[tuple[str, ...]], None] | None = None,
    ) -> None:
        self.api = api
        self.targets = targets
        self.policy = policy or RenewalPolicy()
        self.names = list(names) if names else None
        self.interval = interval
        self._now = now
        self._on_change = on_change

    @classmethod
    def for_release(
        cls, api: KubeObjects, renewal: CertRenewal, *, interval: float = DEFAULT_INTERVAL
    ) -> CertRenewer:
        """The renewer for what ``mirrorgate deploy`` installed (see ``CertRenewal``)."""
        targets = RenewalTargets.for_release(
            renewal.release,
            namespace=renewal.namespace,
            registry_namespace=renewal.registry_namespace,
        )
        return cls(api, targets, policy=renewal.policy, interval=interval)

    async def reconcile(self) -> tuple[str, ...]:
        """One pass: renew/rotate if due, then bring the caBundle consumers in line."""
        path = secret_path(self.targets.namespace, self.targets.secret)
        secret = await self.api.get(path)
        if secret is None:
            raise LookupError(
                f"TLS Secret {self.targets.namespace}/{self.targets.secret} does not exist "
                "(mirrorgate deploy apply creates it)"
            )
        current = TLSMaterial.from_secret(secret)
        step = plan(current, names=self.names, policy=self.policy, now=self._now())
        reasons: tuple[str, ...] = ()
        bundle = current.ca_bundle if current else b""
        if step is not None:
            await self.api.replace(path, with_material(secret, step.material))
            reasons = step.reasons
            bundle = step.material.ca_bundle
            log.info("webhook certificates changed: %s", "; ".join(reasons))
        reasons += await self.publish_bundle(bundle)
        if reasons and self._on_change:
            self._on_change(reasons)
        return reasons

    async def publish_bundle(self, bundle: bytes) -> tuple[str, ...]:
        """Write ``bundle`` to each webhook configuration and CA ConfigMap that differs."""
        if not bundle:
            return ()
        done: list[str] = []
        hooks = [("mutating", n) for n in self.targets.mutating_webhooks] + [
            ("validating", n) for n in self.targets.validating_webhooks
        ]
        for kind, name in hooks:
            path = resource_path(ADMISSION_API, WEBHOOK_KINDS[kind], name)
            obj = await self.api.get(path)
            if obj is None:
                continue
            body = bundle_with_ca(obj, bundle)
            if body is not None:
                await self.api.replace(path, body)
                done.append(f"caBundle of {kind} webhook configuration {name} updated")
        text = bundle.decode()
        for namespace, name in self.targets.ca_config_maps:
            path = resource_path("v1", "ConfigMap", name, namespace=namespace)
            obj = await self.api.get(path)
            if obj is None or (obj.get("data") or {}).get(CA_BUNDLE) == text:
                continue
            body = {**obj, "data": {**(obj.get("data") or {}), CA_BUNDLE: text}}
            body["metadata"] = {
                k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"
            }
            await self.api.replace(path, body)
            done.append(f"CA ConfigMap {namespace}/{name} updated")
        return tuple(done)

    async def run(self) -> None:
        """Reconcile every ``interval`` seconds until cancelled; never raises otherwise."""
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a 409, a network error: try again on the next tick
                status = getattr(err, "status", None)
                if status == 409:
                    log.info("TLS Secret changed concurrently; re-reading on the next tick")
                else:
                    log.warning("certificate renewal failed: %s", _safe(err))
            await asyncio.sleep(self.interval)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CertRenewer]:
        """Run in the background for the duration of the block (for a ``cleanup_ctx``)."""
        task = asyncio.create_task(self.run(), name="mirrorgate-cert-renewer")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _safe(err: BaseException) -> str:
    # Kubernetes errors carry a status and a reason; never the request body (a Secret).
    status = getattr(err, "status", None)
    reason = getattr(err, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return type(err).__name__ + (
        f": {err}" if not isinstance(err, OSError) else f": {err.strerror}"
    )
