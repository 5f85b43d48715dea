"""The soak: many warm admissions in a row, and mirrorgate's RSS while they run.

Owns the memory check. The admissions are split into rounds; each round sends a mix shaped like a
cluster's (mostly small pods) to both endpoints with ``hey -n``. RSS is read after every round and
sampled every half second in between; growth over the second half of the admissions must stay
flat (caches are bounded by configuration, so the same images cannot make them grow).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench import load
from bench.hot import QUERY, Bodies, progress
from bench.stack import PinnedServer

# (endpoint, shape, share of a round)
MIX = (
    ("mutate", "1c", 0.3),
    ("validate", "1c", 0.3),
    ("mutate", "5c", 0.19),
    ("validate", "5c", 0.19),
    ("mutate", "30c", 0.01),
    ("validate", "30c", 0.01),
)
ROUNDS = 10
SAMPLE_SECONDS = 0.5
FLAT_MB = 2.0  # "flat": the second half may grow by at most this much
RSS_LIMIT_MB = 150.0


@dataclass
class SoakResult:
    admissions: int
    seconds: float
    rss_start_mb: float
    rss_half_mb: float
    rss_end_mb: float
    rss_max_mb: float
    rounds: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0

    @property
    def second_half_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_half_mb

    @property
    def meets_target(self) -> bool:
        return self.rss_end_mb < RSS_LIMIT_MB and self.second_half_growth_mb <= FLAT_MB

    def as_dict(self) -> dict[str, Any]:
        return {
            "admissions": self.admissions,
            "seconds": round(self.seconds, 1),
            "rss_mb": {
                "start": round(self.rss_start_mb, 1),
                "half": round(self.rss_half_mb, 1),
                "end": round(self.rss_end_mb, 1),
                "max": round(self.rss_max_mb, 1),
                "second_half_growth": round(self.second_half_growth_mb, 2),
            },
            "errors": self.errors,
            "rounds": self.rounds,
            "target_met": self.meets_target,
        }


def run(
    server: PinnedServer, bodies: Bodies, *, total: int, connections: int, core: int | None
) -> SoakResult:
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            samples.append(server.rss_mb())

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    start_rss = server.rss_mb()
    started = time.monotonic()
    sent = errors = 0
    rounds: list[dict[str, float]] = []
    half_rss = start_rss
    per_round = total / ROUNDS
    sampler.start()
    try:
        for round_no in range(ROUNDS):
            for endpoint, shape, share in MIX:
                count = max(connections, int(per_round * share))
                result = load.fixed_count(
                    server.url + f"/{endpoint}{QUERY}",
                    bodies.files[(endpoint, shape)],
                    count=count,
                    connections=connections,
                    core=core,
                    timeout=600,
                )
                sent += result.requests
                errors += result.errors
            rss = server.rss_mb()
            rounds.append({"admissions": sent, "rss_mb": round(rss, 2)})
            if round_no == ROUNDS // 2 - 1:
                half_rss = rss
            progress(f"soak: {sent} admissions, RSS {rss:.1f} MiB")
    finally:
        stop.set()
        sampler.join(5)
    end_rss = server.rss_mb()
    return SoakResult(
        admissions=sent,
        seconds=time.monotonic() - started,
        rss_start_mb=start_rss,
        rss_half_mb=half_rss,
        rss_end_mb=end_rss,
        rss_max_mb=max([start_rss, end_rss, *samples]),
        rounds=rounds,
        errors=errors,
    )
