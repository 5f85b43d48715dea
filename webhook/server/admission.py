"""``POST /mutate``: rewrite a pod's images to their mirrors, after asking the mirrors.

The decision is ``core.reviews.review_mutation`` (pure); this module adds what needs I/O: the
mirror check between the two passes (``services.mirrors``), the pull-secret copy the pod's
namespace must have before the kubelet looks for it, the image counters and one log line per
admission. Error mapping and request accounting are ``server.http.admission_endpoint``'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from mirrorgate.webhook.controllers.pullsecrets import PullSecretSync
from mirrorgate.webhook.core.events import admission_events
from mirrorgate.webhook.core.mutation import MirrorCheck
from mirrorgate.webhook.core.pullsecrets import CopyResult, admission_warning, injected_pull_secret
from mirrorgate.webhook.core.reviews import (
    MAX_CHECKS,
    AdmissionRequest,
    ReviewResult,
    mirror_candidates,
    review_mutation,
)
from mirrorgate.webhook.infra.logs import get_logger, log_fields
from mirrorgate.webhook.infra.metrics import Metrics
from mirrorgate.webhook.server.http import Answer, admission_budget, admission_endpoint
from mirrorgate.webhook.server.state import EVENTS, METRICS, PULL_SECRETS, SETTINGS, VERIFIER

log = get_logger("admission")
TOO_MANY = MirrorCheck(
    ok=False,
    reason="too_many",
    detail=f"more than {MAX_CHECKS} distinct images in one pod: not checked",
)
# Longest an admission waits for a missing pull-secret copy to be created.
ENSURE_COPY_TIMEOUT = 5.0


async def review_mutate(request: web.Request, req: AdmissionRequest, started: float) -> Answer:
    metrics = request.app[METRICS]
    settings = request.app[SETTINGS]
    config = settings.config
    # The budget holds for the whole answer: it runs from when the request was taken up, and
    # what the first pass cost is kept back for the second one after the mirror check.
    deadline = started + admission_budget(request, config.verify_timeout)
    result = review_mutation(req, config, own_namespace=settings.own_namespace)
    verifier = request.app.get(VERIFIER)
    candidates = mirror_candidates(result) if verifier is not None else []
    if verifier is not None and candidates:
        now = time.perf_counter()
        # Second pass with what the mirror said: fall back or pin digests.
        checks = await verifier.check_choices(
            candidates[:MAX_CHECKS],
            budget=max(0.01, deadline - now - (now - started)),
            allow_copy=not req.dry_run,
        )
        for group in candidates[MAX_CHECKS:]:
            for candidate in group:
                checks.setdefault(candidate, TOO_MANY)
        # The first pass assumed each image's first mirror can serve it; with that confirmed
        # and no digests to pin, a second pass would compute the same result.
        if config.pin_digests or not all(
            (check := checks.get(group[0])) is not None and check.ok for group in candidates
        ):
            result = review_mutation(
                req, config, own_namespace=settings.own_namespace, checks=checks
            )

    sync = request.app.get(PULL_SECRETS)
    if sync is not None and req.namespace:
        await _ensure_pull_secret(request, sync, req.namespace, req, result, started=started)

    _count_images(metrics, result)
    _log_result(req, result, time.perf_counter() - started)
    events = request.app.get(EVENTS)
    if events is not None and result.containers:
        events.record(admission_events(req, result))
    return Answer(result.response, result.outcome)


handle_mutate = admission_endpoint("mutate", review_mutate)


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


def _count_images(metrics: Metrics, result: ReviewResult) -> None:
    rewritten: dict[tuple[str, str], int] = {}
    for c in result.containers:
        upstream = c.decision.upstream
        for mirror, reason in c.decision.passed_over:
            # Label values from the config (mirrors[]) and MirrorCheck's bounded reasons.
            metrics.child(metrics.mirrors_passed_over, upstream or "", mirror, reason).inc()
        if c.applied and upstream is not None:
            key = (upstream, c.decision.mirror or "")
            rewritten[key] = rewritten.get(key, 0) + 1
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
    for (upstream, mirror), n in rewritten.items():
        metrics.child(metrics.images_rewritten, upstream, mirror).inc(n)


def _log_result(req: AdmissionRequest, result: ReviewResult, elapsed: float) -> None:
    fields: dict[str, Any] = {
        "uid": req.uid,
        "namespace": req.namespace,
        "name": req.name,
        "operation": result.operation,
        "outcome": result.outcome,
        "dry_run": req.dry_run,
        "ms": round(elapsed * 1000, 3),
    }
    changed = [
        {"container": c.name, "from": c.decision.input, "to": c.decision.image}
        | (
            {"passed_over": [{"mirror": m, "reason": r} for m, r in c.decision.passed_over]}
            if c.decision.passed_over
            else {}
        )
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
