"""A Clair v4 stand-in for tests: Clair's HTTP API as the real server answers it.

There is no Clair binary on this machine, so mirrorgate's Clair client (webhook/adapters/clair.py,
used by webhook/services/scanner.py) is tested against this. It follows what Clair and claircore
*do* (read from quay/clair `httptransport/`, `middleware/auth/`, `internal/httputil/signer.go`,
`notifier/` and claircore `libindex/`, `indexer/controller/`), not what the OpenAPI file promises.
Where the two differ, the code wins:

Auth (`middleware/auth`: PSK checker, go-jose JWT)
    Every request but `/robots.txt` needs `Authorization: Bearer <JWT>` (prefix exactly
    "Bearer "), HS256/384/512 over the base64-decoded PSK. `iss` must be `clair-intraservice` or
    one of the configured issuers; no claim is required besides that. `exp`, `nbf` and `iat` are
    checked only when present, with 15 s leeway (`iat` may not be in the future). Anything else
    is an empty `401`, before routing (so unknown paths are 401 too).
POST /indexer/api/v1/index_report
    Blocks while indexing. `400` for an undecodable manifest or one without hash or layers, `412`
    for `If-None-Match: "<indexer state>"`. Otherwise the layers are fetched (only those not
    scanned before, concurrently, each digest once; `Accept-Encoding: gzip` unless given) with the
    manifest's headers; only `200` is accepted, the sha256 of the bytes received must match, the
    compression must match the content type. Success: `201` + IndexReport (`IndexFinished`),
    `Location`, two `Link`s, `ETag`; no Content-Type is set, so Go sniffs it (`text/plain;
    charset=utf-8`, or `application/x-gzip` when the body is gzip-compressed). A manifest already
    indexed is answered `201` with the stored report and fetches nothing. A fetch failure is NOT a
    201: the controller stores an IndexReport with `state: IndexError`, `success: false` and
    `err`, and returns the error, so the handler answers `500 {"code": "internal-error",
    "message": "failed to start scan: failed to fetch layers: ..."}`; the stored report is then
    what `GET .../index_report/{digest}` returns, and the next POST indexes again.
GET /matcher/api/v1/vulnerability_report/{digest}
    `400` bad digest, `202` + empty body while the matcher is not initialised, `404` unless an
    IndexReport with state `IndexFinished` exists, else `200` (never 201) with Content-Type
    `application/vnd.clair.index_report.v1+json` (sic, see the reference README) and
    `Cache-Control: max-age=N`.
Notifier
    Webhook: POST `{"callback": ..., "notification_id": ...}` with `Content-Type:
    application/json`, the configured extra headers and, when a PSK is configured, `Authorization:
    Bearer <HS256 JWT, iss clair-notifier, iat, nbf=now-60, exp=now+60>`. Only `200` counts as
    delivered. Pages: notifications ordered by their own UUID, `page_size` default 500 (0 means
    the default, negative is a 500), `page.next` = id of the last notification when more follow;
    an unknown notification id is an empty `200` page. DELETE marks the set deleted (`200`, empty
    body; pages are still served until Clair's GC runs); an id that never existed is a `500`.
Errors
    Handler errors are `{"code": "bad-request"|"not-found"|"method-not-allowed"|
    "too-many-requests"|"internal-error", "message": ...}` as `application/json`. Unknown paths
    are Go's ServeMux `404 page not found` in text/plain, not JSON. Responses of the three APIs are
    gzip/deflate compressed when the client accepts it (Clair's compress middleware).

Not modelled: the `internal/` endpoints, update operations, Clair-Error trailers, zstd bodies,
real package scanning (reports are whatever the test maps with `set_report`).

The server runs on 127.0.0.1 in its own thread with its own event loop, so sync tests and async
tests (any loop) can use it; `stop()`/`start()` keeps the port and the state, like a restart of a
Clair with its database.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import gzip
import hashlib
import json
import re
import ssl
import threading
import time
import urllib.parse
import uuid
import warnings
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import jwt
from aiohttp import web
from multidict import CIMultiDict

# Clair's real reports, notifier pages and API spec, copied into the project (see its README).
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "clair"
REPORT_FILES = {
    "trimmed": "derived/vulnerabilityreport.trimmed.json",
    "full": "testdata/quay/vulnerabilityreport.json",
    "alpine": "testdata/quay/vulnerabilityreport_withenrichments.json",
}
NOTIFICATION_PAGE_FILES = {
    "added": "derived/notification_page.CONSTRUCTED.json",
    "removed": "derived/notification_page.last.CONSTRUCTED.json",
}

INTRASERVICE_ISSUER = "clair-intraservice"  # httptransport: always accepted next to auth.psk.iss
NOTIFIER_ISSUER = "clair-notifier"  # the `iss` of every request the notifier signs
AUTH_LEEWAY = 15.0  # middleware/auth PSK: ValidateWithLeeway(..., 15*time.Second)
SIGNER_LEEWAY = 60  # internal/httputil Signer: jwt.DefaultLeeway (1 minute) for nbf and exp
DEFAULT_PAGE_SIZE = 500

INDEX_PATH = "/indexer/api/v1/index_report"
INDEX_REPORT_PREFIX = "/indexer/api/v1/index_report/"
INDEX_STATE_PATH = "/indexer/api/v1/index_state"
VULN_REPORT_PREFIX = "/matcher/api/v1/vulnerability_report/"
NOTIFICATION_PREFIX = "/notifier/api/v1/notification/"
OPENAPI_PATH = "/openapi/v1"

VULN_REPORT_CONTENT_TYPE = "application/vnd.clair.index_report.v1+json"
INDEX_REPORT_TYPES = ("application/vnd.clair.indexreport.v1+json", "application/json")
INDEX_STATE_TYPES = ("application/vnd.clair.indexstate.v1+json", "application/json")
NOTIFICATION_TYPES = ("application/vnd.clair.notification.v1+json", "application/json")
OPENAPI_TYPES = ("application/json", "application/vnd.oai.openapi+json")
LINK_INDEX = '<{}>; rel="https://projectquay.io/clair/v1/index_report"'
LINK_REPORT = '<{}>; rel="https://projectquay.io/clair/v1/vulnerability_report"'

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SNIFFED = "X-Clair-Standin-Sniffed"  # internal marker: Content-Type is what Go would sniff


# reports -----------------------------------------------------------------------------------
def load_report(name: str | Path) -> dict[str, Any]:
    """A fresh copy of a real vulnerability report: `trimmed`, `full`, `alpine`, or a file path.

    `trimmed` is derived/vulnerabilityreport.trimmed.json (5 packages, High/Medium/Low/Unknown),
    `full` testdata/quay/vulnerabilityreport.json (RHEL 8, 177 vulnerabilities), `alpine`
    testdata/quay/vulnerabilityreport_withenrichments.json (26 vulnerabilities, all Unknown).
    """
    path = REFERENCE_DIR / REPORT_FILES[name] if name in REPORT_FILES else Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"Clair reference report {path} is missing: tests/data/clair is part of the checkout"
        )
    return json.loads(path.read_text())


def empty_report(digest: str) -> dict[str, Any]:
    """A clean report for a manifest: the keys of the real reports, all maps empty."""
    return {
        "manifest_hash": digest,
        "packages": {},
        "distributions": {},
        "repository": {},
        "environments": {},
        "vulnerabilities": {},
        "package_vulnerabilities": {},
        "enrichments": {},
    }


def default_vulnerability(reason: str) -> dict[str, Any]:
    """The VulnSummary of the constructed notification page for `reason` (added/removed)."""
    name = NOTIFICATION_PAGE_FILES.get(reason, NOTIFICATION_PAGE_FILES["added"])
    page = json.loads((REFERENCE_DIR / name).read_text())
    return page["notifications"][0]["vulnerability"]


# the client-side oracle ---------------------------------------------------------------------
def make_psk_jwt(
    psk_b64: str,
    issuer: str,
    *,
    ttl: float = 60,
    now: float | None = None,
    algorithm: str = "HS256",
    claims: Mapping[str, Any] | None = None,
) -> str:
    """A JWT as a Clair client should send it: HS256 over the decoded PSK with iss, iat, nbf, exp.

    `claims` are merged over the standard ones (a value of None removes that claim). Written
    apart from the stand-in's verifier: this is the test oracle.
    """
    key = base64.standard_b64decode(psk_b64.encode())
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
    }
    for name, value in (claims or {}).items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    with warnings.catch_warnings():  # HS384/HS512 over a 32-byte test key: on purpose
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(payload, key, algorithm=algorithm)


# records -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    hash: str
    uri: str
    headers: Mapping[str, tuple[str, ...]]


@dataclass
class IndexRequest:
    """One POST that reached the indexer handler (a valid manifest; faults and 401s never do)."""

    manifest: str
    layers: tuple[Layer, ...]
    received: float  # time.monotonic()
    finished: float | None = None
    status: int | None = None
    state: str | None = None  # IndexFinished / IndexError of the report answered or stored
    fetched: tuple[str, ...] = ()  # layer digests fetched for this request
    error: str | None = None

    @property
    def layer_uris(self) -> tuple[str, ...]:
        return tuple(layer.uri for layer in self.layers)

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.received


@dataclass(frozen=True)
class LayerFetch:
    manifest: str
    digest: str
    uri: str
    status: int | None  # HTTP status the layer URI answered; None when the request failed
    size: int
    error: str | None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: str
    status: int
    authorized: bool


@dataclass(frozen=True)
class PageRequest:
    notification_id: str
    page_size: str | None
    next: str | None
    returned: int
    status: int


@dataclass
class WebhookDelivery:
    notification_id: str
    target: str
    body: dict[str, Any]
    headers: dict[str, str]
    status: int | None = None
    error: str | None = None


@dataclass
class _NotificationSet:
    notifications: list[dict[str, Any]]  # sorted by id, as Clair's store pages them
    deleted: bool = False


@dataclass
class _Fault:
    status: int
    message: str
    retry_after: str | None
    remaining: int | None


@dataclass
class _ParsedManifest:
    hash: str
    layers: list[Layer] = field(default_factory=list)


class _BadRequest(Exception):
    pass


# helpers -------------------------------------------------------------------------------------
def _b64url_decode(text: str) -> bytes:
    text = text.rstrip("=")
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("illegal base64 data")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_digest(text: Any) -> str:
    """claircore.ParseDigest: `algo:hex` with the algorithm's length; raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"digest must be a string, not {type(text).__name__}")
    algo, sep, hexpart = text.partition(":")
    if not sep:
        raise ValueError(f"invalid digest format: {text!r}")
    if algo not in _DIGEST_SIZES:
        raise ValueError(f"unknown algorithm {algo!r}")
    try:
        raw = binascii.unhexlify(hexpart)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"unable to decode digest as hex: {err}") from None
    if len(raw) != _DIGEST_SIZES[algo]:
        raise ValueError(f"bad checksum length: {len(raw)}")
    return text


