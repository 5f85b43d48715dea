"""bench/: what its figures rest on, checked for real.

The benchmark itself is not part of the suite (it takes minutes and wants two quiet cores); these
tests check that its bodies are admissions mirrorgate rewrites completely, that it reads real wrk
and hey runs against its real baseline server right (requests, rates, percentiles, errors), and
that a missed target is reported as missed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import bodies, load, stack
from bench.run import P99_TARGET, THROUGHPUT_TARGET, _targets
from mirrorgate.webhook.core.config import config_from_dict
from mirrorgate.webhook.core.reviews import parse_review, review_mutation

CONFIG = config_from_dict(
    {
        "mirrors": [
            {"upstream": upstream, "mirror": f"mirror.test:5000/{prefix}".rstrip("/")}
            for upstream, prefix in bodies.MIRROR_PREFIXES.items()
        ],
        "pullSecret": {"name": "mirrorgate-pull"},
    }
)


@pytest.mark.parametrize(("shape", "containers"), [("1c", 1), ("5c", 5), ("30c", 30)])
def test_every_image_of_every_bench_pod_is_rewritten(shape, containers):
    review = bodies.admission_review(bodies.pod(shape))
    result = review_mutation(parse_review(bodies.encode(review)), CONFIG, own_namespace="mg")
    assert result.outcome == "mutated"
    assert len(result.containers) == containers
    assert all(c.applied for c in result.containers), [
        (c.name, c.decision.reason) for c in result.containers if not c.applied
    ]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    load.require_tools()  # scripts/setup installs wrk and hey
    work = tmp_path_factory.mktemp("bench")
    server = stack.baseline_server(work, pki=stack.write_serving_pki(work), core=None).start()
    yield server
    server.stop()


@pytest.fixture
def body(tmp_path) -> Path:
    path = tmp_path / "review.json"
    path.write_bytes(bodies.encode(bodies.admission_review(bodies.pod("1c"))))
    return path


def test_wrk_saturation_is_read_from_a_real_run(baseline, body):
    result = load.saturate(f"{baseline.url}/mutate", body, seconds=1, connections=4, core=None)
    assert result.errors == 0
    assert result.requests > 50 and 0.9 <= result.seconds <= 3
    assert result.rps == pytest.approx(result.requests / result.seconds)
    assert 0 < result.p50_ms <= result.p99_ms


def test_hey_holds_the_asked_rate_and_reports_its_percentiles(baseline, body):
    result = load.fixed_rate(
        f"{baseline.url}/mutate", body, rate=200, seconds=2, connections=4, core=None
    )
    assert result.errors == 0 and result.target_rps == 200
    # 4 workers at 50 requests/s each; the server keeps up easily.
    assert 150 <= result.rps <= 230
    assert 0 < result.p50_ms <= result.p99_ms


def test_fixed_counts_round_up_to_whole_rounds_of_connections(baseline, body):
    result = load.fixed_count(
        f"{baseline.url}/validate", body, count=50, connections=4, core=None, timeout=60
    )
    assert result.requests == 52 and result.errors == 0


def test_answers_that_are_not_2xx_count_as_errors_for_both_tools(baseline, body):
    # The baseline serves POST on /mutate and /validate only: anything else is a 404 or 405.
    url = f"{baseline.url}/nowhere"
    wrk = load.saturate(url, body, seconds=1, connections=2, core=None)
    assert wrk.requests > 0 and wrk.errors == wrk.requests
    hey = load.fixed_count(url, body, count=8, connections=2, core=None, timeout=60)
    assert hey.requests == 8 and hey.errors == 8


def _row(throughput: float, p99: float) -> dict:
    return {
        "endpoint": "/mutate",
        "pod": "1c",
        "saturated_rps": {"ratio": throughput},
        "p99_ms_at_50pct": {"ratio": p99},
    }


@pytest.mark.parametrize(
    ("row", "clair_calls", "met"),
    [
        pytest.param(_row(THROUGHPUT_TARGET, P99_TARGET), 0, True, id="exactly on both targets"),
        pytest.param(_row(0.69, 1.0), 0, False, id="throughput below 0.7x"),
        pytest.param(_row(0.9, 3.01), 0, False, id="p99 above 3x"),
        pytest.param(_row(0.9, math.nan), 0, False, id="no p99 measured"),
        pytest.param(_row(0.9, 1.0), 3, False, id="Clair asked while the cache should answer"),
    ],
)
def test_a_missed_target_is_reported_as_missed(row, clair_calls, met):
    report = {"hot": [row], "hot_checks": {"clair_requests_during_hot_runs": clair_calls}}
    assert _targets(report)["hot"]["met"] is met
