"""The ``mirrorgate`` command: the only place that reads argv, prints for humans and exits.

Exit codes: 0 success; 1 the command ran and found a problem (an invalid image, a denied review);
2 unusable input (bad config, bad flags, unreadable file, unusable certificate).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.metadata
import json
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mirrorgate.deploy.config import DeployConfig, load_config
from mirrorgate.webhook import __version__
from mirrorgate.webhook.core.config import (
    DEFAULT_OWN_NAMESPACE,
    Config,
    ConfigError,
    platform_problem,
)
from mirrorgate.webhook.core.mutation import decide_image

if TYPE_CHECKING:
    from mirrorgate.webhook.controllers.certs import CertRenewal

# serve's default connection cap (--max-connections), lowered at start to fit the fd limit.
DEFAULT_MAX_CONNECTIONS = 1024

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2

CONFIG_HELP = "mirrorgate.yaml to use (default: $MIRRORGATE_CONFIG, else ./mirrorgate.yaml)"


class UsageError(Exception):
    """Input the user must fix; printed without a traceback, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as err:
        print(f"mirrorgate {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrorgate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Make a self-hosted registry the source of truth for a Kubernetes cluster: an admission
            webhook rewrites every Pod image to your registry mirror and injects its pull secret.

            Start with `mirrorgate demo` (a local API server, registry and webhook; no cluster
            needed), check images with `mirrorgate rewrite`, and manifests with `mirrorgate
            review`."""
        ),
        epilog="Exit codes: 0 ok, 1 a problem was found, 2 unusable input (config, flags, files).",
    )
    parser.add_argument("--version", action="version", version=f"mirrorgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the admission webhook (HTTPS) and the metrics endpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Serve POST /mutate, GET /healthz and GET /readyz over HTTPS (TLS 1.2+) and GET /metrics
            over plain HTTP on a separate port. The certificate files are re-read when they change
            on disk (checked every --cert-reload-interval seconds), without a restart and without
            dropping requests in flight. The process never mutates pods in kube-system, in
            namespaces.exclude, or in its own namespace ($POD_NAMESPACE, default "mirrorgate").
            Logs are JSON lines on stderr.

            SIGTERM: /readyz answers 503 and every answer closes its connection for
            --shutdown-delay seconds while serving goes on (endpoints move to other replicas),
            then the socket closes and requests in flight finish (up to 15 s) before exit.

            Limits (clients that misbehave are let go of, the API server's calls are served):
            at most --max-connections connections (idle ones are closed first when full), a TLS
            handshake within 10 s, request headers and idle keep-alive within --idle-timeout, a
            body within 5 s and at most 3 MiB (also once gzip or deflate is inflated), at most
            1000 containers per pod; every answer within the admission budget.

            With pullSecret.source set it also keeps that Secret copied into every namespace in
            scope and creates a missing copy when a pod needs it. Replicas elect one writer with
            a Lease in $POD_NAMESPACE (holder $POD_NAME); the API is reached with the in-cluster
            service account, else $KUBECONFIG, else ~/.kube/config."""
        ),
    )
    serve.add_argument("--config", default=None, help=CONFIG_HELP)
    serve.add_argument("--tls-cert", required=True, help="PEM serving certificate (chain)")
    serve.add_argument("--tls-key", required=True, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--listen", default="0.0.0.0:8443", help="HOST:PORT for HTTPS (default %(default)s)"
    )
    serve.add_argument(
        "--metrics-listen",
        default="0.0.0.0:9090",
        help="HOST:PORT for plain-HTTP /metrics (default %(default)s); 'off' disables it",
    )
    serve.add_argument(
        "--cert-reload-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often to check the certificate files for changes (default %(default)s)",
    )
    serve.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="leader election lease for pull-secret copies (default %(default)s); renew deadline "
        "and retry period scale with it as in client-go (10 s and 2 s for 15 s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open HTTPS connections at most (default %(default)s; lowered to fit the open-file "
        "limit)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection idle this long, or still sending its headers (default "
        "%(default)s)",
    )
    serve.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, keep serving this long with /readyz failing before closing the socket "
        "(default %(default)s; mirrorgate deploy sets 5)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    rewrite = sub.add_parser(
        "rewrite",
        help="print where each image would be pulled from",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Print one line per input image, in order: the rewritten reference, or the input itself
            when it is not rewritten (no matching mirror, skipped, already on a mirror, invalid).
            An invalid reference also prints an error on stderr and makes the exit code 1.
            '-' reads images from standard input, one per line.

            example: mirrorgate rewrite --config mirrorgate.yaml nginx:1.25
            ghcr.io/org/app@sha256:..."""
        ),
    )
    rewrite.add_argument("--config", default=None, help=CONFIG_HELP)
    rewrite.add_argument(
        "--json", action="store_true", help="print [{input, normalized, rewritten, reason}] instead"
    )
    rewrite.add_argument("images", nargs="+", metavar="IMAGE")
    rewrite.set_defaults(func=cmd_rewrite)

    review = sub.add_parser(
        "review",
        help="run a Pod manifest or AdmissionReview through /mutate offline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Read one Pod manifest (YAML or JSON) or one AdmissionReview from FILE ('-' for stdin)
            and print the AdmissionReview response (patch decoded alongside) and the patched Pod:
            the same code path as the webhook's /mutate. A bare Pod is reviewed as a CREATE in its
            metadata.namespace (or --namespace). Namespace selection (opt-in labels) is the API
            server's job and is not simulated; namespaces.exclude is applied."""
        ),
    )
    review.add_argument("--config", default=None, help=CONFIG_HELP)
    review.add_argument(
        "--namespace",
        default=None,
        help="namespace for a Pod manifest without metadata.namespace (default: default)",
    )
    review.add_argument("--output", "-o", choices=["yaml", "json"], default="yaml")
    review.add_argument("file", metavar="FILE")
    review.set_defaults(func=cmd_review)

    prewarm = sub.add_parser(
        "prewarm",
        help="get images onto their mirrors before pods need them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            For each image that mirrorgate would rewrite, on every mirror of its upstream (the
            fallbacks too): with a pull-through mirror (type: proxy) pull the manifests and the
            layers through it so it caches them; with a hosted or copy mirror copy the image from
            its upstream, byte for byte, so tag and index digests stay the same. Credentials and
            CAs come from `registries` in the config. Prints what happened per image and mirror;
            exit code 1 if any failed.

            platforms: by default every platform of an image index, or the mirror's `platforms`
            from the config; --platform overrides both. A copy of a subset is written under a new
            index listing just those platforms, so its digest differs from the upstream's (with
            pinDigests, pods are pinned to the digest the mirror serves). An image referenced by
            digest names the whole index and is always copied whole.

            examples:
              mirrorgate prewarm --config mirrorgate.yaml nginx:1.25 ghcr.io/acme/api:2.1
              mirrorgate prewarm --config mirrorgate.yaml --from-manifests k8s/
              mirrorgate prewarm --platform linux/amd64 --platform linux/arm64 nginx:1.25"""
        ),
    )
    prewarm.add_argument("--config", default=None, help=CONFIG_HELP)
    prewarm.add_argument(
        "--from-manifests",
        metavar="DIR",
        default=None,
        help="take the images of every pod template in DIR's YAML/JSON files",
    )
    prewarm.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        default=None,
        help="copy or warm only this platform of an image index (repeatable; default: the "
        "mirror's platforms, else all)",
    )
    prewarm.add_argument("--json", action="store_true", help="print a JSON report instead")
    prewarm.add_argument(
        "--concurrency", type=int, default=4, help="images in parallel (default 4)"
    )
    prewarm.add_argument("images", nargs="*", metavar="IMAGE")
    prewarm.set_defaults(func=cmd_prewarm)

    scan = sub.add_parser(
        "scan",
        help="judge images with Clair and the scan policy, as /validate does",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Resolve each image's digest (every platform of an index, or those in scan.platforms),
            have Clair index what it has not seen (waiting up to --timeout), and apply the scan
            policy of the config. Prints the verdict and findings per image.

            --running judges what runs in the cluster instead (the kubeconfig, or the
            in-cluster service account; needs list on pods): every image digest a pod runs,
            with the namespaces and the number of pods, as the webhook's continuous view and
            the mirrorgate_running_pods gauge see them.

            Exit codes: 0 every image passes; 1 an image fails the policy; 2 an image is still
            pending or could not be checked (scanner or registry unavailable), or bad input.

            examples:
              mirrorgate scan --config mirrorgate.yaml nginx:1.25 ghcr.io/acme/api:2.1
              mirrorgate scan --config mirrorgate.yaml --running --timeout 60"""
        ),
    )
    scan.add_argument("--config", default=None, help=CONFIG_HELP)
    scan.add_argument(
        "--running",
        action="store_true",
        help="judge every image running in the cluster (from its pods) instead of IMAGE...",
    )
    scan.add_argument("--json", action="store_true", help="print a JSON report instead")
    scan.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="longest wait for indexing (default %(default)s)",
    )
    scan.add_argument("images", nargs="*", metavar="IMAGE")
    scan.set_defaults(func=cmd_scan)

    add_plugin_parsers(sub)
    add_deploy_parsers(sub)
    return parser


