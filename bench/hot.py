"""The warm hot path: bodies, warm-up, and mirrorgate against the baseline per endpoint and pod.

Owns the measurement the targets are about. ``prepare`` sends each pod through mirrorgate's
``/mutate`` once and applies the patch, so the ``/validate`` bodies are the mutated pods (as the API
server sends them: validating webhooks run after mutation), and checks that every image was
rewritten. ``warm_up`` asks ``/validate`` until every verdict is known (the first asks make Clair
index the images). ``measure`` then runs, for each (endpoint, pod): wrk saturation
of both servers, then hey at 50% of the baseline's saturated rate against both, each in
alternating slices (see ``_alternating``), then reads RSS.
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch

from bench import load
from bench.bodies import SHAPES, admission_review, encode, pod
from bench.stack import PinnedServer

ENDPOINTS = ("mutate", "validate")
QUERY = "?timeout=10s"  # what kube-apiserver appends (the webhook's timeoutSeconds)
WARMUP_SECONDS = 1.0
SLICES = 3
WARM_TIMEOUT = 60.0


class HotPathError(RuntimeError):
    """mirrorgate answered the warm-up in a way that would make the numbers meaningless."""


@dataclass(frozen=True, slots=True)
class Bodies:
    files: dict[tuple[str, str], Path]  # (endpoint, shape) -> body file
    sizes: dict[tuple[str, str], int]
    images: dict[str, int]  # shape -> containers in the pod


def post(server: PinnedServer, path: str, body: bytes) -> dict[str, Any]:
    context = ssl.create_default_context(cadata=server.ca_pem.decode())
    request = urllib.request.Request(
        server.url + path,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, context=context, timeout=15) as response:
        return json.loads(response.read())


def mutated(review: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The pod after applying mirrorgate's JSON patch, as the API server would store it."""
    response = answer["response"]
    if not response.get("patch"):
        return review["request"]["object"]
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(review["request"]["object"], patch)


def prepare(server: PinnedServer, directory: Path, *, mirror_host: str) -> Bodies:
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[tuple[str, str], Path] = {}
    sizes: dict[tuple[str, str], int] = {}
    images: dict[str, int] = {}
    for shape in SHAPES:
        review = admission_review(pod(shape))
        spec = review["request"]["object"]["spec"]
        containers = [*spec.get("initContainers", []), *spec["containers"]]
        images[shape] = len(containers)
        answer = post(server, "/mutate" + QUERY, encode(review))
        response = answer["response"]
        after = mutated(review, answer)
        after_spec = after["spec"]
        rewritten = [
            c["image"]
            for c in [*after_spec.get("initContainers", []), *after_spec["containers"]]
            if c["image"].startswith(mirror_host + "/")
        ]
        if not response.get("allowed") or len(rewritten) != len(containers):
            raise HotPathError(
                f"/mutate of the {shape} pod rewrote {len(rewritten)} of {len(containers)} "
                f"images (warnings: {response.get('warnings')}); see the mirrorgate log"
            )
        for endpoint, doc in (("mutate", review), ("validate", admission_review(after))):
            data = encode(doc)
            path = directory / f"{endpoint}-{shape}.json"
            path.write_bytes(data)
            files[(endpoint, shape)] = path
            sizes[(endpoint, shape)] = len(data)
    return Bodies(files, sizes, images)


def warm_up(server: PinnedServer, bodies: Bodies) -> float:
    """Ask /validate until every pod is allowed with every verdict known; returns seconds."""
    started = time.monotonic()
    pending = set(SHAPES)
    while pending:
        for shape in sorted(pending):
            answer = post(
                server, "/validate" + QUERY, bodies.files[("validate", shape)].read_bytes()
            )
            response = answer["response"]
            outcomes = [v.split()[1] for v in response.get("auditAnnotations", {}).values()]
            if response.get("allowed") and outcomes and set(outcomes) == {"pass"}:
                pending.discard(shape)
        if pending and time.monotonic() - started > WARM_TIMEOUT:
            raise HotPathError(f"verdicts still unknown after {WARM_TIMEOUT:.0f}s: {pending}")
        if pending:
            time.sleep(0.2)
    return time.monotonic() - started


