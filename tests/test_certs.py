"""The webhook PKI: names, lifetimes, and renewal/rotation decisions over a controlled clock."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import logging
import subprocess
import sys
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mirrorgate.certs.pki import (
    generate_ca,
    issue_serving,
    load_certificates,
    service_names,
    signed_by,
    subject_names,
)
from mirrorgate.certs.rotation import (
    RenewalPolicy,
    RenewalTargets,
    TLSMaterial,
    describe,
    plan,
    request_ca_rotation,
    with_material,
)
from mirrorgate.webhook.adapters.kube import resource_path, secret_path
from mirrorgate.webhook.controllers.certs import WEBHOOK_KINDS, CertRenewer


def webhook_configuration_path(kind: str, name: str) -> str:
    return resource_path("admissionregistration.k8s.io/v1", WEBHOOK_KINDS[kind], name)


def config_map_path(namespace: str, name: str) -> str:
    return resource_path("v1", "ConfigMap", name, namespace=namespace)


T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
NAMES = service_names("mirrorgate", "mirrorgate")
# Short lifetimes keep the arithmetic readable: CA 300 min, serving 90 min, overlap 10 min.
POLICY = RenewalPolicy(
    ca_lifetime=dt.timedelta(minutes=300),
    serving_lifetime=dt.timedelta(minutes=90),
    overlap=dt.timedelta(minutes=10),
)


def minutes(n: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=n)


def fresh() -> TLSMaterial:
    step = plan(None, names=NAMES, policy=POLICY, now=T0)
    assert step is not None
    return step.material


# --- certs.pki ------------------------------------------------------------------------------------
def test_service_names_are_the_four_names_a_service_is_called_by():
    assert service_names("mg", "infra") == [
        "mg",
        "mg.infra",
        "mg.infra.svc",
        "mg.infra.svc.cluster.local",
    ]


def test_a_serving_certificate_names_the_service_first_and_ips_as_ip_sans():
    ca = generate_ca(days=2)
    cert = issue_serving(ca, [*service_names("mg", "infra"), "127.0.0.1"], days=1).certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mg"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == service_names("mg", "infra")
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert signed_by(cert, ca.certificate)


def test_default_lifetimes_are_one_year_for_the_ca_and_ninety_days_for_serving():
    ca = generate_ca(now=T0)
    serving = issue_serving(ca, ["mg"], now=T0)
    ca_cert, cert = ca.certificate, serving.certificate
    assert ca_cert.not_valid_after_utc - T0 == dt.timedelta(days=365)
    assert cert.not_valid_after_utc - T0 == dt.timedelta(days=90)
    # Both are backdated a little for clocks behind ours.
    assert cert.not_valid_before_utc < T0


def test_a_serving_certificate_never_outlives_its_ca():
    ca = generate_ca(lifetime=dt.timedelta(days=10), now=T0)
    serving = issue_serving(ca, ["mg"], days=90, now=T0)
    assert serving.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


# --- the plan -------------------------------------------------------------------------------------
def test_a_first_plan_issues_a_ca_and_a_serving_certificate_published_in_the_bundle():
    step = plan(None, names=NAMES, policy=POLICY, now=T0)
    assert step is not None
    assert step.reasons == ("issued a new CA and serving certificate",)
    m = step.material
    assert m.signing is not None and m.serving is not None and m.next_ca is None
    assert m.bundle == (m.signing.cert_pem,)
    assert subject_names(m.serving.certificate) == NAMES
    assert signed_by(m.serving.certificate, m.signing.certificate)


@pytest.mark.parametrize(
    ("at_minutes", "renewed"),
    [
        pytest.param(57, False, id="a serving certificate is kept until two thirds of its life"),
        pytest.param(59, True, id="and renewed right after, from the same CA"),
    ],
)
def test_serving_renewal_at_two_thirds_of_its_lifetime(at_minutes, renewed):
    m = fresh()
    # Issued 5 minutes backdated: two thirds of the 95 minutes it spans end at 58.3 minutes.
    step = plan(m, names=None, policy=POLICY, now=minutes(at_minutes))
    if not renewed:
        assert step is None
        return
    assert step is not None
    assert step.reasons == ("renewed serving certificate (two thirds of its lifetime)",)
    assert step.material.signing == m.signing and step.material.bundle == m.bundle
    assert step.material.serving != m.serving


def test_a_serving_certificate_is_reissued_when_the_names_change():
    m = fresh()
    step = plan(m, names=[*NAMES, "127.0.0.1"], policy=POLICY, now=minutes(1))
    assert step is not None
    assert step.reasons == ("reissued serving certificate (names changed)",)
    assert subject_names(step.material.serving.certificate) == [*NAMES, "127.0.0.1"]


def test_the_ca_rotates_in_three_steps_each_an_overlap_apart_and_never_untrusted():
    m = fresh()
    old_ca = m.signing.certificate
    # Two thirds of the CA's ~305 minutes: publish a second CA, keep signing with the old one.
    step = plan(m, names=None, policy=POLICY, now=minutes(205))
    assert step is not None and step.reasons[-1].startswith("published a new CA")
    published = step.material
    assert len(published.bundle) == 2 and published.next_ca is not None
    assert published.signing == m.signing or published.signing.certificate == old_ca
    assert plan(published, names=None, policy=POLICY, now=minutes(214)) is None

    step = plan(published, names=None, policy=POLICY, now=minutes(216))
    assert step is not None and step.reasons == ("switched serving certificate to the new CA",)
    switched = step.material
    new_ca = switched.signing.certificate
    assert new_ca != old_ca and switched.next_ca is None
    assert signed_by(switched.serving.certificate, new_ca)
    # The bundle still trusts the old CA: replicas still serving the old certificate are fine.
    assert [c.subject for c in load_certificates(switched.ca_bundle)] == [
        old_ca.subject,
        new_ca.subject,
    ]
    assert plan(switched, names=None, policy=POLICY, now=minutes(225)) is None

    step = plan(switched, names=None, policy=POLICY, now=minutes(227))
    assert step is not None and step.reasons == ("dropped the old CA from caBundle",)
    assert load_certificates(step.material.ca_bundle) == [new_ca]
    assert plan(step.material, names=None, policy=POLICY, now=minutes(228)) is None


def test_a_requested_rotation_starts_at_once_and_clears_the_request():
    m = fresh()
    requested = TLSMaterial.from_secret(request_ca_rotation(secret_of(m)))
    assert requested is not None and requested.rotate_requested
    step = plan(requested, names=None, policy=POLICY, now=minutes(1))
    assert step is not None
    assert step.reasons == ("published a new CA next to the old one (rotation requested)",)
    assert not step.material.rotate_requested and len(step.material.bundle) == 2


def test_an_expired_ca_is_replaced_outright():
    m = fresh()
    step = plan(m, names=None, policy=POLICY, now=minutes(400))
    assert step is not None and step.reasons == ("issued a new CA and serving certificate",)
    assert step.material.signing != m.signing and len(step.material.bundle) == 1


def test_material_survives_a_round_trip_through_a_secret():
    m = fresh()
    assert TLSMaterial.from_secret(secret_of(m)) == m
    info = describe(m)
    assert info["caBundle"] == 1 and info["serving"]["names"] == NAMES
    assert "KEY" not in repr(info)


# --- the renewer against an API that behaves like the real one ----------------------------------
class Conflict(Exception):
    status = 409
    reason = "Conflict"


class FakeAPI:
    """get/replace with resourceVersion checks, like the API server."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.writes: list[str] = []

    def put(self, path: str, obj: dict[str, Any]) -> None:
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = "1"
        self.objects[path] = obj

    async def get(self, path: str) -> dict[str, Any] | None:
        obj = self.objects.get(path)
        return copy.deepcopy(obj) if obj is not None else None

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        live = self.objects[path]
        if body["metadata"].get("resourceVersion") != live["metadata"]["resourceVersion"]:
            raise Conflict()
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(int(live["metadata"]["resourceVersion"]) + 1)
        self.objects[path] = stored
        self.writes.append(path)
        return copy.deepcopy(stored)


