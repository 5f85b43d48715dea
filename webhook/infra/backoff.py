"""The one back-off rule of every retry loop: exponential, capped, with client-go's jitter.

A delay grows by ``factor`` per failure up to ``maximum`` and is stretched by a random factor in
``[1, 1 + jitter)``, so replicas that failed together do not retry together (client-go's
``wait.Jitter`` with factor 0.2 for watches, 1.2 x RetryPeriod for leader election).
"""

from __future__ import annotations

import random

JITTER = 0.2


def jittered(delay: float, jitter: float = JITTER) -> float:
    """``delay`` stretched by a random factor in ``[1, 1 + jitter)``."""
    return delay * random.uniform(1.0, 1.0 + jitter)


class Backoff:
    """Delays for consecutive failures: ``next()`` after each, ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float, *, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.failures = 0

    def next(self) -> float:
        """The jittered delay before the next attempt; counts one more failure."""
        delay = min(self.maximum, self.initial * self.factor**self.failures)
        self.failures += 1
        return jittered(delay)

    def reset(self) -> None:
        self.failures = 0
