"""The Clair stand-in answers as Clair v4 does, and really fetches layers from a real registry.

One image is pushed to the TLS + htpasswd registry for the module; every test gets a fresh stand-in
(`clair` fixture), so nothing it indexed carries over. Registry counters are shared by the session:
only deltas are compared.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers.clair_standin import (
    INTRASERVICE_ISSUER,
    NOTIFIER_ISSUER,
    VULN_REPORT_CONTENT_TYPE,
    ClairStandIn,
    empty_report,
    load_report,
    make_psk_jwt,
)
from tests.helpers.registries import (
    ACCEPT_ALL_MANIFESTS,
    HarnessRegistry,
    access_log_requests,
    push_image,
    registry_request,
    registry_requests,
)

REPO = "clair-standin/app"
OTHER_PSK = base64.b64encode(b"not the key Clair was configured with").decode()
UNINDEXED = "sha256:" + "e" * 64


@dataclass(frozen=True)
class Image:
    repo: str
    digest: str
    layers: tuple[str, ...]


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture(scope="module")
def image(htpasswd_registry: HarnessRegistry) -> Image:
    digest = push_image(htpasswd_registry, REPO, "v1")
    reply = registry_request(
        htpasswd_registry,
        "GET",
        f"/v2/{REPO}/manifests/{digest}",
        headers={"Accept": ACCEPT_ALL_MANIFESTS},
    )
    assert reply.status == 200, reply
    layers = tuple(layer["digest"] for layer in reply.json()["layers"])
    return Image(REPO, digest, layers)


def call(
    clair: ClairStandIn,
    method: str,
    path: str,
    *,
    token: str | None = "valid",
    authorization: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request with urllib (no Accept-Encoding: answers are not compressed)."""
    request_headers = dict(headers or {})
    if authorization is not None:
        request_headers["Authorization"] = authorization
    elif token is not None:
        request_headers["Authorization"] = "Bearer " + (
            clair.token() if token == "valid" else token
        )
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request_headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(
        clair.url + path, method=method, headers=request_headers, data=data
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as err:
        with err:
            return Answer(err.code, err.headers, err.read())


def manifest_for(
    registry: HarnessRegistry,
    image: Image,
    *,
    with_credentials: bool = True,
    hashes: tuple[str, ...] | None = None,
    uri_digests: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The Manifest a client posts: blob URIs on the registry plus the header that opens them."""
    headers = {"Authorization": [registry.credentials.basic_header()]} if with_credentials else {}
    return {
        "hash": image.digest,
        "layers": [
            {
                "hash": layer_hash,
                "uri": f"https://{registry.host}/v2/{image.repo}/blobs/{uri_digest}",
                "headers": headers,
            }
            for layer_hash, uri_digest in zip(
                hashes or image.layers, uri_digests or image.layers, strict=True
            )
        ],
    }


def blob_gets(registry: HarnessRegistry, image: Image, status: int) -> int:
    return sum(
        access_log_requests(
            registry, method="GET", path=f"/v2/{image.repo}/blobs/{layer}", status=status
        )
        for layer in image.layers
    )


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# indexing ------------------------------------------------------------------------------------
def test_index_fetches_the_layers_and_the_report_is_the_mapped_real_one(
    clair: ClairStandIn, htpasswd_registry: HarnessRegistry, image: Image
) -> None:
    report_path = f"/matcher/api/v1/vulnerability_report/{image.digest}"
    assert call(clair, "GET", report_path).status == 404  # not indexed yet

    served_before = registry_requests(htpasswd_registry, "GET", "blob", code=200)
    logged_before = blob_gets(htpasswd_registry, image, 200)
    answer = call(
        clair, "POST", "/indexer/api/v1/index_report", body=manifest_for(htpasswd_registry, image)
    )
    assert answer.status == 201, answer.body
    report = answer.json()
    assert report["manifest_hash"] == image.digest
    assert (report["state"], report["success"], report["err"]) == ("IndexFinished", True, "")
    assert answer.headers["Location"] == f"/indexer/api/v1/index_report/{image.digest}"
    assert answer.headers["ETag"] == f'"{clair.indexer_state}"'
    assert len(answer.headers.get_all("Link")) == 2
    # indexer_v1.go sets no Content-Type: Go sniffs the JSON as text.
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"

    # The stand-in itself fetched every layer, with the Basic credentials of the manifest.
    assert registry_requests(htpasswd_registry, "GET", "blob", code=200) - served_before == len(
        image.layers
    )
    wait_for(lambda: blob_gets(htpasswd_registry, image, 200) - logged_before == len(image.layers))
    assert [(f.digest, f.status, f.error) for f in clair.layer_fetches] == [
        (layer, 200, None) for layer in image.layers
    ]

    expected = load_report("trimmed")
    assert expected["manifest_hash"] != image.digest
    expected["manifest_hash"] = image.digest
    assert clair.set_report(image.digest, "trimmed") == expected
    answer = call(clair, "GET", report_path)
    assert answer.status == 200  # not the 201 of the spec
    assert answer.headers["Content-Type"] == VULN_REPORT_CONTENT_TYPE
    assert answer.json() == expected

    stored = call(clair, "GET", f"/indexer/api/v1/index_report/{image.digest}")
    assert stored.status == 200 and stored.json()["state"] == "IndexFinished"

    # Indexed already: 201 with the stored report, no layer fetched again.
    served_before = registry_requests(htpasswd_registry, "GET", "blob")
    again = call(
        clair, "POST", "/indexer/api/v1/index_report", body=manifest_for(htpasswd_registry, image)
    )
    assert again.status == 201 and again.json()["state"] == "IndexFinished"
    assert registry_requests(htpasswd_registry, "GET", "blob") == served_before
    assert clair.index_count(image.digest) == 2
    first, second = clair.index_requests
    assert first.fetched == image.layers and second.fetched == ()
    assert first.layer_uris == tuple(
        f"https://{htpasswd_registry.host}/v2/{image.repo}/blobs/{layer}" for layer in image.layers
    )


def test_an_indexed_manifest_without_a_mapped_report_is_clean(clair: ClairStandIn) -> None:
    clair.mark_indexed(UNINDEXED)
    answer = call(clair, "GET", f"/matcher/api/v1/vulnerability_report/{UNINDEXED}")
    assert answer.status == 200
    assert answer.json() == empty_report(UNINDEXED)
    assert set(answer.json()) == set(load_report("alpine"))  # the keys of a real report


def test_layers_fetched_without_the_registry_credentials_are_an_index_error(
    clair: ClairStandIn, htpasswd_registry: HarnessRegistry, image: Image
) -> None:
    refused_before = blob_gets(htpasswd_registry, image, 401)
    answer = call(
        clair,
        "POST",
        "/indexer/api/v1/index_report",
        body=manifest_for(htpasswd_registry, image, with_credentials=False),
    )
    # The controller stores an IndexError report and returns the error: a 500, not a 201.
    assert answer.status == 500
    error = answer.json()
    assert error["code"] == "internal-error"
    assert error["message"].startswith("failed to start scan: failed to fetch layers: ")
    assert "fetcher: unexpected status code: 401 Unauthorized" in error["message"]
    wait_for(lambda: blob_gets(htpasswd_registry, image, 401) - refused_before >= 1)

    stored = call(clair, "GET", f"/indexer/api/v1/index_report/{image.digest}").json()
    assert (stored["state"], stored["success"]) == ("IndexError", False)
    assert "401 Unauthorized" in stored["err"]
    report_path = f"/matcher/api/v1/vulnerability_report/{image.digest}"
    assert call(clair, "GET", report_path).status == 404  # state is not IndexFinished

    # An errored manifest is indexed again on the next POST.
    answer = call(
        clair, "POST", "/indexer/api/v1/index_report", body=manifest_for(htpasswd_registry, image)
    )
    assert answer.status == 201 and answer.json()["state"] == "IndexFinished"
    assert call(clair, "GET", report_path).status == 200
    assert [r.status for r in clair.index_requests] == [500, 201]


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("hash", "fetcher: validation failed: got "),  # right blob, another digest claimed
        ("uri", "fetcher: unexpected status code: 404 Not Found"),  # a blob the registry lacks
    ],
)
def test_a_wrong_layer_digest_is_an_index_error(
    clair: ClairStandIn,
    htpasswd_registry: HarnessRegistry,
    image: Image,
    which: str,
    message: str,
) -> None:
    other = tuple("sha256:" + hashlib.sha256(layer.encode()).hexdigest() for layer in image.layers)
    manifest = manifest_for(
        htpasswd_registry,
        image,
        hashes=other if which == "hash" else image.layers,
        uri_digests=other if which == "uri" else image.layers,
    )
    answer = call(clair, "POST", "/indexer/api/v1/index_report", body=manifest)
    assert answer.status == 500
    assert message in answer.json()["message"]
    stored = call(clair, "GET", f"/indexer/api/v1/index_report/{image.digest}").json()
    assert (stored["state"], stored["success"]) == ("IndexError", False)
    assert message in stored["err"]


def test_the_index_request_blocks_for_the_index_delay(
    clair: ClairStandIn, htpasswd_registry: HarnessRegistry, image: Image
) -> None:
    clair.index_delay = 1.0
    answers: list[Answer] = []
    started = time.monotonic()
    poster = threading.Thread(
        target=lambda: answers.append(
            call(
                clair,
                "POST",
                "/indexer/api/v1/index_report",
                body=manifest_for(htpasswd_registry, image),
            )
        )
    )
    poster.start()
    try:
        # Layers fetched, now "scanning": the report is stored but not finished.
        wait_for(lambda: (clair.index_report(image.digest) or {}).get("state") == "FetchLayers")
        assert not answers
        path = f"/matcher/api/v1/vulnerability_report/{image.digest}"
        assert call(clair, "GET", path).status == 404
    finally:
        poster.join(10)
    elapsed = time.monotonic() - started
    assert answers[0].status == 201
    assert elapsed >= 1.0
    (request,) = clair.index_requests
    assert request.duration is not None and request.duration >= 1.0


def test_index_requests_clair_rejects_before_indexing(clair: ClairStandIn) -> None:
    path = "/indexer/api/v1/index_report"
    assert call(clair, "POST", path, body={"hash": UNINDEXED, "layers": []}).status == 400
    bad = call(clair, "POST", path, body={"hash": "sha256:nothex", "layers": []})
    assert bad.status == 400 and bad.json()["code"] == "bad-request"
    assert call(clair, "GET", path).status == 405
    assert clair.index_requests == []


# matcher ---------------------------------------------------------------------------------------
def test_the_report_is_404_until_indexed_and_202_while_the_matcher_starts(
    clair: ClairStandIn,
) -> None:
    path = f"/matcher/api/v1/vulnerability_report/{UNINDEXED}"
    missing = call(clair, "GET", path)
    assert missing.status == 404
    assert missing.json() == {
        "code": "not-found",
        "message": f'index report for manifest "{UNINDEXED}" not found',
    }
    clair.matcher_ready = False
    for _ in range(2):  # the initialisation check comes before the index report lookup
        waiting = call(clair, "GET", path)
        assert (waiting.status, waiting.body) == (202, b"")
        clair.mark_indexed(UNINDEXED)
    clair.matcher_ready = True
    assert call(clair, "GET", path).status == 200
    assert call(clair, "GET", "/matcher/api/v1/vulnerability_report/latest").status == 400


# auth ----------------------------------------------------------------------------------------
def _unsigned(claims: dict[str, Any]) -> str:
    def part(document: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(claims)}."


def _tampered(clair: ClairStandIn) -> str:
    header, _claims, signature = clair.token().split(".")
    claims = base64.urlsafe_b64encode(json.dumps({"iss": "mirrorgate"}).encode()).decode()
    return f"{header}.{claims.rstrip('=')}.{signature}"


REFUSED = {
    "no header": lambda c: {"token": None},
    "not Bearer": lambda c: {"authorization": "bearer " + c.token()},
    "Basic": lambda c: {"authorization": "Basic " + base64.b64encode(b"a:b").decode()},
    "wrong key": lambda c: {"token": make_psk_jwt(OTHER_PSK, "mirrorgate")},
    "unknown issuer": lambda c: {"token": make_psk_jwt(c.psk_b64, "quay")},
    "no issuer": lambda c: {"token": make_psk_jwt(c.psk_b64, "x", claims={"iss": None})},
    "expired": lambda c: {"token": make_psk_jwt(c.psk_b64, "mirrorgate", now=time.time() - 120)},
    "not yet valid": lambda c: {
        "token": make_psk_jwt(c.psk_b64, "mirrorgate", claims={"nbf": int(time.time()) + 60})
    },
    "issued in the future": lambda c: {
        "token": make_psk_jwt(c.psk_b64, "mirrorgate", now=time.time() + 60)
    },
    "alg none": lambda c: {"token": _unsigned({"iss": "mirrorgate"})},
    "tampered claims": lambda c: {"token": _tampered(c)},
    "not a JWT": lambda c: {"token": "garbage"},
}
ACCEPTED = {
    "iss, iat, nbf, exp": lambda c: {"token": c.token()},
    "intraservice issuer": lambda c: {"token": make_psk_jwt(c.psk_b64, INTRASERVICE_ISSUER)},
    "only iss": lambda c: {
        "token": make_psk_jwt(
            c.psk_b64, "mirrorgate", claims={"iat": None, "nbf": None, "exp": None}
        )
    },
    "HS512": lambda c: {"token": make_psk_jwt(c.psk_b64, "mirrorgate", algorithm="HS512")},
    "expired within the 15 s leeway": lambda c: {
        "token": make_psk_jwt(c.psk_b64, "mirrorgate", ttl=0, now=time.time() - 10)
    },
}


@pytest.mark.parametrize("case", REFUSED)
def test_requests_without_a_valid_psk_jwt_get_an_empty_401(clair: ClairStandIn, case: str) -> None:
    for path in (f"/matcher/api/v1/vulnerability_report/{UNINDEXED}", "/no/such/path"):
        answer = call(clair, "GET", path, **REFUSED[case](clair))
        assert (answer.status, answer.body) == (401, b""), case
    assert clair.auth_failures == 2


@pytest.mark.parametrize("case", ACCEPTED)
def test_psk_jwts_clair_accepts(clair: ClairStandIn, case: str) -> None:
    answer = call(
        clair, "GET", f"/matcher/api/v1/vulnerability_report/{UNINDEXED}", **ACCEPTED[case](clair)
    )
    assert answer.status == 404 and answer.json()["code"] == "not-found", case
    assert clair.auth_failures == 0


def test_unknown_paths_are_go_404s_and_robots_needs_no_auth(clair: ClairStandIn) -> None:
    answer = call(clair, "GET", "/api/v1/index_report")
    assert (answer.status, answer.body) == (404, b"404 page not found\n")
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert call(clair, "GET", "/robots.txt", token=None).status == 200


# faults ----------------------------------------------------------------------------------------
def test_injected_failures_and_a_restart_on_the_same_port(clair: ClairStandIn) -> None:
    clair.mark_indexed(UNINDEXED)
    path = f"/matcher/api/v1/vulnerability_report/{UNINDEXED}"
    clair.fail_with(429, retry_after=2)
    busy = call(clair, "GET", path)
    assert busy.status == 429 and busy.headers["Retry-After"] == "2"
    assert busy.json()["code"] == "too-many-requests"
    assert call(clair, "GET", "/notifier/api/v1/notification/x").status == 429  # every endpoint
    clair.fail_with(500, times=1)
    assert call(clair, "GET", path).status == 500
    assert call(clair, "GET", path).status == 200

    url = clair.url
    clair.stop()
    with pytest.raises(urllib.error.URLError):
        call(clair, "GET", path)
    clair.start()
    assert clair.url == url
    assert call(clair, "GET", path).status == 200  # the index survived the restart


async def test_answers_are_compressed_for_clients_that_accept_it(clair: ClairStandIn) -> None:
    clair.mark_indexed(UNINDEXED)
    clair.set_report(UNINDEXED, "full")
    headers = clair.auth_header()
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{clair.url}/matcher/api/v1/vulnerability_report/{UNINDEXED}") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Type"] == VULN_REPORT_CONTENT_TYPE
        report = json.loads(await response.read())
    assert len(report["vulnerabilities"]) == 177 and report["manifest_hash"] == UNINDEXED


# notifier ------------------------------------------------------------------------------------
def _verify_clair_signature(psk_b64: str, authorization: str) -> dict[str, Any]:
    token = authorization.removeprefix("Bearer ")
    header, claims, signature = token.split(".")
    mac = hmac.new(base64.b64decode(psk_b64), f"{header}.{claims}".encode(), hashlib.sha256)
    padded = signature + "=" * (-len(signature) % 4)
    assert hmac.compare_digest(mac.digest(), base64.urlsafe_b64decode(padded))
    return json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))


async def test_a_notification_round_trip_pages_and_deletes(
    clair: ClairStandIn, aiohttp_server: Any
) -> None:
    received: dict[str, Any] = {}
    consumed = asyncio.Event()

    async def consume(callback: str) -> None:
        # A client of Clair's notifier: page with page_size=1 until no `next`, then DELETE.
        pages: list[dict[str, Any]] = []
        async with aiohttp.ClientSession(headers=clair.auth_header()) as session:
            after: str | None = None
            while True:
                params = {"page_size": "1", **({"next": after} if after else {})}
                async with session.get(callback, params=params) as response:
                    assert response.status == 200
                    page = json.loads(await response.read())
                pages.append(page)
                after = page["page"].get("next")
                if after is None:
                    break
            async with session.delete(callback) as response:
                received["delete"] = (response.status, await response.read())
        received["pages"] = pages
        consumed.set()

    async def webhook(request: web.Request) -> web.Response:
        received["headers"] = dict(request.headers)
        received["body"] = await request.json()
        asyncio.get_running_loop().create_task(consume(received["body"]["callback"]))
        return web.Response(status=200)  # only 200 counts as delivered

    app = web.Application()
    app.router.add_post("/clair-notifications", webhook)
    target = await aiohttp_server(app)
    first, second = "sha256:" + "1" * 64, "sha256:" + "2" * 64

    status = await clair.notify_async(
        str(target.make_url("/clair-notifications")),
        [(first, "added"), (second, "removed")],
        headers={"X-Extra": "configured"},
    )
    assert status == 200
    await asyncio.wait_for(consumed.wait(), 10)

    notification_id = clair.last_notification_id
    assert received["body"] == {
        "notification_id": notification_id,
        "callback": f"{clair.url}/notifier/api/v1/notification/{notification_id}",
    }
    assert received["headers"]["Content-Type"] == "application/json"
    assert received["headers"]["X-Extra"] == "configured"
    claims = _verify_clair_signature(clair.psk_b64, received["headers"]["Authorization"])
    assert claims["iss"] == NOTIFIER_ISSUER and claims["exp"] - claims["nbf"] == 120

    first_page, last_page = received["pages"]
    assert first_page["page"] == {"size": 1, "next": first_page["notifications"][0]["id"]}
    assert last_page["page"] == {"size": 1}
    notifications = first_page["notifications"] + last_page["notifications"]
    assert sorted((n["manifest"], n["reason"]) for n in notifications) == [
        (first, "added"),
        (second, "removed"),
    ]
    assert [n["id"] for n in notifications] == sorted(n["id"] for n in notifications)
    assert set(notifications[0]["vulnerability"]) == {
        "name",
        "description",
        "package",
        "distribution",
        "repo",
        "severity",
        "fixed_in_version",
        "links",
    }
    assert received["delete"] == (200, b"")
    assert clair.page_gets == 2
    assert [p.returned for p in clair.page_requests] == [1, 1]
    assert clair.deleted_notifications == [notification_id]
    assert clair.deliveries[0].status == 200


def test_notification_pages_for_unknown_or_malformed_ids(clair: ClairStandIn) -> None:
    unknown = "/notifier/api/v1/notification/6f5a2c1e-3b9d-4c47-9a0e-2d8f7b1c4e55"
    empty = call(clair, "GET", unknown)
    assert empty.status == 200
    assert empty.json() == {"page": {"size": 500}, "notifications": []}
    assert call(clair, "DELETE", unknown).status == 500  # no receipt for that id
    assert call(clair, "GET", "/notifier/api/v1/notification/not-a-uuid").status == 400
    assert call(clair, "GET", unknown + "?page_size=-1").status == 500
    assert call(clair, "POST", unknown).status == 405


def test_notify_from_sync_code_returns_the_targets_status(clair: ClairStandIn) -> None:
    posts: list[tuple[dict[str, str], bytes]] = []

    class Target(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers["Content-Length"])
            posts.append((dict(self.headers), self.rfile.read(length)))
            self.send_response(204)  # Clair counts anything but 200 as a failed delivery
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        status = clair.notify(
            f"http://127.0.0.1:{server.server_address[1]}/hook", {UNINDEXED: "added"}, signed=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert status == 204 and clair.deliveries[0].status == 204
    ((headers, body),) = posts
    assert "Authorization" not in headers
    assert json.loads(body)["notification_id"] == clair.last_notification_id
    (notification,) = clair.notifications(clair.last_notification_id)
    assert (notification["manifest"], notification["reason"]) == (UNINDEXED, "added")
