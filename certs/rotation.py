"""Renewal and rotation of the webhook's certificates, kept in one Secret, without downtime.

Owns the layout of the TLS Secret, the decision what to change in it and when (``plan``, pure),
and ``CertRenewer``, which applies those decisions through the Kubernetes API from inside the
running webhook and keeps every ``caBundle`` consumer in step.

The Secret ``<release>-tls`` (type ``kubernetes.io/tls``) holds everything, so one write with a
resourceVersion changes it atomically (replicas race safely: the loser gets 409 and re-reads):

``tls.crt``/``tls.key``
    the serving pair; the webhook mounts only these two keys and re-reads them by digest.
``ca.crt``
    the CA bundle published as ``caBundle``: one CA, two while a rotation is under way.
``ca-signing.crt``/``ca-signing.key``
    the CA that signs serving certificates.
``ca-next.crt``/``ca-next.key``
    a new CA that is already published but not signing yet (first step of a rotation).

A serving certificate is renewed at two thirds of its lifetime. A CA rotation (at two thirds of
the CA's lifetime, or when annotation ``mirrorgate.io/rotate-ca`` asks for one) takes three steps,
each ``overlap`` apart, so that nothing the API server sees is ever untrusted:

1. publish: ``ca.crt`` = old + new CA (the API server trusts both);
2. switch: the serving certificate is issued by the new CA (still trusted by the bundle) and the
   new CA signs from now on;
3. drop: ``ca.crt`` = new CA, once every replica serves the new certificate (the kubelet updates a
   mounted Secret within about a minute, and the server polls the files).

Standard library and ``cryptography`` only: the Kubernetes API is whatever object with async
``get(path) -> dict | None`` and ``replace(path, body) -> dict`` is handed in (the server's
``webhook.kube.Kube`` is one). No key material is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mirrorgate.certs.pki import (
    KeyPair,
    generate_ca,
    issue_serving,
    key_matches,
    load_certificates,
    signed_by,
    subject_names,
)

log = logging.getLogger("mirrorgate.certs")

TLS_CERT, TLS_KEY, CA_BUNDLE = "tls.crt", "tls.key", "ca.crt"
SIGNING_CERT, SIGNING_KEY = "ca-signing.crt", "ca-signing.key"
NEXT_CERT, NEXT_KEY = "ca-next.crt", "ca-next.key"
STEP_AT_ANNOTATION = "mirrorgate.io/tls-step-at"
ROTATE_CA_ANNOTATION = "mirrorgate.io/rotate-ca"
ROTATE_REQUESTED = "requested"
RENEW_FRACTION = 2 / 3
DEFAULT_INTERVAL = 60.0
CA_COMMON_NAME = "mirrorgate-webhook-ca"
ADMISSION_API = "/apis/admissionregistration.k8s.io/v1"


# --- names of the objects that hold or consume the certificates ---------------------------------
def tls_secret_name(release: str) -> str:
    return f"{release}-tls"


def ca_config_map_name(release: str) -> str:
    """The ConfigMap with ``ca.crt`` that the registry mounts to trust the webhook's events URL."""
    return f"{release}-ca"


@dataclass(frozen=True, slots=True)
class RenewalTargets:
    """Where the certificates live and who consumes the CA bundle."""

    namespace: str
    secret: str
    mutating_webhooks: tuple[str, ...] = ()
    validating_webhooks: tuple[str, ...] = ()
    ca_config_maps: tuple[tuple[str, str], ...] = ()  # (namespace, name) with key ca.crt

    @classmethod
    def for_release(
        cls, release: str, *, namespace: str, registry_namespace: str | None = None
    ) -> RenewalTargets:
        """The objects ``mirrorgate deploy`` creates for ``release`` (deploy.name)."""
        maps = ((registry_namespace, ca_config_map_name(release)),) if registry_namespace else ()
        return cls(
            namespace=namespace,
            secret=tls_secret_name(release),
            mutating_webhooks=(release,),
            validating_webhooks=(release,),
            ca_config_maps=maps,
        )


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    ca_lifetime: dt.timedelta = dt.timedelta(days=365)
    serving_lifetime: dt.timedelta = dt.timedelta(days=90)
    overlap: dt.timedelta = dt.timedelta(minutes=10)

    @classmethod
    def from_seconds(cls, *, ca: float, serving: float, overlap: float) -> RenewalPolicy:
        return cls(
            ca_lifetime=dt.timedelta(seconds=ca),
            serving_lifetime=dt.timedelta(seconds=serving),
            overlap=dt.timedelta(seconds=overlap),
        )


