"""The registry harness itself, checked against the real registries it starts.

Images are pushed with skopeo; everything asserted afterwards goes over urllib, so these tests pin
the registry behaviour mirrorgate's registry client is later tested against: content negotiation
by Accept header, Basic and Bearer challenges, the token protocol, the pull-through mirror, and the
request counts the client tests will rely on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.registries import (
    ACCEPT_ALL_MANIFESTS,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    Credentials,
    HarnessRegistry,
    SkopeoError,
    TokenServer,
    access_log_requests,
    decode_jwt,
    fetch_token,
    head_manifest,
    http_request,
    parse_challenge,
    push_image,
    registry_request,
    registry_requests,
    write_oci_layout,
)

REPO = "harness/app"
DOCKER_REPO = "harness/docker"
DIGEST_PREFIX = "sha256:"


@pytest.fixture(scope="module")
def htpasswd_images(htpasswd_registry: HarnessRegistry) -> dict[str, str]:
    return {
        "single": push_image(htpasswd_registry, REPO, "single"),
        "multi": push_image(htpasswd_registry, REPO, "multi", multi=True),
        "v2s2": push_image(htpasswd_registry, DOCKER_REPO, "v1", format="v2s2"),
    }


@pytest.fixture(scope="module")
def token_images(token_registry: HarnessRegistry) -> dict[str, str]:
    return {
        "single": push_image(token_registry, REPO, "single"),
        "multi": push_image(token_registry, REPO, "multi", multi=True),
    }


@pytest.fixture(params=["htpasswd", "token"], ids=["htpasswd registry", "token registry"])
def pushed(request: pytest.FixtureRequest) -> tuple[HarnessRegistry, dict[str, str]]:
    registry = request.getfixturevalue(f"{request.param}_registry")
    return registry, request.getfixturevalue(f"{request.param}_images")


def blob_digests(layout: Path) -> set[str]:
    return {DIGEST_PREFIX + p.name for p in (layout / "blobs" / "sha256").iterdir()}


def test_an_oci_layout_holds_every_tag_and_the_seed_decides_the_digests(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "a", tag="v1")
    write_oci_layout(layout, tag="multi", multi=True)
    index = json.loads((layout / "index.json").read_text())
    tops = {m["annotations"][REF_NAME]: m for m in index["manifests"]}
    assert {name: m["mediaType"] for name, m in tops.items()} == {
        "v1": OCI_MANIFEST,
        "multi": OCI_INDEX,
    }
    image_index = json.loads(
        (
            layout / "blobs" / "sha256" / tops["multi"]["digest"].removeprefix(DIGEST_PREFIX)
        ).read_text()
    )
    platforms = [m["platform"]["architecture"] for m in image_index["manifests"]]
    assert platforms == ["amd64", "arm64"]
    children = [
        json.loads(
            (layout / "blobs" / "sha256" / m["digest"].removeprefix(DIGEST_PREFIX)).read_text()
        )
        for m in image_index["manifests"]
    ]
    assert children[0]["layers"][0]["digest"] != children[1]["layers"][0]["digest"]
    referenced = {m["digest"] for m in image_index["manifests"]} | {
        d["digest"] for child in children for d in [child["config"], *child["layers"]]
    }
    assert referenced <= blob_digests(layout)

    again = write_oci_layout(tmp_path / "b", tag="v1")
    other = write_oci_layout(tmp_path / "c", tag="v1", seed="something else")
    digest = {
        p: json.loads((p / "index.json").read_text())["manifests"][0]["digest"]
        for p in (again, other)
    }
    assert digest[again] == tops["v1"]["digest"]
    assert digest[other] != tops["v1"]["digest"]

    big = write_oci_layout(tmp_path / "d", tag="v1", size_mb=1)
    assert max(p.stat().st_size for p in (big / "blobs" / "sha256").iterdir()) > 1024 * 1024


def test_head_with_all_four_accept_types_returns_the_pushed_digest(
    pushed: tuple[HarnessRegistry, dict[str, str]],
) -> None:
    registry, images = pushed
    reply = head_manifest(registry, REPO, "single")
    assert reply.status == 200
    assert reply.content_type == OCI_MANIFEST
    assert reply.digest == images["single"]


def test_a_multi_arch_tag_answers_with_the_index_media_type_and_the_index_digest(
    pushed: tuple[HarnessRegistry, dict[str, str]],
) -> None:
    registry, images = pushed
    reply = head_manifest(registry, REPO, "multi")
    assert (reply.status, reply.content_type) == (200, OCI_INDEX)
    assert reply.digest == images["multi"]
    assert images["multi"] != images["single"]


def test_head_without_accept_on_oci_content_is_404(
    htpasswd_registry: HarnessRegistry, htpasswd_images: dict[str, str]
) -> None:
    # Distribution 2.8 hides OCI content from clients that don't announce they accept it.
    for reference in ("single", "multi", htpasswd_images["single"]):
        assert head_manifest(htpasswd_registry, REPO, reference, accept=None).status == 404
    only_manifest = head_manifest(htpasswd_registry, REPO, "multi", accept=OCI_MANIFEST)
    assert only_manifest.status == 404


def test_a_docker_v2_push_answers_with_its_media_type_and_converts_without_accept(
    htpasswd_registry: HarnessRegistry, htpasswd_images: dict[str, str]
) -> None:
    reply = head_manifest(htpasswd_registry, DOCKER_REPO, "v1")
    assert (reply.status, reply.content_type) == (200, DOCKER_MANIFEST)
    assert reply.digest == htpasswd_images["v2s2"]
    converted = head_manifest(htpasswd_registry, DOCKER_REPO, "v1", accept=None)
    assert (converted.status, converted.content_type) == (200, DOCKER_SCHEMA1_SIGNED)
    assert converted.digest != htpasswd_images["v2s2"]


def test_wrong_credentials_get_401_with_a_basic_challenge(
    htpasswd_registry: HarnessRegistry, htpasswd_images: dict[str, str]
) -> None:
    assert htpasswd_registry.credentials is not None
    wrong = Credentials(htpasswd_registry.credentials.username, "not-the-password")
    reply = head_manifest(htpasswd_registry, REPO, "single", credentials=wrong)
    assert reply.status == 401
    scheme, params = parse_challenge(reply.headers["WWW-Authenticate"])
    assert scheme == "basic" and params["realm"]
    assert head_manifest(htpasswd_registry, REPO, "single", credentials=None).status == 401


def test_a_failed_push_raises_with_skopeos_reason_and_no_password(
    htpasswd_registry: HarnessRegistry,
) -> None:
    wrong = Credentials("testuser", "s3cret-wrong-pass")
    with pytest.raises(SkopeoError, match="unauthorized") as failure:
        push_image(htpasswd_registry, "harness/denied", "v1", creds=wrong)
    assert wrong.password not in str(failure.value)


def test_the_token_registry_challenges_with_bearer_and_a_pull_token_works(
    token_registry: HarnessRegistry,
    token_server: TokenServer,
    token_images: dict[str, str],
) -> None:
    base = http_request(f"{token_registry.url}/v2/", ca_file=token_registry.ca_file)
    assert base.status == 401
    scheme, params = parse_challenge(base.headers["WWW-Authenticate"])
    assert (scheme, params["realm"], params["service"]) == (
        "bearer",
        token_server.realm,
        token_server.service,
    )

    # An anonymous client that answers the challenge gets an empty token: /v2/ needs no access.
    assert registry_request(token_registry, "GET", "/v2/", credentials=None).status == 200
    assert head_manifest(token_registry, REPO, "single", credentials=None).status == 401

    path = f"/v2/{REPO}/manifests/single"
    anonymous = http_request(
        token_registry.url + path,
        method="HEAD",
        headers={"Accept": ACCEPT_ALL_MANIFESTS},
        ca_file=token_registry.ca_file,
    )
    assert anonymous.status == 401
    scope = parse_challenge(anonymous.headers["WWW-Authenticate"])[1]["scope"]
    assert scope == f"repository:{REPO}:pull"

    before = token_server.requests
    token_reply = fetch_token(
        token_server.realm,
        service=token_server.service,
        scopes=[scope],
        credentials=token_server.credentials,
        ca_file=token_registry.ca_file,
    )
    assert token_server.requests == before + 1
    assert token_reply.status == 200
    body = token_reply.json()
    assert body["access_token"] == body["token"]
    assert body["expires_in"] == token_server.expires_in
    assert body["issued_at"].endswith("Z")
    header, claims = decode_jwt(body["token"])
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1
    assert claims["aud"] == token_server.service
    assert claims["sub"] == token_server.credentials.username
    assert claims["exp"] - claims["iat"] == token_server.expires_in
    assert claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]

    authorized = http_request(
        token_registry.url + path,
        method="HEAD",
        headers={"Accept": ACCEPT_ALL_MANIFESTS, "Authorization": f"Bearer {body['token']}"},
        ca_file=token_registry.ca_file,
    )
    assert authorized.status == 200
    assert authorized.digest == token_images["single"]


def test_the_token_server_refuses_wrong_passwords_and_grants_anonymous_users_nothing(
    token_registry: HarnessRegistry, token_server: TokenServer, token_images: dict[str, str]
) -> None:
    scope = f"repository:{REPO}:pull"
    wrong = Credentials(token_server.credentials.username, "not-the-password")
    refused = fetch_token(
        token_server.realm,
        service=token_server.service,
        scopes=[scope],
        credentials=wrong,
        ca_file=token_registry.ca_file,
    )
    assert refused.status == 401
    assert token_server.history[-1].status == 401

    anonymous = fetch_token(
        token_server.realm,
        service=token_server.service,
        scopes=[scope],
        ca_file=token_registry.ca_file,
    )
    assert anonymous.status == 200
    token = anonymous.json()["token"]
    assert decode_jwt(token)[1]["access"] == []
    denied = http_request(
        f"{token_registry.url}/v2/{REPO}/manifests/single",
        method="HEAD",
        headers={"Accept": ACCEPT_ALL_MANIFESTS, "Authorization": f"Bearer {token}"},
        ca_file=token_registry.ca_file,
    )
    assert denied.status == 401
    assert 'error="insufficient_scope"' in denied.headers["WWW-Authenticate"]


def test_request_counts_follow_manifest_requests_exactly(
    htpasswd_registry: HarnessRegistry, htpasswd_images: dict[str, str]
) -> None:
    def counts() -> tuple[float, float, float, int]:
        return (
            registry_requests(htpasswd_registry, "HEAD", "manifest"),
            registry_requests(htpasswd_registry, "HEAD", "manifest", code=200),
            registry_requests(htpasswd_registry, "GET", "manifest"),
            access_log_requests(
                htpasswd_registry, method="HEAD", path=f"/v2/{REPO}/manifests/multi"
            ),
        )

    before = counts()
    for _ in range(3):
        assert head_manifest(htpasswd_registry, REPO, "multi").status == 200
    after = counts()
    # Each authenticated HEAD is two requests: the 401 that carries the challenge, then the 200.
    assert [b - a for a, b in zip(before, after, strict=True)] == [6, 3, 0, 6]


def test_the_proxy_mirror_serves_the_token_registrys_images_and_counts_the_requests(
    proxy_mirror: HarnessRegistry,
    token_registry: HarnessRegistry,
    token_images: dict[str, str],
) -> None:
    assert proxy_mirror.credentials is None
    mirror_before = registry_requests(proxy_mirror, "HEAD", "manifest")
    upstream_before = registry_requests(token_registry, handler="manifest", code=200)
    for tag in ("single", "multi"):
        reply = head_manifest(proxy_mirror, REPO, tag)
        assert reply.status == 200, tag
        assert reply.digest == token_images[tag]
    assert registry_requests(proxy_mirror, "HEAD", "manifest") - mirror_before == 2
    # The mirror resolved both tags with the upstream, with the token it fetched itself.
    assert registry_requests(token_registry, handler="manifest", code=200) - upstream_before >= 2
    path = f"/v2/{REPO}/manifests/single"
    assert access_log_requests(proxy_mirror, method="HEAD", path=path, status=200) >= 1


def test_the_plain_registry_serves_over_http_without_auth(plain_registry: HarnessRegistry) -> None:
    assert plain_registry.url.startswith("http://")
    assert plain_registry.ca_file is None and plain_registry.credentials is None
    digest = push_image(plain_registry, REPO, "multi", multi=True)
    reply = head_manifest(plain_registry, REPO, "multi")
    assert (reply.status, reply.content_type, reply.digest) == (200, OCI_INDEX, digest)