@dataclass
class Row:
    endpoint: str
    shape: str
    containers: int
    body_bytes: int
    baseline_saturated: load.LoadResult
    mirrorgate_saturated: load.LoadResult
    rate: float
    baseline_fixed: load.LoadResult
    mirrorgate_fixed: load.LoadResult
    baseline_rss_mb: float
    mirrorgate_rss_mb: float

    @property
    def throughput_ratio(self) -> float:
        return _ratio(self.mirrorgate_saturated.rps, self.baseline_saturated.rps)

    @property
    def p50_ratio(self) -> float:
        return _ratio(self.mirrorgate_fixed.p50_ms, self.baseline_fixed.p50_ms)

    @property
    def p99_ratio(self) -> float:
        return _ratio(self.mirrorgate_fixed.p99_ms, self.baseline_fixed.p99_ms)

    @property
    def rss_ratio(self) -> float:
        return _ratio(self.mirrorgate_rss_mb, self.baseline_rss_mb)

    @property
    def overloaded(self) -> bool:
        """mirrorgate could not keep up with the fixed rate (its latency then is queueing)."""
        return self.mirrorgate_fixed.rps < 0.95 * self.rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint": f"/{self.endpoint}",
            "pod": self.shape,
            "containers": self.containers,
            "body_bytes": self.body_bytes,
            "saturated_rps": {
                "baseline": round(self.baseline_saturated.rps, 1),
                "mirrorgate": round(self.mirrorgate_saturated.rps, 1),
                "ratio": round(self.throughput_ratio, 3),
            },
            "fixed_rate_rps": round(self.rate, 1),
            "p50_ms_at_50pct": {
                "baseline": self.baseline_fixed.p50_ms,
                "mirrorgate": self.mirrorgate_fixed.p50_ms,
                "ratio": round(self.p50_ratio, 3),
            },
            "p99_ms_at_50pct": {
                "baseline": self.baseline_fixed.p99_ms,
                "mirrorgate": self.mirrorgate_fixed.p99_ms,
                "ratio": round(self.p99_ratio, 3),
            },
            "rss_mb_after": {
                "baseline": round(self.baseline_rss_mb, 1),
                "mirrorgate": round(self.mirrorgate_rss_mb, 1),
                "ratio": round(self.rss_ratio, 3),
            },
            "mirrorgate_kept_up_with_fixed_rate": not self.overloaded,
            "runs": {
                "baseline_saturated": self.baseline_saturated.as_dict(),
                "mirrorgate_saturated": self.mirrorgate_saturated.as_dict(),
                "baseline_fixed": self.baseline_fixed.as_dict(),
                "mirrorgate_fixed": self.mirrorgate_fixed.as_dict(),
            },
        }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def measure(
    baseline: PinnedServer,
    mirrorgate: PinnedServer,
    bodies: Bodies,
    *,
    seconds: float,
    connections: int,
    core: int | None,
    shapes: tuple[str, ...] = SHAPES,
    endpoints: tuple[str, ...] = ENDPOINTS,
    profiler: Callable[[str, str], AbstractContextManager[Any]] | None = None,
) -> list[Row]:
    """One Row per (endpoint, shape). With ``profiler``, each row ends with one more saturated
    run of mirrorgate inside ``profiler(endpoint, shape)``, which records it."""
    rows = []
    servers = (baseline, mirrorgate)
    for endpoint in endpoints:
        for shape in shapes:
            body = bodies.files[(endpoint, shape)]
            path = f"/{endpoint}{QUERY}"
            progress(f"/{endpoint} {shape}: saturation")
            for server in servers:
                # Unrecorded: connections open, handshakes done, caches and allocator warm.
                load.saturate(
                    server.url + path,
                    body,
                    seconds=WARMUP_SECONDS,
                    connections=connections,
                    core=core,
                )
            base_sat, mg_sat = _alternating(
                servers,
                path,
                functools.partial(
                    load.saturate, body_file=body, connections=connections, core=core
                ),
                seconds,
            )
            rate = base_sat.rps / 2
            progress(f"/{endpoint} {shape}: both at {rate:.0f} req/s")
            base_fixed, mg_fixed = _alternating(
                servers,
                path,
                functools.partial(
                    load.fixed_rate, body_file=body, rate=rate, connections=connections, core=core
                ),
                seconds,
            )
            for server, result in ((baseline, base_sat), (mirrorgate, mg_sat)):
                if result.errors:
                    raise HotPathError(
                        f"{server.name} {path}: {result.errors} errors under load; see "
                        f"{server.log_file}"
                    )
            rows.append(
                Row(
                    endpoint=endpoint,
                    shape=shape,
                    containers=bodies.images[shape],
                    body_bytes=bodies.sizes[(endpoint, shape)],
                    baseline_saturated=base_sat,
                    mirrorgate_saturated=mg_sat,
                    rate=rate,
                    baseline_fixed=base_fixed,
                    mirrorgate_fixed=mg_fixed,
                    baseline_rss_mb=baseline.rss_mb(),
                    mirrorgate_rss_mb=mirrorgate.rss_mb(),
                )
            )
            if profiler is not None:
                # A separate saturated run: the profiler slows the process it samples.
                progress(f"/{endpoint} {shape}: profiling mirrorgate")
                with profiler(endpoint, shape):
                    load.saturate(
                        mirrorgate.url + path,
                        body,
                        seconds=seconds,
                        connections=connections,
                        core=core,
                    )
    return rows


def _alternating(
    servers: tuple[PinnedServer, PinnedServer],
    path: str,
    run: Callable[..., load.LoadResult],
    seconds: float,
) -> tuple[load.LoadResult, load.LoadResult]:
    """``seconds`` of ``run`` per server, in up to SLICES slices taken in turns (baseline,
    mirrorgate, baseline, ...), each server's slices combined by their median: load from outside
    the benchmark then hits both alike instead of whichever ran at the wrong moment."""
    count = min(SLICES, max(1, int(seconds)))  # wrk measures whole seconds
    per_slice = max(1.0, seconds / count)
    slices: tuple[list[load.LoadResult], list[load.LoadResult]] = ([], [])
    for _ in range(count):
        for server, results in zip(servers, slices, strict=True):
            results.append(run(server.url + path, seconds=per_slice))
    base, mg = (load.combine(results) for results in slices)
    return base, mg


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)
