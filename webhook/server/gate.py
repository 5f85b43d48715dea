"""The vulnerability gate's HTTP side: ``POST /validate`` and the scan event callbacks.

``/validate`` judges the images a pod brings in (``core.policy`` decides, ``services.scanner``
knows) and never holds the API server longer than ``scan.admissionBudget``. ``/events/clair``
(Clair's notifier) and ``/events/registry`` (distribution's notifications, for scan-on-push) only
accept authenticated callers: a shared bearer token from ``scan.events.tokenFile`` or a client
certificate signed by ``scan.events.clientCAFile``; with neither configured they refuse everyone.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from mirrorgate.webhook.adapters.clair import ClairClient
from mirrorgate.webhook.core.config import Config
from mirrorgate.webhook.core.events import denial_event
from mirrorgate.webhook.core.policy import Decision, ImageVerdict, Verdict, decide
from mirrorgate.webhook.core.reviews import (
    MAX_CHECKS,
    AdmissionRequest,
    BadReviewError,
    build_response,
    images_to_validate,
)
from mirrorgate.webhook.infra.logs import get_logger, log_fields
from mirrorgate.webhook.infra.metrics import Metrics
from mirrorgate.webhook.server.http import (
    Answer,
    admission_budget,
    admission_endpoint,
    bad_request,
    read_review_body,
    refuse,
)
from mirrorgate.webhook.server.state import (
    EVENTS,
    LEADER,
    NAMESPACE_LABELS,
    REGISTRY,
    RUNNING,
    SCANNER,
    NamespaceLabelsLookup,
)
from mirrorgate.webhook.services.scanner import Scanner
from mirrorgate.webhook.services.vulnerable import RunningVerdicts

log = get_logger("gate")
SCAN_MODE_LABEL = "mirrorgate.io/scan-mode"


def add_gate(app: web.Application, config: Config, metrics: Metrics, *, own_namespace: str) -> None:
    """Register the gate's routes and its scanner's lifecycle on ``app`` (if scan is configured)."""
    if config.scan is None:
        return

    async def scanner_ctx(app: web.Application) -> AsyncIterator[None]:
        assert config.scan is not None
        registry = app[REGISTRY]
        clair = ClairClient(config.scan.clair)
        scanner = Scanner(
            clair,
            registry,
            config,
            on_index=lambda result: metrics.scan_indexed.labels(result).inc(),
            on_queue=metrics.scan_queue_depth.set,
        )
        scanner.start()
        app[SCANNER] = scanner
        view = _running_view(app, scanner, config, metrics)
        yield
        if view is not None:
            await view.stop()
            metrics.set_running_pods({})
        await scanner.close()
        await clair.close()

    app.cleanup_ctx.append(scanner_ctx)
    gate = _Gate(config, metrics, own_namespace=own_namespace)
    app.router.add_post("/validate", admission_endpoint("validate", gate.validate))
    app.router.add_post("/events/clair", gate.clair_event)
    app.router.add_post("/events/registry", gate.registry_event)


def _running_view(
    app: web.Application, scanner: Scanner, config: Config, metrics: Metrics
) -> RunningVerdicts | None:
    """The continuous view of running images (services.vulnerable), fed by the pod watch."""
    running = app.get(RUNNING)
    if running is None or config.scan is None:
        return None
    events = app.get(EVENTS)

    def leading() -> bool:
        elector = app.get(LEADER)
        return elector is None or elector.is_leader

    view = RunningVerdicts(
        running,
        scanner,
        config.scan,
        set_gauge=metrics.set_running_pods,
        record=events.record if events is not None else None,
        is_leader=leading,
        interval=min(60.0, config.scan.verdict_ttl),
        clair_url=config.scan.clair.url,
    )
    scanner.on_notified = view.notified
    running.on_new = view.started
    return view.start()


class _Gate:
    def __init__(self, config: Config, metrics: Metrics, *, own_namespace: str) -> None:
        assert config.scan is not None
        self.config = config
        self.policy = config.scan
        self.metrics = metrics
        self.own_namespace = own_namespace
        self._token_file = config.scan.events.token_file

    # --- /validate -----------------------------------------------------------------------------

    async def validate(self, request: web.Request, req: AdmissionRequest, started: float) -> Answer:
        images = images_to_validate(req, self.config, own_namespace=self.own_namespace)
        if not images:
            return Answer(build_response(req.uid), "allowed")
        scanner = request.app[SCANNER]
        # From when the request was taken up, less what deciding and answering will cost (about
        # what it took to get here), so the whole answer fits scan.admissionBudget.
        now = time.perf_counter()
        deadline = started + admission_budget(request, self.policy.admission_budget)
        verdicts = await scanner.verdicts(
            images[:MAX_CHECKS], budget=max(0.01, deadline - now - (now - started))
        )
        verdicts += [
            ImageVerdict(
                image,
                Verdict(
                    "unavailable",
                    detail=f"more than {MAX_CHECKS} distinct images in one pod: not checked",
                ),
            )
            for image in images[MAX_CHECKS:]
        ]
        mode = self._mode(request, req.namespace)
        watch = request.app.get(RUNNING)
        running = (
            [
                iv.image
                for iv in verdicts
                if iv.outcome == "fail" and watch.running_in(iv.digests, req.namespace)
            ]
            if watch is not None and req.namespace
            else []
        )
        decision = decide(
            verdicts, self.policy, mode=mode, clair_url=self.policy.clair.url, running=running
        )
        self._count(req, verdicts, decision, known=request.app.get(NAMESPACE_LABELS))
        status = None
        if not decision.allowed:
            status = {"code": 403, "reason": "Forbidden", "message": decision.message}
            events = request.app.get(EVENTS)
            note = denial_event(req, decision.message) if events is not None else None
            if events is not None and note is not None:
                events.record([note])
        response = build_response(
            req.uid,
            allowed=decision.allowed,
            warnings=decision.warnings,
            status=status,
            audit_annotations=decision.audit,
        )
        self._log(req, verdicts, decision, mode)
        return Answer(response, "allowed" if decision.allowed else "denied")

    def _mode(self, request: web.Request, namespace: str | None) -> str:
        lookup = request.app.get(NAMESPACE_LABELS)
        labels = lookup(namespace) if (lookup and namespace) else None
        mode = (labels or {}).get(SCAN_MODE_LABEL)
        return mode if mode in ("enforce", "audit") else self.policy.mode

    def _count(
        self,
        req: AdmissionRequest,
        verdicts: list[ImageVerdict],
        decision: Decision,
        *,
        known: NamespaceLabelsLookup | None,
    ) -> None:
        counts: dict[tuple[str, str], int] = {}
        for iv in verdicts:
            key = (iv.outcome, iv.verdict.worst_severity)
            counts[key] = counts.get(key, 0) + 1
        for (outcome, severity), n in counts.items():
            self.metrics.child(self.metrics.scan_verdicts, outcome, severity).inc(n)
        if decision.rejected:
            namespace = self.metrics.rejected_namespace(req.namespace or "", known=known)
        for _image, outcome in decision.rejected:
            self.metrics.images_rejected.labels(namespace, outcome).inc()

    def _log(
        self, req: AdmissionRequest, verdicts: list[ImageVerdict], decision: Decision, mode: str
    ) -> None:
        level = 20 if (not decision.allowed or decision.warnings) else 10
        if not log.isEnabledFor(level):
            return  # allowed admissions log at debug: don't build the fields for nothing
        fields = {
            "uid": req.uid,
            "namespace": req.namespace,
            "name": req.name,
            "operation": req.operation,
            "allowed": decision.allowed,
            "mode": mode,
            "dry_run": req.dry_run,
            "images": [
                {
                    "image": iv.image,
                    "outcome": iv.outcome,
                    "digest": iv.verdict.digest,
                    "findings": len(iv.verdict.findings),
                    "detail": iv.verdict.detail or None,
                }
                for iv in verdicts
            ],
        }
        log_fields(log, level, "images validated", fields)

    # --- /events/* -----------------------------------------------------------------------------

    def _authorized(self, request: web.Request, *, clair: ClairClient | None = None) -> bool:
        given = request.headers.get("Authorization", "")
        if clair is not None and given.startswith("Bearer ") and clair.verifies(given[7:]):
            return True  # signed by Clair's notifier with the shared PSK
        if self._token_file:
            try:
                token = Path(self._token_file).read_text().strip()
            except OSError:
                log.error(
                    "cannot read scan.events.tokenFile",
                    extra={"fields": {"path": self._token_file}},
                )
                token = ""
            if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
        if self.policy.events.client_ca_file:
            # The TLS layer verified the chain against clientCAFile; a certificate means trust.
            transport = request.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            if ssl_object is not None and ssl_object.getpeercert():
                return True
        return False

    async def clair_event(self, request: web.Request) -> web.Response:
        if not self._authorized(request, clair=request.app[SCANNER].clair):
            self.metrics.scan_events.labels("clair", "unauthorized").inc()
            return web.Response(status=401, text="unauthorized\n")
        try:
            body = json.loads(await read_review_body(request))
            notification_id, callback = body["notification_id"], body["callback"]
            if not isinstance(notification_id, str) or not isinstance(callback, str):
                raise TypeError("not strings")
        except (ValueError, KeyError, TypeError, BadReviewError):
            self.metrics.scan_events.labels("clair", "bad_request").inc()
            return refuse(request, bad_request("expected {notification_id, callback} strings"))
        # Only ever follow callbacks to the configured Clair: the body must not make mirrorgate
        # send its Clair credentials anywhere else.
        if not callback.startswith(self.policy.clair.url + "/"):
            self.metrics.scan_events.labels("clair", "rejected").inc()
            return web.Response(status=400, text="callback is not on scan.clair.url\n")
        fresh = request.app[SCANNER].handle_clair_notification(notification_id, callback)
        self.metrics.scan_events.labels("clair", "accepted" if fresh else "repeated").inc()
        # Clair's notifier wants exactly 200, repeats included.
        return web.Response(status=200, text="ok\n")

    async def registry_event(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            self.metrics.scan_events.labels("registry", "unauthorized").inc()
            return web.Response(status=401, text="unauthorized\n")
        try:
            envelope = json.loads(await read_review_body(request))
            if not isinstance(envelope, dict) or not isinstance(envelope.get("events", []), list):
                raise ValueError("not an envelope")
        except (ValueError, BadReviewError):
            self.metrics.scan_events.labels("registry", "bad_request").inc()
            return refuse(request, bad_request("expected a notification envelope: {events: [...]}"))
        queued = request.app[SCANNER].handle_registry_events(envelope)
        self.metrics.scan_events.labels("registry", "accepted").inc()
        return web.json_response({"queued": queued})
