"""Every Prometheus metric mirrorgate exposes, defined once on an injected CollectorRegistry.

Label values are bounded: webhook and operation names, outcomes, configured upstreams and reasons.
Never an image, pod or namespace chosen by a user at request time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from mirrorgate.webhook import __version__

# From a cached decision (well under a millisecond) to the API server's 10 s default timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT"})
M = TypeVar("M", Counter, Gauge, Histogram)


class CacheLookups:
    """``mirrorgate_registry_cache_lookups_total{result="hit|miss"}``, read from the registry
    client's own counts when Prometheus scrapes: every admission looks the cache up, and a
    Counter increment per lookup (a lock, a label lookup) showed in the hot path's profile."""

    def __init__(self) -> None:
        # () -> (hits, misses); set when the server's registry client exists.
        self.source: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "mirrorgate_registry_cache_lookups",
            "Registry answer cache lookups, by result (hit or miss).",
            labels=["result"],
        )
        if self.source is not None:
            hits, misses = self.source()
            family.add_metric(["hit"], hits)
            family.add_metric(["miss"], misses)
        yield family


# Namespaces named by requests become label values only this many times; the rest are "other".
MAX_NAMESPACE_LABELS = 1000
OTHER = "other"


class BoundedLabel:
    """Label values that come from requests (a namespace): the first ``limit`` distinct ones, and
    ``other`` for the rest and for values the cluster does not know (``known`` says None), so
    no client can add series at will."""

    def __init__(self, limit: int = MAX_NAMESPACE_LABELS) -> None:
        self.limit = limit
        self._kept: set[str] = set()

    def __call__(self, value: str, *, known: Callable[[str], object | None] | None = None) -> str:
        if value in self._kept:
            return value
        if len(self._kept) >= self.limit or (known is not None and known(value) is None):
            return OTHER
        self._kept.add(value)
        return value


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.admission_requests = Counter(
            "mirrorgate_admission_requests",
            "Admission requests answered, by webhook, operation and outcome.",
            ["webhook", "operation", "outcome"],
            registry=r,
        )
        self.admission_duration = Histogram(
            "mirrorgate_admission_duration_seconds",
            "Time to answer an admission request, from body read to response.",
            ["webhook"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images_rewritten = Counter(
            "mirrorgate_images_rewritten",
            "Images rewritten to a mirror, by the configured upstream that matched and the "
            "mirror chosen.",
            ["upstream", "mirror"],
            registry=r,
        )
        self.events = Counter(
            "mirrorgate_events",
            "Kubernetes Events for admissions, by reason and result: created, deduplicated, "
            "dropped (queue full), no_object (the pod never appeared), failed.",
            ["reason", "result"],
            registry=r,
        )
        self.mirrors_passed_over = Counter(
            "mirrorgate_mirror_passed_over",
            "Mirrors that could not serve an image at admission, so the next mirror of its "
            "upstream (or the original registry) was used, by reason.",
            ["upstream", "mirror", "reason"],
            registry=r,
        )
        self.images_left = Counter(
            "mirrorgate_images_left_unchanged",
            "Images a rewrite applied to but that were left as they were, by reason.",
            ["reason"],
            registry=r,
        )
        self.images_fallback = Counter(
            "mirrorgate_images_fallback",
            "Images left on their original registry because the mirror could not serve them.",
            ["upstream", "reason"],
            registry=r,
        )
        self.registry_request_duration = Histogram(
            "mirrorgate_registry_request_duration_seconds",
            "Registry API calls made by mirrorgate, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.registry_errors = Counter(
            "mirrorgate_registry_errors",
            "Registry API calls that failed, by operation and kind of failure.",
            ["operation", "kind"],
            registry=r,
        )
        self.registry_cache = CacheLookups()
        r.register(self.registry_cache)
        self.mirror_copies = Counter(
            "mirrorgate_mirror_copies",
            "Background copies of images into copy-type mirrors, by result.",
            ["result"],
            registry=r,
        )
        self.image_pull_failures = Counter(
            "mirrorgate_image_pull_failures",
            "Failed image pulls reported by kubelets (Events), by namespace, the image's "
            "registry and kind: mirror_* or upstream_* with auth, not_found, network or other.",
            ["namespace", "registry", "kind"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "mirrorgate_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate in use, as a Unix timestamp.",
            ["certificate"],
            registry=r,
        )
        self.certificate_reloads = Counter(
            "mirrorgate_certificate_reloads",
            "Serving certificate reload attempts, by result.",
            ["result"],
            registry=r,
        )
        self.images_rejected = Counter(
            "mirrorgate_images_rejected",
            "Images the vulnerability gate rejected (or, in audit mode, would have), by reason: "
            "fail, pending, unavailable, fail_running (failing, but admitted with a warning "
            "because its digest already runs in the namespace: scan.running: warn); namespace "
            f"is {OTHER!r} past {MAX_NAMESPACE_LABELS} "
            "namespaces and for namespaces the cluster does not have.",
            ["namespace", "reason"],
            registry=r,
        )
        self.rejected_namespace = BoundedLabel()
        self.running_pods = Gauge(
            "mirrorgate_running_pods",
            "Running pods (from the lease holder's watch) by namespace and the worst blocking "
            "severity of their images: none (every image passes), unknown (an image not "
            "scanned yet or Clair unreachable), else the severity; namespace is "
            f"{OTHER!r} past {MAX_NAMESPACE_LABELS} namespaces.",
            ["namespace", "worst_severity"],
            registry=r,
        )
        self._running_namespace = BoundedLabel()
        self.scan_verdicts = Counter(
            "mirrorgate_scan_verdicts",
            "Image verdicts at admission, by outcome and worst blocking severity.",
            ["outcome", "severity"],
            registry=r,
        )
        self.scan_queue_depth = Gauge(
            "mirrorgate_scan_queue_depth",
            "Manifests waiting for or being indexed by Clair.",
            registry=r,
        )
        self.scan_indexed = Counter(
            "mirrorgate_scan_index_requests",
            "Clair index requests finished, by result (indexed, failed).",
            ["result"],
            registry=r,
        )
        self.scan_events = Counter(
            "mirrorgate_scan_events",
            "Event callbacks received, by source (clair, registry) and result.",
            ["source", "result"],
            registry=r,
        )
        # Pull-secret propagation (webhook.controllers.pullsecrets). Gauges describe the cluster as
        # this replica's watches see it; writes happen on the lease holder and at admission.
        self.pullsecret_copies = Gauge(
            "mirrorgate_pullsecret_copies",
            "Managed copies of the pull secret that hold the source's current content.",
            registry=r,
        )
        self.pullsecret_conflicts = Gauge(
            "mirrorgate_pullsecret_conflicts",
            "Namespaces in scope skipped because a Secret of the pull secret's name exists there "
            "that mirrorgate does not manage.",
            registry=r,
        )
        self.pullsecret_source_ready = Gauge(
            "mirrorgate_pullsecret_source_ready",
            "1 when the source Secret exists and is a usable dockerconfigjson, else 0; only "
            "exported when pullSecret.source is set.",
            ["source"],
            registry=r,
        )
        self.pullsecret_leader = Gauge(
            "mirrorgate_pullsecret_leader",
            "1 while this replica holds the lease and writes copies, else 0.",
            registry=r,
        )
        self.pullsecret_writes = Counter(
            "mirrorgate_pullsecret_writes",
            "Successful writes, by operation: create, update, recreate, delete, "
            "patch_service_account, admission_create.",
            ["operation"],
            registry=r,
        )
        self.pullsecret_sync_errors = Counter(
            "mirrorgate_pullsecret_sync_errors",
            "Failed writes or reconcile passes, by operation (as for writes, plus admission and "
            "reconcile).",
            ["operation"],
            registry=r,
        )
        self.pullsecret_watch_restarts = Counter(
            "mirrorgate_pullsecret_watch_restarts",
            "Watches restarted, by resource (namespaces, source, copies, serviceaccounts) and "
            "reason (gone: relisted after 410, error: after a backoff).",
            ["resource", "reason"],
            registry=r,
        )
        build_info = Gauge(
            "mirrorgate_build_info",
            "Always 1; the version label says what runs.",
            ["version"],
            registry=r,
        )
        build_info.labels(version=__version__).set(1)

    def set_running_pods(self, counts: dict[tuple[str, str], int]) -> None:
        """Replace every ``mirrorgate_running_pods`` series with ``counts``."""
        merged: dict[tuple[str, str], int] = {}
        for (namespace, severity), n in counts.items():
            key = (self._running_namespace(namespace), severity)
            merged[key] = merged.get(key, 0) + n
        self.running_pods.clear()
        for (namespace, severity), n in merged.items():
            self.running_pods.labels(namespace, severity).set(n)

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, kept: ``labels()`` checks, converts and takes a lock on
        every call, which the per-admission counters pay thousands of times a second. Only for
        label sets from bounded values (never a namespace) of children that are never removed."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def registry_request(self, operation: str, seconds: float, error: str | None) -> None:
        self.registry_request_duration.labels(operation).observe(seconds)
        if error is not None:
            self.registry_errors.labels(operation, error).inc()

    def operation_label(self, operation: str) -> str:
        return operation if operation in OPERATIONS else "other"