def secret_of(m: TLSMaterial) -> dict[str, Any]:
    return with_material({"metadata": {"name": "mirrorgate-tls", "namespace": "mirrorgate"}}, m)


TARGETS = RenewalTargets.for_release(
    "mirrorgate", namespace="mirrorgate", registry_namespace="docker-registry"
)


def api_with(m: TLSMaterial) -> FakeAPI:
    api = FakeAPI()
    api.put(secret_path("mirrorgate", "mirrorgate-tls"), secret_of(m))
    for kind in ("mutating", "validating"):
        hook = {"name": f"{kind}.mirrorgate.io", "clientConfig": {"caBundle": "b2xk"}}
        api.put(
            webhook_configuration_path(kind, "mirrorgate"),
            {"metadata": {"name": "mirrorgate"}, "webhooks": [hook]},
        )
    api.put(
        config_map_path("docker-registry", "mirrorgate-ca"),
        {"metadata": {"name": "mirrorgate-ca"}, "data": {"ca.crt": "old"}},
    )
    return api


def stored(api: FakeAPI) -> TLSMaterial:
    m = TLSMaterial.from_secret(api.objects[secret_path("mirrorgate", "mirrorgate-tls")])
    assert m is not None
    return m


def bundles(api: FakeAPI) -> list[bytes]:
    out = []
    for kind in ("mutating", "validating"):
        (hook,) = api.objects[webhook_configuration_path(kind, "mirrorgate")]["webhooks"]
        out.append(base64.b64decode(hook["clientConfig"]["caBundle"]))
    cm = api.objects[config_map_path("docker-registry", "mirrorgate-ca")]
    out.append(cm["data"]["ca.crt"].encode())
    return out


