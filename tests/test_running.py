"""Which digests run where (controllers.running) and what the gate does with it (scan.running).

The watch itself runs against the real API server in tests/e2e/test_gate_running.py; here the
projection of odd pods, the counting, the policy decision and the memory of 20,000 pods.
"""

from __future__ import annotations

import tracemalloc

import pytest

from mirrorgate.webhook.controllers.running import RunningImages, pod_digests, project
from mirrorgate.webhook.core.config import parse_config
from mirrorgate.webhook.core.policy import Finding, ImageVerdict, Verdict, decide

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def _pod(phase="Running", statuses=(), images=("nginx:1",), ns="team-a", name="web-1"):
    import uuid

    return {
        "metadata": {
            "namespace": ns,
            "name": name,
            "uid": str(uuid.uuid4()),
            "resourceVersion": "7",
        },
        "spec": {"containers": [{"name": f"c{i}", "image": im} for i, im in enumerate(images)]},
        "status": {"phase": phase, "containerStatuses": list(statuses)},
    }


@pytest.mark.parametrize(
    ("pod", "digests"),
    [
        pytest.param(
            _pod(statuses=[{"imageID": f"127.0.0.1:5000/library/nginx@{D1}"}]),
            (D1,),
            id="containerd's imageID: the digest the node pulled",
        ),
        pytest.param(
            _pod(statuses=[{"imageID": f"docker-pullable://nginx@{D1}"}]),
            (D1,),
            id="docker's imageID",
        ),
        pytest.param(_pod(images=(f"nginx:1@{D2}",)), (D2,), id="a digest pinned in the spec"),
        pytest.param(
            _pod(images=(f"nginx@{D2}",), statuses=[{"imageID": f"nginx@{D2}"}]),
            (D2,),
            id="the same digest once",
        ),
        pytest.param(
            _pod(phase="Succeeded", statuses=[{"imageID": f"nginx@{D1}"}]),
            (),
            id="a pod that ended runs nothing",
        ),
        pytest.param(
            _pod(statuses=[{"imageID": "sha256:" + "a" * 64}]),
            (),
            id="a local image id without a repository digest is not a registry digest",
        ),
        pytest.param(
            {"metadata": {"name": "x"}, "spec": {"containers": "no"}, "status": 5},
            (),
            id="odd shapes yield nothing, never an exception",
        ),
    ],
)
def test_pod_digests(pod, digests):
    assert pod_digests(pod) == digests


def test_the_index_counts_pods_per_namespace_and_forgets_ended_and_deleted_ones():
    running = RunningImages()
    running.replace([project(_pod(statuses=[{"imageID": f"n@{D1}"}]))])
    assert running.synced and running.running_in([D1], "team-a")
    assert not running.running_in([D1], "team-b") and not running.running_in([D2], "team-a")
    running.update(("team-a", "web-2"), (D1,))
    running.update(("team-b", "web-3"), (D1, D3))
    assert running.namespaces_running(D1) == {"team-a": 2, "team-b": 1}
    running.update(("team-a", "web-1"), ())  # it ended
    running.forget(("team-a", "web-2"))
    assert not running.running_in([D1], "team-a")
    assert running.namespaces_running(D1) == {"team-b": 1}
    running.update(("team-b", "web-3"), (D3,))  # a new image rolled out in place
    assert running.namespaces_running(D1) == {} and running.running_in([D3], "team-b")
    assert running.pods() == 1


def test_past_max_pods_further_pods_are_not_tracked_and_are_judged_as_new():
    running = RunningImages(max_pods=2)
    for i in range(3):
        running.update(("ns", f"p{i}"), (D1,) if i < 2 else (D2,))
    assert running.pods() == 2 and running.untracked == 1
    assert not running.running_in([D2], "ns")


def test_twenty_thousand_pods_cost_a_few_mebibytes():
    """The index of 20,000 pods (200 ReplicaSets of 100 pods, 2 containers each): what stays
    after the watch's projection. Printed for the closing note; bounded well below serve's RSS."""
    pods = [
        _pod(
            ns=f"team-{r % 50}",
            name=f"web-{r}-{i:05}",
            images=(f"registry.example/app-{r}:1", "registry.example/sidecar:2"),
            statuses=[
                {"imageID": f"registry.example/app-{r}@sha256:{r:064x}"},
                {"imageID": f"registry.example/sidecar@sha256:{'f' * 64}"},
            ],
        )
        for r in range(200)
        for i in range(100)
    ]
    projected = [project(p) for p in pods]  # what the watch hands over, page by page
    del pods
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        running = RunningImages()
        running.replace(projected)
        del projected
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(f"\n20,000 pods: index {kept / (1 << 20):.1f} MiB")
    assert running.pods() == 20_000
    assert running.namespaces_running(f"sha256:{'f' * 64}") == {f"team-{n}": 400 for n in range(50)}
    assert kept < 12 << 20, f"{kept / (1 << 20):.1f} MiB for 20,000 pods"


SCAN = parse_config("scan: {clair: {url: 'http://clair:6060', pskFile: /p}}").scan
DENY = parse_config("scan: {clair: {url: 'http://clair:6060', pskFile: /p}, running: deny}").scan
FINDING = Finding(
    id="CVE-2023-44487",
    name="CVE-2023-44487",
    severity="High",
    package="libnghttp2",
    version="1.33.0",
    fixed_in="1.33.0-5",
    cves=("CVE-2023-44487",),
    link="",
)


def _verdict(image, outcome="fail"):
    findings = (FINDING,) if outcome == "fail" else ()
    return ImageVerdict(image, Verdict(outcome, digest=D1, findings=findings), digest=D1)


