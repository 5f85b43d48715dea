"""The aiohttp applications: the admission server (``/mutate``, probes) and the metrics server.

``create_app`` is what both ``mirrorgate serve`` and the tests call. Decisions live in the pure
modules; this module reads bodies, maps errors to HTTP statuses, logs one line per admission and
counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirrorgate.certs.rotation import CertRenewer
from mirrorgate.webhook.adapters.kube import Kube, load_api_client
from mirrorgate.webhook.adapters.registry import RegistryClient
from mirrorgate.webhook.controllers.leader import ElectionSettings, LeaderElector
from mirrorgate.webhook.controllers.namespaces import NamespaceLabels
from mirrorgate.webhook.controllers.pullfailures import PullFailureCounter, watch_pull_failures
from mirrorgate.webhook.controllers.pullsecrets import CopyResult, PullSecretSync, Target
from mirrorgate.webhook.core.config import DEFAULT_OWN_NAMESPACE, Config
from mirrorgate.webhook.core.pullsecrets import admission_warning, injected_pull_secret
from mirrorgate.webhook.core.reviews import (
    MAX_BODY_BYTES,
    AdmissionRequest,
    BadReviewError,
    ReviewResult,
    mirror_candidates,
    parse_review,
    review_mutation,
)
from mirrorgate.webhook.infra.logs import get_logger, log_fields
from mirrorgate.webhook.infra.metrics import Metrics
from mirrorgate.webhook.server.gate import (
    NAMESPACE_LABELS,
    REGISTRY,
    add_gate,
    admission_budget,
    read_review_body,
)
from mirrorgate.webhook.services.mirrors import MirrorVerifier

log = get_logger("admission")


@dataclass(frozen=True, slots=True)
class Settings:
    config: Config
    own_namespace: str = DEFAULT_OWN_NAMESPACE
    # Who writes pull-secret copies and counts kubelet pull failures: one replica at a time.
    election: ElectionSettings = field(default_factory=ElectionSettings)
    # Whether the server may use the Kubernetes API (in-cluster or a kubeconfig): namespace labels
    # for scan modes, kubelet pull-failure Events, pull-secret copies. Required for the latter.
    kubernetes: bool = False


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
VERIFIER = web.AppKey("verifier", MirrorVerifier)
PULL_SECRETS = web.AppKey("pull_secrets", PullSecretSync)
# Longest an admission waits for a missing pull-secret copy to be created.
ENSURE_COPY_TIMEOUT = 5.0


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> web.Application:
    # One byte over the limit so that aiohttp's own check fires only for bodies we must refuse.
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1)
    app[SETTINGS] = settings
    app[METRICS] = metrics if metrics is not None else Metrics()
    if settings.config.needs_registry or settings.config.scan is not None:
        app.cleanup_ctx.append(_registry_client_ctx)
    if settings.config.needs_registry:
        app.cleanup_ctx.append(_registry_ctx)
    target = Target.from_config(settings.config, own_namespace=settings.own_namespace)
    if settings.kubernetes or target is not None:
        app.cleanup_ctx.append(_cluster_ctx)
    app.router.add_post("/mutate", handle_mutate)
    add_gate(app, settings.config, app[METRICS], own_namespace=settings.own_namespace)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/readyz", handle_health)
    return app


def _cert_renewer(kube: Kube, settings: Settings) -> CertRenewer | None:
    """The serving certificate's renewal, when serve runs as ``mirrorgate deploy`` installed it.

    The Deployment names the TLS Secret in ``MIRRORGATE_TLS_SECRET``; the renewed Secret reaches
    this process through its mount, which ``serve`` re-reads (webhook.tls).
    """
    config = settings.config
    if not os.environ.get("MIRRORGATE_TLS_SECRET") or config.deploy is None:
        return None
    if config.certs.mode != "builtin":
        return None  # cert-manager renews and injects the CA itself
    notify = config.registry.namespace if (config.registry and config.scan) else None
    return CertRenewer.for_release(
        kube,
        release=config.deploy.name,
        namespace=settings.own_namespace,
        durations=config.certs,
        registry_namespace=notify,
    )


def create_metrics_app(metrics: Metrics) -> web.Application:
    app = web.Application()
    app[METRICS] = metrics

    async def handle_metrics(request: web.Request) -> web.Response:
        body = generate_latest(request.app[METRICS].registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", handle_metrics)
    return app


async def _registry_client_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[SETTINGS].config
    metrics = app[METRICS]
    client = app[REGISTRY] = RegistryClient.from_settings(
        config.registries, config.registry_client, on_request=metrics.registry_request
    )
    metrics.registry_cache.source = lambda: (client.stats.cache_hits, client.stats.cache_misses)
    yield
    await app[REGISTRY].close()


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    """The mirror verifier lives as long as the server."""
    config = app[SETTINGS].config
    metrics = app[METRICS]
    client = app[REGISTRY]
    app[VERIFIER] = MirrorVerifier(
        client, config, on_copy=lambda result: metrics.mirror_copies.labels(result).inc()
    )
    yield
    await app[VERIFIER].close()


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Everything that watches the cluster, on one API client and one leader election.

    Every replica watches (pull-secret state, namespace labels for scan modes); the lease holder
    alone writes pull-secret copies and counts kubelet pull failures, so counters are not
    multiplied by the number of replicas.
    """
    settings = app[SETTINGS]
    config = settings.config
    metrics = app[METRICS]
    kube = Kube(load_api_client())
    target = Target.from_config(config, own_namespace=settings.own_namespace)
    sync = PullSecretSync(kube, target, metrics=metrics) if target is not None else None
    # The gate's scan-mode labels: from the pull-secret view when there is one (one Namespace
    # watch, not two), else from a watch of their own.
    labels = NamespaceLabels(kube) if config.scan is not None and sync is None else None
    failures = PullFailureCounter(config, metrics.image_pull_failures)
    failure_watch: asyncio.Task[None] | None = None

    def leadership(leading: bool) -> None:
        nonlocal failure_watch
        if sync is not None:
            sync.set_leading(leading)
        if leading and failure_watch is None:
            failure_watch = asyncio.ensure_future(watch_pull_failures(kube, failures))
        elif not leading and failure_watch is not None:
            failure_watch.cancel()
            failure_watch = None

    elector = LeaderElector(
        kube, namespace=settings.own_namespace, settings=settings.election, on_change=leadership
    )
    if sync is not None:
        await sync.start()
        app[PULL_SECRETS] = sync
        if config.scan is not None:
            app[NAMESPACE_LABELS] = sync.namespace_labels
    if labels is not None:
        labels.start()
        app[NAMESPACE_LABELS] = labels.get
    elector.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            renewer = _cert_renewer(kube, settings)
            if renewer is not None:
                await stack.enter_async_context(renewer.running())
            yield
    finally:
        await elector.stop()
        if failure_watch is not None:
            failure_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await failure_watch
        if labels is not None:
            await labels.stop()
        if sync is not None:
            await sync.stop()
        kube.close()


