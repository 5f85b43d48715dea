"""What ``mirrorgate deploy ...`` and ``mirrorgate certs ...`` do, given parsed arguments.

``webhook.cli`` owns argv, the config file lookup and exit codes; these functions take the loaded
config and the parsed flags, print for humans (or JSON) and return an exit code. Secret values are
printed only by ``deploy render --include-secrets``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

from mirrorgate.certs.pki import generate_ca, issue_serving, service_names
from mirrorgate.deploy.apply import (
    Change,
    DeployUsageError,
    apply,
    hidden_secrets,
    prepare,
    request_rotation,
    status,
    uninstall,
    write_cert_files,
)
from mirrorgate.deploy.config import DeployConfig
from mirrorgate.deploy.material import Existing, decide, read_password_file, serving_names
from mirrorgate.deploy.render import DEFAULT_CAPABILITIES, Capabilities, Rendered, render
from mirrorgate.webhook.adapters.kube import SyncKube

EXIT_OK, EXIT_FOUND = 0, 1


def check_webhook_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise DeployUsageError(f"--webhook-url {url!r}: expected https://HOST:PORT (no path)")
    return url.rstrip("/")


def parse_kube_version(text: str | None) -> Capabilities:
    if text is None:
        return DEFAULT_CAPABILITIES
    major, _, minor = text.removeprefix("v").partition(".")
    if not (major.isdigit() and minor.split(".")[0].isdigit()):
        raise DeployUsageError(f"--kube-version {text!r}: expected MAJOR.MINOR, e.g. 1.20")
    return Capabilities.for_version(int(major), int(minor.split(".")[0]), monitoring=True)


def open_kube(kubeconfig: str | None, context: str | None) -> SyncKube:
    return SyncKube.from_kubeconfig(kubeconfig, context=context)


class _PlainDumper(yaml.SafeDumper):
    """No ``&id001`` anchors: manifests are read by people and GitOps tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_documents(rendered: Rendered, *, include_secrets: bool, header: str) -> str:
    lines = [f"# {header}"]
    objects = list(rendered.objects)
    if not include_secrets:
        hidden = hidden_secrets(rendered)
        objects = [o for o in objects if o["kind"] != "Secret"]
        lines.append("# Secrets are not shown (--include-secrets prints them); the manifests refer")
        lines.append("# to them by name:")
        lines += [f"#   {h}" for h in hidden]
    lines += [f"# note: {n}" for n in rendered.notes]
    body = yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + "\n---\n" + body


def cmd_render(config: DeployConfig, args: Any, *, out: IO[str] = sys.stdout) -> int:
    url = check_webhook_url(args.webhook_url)
    if args.kubeconfig:
        with open_kube(args.kubeconfig, args.context) as kube:
            rendered, _material, _caps, git, _existing = prepare(kube, config, webhook_url=url)
        header = f"mirrorgate deploy render for {git} (secrets as the cluster holds them)"
    else:
        caps = parse_kube_version(args.kube_version)
        password = read_password_file(config) if config.registry else None
        host = urlsplit(url).hostname if url else None
        material = decide(
            config,
            Existing(),
            names=serving_names(config, webhook_url_host=host),
            password=password,
        )
        rendered = render(config, material, capabilities=caps, webhook_url=url)
        version = ".".join(map(str, caps.version))
        header = (
            f"mirrorgate deploy render for Kubernetes {version} (fresh secrets: "
            "`deploy apply` keeps those already in the cluster)"
        )
    header += f": {len(rendered.objects)} objects in apply order"
    out.write(render_documents(rendered, include_secrets=args.include_secrets, header=header))
    return EXIT_OK


def cmd_apply(config: DeployConfig, args: Any, *, out: IO[str] = sys.stdout) -> int:
    url = check_webhook_url(args.webhook_url)
    if args.cert_out and url is None:
        raise DeployUsageError("--cert-out needs --webhook-url (an out-of-cluster serve uses them)")

    def progress(change: Change) -> None:
        if change.action != "unchanged" or args.verbose:
            out.write(change.line() + "\n")
            out.flush()

    with open_kube(args.kubeconfig, args.context) as kube:
        report = apply(
            kube,
            config,
            webhook_url=url,
            wait=args.wait,
            timeout=args.timeout,
            progress=progress,
        )
    unchanged = len(report.changes) - len(report.changed)
    out.write(
        f"applied to {report.server}: {len(report.changed)} changed, {unchanged} unchanged "
        "(field manager mirrorgate)\n"
    )
    for note in report.notes:
        out.write(f"note: {note}\n")
    if args.cert_out:
        assert report.material is not None
        files = write_cert_files(report.material, Path(args.cert_out))
        out.write("certificates for serve: " + ", ".join(str(f) for f in files) + "\n")
    return EXIT_OK