# Subcommands of other distributions in the `mirrorgate` namespace: mirrorgate-devtools (a
# checkout's scripts/setup installs it) adds `demo`. The runtime package never imports them.
PLUGIN_GROUP = "mirrorgate.commands"
PLUGINS_MISSING = {
    "demo": "the demo is development tooling, not part of this installation: in a checkout of "
    "mirrorgate, run scripts/setup (it installs devtools/), then .venv/bin/mirrorgate demo",
}


def add_plugin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    found = set()
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        entry.load()(sub)
        found.add(entry.name)
    for name, why in PLUGINS_MISSING.items():
        if name not in found:
            missing = sub.add_parser(name, help=f"(not installed) {why.split(':')[0]}")
            missing.set_defaults(func=functools.partial(_missing_plugin, why))


def _missing_plugin(why: str, args: argparse.Namespace) -> int:
    raise UsageError(why)


def resolve_config(path: str | None) -> DeployConfig:
    """The whole mirrorgate.yaml: every command reads the file the same way, so the mirrors a
    ``registry:`` section provides are the ones ``serve``, ``rewrite`` and ``deploy`` all use."""
    chosen = path or os.environ.get("MIRRORGATE_CONFIG") or "mirrorgate.yaml"
    if not Path(chosen).exists():
        hint = "" if path else " (pass --config FILE or set MIRRORGATE_CONFIG)"
        raise UsageError(f"config file {chosen} not found{hint}")
    return load_config(chosen)