def _go_path_base(path: str) -> str:
    """Go's path.Base."""
    stripped = path.rstrip("/")
    if not stripped:
        return "/" if path else "."
    return stripped.rsplit("/", 1)[-1]


def _go_quote(data: bytes | str) -> str:
    """Go's %q of a string or byte slice (close enough for error messages)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="surrogateescape")
    escapes = {
        '"': '\\"',
        "\\": "\\\\",
        "\a": "\\a",
        "\b": "\\b",
        "\f": "\\f",
        "\n": "\\n",
        "\r": "\\r",
        "\t": "\\t",
        "\v": "\\v",
    }
    out = []
    for char in data:
        if char in escapes:
            out.append(escapes[char])
        elif 0xDC80 <= ord(char) <= 0xDCFF:  # a byte that was not valid UTF-8
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}")
    return '"' + "".join(out) + '"'


def _error_code(status: int) -> str:
    return {
        400: "bad-request",
        404: "not-found",
        405: "method-not-allowed",
        429: "too-many-requests",
    }.get(status, "internal-error")


def _api_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """httptransport.apiError: JSON error body, nosniff."""
    body = json.dumps({"code": _error_code(status), "message": message}, separators=(",", ":"))
    response = web.Response(status=status, body=body.encode(), headers=dict(headers or {}))
    response.headers["Content-Type"] = "application/json"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _go_not_found() -> web.Response:
    """net/http.NotFound, what Go's ServeMux answers for a path no handler owns."""
    return web.Response(
        status=404,
        body=b"404 page not found\n",
        headers={"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"},
    )


