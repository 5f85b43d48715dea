"""The Helm chart (deploy/chart/mirrorgate), through Helm's own engine (helm_python binds Helm v4).

One source of truth: for each config below, the chart rendered with ``config: <mirrorgate.yaml>``
yields the same objects as ``mirrorgate deploy render`` for that mirrorgate.yaml (kind, name,
namespace, labels, specs, the config files inside ConfigMaps), apart from what is generated
(Secret values, certificates, caBundles, config-hash annotations) and Helm's own
``helm.sh/resource-policy``. A change to the renderer that the chart does not follow, or the
other way round, fails here. Secret values are never shown: failures print masked objects.
"""

from __future__ import annotations

import base64
import copy
import difflib
import json
import re
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import bcrypt
import helm_python
import pytest
import yaml

from mirrorgate.certs.pki import load_certificates, service_names, subject_names
from mirrorgate.certs.rotation import TLSMaterial
from mirrorgate.deploy.config import config_from_dict
from mirrorgate.deploy.material import Existing, decide, serving_names
from mirrorgate.deploy.render import Capabilities, object_key, render
from mirrorgate.webhook import __version__
from tests.helpers.commands import mirrorgate_exe

CHART = Path(__file__).resolve().parents[1] / "deploy" / "chart" / "mirrorgate"
README = CHART.parent / "README.md"
MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
# Generated per install or per render, or Helm's: compared by presence, not value.
GENERATED_ANNOTATIONS = ("mirrorgate.io/config-hash", "helm.sh/resource-policy")
# Helm sets app.kubernetes.io/managed-by to "Helm" on every object it applies.
MANAGED_BY = "app.kubernetes.io/managed-by"
SECRET = "<secret>"

helm_python.disable_logging()

NODE_PORT = {
    "pullSecret": {"name": "mirrorgate-pull", "source": "docker-registry/mirrorgate-pull"},
    "namespaces": {"mode": "optIn", "exclude": ["kube-system", "legacy"]},
    "registry": {
        "namespace": "docker-registry",
        "pullPath": "nodePort",
        "nodePort": 31000,
        "auth": {"username": "mirrorgate", "bcryptCost": 4},
        "storage": {"filesystem": {"size": "50Gi", "storageClass": "standard"}},
        "proxies": [
            {
                "upstream": "docker.io",
                "remoteURL": "https://registry-1.docker.io",
                "nodePort": 31001,
            },
            {"upstream": "GHCR.io", "remoteURL": "https://ghcr.io/", "nodePort": 31002},
        ],
    },
    "deploy": {"image": "registry.example.org/mirrorgate:0.1.0", "replicas": 3},
}
INGRESS_TLS = {
    "pullSecret": {"name": "pull", "source": "registry/pull", "patchServiceAccounts": True},
    "namespaces": {"mode": "clusterWide"},
    "verifyTimeout": "4500ms",
    "registry": {
        "namespace": "registry",
        "pullPath": "ingress",
        "proxies": [
            {"upstream": "index.docker.io", "remoteURL": "https://registry-1.docker.io"},
            {"upstream": "quay.io", "remoteURL": "https://quay.io", "host": "quay.example.org"},
        ],
        "ingress": {
            "className": "public",
            "host": "registry.example.org",
            "tls": {"issuer": "letsencrypt", "issuerKind": "Issuer"},
        },
        "gcSchedule": "0 4 * * 6",
    },
}
S3 = {
    "pullSecret": {"name": "mirrorgate-pull", "source": "images/mirrorgate-pull"},
    "events": False,
    "registry": {
        "namespace": "images",
        "image": "docker.io/library/registry:2.8.2",
        "nodePort": 30500,
        "storage": {
            "s3": {
                "bucket": "images",
                "region": "eu-west-1",
                "regionEndpoint": "https://s3.example.org",
                "secretRef": "s3-keys",
            }
        },
        "proxies": [
            {
                "upstream": "docker.io",
                "remoteURL": "https://registry-1.docker.io",
                "nodePort": 30501,
                "credentialsSecret": "hub-login",
            }
        ],
        "ingress": {"host": "push.example.org", "tls": {"secretName": "push-tls"}},
    },
    "deploy": {"replicas": 1},
}
GATE = {
    "pullSecret": {"name": "mirrorgate-pull", "source": "docker-registry/mirrorgate-pull"},
    "registry": {"nodePort": 31000},
    "scan": {
        "clair": {"url": "http://clair.clair.svc:6060", "pskFile": "/etc/mirrorgate/clair/psk"},
        "admissionBudget": "7s",
    },
    "deploy": {
        "failurePolicy": "Fail",
        "secretMounts": [{"secret": "clair-psk", "path": "/etc/mirrorgate/clair/"}],
    },
    "certs": {"caDuration": "730d", "servingDuration": "60d"},
}
CERT_MANAGER = {
    "registry": None,
    "pullSecret": {"name": "pull"},
    "certs": {"mode": "cert-manager", "caDuration": "8760h", "servingDuration": "2000h"},
    "deploy": {"name": "gate", "replicas": 2, "failurePolicy": "Ignore"},
    "events": False,
    "scan": {"clair": {"url": "http://clair:6060", "pskFile": "/psk"}, "running": "deny"},
}
CASES = [
    pytest.param(NODE_PORT, "mirrorgate", "mirrorgate", False, id="nodeport registry with caches"),
    pytest.param(INGRESS_TLS, "mg", "tools", False, id="ingress with cert-manager tls"),
    pytest.param(S3, "mirrorgate", "mirrorgate", False, id="s3 storage and one replica"),
    pytest.param(GATE, "mirrorgate", "mirrorgate", True, id="gate on with monitoring"),
    pytest.param(
        CERT_MANAGER,
        "mirrorgate",
        "mirrorgate",
        False,
        id="cert-manager webhook only, gate without events",
    ),
]


