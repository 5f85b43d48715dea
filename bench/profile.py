"""Sampling the served process with py-spy while it is saturated, and summarising the samples.

Owns ``--profile DIR``: py-spy (``pip install py-spy``; not a project dependency) records the
mirrorgate process at 250 Hz (blocking mode, so stacks are consistent; that is why the profiled
run is an extra one, never a measured one), aggregated by function, into
``DIR/<endpoint>-<pod>.txt`` (collapsed stacks: feed them to flamegraph.pl or speedscope). ``top``
turns one file into the functions with the most samples, on their own (self) and with what they
call (inclusive), as shares of the busy samples.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RATE_HZ = 250
# Frames every sample passes through (interpreter start, the event loop, the CLI): not costs.
_FRAMEWORK = ("<frozen runpy>", "asyncio/runners.py", "asyncio/base_events.py", "webhook/cli.py")


class ProfileError(RuntimeError):
    """py-spy is missing or could not attach."""


def require_py_spy() -> str:
    binary = shutil.which("py-spy")
    if binary is None:
        raise ProfileError(
            "--profile needs py-spy on PATH: pip install --target /tmp/bench-tools py-spy, "
            "then PATH=/tmp/bench-tools/bin:$PATH"
        )
    return binary


@contextlib.contextmanager
def recording(pid: int, output: Path, *, seconds: float, core: int | None) -> Iterator[None]:
    """Record ``pid`` for ``seconds`` while the body of the ``with`` runs."""
    output.parent.mkdir(parents=True, exist_ok=True)
    pin = ["taskset", "-c", str(core)] if core is not None else []
    argv = [
        *pin,
        require_py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        str(RATE_HZ),
        "--format",
        "raw",
        "--function",
        "--output",
        str(output),
    ]
    spy = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
            raise ProfileError(f"py-spy did not finish recording {output}") from None
    if spy.returncode != 0:
        raise ProfileError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")


def top(raw: Path, *, limit: int = 15) -> dict[str, Any]:
    """The functions with the most samples in a py-spy raw file, self and inclusive (without the
    interpreter, event-loop and CLI frames every sample passes through)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if not any(part in frame for part in _FRAMEWORK):
                inclusive[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "share": round(n / total, 4)}
            for name, n in counter.most_common(limit)
        ]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}