def _json_body(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"  # Go's Encoder adds \n


def _pick_content_type(request: web.Request, allow: tuple[str, ...]) -> str | None:
    """httptransport.pickContentType: the first allowed type the Accept header matches."""
    values = request.headers.getall("Accept", [])
    if not values:
        return allow[0]
    acceptable: list[tuple[float, str, str]] = []
    for value in values:
        for part in value.split(","):
            media, _, params = part.strip().partition(";")
            if "/" not in media:
                return None
            quality = 1.0
            for param in params.split(";"):
                name, _, raw = param.strip().partition("=")
                if name.strip() == "q":
                    try:
                        quality = float(raw)
                    except ValueError:
                        quality = 0.0
            kind, _, subtype = media.strip().lower().partition("/")
            acceptable.append((quality, kind, subtype))
    if not acceptable:
        return allow[0]
    acceptable.sort(key=lambda item: -item[0])  # stable, like sort.SliceStable
    for _quality, kind, subtype in acceptable:
        for candidate in allow:
            ctype, _, csub = candidate.partition("/")
            if (kind == "*" and subtype == "*") or (kind == ctype and subtype in (csub, "*")):
                return candidate
    return None


def _compression(request: web.Request) -> web.ContentCoding | None | bool:
    """middleware/compress: the coding to use, None for identity, False for a 415."""
    header = request.headers.get("Accept-Encoding")
    if header is None:
        return None
    accepted: list[tuple[float, str]] = []
    refused: set[str] = set()
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        quality = 0.0  # Clair's parser leaves Q at 0 unless given
        for param in params.split(";"):
            key, _, raw = param.strip().partition("=")
            if key.strip() == "q":
                if raw.strip() == "0":
                    refused.add(name)
                    quality = -1
                    break
                try:
                    quality = float(raw)
                except ValueError:
                    refused.add(name)
                    quality = -1
                    break
        if quality >= 0:
            accepted.append((quality, name))
    accepted.sort(key=lambda item: -item[0])
    for _quality, name in accepted:
        if name in ("gzip", "x-gzip"):
            return web.ContentCoding.gzip
        if name == "deflate":
            return web.ContentCoding.deflate
        if name == "identity":
            return None
        if name == "*":
            if "gzip" not in refused:
                return web.ContentCoding.gzip
            if "identity" not in refused:
                return None
            return False
    if "identity" in refused or "*" in refused:
        return False
    return None


# the server --------------------------------------------------------------------------------
class ClairStandIn:
    """Clair v4 (indexer + matcher + notifier, combo mode) on 127.0.0.1 in its own thread.

    `psk` is the base64 key of Clair's `auth.psk.key` (None: auth disabled, as Clair without an
    `auth` section), `issuers` its `auth.psk.iss`. `ca_file` is the CA bundle used to verify TLS
    when fetching layers and delivering webhooks. `index_delay`, `matcher_ready` and `cache_age`
    may be changed while running. `max_concurrent_index` mimics
    `indexer.index_report_request_concurrency` (429 when exceeded).
    """

    def __init__(
        self,
        psk: str | None,
        issuers: Iterable[str] = ("mirrorgate",),
        *,
        ca_file: Path | str | None = None,
        index_delay: float = 0.0,
        matcher_ready: bool = True,
        cache_age: int = 0,
        max_concurrent_index: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        fetch_timeout: float = 60.0,
    ) -> None:
        self.psk_b64 = psk
        self._key = base64.standard_b64decode(psk.encode()) if psk is not None else None
        self.issuers = tuple(issuers)
        self.allowed_issuers = (INTRASERVICE_ISSUER, *self.issuers)
        self.ca_file = Path(ca_file) if ca_file is not None else None
        self.index_delay = float(index_delay)
        self.matcher_ready = matcher_ready
        self.cache_age = cache_age
        self.max_concurrent_index = max_concurrent_index
        self.host = host
        self.fetch_timeout = fetch_timeout
        self._initial = (self.index_delay, matcher_ready, cache_age)
        self._port = port
        self.url = ""
        self.indexer_state = hashlib.md5(b"mirrorgate clair stand-in\n").hexdigest()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._digest_locks: dict[str, asyncio.Lock] = {}
        self._indexing = 0
        self._clear_state()

    def _clear_state(self) -> None:
        with self._lock:
            self._index_reports: dict[str, dict[str, Any]] = {}
            self._scanned_manifests: set[str] = set()
            self._scanned_layers: set[str] = set()
            self._reports: dict[str, dict[str, Any]] = {}
            self._notification_sets: dict[str, _NotificationSet] = {}
            self._fault: _Fault | None = None
            self._index_requests: list[IndexRequest] = []
            self._layer_fetches: list[LayerFetch] = []
            self._requests: list[RequestRecord] = []
            self._page_requests: list[PageRequest] = []
            self._deletes: list[str] = []
            self._deliveries: list[WebhookDelivery] = []
            self._auth_failures = 0

    def reset(self) -> None:
        """Forget everything (reports, indexes, notifications, records, faults); keep serving."""
        self._clear_state()
        self.index_delay, self.matcher_ready, self.cache_age = self._initial

    # lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> Self:
        """Serve (again: same port, same state). Returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the Clair stand-in is already running")
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run, args=(loop, ready, errors), name="clair-standin", daemon=True
        )
        thread.start()
        if not ready.wait(15):
            raise RuntimeError("the Clair stand-in did not start within 15 s")
        if errors:
            thread.join(5)
            raise RuntimeError(f"the Clair stand-in failed to start: {errors[0]!r}") from errors[0]
        self._loop, self._thread = loop, thread
        self.url = f"http://{self.host}:{self._port}"
        return self

    def stop(self) -> None:
        """Stop serving and close the port (connections are refused until `start()`). Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(
        self, loop: asyncio.AbstractEventLoop, ready: threading.Event, errors: list[BaseException]
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:  # reported to start()
            errors.append(err)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                if self._runner is not None:
                    loop.run_until_complete(self._runner.cleanup())
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                self._runner = None
                loop.close()

    async def _serve(self) -> None:
        self._digest_locks = {}
        self._indexing = 0
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A short shutdown: stop() is "Clair went down", in-flight requests are cut.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self._port == 0:
            server = site._server  # noqa: SLF001 - aiohttp exposes the bound port nowhere else
            assert server is not None
            self._port = server.sockets[0].getsockname()[1]

    # test controls -------------------------------------------------------------------------
    def token(self, issuer: str | None = None, **kwargs: Any) -> str:
        """A valid JWT for this server (first configured issuer by default); see make_psk_jwt."""
        if self.psk_b64 is None:
            raise RuntimeError("this stand-in has no PSK")
        return make_psk_jwt(self.psk_b64, issuer or self.issuers[0], **kwargs)

    def auth_header(self, issuer: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(issuer)}"}

    def set_report(
        self, manifest_digest: str, report: Mapping[str, Any] | str | Path
    ) -> dict[str, Any]:
        """Serve `report` (dict, `trimmed`/`full`/`alpine`, or a file) for this manifest.

        The content is kept as is; only `manifest_hash` becomes `manifest_digest`. Returns the
        document that will be served. It is served only once the manifest is indexed.
        """
        document = (
            copy.deepcopy(dict(report)) if isinstance(report, Mapping) else load_report(report)
        )
        document["manifest_hash"] = manifest_digest
        with self._lock:
            self._reports[manifest_digest] = document
        return copy.deepcopy(document)

    def report_for(self, manifest_digest: str) -> dict[str, Any]:
        """The vulnerability report this server answers for an indexed manifest."""
        with self._lock:
            mapped = self._reports.get(manifest_digest)
        return copy.deepcopy(mapped) if mapped is not None else empty_report(manifest_digest)

    def fail_with(
        self,
        status: int | None,
        *,
        retry_after: float | str | None = None,
        message: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer every authenticated request with `status` (None clears the fault).

        The body is Clair's JSON error. `retry_after` adds a Retry-After header (real Clair sends
        none, even with its own 429). `times` limits the fault to the next N requests.
        """
        with self._lock:
            if status is None:
                self._fault = None
                return
            self._fault = _Fault(
                status,
                message or f"injected failure ({status})",
                None if retry_after is None else str(retry_after),
                times,
            )

    def clear_failure(self) -> None:
        self.fail_with(None)

    def mark_indexed(self, manifest_digest: str) -> None:
        """Store a finished IndexReport without any fetch (for tests that skip the indexer)."""
        with self._lock:
            self._index_reports[manifest_digest] = self._index_report(
                manifest_digest, "IndexFinished"
            )
            self._scanned_manifests.add(manifest_digest)

    # records ---------------------------------------------------------------------------------
    @property
    def index_requests(self) -> list[IndexRequest]:
        with self._lock:
            return list(self._index_requests)

    def index_count(self, manifest_digest: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for item in self._index_requests
                if manifest_digest is None or item.manifest == manifest_digest
            )

    @property
    def layer_fetches(self) -> list[LayerFetch]:
        with self._lock:
            return list(self._layer_fetches)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def request_count(self, method: str | None = None, path_prefix: str = "") -> int:
        with self._lock:
            return sum(
                1
                for item in self._requests
                if (method is None or item.method == method.upper())
                and item.path.startswith(path_prefix)
            )

    @property
    def auth_failures(self) -> int:
        with self._lock:
            return self._auth_failures

    @property
    def page_requests(self) -> list[PageRequest]:
        with self._lock:
            return list(self._page_requests)

    @property
    def page_gets(self) -> int:
        with self._lock:
            return len(self._page_requests)

    @property
    def deleted_notifications(self) -> list[str]:
        """Notification ids in the order DELETE requests named them (repeats kept)."""
        with self._lock:
            return list(self._deletes)

    @property
    def deletes(self) -> int:
        with self._lock:
            return len(self._deletes)

    @property
    def deliveries(self) -> list[WebhookDelivery]:
        with self._lock:
            return list(self._deliveries)

    def index_report(self, manifest_digest: str) -> dict[str, Any] | None:
        with self._lock:
            report = self._index_reports.get(manifest_digest)
            return copy.deepcopy(report) if report is not None else None

    # notifier ----------------------------------------------------------------------------------
    def add_notifications(
        self,
        manifests_reasons: Mapping[str, str] | Iterable[tuple[Any, ...]],
        *,
        notification_id: str | None = None,
    ) -> str:
        """Store a notification set (no delivery); returns its id.

        Items are `(manifest, reason)` or `(manifest, reason, vulnerability_summary)`; a mapping
        is `{manifest: reason}`. The default summary is the constructed page's for the reason.
        """
        items = (
            list(manifests_reasons.items())
            if isinstance(manifests_reasons, Mapping)
            else list(manifests_reasons)
        )
        notifications = []
        for item in items:
            manifest, reason = item[0], item[1]
            vulnerability = item[2] if len(item) > 2 else default_vulnerability(reason)
            notifications.append(
                {
                    "id": str(uuid.uuid4()),
                    "manifest": manifest,
                    "reason": reason,
                    "vulnerability": copy.deepcopy(vulnerability),
                }
            )
        notifications.sort(key=lambda item: uuid.UUID(item["id"]).bytes)
        set_id = str(uuid.UUID(notification_id)) if notification_id else str(uuid.uuid4())
        with self._lock:
            self._notification_sets[set_id] = _NotificationSet(notifications)
        return set_id

    def notifications(self, notification_id: str) -> list[dict[str, Any]]:
        with self._lock:
            stored = self._notification_sets.get(notification_id)
            return copy.deepcopy(stored.notifications) if stored else []

    def callback_url(self, notification_id: str) -> str:
        return f"{self.url}{NOTIFICATION_PREFIX}{notification_id}"

    def notify(
        self,
        webhook_url: str,
        manifests_reasons: Mapping[str, str] | Iterable[tuple[Any, ...]],
        *,
        headers: Mapping[str, str] | None = None,
        signed: bool = True,
        notification_id: str | None = None,
        timeout: float = 10.0,
    ) -> int:
        """Create a notification set and POST Clair's webhook for it; the target's HTTP status.

        From a thread that runs an event loop use `await notify_async(...)` instead (this call
        blocks the calling thread until the target answers). The id is `last_notification_id`.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("notify() would block this event loop: use await notify_async()")
        future = self._submit(
            self._deliver(webhook_url, manifests_reasons, headers, signed, notification_id, timeout)
        )
        return future.result(timeout + 5)

    async def notify_async(
        self,
        webhook_url: str,
        manifests_reasons: Mapping[str, str] | Iterable[tuple[Any, ...]],
        *,
        headers: Mapping[str, str] | None = None,
        signed: bool = True,
        notification_id: str | None = None,
        timeout: float = 10.0,
    ) -> int:
        future = self._submit(
            self._deliver(webhook_url, manifests_reasons, headers, signed, notification_id, timeout)
        )
        return await asyncio.wrap_future(future)

    @property
    def last_notification_id(self) -> str | None:
        with self._lock:
            return self._deliveries[-1].notification_id if self._deliveries else None

    def _submit(self, coro: Any) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the Clair stand-in is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _clair_signature(self) -> str:
        """internal/httputil.Signer with the notifier claim: HS256, iss clair-notifier."""
        assert self._key is not None
        now = int(time.time())
        claims = {
            "iss": NOTIFIER_ISSUER,
            "exp": now + SIGNER_LEEWAY,
            "nbf": now - SIGNER_LEEWAY,
            "iat": now,
        }
        # The Signer's header is {"alg": "HS256"} alone: no typ.
        return jwt.encode(claims, self._key, algorithm="HS256", headers={"typ": None})

    async def _deliver(
        self,
        webhook_url: str,
        manifests_reasons: Any,
        headers: Mapping[str, str] | None,
        signed: bool,
        notification_id: str | None,
        timeout: float,
    ) -> int:
        set_id = self.add_notifications(manifests_reasons, notification_id=notification_id)
        # Go's json.Marshal of map[string]string: sorted keys, compact.
        body = {"callback": self.callback_url(set_id), "notification_id": set_id}
        request_headers = {"Content-Type": "application/json", **dict(headers or {})}
        if signed and self._key is not None:
            request_headers["Authorization"] = "Bearer " + self._clair_signature()
        delivery = WebhookDelivery(set_id, webhook_url, body, request_headers)
        with self._lock:
            self._deliveries.append(delivery)
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.post(
                    webhook_url,
                    data=json.dumps(body, separators=(",", ":"), sort_keys=True).encode(),
                    headers=request_headers,
                    ssl=self._ssl_context(),
                ) as response,
            ):
                await response.read()
                delivery.status = response.status
                return response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            delivery.error = repr(err)
            raise

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    # dispatch ----------------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/robots.txt":
            return self._record(
                request,
                True,
                web.Response(
                    status=200,
                    body=b"User-agent: *\nDisallow: /\n",
                    headers={"Content-Type": "text/plain; charset=utf-8"},
                ),
            )
        if not self._authorized(request):
            with self._lock:
                self._auth_failures += 1
            return self._record(request, False, web.Response(status=401))
        fault = self._take_fault()
        if fault is not None:
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else None
            return self._record(request, True, _api_error(fault.status, fault.message, extra))
        path = request.path
        for prefix, route in (
            ("/indexer/api/v1/", self._indexer),
            ("/matcher/api/v1/", self._matcher),
            ("/notifier/api/v1/", self._notifier),
        ):
            if path.startswith(prefix):
                coding = _compression(request)
                if coding is False:
                    return self._record(
                        request,
                        True,
                        web.Response(
                            status=415, headers={"Accept-Encoding": "zstd, gzip, deflate"}
                        ),
                    )
                response = await route(request)
                sniffed = response.headers.popall(_SNIFFED, None) is not None
                if coding and response.body is not None and len(response.body):
                    response.enable_compression(coding)
                    if sniffed:  # Go sniffs the compressed bytes it is handed
                        response.headers["Content-Type"] = (
                            "application/x-gzip"
                            if coding == web.ContentCoding.gzip
                            else "application/octet-stream"
                        )
                return self._record(request, True, response)
        if path == OPENAPI_PATH:
            return self._record(request, True, self._openapi(request))
        return self._record(request, True, _go_not_found())

    def _record(
        self, request: web.Request, authorized: bool, response: web.StreamResponse
    ) -> web.StreamResponse:
        with self._lock:
            self._requests.append(
                RequestRecord(
                    request.method, request.path, request.query_string, response.status, authorized
                )
            )
        return response

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = None
            return fault

    def _authorized(self, request: web.Request) -> bool:
        """middleware/auth PSK.Check, step by step."""
        if self._key is None:
            return True
        token = next(
            (
                value[len("Bearer ") :]
                for value in request.headers.getall("Authorization", [])
                if value.startswith("Bearer ")
            ),
            None,
        )
        if token is None:
            return False
        # jose.ParseSigned + Claims(key): any HMAC algorithm, a valid signature. The claims are
        # then checked the way go-jose's ValidateWithLeeway does, below, not PyJWT's way.
        try:
            # Clair takes whatever PSK it is configured with: PyJWT's key-length advice (for
            # HS384/HS512 over a 32-byte test key) is not the stand-in's to give.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
                claims = jwt.decode(
                    token,
                    self._key,
                    algorithms=list(HMAC_ALGORITHMS),
                    options={
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "verify_iss": False,
                        "verify_sub": False,
                        "verify_jti": False,
                    },
                )
        except jwt.PyJWTError:
            return False
        if not isinstance(claims, dict):
            return False
        for name in ("iss", "sub", "jti"):
            if claims.get(name) is not None and not isinstance(claims[name], str):
                return False
        audience = claims.get("aud")
        if audience is not None and not (
            isinstance(audience, str)
            or (isinstance(audience, list) and all(isinstance(a, str) for a in audience))
        ):
            return False
        times: dict[str, int] = {}
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False  # go-jose NumericDate: strconv.ParseFloat of the raw JSON
            times[name] = int(value)
        now = time.time()
        if "nbf" in times and now + AUTH_LEEWAY < times["nbf"]:
            return False
        if "exp" in times and now - AUTH_LEEWAY > times["exp"]:
            return False
        if "iat" in times and now + AUTH_LEEWAY < times["iat"]:
            return False
        return (claims.get("iss") or "") in self.allowed_issuers

    # indexer -----------------------------------------------------------------------------------
    async def _indexer(self, request: web.Request) -> web.Response:
        path = request.path
        limited = request.method == "POST" or path == INDEX_PATH
        if limited and self.max_concurrent_index is not None:
            if self._indexing >= self.max_concurrent_index:
                return _api_error(429, "server handling too many requests")
            self._indexing += 1
            try:
                return await self._indexer_routes(request)
            finally:
                self._indexing -= 1
        return await self._indexer_routes(request)

    async def _indexer_routes(self, request: web.Request) -> web.Response:
        path = request.path
        if path == INDEX_PATH:
            if request.method == "POST":
                return await self._index(request)
            if request.method == "DELETE":
                return await self._delete_manifests(request)
            return _api_error(405, f"method disallowed: {request.method}")
        if path.startswith(INDEX_REPORT_PREFIX):
            return self._index_report_one(request)
        if path == INDEX_STATE_PATH:
            return self._index_state(request)
        return _go_not_found()

    def _index_report(self, digest: str, state: str, err: str = "") -> dict[str, Any]:
        return {
            "manifest_hash": digest,
            "state": state,
            "packages": {},
            "distributions": {},
            "repository": {},
            "environments": {},
            "success": state == "IndexFinished",
            "err": err,
        }

    @staticmethod
    def _parse_manifest(document: Any) -> _ParsedManifest:
        if not isinstance(document, dict):
            raise _BadRequest("manifest must be a JSON object")
        digest = document.get("hash")
        parsed = _ParsedManifest("")
        if digest not in (None, ""):
            try:
                parsed.hash = parse_digest(digest)
            except ValueError as err:
                raise _BadRequest(str(err)) from None
        layers = document.get("layers")
        if layers is None:
            return parsed
        if not isinstance(layers, list):
            raise _BadRequest("layers must be an array")
        for index, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise _BadRequest(f"layers[{index}] must be an object")
            try:
                layer_hash = parse_digest(layer.get("hash"))
            except ValueError as err:
                raise _BadRequest(f"layers[{index}].hash: {err}") from None
            uri = layer.get("uri", "")
            if not isinstance(uri, str):
                raise _BadRequest(f"layers[{index}].uri must be a string")
            raw_headers = layer.get("headers") or {}
            if not isinstance(raw_headers, dict) or not all(
                isinstance(values, list) and all(isinstance(v, str) for v in values)
                for values in raw_headers.values()
            ):
                raise _BadRequest(f"layers[{index}].headers must map names to arrays of strings")
            headers = {name: tuple(values) for name, values in raw_headers.items()}
            parsed.layers.append(Layer(layer_hash, uri, headers))
        return parsed

    async def _index(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            manifest = self._parse_manifest(json.loads(raw))
        except (ValueError, _BadRequest) as err:
            return _api_error(400, f"failed to deserialize manifest: {err}")
        if not manifest.hash or not manifest.layers:
            return _api_error(400, "bogus manifest")
        digest = manifest.hash
        location = f"{INDEX_PATH}/{digest}"
        links = [LINK_INDEX.format(location), LINK_REPORT.format(VULN_REPORT_PREFIX + digest)]
        validator = f'"{self.indexer_state}"'
        if validator in request.headers.getall("If-None-Match", []):
            response = web.Response(status=412)
            for link in links:
                response.headers.add("Link", link)
            return response

        record = IndexRequest(digest, tuple(manifest.layers), time.monotonic())
        with self._lock:
            self._index_requests.append(record)
        lock = self._digest_locks.setdefault(digest, asyncio.Lock())
        async with lock:
            with self._lock:
                scanned = digest in self._scanned_manifests and digest in self._index_reports
                stored = copy.deepcopy(self._index_reports.get(digest))
            if scanned and stored is not None:
                report = stored
            else:
                report = await self._run_index(manifest, record)
                if report["state"] == "IndexError":
                    record.finished, record.status = time.monotonic(), 500
                    record.state, record.error = "IndexError", report["err"]
                    return _api_error(500, f"failed to start scan: {report['err']}")
        record.finished, record.status, record.state = time.monotonic(), 201, report["state"]
        response = web.Response(status=201, body=_json_body(report))
        # indexer_v1.go sets no Content-Type here: Go sniffs the JSON it writes as text/plain.
        response.headers["Content-Type"] = "text/plain; charset=utf-8"
        response.headers[_SNIFFED] = "1"  # removed again in _dispatch
        response.headers["ETag"] = validator
        response.headers["Location"] = location
        for link in links:
            response.headers.add("Link", link)
        return response

    async def _run_index(self, manifest: _ParsedManifest, record: IndexRequest) -> dict[str, Any]:
        """The controller states (CheckManifest, FetchLayers, ScanLayers...), stored as they go."""
        digest = manifest.hash
        report = self._index_report(digest, "")  # persisted after CheckManifest: state not yet set
        with self._lock:
            self._index_reports[digest] = copy.deepcopy(report)
            to_fetch: dict[str, Layer] = {}
            for layer in manifest.layers:  # controller.reduce: skip layers scanned before
                if layer.hash not in self._scanned_layers:
                    to_fetch.setdefault(layer.hash, layer)  # singleflight per digest
        record.fetched = tuple(to_fetch)
        error = await self._fetch_layers(digest, list(to_fetch.values()))
        if error is not None:
            report.update(state="IndexError", success=False, err=f"failed to fetch layers: {error}")
            with self._lock:
                self._index_reports[digest] = copy.deepcopy(report)
            return report
        report["state"] = "FetchLayers"  # persisted when FetchLayers finished
        with self._lock:
            self._index_reports[digest] = copy.deepcopy(report)
        delay = self.index_delay
        if delay > 0:
            await asyncio.sleep(delay)  # ScanLayers, Coalesce, IndexManifest...
        report = self._index_report(digest, "IndexFinished")
        with self._lock:
            self._index_reports[digest] = copy.deepcopy(report)
            self._scanned_manifests.add(digest)
            self._scanned_layers.update(to_fetch)
        return report

    async def _fetch_layers(self, manifest: str, layers: list[Layer]) -> str | None:
        """libindex FetchProxy.RealizeDescriptions: concurrent, first error wins and cancels."""
        if not layers:
            return None
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [
                asyncio.ensure_future(self._fetch_layer(session, manifest, layer))
                for layer in layers
            ]
            try:
                for finished in asyncio.as_completed(tasks):
                    error = await finished
                    if error is not None:
                        return f"fetcher: encountered errors: {error}"
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return None

    async def _fetch_layer(
        self, session: aiohttp.ClientSession, manifest: str, layer: Layer
    ) -> str | None:
        def failed(message: str, status: int | None = None, size: int = 0) -> str:
            with self._lock:
                self._layer_fetches.append(
                    LayerFetch(manifest, layer.hash, layer.uri, status, size, message)
                )
            return f"error realizing layer {layer.hash}: {message}"

        if not layer.uri:
            return failed(f"empty uri for layer {layer.hash}")
        parts = urllib.parse.urlsplit(layer.uri)
        if not parts.scheme and not layer.uri.startswith("/"):
            return failed(
                f"failed to parse remote path uri: parse {_go_quote(layer.uri)}: "
                "invalid URI for request"
            )
        if parts.scheme not in ("http", "https"):
            return failed(
                f"fetcher: request failed: Get {_go_quote(layer.uri)}: "
                f"unsupported protocol scheme {_go_quote(parts.scheme)}"
            )
        headers: CIMultiDict[str] = CIMultiDict()
        for name, values in layer.headers.items():
            for value in values:
                headers.add(name, value)
        # Go's Transport asks for gzip itself (and undoes a Content-Encoding: gzip).
        headers.setdefault("Accept-Encoding", "gzip")
        headers.setdefault("User-Agent", "Go-http-client/1.1")
        try:
            async with session.get(
                layer.uri,
                headers=headers,
                ssl=self._ssl_context() if parts.scheme == "https" else None,
            ) as response:
                if response.status != 200:
                    start = await response.content.read(256)
                    return failed(
                        f"fetcher: unexpected status code: {response.status} {response.reason} "
                        f"(body starts: {_go_quote(start)})",
                        response.status,
                    )
                content_type = response.headers.get("Content-Type", "")
                data = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            return failed(
                f"fetcher: request failed: Get {_go_quote(layer.uri)}: {err or type(err).__name__}"
            )
        problem = self._check_layer(layer.hash, content_type, data)
        if problem is not None:
            return failed(problem, 200, len(data))
        with self._lock:
            self._layer_fetches.append(
                LayerFetch(manifest, layer.hash, layer.uri, 200, len(data), None)
            )
        return None

    @staticmethod
    def _check_layer(digest: str, content_type: str, data: bytes) -> str | None:
        """The checks fetchUnlinkedFile makes on a 200 answer, in its order."""
        if data.startswith(_GZIP_MAGIC):
            kind = "gzip"
        elif data.startswith(_ZSTD_MAGIC):
            kind = "zstd"
        else:
            kind = "none"
        ctype = content_type.split(";", 1)[0].strip().lower()
        if ctype in ("", "text/plain", "binary/octet-stream", "application/octet-stream"):
            ctype = {"gzip": "application/gzip", "zstd": "application/zstd"}.get(
                kind, "application/x-tar"
            )
        if ctype in (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/gzip",
            "application/x-gzip",
        ) or ctype.endswith(".tar+gzip"):
            want = "gzip"
        elif ctype == "application/zstd" or ctype.endswith(".tar+zstd"):
            want = "zstd"
        elif ctype == "application/x-tar" or ctype.endswith(".tar"):
            want = "none"
        else:
            return f"fetcher: unknown content-type {_go_quote(ctype)}"
        if kind != want:
            return (
                f"fetcher: mismatched compression ({_go_quote(kind)}) "
                f"and content-type ({_go_quote(ctype)})"
            )
        if kind == "gzip":
            try:
                gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as err:
                return f"gzip: {err}"
        algo, _, want_hex = digest.partition(":")
        got = hashlib.new(algo, data).hexdigest()
        if got != want_hex.lower():
            return (
                f"fetcher: validation failed: got {_go_quote(got)}, "
                f"expected {_go_quote(want_hex.lower())}"
            )
        return None

    async def _delete_manifests(self, request: web.Request) -> web.Response:
        try:
            digests = json.loads(await request.read())
            if not isinstance(digests, list):
                raise ValueError("expected an array of digests")
            digests = [parse_digest(d) for d in digests]
        except ValueError as err:
            return _api_error(400, f"failed to deserialize bulk delete: {err}")
        deleted = [d for d in digests if self._forget_manifest(d)]
        return web.Response(status=200, body=_json_body(deleted))

    def _forget_manifest(self, digest: str) -> bool:
        with self._lock:
            self._scanned_manifests.discard(digest)
            return self._index_reports.pop(digest, None) is not None

    def _index_report_one(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "DELETE"):
            return _api_error(405, f"method disallowed: {request.method}")
        try:
            digest = parse_digest(_go_path_base(request.path))
        except ValueError as err:
            return _api_error(400, f"malformed path: {err}")
        if request.method == "DELETE":
            self._forget_manifest(digest)
            return web.Response(status=204)
        content_type = _pick_content_type(request, INDEX_REPORT_TYPES)
        if content_type is None:
            return _api_error(
                415, f"unable to negotiate common media type for {list(INDEX_REPORT_TYPES)}"
            )
        validator = f'"{self.indexer_state}"'
        if validator in request.headers.getall("If-None-Match", []):
            return web.Response(status=304)
        report = self.index_report(digest)
        if report is None:
            return _api_error(404, "index report not found")
        return web.Response(
            status=200,
            body=_json_body(report),
            headers={"Content-Type": content_type, "ETag": validator},
        )

    def _index_state(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            return _api_error(405, f"method disallowed: {request.method}")
        content_type = _pick_content_type(request, INDEX_STATE_TYPES)
        if content_type is None:
            return _api_error(
                415, f"unable to negotiate common media type for {list(INDEX_STATE_TYPES)}"
            )
        validator = f'"{self.indexer_state}"'
        if validator in request.headers.getall("If-None-Match", []):
            return web.Response(status=304, headers={"ETag": validator})
        return web.Response(
            status=200,
            body=_json_body({"state": self.indexer_state}),
            headers={"Content-Type": content_type, "ETag": validator},
        )

    # matcher -----------------------------------------------------------------------------------
    async def _matcher(self, request: web.Request) -> web.Response:
        if not request.path.startswith(VULN_REPORT_PREFIX):
            return _go_not_found()  # internal/update_* endpoints are not modelled
        if request.method != "GET":
            return _api_error(405, "endpoint only allows GET")
        base = _go_path_base(request.path)
        try:
            digest = parse_digest(base)
        except ValueError as err:
            return _api_error(400, f"malformed path: {err}")
        if not self.matcher_ready:
            return web.Response(status=202)
        report = self.index_report(digest)
        if report is None or report.get("state") != "IndexFinished":
            return _api_error(404, f"index report for manifest {_go_quote(digest)} not found")
        return web.Response(
            status=200,
            body=_json_body(self.report_for(digest)),
            headers={
                "Content-Type": VULN_REPORT_CONTENT_TYPE,
                "Cache-Control": f"max-age={int(self.cache_age)}",
            },
        )

    # notifier ----------------------------------------------------------------------------------
    async def _notifier(self, request: web.Request) -> web.Response:
        if not request.path.startswith(NOTIFICATION_PREFIX):
            return _go_not_found()
        if request.method == "GET":
            return self._notification_page(request)
        if request.method == "DELETE":
            return self._delete_notification(request)
        return _api_error(405, "endpoint only allows GET or DELETE")

    @staticmethod
    def _parse_uuid(text: str) -> str:
        return str(uuid.UUID(text))

    def _notification_page(self, request: web.Request) -> web.Response:
        raw_size = request.query.get("page_size")
        raw_next = request.query.get("next")

        def answer(response: web.Response, set_id: str, returned: int = 0) -> web.Response:
            with self._lock:
                self._page_requests.append(
                    PageRequest(set_id, raw_size, raw_next, returned, response.status)
                )
            return response

        base = _go_path_base(request.path)
        try:
            set_id = self._parse_uuid(base)
        except ValueError as err:
            return answer(_api_error(400, f"could not parse notification id: {err}"), base)
        page_size = 0
        if raw_size:
            if not re.fullmatch(r"[+-]?\d+", raw_size) or not -(2**63) <= int(raw_size) < 2**63:
                return answer(
                    _api_error(400, 'could not parse "page_size" query param into integer'), set_id
                )
            page_size = int(raw_size)
        if page_size == 0:
            page_size = DEFAULT_PAGE_SIZE
        after: str | None = None
        if raw_next:
            try:
                after = self._parse_uuid(raw_next)
            except ValueError:
                return answer(
                    _api_error(400, 'could not parse "next" query param into integer'), set_id
                )
            if after == str(uuid.UUID(int=0)):
                after = None
        content_type = _pick_content_type(request, NOTIFICATION_TYPES)
        if content_type is None:
            return answer(
                _api_error(
                    415, f"unable to negotiate common media type for {list(NOTIFICATION_TYPES)}"
                ),
                set_id,
            )
        if page_size < 1:
            return answer(
                _api_error(
                    500,
                    f"failed to retrieve notifications: notification {set_id}: "
                    f"bad page size: {page_size}",
                ),
                set_id,
            )
        with self._lock:
            stored = self._notification_sets.get(set_id)
            everything = copy.deepcopy(stored.notifications) if stored else []
        if after is not None:
            cursor = uuid.UUID(after).bytes
            everything = [n for n in everything if uuid.UUID(n["id"]).bytes > cursor]
        chunk = everything[: page_size + 1]
        page: dict[str, Any] = {"size": page_size}
        if len(chunk) == page_size + 1:
            chunk = chunk[:page_size]
            page["next"] = chunk[-1]["id"]
        document = {"page": page, "notifications": chunk}
        return answer(
            web.Response(
                status=200, body=_json_body(document), headers={"Content-Type": content_type}
            ),
            set_id,
            len(chunk),
        )

    def _delete_notification(self, request: web.Request) -> web.Response:
        base = _go_path_base(request.path)
        try:
            set_id = self._parse_uuid(base)
        except ValueError as err:
            return _api_error(400, f"could not parse notification id: {err}")
        with self._lock:
            self._deletes.append(set_id)
            stored = self._notification_sets.get(set_id)
            if stored is not None:
                stored.deleted = True
        if stored is None:  # setDeleted: no receipt row
            return _api_error(500, f"could not delete notification: no receipt for {set_id}")
        return web.Response(status=200)

    # discovery ---------------------------------------------------------------------------------
    def _openapi(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            return _api_error(405, "endpoint only allows GET")
        content_type = _pick_content_type(request, OPENAPI_TYPES)
        if content_type is None:
            return _api_error(
                415, f"unable to negotiate common media type for {list(OPENAPI_TYPES)}"
            )
        spec = REFERENCE_DIR / "openapi.json"
        if not spec.exists():
            return _go_not_found()
        return web.Response(
            status=200, body=spec.read_bytes(), headers={"Content-Type": content_type}
        )