def cmd_uninstall(config: DeployConfig, args: Any, *, out: IO[str] = sys.stdout) -> int:
    def progress(change: Change) -> None:
        out.write(change.line() + "\n")
        out.flush()

    with open_kube(args.kubeconfig, args.context) as kube:
        report = uninstall(kube, config, keep_data=args.keep_data, progress=progress)
    deleted = sum(1 for c in report.changes if c.action == "deleted")
    kept = sum(1 for c in report.changes if c.action == "kept")
    out.write(f"uninstalled from {report.server}: {deleted} deleted, {kept} kept\n")
    return EXIT_OK


def cmd_status(config: DeployConfig, args: Any, *, out: IO[str] = sys.stdout) -> int:
    with open_kube(args.kubeconfig, args.context) as kube:
        st = status(kube, config, probe_namespace=args.probe_namespace)
    if args.json:
        out.write(json.dumps(st.as_dict(), indent=2) + "\n")
    else:
        out.write(format_status(st.as_dict()))
    reach = st.reachability
    unreachable = reach.get("probed") and not (reach.get("mutating") or reach.get("validating"))
    return EXIT_FOUND if not st.installed or unreachable else EXIT_OK


def format_status(doc: dict[str, Any]) -> str:
    lines = [f"API server: {doc['server']}"]
    if not doc["installed"]:
        return "\n".join([*lines, "mirrorgate is not installed (deploy apply installs it)"]) + "\n"
    counts = ", ".join(f"{n} {k}" for k, n in doc["objects"].items())
    lines.append(f"installed: {counts}")
    for w in doc["workloads"]:
        lines.append(
            f"  {w['name']}: {w['available']}/{w['replicas']} available, "
            f"image {', '.join(w['images'])}"
        )
    for h in doc["webhooks"]:
        lines.append(
            f"  {h['configuration']}: {h['webhook']} -> {h['target']}, failurePolicy "
            f"{h['failurePolicy']}, caBundle {h['caBundleCertificates']} CA(s)"
        )
    c = doc["certificates"]
    if c.get("present"):
        serving = c.get("serving") or {}
        lines.append(
            f"certificates: serving until {serving.get('notAfter')} for "
            f"{', '.join(serving.get('names', []))}; CA until {(c.get('ca') or {}).get('notAfter')}"
        )
        if c.get("rotation"):
            lines.append(f"  CA rotation in progress: {c['rotation']}")
    else:
        lines.append("certificates: no TLS Secret (certs.mode cert-manager, or not applied)")
    r = doc["reachability"]
    if not r.get("probed"):
        lines.append(f"reachability: not probed ({r.get('detail', 'no webhook configurations')})")
    elif r.get("mutating") or r.get("validating"):
        lines.append(
            f"reachability: the API server reached the webhook (namespace {r['namespace']})"
        )
    else:
        lines.append(f"reachability: NOT reached: {r.get('detail', '')}")
    return "\n".join(lines) + "\n"


def cmd_rotate_ca(config: DeployConfig, args: Any, *, out: IO[str] = sys.stdout) -> int:
    with open_kube(args.kubeconfig, args.context) as kube:
        request_rotation(kube, config)
    out.write(
        "CA rotation requested: the running webhook (or the next deploy apply) publishes the new "
        "CA next to the old one, switches after certs.rotationOverlap, then drops the old one\n"
    )
    return EXIT_OK


def cmd_issue(args: Any, *, out: IO[str] = sys.stdout) -> int:
    """``certs issue``: a CA and a serving certificate as files, for manual setups."""
    names = service_names(args.service, args.namespace) + list(args.name or [])
    ca = generate_ca(lifetime=dt.timedelta(days=args.ca_days))
    serving = issue_serving(ca, names, lifetime=dt.timedelta(days=args.days))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}
    files |= {"tls.crt": serving.cert_pem, "tls.key": serving.key_pem}
    for name, data in files.items():
        path = folder / name
        if name.endswith(".key"):
            path.touch(mode=0o600)
            path.chmod(0o600)
        path.write_bytes(data)
    not_after = serving.certificate.not_valid_after_utc.isoformat()
    out.write(
        f"wrote {', '.join(str(folder / n) for n in files)}\n"
        f"serving certificate for {', '.join(names)}, valid until {not_after}\n"
        "caBundle for the webhook configurations: base64 of ca.crt\n"
    )
    return EXIT_OK
