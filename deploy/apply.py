"""Installing, inspecting and removing what ``deploy.render`` describes, on a real API server.

Owns the I/O around the pure renderer: discovery (which API versions this server serves), the
secret material already in the cluster (``deploy.material`` decides what to keep), server-side
apply in dependency order, pruning what an earlier apply installed and this one no longer
renders, uninstall (webhook configurations first), and ``status``.

Idempotency: every object is first applied as a server-side dry run and compared with the live
object (ignoring resourceVersion and managedFields); only a real difference is written. Kubernetes
1.20 bumps the resourceVersion of webhook configurations on a no-op apply, so writing blindly would
report (and cause) a change on every run.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from mirrorgate.certs.rotation import (
    TLSMaterial,
    request_ca_rotation,
    tls_secret_name,
)
from mirrorgate.certs.rotation import (
    describe as describe_tls,
)
from mirrorgate.deploy.config import DeployConfig
from mirrorgate.deploy.material import (
    CREDENTIALS_SECRET,
    HTPASSWD_SECRET,
    REGISTRY_SECRET,
    Existing,
    Material,
    decide,
    deploy_settings,
    events_secret_name,
    read_password_file,
    serving_names,
)
from mirrorgate.deploy.render import (
    DATA_LABEL,
    INSTANCE,
    KIND_ORDER,
    KIND_VERSIONS,
    MANAGED_BY,
    METADATA_NAME,
    Capabilities,
    Rendered,
    describe,
    object_key,
    render,
)
from mirrorgate.deploy.webhooks import MUTATE_NAME, OPT_IN_LABEL, VALIDATE_NAME
from mirrorgate.webhook.adapters.kube import (
    KubeError,
    SyncKube,
    collection_path,
    object_path,
    secret_path,
)

Action = Literal["created", "configured", "unchanged", "deleted", "kept", "labelled"]
# Set by a webhook's pull-secret copies (webhook.controllers.pullsecrets): removed on uninstall too.
PULL_SECRET_SOURCE_ANNOTATION = "mirrorgate.io/pull-secret-source"
WAIT_INTERVAL = 2.0


class DeployError(Exception):
    """The deployment cannot proceed; the message says what to do."""


class DeployUsageError(DeployError):
    """A flag or input the user must fix before anything is sent (exit code 2)."""


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    what: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.action:<10} {self.what}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server: str = ""
    material: Material | None = field(default=None, repr=False)

    @property
    def changed(self) -> list[Change]:
        return [c for c in self.changes if c.action != "unchanged"]


# --- discovery and the cluster's current secrets ---------------------------------------------
def capabilities(kube: SyncKube) -> tuple[Capabilities, str]:
    major, minor, git = kube.version()
    versions = {v for vs in KIND_VERSIONS.values() for v in vs if v != "v1"}
    served = kube.served_kinds(["v1", *sorted(versions)])
    return Capabilities(version=(major, minor), served=frozenset(served)), git


def existing_secrets(kube: SyncKube, config: DeployConfig) -> Existing:
    d = deploy_settings(config)

    def get(namespace: str, name: str) -> dict[str, Any] | None:
        return kube.get(secret_path(namespace, name))

    reg = config.registry
    return Existing(
        credentials=get(reg.namespace, CREDENTIALS_SECRET) if reg else None,
        htpasswd=get(reg.namespace, HTPASSWD_SECRET) if reg else None,
        registry=get(reg.namespace, REGISTRY_SECRET) if reg else None,
        events=get(d.namespace, events_secret_name(d.name)) if config.scan else None,
        tls=get(d.namespace, tls_secret_name(d.name)),
    )


def prepare(
    kube: SyncKube, config: DeployConfig, *, webhook_url: str | None = None
) -> tuple[Rendered, Material, Capabilities, str, Existing]:
    caps, git = capabilities(kube)
    existing = existing_secrets(kube, config)
    password = read_password_file(config) if config.registry else None
    host = urlsplit(webhook_url).hostname if webhook_url else None
    material = decide(
        config, existing, names=serving_names(config, webhook_url_host=host), password=password
    )
    rendered = render(config, material, capabilities=caps, webhook_url=webhook_url)
    return rendered, material, caps, git, existing


# --- apply ---------------------------------------------------------------------------------------
def _comparable(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    if obj is None:
        return {}
    out = dict(obj)
    meta = {
        k: v
        for k, v in (obj.get("metadata") or {}).items()
        if k not in ("resourceVersion", "managedFields", "generation")
    }
    out["metadata"] = meta
    out.pop("status", None)
    return out


def changed_paths(before: Any, after: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """Where two objects differ, as dotted paths (no values: Secrets pass through here)."""
    if isinstance(before, Mapping) and isinstance(after, Mapping) and depth > 0:
        out: list[str] = []
        for key in sorted(set(before) | set(after), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += changed_paths(before.get(key), after.get(key), path, depth - 1)
        return out
    return [] if before == after else [prefix or "(object)"]


def apply_object(kube: SyncKube, obj: Mapping[str, Any]) -> Change:
    live = kube.get(object_path(obj))
    if (
        live is not None
        and live["metadata"].get("deletionTimestamp")
        and obj["kind"] == "Namespace"
    ):
        raise DeployError(
            f"namespace {obj['metadata']['name']} is still being deleted (an earlier uninstall): "
            "wait until it is gone, then apply again"
        )
    if live is None:
        kube.apply(obj)
        return Change("created", describe(obj))
    would = kube.apply(obj, dry_run=True)
    before, after = _comparable(live), _comparable(would)
    if before == after:
        return Change("unchanged", describe(obj))
    kube.apply(obj)
    paths = changed_paths(before, after)
    return Change("configured", describe(obj), ", ".join(paths[:6]))


def label_excluded_namespaces(
    kube: SyncKube, config: DeployConfig, caps: Capabilities
) -> list[Change]:
    """On servers older than 1.21 nothing sets ``kubernetes.io/metadata.name``, so the
    webhook configurations' exclusion by that label would not match kube-system: set it."""
    if caps.labels_namespace_names:
        return []
    out = []
    for name in config.namespaces.exclude:
        live = kube.get(f"/api/v1/namespaces/{name}")
        if live is None or (live["metadata"].get("labels") or {}).get(METADATA_NAME) == name:
            continue
        kube.request(
            "PATCH",
            f"/api/v1/namespaces/{name}",
            query={"fieldManager": "mirrorgate-namespace-labels"},
            body={"metadata": {"labels": {METADATA_NAME: name}}},
            content_type="application/merge-patch+json",
        )
        out.append(Change("labelled", f"Namespace {name}", f"{METADATA_NAME}={name}"))
    return out


