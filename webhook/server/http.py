"""What every admission endpoint shares: reading the body within limits, the time budget the API
server leaves, and one wrapper that maps errors to HTTP statuses and counts every answer.

The review functions the wrapper calls never see error handling or request accounting, as
kubewebhook keeps its metrics around the webhook rather than inside it: a malformed review is a
400 with a one-line reason (the API server's problem), an unexpected error a 500 with the uid and
a log line, and every answer is counted in ``mirrorgate_admission_requests_total`` and timed in
``mirrorgate_admission_duration_seconds``.
"""

from __future__ import annotations

import functools
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from mirrorgate.webhook.core.reviews import (
    MAX_BODY_BYTES,
    AdmissionRequest,
    BadReviewError,
    parse_review,
)
from mirrorgate.webhook.infra.logs import get_logger
from mirrorgate.webhook.server.state import METRICS

log = get_logger("admission")
RESPONSE_MARGIN = 0.5


@dataclass(slots=True)
class Answer:
    """A review function's result: the AdmissionReview response and the outcome to count."""

    response: dict[str, Any]
    outcome: str


Review = Callable[[web.Request, AdmissionRequest, float], Awaitable[Answer]]


def admission_endpoint(webhook: str, review: Review) -> Callable[[web.Request], Awaitable[Any]]:
    """The aiohttp handler for ``review`` (called with the request, the parsed review and the
    ``time.perf_counter()`` at which the request was taken up)."""

    async def handle(request: web.Request) -> web.Response:
        started = time.perf_counter()
        metrics = request.app[METRICS]
        try:
            req = parse_review(await read_review_body(request))
        except BadReviewError as err:
            metrics.admission_requests.labels(webhook, "other", "bad_request").inc()
            log.warning(
                "malformed admission review",
                extra={"fields": {"webhook": webhook, "reason": str(err)}},
            )
            return bad_request(str(err))
        operation = metrics.operation_label(req.operation)
        try:
            answer = await review(request, req, started)
        except Exception:
            metrics.admission_requests.labels(webhook, operation, "error").inc()
            log.exception(
                "internal error while reviewing",
                extra={"fields": {"webhook": webhook, "uid": req.uid}},
            )
            return web.Response(status=500, text=f"internal error reviewing uid {req.uid}\n")
        metrics.child(metrics.admission_requests, webhook, operation, answer.outcome).inc()
        metrics.child(metrics.admission_duration, webhook).observe(time.perf_counter() - started)
        return web.Response(body=orjson.dumps(answer.response), content_type="application/json")

    return handle


def bad_request(reason: str) -> web.Response:
    return web.Response(status=400, text=reason.replace("\n", " ") + "\n")


async def read_review_body(request: web.Request) -> bytes:
    """The request body, or BadReviewError when it is over the AdmissionReview size limit."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadReviewError(f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise BadReviewError(f"request body exceeds {MAX_BODY_BYTES} bytes") from err


def admission_budget(request: web.Request, configured: float) -> float:
    """``configured``, capped by the API server's ``?timeout=`` for this call less a margin for
    the answer to travel back."""
    api_timeout = _api_timeout(request.query_string)
    if api_timeout is None:
        return configured
    return max(0.05, min(configured, api_timeout - RESPONSE_MARGIN))


@functools.lru_cache(maxsize=64)
def _api_timeout(query: str) -> float | None:
    """Seconds in ``timeout=`` (``10s`` or ``10``) of a raw query string; None when absent or
    unreadable. Cached: the API server sends the same few strings, and ``request.query`` builds
    a MultiDict per request (4 us)."""
    raw = dict(urllib.parse.parse_qsl(query)).get("timeout", "")
    try:
        return float(raw[:-1]) if raw.endswith("s") else float(raw)
    except ValueError:
        return None