def parse_listen(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {value!r}: expected HOST:PORT, e.g. 0.0.0.0:8443 or [::]:8443")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def cmd_rewrite(args: argparse.Namespace) -> int:
    config = resolve_config(args.config)
    images = _expand_stdin(args.images)
    decisions = [decide_image(image, config) for image in images]
    if args.json:
        print(json.dumps([d.as_dict() for d in decisions], indent=2))
    else:
        for d in decisions:
            print(d.image)
    failed = [d for d in decisions if d.reason == "invalid"]
    for d in failed:
        print(f"mirrorgate rewrite: {d.detail}", file=sys.stderr)
    return EXIT_FOUND if failed else EXIT_OK


def _expand_stdin(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item == "-":
            out.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            out.append(item)
    return out


def cmd_prewarm(args: argparse.Namespace) -> int:
    from mirrorgate.webhook.services.prewarm import images_in_manifests, prewarm

    config = resolve_config(args.config)
    images = _expand_stdin(list(args.images))
    if args.from_manifests:
        folder = Path(args.from_manifests)
        if not folder.is_dir():
            raise UsageError(f"--from-manifests {folder}: not a directory")
        found, problems = images_in_manifests(folder)
        for problem in problems:
            print(f"mirrorgate prewarm: {problem}", file=sys.stderr)
        images.extend(found)
    images = list(dict.fromkeys(images))
    if not images:
        raise UsageError("no images given (pass IMAGE... or --from-manifests DIR)")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    for platform in args.platform or ():
        if (why := platform_problem(platform)) is not None:
            raise UsageError(f"--platform {why}")
    results = asyncio.run(
        prewarm(config, images, concurrency=args.concurrency, platforms=args.platform)
    )
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        for r in results:
            print(r.line())
    return EXIT_FOUND if any(r.status == "failed" for r in results) else EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from mirrorgate.webhook.core.policy import explain
    from mirrorgate.webhook.services.scanner import scan_images

    config = resolve_config(args.config)
    if config.scan is None:
        raise UsageError("the config has no scan section (scan.clair is needed)")
    if args.running:
        if args.images:
            raise UsageError("--running judges what runs in the cluster: give no IMAGE")
        return _scan_running(config, args)
    if not args.images:
        raise UsageError("no images given (pass IMAGE..., - for stdin, or --running)")
    images = _expand_stdin(args.images)
    verdicts = asyncio.run(scan_images(config, images, timeout=args.timeout))
    if args.json:
        print(json.dumps([_verdict_json(v) for v in verdicts], indent=2))
    else:
        for iv in verdicts:
            if iv.outcome == "pass":
                allowed = len(iv.verdict.allowed)
                note = f" ({allowed} accepted by scan.allow)" if allowed else ""
                print(f"{iv.image}: pass {iv.verdict.digest}{note}")
            else:
                print(
                    f"{iv.image}: {iv.outcome}\n"
                    + textwrap.indent(
                        explain(iv, config.scan, clair_url=config.scan.clair.url), "  "
                    )
                )
    outcomes = {v.outcome for v in verdicts}
    if "fail" in outcomes:
        return EXIT_FOUND
    return EXIT_USAGE if outcomes - {"pass"} else EXIT_OK


def _scan_running(config: Config, args: argparse.Namespace) -> int:
    """``scan --running``: every image digest the cluster's pods run, with its verdict."""
    from mirrorgate.webhook.adapters.kube import (
        KubeConfigError,
        KubeError,
        SyncKube,
        load_api_client,
    )
    from mirrorgate.webhook.controllers.running import snapshot
    from mirrorgate.webhook.services.scanner import scan_images

    try:
        with load_api_client() as api:
            running = snapshot(SyncKube(api))
    except KubeConfigError as err:
        raise UsageError(f"--running needs Kubernetes API access: {err}") from None
    except KubeError as err:
        hint = " (the user needs list on pods)" if err.status == 403 else ""
        raise UsageError(f"cannot list pods: {err}{hint}") from None
    refs = running.digests()
    digests = sorted(d for d, ref in refs.items() if ref)
    verdicts = asyncio.run(scan_images(config, [refs[d] for d in digests], timeout=args.timeout))
    rows = []
    for digest, iv in zip(digests, verdicts, strict=True):
        where = running.namespaces_running(digest)
        rows.append((iv, where, sum(where.values())))
    if args.json:
        print(
            json.dumps(
                [
                    _verdict_json(iv) | {"namespaces": where, "pods": pods}
                    for iv, where, pods in rows
                ],
                indent=2,
            )
        )
    else:
        print(f"{'VERDICT':<12} {'WORST':<9} {'PODS':>5}  {'NAMESPACES':<30} IMAGE")
        for iv, where, pods in sorted(rows, key=lambda r: (r[0].outcome != "fail", r[0].image)):
            worst = iv.verdict.worst_severity if iv.outcome == "fail" else "-"
            names = ",".join(sorted(where))
            print(f"{iv.outcome:<12} {worst:<9} {pods:>5}  {names:<30} {iv.image}")
        print(f"{len(rows)} images in {running.pods()} pods")
    outcomes = {iv.outcome for iv, _, _ in rows}
    if "fail" in outcomes:
        return EXIT_FOUND
    return EXIT_USAGE if outcomes - {"pass"} else EXIT_OK


def _verdict_json(iv: Any) -> dict[str, Any]:
    def one(v: Any) -> dict[str, Any]:
        return {
            "outcome": v.outcome,
            "digest": v.digest,
            "platform": v.platform or None,
            "detail": v.detail or None,
            "findings": [_finding(f) for f in v.findings],
            "accepted": [_finding(f) for f in v.allowed],
            "expiredExceptions": [e.id for e in v.expired],
        }

    return {"image": iv.image, **one(iv.verdict), "platforms": [one(p) for p in iv.platforms]}


def _finding(f: Any) -> dict[str, Any]:
    return {
        "id": f.id,
        "cves": list(f.cves),
        "severity": f.severity,
        "package": f.package,
        "version": f.version,
        "fixedIn": f.fixed_in or None,
        "link": f.link or None,
    }


def cmd_review(args: argparse.Namespace) -> int:
    from mirrorgate.webhook.core.reviews import BadReviewError, parse_review, review_mutation

    config = resolve_config(args.config)
    doc = _read_manifest(args.file)
    review_doc = _as_review(doc, namespace=args.namespace)
    try:
        req = parse_review(json.dumps(review_doc))
    except BadReviewError as err:
        raise UsageError(f"{args.file}: {err}") from err
    own = os.environ.get("POD_NAMESPACE", DEFAULT_OWN_NAMESPACE)
    result = review_mutation(req, config, own_namespace=own)
    response = dict(result.response)
    shown = {**response, "response": {**response["response"]}}
    if result.patch:
        shown["response"]["patchDecoded"] = result.patch
    if args.output == "json":
        print(json.dumps({"review": shown, "patched": result.patched}, indent=2))
    else:
        sys.stdout.write(
            yaml.safe_dump_all([shown, result.patched], sort_keys=False, default_flow_style=False)
        )
    for warning in response["response"].get("warnings", []):
        print(f"Warning: {warning}", file=sys.stderr)
    return EXIT_OK if response["response"]["allowed"] else EXIT_FOUND


def _read_manifest(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is neither YAML nor JSON: {str(err).splitlines()[0]}") from err
    if len(docs) != 1:
        raise UsageError(
            f"{path}: expected exactly one document (a Pod or an AdmissionReview), got {len(docs)}"
        )
    return docs[0]


def _as_review(doc: Any, *, namespace: str | None) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise UsageError("the document is not a mapping")
    kind = doc.get("kind")
    if kind == "AdmissionReview":
        return doc
    if kind != "Pod":
        raise UsageError(
            f"kind {kind!r}: mirrorgate mutates Pods only (a controller's pods are reviewed when "
            "they are created); pass a Pod manifest or an AdmissionReview"
        )
    meta = doc.get("metadata") or {}
    ns = namespace or meta.get("namespace") or "default"
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "mirrorgate-review",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": ns,
            "name": meta.get("name"),
            "object": doc,
            "dryRun": True,
        },
    }


def cmd_serve(args: argparse.Namespace) -> int:
    from mirrorgate.webhook.adapters.kube import KubeConfigError
    from mirrorgate.webhook.infra.logs import setup_logging
    from mirrorgate.webhook.server.tls import TLSConfigError

    setup_logging(args.log_level)
    config = resolve_config(args.config)
    if args.lease_duration < 1:
        raise UsageError("--lease-duration must be at least 1 second")
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    if not 0 <= args.shutdown_delay <= 300:
        raise UsageError("--shutdown-delay must be between 0 and 300 seconds")
    if not 1 <= args.idle_timeout <= 3600:
        raise UsageError("--idle-timeout must be between 1 and 3600 seconds")
    listen = parse_listen(args.listen, "--listen")
    metrics_listen = (
        None
        if args.metrics_listen == "off"
        else parse_listen(args.metrics_listen, "--metrics-listen")
    )
    import uvloop

    try:
        # uvloop: faster, and about a third less memory per TLS connection than asyncio's
        # (kube-apiserver opens one per concurrent admission); measured in bench/README.md.
        return uvloop.run(
            _serve(
                config,
                listen=listen,
                metrics_listen=metrics_listen,
                cert=args.tls_cert,
                key=args.tls_key,
                reload_interval=args.cert_reload_interval,
                lease_duration=args.lease_duration,
                max_connections=args.max_connections,
                shutdown_delay=args.shutdown_delay,
                idle_timeout=args.idle_timeout,
            )
        )
    except (TLSConfigError, KubeConfigError) as err:
        raise UsageError(str(err)) from err


def _kubernetes_access(config: Config, log: Any) -> bool:
    """Whether serve can use the Kubernetes API; required when pullSecret.source is set."""
    from mirrorgate.webhook.adapters.kube import KubeConfigError, load_api_client

    try:
        load_api_client().close()
    except KubeConfigError as err:
        if config.pull_secret is not None and config.pull_secret.source:
            raise  # pull-secret copies cannot work without it: stop with the reason
        log.info(
            "no Kubernetes API access: scan-mode namespace labels, pull-failure counting "
            "and Events are off",
            extra={"fields": {"reason": str(err)}},
        )
        return False
    return True


def serve_cert_renewal(config: DeployConfig, *, own_namespace: str) -> CertRenewal | None:
    """The serving certificate's renewal, when serve runs as ``mirrorgate deploy`` installed it.

    The Deployment names the TLS Secret in ``MIRRORGATE_TLS_SECRET``; the renewed Secret reaches
    this process through its mount, which ``serve`` re-reads (``server.tls``).
    """
    from mirrorgate.certs.rotation import RenewalPolicy
    from mirrorgate.webhook.controllers.certs import CertRenewal

    if not os.environ.get("MIRRORGATE_TLS_SECRET") or config.deploy is None:
        return None
    if config.certs.mode != "builtin":
        return None  # cert-manager renews and injects the CA itself
    return CertRenewal(
        release=config.deploy.name,
        namespace=own_namespace,
        policy=RenewalPolicy.from_seconds(
            ca=config.certs.ca_duration,
            serving=config.certs.serving_duration,
            overlap=config.certs.rotation_overlap,
        ),
        registry_namespace=config.registry.namespace if (config.registry and config.scan) else None,
    )


async def _serve(
    config: DeployConfig,
    *,
    listen: tuple[str, int],
    metrics_listen: tuple[str, int] | None,
    cert: str,
    key: str,
    reload_interval: float,
    lease_duration: float,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    shutdown_delay: float = 0.0,
    idle_timeout: float = 30.0,
) -> int:
    from aiohttp import web

    from mirrorgate.webhook.controllers.leader import ElectionSettings, default_identity
    from mirrorgate.webhook.infra.logs import get_logger
    from mirrorgate.webhook.infra.memory import tune_allocator
    from mirrorgate.webhook.infra.metrics import Metrics
    from mirrorgate.webhook.server.app import Settings, create_app, create_metrics_app
    from mirrorgate.webhook.server.listener import (
        STATUS,
        FdExhaustionReporter,
        Listener,
        raise_open_files_limit,
    )
    from mirrorgate.webhook.server.tls import ReloadingTLS

    log = get_logger("serve")
    tune_allocator()
    asyncio.get_running_loop().set_exception_handler(FdExhaustionReporter())
    max_connections = raise_open_files_limit(max_connections)
    metrics = Metrics()

    def record_cert(info: Any) -> None:
        metrics.certificate_expiry.labels("serving").set(info.not_after.timestamp())
        metrics.certificate_reloads.labels("loaded").inc()

    events_ca = config.scan.events.client_ca_file if config.scan else None
    tls = ReloadingTLS(
        cert,
        key,
        client_ca_file=events_ca,
        on_load=record_cert,
        on_error=lambda: metrics.certificate_reloads.labels("failed").inc(),
    )
    own_namespace = os.environ.get("POD_NAMESPACE", DEFAULT_OWN_NAMESPACE)
    # POD_NAME (downward API) names this replica in the lease; hostname_pid outside a cluster.
    election = ElectionSettings.scaled(
        lease_duration, identity=os.environ.get("POD_NAME") or default_identity()
    )
    kubernetes = _kubernetes_access(config, log)
    settings = Settings(
        config=config,
        own_namespace=own_namespace,
        election=election,
        kubernetes=kubernetes,
        cert_renewal=serve_cert_renewal(config, own_namespace=own_namespace),
        idle_timeout=idle_timeout,
    )
    app = create_app(settings, metrics=metrics)
    runner = web.AppRunner(app, shutdown_timeout=15, access_log=None)
    await runner.setup()
    runners = [runner]
    listener = Listener(
        runner,
        app[STATUS],
        host=listen[0],
        port=listen[1],
        ssl_context=tls.context,
        max_connections=max_connections,
    )
    try:
        await listener.start()
        if metrics_listen:
            mrunner = web.AppRunner(create_metrics_app(metrics), access_log=None)
            await mrunner.setup()
            runners.append(mrunner)
            await web.TCPSite(mrunner, metrics_listen[0], metrics_listen[1]).start()
    except OSError as err:
        for r in reversed(runners):
            await r.cleanup()
        raise UsageError(f"cannot listen: {err.strerror or err}") from err

    log.info(
        "serving",
        extra={
            "fields": {
                "listen": f"{listen[0]}:{listen[1]}",
                "metrics": f"{metrics_listen[0]}:{metrics_listen[1]}" if metrics_listen else None,
                "own_namespace": own_namespace,
                "mirrors": len(config.mirrors),
                "version": __version__,
            }
        },
    )
    # What start-up loaded (modules, config, clients, caches' structure) lives as long as the
    # process: frozen, the collector's full passes no longer walk it between admissions (a
    # 30-container /mutate: p99 44 -> 18 ms, throughput +25%; bench/README.md).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(tls.watch(reload_interval))
    await stop.wait()
    if shutdown_delay > 0:
        app[STATUS].draining = True
        log.info(
            "draining: readiness fails, still serving",
            extra={"fields": {"for_s": shutdown_delay}},
        )
        await asyncio.sleep(shutdown_delay)
    log.info("shutting down: finishing requests in flight")
    watcher.cancel()
    await listener.stop()
    for r in reversed(runners):
        await r.cleanup()
    log.info("stopped")
    return EXIT_OK


# --- deploy and certs ----------------------------------------------------------------------------
def add_deploy_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mirrorgate deploy render|apply|uninstall|status`` and ``mirrorgate certs
    issue|rotate-ca``; the work is done in ``deploy.commands``."""

    def kube_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help=CONFIG_HELP)
        p.add_argument(
            "--kubeconfig", default=None, help="kubeconfig (default: $KUBECONFIG, ~/.kube/config)"
        )
        p.add_argument("--context", default=None, help="kubeconfig context (default: current)")

    url_help = (
        "register the webhooks against an out-of-cluster `mirrorgate serve` at https://HOST:PORT "
        "(development, tests) instead of the in-cluster Service"
    )
    deploy = sub.add_parser(
        "deploy",
        help="install the registry and the webhook from mirrorgate.yaml (render, apply, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Install everything the registry:, deploy: and certs: sections describe: the registry
            (a hosted instance and one pull-through cache per upstream), its pull path (NodePort or
            Ingress), the pull secret, the webhook with its RBAC, certificates and webhook
            configurations. See docs/deploy.md."""
        ),
    )
    dsub = deploy.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    render = dsub.add_parser(
        "render", help="print every manifest as multi-document YAML (GitOps, review)"
    )
    render.add_argument("--config", default=None, help=CONFIG_HELP)
    render.add_argument(
        "--include-secrets",
        action="store_true",
        help="print the Secrets too (passwords, keys); by default they are only listed by name",
    )
    render.add_argument(
        "--kube-version",
        default=None,
        metavar="MAJOR.MINOR",
        help="API versions for that Kubernetes (e.g. 1.20: PodDisruptionBudget and CronJob as "
        "v1beta1); default: current",
    )
    render.add_argument(
        "--kubeconfig",
        default=None,
        help="render for that cluster: its API versions and the secrets it already holds",
    )
    render.add_argument("--context", default=None, help="kubeconfig context")
    render.add_argument("--webhook-url", default=None, metavar="URL", help=url_help)
    render.set_defaults(func=_deploy_command("render"))

    apply = dsub.add_parser(
        "apply",
        help="server-side apply in dependency order (field manager mirrorgate), report changes",
    )
    kube_flags(apply)
    apply.add_argument("--wait", action="store_true", help="wait until every Deployment is ready")
    apply.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="for --wait (300)"
    )
    apply.add_argument("--webhook-url", default=None, metavar="URL", help=url_help)
    apply.add_argument(
        "--cert-out",
        default=None,
        metavar="DIR",
        help="with --webhook-url: write tls.crt, tls.key and ca.crt for the out-of-cluster serve",
    )
    apply.add_argument("-v", "--verbose", action="store_true", help="list unchanged objects too")
    apply.set_defaults(func=_deploy_command("apply"))

    uninstall = dsub.add_parser(
        "uninstall", help="remove the webhook configurations first, then everything else"
    )
    kube_flags(uninstall)
    uninstall.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the registry's volumes and credentials (and their namespace)",
    )
    uninstall.set_defaults(func=_deploy_command("uninstall"))

    status = dsub.add_parser(
        "status", help="what is installed, versions, certificate expiry, webhook reachability"
    )
    kube_flags(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--probe-namespace",
        default=None,
        metavar="NS",
        help="namespace for the dry-run reachability probe (default: an opted-in one)",
    )
    status.set_defaults(func=_deploy_command("status"))

    certs = sub.add_parser("certs", help="the webhook PKI: issue certificates, rotate the CA")
    csub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    issue = csub.add_parser(
        "issue",
        help="write a CA and a serving certificate for a Service (manual setups)",
        description="Writes ca.crt, ca.key, tls.crt and tls.key (keys mode 0600) to --out. The "
        "serving certificate names <svc>, <svc>.<ns>, <svc>.<ns>.svc and "
        "<svc>.<ns>.svc.cluster.local (plus --name).",
    )
    issue.add_argument("--service", required=True, help="the webhook's Service name")
    issue.add_argument("--namespace", required=True, help="the Service's namespace")
    issue.add_argument("--out", required=True, metavar="DIR", help="folder to write to")
    issue.add_argument(
        "--name", action="append", metavar="NAME", help="another DNS name or IP (repeatable)"
    )
    issue.add_argument("--ca-days", type=int, default=365, help="CA lifetime (365)")
    issue.add_argument("--days", type=int, default=90, help="serving certificate lifetime (90)")
    issue.set_defaults(func=_deploy_command("issue"))
    rotate = csub.add_parser(
        "rotate-ca",
        help="start a CA rotation now (old and new CA both trusted until the switch is done)",
    )
    kube_flags(rotate)
    rotate.set_defaults(func=_deploy_command("rotate-ca"))


def _deploy_command(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from mirrorgate.deploy import commands
        from mirrorgate.deploy.apply import DeployError, DeployUsageError
        from mirrorgate.deploy.render import RenderError
        from mirrorgate.webhook.adapters.kube import KubeConfigError, KubeError

        try:
            if name == "issue":
                if args.days < 1 or args.ca_days <= args.days:
                    raise UsageError("--days must be at least 1 and less than --ca-days")
                return commands.cmd_issue(args)
            config = resolve_config(args.config)
            func = {
                "render": commands.cmd_render,
                "apply": commands.cmd_apply,
                "uninstall": commands.cmd_uninstall,
                "status": commands.cmd_status,
                "rotate-ca": commands.cmd_rotate_ca,
            }[name]
            if name != "render" and config.deploy is None and config.registry is None:
                raise UsageError("the config has neither a deploy: nor a registry: section")
            return func(config, args)
        except (KubeConfigError, RenderError, DeployUsageError) as err:
            raise UsageError(str(err)) from err
        except (DeployError, KubeError) as err:
            print(f"mirrorgate {args.command} {name}: {err}", file=sys.stderr)
            return EXIT_FOUND

    return run


if __name__ == "__main__":
    sys.exit(main())