async def handle_health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _bad_request(reason: str) -> web.Response:
    return web.Response(status=400, text=reason.replace("\n", " ") + "\n")


async def handle_mutate(request: web.Request) -> web.Response:
    started = time.perf_counter()
    metrics = request.app[METRICS]
    settings = request.app[SETTINGS]
    try:
        req = parse_review(await read_review_body(request))
    except BadReviewError as err:
        metrics.admission_requests.labels("mutate", "other", "bad_request").inc()
        log.warning("malformed admission review", extra={"fields": {"reason": str(err)}})
        return _bad_request(str(err))

    operation = metrics.operation_label(req.operation)
    config = settings.config
    try:
        result = review_mutation(req, config, own_namespace=settings.own_namespace)
        verifier = request.app.get(VERIFIER)
        candidates = mirror_candidates(result) if verifier is not None else []
        if verifier is not None and candidates:
            # Second pass with what the mirror said: fall back or pin digests.
            checks = await verifier.check_all(
                candidates,
                budget=admission_budget(request, config.verify_timeout),
                allow_copy=not req.dry_run,
            )
            # The first pass assumed every mirror can serve; with that confirmed and no digests
            # to pin, a second pass would compute the same result.
            if config.pin_digests or not all(c.ok for c in checks.values()):
                result = review_mutation(
                    req, config, own_namespace=settings.own_namespace, checks=checks
                )
    except Exception:
        metrics.admission_requests.labels("mutate", operation, "error").inc()
        log.exception("internal error while reviewing", extra={"fields": {"uid": req.uid}})
        return web.Response(status=500, text=f"internal error reviewing uid {req.uid}\n")

    sync = request.app.get(PULL_SECRETS)
    if sync is not None and req.namespace:
        await _ensure_pull_secret(request, sync, req.namespace, req, result, started=started)

    elapsed = time.perf_counter() - started
    _account(metrics, result, operation)
    metrics.child(metrics.admission_duration, "mutate").observe(elapsed)
    _log_result(req.uid, req.namespace, req.name, req.dry_run, result, elapsed)
    return web.Response(
        body=orjson.dumps(result.response),
        content_type="application/json",
    )


