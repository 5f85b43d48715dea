"""Renewal and rotation of the webhook's certificates, kept in one Secret, without downtime.

Owns the layout of the TLS Secret and the decision what to change in it and when (``plan``), as
pure functions over the Secret's content. ``mirrorgate.webhook.controllers.certs.CertRenewer``
applies those decisions through the Kubernetes API from inside the running webhook and keeps
every ``caBundle`` consumer in step; the deployer uses the same functions at install.

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

Standard library and ``cryptography`` only, and no I/O. No key material is ever logged.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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

TLS_CERT, TLS_KEY, CA_BUNDLE = "tls.crt", "tls.key", "ca.crt"
SIGNING_CERT, SIGNING_KEY = "ca-signing.crt", "ca-signing.key"
NEXT_CERT, NEXT_KEY = "ca-next.crt", "ca-next.key"
STEP_AT_ANNOTATION = "mirrorgate.io/tls-step-at"
ROTATE_CA_ANNOTATION = "mirrorgate.io/rotate-ca"
ROTATE_REQUESTED = "requested"
RENEW_FRACTION = 2 / 3
CA_COMMON_NAME = "mirrorgate-webhook-ca"


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