async def test_the_renewer_publishes_every_step_to_each_ca_bundle_consumer(caplog):
    caplog.set_level(logging.DEBUG)
    m = fresh()
    api = api_with(m)
    clock = {"now": minutes(1)}
    renewer = CertRenewer(api, TARGETS, policy=POLICY, now=lambda: clock["now"])

    first = await renewer.reconcile()
    assert first == (
        "caBundle of mutating webhook configuration mirrorgate updated",
        "caBundle of validating webhook configuration mirrorgate updated",
        "CA ConfigMap docker-registry/mirrorgate-ca updated",
    )
    assert bundles(api) == [m.ca_bundle] * 3
    assert await renewer.reconcile() == ()  # nothing due, nothing written

    seen = []
    for at in (205, 216, 227):
        clock["now"] = minutes(at)
        await renewer.reconcile()
        seen.append(len(load_certificates(bundles(api)[0])))
        assert len({*bundles(api)}) == 1  # every consumer holds the same bundle
        assert bundles(api)[0] == stored(api).ca_bundle
    assert seen == [2, 2, 1]
    final = stored(api)
    assert signed_by(final.serving.certificate, final.signing.certificate)
    assert final.signing != m.signing
    # No key material in any log line.
    text = caplog.text
    assert "PRIVATE KEY" not in text
    for pair in (m.signing, m.serving, final.signing, final.serving):
        assert pair.key_pem.decode().splitlines()[1] not in text


async def test_two_replicas_renewing_at_once_write_once_and_the_loser_rereads():
    api = api_with(fresh())
    a = CertRenewer(api, TARGETS, policy=POLICY, now=lambda: minutes(61))
    b = CertRenewer(api, TARGETS, policy=POLICY, now=lambda: minutes(61))
    secret = secret_path("mirrorgate", "mirrorgate-tls")
    stale = await api.get(secret)
    await a.reconcile()
    # b decided on the Secret as it was before a's write: the API server refuses its write.
    with pytest.raises(Conflict):
        await api.replace(secret, with_material(stale, stored(api)))
    assert api.writes.count(secret) == 1
    assert await b.reconcile() == ()  # re-read: a already renewed it


async def test_the_renewer_loop_survives_errors_and_stops_when_cancelled(caplog):
    class Broken(FakeAPI):
        async def get(self, path: str) -> dict[str, Any] | None:
            raise OSError(111, "Connection refused")

    renewer = CertRenewer(Broken(), TARGETS, policy=POLICY, interval=0.01)
    async with renewer.running():
        await asyncio.sleep(0.05)
    assert "certificate renewal failed: ConnectionRefusedError: Connection refused" in caplog.text


def test_certs_issue_writes_a_ca_and_a_serving_pair_for_the_service(tmp_path):
    out = tmp_path / "pki"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirrorgate.webhook.cli",
            "certs",
            "issue",
            "--service",
            "mg",
            "--namespace",
            "infra",
            "--out",
            str(out),
            "--name",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert subject_names(cert) == [*service_names("mg", "infra"), "127.0.0.1"]
    assert signed_by(cert, ca)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=90) < lifetime <= dt.timedelta(days=90, minutes=5)
    assert "PRIVATE KEY" not in result.stdout


@pytest.mark.parametrize(
    ("env", "extra", "expected"),
    [
        pytest.param({}, "", None, id="serve outside a deploy renews nothing"),
        pytest.param(
            {"MIRRORGATE_TLS_SECRET": "mg-tls"},
            "certs: {mode: cert-manager}\n",
            None,
            id="cert-manager renews itself",
        ),
        pytest.param(
            {"MIRRORGATE_TLS_SECRET": "mg-tls"},
            "",
            "mg-tls",
            id="a deployed serve renews its own Secret",
        ),
    ],
)
def test_serve_runs_the_renewer_only_where_deploy_put_it(monkeypatch, env, extra, expected):
    from mirrorgate.deploy.config import parse_config
    from mirrorgate.webhook.cli import serve_cert_renewal

    monkeypatch.delenv("MIRRORGATE_TLS_SECRET", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = parse_config("deploy: {name: mg, namespace: mg-system}\n" + extra)
    renewal = serve_cert_renewal(config, own_namespace="mg-system")
    renewer = CertRenewer.for_release(object(), renewal) if renewal else None
    if expected is None:
        assert renewer is None
    else:
        assert renewer.targets.namespace == "mg-system"
        assert renewer.targets.secret == expected
        assert renewer.targets.mutating_webhooks == ("mg",)