# --- helpers --------------------------------------------------------------------------------------
def values_for(config: Mapping[str, Any], *, monitoring: bool) -> dict[str, Any]:
    """Chart values for a mirrorgate.yaml. Values replace the chart's defaults key by key (Helm
    merges maps), so a default the config leaves out is set to null (= removed)."""
    defaults = chart_defaults()["config"]
    doc: dict[str, Any] = {key: None for key in defaults}
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            value = {**{k: None for k in defaults[key]}, **value}
        doc[key] = copy.deepcopy(value)
    return {"config": doc, "monitoring": {"enabled": monitoring}}


def chart_defaults() -> dict[str, Any]:
    with helm_python.Chart.load(CHART) as chart:
        return chart.values


def merged_config(values: Mapping[str, Any], *, release: str, namespace: str) -> dict[str, Any]:
    """The mirrorgate.yaml the release uses: Helm's merge of the values, plus deploy.name and
    deploy.namespace (the release's)."""
    with helm_python.Chart.load(CHART) as chart:
        doc: dict[str, Any] = chart.merge_values(dict(values))["config"]
    deploy = dict(doc.get("deploy") or {})
    deploy.setdefault("name", release)
    deploy["namespace"] = namespace
    doc["deploy"] = deploy
    return doc


def helm_render(
    values: Mapping[str, Any], *, release: str = "mirrorgate", namespace: str = "mirrorgate"
) -> list[dict[str, Any]]:
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(dict(values), name=release, namespace=namespace)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def deploy_render(
    values: Mapping[str, Any], *, release: str, namespace: str, monitoring: bool
) -> list[dict[str, Any]]:
    doc = merged_config(values, release=release, namespace=namespace)
    config = config_from_dict(doc, source="/nonexistent/mirrorgate.yaml")
    material = decide(config, Existing(), names=serving_names(config))
    caps = Capabilities.for_version(1, 30, monitoring=monitoring, cert_manager=True)
    # The release namespace is Helm's (`helm install --create-namespace`), not the chart's.
    return [
        o
        for o in render(config, material, capabilities=caps).objects
        if (o["kind"], o["metadata"]["name"]) != ("Namespace", namespace)
    ]


