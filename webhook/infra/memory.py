"""Keeping the process's memory at what it holds, not at the high-water mark of its worst request.

A megabyte review (hostile or not) is parsed into megabytes of short-lived buffers and objects.
glibc keeps what they freed: its mmap threshold rises after each large free, so later large
buffers come from the heap and leave holes, and each thread may get an arena of its own. So
``tune_allocator`` (at serve start) fixes the mmap threshold (large buffers go back to the
kernel when freed) and caps the arenas, and ``trim_soon`` (after a large body) hands what the
heap has free back with ``malloc_trim``, at most once a second and off the answer's path.
Measured with ``python -m bench.fuzz`` (bench/README.md). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time
from collections.abc import Callable

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 128 * 1024
ARENA_MAX = 2
TRIM_INTERVAL = 1.0


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune_allocator() -> bool:
    """Fixed mmap and trim thresholds and at most ARENA_MAX arenas; False when not glibc."""
    if _LIBC is None:
        return False
    _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _LIBC.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)
    _LIBC.mallopt(M_ARENA_MAX, ARENA_MAX)
    return True


class _Trimmer:
    def __init__(self, trim: Callable[[int], int] | None) -> None:
        self._trim = trim
        self._pending = False
        self._last = 0.0

    def soon(self) -> None:
        if self._trim is None or self._pending:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule on
            delay = max(0.2, TRIM_INTERVAL - (time.monotonic() - self._last))
            asyncio.get_running_loop().call_later(delay, self._run)
            self._pending = True

    def _run(self) -> None:
        self._pending = False
        self._last = time.monotonic()
        if self._trim is not None:
            self._trim(0)


_TRIMMER = _Trimmer(_LIBC.malloc_trim if _LIBC is not None else None)


def trim_soon() -> None:
    """Give freed heap memory back to the kernel shortly (once a second at most)."""
    _TRIMMER.soon()