async def _ensure_pull_secret(
    request: web.Request,
    sync: PullSecretSync,
    namespace: str,
    req: AdmissionRequest,
    result: ReviewResult,
    *,
    started: float,
) -> None:
    """The pod now references the pull secret: its namespace gets the Secret before the answer,
    so the kubelet never looks for it in vain. Dry runs only look (sideEffects: NoneOnDryRun)."""
    name = sync.target.name
    if not injected_pull_secret(req.obj, result.patched, name):
        return
    budget = admission_budget(request, ENSURE_COPY_TIMEOUT) - (time.perf_counter() - started)
    try:
        copy = await asyncio.wait_for(
            sync.ensure_copy(namespace, dry_run=req.dry_run), timeout=max(0.1, budget)
        )
    except TimeoutError:
        copy = CopyResult("failed", "no answer from the API server in time")
    warning = admission_warning(copy, namespace=namespace, name=name)
    if warning:
        response = result.response["response"]
        response["warnings"] = [*response.get("warnings", []), warning]


def _account(metrics: Metrics, result: ReviewResult, operation: str) -> None:
    metrics.child(metrics.admission_requests, "mutate", operation, result.outcome).inc()
    rewritten: dict[str, int] = {}
    for c in result.containers:
        if c.applied and c.decision.upstream is not None:
            rewritten[c.decision.upstream] = rewritten.get(c.decision.upstream, 0) + 1
        elif c.decision.reason == "invalid":
            metrics.images_left.labels("invalid_reference").inc()
        elif c.decision.reason == "unmirrorable":
            metrics.images_left.labels("unmirrorable").inc()
        elif c.decision.reason == "mirror-unavailable":
            metrics.images_fallback.labels(
                c.decision.upstream or "", c.decision.fallback_reason or "unknown"
            ).inc()
        elif c.decision.reason == "rewritten":
            metrics.images_left.labels("missing_pull_secret").inc()
    for upstream, n in rewritten.items():
        metrics.child(metrics.images_rewritten, upstream).inc(n)


def _log_result(
    uid: str,
    namespace: str | None,
    name: str | None,
    dry_run: bool,
    result: ReviewResult,
    elapsed: float,
) -> None:
    fields = {
        "uid": uid,
        "namespace": namespace,
        "name": name,
        "operation": result.operation,
        "outcome": result.outcome,
        "dry_run": dry_run,
        "ms": round(elapsed * 1000, 3),
    }
    changed = [
        {"container": c.name, "from": c.decision.input, "to": c.decision.image}
        for c in result.containers
        if c.applied
    ]
    if changed:
        fields["rewritten"] = changed
    fallbacks = [
        {
            "container": c.name,
            "image": c.decision.input,
            "mirror": c.decision.candidate,
            "reason": c.decision.fallback_reason,
            "detail": c.decision.detail,
        }
        for c in result.containers
        if c.decision.reason == "mirror-unavailable"
    ]
    if fallbacks:
        fields["fallbacks"] = fallbacks
    warnings = result.response["response"].get("warnings")
    if warnings:
        fields["warnings"] = warnings
    # Unchanged, excluded and ignored admissions are the bulk of the traffic: keep them at debug.
    level = 20 if (changed or warnings or fallbacks) else 10
    log_fields(log, level, "admission reviewed", fields)