def test_a_failing_image_that_already_runs_is_admitted_with_a_warning_and_counted_apart():
    verdicts = [_verdict("app:1"), _verdict("new:1")]
    decision = decide(verdicts, SCAN, mode="enforce", running=["app:1"])
    # The image that does not run there yet is still denied...
    assert not decision.allowed and decision.message.startswith("image new:1 (")
    assert "app:1" not in decision.message
    # ... the running one is a warning naming what to fix.
    (warning,) = decision.warnings
    assert warning.startswith(
        "mirrorgate: already running in this namespace, admitted (scan.running: warn): image "
        "app:1 ("
    )
    assert "CVE-2023-44487" in warning and "libnghttp2" in warning
    assert decision.rejected == [("app:1", "fail_running"), ("new:1", "fail")]
    alone = decide([_verdict("app:1")], SCAN, mode="enforce", running=["app:1"])
    assert alone.allowed


def test_with_running_deny_or_for_pending_images_running_changes_nothing():
    assert not decide([_verdict("app:1")], DENY, mode="enforce", running=["app:1"]).allowed
    pending = decide([_verdict("app:1", "pending")], SCAN, mode="enforce", running=["app:1"])
    assert not pending.allowed and pending.rejected == [("app:1", "pending")]


def test_scan_running_is_warn_or_deny():
    from mirrorgate.webhook.core.config import ConfigError

    assert SCAN is not None and SCAN.running == "warn"
    with pytest.raises(ConfigError, match=r"scan.running: 'maybe' is not one of warn, deny"):
        parse_config("scan: {clair: {url: 'http://c:6060', pskFile: /p}, running: maybe}")


# --- the continuous view (services.vulnerable) -------------------------------------------------


class Judge:
    """Verdicts by reference, as a test sets them; counts what it was asked."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.asked: list[str] = []

    async def verdicts(self, images, *, budget):
        self.asked += images
        return [
            ImageVerdict(
                ref,
                Verdict(
                    self.outcomes.get(ref, "pending"),
                    digest=ref.split("@")[1],
                    findings=(FINDING,) if self.outcomes.get(ref) == "fail" else (),
                ),
                digest=ref.split("@")[1],
            )
            for ref in images
        ]


def _view(judge, **kw):
    from mirrorgate.webhook.services.vulnerable import RunningVerdicts

    running = RunningImages()
    gauge: list[dict] = []
    events: list = []
    view = RunningVerdicts(
        running, judge, SCAN, set_gauge=gauge.append, record=lambda n: events.extend(n), **kw
    )
    return running, view, gauge, events


async def test_running_pods_are_counted_by_namespace_and_worst_blocking_severity():
    judge = Judge()
    running, view, gauge, events = _view(judge)
    a, b = f"r.example/a@{D1}", f"r.example/b@{D2}"
    judge.outcomes = {a: "pass", b: "fail"}
    running.update(("shop", "web-1"), {D1: a}, uid="u1")
    running.update(("shop", "web-2"), {D1: a, D2: b}, uid="u2")
    running.update(("ops", "job-1"), {D3: f"r.example/c@{D3}"}, uid="u3")  # not scanned yet
    await view.judge_round()
    assert gauge[-1] == {("shop", "none"): 1, ("shop", "High"): 1, ("ops", "unknown"): 1}
    # One Event, on the pod that runs the failing image, naming the finding.
    (note,) = events
    assert (note.subject.namespace, note.subject.name, note.subject.uid) == ("shop", "web-2", "u2")
    assert note.reason == "VulnerableImageRunning" and note.type == "Warning"
    assert "CVE-2023-44487" in note.message and "admitted with a warning" in note.message


async def test_a_notification_rejudges_only_what_it_names_and_events_only_on_a_change():
    judge = Judge()
    running, view, gauge, events = _view(judge)
    a, b = f"r.example/a@{D1}", f"r.example/b@{D2}"
    judge.outcomes = {a: "pass", b: "pass"}
    running.update(("shop", "web-1"), {D1: a, D2: b}, uid="u1")
    await view.judge_round()
    assert gauge[-1] == {("shop", "none"): 1} and events == []

    judge.asked.clear()
    judge.outcomes[b] = "fail"  # Clair matched a new vulnerability to b
    view.notified({D2})
    await view.judge_round()
    assert judge.asked == [b]
    assert gauge[-1] == {("shop", "High"): 1} and len(events) == 1
    view.notified({D2})  # still failing: no second Event
    await view.judge_round()
    assert len(events) == 1

    judge.outcomes[b] = "pass"  # a fixed report clears it
    view.notified({D2})
    await view.judge_round()
    assert gauge[-1] == {("shop", "none"): 1}


async def test_a_notification_about_a_platform_manifest_rejudges_its_index():
    judge = Judge()
    running, view, _gauge, _events = _view(judge)
    index = f"r.example/a@{D1}"
    running.update(("shop", "web-1"), {D1: index})
    await view.judge_round()
    view._verdicts[D1] = ImageVerdict(
        index, Verdict("pass", digest=D1), platforms=(Verdict("pass", digest=D3),), digest=D1
    )
    judge.asked.clear()
    view.notified({D3})  # Clair names the linux/amd64 manifest, the node runs the index
    await view.judge_round()
    assert judge.asked == [index]


async def test_a_replica_that_does_not_lead_exports_nothing():
    import asyncio

    judge = Judge()
    running, view, gauge, _events = _view(judge, is_leader=lambda: False, interval=0.01)
    running.update(("shop", "web-1"), {D1: f"r.example/a@{D1}"})
    view.start()
    await asyncio.sleep(0.05)
    await view.stop()
    assert gauge and all(g == {} for g in gauge) and judge.asked == []