def managed_selector(release: str) -> str:
    return f"{MANAGED_BY}=mirrorgate,{INSTANCE}={release}"


def installed(kube: SyncKube, caps: Capabilities, release: str) -> Iterator[dict[str, Any]]:
    """Every object an apply of ``release`` created, in apply order."""
    for kind in KIND_ORDER:
        api = caps.api_version(kind)
        if api is None:
            continue
        for obj in kube.list(collection_path(api, kind), label_selector=managed_selector(release)):
            if obj["metadata"].get("deletionTimestamp"):
                continue  # already being deleted (finalizers run by controllers)
            obj.setdefault("apiVersion", api)
            obj.setdefault("kind", kind)
            yield obj


def _prune(kube: SyncKube, rendered: Rendered, caps: Capabilities, release: str) -> list[Change]:
    wanted = {object_key(o) for o in rendered.objects}
    out = []
    stale = [o for o in installed(kube, caps, release) if object_key(o) not in wanted]
    for obj in reversed(stale):
        if (obj["metadata"].get("labels") or {}).get(DATA_LABEL) == "true":
            out.append(Change("kept", describe(obj), "holds data; deploy uninstall removes it"))
            continue
        if obj["kind"] == "Namespace":
            continue  # a namespace no longer used is removed by uninstall only
        if kube.delete(object_path(obj), background=True):
            out.append(Change("deleted", describe(obj), "no longer rendered"))
    return out


def apply(
    kube: SyncKube,
    config: DeployConfig,
    *,
    webhook_url: str | None = None,
    wait: bool = False,
    timeout: float = 300.0,
    progress: Callable[[Change], None] | None = None,
) -> Report:
    """Install or update everything ``config`` describes; report what changed."""
    rendered, material, caps, git, existing = prepare(kube, config, webhook_url=webhook_url)
    report = Report(server=git, notes=list(rendered.notes), material=material)
    d = deploy_settings(config)

    def record(change: Change) -> None:
        report.changes.append(change)
        if progress:
            progress(change)

    for change in label_excluded_namespaces(kube, config, caps):
        record(change)
    tls_name = (d.namespace, tls_secret_name(d.name))
    for obj in rendered.objects:
        if existing.tls and (obj["kind"], *tls_name) == (
            "Secret",
            obj["metadata"].get("namespace"),
            obj["metadata"]["name"],
        ):
            # The running webhook may rotate the same Secret: apply only over what was read.
            obj = {
                **obj,
                "metadata": {
                    **obj["metadata"],
                    "resourceVersion": existing.tls["metadata"]["resourceVersion"],
                },
            }
        try:
            record(apply_object(kube, obj))
        except KubeError as err:
            raise DeployError(f"applying {describe(obj)} failed: {err}") from err
    for change in _prune(kube, rendered, caps, d.name):
        record(change)
    if config.registry is not None:
        ps = material.password_source
        where = f"Secret {config.registry.namespace}/{CREDENTIALS_SECRET}"
        text = {
            "file": f"registry password: from registry.auth.passwordFile, kept in {where}",
            "kept": f"registry password: unchanged, kept in {where}",
            "generated": f"registry password: generated and kept in {where} (not shown; "
            "`mirrorgate deploy render --include-secrets` prints it)",
        }[ps]
        report.notes.append(text)
    if material.tls_changes:
        report.notes.append("webhook certificates: " + "; ".join(material.tls_changes))
    if wait:
        wait_ready(kube, rendered, timeout=timeout)
    return report


