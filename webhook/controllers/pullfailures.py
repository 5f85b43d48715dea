"""Failed image pulls, as the kubelets report them, counted for Prometheus.

A rewrite to a mirror that cannot serve an image, or a missing pull secret, shows up only later, on
the node: the kubelet records an Event (reason ``Failed``, "Failed to pull image ..."). This
module turns those Events into ``mirrorgate_image_pull_failures_total{namespace, registry, kind}``,
where ``kind`` says whether the image was on a mirror or its upstream and whether the error was
auth, not-found or network. Repeats of one Event bump its ``count``: only the increase is counted,
and Events that existed before the watch started are a baseline, not failures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from mirrorgate.webhook.core.config import Config
from mirrorgate.webhook.core.images import InvalidReferenceError, parse_reference
from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("pullfailures")
EVENTS_PATH = "/api/v1/events"
EVENTS_QUERY = {"fieldSelector": "involvedObject.kind=Pod,reason=Failed"}
MAX_TRACKED_EVENTS = 50_000

_IMAGE = re.compile(r'^Failed to pull image "([^"]+)"')
# Ordered: the first matching class wins. Texts from containerd, CRI-O and dockershim errors.
_CLASSES = (
    (
        "auth",
        re.compile(
            r"unauthorized|authentication required|401 Unauthorized|403 Forbidden|denied|"
            r"no basic auth credentials|authorization failed",
            re.I,
        ),
    ),
    (
        "not_found",
        re.compile(r"not found|manifest unknown|name unknown|404 Not Found|does not exist", re.I),
    ),
    (
        "network",
        re.compile(
            r"dial tcp|connection refused|i/o timeout|no such host|timeout|x509|tls:|"
            r"network is unreachable|connection reset|server misbehaving|EOF",
            re.I,
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class PullFailure:
    namespace: str
    registry: str  # the image's registry domain, e.g. 127.0.0.1:31000 or docker.io
    kind: str  # mirror_auth, mirror_not_found, mirror_network, mirror_other, upstream_...


def classify(event: Mapping[str, Any], config: Config) -> PullFailure | None:
    """The pull failure an Event reports, or None when it is not a failed image pull."""
    message = str(event.get("message") or "")
    match = _IMAGE.match(message)
    if match is None:
        return None
    namespace = str(
        (event.get("involvedObject") or {}).get("namespace")
        or (event.get("metadata") or {}).get("namespace")
        or ""
    )
    try:
        ref = parse_reference(match.group(1))
    except InvalidReferenceError:
        return PullFailure(namespace, "invalid", "upstream_other")
    origin = "mirror" if config.mirror_serving(ref) is not None else "upstream"
    reason = next((name for name, pattern in _CLASSES if pattern.search(message)), "other")
    return PullFailure(namespace, ref.domain, f"{origin}_{reason}")


def occurrences(event: Mapping[str, Any]) -> int:
    """How many times the kubelet has seen this Event (``count``, or ``series.count``)."""
    for value in (event.get("count"), (event.get("series") or {}).get("count")):
        if isinstance(value, int) and value > 0:
            return value
    return 1


class PullFailureCounter:
    """Feeds watch events of kubelet Events into a Prometheus counter, counting each once."""

    def __init__(self, config: Config, counter: Any) -> None:
        self.config = config
        self.counter = counter
        self._seen: LRUCache[str, int] = LRUCache(MAX_TRACKED_EVENTS)

    def baseline(self, events: list[Mapping[str, Any]]) -> None:
        """Events that exist when watching starts: remember their counts, count nothing."""
        for event in events:
            uid = (event.get("metadata") or {}).get("uid")
            if uid:
                self._remember(uid, occurrences(event))

    def observe(self, event: Mapping[str, Any]) -> int:
        """An added or modified Event: count the new occurrences; returns how many."""
        uid = (event.get("metadata") or {}).get("uid")
        if not uid:
            return 0
        now = occurrences(event)
        new = now - self._seen.get(uid, 0)
        self._remember(uid, max(now, self._seen.get(uid, 0)))
        if new <= 0:
            return 0
        failure = classify(event, self.config)
        if failure is None:
            return 0
        self.counter.labels(failure.namespace, failure.registry, failure.kind).inc(new)
        return new

    def _remember(self, uid: str, count: int) -> None:
        self._seen[uid] = count


async def watch_pull_failures(kube: Any, counter: PullFailureCounter) -> None:
    """Count failed pulls from a watch of kubelet Events until cancelled (run on the leader)."""
    watch = kube.watch(EVENTS_PATH, query=EVENTS_QUERY).start()
    first = True
    try:
        async for event in watch:
            if event.type == "RELIST":
                if first:
                    counter.baseline(list(event.objects))
                    first = False
                else:
                    # After a reconnect: count what changed while the watch was down.
                    for obj in event.objects:
                        counter.observe(obj)
            elif event.type in ("ADDED", "MODIFIED"):
                counter.observe(event.obj)
    finally:
        await watch.close()
