"""Kubelet pull-failure Events classified and counted once, as the alerts need them."""

from __future__ import annotations

import pytest

from mirrorgate.webhook.controllers.pullfailures import PullFailureCounter, classify
from mirrorgate.webhook.core.config import parse_config
from mirrorgate.webhook.infra.metrics import Metrics

CONFIG = parse_config(
    "mirrors:\n"
    "  - {upstream: docker.io, mirror: '127.0.0.1:31000'}\n"
    "  - {upstream: ghcr.io, mirror: registry.example.org/ghcr}\n"
)
MIRRORED = "127.0.0.1:31000/library/nginx:1.25"


def event(image: str, tail: str, *, uid: str = "e1", count: int = 1, ns: str = "shop") -> dict:
    return {
        "metadata": {"uid": uid, "namespace": ns},
        "involvedObject": {"kind": "Pod", "namespace": ns, "name": "web"},
        "reason": "Failed",
        "count": count,
        "message": f'Failed to pull image "{image}": rpc error: code = Unknown desc = '
        f'failed to pull and unpack image "{image}": {tail}',
    }


@pytest.mark.parametrize(
    ("image", "tail", "registry", "kind"),
    [
        pytest.param(
            MIRRORED,
            "failed to resolve reference: 127.0.0.1:31000/library/nginx:1.25: not found",
            "127.0.0.1:31000",
            "mirror_not_found",
            id="containerd not found on the mirror",
        ),
        pytest.param(
            MIRRORED,
            "pulling from host 127.0.0.1:31000 failed with status code "
            "[manifests 1.25]: 401 Unauthorized",
            "127.0.0.1:31000",
            "mirror_auth",
            id="a 401 from the mirror is auth",
        ),
        pytest.param(
            "registry.example.org/ghcr/acme/app:1",
            "failed to do request: Head "
            '"https://registry.example.org/v2/ghcr/acme/app/manifests/1": dial tcp: '
            "lookup registry.example.org: no such host",
            "registry.example.org",
            "mirror_network",
            id="a mirror the node cannot resolve is network",
        ),
        pytest.param(
            "registry.example.org/ghcr/acme/app:1",
            "x509: certificate signed by unknown authority",
            "registry.example.org",
            "mirror_network",
            id="an untrusted mirror certificate is network",
        ),
        pytest.param(
            "nginx:1.25",
            "toomanyrequests: You have reached your pull rate limit",
            "docker.io",
            "upstream_other",
            id="a rate limit on docker hub is upstream",
        ),
        pytest.param(
            "quay.io/x/y:1",
            "failed to resolve reference: quay.io/x/y:1: not found",
            "quay.io",
            "upstream_not_found",
            id="an unmirrored registry is upstream",
        ),
    ],
)
def test_failures_are_classified_by_origin_and_cause(image, tail, registry, kind):
    failure = classify(event(image, tail), CONFIG)
    assert failure is not None
    assert (failure.namespace, failure.registry, failure.kind) == ("shop", registry, kind)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param("Error: ErrImagePull", id="the kubelet's summary line"),
        pytest.param("Error: container create failed", id="a non-pull failure"),
    ],
)
def test_other_failed_events_are_not_pull_failures(message):
    assert classify({"message": message, "metadata": {"uid": "x"}}, CONFIG) is None


def value(metrics: Metrics, kind: str = "mirror_not_found") -> float:
    return (
        metrics.registry.get_sample_value(
            "mirrorgate_image_pull_failures_total",
            {"namespace": "shop", "registry": "127.0.0.1:31000", "kind": kind},
        )
        or 0.0
    )


def test_repeats_of_one_event_count_only_their_increase():
    metrics = Metrics()
    counter = PullFailureCounter(CONFIG, metrics.image_pull_failures)
    tail = "failed to resolve reference: not found"
    assert counter.observe(event(MIRRORED, tail, count=1)) == 1
    assert counter.observe(event(MIRRORED, tail, count=1)) == 0  # the same event again
    assert counter.observe(event(MIRRORED, tail, count=4)) == 3  # the kubelet bumped count
    assert value(metrics) == 4


def test_events_from_before_the_watch_are_a_baseline_not_failures():
    metrics = Metrics()
    counter = PullFailureCounter(CONFIG, metrics.image_pull_failures)
    tail = "failed to resolve reference: not found"
    counter.baseline([event(MIRRORED, tail, uid="old", count=7)])
    assert value(metrics) == 0
    counter.observe(event(MIRRORED, tail, uid="old", count=8))
    counter.observe(event(MIRRORED, tail, uid="new", count=1))
    assert value(metrics) == 2


def test_series_count_of_newer_kubelets_is_read():
    metrics = Metrics()
    counter = PullFailureCounter(CONFIG, metrics.image_pull_failures)
    e = event(MIRRORED, "401 Unauthorized")
    del e["count"]
    e["series"] = {"count": 3}
    counter.observe(e)
    assert value(metrics, "mirror_auth") == 3
