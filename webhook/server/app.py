"""The aiohttp applications: the admission server and the metrics server.

``create_app`` is what both ``mirrorgate serve`` and the tests call: it wires the routes
(``/mutate`` in ``admission``, ``/validate`` and the scan callbacks in ``gate``, probes) and, as
``cleanup_ctx``, everything with a lifetime: the registry client, the mirror verifier, and the
cluster side (watches, leader election, pull-secret copies, pull-failure counting, certificate
renewal).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mirrorgate.webhook.adapters.kube import Kube, load_api_client
from mirrorgate.webhook.adapters.registry import RegistryClient
from mirrorgate.webhook.controllers.certs import CertRenewer
from mirrorgate.webhook.controllers.events import EventRecorder
from mirrorgate.webhook.controllers.leader import LeaderElector
from mirrorgate.webhook.controllers.namespaces import NamespaceLabels
from mirrorgate.webhook.controllers.pullfailures import PullFailureCounter, watch_pull_failures
from mirrorgate.webhook.controllers.pullsecrets import PullSecretSync, Target
from mirrorgate.webhook.controllers.running import RunningImages
from mirrorgate.webhook.core.reviews import MAX_BODY_BYTES
from mirrorgate.webhook.infra.metrics import Metrics
from mirrorgate.webhook.server.admission import handle_mutate
from mirrorgate.webhook.server.gate import add_gate
from mirrorgate.webhook.server.http import server_options
from mirrorgate.webhook.server.listener import STATUS, ServeStatus, track_requests
from mirrorgate.webhook.server.state import (
    EVENTS,
    LEADER,
    METRICS,
    NAMESPACE_LABELS,
    PULL_SECRETS,
    REGISTRY,
    RUNNING,
    SETTINGS,
    VERIFIER,
    Settings,
)
from mirrorgate.webhook.services.mirrors import MirrorVerifier

__all__ = ["Settings", "create_app", "create_metrics_app"]


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> web.Application:
    # One byte over the limit so that aiohttp's own check fires only for bodies we must refuse;
    # the server options (no inflating behind our back, short keep-alive) travel with the app.
    app = web.Application(
        client_max_size=MAX_BODY_BYTES + 1,
        handler_args=server_options(settings.idle_timeout),
        middlewares=[track_requests],
    )
    app[SETTINGS] = settings
    app[STATUS] = ServeStatus()
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
    app.router.add_get("/readyz", handle_ready)
    return app


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
    app[LEADER] = elector
    if sync is not None:
        await sync.start()
        app[PULL_SECRETS] = sync
        if config.scan is not None:
            app[NAMESPACE_LABELS] = sync.namespace_labels
    if labels is not None:
        labels.start()
        app[NAMESPACE_LABELS] = labels.get
    elector.start()
    if config.scan is not None:
        # Which digests run where (scan.running, services.vulnerable): one watch on pods.
        app[RUNNING] = RunningImages(kube).start()
    if config.events:
        app[EVENTS] = EventRecorder(
            kube, count=lambda reason, result: metrics.events.labels(reason, result).inc()
        ).start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if settings.cert_renewal is not None:
                renewer = CertRenewer.for_release(kube, settings.cert_renewal)
                await stack.enter_async_context(renewer.running())
            yield
    finally:
        if EVENTS in app:
            await app[EVENTS].stop()
        if RUNNING in app:
            await app[RUNNING].stop()
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


async def handle_ready(request: web.Request) -> web.Response:
    if request.app[STATUS].draining:
        return web.Response(status=503, text="draining: shutting down\n")
    return web.Response(text="ok\n")