def comparable(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` without generated values; Secret values masked, config files parsed."""
    out = copy.deepcopy(dict(obj))
    meta = out["metadata"]
    for labels in _label_maps(out):
        if labels.get(MANAGED_BY) in ("mirrorgate", "Helm"):
            labels[MANAGED_BY] = "<mirrorgate or Helm>"
    annotations = {
        k: v
        for k, v in (meta.pop("annotations", None) or {}).items()
        if k not in GENERATED_ANNOTATIONS and not k.startswith("mirrorgate.io/")
    }
    if annotations:
        meta["annotations"] = annotations
    for template in _pod_templates(out):
        template.get("metadata", {}).pop("annotations", None)
    if out["kind"] == "Secret":
        out["data"] = {k: SECRET for k in out.get("data") or {}}
    if out["kind"] == "ConfigMap":
        data = out["data"]
        for key, text in data.items():
            if key.endswith((".yml", ".yaml")):
                data[key] = yaml.safe_load(text)
            elif key.endswith(".json"):
                data[key] = json.loads(text)
            elif key == "ca.crt":
                data[key] = SECRET if text else ""
    for hook in out.get("webhooks", []):
        hook["clientConfig"].pop("caBundle", None)
    return out


def _label_maps(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield obj["metadata"].setdefault("labels", {})
    for template in _pod_templates(obj):
        yield template.setdefault("metadata", {}).setdefault("labels", {})


def _pod_templates(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj.get("spec") or {}
    if "template" in spec:
        yield spec["template"]
    if "jobTemplate" in spec:
        yield spec["jobTemplate"]["spec"]["template"]


def keyed(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {object_key(o): comparable(o) for o in objects}
    assert len(out) == len(objects), "two objects share kind, namespace and name"
    return out


def differences(chart: list[dict[str, Any]], renderer: list[dict[str, Any]]) -> str:
    """What differs, as a diff of masked objects (empty when the sets are equal)."""
    ours, theirs = keyed(chart), keyed(renderer)
    lines = [f"only in the chart: {k}" for k in sorted(ours.keys() - theirs.keys())]
    lines += [f"only in deploy render: {k}" for k in sorted(theirs.keys() - ours.keys())]
    for key in sorted(ours.keys() & theirs.keys()):
        if ours[key] != theirs[key]:
            a = yaml.safe_dump(theirs[key], sort_keys=True).splitlines()
            b = yaml.safe_dump(ours[key], sort_keys=True).splitlines()
            diff = difflib.unified_diff(a, b, "deploy render", "chart", lineterm="", n=2)
            lines += [f"{key}:", *diff]
    return "\n".join(lines)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def decoded(secret: Mapping[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


# --- one source of truth --------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "release", "namespace", "monitoring"), CASES)
def test_the_chart_renders_what_deploy_render_renders_for_the_same_config(
    config: dict[str, Any], release: str, namespace: str, monitoring: bool
) -> None:
    values = values_for(config, monitoring=monitoring)
    chart = helm_render(values, release=release, namespace=namespace)
    renderer = deploy_render(values, release=release, namespace=namespace, monitoring=monitoring)
    assert differences(chart, renderer) == ""
    assert len(chart) == len(renderer) > 10


def test_the_chart_defaults_are_a_config_deploy_render_accepts() -> None:
    values = {"monitoring": {"enabled": False}}
    chart = helm_render(values)
    renderer = deploy_render(values, release="mirrorgate", namespace="mirrorgate", monitoring=False)
    assert differences(chart, renderer) == ""
    service = find(chart, "Service", "registry")
    assert service["spec"]["ports"][0]["nodePort"] == 31000


def test_the_chart_matches_the_mirrorgate_deploy_render_command(tmp_path: Path) -> None:
    """The command itself, as a GitOps user runs it: Secrets are listed by name and keys."""
    values = values_for(GATE, monitoring=True)
    config = tmp_path / "mirrorgate.yaml"
    doc = merged_config(values, release="mirrorgate", namespace="mirrorgate")
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    done = subprocess.run(
        [mirrorgate_exe(), "deploy", "render", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = dict(re.findall(r"^#   Secret (\S+) \(keys: ([^)]*)\)$", done.stdout, re.MULTILINE))
    printed = [d for d in yaml.safe_load_all(done.stdout) if d]
    printed = [
        o for o in printed if (o["kind"], o["metadata"]["name"]) != ("Namespace", "mirrorgate")
    ]
    chart = helm_render(values)
    secrets_in_chart = {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": ", ".join(sorted(o["data"]))
        for o in chart
        if o["kind"] == "Secret"
    }
    assert secrets_in_chart == listed
    assert differences([o for o in chart if o["kind"] != "Secret"], printed) == ""


def test_the_readmes_values_example_installs_what_deploy_render_renders() -> None:
    text = README.read_text(encoding="utf-8")
    example = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    chart = helm_render(example)
    renderer = deploy_render(
        example, release="mirrorgate", namespace="mirrorgate", monitoring=False
    )
    assert differences(chart, renderer) == ""
    hosts = find(chart, "Ingress", "registry")["spec"]["tls"][0]["hosts"]
    assert hosts == [
        "registry.example.org",
        "docker-io.registry.example.org",
        "ghcr-io.registry.example.org",
    ]


def test_a_changed_renderer_would_be_caught_by_the_comparison() -> None:
    values = values_for(NODE_PORT, monitoring=False)
    chart = helm_render(values)
    renderer = deploy_render(values, release="mirrorgate", namespace="mirrorgate", monitoring=False)
    find(renderer, "Deployment", "registry")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["memory"] = "1Gi"
    problem = differences(chart, renderer)
    assert "('Deployment', 'docker-registry', 'registry')" in problem
    assert "memory: 1Gi" in problem


# --- what the chart generates ---------------------------------------------------------------------
def test_generated_secrets_agree_with_each_other_and_never_match_between_renders() -> None:
    values = values_for(GATE, monitoring=False)
    first, second = helm_render(values), helm_render(values)
    creds = find(first, "Secret", "registry-credentials")
    password = decoded(creds, "password")
    assert decoded(creds, "username") == "mirrorgate" and len(password) >= 32
    user, _, hashed = decoded(find(first, "Secret", "registry-auth"), "htpasswd").partition(":")
    assert user == "mirrorgate" and bcrypt.checkpw(password.encode(), hashed.encode())
    # Secret values are compared into a flag, so a failure does not print them.
    for name in ("mirrorgate-pull", "mirrorgate-registry-auth"):
        auths = json.loads(decoded(find(first, "Secret", name), ".dockerconfigjson"))["auths"]
        assert set(auths) == {"127.0.0.1:31000"}
        auth = base64.b64decode(auths["127.0.0.1:31000"]["auth"]).decode()
        holds_password = auth == f"mirrorgate:{password}"
        assert holds_password, f"{name} does not hold the registry's credentials"
    notifications = yaml.safe_load(
        decoded(find(first, "Secret", "registry-secrets"), "notifications")
    )
    token = decoded(find(first, "Secret", "mirrorgate-events"), "token")
    carries_token = notifications[0]["headers"]["Authorization"] == [f"Bearer {token}"]
    assert carries_token, "the registry's notifications do not carry the events token"
    assert notifications[0]["url"] == "https://mirrorgate.mirrorgate.svc:443/events/registry"
    fresh = decoded(find(second, "Secret", "registry-credentials"), "password") != password
    assert fresh, "two renders without a cluster generated the same password"


def test_a_given_registry_password_is_the_one_in_the_htpasswd_and_the_pull_secrets() -> None:
    password = secrets.token_urlsafe(18)
    objects = helm_render({**values_for(NODE_PORT, monitoring=False), "registryPassword": password})
    given = decoded(find(objects, "Secret", "registry-credentials"), "password") == password
    assert given, "registry-credentials does not hold registryPassword"
    line = decoded(find(objects, "Secret", "registry-auth"), "htpasswd")
    assert bcrypt.checkpw(password.encode(), line.partition(":")[2].encode())
    auths = json.loads(decoded(find(objects, "Secret", "mirrorgate-pull"), ".dockerconfigjson"))
    assert sorted(auths["auths"]) == ["127.0.0.1:31000", "127.0.0.1:31001", "127.0.0.1:31002"]
    expected = base64.b64encode(f"mirrorgate:{password}".encode()).decode()
    holds_password = all(a["auth"] == expected for a in auths["auths"].values())
    assert holds_password, "the pull secret does not hold registryPassword"


def test_generated_certificates_are_what_the_webhook_renews_and_the_api_server_trusts() -> None:
    objects = helm_render(values_for(GATE, monitoring=False), namespace="tools")
    secret = find(objects, "Secret", "mirrorgate-tls")
    assert secret["type"] == "kubernetes.io/tls"
    material = TLSMaterial.from_secret(secret)
    assert material is not None and material.serving and material.signing
    (serving,) = load_certificates(material.serving.cert_pem)
    assert subject_names(serving) == service_names("mirrorgate", "tools")
    lifetime = serving.not_valid_after_utc - serving.not_valid_before_utc
    assert 59 <= lifetime.days <= 60
    bundle = base64.b64decode(secret["data"]["ca.crt"])
    assert load_certificates(bundle) and material.ca_bundle == bundle
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        hook = find(objects, kind, "mirrorgate")["webhooks"][0]
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == bundle
    ca_map = find(objects, "ConfigMap", "mirrorgate-ca")
    assert ca_map["data"]["ca.crt"].encode() == bundle


def test_the_monitoring_files_are_the_deployers_own_also_in_the_package(tmp_path: Path) -> None:
    # files/ links deploy/monitoring/: one copy of the alerts and the dashboard.
    for name in ("mirrorgate.rules.yml", "mirrorgate-dashboard.json"):
        assert (CHART / "files" / name).read_bytes() == (MONITORING / name).read_bytes()
    archive = helm_python.package(CHART, destination=tmp_path)
    values = values_for(GATE, monitoring=True)
    with helm_python.Chart.load(archive) as packaged:
        manifests = packaged.render(values, name="mirrorgate", namespace="mirrorgate")
    objects = [
        d for p, t in manifests.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d
    ]
    assert differences(objects, helm_render(values)) == ""
    rule = find(objects, "PrometheusRule", "mirrorgate")
    assert (
        rule["spec"]["groups"]
        == yaml.safe_load((MONITORING / "mirrorgate.rules.yml").read_text())["groups"]
    )


def test_keep_data_marks_the_volumes_and_their_namespace_for_helm_to_keep() -> None:
    kept = helm_render(values_for(NODE_PORT, monitoring=False))
    policy = "helm.sh/resource-policy"
    marked = {object_key(o) for o in kept if (o["metadata"].get("annotations") or {}).get(policy)}
    assert marked == {
        ("Namespace", "", "docker-registry"),
        ("PersistentVolumeClaim", "docker-registry", "registry-data"),
        ("PersistentVolumeClaim", "docker-registry", "registry-proxy-docker-io-data"),
        ("PersistentVolumeClaim", "docker-registry", "registry-proxy-ghcr-io-data"),
    }
    dropped = helm_render({**values_for(NODE_PORT, monitoring=False), "keepData": False})
    assert not [o for o in dropped if (o["metadata"].get("annotations") or {}).get(policy)]


# --- lint and schema ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "kube_version"),
    [
        pytest.param({}, "v1.20.2", id="the defaults on 1.20"),
        pytest.param({}, None, id="the defaults on a current kubernetes"),
        pytest.param(values_for(GATE, monitoring=True), "v1.20.2", id="the gate on 1.20"),
        pytest.param(values_for(INGRESS_TLS, monitoring=False), None, id="an ingress"),
    ],
)
def test_the_chart_lints_clean_and_strict(values: dict[str, Any], kube_version: str | None) -> None:
    report = helm_python.lint(
        CHART, values, strict=True, namespace="mirrorgate", kube_version=kube_version
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == []


def test_a_release_name_too_long_for_the_objects_names_asks_for_deploy_name() -> None:
    with pytest.raises(helm_python.HelmRenderError, match="set config.deploy.name"):
        helm_render({}, release="a-release-name-that-is-far-too-long-for-mirrorgate")
    assert find(helm_render({"config": {"deploy": {"name": "mg"}}}), "Deployment", "mg")


def test_the_chart_runs_the_webhook_version_it_ships_with() -> None:
    with helm_python.Chart.load(CHART) as chart:
        assert chart.metadata["appVersion"] == __version__
        objects = helm_render({})
    container = find(objects, "Deployment", "mirrorgate")["spec"]["template"]["spec"]
    assert container["containers"][0]["image"] == f"mirrorgate:{__version__}"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        pytest.param(
            {"config": {"registry": {"nodePort": 80}}},
            "at '/config/registry/nodePort': minimum",
            id="a node port out of range",
        ),
        pytest.param(
            {"config": {"registry": {"colour": "blue"}}},
            "at '/config/registry': additional properties 'colour'",
            id="an unknown registry key",
        ),
        pytest.param(
            {"config": {"registry": {"pullPath": "https"}}},
            "at '/config/registry/pullPath'",
            id="an unknown pull path",
        ),
        pytest.param(
            {"config": {"deploy": {"namespace": "elsewhere"}}},
            "at '/config/deploy': additional properties 'namespace'",
            id="deploy.namespace (it is the release's)",
        ),
        pytest.param(
            {"config": {"certs": {"mode": "vault"}}},
            "at '/config/certs/mode'",
            id="an unknown certificate mode",
        ),
        pytest.param(
            {"config": {"registry": {"storage": {"s3": {"bucket": "b"}}}}},
            "at '/config/registry/storage/s3': missing property 'region'",
            id="s3 storage without a region",
        ),
        pytest.param(
            {"config": {"pullSecret": {"name": "pull", "source": None}}},
            "at '/config/pullSecret': missing property 'source'",
            id="a registry without a pull secret source",
        ),
        pytest.param({"keepData": "yes"}, "at '/keepData'", id="keepData that is not a boolean"),
    ],
)
def test_the_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], key: str) -> None:
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema({})  # the defaults are valid
        # validate_schema merges the chart's defaults in, as install does.
        with pytest.raises(helm_python.HelmValuesError) as err:
            chart.validate_schema(values)
    assert key in str(err.value)