# --- the Secret's content ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """What the TLS Secret holds, parsed; ``bundle`` is the PEM of each published CA."""

    serving: KeyPair | None = None
    signing: KeyPair | None = None
    next_ca: KeyPair | None = None
    bundle: tuple[bytes, ...] = ()
    step_at: dt.datetime | None = None
    rotate_requested: bool = False

    @property
    def ca_bundle(self) -> bytes:
        return b"".join(self.bundle)

    @classmethod
    def from_secret(cls, secret: Mapping[str, Any] | None) -> TLSMaterial | None:
        """Parse a Secret as the API server returns it (``data`` base64); None if absent."""
        if not secret:
            return None
        raw = secret.get("data") or {}
        data = {k: _b64decode(v) for k, v in raw.items() if isinstance(v, str)}
        meta = secret.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        return cls.from_data(data, annotations)

    @classmethod
    def from_data(cls, data: Mapping[str, bytes], annotations: Mapping[str, str]) -> TLSMaterial:
        def pair(cert_key: str, key_key: str) -> KeyPair | None:
            cert, key = data.get(cert_key), data.get(key_key)
            if not cert or not key:
                return None
            p = KeyPair(cert, key)
            return p if load_certificates(cert) and key_matches(p) else None

        bundle = tuple(_pem(c) for c in load_certificates(data.get(CA_BUNDLE, b"")))
        step_at = None
        if stamp := annotations.get(STEP_AT_ANNOTATION):
            with contextlib.suppress(ValueError):
                step_at = dt.datetime.fromisoformat(stamp)
        return cls(
            serving=pair(TLS_CERT, TLS_KEY),
            signing=pair(SIGNING_CERT, SIGNING_KEY),
            next_ca=pair(NEXT_CERT, NEXT_KEY),
            bundle=bundle,
            step_at=step_at,
            rotate_requested=annotations.get(ROTATE_CA_ANNOTATION) == ROTATE_REQUESTED,
        )

    def data(self) -> dict[str, bytes]:
        """The Secret's keys and raw values."""
        out: dict[str, bytes] = {}
        if self.serving:
            out[TLS_CERT], out[TLS_KEY] = self.serving.cert_pem, self.serving.key_pem
        out[CA_BUNDLE] = self.ca_bundle
        if self.signing:
            out[SIGNING_CERT], out[SIGNING_KEY] = self.signing.cert_pem, self.signing.key_pem
        if self.next_ca:
            out[NEXT_CERT], out[NEXT_KEY] = self.next_ca.cert_pem, self.next_ca.key_pem
        return out

    def secret_data(self) -> dict[str, str]:
        """``data`` for a Secret manifest (base64)."""
        return {k: base64.b64encode(v).decode() for k, v in self.data().items()}

    def annotations(self) -> dict[str, str]:
        return {STEP_AT_ANNOTATION: self.step_at.isoformat()} if self.step_at else {}


@dataclass(frozen=True, slots=True)
class Step:
    material: TLSMaterial
    reasons: tuple[str, ...]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text)
    except ValueError:
        return b""


