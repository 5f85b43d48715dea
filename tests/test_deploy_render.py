"""The deployer's config sections and rendered manifests: tables over plain data, no cluster.

Every rendered object is validated against the Kubernetes JSON schemas (kubernetes-validate,
strict: unknown fields fail) for the 1.20 API server the end-to-end tests run and for a current
one.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
import subprocess
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from mirrorgate.certs.pki import load_certificates, service_names, subject_names
from mirrorgate.certs.rotation import TLSMaterial
from mirrorgate.deploy.apply import changed_paths
from mirrorgate.deploy.commands import cmd_render
from mirrorgate.deploy.config import parse_config
from mirrorgate.deploy.material import Existing, decide, serving_names
from mirrorgate.deploy.render import (
    DATA_LABEL,
    KIND_ORDER,
    Capabilities,
    RenderError,
    in_cluster_config,
    registry_config,
    render,
)
from mirrorgate.deploy.webhooks import (
    mutating_webhook_configuration,
    validating_webhook_configuration,
)
from mirrorgate.webhook.core.config import ConfigError, Mirror
from tests.helpers.commands import mirrorgate_exe

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import kubernetes_validate

ISSUE_CONFIG = """\
pullSecret: {name: mirrorgate-pull, source: docker-registry/mirrorgate-pull}
namespaces: {mode: optIn, exclude: [kube-system]}
registry:
  namespace: docker-registry
  pullPath: nodePort             # nodePort | ingress
  nodePort: 31000                # the hosted registry
  auth: {username: mirrorgate, passwordFile: ./registry-password, bcryptCost: 4}
  storage: {filesystem: {size: 20Gi, storageClass: standard}}
  proxies:
    - {upstream: docker.io, remoteURL: https://registry-1.docker.io, nodePort: 31001}
    - {upstream: ghcr.io, remoteURL: https://ghcr.io, nodePort: 31002}
  ingress: {className: nginx, host: registry.example.org,
            tls: {secretName: registry-example-org-tls}}
deploy: {namespace: mirrorgate, image: "mirrorgate:0.1.0", replicas: 2}
"""
SCAN = """\
scan:
  clair: {url: "http://clair.clair.svc:6060", pskFile: /etc/mirrorgate/clair/psk}
  admissionBudget: 3s
"""
V120 = Capabilities.for_version(1, 20)
V128 = Capabilities.for_version(1, 28)


def config(text: str = ISSUE_CONFIG, extra: str = ""):
    return parse_config(text + extra, source="/nonexistent/mirrorgate.yaml")


def rendered(text: str = ISSUE_CONFIG, extra: str = "", caps=V128, **kwargs: Any):
    c = config(text, extra)
    host = "127.0.0.1" if kwargs.get("webhook_url") else None
    material = decide(c, Existing(), names=serving_names(c, webhook_url_host=host))
    return render(c, material, capabilities=caps, **kwargs), c, material


def find(objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def names_of(objects, kind: str) -> list[str]:
    return [o["metadata"]["name"] for o in objects if o["kind"] == kind]


# --- config ---------------------------------------------------------------------------------------
def test_the_issue_config_is_accepted_and_mirrors_are_derived_from_the_registry():
    c = config()
    assert c.mirrors == (
        Mirror(upstream="docker.io", mirror="127.0.0.1:31001", type="proxy"),
        Mirror(upstream="ghcr.io", mirror="127.0.0.1:31002", type="proxy"),
    )
    assert c.registry.hosts == ("127.0.0.1:31000", "127.0.0.1:31001", "127.0.0.1:31002")
    # mirrorgate's own namespaces are never mutated or gated.
    assert c.namespaces.exclude == ("kube-system", "docker-registry", "mirrorgate")
    assert c.deploy.replicas == 2 and c.deploy.failure_policy == "Fail"
    assert c.certs.mode == "builtin" and c.certs.serving_duration == 90 * 86400


def test_an_explicit_mirrors_list_wins_over_the_derived_one():
    c = config(extra='mirrors: [{upstream: docker.io, mirror: "mirror.example.org"}]\n')
    assert [m.mirror for m in c.mirrors] == ["mirror.example.org"]


def test_with_an_ingress_pull_path_the_mirrors_are_its_hosts():
    c = config(ISSUE_CONFIG.replace("pullPath: nodePort", "pullPath: ingress"))
    assert [m.mirror for m in c.mirrors] == [
        "docker-io.registry.example.org",
        "ghcr-io.registry.example.org",
    ]
    assert c.registry.hosted_host == "registry.example.org"


@pytest.mark.parametrize(
    ("yaml_text", "problem"),
    [
        pytest.param(
            "registry: {nodePort: 31000, colour: blue}",
            "registry.colour: unknown key",
            id="an unknown registry key is named with its path",
        ),
        pytest.param(
            "registry: {proxies: []}",
            "registry.nodePort: required with pullPath: nodePort",
            id="a NodePort pull path needs the hosted registry's port",
        ),
        pytest.param(
            "registry: {nodePort: 8080}",
            "registry.nodePort: must be an integer from 30000 to 32767",
            id="a node port outside the API server's range is refused",
        ),
        pytest.param(
            "registry: {nodePort: 31000, proxies: [{upstream: docker.io, remoteURL: "
            "https://r, nodePort: 31000}]}",
            "registry.proxies[0].nodePort: 31000 is already used by registry.nodePort",
            id="two registries cannot share a node port",
        ),
        pytest.param(
            "registry: {nodePort: 31000, proxies: [{upstream: docker.io, remoteURL: https://a, "
            "nodePort: 31001}, {upstream: index.docker.io, remoteURL: https://b, "
            "nodePort: 31002}]}",
            "registry.proxies[1].upstream: 'docker.io' is already cached by registry.proxies[0]",
            id="one cache per upstream, after normalisation",
        ),
        pytest.param(
            "registry: {nodePort: 31000, proxies: [{upstream: ghcr.io/acme, remoteURL: https://g,"
            " nodePort: 31001}]}",
            "a cache mirrors one whole registry domain",
            id="a cache cannot mirror a repository prefix",
        ),
        pytest.param(
            "registry: {nodePort: 31000, proxies: [{upstream: ghcr.io, remoteURL: "
            "'https://u:p@ghcr.io', nodePort: 31001}]}",
            "credentials in it are not allowed",
            id="credentials in a remote URL are refused: they end up in logs",
        ),
        pytest.param(
            "registry: {pullPath: ingress}",
            "registry.ingress: required with pullPath: ingress",
            id="an ingress pull path needs the ingress section",
        ),
        pytest.param(
            "registry: {nodePort: 31000, ingress: {host: r.example.org}}",
            "registry.ingress.tls: required",
            id="an ingress host without TLS is refused: nodes only pull from trusted https",
        ),
        pytest.param(
            "registry: {nodePort: 31000, storage: {filesystem: {}, s3: {bucket: b, region: r}}}",
            "registry.storage: set exactly one of filesystem or s3",
            id="exactly one storage backend",
        ),
        pytest.param(
            "registry: {nodePort: 31000, storage: {filesystem: {size: lots}}}",
            "registry.storage.filesystem.size: 'lots' is not a storage quantity",
            id="a volume size must be a quantity",
        ),
        pytest.param(
            "registry: {nodePort: 31000, gcSchedule: weekly}",
            "registry.gcSchedule: 'weekly' is not a 5-field cron schedule",
            id="the garbage collection schedule is cron",
        ),
        pytest.param(
            "registry: {nodePort: 31000}",
            "pullSecret.source: required with registry",
            id="a registry needs the pull secret source the deployer creates",
        ),
        pytest.param(
            "pullSecret: {name: p, source: elsewhere/p}\nregistry: {nodePort: 31000}",
            "pullSecret.source: 'elsewhere/p' must be in docker-registry",
            id="the pull secret source lives in one of mirrorgate's namespaces",
        ),
        pytest.param(
            "deploy: {name: Mirror_Gate}",
            "deploy.name: 'Mirror_Gate' is not a lowercase RFC 1123 label",
            id="the release name must make valid object names",
        ),
        pytest.param(
            "deploy: {failurePolicy: Sometimes}",
            "deploy.failurePolicy: 'Sometimes' is not one of Ignore, Fail",
            id="the validating failure policy is Ignore or Fail",
        ),
        pytest.param(
            "deploy: {secretMounts: [{secret: clair-psk, path: /etc/mirrorgate/tls}]}",
            "deploy.secretMounts[0].path: '/etc/mirrorgate/tls' must be an absolute path not used",
            id="an extra secret cannot hide the deployer's own mounts",
        ),
        pytest.param(
            "certs: {mode: letsencrypt}",
            "certs.mode: 'letsencrypt' is not one of builtin, cert-manager",
            id="the certificate mode is builtin or cert-manager",
        ),
        pytest.param(
            "certs: {servingDuration: 400d}",
            "certs.servingDuration: must be shorter than certs.caDuration",
            id="a serving certificate cannot outlive its CA",
        ),
        pytest.param(
            "certs: {servingDuration: 1h, rotationOverlap: 30m}",
            "certs.rotationOverlap: must be at most a third of certs.servingDuration",
            id="the rotation overlap fits in the last third of a serving certificate",
        ),
    ],
)
def test_a_bad_deployer_section_stops_loading_with_its_key_path(yaml_text, problem):
    with pytest.raises(ConfigError) as err:
        parse_config(yaml_text)
    assert any(problem in line for line in err.value.problems), err.value.problems


# --- what render emits ----------------------------------------------------------------------------
EXPECTED = [
    ("Namespace", "mirrorgate"),
    ("Namespace", "docker-registry"),
    ("Secret", "registry-credentials"),
    ("Secret", "registry-auth"),
    ("Secret", "registry-secrets"),
    ("Secret", "mirrorgate-pull"),
    ("Secret", "mirrorgate-tls"),
    ("Secret", "mirrorgate-registry-auth"),
    ("Secret", "mirrorgate-events"),
    ("ServiceAccount", "mirrorgate"),
    ("ClusterRole", "mirrorgate"),
    ("ClusterRoleBinding", "mirrorgate"),
    ("Role", "docker-registry/mirrorgate"),
    ("Role", "mirrorgate/mirrorgate"),
    ("RoleBinding", "docker-registry/mirrorgate"),
    ("RoleBinding", "mirrorgate/mirrorgate"),
    ("ConfigMap", "mirrorgate-ca"),
    ("ConfigMap", "registry-config"),
    ("ConfigMap", "registry-proxy-docker-io-config"),
    ("ConfigMap", "registry-proxy-ghcr-io-config"),
    ("ConfigMap", "mirrorgate-config"),
    ("ConfigMap", "mirrorgate-dashboard"),
    ("PersistentVolumeClaim", "registry-data"),
    ("PersistentVolumeClaim", "registry-proxy-docker-io-data"),
    ("PersistentVolumeClaim", "registry-proxy-ghcr-io-data"),
    ("Service", "registry"),
    ("Service", "registry-proxy-docker-io"),
    ("Service", "registry-proxy-ghcr-io"),
    ("Service", "mirrorgate"),
    ("Deployment", "registry"),
    ("Deployment", "registry-proxy-docker-io"),
    ("Deployment", "registry-proxy-ghcr-io"),
    ("Deployment", "mirrorgate"),
    ("PodDisruptionBudget", "mirrorgate"),
    ("CronJob", "registry-gc"),
    ("Ingress", "registry"),
    ("ServiceMonitor", "mirrorgate"),
    ("PrometheusRule", "mirrorgate"),
    ("MutatingWebhookConfiguration", "mirrorgate"),
    ("ValidatingWebhookConfiguration", "mirrorgate"),
]


def test_render_emits_every_object_in_dependency_order_webhook_configurations_last():
    out, _, _ = rendered(extra=SCAN, caps=Capabilities.for_version(1, 30, monitoring=True))
    got = []
    for o in out.objects:
        meta = o["metadata"]
        name = meta["name"]
        if o["kind"] in ("Role", "RoleBinding"):
            name = f"{meta['namespace']}/{name}"
        got.append((o["kind"], name))
    assert got == EXPECTED
    ranks = [KIND_ORDER.index(kind) for kind, _ in got]
    assert ranks == sorted(ranks)
    assert out.notes == ()


@functools.cache
def _schemas(version: str) -> tuple[Path, Registry]:
    """kubernetes-validate's strict schemas for ``version``, with its 1 MB of shared definitions
    parsed once (``kubernetes_validate.validate`` re-reads and re-walks them for every object,
    which costs seconds per manifest set)."""
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder = folder / f"v{version}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    resource = Resource(definitions, specification=DRAFT4)
    return folder, Registry().with_resource(f"{folder.as_uri()}/_definitions.json", resource)


def _validate(objects, version: str) -> list[str]:
    """Validate as ``kubernetes_validate.validate(obj, version, strict=True)`` does."""
    folder, registry = _schemas(version)
    problems = []
    for o in objects:
        # rbac.authorization.k8s.io/v1 -> rbac-v1, as kubernetes-validate names its files.
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", o["apiVersion"])
        name = f"{o['kind'].lower()}-{api}.json"
        # Each file is a bare "$ref" into _definitions.json, relative to the schema folder.
        ref = json.loads((folder / name).read_text())["$ref"]
        schema = {"$ref": f"{folder.as_uri()}/{ref}"}
        for err in jsonschema.Draft4Validator(schema, registry=registry).iter_errors(o):
            path = ".".join(str(p) for p in err.path)
            problems.append(f"{o['kind']} {o['metadata']['name']}: {path}: {err.message}")
    return problems


def test_the_schema_check_catches_what_kubernetes_validate_catches():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"typo": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, "1.20.0", strict=True)
    assert _validate([bad], "1.20.0") == [
        "Service x: spec: Additional properties are not allowed ('typo' was unexpected)"
    ]


VARIANTS = {
    "the issue's config with a scan section": ISSUE_CONFIG + SCAN,
    "an ingress pull path with a cert-manager issuer": ISSUE_CONFIG.replace(
        "pullPath: nodePort", "pullPath: ingress"
    ).replace("{secretName: registry-example-org-tls}", "{issuer: letsencrypt}"),
    "S3 storage and cluster-wide namespaces": ISSUE_CONFIG.replace(
        "{filesystem: {size: 20Gi, storageClass: standard}}",
        "{s3: {bucket: images, region: eu-west-1, regionEndpoint: 'https://s3.example.org', "
        "secretRef: s3-keys}}",
    ).replace("mode: optIn", "mode: clusterWide"),
    "one replica and credentials for an upstream": ISSUE_CONFIG.replace(
        "replicas: 2", "replicas: 1"
    ).replace("nodePort: 31001}", "nodePort: 31001, credentialsSecret: hub-login}"),
}


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize(
    ("caps", "version"),
    [
        pytest.param(V120, "1.20.0", id="valid for Kubernetes 1.20"),
        pytest.param(V128, "1.28.0", id="valid for Kubernetes 1.28"),
    ],
)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(text, caps, version):
    out, _, _ = rendered(text, caps=caps)
    assert _validate(out.objects, version) == []
    # Only the Prometheus Operator's kinds have no schema here; they are not rendered without it.
    assert {o["kind"] for o in out.objects}.isdisjoint({"ServiceMonitor", "PrometheusRule"})


def test_api_versions_follow_the_server_pdb_and_cronjob_are_v1beta1_on_1_20():
    old, _, _ = rendered(caps=V120)
    new, _, _ = rendered(caps=V128)
    assert find(old.objects, "PodDisruptionBudget")["apiVersion"] == "policy/v1beta1"
    assert find(old.objects, "CronJob")["apiVersion"] == "batch/v1beta1"
    assert find(new.objects, "PodDisruptionBudget")["apiVersion"] == "policy/v1"
    assert find(new.objects, "CronJob")["apiVersion"] == "batch/v1"
    assert "ServiceMonitor and PrometheusRule skipped" in " ".join(old.notes)


def test_every_service_port_names_its_protocol_as_1_20_server_side_apply_needs():
    out, _, _ = rendered()
    ports = [p for o in out.objects if o["kind"] == "Service" for p in o["spec"]["ports"]]
    assert ports and all(p["protocol"] == "TCP" for p in ports)


# --- the registry ---------------------------------------------------------------------------------
def test_one_distribution_instance_per_upstream_each_on_its_node_port():
    out, _, _ = rendered()
    services = {o["metadata"]["name"]: o for o in out.objects if o["kind"] == "Service"}
    node_ports = {
        name: svc["spec"]["ports"][0].get("nodePort")
        for name, svc in services.items()
        if svc["spec"]["type"] == "NodePort"
    }
    assert node_ports == {
        "registry": 31000,
        "registry-proxy-docker-io": 31001,
        "registry-proxy-ghcr-io": 31002,
    }
    proxy = yaml.safe_load(
        find(out.objects, "ConfigMap", "registry-proxy-ghcr-io-config")["data"]["config.yml"]
    )
    assert proxy["proxy"] == {"remoteurl": "https://ghcr.io"}
    hosted = yaml.safe_load(find(out.objects, "ConfigMap", "registry-config")["data"]["config.yml"])
    assert "proxy" not in hosted and hosted["storage"]["delete"] == {"enabled": True}
    assert hosted["auth"]["htpasswd"]["path"] == "/etc/docker/registry-auth/htpasswd"
    # No secret in a ConfigMap: http.secret and the notification token come from env.
    assert "secret" not in hosted["http"] and "notifications" not in hosted


def test_the_htpasswd_is_bcrypt_and_the_password_is_only_in_secrets():
    out, c, material = rendered()
    auth = find(out.objects, "Secret", "registry-auth")
    line = base64.b64decode(auth["data"]["htpasswd"]).decode()
    user, _, hashed = line.partition(":")
    assert user == "mirrorgate" and hashed.startswith("$2b$04$")
    assert bcrypt.checkpw(material.password.encode(), hashed.encode())
    pull = find(out.objects, "Secret", "mirrorgate-pull")
    assert pull["type"] == "kubernetes.io/dockerconfigjson"
    auths = json.loads(base64.b64decode(pull["data"][".dockerconfigjson"]))["auths"]
    assert sorted(auths) == list(c.registry.hosts)
    token = base64.b64encode(f"mirrorgate:{material.password}".encode()).decode()
    assert {a["auth"] for a in auths.values()} == {token}
    for o in out.objects:
        if o["kind"] != "Secret":
            assert material.password not in json.dumps(o)


def test_a_filesystem_registry_is_recreated_and_collected_where_its_volume_is():
    out, _, _ = rendered()
    hosted = find(out.objects, "Deployment", "registry")
    assert hosted["spec"]["strategy"] == {"type": "Recreate"}
    pvc = find(out.objects, "PersistentVolumeClaim", "registry-data")
    assert pvc["spec"]["storageClassName"] == "standard"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["metadata"]["labels"][DATA_LABEL] == "true"
    gc = find(out.objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (term,) = gc["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["mirrorgate.io/registry"] == "registry"
    assert gc["containers"][0]["command"][:2] == ["registry", "garbage-collect"]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in gc["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["registry-data"]


def test_s3_storage_has_no_volume_and_takes_its_keys_from_the_secret():
    out, _, _ = rendered(VARIANTS["S3 storage and cluster-wide namespaces"])
    assert names_of(out.objects, "PersistentVolumeClaim") == []
    hosted = find(out.objects, "Deployment", "registry")
    assert hosted["spec"]["strategy"] == {"type": "RollingUpdate"}
    env = {e["name"]: e for e in hosted["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REGISTRY_STORAGE_S3_SECRETKEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-keys",
        "key": "secretKey",
    }
    config_yml = yaml.safe_load(
        find(out.objects, "ConfigMap", "registry-config")["data"]["config.yml"]
    )
    assert config_yml["storage"]["s3"] == {
        "bucket": "images",
        "region": "eu-west-1",
        "rootdirectory": "/registry",
        "regionendpoint": "https://s3.example.org",
    }
    assert (
        "affinity"
        not in find(out.objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    )


def test_the_ingress_takes_any_layer_size_without_buffering_and_gets_tls():
    out, _, _ = rendered(VARIANTS["an ingress pull path with a cert-manager issuer"])
    ing = find(out.objects, "Ingress")
    notes = ing["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert notes["cert-manager.io/cluster-issuer"] == "letsencrypt"
    hosts = [r["host"] for r in ing["spec"]["rules"]]
    assert hosts == [
        "registry.example.org",
        "docker-io.registry.example.org",
        "ghcr-io.registry.example.org",
    ]
    assert ing["spec"]["tls"] == [{"hosts": hosts, "secretName": "registry-example-org-tls"}]
    assert ing["spec"]["ingressClassName"] == "nginx"
    # Behind an ingress there is no NodePort to expose.
    assert {s["spec"]["type"] for s in out.objects if s["kind"] == "Service"} == {"ClusterIP"}


def test_with_scan_pushes_are_notified_to_the_webhook_with_its_token_and_ca():
    out, c, material = rendered(extra=SCAN)
    secrets_ = find(out.objects, "Secret", "registry-secrets")["data"]
    endpoints = yaml.safe_load(base64.b64decode(secrets_["notifications"]))
    assert endpoints[0]["url"] == "https://mirrorgate.mirrorgate.svc:443/events/registry"
    assert endpoints[0]["headers"] == {"Authorization": [f"Bearer {material.events_token}"]}
    assert endpoints[0]["ignore"] == {"actions": ["pull"]}
    pod = find(out.objects, "Deployment", "registry")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["SSL_CERT_DIR"]["value"] == "/etc/ssl/certs:/etc/mirrorgate-ca"
    ca = find(out.objects, "ConfigMap", "mirrorgate-ca")["data"]["ca.crt"]
    assert ca.encode() == material.tls.ca_bundle
    # The caches do not notify: a pull-through cache has no pushes.
    proxy = find(out.objects, "Deployment", "registry-proxy-docker-io")["spec"]["template"]["spec"]
    assert "REGISTRY_NOTIFICATIONS_ENDPOINTS" not in {
        e["name"] for e in proxy["containers"][0]["env"]
    }


# --- the webhook ----------------------------------------------------------------------------------
def test_the_webhook_deployment_is_highly_available_locked_down_and_probed():
    out, _, _ = rendered(extra=SCAN)
    dep = find(out.objects, "Deployment", "mirrorgate")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "mirrorgate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "https",
        "scheme": "HTTPS",
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]
    # Only the serving pair is mounted: the CA key stays in the API.
    assert [i["key"] for i in tls["items"]] == ["tls.crt", "tls.key"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MIRRORGATE_TLS_SECRET"]["value"] == "mirrorgate-tls"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    pdb = find(out.objects, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": spec["selector"]}


def test_one_replica_gets_no_pdb_because_it_would_block_every_drain():
    out, _, _ = rendered(VARIANTS["one replica and credentials for an upstream"])
    assert names_of(out.objects, "PodDisruptionBudget") == []
    assert any("no PodDisruptionBudget" in n for n in out.notes)
    proxy = find(out.objects, "Deployment", "registry-proxy-docker-io")
    env = {e["name"]: e for e in proxy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REGISTRY_PROXY_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "hub-login"


def test_rbac_is_least_privilege_named_resources_and_no_wildcards():
    out, _, _ = rendered(extra=SCAN)
    cluster = find(out.objects, "ClusterRole")["rules"]
    roles = {o["metadata"]["namespace"]: o["rules"] for o in out.objects if o["kind"] == "Role"}
    every = [*cluster, *(r for rules in roles.values() for r in rules)]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in every)
    assert {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
        "resourceNames": ["mirrorgate"],
        "verbs": ["get", "update"],
    } in cluster
    assert {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["mirrorgate-tls"],
        "verbs": ["get", "update"],
    } in roles["mirrorgate"]
    # The pull secret source is only read, in its own namespace.
    source = [r for r in roles["docker-registry"] if r.get("resourceNames") == ["mirrorgate-pull"]]
    assert source and all(set(r["verbs"]) <= {"get", "list", "watch"} for r in source)
    binding = find(out.objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mirrorgate", "namespace": "mirrorgate"}
    ]


@pytest.mark.parametrize(
    ("mode", "match_labels"),
    [
        pytest.param(
            "optIn", {"mirrorgate.io/enabled": "true"}, id="opt-in selects labelled namespaces"
        ),
        pytest.param("clusterWide", None, id="cluster-wide selects every namespace"),
    ],
)
def test_webhook_configurations_exclude_kube_system_and_mirrorgates_namespaces(mode, match_labels):
    out, _, _ = rendered(ISSUE_CONFIG.replace("mode: optIn", f"mode: {mode}"), extra=SCAN)
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        (hook,) = find(out.objects, kind)["webhooks"]
        selector = hook["namespaceSelector"]
        assert selector.get("matchLabels") == match_labels
        assert selector["matchExpressions"] == [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["kube-system", "docker-registry", "mirrorgate"],
            }
        ]


def test_the_mutating_webhook_fails_open_and_the_validating_one_as_configured():
    out, _, material = rendered(extra=SCAN)
    (mutate,) = find(out.objects, "MutatingWebhookConfiguration")["webhooks"]
    (validate,) = find(out.objects, "ValidatingWebhookConfiguration")["webhooks"]
    assert mutate["failurePolicy"] == "Ignore"
    assert mutate["reinvocationPolicy"] == "IfNeeded"
    assert mutate["sideEffects"] == "NoneOnDryRun"
    assert mutate["matchPolicy"] == "Equivalent" and validate["matchPolicy"] == "Equivalent"
    assert mutate["timeoutSeconds"] == 5 and validate["timeoutSeconds"] == 10
    assert validate["failurePolicy"] == "Fail"
    # The gate records denials as Events (`events: true`, the default), never for dry runs.
    assert validate["sideEffects"] == "NoneOnDryRun"
    resources = [r["resources"] for r in mutate["rules"]]
    assert resources == [["pods"], ["pods/ephemeralcontainers"]]
    assert mutate["clientConfig"]["service"] == {
        "namespace": "mirrorgate",
        "name": "mirrorgate",
        "path": "/mutate",
        "port": 443,
    }
    assert base64.b64decode(mutate["clientConfig"]["caBundle"]) == material.tls.ca_bundle
    ignore, _, _ = rendered(extra=SCAN + "deploy: {failurePolicy: Ignore}\n")
    # (the deploy section above replaces the issue's: a second `deploy` key wins in YAML)
    (v,) = find(ignore.objects, "ValidatingWebhookConfiguration")["webhooks"]
    assert v["failurePolicy"] == "Ignore"


def test_with_events_off_the_gate_has_no_side_effects_and_serve_no_event_or_pod_access():
    on, _, _ = rendered(extra=SCAN)
    off, _, _ = rendered(extra=SCAN + "events: false\n")
    (v,) = find(off.objects, "ValidatingWebhookConfiguration")["webhooks"]
    assert v["sideEffects"] == "None"

    def rules(out):
        return [
            (tuple(r["resources"]), tuple(r["verbs"]))
            for r in find(out.objects, "ClusterRole")["rules"]
            if r["resources"] in (["events"], ["pods"])
        ]

    # The gate watches every pod's images (scan.running, running verdicts).
    assert rules(on) == [
        (("events",), ("list", "watch", "create")),
        (("pods",), ("get", "list", "watch")),
    ]
    assert rules(off) == [(("events",), ("list", "watch")), (("pods",), ("list", "watch"))]
    bare, _, _ = rendered(extra="events: false\n")  # no gate: no pod watch
    assert rules(bare) == [(("events",), ("list", "watch"))]


def test_without_scan_there_is_no_validating_webhook_and_no_events_token():
    out, _, material = rendered()
    assert names_of(out.objects, "ValidatingWebhookConfiguration") == []
    assert (
        material.events_token is None
        and names_of(out.objects, "Secret").count("mirrorgate-events") == 0
    )


def test_a_webhook_url_registers_that_url_and_installs_no_webhook_pods():
    out, _, material = rendered(extra=SCAN, webhook_url="https://127.0.0.1:9443")
    (hook,) = find(out.objects, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:9443/mutate"
    assert names_of(out.objects, "Deployment") == [
        "registry",
        "registry-proxy-docker-io",
        "registry-proxy-ghcr-io",
    ]
    assert "mirrorgate" not in names_of(out.objects, "Service")
    assert names_of(out.objects, "PodDisruptionBudget") == []
    assert "127.0.0.1" in subject_names(material.tls.serving.certificate)


def test_the_in_cluster_config_reaches_the_registries_through_their_services():
    c = config(extra=SCAN)
    doc = in_cluster_config(c)
    reloaded = parse_config(yaml.safe_dump(doc))
    # The server derives exactly the mirrors the deployer rendered node ports for.
    assert reloaded.mirrors == c.mirrors
    access = reloaded.registries["127.0.0.1:31001"]
    assert access.endpoint == "http://registry-proxy-docker-io.docker-registry.svc:5000"
    assert access.docker_config_file == "/etc/mirrorgate/registry/.dockerconfigjson"
    assert reloaded.scan.events.token_file == "/etc/mirrorgate/events/token"
    assert reloaded.registry.auth.password_file is None


def test_cert_manager_mode_renders_issuers_and_certificates_and_injects_the_ca():
    text = ISSUE_CONFIG + "certs: {mode: cert-manager}\n"
    with pytest.raises(RenderError, match="does not serve cert-manager.io/v1"):
        rendered(text)
    out, _, _ = rendered(text, caps=Capabilities.for_version(1, 28, cert_manager=True))
    assert names_of(out.objects, "Issuer") == ["mirrorgate-selfsigned", "mirrorgate-ca"]
    serving = find(out.objects, "Certificate", "mirrorgate-serving")["spec"]
    assert serving["secretName"] == "mirrorgate-tls"
    assert serving["dnsNames"] == service_names("mirrorgate", "mirrorgate")
    assert serving["duration"] == "2160h" and serving["renewBefore"] == "720h"
    hook_cfg = find(out.objects, "MutatingWebhookConfiguration")
    assert hook_cfg["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": "mirrorgate/mirrorgate-serving"
    }
    assert "caBundle" not in hook_cfg["webhooks"][0]["clientConfig"]
    assert "mirrorgate-tls" not in names_of(out.objects, "Secret")


# --- secrets: kept, and never shown -----------------------------------------------------------
def test_a_second_decision_over_the_applied_secrets_renders_identical_objects():
    out, c, first = rendered(extra=SCAN)
    by_name = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in out.objects}
    existing = Existing(
        credentials=by_name[("docker-registry", "registry-credentials")],
        htpasswd=by_name[("docker-registry", "registry-auth")],
        registry=by_name[("docker-registry", "registry-secrets")],
        events=by_name[("mirrorgate", "mirrorgate-events")],
        tls=by_name[("mirrorgate", "mirrorgate-tls")],
    )
    second = decide(c, existing, names=serving_names(c))
    assert second.password_source == "kept" and second.tls_changes == ()
    again = render(c, second, capabilities=V128)
    assert again.objects == out.objects


def test_a_password_file_is_used_and_a_new_username_gets_a_new_password(tmp_path):
    (tmp_path / "registry-password").write_text("s3cret-from-file\n")
    path = tmp_path / "mirrorgate.yaml"
    path.write_text(ISSUE_CONFIG)
    from mirrorgate.deploy.config import load_config
    from mirrorgate.deploy.material import read_password_file

    c = load_config(path)
    m = decide(c, Existing(), names=["x"], password=read_password_file(c))
    assert (m.password, m.password_source) == ("s3cret-from-file", "file")
    kept = {
        "data": {
            "username": base64.b64encode(b"someone-else").decode(),
            "password": base64.b64encode(b"old").decode(),
        }
    }
    fresh = decide(config(), Existing(credentials=kept), names=["x"])
    assert fresh.password_source == "generated" and fresh.password != "old"


def test_render_lists_secrets_by_name_and_prints_their_values_only_when_asked(tmp_path):
    path = tmp_path / "mirrorgate.yaml"
    path.write_text(ISSUE_CONFIG + SCAN)
    (tmp_path / "registry-password").write_text("pa55-word-from-file\n")
    from mirrorgate.deploy.config import load_config

    c = load_config(path)
    args = SimpleNamespace(
        webhook_url=None, kubeconfig=None, context=None, kube_version="1.20", include_secrets=False
    )
    out = io.StringIO()
    assert cmd_render(c, args, out=out) == 0
    text = out.getvalue()
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert "Secret" not in {d["kind"] for d in docs}
    assert "#   Secret docker-registry/registry-credentials (keys: password, username)" in text
    assert "pa55-word-from-file" not in text
    assert base64.b64encode(b"pa55-word-from-file").decode() not in text
    assert "PRIVATE KEY" not in text and "&id" not in text
    # The workloads refer to the Secrets by name.
    assert "registry-auth" in text and "secretKeyRef" in text

    args.include_secrets = True
    out = io.StringIO()
    cmd_render(c, args, out=out)
    docs = [d for d in yaml.safe_load_all(out.getvalue()) if d]
    creds = next(d for d in docs if d["metadata"]["name"] == "registry-credentials")
    assert base64.b64decode(creds["data"]["password"]) == b"pa55-word-from-file"
    tls = TLSMaterial.from_secret(
        next(d for d in docs if d["metadata"]["name"] == "mirrorgate-tls")
    )
    assert tls is not None and len(load_certificates(tls.ca_bundle)) == 1


def test_registry_config_for_a_cache_has_no_delete_api_and_the_upstream():
    c = config()
    proxy = registry_config(c.registry, proxy=c.registry.proxies[0])
    assert proxy["proxy"] == {"remoteurl": "https://registry-1.docker.io"}
    assert "delete" not in proxy["storage"]
    assert proxy["log"]["level"] == "warn"  # info would log the notification token


# --- webhook configurations ---------------------------------------------------------------------
def test_the_validating_configuration_sends_the_pod_requests_to_validate_without_reinvocation():
    args = dict(
        url="https://127.0.0.1:9443",
        ca_pem=b"pem",
        namespace_selector={"matchLabels": {"mirrorgate.io/enabled": "true"}},
    )
    mutating = mutating_webhook_configuration("m", **args)["webhooks"][0]
    (hook,) = validating_webhook_configuration("v", **args)["webhooks"]
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:9443/validate"
    assert mutating["clientConfig"]["url"] == "https://127.0.0.1:9443/mutate"
    assert "reinvocationPolicy" not in hook
    assert hook["rules"] == mutating["rules"]
    assert hook["namespaceSelector"] == mutating["namespaceSelector"]


def test_a_config_with_the_deploy_sections_is_still_a_config_the_server_loads():
    c = config(textwrap.dedent(ISSUE_CONFIG), extra=SCAN)
    assert c.scan is not None and c.pull_secret.source == "docker-registry/mirrorgate-pull"


# --- the command line, before any cluster is involved --------------------------------------------
def mirrorgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([mirrorgate_exe(), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "mirrorgate.yaml"
    path.write_text(ISSUE_CONFIG)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["deploy", "render", "--webhook-url", "http://127.0.0.1:9443"],
            "--webhook-url 'http://127.0.0.1:9443': expected https://HOST:PORT",
            id="a webhook URL must be https without a path",
        ),
        pytest.param(
            ["deploy", "render", "--kube-version", "latest"],
            "--kube-version 'latest': expected MAJOR.MINOR",
            id="a Kubernetes version is MAJOR.MINOR",
        ),
        pytest.param(
            ["deploy", "apply", "--kubeconfig", "/nonexistent/kubeconfig"],
            "kubeconfig /nonexistent/kubeconfig: unusable",
            id="an unusable kubeconfig is named",
        ),
        pytest.param(
            ["deploy", "apply", "--cert-out", "/tmp/x"],
            "--cert-out needs --webhook-url",
            id="certificates are written only for an out-of-cluster serve",
        ),
    ],
)
def test_unusable_flags_exit_2_with_the_reason(config_file, args, message):
    r = mirrorgate(*args, "--config", str(config_file))
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr


def test_a_config_without_deployer_sections_is_refused_by_apply(tmp_path):
    path = tmp_path / "mirrorgate.yaml"
    path.write_text("mirrors: [{upstream: docker.io, mirror: '127.0.0.1:31000'}]\n")
    r = mirrorgate("deploy", "apply", "--config", str(path))
    assert r.returncode == 2
    assert "neither a deploy: nor a registry: section" in r.stderr


def test_render_through_the_console_script_prints_yaml_for_1_20(config_file):
    r = mirrorgate("deploy", "render", "--config", str(config_file), "--kube-version", "1.20")
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout) if d]
    assert kinds[0] == "Namespace" and kinds[-1] == "MutatingWebhookConfiguration"
    assert "Secret" not in kinds


def test_an_apply_report_names_changed_fields_never_their_values():
    before = {"kind": "Secret", "data": {"password": "b2xk", "username": "dQ=="}, "type": "Opaque"}
    after = {"kind": "Secret", "data": {"password": "bmV3", "username": "dQ=="}, "type": "Opaque"}
    assert changed_paths(before, after) == ["data.password"]
    deep = {"spec": {"template": {"spec": {"containers": [{"image": "a"}]}}}}
    deeper = {"spec": {"template": {"spec": {"containers": [{"image": "b"}]}}}}
    assert changed_paths(deep, deeper) == ["spec.template.spec"]