def wait_ready(kube: SyncKube, rendered: Rendered, *, timeout: float) -> None:
    """Until every Deployment has its replicas available; DeployError naming the laggards."""
    deadline = time.monotonic() + timeout
    deployments = [o for o in rendered.objects if o["kind"] == "Deployment"]
    while True:
        waiting = []
        for dep in deployments:
            live = kube.get(object_path(dep)) or {}
            want = (live.get("spec") or {}).get("replicas", 1)
            have = (live.get("status") or {}).get("availableReplicas") or 0
            if have < want:
                waiting.append(f"{describe(dep)} {have}/{want} available")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise DeployError(
                f"not ready after {timeout:g}s: " + "; ".join(waiting) + " (kubectl describe "
                "the pods: image pulls, PVC binding and scheduling are the usual causes)"
            )
        time.sleep(WAIT_INTERVAL)


# --- uninstall -----------------------------------------------------------------------------------
def uninstall(
    kube: SyncKube,
    config: DeployConfig,
    *,
    keep_data: bool = False,
    progress: Callable[[Change], None] | None = None,
) -> Report:
    """Remove what apply installed: webhook configurations first, so nothing calls a webhook
    that is going away; then the rest in reverse apply order. ``keep_data`` keeps the registry's
    volumes, its credentials and the namespace holding them."""
    caps, git = capabilities(kube)
    d = deploy_settings(config)
    report = Report(server=git)

    def record(change: Change) -> None:
        report.changes.append(change)
        if progress:
            progress(change)

    objects = list(installed(kube, caps, d.name))
    first = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
    ordered = [o for o in objects if o["kind"] in first]
    ordered += [o for o in reversed(objects) if o["kind"] not in first]
    data_namespaces = set()
    for obj in ordered:
        is_data = (obj["metadata"].get("labels") or {}).get(DATA_LABEL) == "true"
        if keep_data and is_data:
            data_namespaces.add(obj["metadata"].get("namespace"))
            record(Change("kept", describe(obj), "--keep-data"))
            continue
        if obj["kind"] == "Namespace" and obj["metadata"]["name"] in data_namespaces:
            record(Change("kept", describe(obj), "holds what --keep-data keeps"))
            continue
        if kube.delete(object_path(obj), background=True):
            record(Change("deleted", describe(obj)))
    ps = config.pull_secret
    if ps is not None and ps.source:
        # Copies the webhook made in every namespace in scope (managed-by, source annotation).
        copies = kube.list("/api/v1/secrets", label_selector=f"{MANAGED_BY}=mirrorgate")
        for copy_ in copies:
            meta = copy_["metadata"]
            if (meta.get("annotations") or {}).get(PULL_SECRET_SOURCE_ANNOTATION) != ps.source:
                continue
            path = secret_path(meta["namespace"], meta["name"])
            if kube.delete(path, background=True):
                record(Change("deleted", f"Secret {meta['namespace']}/{meta['name']}", "copy"))
    return report


# --- status --------------------------------------------------------------------------------------
@dataclass
class Status:
    server: str
    objects: dict[str, int]
    workloads: list[dict[str, Any]]
    webhooks: list[dict[str, Any]]
    certificates: dict[str, Any]
    reachability: dict[str, Any]

    @property
    def installed(self) -> bool:
        return bool(self.objects)

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "installed": self.installed,
            "objects": self.objects,
            "workloads": self.workloads,
            "webhooks": self.webhooks,
            "certificates": self.certificates,
            "reachability": self.reachability,
        }