def _due(cert: x509.Certificate, now: dt.datetime) -> bool:
    """Past two thirds of its lifetime (or not valid at all right now)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now < end:
        return True
    return now >= start + (end - start) * RENEW_FRACTION


def _valid(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


# --- the decision (pure but for key generation) --------------------------------------------------
def plan(
    current: TLSMaterial | None,
    *,
    names: Sequence[str] | None,
    policy: RenewalPolicy,
    now: dt.datetime | None = None,
) -> Step | None:
    """What the Secret should hold next, and why; None when nothing is due.

    ``names`` are the serving certificate's SANs; None keeps those of the current certificate.
    Time-gated rotation steps happen one per call; steps that are due at once are combined.
    """
    now = now or dt.datetime.now(dt.UTC)
    material = current or TLSMaterial()
    reasons: list[str] = []
    for _ in range(4):
        step = _next_step(material, names=names, policy=policy, now=now)
        if step is None:
            break
        material, reason = step
        reasons.append(reason)
        if material.step_at == now:
            break  # the next rotation step waits for the overlap
    return Step(material, tuple(reasons)) if reasons else None


def _next_step(
    m: TLSMaterial, *, names: Sequence[str] | None, policy: RenewalPolicy, now: dt.datetime
) -> tuple[TLSMaterial, str] | None:
    signing = m.signing.certificate if m.signing else None
    wanted = list(names) if names else (subject_names(m.serving.certificate) if m.serving else [])
    if not wanted:
        raise ValueError("no serving certificate names: pass names for a first certificate")

    def serving_from(ca: KeyPair) -> KeyPair:
        return issue_serving(ca, wanted, lifetime=policy.serving_lifetime, now=now)

    if signing is None or not _valid(signing, now):
        # First run, or a CA that expired unrotated: nothing it signed is usable any more.
        ca = generate_ca(CA_COMMON_NAME, lifetime=policy.ca_lifetime, now=now)
        fresh = TLSMaterial(serving=serving_from(ca), signing=ca, bundle=(ca.cert_pem,))
        return fresh, "issued a new CA and serving certificate"
    assert m.signing is not None
    elapsed = now - m.step_at if m.step_at else policy.overlap
    if m.next_ca is not None:
        if elapsed < policy.overlap:
            return None
        switched = dataclasses.replace(
            m,
            signing=m.next_ca,
            next_ca=None,
            serving=serving_from(m.next_ca),
            step_at=now,
            rotate_requested=False,  # a rotation is under way: that is what was asked for
        )
        return switched, "switched serving certificate to the new CA"
    live = tuple(pem for pem in m.bundle if _valid(load_certificates(pem)[0], now))
    signing_pem = _pem(signing)
    if signing_pem not in live:
        return dataclasses.replace(m, bundle=(*live, signing_pem)), "published the signing CA"
    if len(live) > 1:
        if elapsed < policy.overlap:
            return None
        return (
            dataclasses.replace(m, bundle=(signing_pem,), step_at=now, rotate_requested=False),
            "dropped the old CA from caBundle",
        )
    if m.rotate_requested or _due(signing, now):
        new = generate_ca(CA_COMMON_NAME, lifetime=policy.ca_lifetime, now=now)
        why = "rotation requested" if m.rotate_requested else "two thirds of its lifetime"
        rotated = dataclasses.replace(
            m, next_ca=new, bundle=(*live, new.cert_pem), step_at=now, rotate_requested=False
        )
        return rotated, f"published a new CA next to the old one ({why})"
    serving = m.serving.certificate if m.serving else None
    if serving is None:
        return dataclasses.replace(m, serving=serving_from(m.signing)), "issued serving certificate"
    if not signed_by(serving, signing):
        renewed = dataclasses.replace(m, serving=serving_from(m.signing))
        return renewed, "reissued serving certificate (not signed by the current CA)"
    if names is not None and sorted(subject_names(serving)) != sorted(names):
        renewed = dataclasses.replace(m, serving=serving_from(m.signing))
        return renewed, "reissued serving certificate (names changed)"
    if _due(serving, now):
        renewed = dataclasses.replace(m, serving=serving_from(m.signing))
        return renewed, "renewed serving certificate (two thirds of its lifetime)"
    return None


def describe(material: TLSMaterial | None) -> dict[str, Any]:
    """Expiry and state for ``deploy status``: no key material."""
    if material is None:
        return {"present": False}
    out: dict[str, Any] = {"present": True, "caBundle": len(material.bundle)}
    if material.serving:
        cert = material.serving.certificate
        out["serving"] = {
            "notAfter": cert.not_valid_after_utc.isoformat(),
            "names": subject_names(cert),
        }
    if material.signing:
        out["ca"] = {"notAfter": material.signing.certificate.not_valid_after_utc.isoformat()}
    if material.next_ca:
        out["rotation"] = "new CA published, not signing yet"
    elif len(material.bundle) > 1:
        out["rotation"] = "switched to the new CA, old CA still trusted"
    return out


# --- the running webhook's side -------------------------------------------------------------------
class KubeAPI(Protocol):
    async def get(self, path: str) -> dict[str, Any] | None: ...

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


def secret_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{name}"


def config_map_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{name}"


def webhook_configuration_path(kind: str, name: str) -> str:
    plural = {
        "mutating": "mutatingwebhookconfigurations",
        "validating": "validatingwebhookconfigurations",
    }
    return f"{ADMISSION_API}/{plural[kind]}/{name}"


def with_material(secret: Mapping[str, Any], material: TLSMaterial) -> dict[str, Any]:
    """``secret`` with ``material`` written into it (other keys and metadata kept)."""
    body = dict(secret)
    meta = dict(body.get("metadata") or {})
    annotations = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if k not in (STEP_AT_ANNOTATION, ROTATE_CA_ANNOTATION)
    }
    annotations.update(material.annotations())
    if material.rotate_requested:
        annotations[ROTATE_CA_ANNOTATION] = ROTATE_REQUESTED
    meta["annotations"] = annotations
    meta.pop("managedFields", None)
    body["metadata"] = meta
    body["data"] = material.secret_data()
    return body


def bundle_with_ca(obj: Mapping[str, Any], ca_bundle: bytes) -> dict[str, Any] | None:
    """A webhook configuration with every ``caBundle`` set; None when it already is."""
    encoded = base64.b64encode(ca_bundle).decode()
    hooks = obj.get("webhooks") or []
    if all((h.get("clientConfig") or {}).get("caBundle") == encoded for h in hooks):
        return None
    body = dict(obj)
    body["webhooks"] = [
        {**h, "clientConfig": {**(h.get("clientConfig") or {}), "caBundle": encoded}} for h in hooks
    ]
    body["metadata"] = {
        k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"
    }
    return body


class CertRenewer:
    """Keeps the TLS Secret renewed and rotated and every caBundle consumer current.

    Every replica may run one: writes carry the resourceVersion they were based on, so of two
    replicas deciding the same step one wins and the other re-reads (HTTP 409). Errors are logged
    and retried on the next tick; the webhook keeps serving whatever it has mounted.
    """

    def __init__(
        self,
        api: KubeAPI,
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
        cls,
        api: KubeAPI,
        *,
        release: str,
        namespace: str,
        durations: Any,
        registry_namespace: str | None = None,
        interval: float = DEFAULT_INTERVAL,
    ) -> CertRenewer:
        """The renewer for what ``mirrorgate deploy`` installed: ``durations`` has
        ``ca_duration``, ``serving_duration`` and ``rotation_overlap`` in seconds (the config's
        ``certs`` section); ``registry_namespace`` when the registry trusts the CA for its
        notifications (a ``registry`` and a ``scan`` section)."""
        policy = RenewalPolicy.from_seconds(
            ca=durations.ca_duration,
            serving=durations.serving_duration,
            overlap=durations.rotation_overlap,
        )
        targets = RenewalTargets.for_release(
            release, namespace=namespace, registry_namespace=registry_namespace
        )
        return cls(api, targets, policy=policy, interval=interval)

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
            path = webhook_configuration_path(kind, name)
            obj = await self.api.get(path)
            if obj is None:
                continue
            body = bundle_with_ca(obj, bundle)
            if body is not None:
                await self.api.replace(path, body)
                done.append(f"caBundle of {kind} webhook configuration {name} updated")
        text = bundle.decode()
        for namespace, name in self.targets.ca_config_maps:
            path = config_map_path(namespace, name)
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


def request_ca_rotation(secret: Mapping[str, Any]) -> dict[str, Any]:
    """``secret`` annotated so that the next reconcile starts a CA rotation."""
    body = dict(secret)
    meta = dict(body.get("metadata") or {})
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        ROTATE_CA_ANNOTATION: ROTATE_REQUESTED,
    }
    meta.pop("managedFields", None)
    body["metadata"] = meta
    return body
