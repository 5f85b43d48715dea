"""What ``kubectl describe`` shows of mirrorgate's decisions: the Events an admission leads to
(core.events) and how they reach the API server without delaying an answer (controllers.events).

The recorder is driven against an in-memory API (the real API server is in
tests/e2e/test_events.py): what matters here is what gets posted, how often, and that nothing
blocks or raises.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mirrorgate.webhook.controllers.events import QUEUE_MAX, EventRecorder
from mirrorgate.webhook.core.config import parse_config
from mirrorgate.webhook.core.events import (
    DENIED,
    EVENT_MESSAGE_MAX,
    FALLBACK,
    REWRITTEN,
    EventNote,
    Subject,
    admission_events,
    denial_event,
)
from mirrorgate.webhook.core.mutation import MirrorCheck
from mirrorgate.webhook.core.reviews import parse_review, review_mutation
from tests.helpers.admission import pod, review

CONFIG = parse_config(
    """
mirrors:
  - {upstream: docker.io, mirror: "127.0.0.1:31000", verify: false}
  - {upstream: ghcr.io, mirror: [eu.mirror.example/ghcr, us.mirror.example/ghcr]}
pullSecret: {name: mirrorgate-pull}
"""
)
OWNER = {
    "apiVersion": "apps/v1",
    "kind": "ReplicaSet",
    "name": "web-7d9f",
    "uid": "rs-uid",
    "controller": True,
}


def _events(obj, *, operation="CREATE", old=None, dry_run=False, checks=None, name=None):
    body = json.loads(review(obj, operation=operation, old=old))
    if dry_run:
        body["request"]["dryRun"] = True
    if name is not None:
        body["request"]["name"] = name
    req = parse_review(json.dumps(body))
    result = review_mutation(req, CONFIG, own_namespace="mirrorgate", checks=checks)
    return admission_events(req, result)


def _generated(**kw):
    obj = pod(**kw)
    meta = obj["metadata"]
    del meta["name"]
    meta["generateName"] = "web-7d9f-"
    meta["ownerReferences"] = [OWNER]
    return obj


def test_a_rewritten_pod_gets_one_normal_event_naming_every_image_and_its_mirror():
    obj = pod(
        containers=[{"name": "app", "image": "nginx:1.25"}],
        init=[{"name": "migrate", "image": "busybox:1.36"}],
    )
    (note,) = _events(obj)
    assert note.reason == REWRITTEN and note.type == "Normal"
    assert note.subject == Subject("v1", "Pod", "team-a", "web", lookup=True)
    assert note.message == (
        "rewrote 2 images to mirrors: init container migrate busybox:1.36 -> "
        "127.0.0.1:31000/library/busybox:1.36; container app nginx:1.25 -> "
        "127.0.0.1:31000/library/nginx:1.25"
    )


def test_dry_runs_lead_to_no_events_at_all():
    assert _events(pod(), dry_run=True) == []
    fallback = {"eu.mirror.example/ghcr/o/app:1": MirrorCheck(ok=False, reason="network")}
    ghcr = pod(containers=[{"name": "app", "image": "ghcr.io/o/app:1"}])
    assert _events(ghcr, dry_run=True, checks=fallback) == []


def test_update_never_repeats_the_rewritten_event():
    old = pod(containers=[{"name": "app", "image": "127.0.0.1:31000/library/nginx:1.25"}])
    new = pod(
        containers=[{"name": "app", "image": "127.0.0.1:31000/library/nginx:1.25"}],
        ephemeral=[{"name": "debug", "image": "busybox:1.36"}],
    )
    new["metadata"]["uid"] = "pod-uid"
    assert [n.reason for n in _events(new, operation="UPDATE", old=old)] == []


def test_a_fallback_is_a_warning_with_the_admission_warnings_text_on_the_pod():
    ghcr = pod(containers=[{"name": "app", "image": "ghcr.io/o/app:1"}])
    checks = {
        "eu.mirror.example/ghcr/o/app:1": MirrorCheck(ok=False, reason="network"),
        "us.mirror.example/ghcr/o/app:1": MirrorCheck(ok=True, digest="sha256:" + "a" * 64),
    }
    notes = {n.reason: n for n in _events(ghcr, checks=checks)}
    assert set(notes) == {REWRITTEN, FALLBACK}
    assert notes[FALLBACK].type == "Warning"
    assert notes[FALLBACK].message == (
        'container "app" image "ghcr.io/o/app:1" rewritten to mirror us.mirror.example/ghcr: '
        "mirror eu.mirror.example/ghcr cannot serve it (mirror unreachable)"
    )
    assert "us.mirror.example/ghcr/o/app:1" in notes[REWRITTEN].message


def test_no_mirror_can_serve_is_a_fallback_event_and_no_rewritten_event():
    ghcr = pod(containers=[{"name": "app", "image": "ghcr.io/o/app:1"}])
    checks = {
        "eu.mirror.example/ghcr/o/app:1": MirrorCheck(ok=False, reason="network"),
        "us.mirror.example/ghcr/o/app:1": MirrorCheck(ok=False, reason="not_found"),
    }
    (note,) = _events(ghcr, checks=checks)
    assert note.reason == FALLBACK
    assert note.message.startswith('container "app" keeps image "ghcr.io/o/app:1": no mirror')


def test_a_pod_from_generate_name_reports_on_its_controller_and_says_which_pod():
    (note,) = _events(_generated())
    assert note.subject == Subject("apps/v1", "ReplicaSet", "team-a", "web-7d9f", "rs-uid")
    assert note.message.startswith("a new pod web-7d9f-*: rewrote 1 image to mirrors: ")


def test_a_pod_with_neither_name_nor_owner_gets_no_event_rather_than_a_wrong_one():
    obj = pod()
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = "x-"
    assert _events(obj) == []
    # An ownerReference without a uid cannot be an involvedObject either.
    obj["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "X", "name": "x"}]
    assert _events(obj) == []


def test_a_denial_goes_on_the_controller_naming_the_pod_or_on_the_pods_name():
    named = pod()
    named["metadata"]["ownerReferences"] = [OWNER]
    req = parse_review(review(named))
    note = denial_event(req, "image nginx:1.25 has CVE-2024-1 (openssl, fixed in 3.0.14)")
    assert note == EventNote(
        Subject("apps/v1", "ReplicaSet", "team-a", "web-7d9f", "rs-uid"),
        DENIED,
        "pod web: image nginx:1.25 has CVE-2024-1 (openssl, fixed in 3.0.14)",
        "Warning",
    )
    bare = denial_event(parse_review(review(pod())), "denied")
    assert bare is not None and bare.subject == Subject("v1", "Pod", "team-a", "web")
    assert not bare.subject.lookup  # the denied pod never exists: no uid to wait for
    body = json.loads(review(pod()))
    body["request"]["dryRun"] = True
    assert denial_event(parse_review(json.dumps(body)), "denied") is None


def test_messages_are_bounded_and_printable():
    many = [{"name": f"c{i:03}", "image": f"nginx:1.{i}"} for i in range(200)]
    (note,) = _events(pod(containers=many))
    assert len(note.message) <= EVENT_MESSAGE_MAX
    assert note.message.startswith("rewrote 200 images to mirrors: ")
    req = parse_review(review(pod()))
    odd = denial_event(req, "line one\nline\x1b[31m two" + "x" * 5000)
    assert odd is not None and odd.message.isprintable() and len(odd.message) <= EVENT_MESSAGE_MAX


# --- the recorder -----------------------------------------------------------------------------


class FakeAPI:
    """The two calls the recorder makes, with pods appearing when a test says so."""

    def __init__(self, *, fail_create: Exception | None = None) -> None:
        self.created: list[tuple[str, dict]] = []
        self.pods: dict[str, dict] = {}
        self.gets = 0
        self.fail_create = fail_create

    async def get(self, path):
        self.gets += 1
        return self.pods.get(path)

    async def create(self, path, body):
        if self.fail_create is not None:
            raise self.fail_create
        self.created.append((path, body))
        return body


def _note(name="web", reason=FALLBACK, message="m", lookup=False, uid="pod-uid"):
    return EventNote(
        Subject("v1", "Pod", "team-a", name, "" if lookup else uid, lookup=lookup),
        reason,
        message,
        "Warning",
    )


class Counts(dict):
    def __call__(self, reason, result):
        self[(reason, result)] = self.get((reason, result), 0) + 1


def _recorder(api, counts, **kw):
    kw.setdefault("lookup_delays", (0.01,))
    return EventRecorder(api, instance="mg-0", count=counts, **kw).start()


async def test_an_event_is_posted_as_kubectl_describe_reads_it():
    api, counts = FakeAPI(), Counts()
    rec = _recorder(api, counts)
    rec.record([_note()])
    await rec.drain()
    await rec.stop()
    ((path, body),) = api.created
    assert path == "/api/v1/namespaces/team-a/events"
    assert body["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "team-a",
        "name": "web",
        "uid": "pod-uid",
    }
    assert (body["reason"], body["type"], body["message"]) == (FALLBACK, "Warning", "m")
    assert body["source"] == {"component": "mirrorgate"} and body["reportingInstance"] == "mg-0"
    assert body["metadata"] == {"generateName": "web.", "namespace": "team-a"}
    assert counts == {(FALLBACK, "created"): 1}


async def test_the_same_event_is_posted_once_per_dedupe_window():
    now = [0.0]
    api, counts = FakeAPI(), Counts()
    rec = _recorder(api, counts, dedupe_seconds=600, clock=lambda: now[0])
    for _ in range(50):  # every pod of a Deployment falling back the same way
        rec.record([_note(name="web-7d9f", message="same")])
    rec.record([_note(name="web-7d9f", message="other")])
    await rec.drain()
    assert len(api.created) == 2
    assert counts[(FALLBACK, "deduplicated")] == 49
    now[0] = 601.0
    rec.record([_note(name="web-7d9f", message="same")])
    await rec.drain()
    await rec.stop()
    assert len(api.created) == 3


async def test_posting_is_rate_limited_after_a_burst():
    api, counts = FakeAPI(), Counts()
    rec = _recorder(api, counts, rate=20.0, burst=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    rec.record([_note(message=str(i)) for i in range(15)])
    await rec.drain()
    elapsed = loop.time() - started
    await rec.stop()
    assert len(api.created) == 15
    # 5 at once, then 10 at 20/s: about half a second, never all at once.
    assert elapsed >= 0.4, elapsed


async def test_record_never_waits_and_drops_what_the_queue_cannot_hold():
    api, counts = FakeAPI(), Counts()
    rec = EventRecorder(api, instance="mg-0", count=counts)  # not started: nothing drains
    loop = asyncio.get_running_loop()
    started = loop.time()
    rec.record([_note(message=str(i)) for i in range(QUEUE_MAX + 10)])
    assert loop.time() - started < 0.5
    assert counts[(FALLBACK, "dropped")] == 10
    await rec.stop()


async def test_a_new_pod_is_looked_up_and_its_event_carries_the_uid():
    api, counts = FakeAPI(), Counts()
    rec = _recorder(api, counts, lookup_delays=(0.01, 0.02), lookup_timeout=2.0)
    rec.record([_note(reason=REWRITTEN, lookup=True)])

    async def appear():
        await asyncio.sleep(0.05)
        api.pods["/api/v1/namespaces/team-a/pods/web"] = {"metadata": {"uid": "new-uid"}}

    await asyncio.gather(appear(), rec.drain())
    await rec.stop()
    ((_, body),) = api.created
    assert body["involvedObject"]["uid"] == "new-uid"
    assert api.gets >= 2


async def test_a_pod_that_never_appears_gets_no_event():
    api, counts = FakeAPI(), Counts()
    rec = _recorder(api, counts, lookup_delays=(0.01,), lookup_timeout=0.1)
    rec.record([_note(reason=REWRITTEN, lookup=True)])
    await rec.drain()
    await rec.stop()
    assert api.created == []
    assert counts == {(REWRITTEN, "no_object"): 1}


async def test_api_errors_are_counted_and_logged_once_without_secrets(caplog):
    from mirrorgate.webhook.adapters.kube import KubeError

    api, counts = FakeAPI(fail_create=KubeError(403, "events is forbidden")), Counts()
    rec = _recorder(api, counts)
    rec.record([_note(message=str(i)) for i in range(5)])
    await rec.drain()
    await rec.stop()
    assert counts == {(FALLBACK, "failed"): 5}
    lines = [r for r in caplog.records if r.getMessage() == "cannot create Events"]
    assert len(lines) == 1
    assert "create on events" in lines[0].fields["hint"]


@pytest.mark.parametrize("events", [True, False], ids=["events on", "events off"])
def test_the_events_key_is_a_boolean(events):
    cfg = parse_config(f"mirrors: [{{upstream: docker.io, mirror: m.example}}]\nevents: {events}")
    assert cfg.events is events