def status(kube: SyncKube, config: DeployConfig, *, probe_namespace: str | None = None) -> Status:
    caps, git = capabilities(kube)
    d = deploy_settings(config)
    counts: dict[str, int] = {}
    workloads = []
    webhooks = []
    for obj in installed(kube, caps, d.name):
        counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
        if obj["kind"] == "Deployment":
            spec, st = obj.get("spec") or {}, obj.get("status") or {}
            containers = spec["template"]["spec"]["containers"]
            workloads.append(
                {
                    "name": describe(obj),
                    "images": [c["image"] for c in containers],
                    "replicas": spec.get("replicas", 1),
                    "available": st.get("availableReplicas") or 0,
                }
            )
        if obj["kind"].endswith("WebhookConfiguration"):
            for hook in obj.get("webhooks") or []:
                client = hook.get("clientConfig") or {}
                svc = client.get("service") or {}
                bundle = base64.b64decode(client.get("caBundle") or "")
                service = f"service {svc.get('namespace')}/{svc.get('name')}:{svc.get('port', 443)}"
                webhooks.append(
                    {
                        "configuration": describe(obj),
                        "webhook": hook["name"],
                        "target": client.get("url") or service,
                        "failurePolicy": hook.get("failurePolicy"),
                        "caBundleCertificates": bundle.count(b"BEGIN CERTIFICATE"),
                    }
                )
    tls = TLSMaterial.from_secret(kube.get(secret_path(d.namespace, tls_secret_name(d.name))))
    certificates = describe_tls(tls)
    reach = probe(kube, config, namespace=probe_namespace) if webhooks else {"probed": False}
    return Status(git, counts, workloads, webhooks, certificates, reach)


def probe(kube: SyncKube, config: DeployConfig, *, namespace: str | None = None) -> dict[str, Any]:
    """Ask the API server to admit a dry-run pod annotated ``mirrorgate.io/skip``: the mutating
    webhook answers it with a warning, so the warning proves the API server reached it."""
    ns = namespace or _probe_namespace(kube, config)
    if ns is None:
        return {
            "probed": False,
            "detail": f"no namespace labelled {OPT_IN_LABEL}=true to probe in (--probe-namespace)",
        }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "mirrorgate-reachability-probe",
            "annotations": {"mirrorgate.io/skip": "true"},
        },
        "spec": {"containers": [{"name": "probe", "image": "mirrorgate.invalid/probe:1"}]},
    }
    try:
        _, headers = kube.exchange(
            "POST", f"/api/v1/namespaces/{ns}/pods", query={"dryRun": "All"}, body=pod
        )
    except KubeError as err:
        if VALIDATE_NAME in err.message and "denied the request" in err.message:
            return {"probed": True, "namespace": ns, "mutating": None, "validating": True}
        return {"probed": True, "namespace": ns, "reachable": False, "detail": err.message}
    warning = headers.get("Warning") or headers.get("warning") or ""
    reached = "mirrorgate" in warning
    out: dict[str, Any] = {"probed": True, "namespace": ns, "mutating": reached}
    if not reached:
        out["detail"] = (
            f"{MUTATE_NAME} did not answer (failurePolicy Ignore hides why: check the "
            "webhook's pods, Service endpoints, caBundle and the API server's log)"
        )
    return out


def _probe_namespace(kube: SyncKube, config: DeployConfig) -> str | None:
    excluded = set(config.namespaces.exclude)
    if config.namespaces.mode == "clusterWide":
        candidates = [n["metadata"]["name"] for n in kube.list("/api/v1/namespaces")]
    else:
        labelled = kube.list("/api/v1/namespaces", label_selector=f"{OPT_IN_LABEL}=true")
        candidates = [n["metadata"]["name"] for n in labelled]
    live = [c for c in candidates if c not in excluded]
    return "default" if "default" in live else (live[0] if live else None)


# --- certificates -------------------------------------------------------------------------------
def request_rotation(kube: SyncKube, config: DeployConfig) -> None:
    """Annotate the TLS Secret: the running webhook (or the next apply) rotates the CA."""
    d = deploy_settings(config)
    path = secret_path(d.namespace, tls_secret_name(d.name))
    live = kube.get(path)
    if live is None:
        raise DeployError(f"no Secret {d.namespace}/{tls_secret_name(d.name)}: deploy apply first")
    kube.replace(path, request_ca_rotation(live))


def write_cert_files(material: Material, directory: Path) -> list[Path]:
    """The serving pair and CA bundle (for an out-of-cluster ``serve``); keys mode 0600."""
    if material.tls is None or material.tls.serving is None:
        raise DeployError("no builtin certificates to write (certs.mode is cert-manager)")
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "tls.crt": material.tls.serving.cert_pem,
        "tls.key": material.tls.serving.key_pem,
        "ca.crt": material.tls.ca_bundle,
    }
    out = []
    for name, data in files.items():
        path = directory / name
        if name.endswith(".key"):
            path.touch(mode=0o600)
            path.chmod(0o600)
        path.write_bytes(data)
        out.append(path)
    return out


def hidden_secrets(rendered: Rendered) -> list[str]:
    return [
        f"{describe(o)} (keys: {', '.join(sorted(o.get('data') or {}))})"
        for o in rendered.objects
        if o["kind"] == "Secret"
    ]
