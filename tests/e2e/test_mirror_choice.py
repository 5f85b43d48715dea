"""Several mirrors per upstream, and platforms, against real registries.

Debian's docker-registry (distribution 2.8.2) serves every mirror here; a mirror that is "down"
is a registry that was stopped (connections refused) or a port that accepts and never answers.
What is asserted is what a user sees: the image the pod gets, the warning kubectl prints, the
counters Prometheus scrapes, what lands on each registry.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorgate.webhook.core.config import RegistryAccess, parse_config
from mirrorgate.webhook.infra.metrics import Metrics
from mirrorgate.webhook.server.app import Settings, create_app
from tests.helpers.admission import admission, patched_image
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.registries import (
    HarnessRegistry,
    head_manifest,
    push_image,
    registries_yaml,
    registry_requests,
)


@pytest.fixture
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HarnessRegistry]:
    """Another plain-HTTP registry, this test's own (so it can be stopped)."""
    registry = HarnessRegistry(tmp_path_factory.mktemp("second-mirror"))
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


def two_mirrors(first: str, second: str, extra: str = "") -> str:
    plain = {host: RegistryAccess(plain_http=True) for host in (first, second)}
    return (
        f'mirrors:\n  - {{upstream: docker.io, mirror: ["{first}", "{second}"]}}\n'
        "pullSecret: {name: mirrorgate-pull}\n" + extra + registries_yaml(plain)
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_the_first_mirror_that_has_the_image_wins_and_the_others_are_named(
    aiohttp_client, plain_registry, second
):
    push_image(second, "library/only-b", "1")
    push_image(plain_registry, "library/both", "1")
    push_image(second, "library/both", "1")
    metrics = Metrics()
    config = parse_config(two_mirrors(plain_registry.host, second.host))
    client = await aiohttp_client(create_app(Settings(config), metrics=metrics))

    r = await client.post("/mutate", json=admission("only-b:1"))
    resp = (await r.json())["response"]
    assert patched_image(resp) == f"{second.host}/library/only-b:1"
    assert resp["warnings"] == [
        f'mirrorgate: container "app" image "only-b:1" rewritten to mirror {second.host}: '
        f"mirror {plain_registry.host} cannot serve it (not on the mirror)"
    ]
    assert (
        sample(
            metrics,
            "mirrorgate_mirror_passed_over_total",
            upstream="docker.io",
            mirror=plain_registry.host,
            reason="not_found",
        )
        == 1
    )
    assert (
        sample(
            metrics, "mirrorgate_images_rewritten_total", upstream="docker.io", mirror=second.host
        )
        == 1
    )

    # Both have it: the first wins, and a healthy first mirror means the second is not asked.
    before = registry_requests(second, "head", "manifest")
    r = await client.post("/mutate", json=admission("both:1", uid="u2"))
    resp = (await r.json())["response"]
    assert patched_image(resp) == f"{plain_registry.host}/library/both:1"
    assert "warnings" not in resp
    assert registry_requests(second, "head", "manifest") == before


async def test_a_stopped_first_mirror_sends_new_pods_to_the_second(
    aiohttp_client, second, tmp_path_factory
):
    first = HarnessRegistry(tmp_path_factory.mktemp("first-mirror"))
    first.start()
    first_host = first.host
    push_image(first, "library/web", "1")
    push_image(second, "library/web", "1")
    push_image(second, "library/api", "1")
    metrics = Metrics()
    config = parse_config(two_mirrors(first_host, second.host, "verifyTimeout: 2s\n"))
    client = await aiohttp_client(create_app(Settings(config), metrics=metrics))
    r = await client.post("/mutate", json=admission("web:1"))
    assert patched_image((await r.json())["response"]) == f"{first_host}/library/web:1"

    first.stop()
    started = time.monotonic()
    r = await client.post("/mutate", json=admission("api:1", uid="u2"))
    elapsed = time.monotonic() - started
    resp = (await r.json())["response"]
    assert patched_image(resp) == f"{second.host}/library/api:1"
    assert resp["warnings"] == [
        f'mirrorgate: container "app" image "api:1" rewritten to mirror {second.host}: '
        f"mirror {first_host} cannot serve it (mirror unreachable)"
    ]
    assert elapsed < 1.0, f"a refused connection took {elapsed:.2f}s to pass over"
    assert (
        sample(
            metrics,
            "mirrorgate_mirror_passed_over_total",
            upstream="docker.io",
            mirror=first_host,
            reason="network",
        )
        == 1
    )


async def test_a_hung_first_mirror_costs_at_most_the_budget_then_is_skipped_unasked(
    aiohttp_client, plain_registry, silent_server
):
    """The first mirror accepts and never answers. The second is asked a quarter of the budget
    in (the hedge) and answers at once; the first's request gives up at registryClient.timeout
    and, from then on for negativeTTL, new images skip it without waiting."""
    hung = f"127.0.0.1:{silent_server}"
    for name in ("web", "api"):
        push_image(plain_registry, f"library/{name}", "1")
    config = parse_config(
        two_mirrors(
            hung,
            plain_registry.host,
            "verifyTimeout: 3s\nregistryClient: {timeout: 1s, negativeTTL: 30s}\n",
        )
    )
    client = await aiohttp_client(create_app(Settings(config)))

    started = time.monotonic()
    r = await client.post("/mutate?timeout=10s", json=admission("web:1"))
    first_took = time.monotonic() - started
    resp = (await r.json())["response"]
    assert patched_image(resp) == f"{plain_registry.host}/library/web:1"
    assert f"mirror {hung} cannot serve it (no answer within verifyTimeout)" in resp["warnings"][0]
    assert 0.9 < first_took < 1.6, f"{first_took:.2f}s: the hung mirror's 1s timeout decides"

    started = time.monotonic()
    r = await client.post("/mutate?timeout=10s", json=admission("api:1", uid="u2"))
    second_took = time.monotonic() - started
    resp = (await r.json())["response"]
    assert patched_image(resp) == f"{plain_registry.host}/library/api:1"
    assert f"mirror {hung} cannot serve it" in resp["warnings"][0]
    assert second_took < 0.3, f"{second_took:.2f}s: the unreachable mirror was waited on again"


async def test_a_first_mirror_still_silent_at_the_deadline_loses_to_the_second(
    aiohttp_client, plain_registry, silent_server
):
    hung = f"127.0.0.1:{silent_server}"
    push_image(plain_registry, "library/late", "1")
    config = parse_config(
        two_mirrors(
            hung, plain_registry.host, "verifyTimeout: 800ms\nregistryClient: {timeout: 10s}\n"
        )
    )
    client = await aiohttp_client(create_app(Settings(config)))
    started = time.monotonic()
    r = await client.post("/mutate?timeout=10s", json=admission("late:1"))
    elapsed = time.monotonic() - started
    resp = (await r.json())["response"]
    assert patched_image(resp) == f"{plain_registry.host}/library/late:1"
    assert elapsed < 1.3, f"admission took {elapsed:.2f}s with a 0.8s budget"


async def test_when_no_mirror_can_serve_the_pod_keeps_its_image_and_each_reason_is_given(
    aiohttp_client, plain_registry, second
):
    config = parse_config(two_mirrors(plain_registry.host, second.host))
    metrics = Metrics()
    client = await aiohttp_client(create_app(Settings(config), metrics=metrics))
    second_host = second.host
    second.stop()
    r = await client.post("/mutate", json=admission("nowhere:1"))
    resp = (await r.json())["response"]
    assert "patch" not in resp
    assert resp["warnings"] == [
        'mirrorgate: container "app" keeps image "nowhere:1": no mirror can serve it (mirror '
        f"{plain_registry.host} cannot serve it (not on the mirror), mirror {second_host} "
        "cannot serve it (mirror unreachable))"
    ]
    assert (
        sample(
            metrics, "mirrorgate_images_fallback_total", upstream="docker.io", reason="not_found"
        )
        == 1
    )


# --- prewarm and copy mirrors with platforms --------------------------------------------------


def prewarm(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mirrorgate_exe(), "prewarm", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def hosted_config(
    tmp_path: Path, upstream: HarnessRegistry, *mirrors: str, extra: str = ""
) -> Path:
    hosts = {upstream.host, *(m.split("/")[0] for m in mirrors)}
    path = tmp_path / "mirrorgate.yaml"
    listed = ", ".join(f'"{m}"' for m in mirrors)
    path.write_text(
        f'mirrors: [{{upstream: "{upstream.host}", mirror: [{listed}], type: hosted{extra}}}]\n'
        + registries_yaml({h: RegistryAccess(plain_http=True) for h in hosts})
    )
    return path


def test_prewarm_puts_the_image_on_every_mirror_of_its_upstream(
    plain_registry, second, tmp_path, tmp_path_factory
):
    upstream = HarnessRegistry(tmp_path_factory.mktemp("upstream"))
    upstream.start()
    try:
        digest = push_image(upstream, "team/tool", "2.0", multi=True)
        config = hosted_config(tmp_path, upstream, f"{plain_registry.host}/eu", f"{second.host}/us")
        r = prewarm(config, "--json", f"{upstream.host}/team/tool:2.0")
    finally:
        upstream.stop()
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [(x["mirror"], x["status"]) for x in report] == [
        (f"{plain_registry.host}/eu/team/tool:2.0", "copied"),
        (f"{second.host}/us/team/tool:2.0", "copied"),
    ]
    assert head_manifest(plain_registry, "eu/team/tool", "2.0").digest == digest
    assert head_manifest(second, "us/team/tool", "2.0").digest == digest


def test_prewarm_of_one_platform_copies_a_new_index_and_pin_digests_pins_it(
    plain_registry, tmp_path, tmp_path_factory
):
    upstream = HarnessRegistry(tmp_path_factory.mktemp("upstream"))
    upstream.start()
    try:
        full = push_image(upstream, "team/multi", "1.0", multi=True)
        config = hosted_config(tmp_path, upstream, f"{plain_registry.host}/sub")
        image = f"{upstream.host}/team/multi:1.0"
        r = prewarm(config, "--platform", "linux/arm64", image)
        assert r.returncode == 0, r.stderr
        assert "1 of 2 platforms" in r.stdout
        assert "a new index: its digest differs from the upstream's" in r.stdout
        on_mirror = head_manifest(plain_registry, "sub/team/multi", "1.0")
        assert on_mirror.digest != full
        index = json.loads(
            subprocess.run(
                [
                    "skopeo",
                    "inspect",
                    "--raw",
                    "--tls-verify=false",
                    f"docker://{plain_registry.host}/sub/team/multi:1.0",
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )
        assert [m["platform"]["architecture"] for m in index["manifests"]] == ["arm64"]

        # By digest the reference names the whole index: copied whole, digest kept.
        r = prewarm(
            config, "--json", "--platform", "linux/arm64", f"{upstream.host}/team/multi@{full}"
        )
        assert r.returncode == 0, r.stderr
        (item,) = json.loads(r.stdout)
        assert item["digest"] == full and item["platforms"] == ["linux/amd64", "linux/arm64"]

        bad = prewarm(config, "--platform", "linux/amd65", image)
        assert bad.returncode == 2 and "'linux/amd65' is not a platform" in bad.stderr
        missing = prewarm(config, "--platform", "linux/s390x", image)
        assert missing.returncode == 1
        assert "none of the platforms linux/s390x is in its index" in missing.stdout
        assert "linux/amd64, linux/arm64" in missing.stdout
    finally:
        upstream.stop()


async def test_pin_digests_pins_the_digest_the_mirror_serves_for_a_platform_subset(
    aiohttp_client, plain_registry, tmp_path, tmp_path_factory
):
    upstream = HarnessRegistry(tmp_path_factory.mktemp("upstream"))
    upstream.start()
    try:
        full = push_image(upstream, "team/pinme", "1.0", multi=True)
        config = hosted_config(
            tmp_path, upstream, f"{plain_registry.host}/pin", extra=", platforms: [linux/amd64]"
        )
        r = prewarm(config, f"{upstream.host}/team/pinme:1.0")
        assert r.returncode == 0, r.stderr
    finally:
        upstream.stop()
    subset = head_manifest(plain_registry, "pin/team/pinme", "1.0").digest
    assert subset != full
    cfg = parse_config(config.read_text() + "pinDigests: true\n")
    client = await aiohttp_client(create_app(Settings(cfg)))
    r = await client.post("/mutate", json=admission(f"{upstream.host}/team/pinme:1.0"))
    image = patched_image((await r.json())["response"])
    assert image == f"{plain_registry.host}/pin/team/pinme:1.0@{subset}"


async def test_a_copy_mirror_copies_only_its_platforms_in_the_background(
    aiohttp_client, plain_registry, tmp_path, tmp_path_factory
):
    upstream = HarnessRegistry(tmp_path_factory.mktemp("upstream"))
    upstream.start()
    try:
        push_image(upstream, "team/bg", "3", multi=True)
        text = (
            f'mirrors: [{{upstream: "{upstream.host}", mirror: "{plain_registry.host}/copies",'
            " type: copy, platforms: [linux/arm64]}]\n"
            + registries_yaml(
                {h: RegistryAccess(plain_http=True) for h in (upstream.host, plain_registry.host)}
            )
        )
        app = create_app(Settings(parse_config(text)))
        client = await aiohttp_client(app)
        r = await client.post("/mutate", json=admission(f"{upstream.host}/team/bg:3"))
        assert "patch" not in (await r.json())["response"]  # not there yet: a copy starts
        from mirrorgate.webhook.server.state import VERIFIER

        await app[VERIFIER].drain()
    finally:
        upstream.stop()
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{plain_registry.host}/copies/team/bg:3",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert [m["platform"]["architecture"] for m in json.loads(raw)["manifests"]] == ["arm64"]
