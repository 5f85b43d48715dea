"""The vulnerability gate against a real registry and the Clair stand-in.

Images are pushed with skopeo to a real docker-registry (TLS + htpasswd); Clair (the stand-in)
fetches their layers from it with the Authorization header mirrorgate hands over, so a wrong URL or
credential fails here as it would against real Clair. Reports are Clair's real report files.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mirrorgate.devtools.localcluster import free_port
from mirrorgate.webhook.core.config import parse_config
from mirrorgate.webhook.infra.metrics import Metrics
from mirrorgate.webhook.server.app import Settings, create_app
from mirrorgate.webhook.server.gate import NAMESPACE_LABELS, SCANNER
from tests.helpers.admission import pod_review as review
from tests.helpers.admission import write_gate_config as write_config
from tests.helpers.clair_standin import make_psk_jwt
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.registries import HarnessRegistry, push_image, skopeo_inspect_raw


async def gate(
    aiohttp_client,
    config_path: Path,
    metrics: Metrics | None = None,
    namespace_labels: dict[str, dict[str, str]] | None = None,
):
    app = create_app(Settings(parse_config(config_path.read_text())), metrics=metrics)
    if namespace_labels is not None:
        app[NAMESPACE_LABELS] = namespace_labels.get
    client = await aiohttp_client(app)
    return app, client


async def validate(client, body: dict[str, Any], *, timeout: str = "10s") -> dict[str, Any]:
    r = await client.post(f"/validate?timeout={timeout}", json=body)
    assert r.status == 200, await r.text()
    return (await r.json())["response"]


@pytest.fixture
def images(htpasswd_registry):
    """Push a clean and a vulnerable image (distinct content) and return their references."""
    tag = secrets.token_hex(4)
    clean_digest = push_image(htpasswd_registry, "gate/clean", tag)
    vuln_digest = push_image(htpasswd_registry, "gate/vulnerable", tag)
    host = htpasswd_registry.host
    return {
        "clean": (f"{host}/gate/clean:{tag}", clean_digest),
        "vulnerable": (f"{host}/gate/vulnerable:{tag}", vuln_digest),
    }


async def test_a_clean_image_passes_and_a_vulnerable_one_is_denied_with_its_findings(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    clean, clean_digest = images["clean"]
    vuln, vuln_digest = images["vulnerable"]
    clair.set_report(vuln_digest, "trimmed")
    metrics = Metrics()
    _, client = await gate(
        aiohttp_client, write_config(tmp_path, clair, htpasswd_registry), metrics
    )

    ok = await validate(client, review(clean))
    assert ok["allowed"] is True and "warnings" not in ok
    assert ok["auditAnnotations"] == {"image-0": f"{clean} pass {clean_digest}"}

    denied = await validate(client, review(clean, vuln))
    assert denied["allowed"] is False and denied["status"]["code"] == 403
    message = denied["status"]["message"]
    assert message.startswith(
        f"image {vuln} ({vuln_digest[:19]}...) has 1 vulnerability at or above High:"
    )
    assert (
        "RHSA-2023:5837 (CVE-2023-44487) High in libnghttp2 1.33.0-3.el8_2.1, fixed in "
        "0:1.33.0-5.el8_8" in message
    )
    assert "add to scan.allow" in message
    # Clair fetched every layer itself from the registry, once per manifest.
    assert clair.index_count(clean_digest) == 1 and clair.index_count(vuln_digest) == 1
    (request,) = [r for r in clair.index_requests if r.manifest == vuln_digest]
    assert all(
        uri.startswith(f"https://{htpasswd_registry.host}/v2/gate/vulnerable/blobs/")
        for uri in request.layer_uris
    )
    rejected = metrics.registry.get_sample_value(
        "mirrorgate_images_rejected_total", {"namespace": "team-a", "reason": "fail"}
    )
    assert rejected == 1


@pytest.mark.parametrize(
    ("scan", "allowed"),
    [
        pytest.param("  blockSeverity: Critical\n", True, id="a Critical threshold passes it"),
        pytest.param("  blockSeverity: Medium\n", False, id="a Medium threshold denies it"),
        pytest.param(
            "  allow: [{id: CVE-2023-44487, images: ['*/gate/vulnerable*'],"
            " until: 2999-01-01, reason: test}]\n",
            True,
            id="an unexpired exception for its CVE passes it",
        ),
        pytest.param(
            "  allow: [{id: CVE-2023-44487, images: ['*/gate/vulnerable*'],"
            " until: 2020-01-01, reason: test}]\n",
            False,
            id="an expired exception does not",
        ),
    ],
)
async def test_policy_settings_change_the_verdict(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path, scan, allowed
):
    vuln, digest = images["vulnerable"]
    clair.set_report(digest, "trimmed")
    config = write_config(tmp_path, clair, htpasswd_registry, scan + "  admissionBudget: 5s\n")
    _, client = await gate(aiohttp_client, config)
    response = await validate(client, review(vuln))
    assert response["allowed"] is allowed
    if "2020-01-01" in scan:
        assert any("expired on 2020-01-01" in w for w in response["warnings"])


async def test_audit_namespaces_warn_and_count_while_enforce_namespaces_deny(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    vuln, digest = images["vulnerable"]
    clair.set_report(digest, "trimmed")
    metrics = Metrics()
    labels = {"audited": {"mirrorgate.io/scan-mode": "audit"}, "strict": {}}
    _, client = await gate(
        aiohttp_client,
        write_config(tmp_path, clair, htpasswd_registry),
        metrics,
        namespace_labels=labels,
    )

    audited = await validate(client, review(vuln, namespace="audited"))
    assert audited["allowed"] is True
    assert audited["warnings"][0].startswith("mirrorgate: audit mode, would be denied: image")
    strict = await validate(client, review(vuln, namespace="strict"))
    assert strict["allowed"] is False
    for ns in ("audited", "strict"):
        assert (
            metrics.registry.get_sample_value(
                "mirrorgate_images_rejected_total", {"namespace": ns, "reason": "fail"}
            )
            == 1
        )


async def test_an_image_not_scanned_yet_is_pending_then_passes_once_indexed(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    clean, digest = images["clean"]
    clair.index_delay = 2.0
    config = write_config(tmp_path, clair, htpasswd_registry, "  admissionBudget: 500ms\n")
    _, client = await gate(aiohttp_client, config)
    started = time.monotonic()
    first = await validate(client, review(clean))
    assert time.monotonic() - started < 1.5, "the admission waited past its budget"
    assert first["allowed"] is False
    assert "scan in progress, the controller will retry" in first["status"]["message"]
    # The index request kept running in the background: a retry (as a controller does) passes.
    deadline = time.monotonic() + 10
    while True:
        again = await validate(client, review(clean, uid="retry"))
        if again["allowed"]:
            break
        assert time.monotonic() < deadline, again
        await asyncio.sleep(0.2)
    assert clair.index_count(digest) == 1


@pytest.mark.parametrize(
    ("action", "allowed", "warned"),
    [
        pytest.param("warn", True, True, id="onUnavailable warn admits with a warning"),
        pytest.param("deny", False, False, id="onUnavailable deny denies"),
        pytest.param("allow", True, False, id="onUnavailable allow admits silently"),
    ],
)
async def test_scanner_down_follows_on_unavailable(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path, action, allowed, warned
):
    clean, _ = images["clean"]
    clair.stop()
    config = write_config(
        tmp_path, clair, htpasswd_registry, f"  onUnavailable: {action}\n  admissionBudget: 3s\n"
    )
    _, client = await gate(aiohttp_client, config)
    response = await validate(client, review(clean))
    assert response["allowed"] is allowed
    assert bool(response.get("warnings")) is warned
    text = response.get("status", {}).get("message", "") + " ".join(response.get("warnings", []))
    if action != "allow":
        assert "unavailable" in text and clair.url in text


async def test_clair_erroring_is_unavailable_not_pending(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    clean, _ = images["clean"]
    clair.fail_with(500)
    config = write_config(tmp_path, clair, htpasswd_registry, "  onUnavailable: deny\n")
    _, client = await gate(aiohttp_client, config)
    response = await validate(client, review(clean))
    assert response["allowed"] is False
    assert "could not be checked" in response["status"]["message"]


async def test_a_multi_arch_image_gets_the_worst_platform_verdict(
    aiohttp_client, clair, htpasswd_registry, tmp_path
):
    tag = secrets.token_hex(4)
    push_image(htpasswd_registry, "gate/multi", tag, multi=True)
    image = f"{htpasswd_registry.host}/gate/multi:{tag}"
    index = json.loads(
        skopeo_inspect_raw(
            f"docker://{image}",
            creds=htpasswd_registry.credentials,
            cert_dir=htpasswd_registry.cert_dir,
        )
    )
    platforms = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    clair.set_report(platforms["arm64"], "trimmed")

    _, client = await gate(aiohttp_client, write_config(tmp_path, clair, htpasswd_registry))
    response = await validate(client, review(image))
    assert response["allowed"] is False
    assert "linux/arm64" in response["status"]["message"]
    assert clair.index_count(platforms["amd64"]) == 1 and clair.index_count(platforms["arm64"]) == 1

    only_amd64 = write_config(
        tmp_path / "amd64",
        clair,
        htpasswd_registry,
        "  platforms: [linux/amd64]\n  admissionBudget: 5s\n",
    )
    _, client = await gate(aiohttp_client, only_amd64)
    assert (await validate(client, review(image)))["allowed"] is True


async def test_fifty_concurrent_admissions_of_a_new_image_cause_one_index_request(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    clean, digest = images["clean"]
    clair.index_delay = 0.5
    _, client = await gate(aiohttp_client, write_config(tmp_path, clair, htpasswd_registry))
    responses = await asyncio.gather(
        *(validate(client, review(clean, uid=f"u{i}")) for i in range(50))
    )
    assert all(r["allowed"] for r in responses)
    assert clair.index_count(digest) == 1
    reports = clair.request_count("GET", "/matcher/api/v1/vulnerability_report/")
    assert reports <= 3  # one before indexing, one after; never one per admission


async def test_a_clair_notification_drops_cached_verdicts(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    clean, digest = images["clean"]
    app, client = await gate(aiohttp_client, write_config(tmp_path, clair, htpasswd_registry))
    assert (await validate(client, review(clean)))["allowed"] is True
    # New vulnerabilities are matched to the image: until Clair says so, the cached verdict holds.
    clair.set_report(digest, "trimmed")
    assert (await validate(client, review(clean, uid="cached")))["allowed"] is True

    status = await clair.notify_async(str(client.make_url("/events/clair")), {digest: "added"})
    assert status == 200
    # A repeated delivery is answered 200 too, and processed once.
    assert (
        await clair.notify_async(
            str(client.make_url("/events/clair")),
            {digest: "added"},
            notification_id=clair.last_notification_id,
        )
        == 200
    )
    deadline = time.monotonic() + 10
    while clair.deletes < 1:
        assert time.monotonic() < deadline, "the notification was never acknowledged"
        await asyncio.sleep(0.05)
    assert (await validate(client, review(clean, uid="after")))["allowed"] is False
    assert clair.deletes == 1 and clair.page_gets >= 1

    unsigned = await clair.notify_async(
        str(client.make_url("/events/clair")), {digest: "added"}, signed=False
    )
    assert unsigned == 401


async def test_scan_on_push_indexes_before_any_pod_asks(
    aiohttp_client, clair, htpasswd_registry, registry_pki, tmp_path
):
    token = secrets.token_hex(16)
    # A second real registry that notifies mirrorgate of pushes, as the deployer configures it.
    # Its address goes into mirrorgate's config before it starts, mirrorgate's into its config.
    port = free_port()
    config = write_config(tmp_path, clair, htpasswd_registry, events_token=token)
    config.write_text(config.read_text().replace(htpasswd_registry.host, f"127.0.0.1:{port}"))
    _, client = await gate(aiohttp_client, config)
    notifying = HarnessRegistry(
        tmp_path / "notifying",
        pki=registry_pki,
        credentials=htpasswd_registry.credentials,
        extra_config={
            "notifications": {
                "endpoints": [
                    {
                        "name": "mirrorgate",
                        "url": str(client.make_url("/events/registry")),
                        "headers": {"Authorization": [f"Bearer {token}"]},
                        "timeout": "3s",
                        "threshold": 3,
                        "backoff": "500ms",
                    }
                ]
            }
        },
    )
    notifying.port = port
    with notifying:
        digest = await asyncio.to_thread(push_image, notifying, "gate/pushed", "v1")
        deadline = time.monotonic() + 15
        while clair.index_count(digest) < 1:
            assert time.monotonic() < deadline, "the push was never indexed"
            await asyncio.sleep(0.1)
    assert clair.index_count(digest) == 1


async def test_event_endpoints_refuse_callers_without_credentials(
    aiohttp_client, clair, htpasswd_registry, tmp_path
):
    _, client = await gate(
        aiohttp_client, write_config(tmp_path, clair, htpasswd_registry, events_token="s3cret")
    )
    r = await client.post("/events/registry", json={"events": []})
    assert r.status == 401
    r = await client.post(
        "/events/registry", json={"events": []}, headers={"Authorization": "Bearer wrong"}
    )
    assert r.status == 401
    r = await client.post(
        "/events/registry", json={"events": []}, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status == 200
    # A callback elsewhere than scan.clair.url is refused even from an authenticated caller.
    r = await client.post(
        "/events/clair",
        headers={"Authorization": "Bearer s3cret"},
        json={"notification_id": "x", "callback": "http://evil.example/cb"},
    )
    assert r.status == 400


async def test_update_judges_only_images_the_update_brings(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    vuln, digest = images["vulnerable"]
    clean, _ = images["clean"]
    clair.set_report(digest, "trimmed")
    app, client = await gate(aiohttp_client, write_config(tmp_path, clair, htpasswd_registry))
    unrelated = await validate(client, review(vuln, operation="UPDATE", old=[vuln]))
    assert unrelated["allowed"] is True and "auditAnnotations" not in unrelated
    changed = await validate(client, review(vuln, operation="UPDATE", old=[clean]))
    assert changed["allowed"] is False
    assert app[SCANNER].index_requests == 1


def test_mirrorgate_scan_exit_codes_and_output(clair, htpasswd_registry, images, tmp_path):
    clean, _ = images["clean"]
    vuln, digest = images["vulnerable"]
    clair.set_report(digest, "trimmed")
    config = write_config(tmp_path, clair, htpasswd_registry)

    def scan(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [mirrorgate_exe(), "scan", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = scan(clean)
    assert ok.returncode == 0 and ok.stdout.startswith(f"{clean}: pass sha256:")
    bad = scan("--json", clean, vuln)
    assert bad.returncode == 1
    report = {v["image"]: v for v in json.loads(bad.stdout)}
    assert report[vuln]["outcome"] == "fail"
    assert report[vuln]["findings"][0]["id"] == "RHSA-2023:5837"
    assert report[vuln]["findings"][0]["fixedIn"] == "0:1.33.0-5.el8_8"
    clair.stop()
    down = scan("--timeout", "5", clean)
    assert down.returncode == 2 and "could not be checked" in down.stdout


def test_through_the_api_server_a_vulnerable_pod_is_denied_with_the_findings(
    control_plane, clair, htpasswd_registry, images, tmp_path
):
    from mirrorgate.deploy.webhooks import validating_webhook_configuration
    from mirrorgate.devtools.demo import LocalWebhook
    from tests.helpers.kubehttp import KubeHTTP

    clean, _ = images["clean"]
    vuln, digest = images["vulnerable"]
    clair.set_report(digest, "trimmed")
    config = write_config(tmp_path, clair, htpasswd_registry)
    kapi = KubeHTTP(control_plane.url, control_plane.admin_token, str(control_plane.ca_file))
    label = "e2e.mirrorgate.io/gate"
    ns = f"e2e-gate-{secrets.token_hex(3)}"
    kapi.create_namespace(ns, {label: "true"})
    # serve with API access (its Lease in a namespace of its own): denials become Events.
    system = f"{ns}-mg"
    kapi.create_namespace(system)
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", token=control_plane.admin_token
    )
    env = {"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": system, "POD_NAME": "gate-0"}
    hooks = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
    with LocalWebhook(tmp_path / "serve", config, env=env) as webhook:
        body = validating_webhook_configuration(
            "e2e-gate",
            url=webhook.url,
            ca_pem=webhook.ca_pem,
            failure_policy="Fail",
            namespace_selector={"matchLabels": {label: "true"}},
            side_effects="NoneOnDryRun",
        )
        assert kapi.request("POST", hooks, body).status == 201
        try:

            def pod(name: str, image: str) -> dict[str, Any]:
                return {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name},
                    "spec": {"containers": [{"name": "app", "image": image}]},
                }

            deadline = time.monotonic() + 20
            while True:  # the API server picks the configuration up within a second or so
                denied = kapi.create_pod(ns, pod("bad", vuln))
                if denied.status != 201:
                    break
                kapi.request("DELETE", f"/api/v1/namespaces/{ns}/pods/bad")
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert denied.status == 403
            assert denied.message.startswith(
                f'admission webhook "validate.mirrorgate.io" denied the request: image {vuln} ('
            )
            assert "RHSA-2023:5837 (CVE-2023-44487) High in libnghttp2" in denied.message
            assert kapi.create_pod(ns, pod("good", clean)).status == 201
            # A dry run is denied just the same, and leaves no Event behind.
            dry = kapi.create_pod(ns, pod("bad-dry-run", vuln), dry_run=True)
            assert dry.status == 403

            # What `kubectl get events` shows the user whose pod never came to exist.
            kubectl = control_plane.kubectl()

            def denied_events() -> list[dict[str, Any]]:
                listed = kubectl.run(
                    "get", "events", "-n", ns, "--field-selector=reason=ImageDenied", "-o", "json"
                )
                return list(json.loads(listed.stdout)["items"])

            deadline = time.monotonic() + 15
            while not (found := denied_events()) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # a dry-run Event, had there been one, has had time to arrive
            found = denied_events()
            assert [e["involvedObject"]["name"] for e in found] == ["bad"], found
            (event,) = found
            assert (event["type"], event["source"]["component"]) == ("Warning", "mirrorgate")
            assert event["message"].startswith(f"image {vuln} (")
            assert "CVE-2023-44487" in event["message"]
            table = kubectl.run("get", "events", "-n", ns).stdout
            assert re.search(r"Warning\s+ImageDenied\s+pod/bad\s+image ", table), table
        finally:
            kapi.request("DELETE", f"{hooks}/e2e-gate")


async def test_event_endpoints_answer_odd_bodies_and_odd_tokens_without_a_500(
    aiohttp_client, clair, htpasswd_registry, tmp_path
):
    """On c698f4d: {"events": 5} and a PSK-signed JWT with exp 10**400 were 500s, and a signed
    JWT without exp was accepted forever."""
    _, client = await gate(
        aiohttp_client, write_config(tmp_path, clair, htpasswd_registry, events_token="s3cret")
    )
    auth = {"Authorization": "Bearer s3cret"}
    for body in ({"events": 5}, {"events": [5, {"target": 7}, {"action": "push", "target": []}]}):
        r = await client.post("/events/registry", json=body, headers=auth)
        assert r.status in (200, 400), (body, r.status)
    r = await client.post("/events/registry", json={"events": 5}, headers=auth)
    assert r.status == 400 and "events: [...]" in await r.text()

    notification = {"notification_id": "n1", "callback": f"{clair.url}/notifier/api/v1/n/n1"}
    huge = make_psk_jwt(clair.psk_b64, "clair-notifier", claims={"exp": 10**400})
    no_exp = make_psk_jwt(clair.psk_b64, "clair-notifier", claims={"exp": None})
    for token, expected in ((huge, 200), (no_exp, 401)):
        r = await client.post(
            "/events/clair", json=notification, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status == expected, (token[:20], r.status, await r.text())
    r = await client.post(
        "/events/clair", json={"notification_id": 5, "callback": []}, headers=auth
    )
    assert r.status == 400


async def test_rejections_in_thousands_of_namespaces_add_a_bounded_number_of_series(
    aiohttp_client, clair, htpasswd_registry, images, tmp_path
):
    """A client naming a new namespace per review (5,000 on c698f4d: 5,000 series, /metrics
    5 KB -> 3.2 MB) gets the first 1,000 namespaces their own series and the rest "other"; with
    the cluster's namespaces known (the watch), names the cluster lacks are "other" at once."""
    vuln, vuln_digest = images["vulnerable"]
    clair.set_report(vuln_digest, "trimmed")
    metrics = Metrics()
    config = write_config(tmp_path, clair, htpasswd_registry)
    _, client = await gate(aiohttp_client, config, metrics)
    for i in range(1200):
        denied = await validate(client, review(vuln, uid=f"u{i}", namespace=f"ns-{i}"))
        assert denied["allowed"] is False
    series = {
        s.labels["namespace"]
        for family in metrics.registry.collect()
        if family.name == "mirrorgate_images_rejected"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert len(series) == 1001 and "other" in series and "ns-999" in series
    other = {"namespace": "other", "reason": "fail"}
    assert metrics.registry.get_sample_value("mirrorgate_images_rejected_total", other) == 200

    known = Metrics()
    _, watched = await gate(aiohttp_client, config, known, namespace_labels={"payments": {}})
    for ns in ("payments", "made-up-1", "made-up-2"):
        await validate(watched, review(vuln, namespace=ns))
    values = {
        s.labels["namespace"]
        for f in known.registry.collect()
        for s in f.samples
        if f.name == "mirrorgate_images_rejected"
    }
    assert values == {"payments", "other"}
