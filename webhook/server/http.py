"""What every admission endpoint shares: reading the body within limits, the time budget the API
server leaves, and one wrapper that maps errors to HTTP statuses and counts every answer.

The review functions the wrapper calls never see error handling or request accounting, as
kubewebhook keeps its metrics around the webhook rather than inside it: a malformed review is a
400 with a one-line reason (the API server's problem), an unexpected error a 500 with the uid and
a log line, and every answer is counted in ``mirrorgate_admission_requests_total`` and timed in
``mirrorgate_admission_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import functools
import time
import urllib.parse
import zlib
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
from mirrorgate.webhook.infra.memory import trim_soon
from mirrorgate.webhook.server.state import METRICS

log = get_logger("admission")
RESPONSE_MARGIN = 0.5
# The API server sends a review in one go; a body that trickles in is a client to let go of.
BODY_TIMEOUT = 5.0
# Idle keep-alive connections, and connections that never finish sending their headers (aiohttp's
# keep-alive timer covers both), are closed after this long (serve --idle-timeout); aiohttp's own
# default is an hour.
IDLE_TIMEOUT = 30.0


def server_options(idle_timeout: float = IDLE_TIMEOUT) -> dict[str, Any]:
    """What the aiohttp server runs with (its handler keywords): no inflating behind the
    handlers' backs (read_review_body does it, bounded), the idle timeout above, and a refused
    body drained for at most a second."""
    return {"auto_decompress": False, "keepalive_timeout": idle_timeout, "lingering_time": 1.0}


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
                extra={"fields": {"webhook": webhook, "reason": str(err)[:300]}},
            )
            return refuse(request, bad_request(str(err)))
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


def refuse(request: web.Request, response: web.Response) -> web.Response:
    """``response``, closing the connection after it when the body was not read to its end: the
    rest of a refused body is never read, let alone inflated."""
    if not request.content.at_eof():
        response.force_close()
    return response


async def read_review_body(request: web.Request) -> bytes:
    """The request body, decompressed, or BadReviewError (a one-line reason for a 400).

    The server runs with aiohttp's own decompression off (``server_options``): a gzip or deflate
    body is inflated here, a chunk at a time, and reading stops the moment the raw or the
    inflated size passes ``MAX_BODY_BYTES``, so a compression bomb costs at most that much work.
    The whole body must arrive within ``BODY_TIMEOUT``. After a refusal the connection is closed
    rather than drained (``refuse``), so nothing goes on inflating or reading it.
    """
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in DECODERS:
        raise BadReviewError(
            f"unsupported Content-Encoding {encoding[:40]!r} (identity, gzip or deflate)"
        )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadReviewError(f"request body exceeds {MAX_BODY_BYTES} bytes")
    inflate = DECODERS[encoding]()
    raw = 0
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.content.iter_any():
                raw += len(chunk)
                if raw > MAX_BODY_BYTES:
                    raise BadReviewError(f"request body exceeds {MAX_BODY_BYTES} bytes")
                body += inflate(chunk, MAX_BODY_BYTES + 1 - len(body))
                if len(body) > MAX_BODY_BYTES:
                    raise BadReviewError(
                        f"request body exceeds {MAX_BODY_BYTES} bytes once decompressed"
                    )
            body += inflate(b"", MAX_BODY_BYTES + 1 - len(body))
    except TimeoutError as err:
        raise BadReviewError(f"request body not received within {BODY_TIMEOUT:g}s") from err
    except zlib.error as err:
        raise BadReviewError(f"body is not valid {encoding}: {err}") from err
    finally:
        if raw > LARGE_BODY or len(body) > LARGE_BODY:
            trim_soon()
    if len(body) > MAX_BODY_BYTES:
        raise BadReviewError(f"request body exceeds {MAX_BODY_BYTES} bytes once decompressed")
    return bytes(body)


# Bodies past this size are rare (a pod is a few KiB) and worth a trim afterwards.
LARGE_BODY = 256 * 1024


class _Inflater:
    """zlib with a bound on what one call may produce: ``inflate(chunk, room)``."""

    def __init__(self, wbits: int) -> None:
        self._z = zlib.decompressobj(wbits)

    def __call__(self, chunk: bytes, room: int) -> bytes:
        data = self._z.unconsumed_tail + chunk
        out = self._z.decompress(data, max(room, 1))
        if chunk == b"" and not self._z.eof and not self._z.unconsumed_tail:
            raise zlib.error("the compressed stream ends early")
        return out


def _identity() -> Callable[[bytes, int], bytes]:
    return lambda chunk, _room: chunk


# gzip (wbits 16+15) and deflate as HTTP means it: zlib-wrapped (wbits 15); identity passes.
DECODERS: dict[str, Callable[[], Callable[[bytes, int], bytes]]] = {
    "identity": _identity,
    "": _identity,
    "gzip": lambda: _Inflater(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _Inflater(16 + zlib.MAX_WBITS),
    "deflate": lambda: _Inflater(zlib.MAX_WBITS),
}


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
