"""Load generation: Debian's ``wrk`` (saturation) and ``hey`` (fixed rate, fixed count).

Owns driving a server and reading back what the tool measured. Every run is a child process pinned
with ``taskset`` to the load generator's core, bounded in time (``subprocess.run`` kills it on
timeout) and aimed at 127.0.0.1 only.

- ``saturate``: ``wrk -t1 -c C -d S --latency`` with ``post.lua``, which prints the summary as
  JSON (latency percentiles in microseconds). Closed loop: C connections, each sending its next
  request as soon as the last answer arrived, so the server is never idle.
- ``fixed_rate``: ``hey -z S -c C -q R/C``: C workers, each sending one request per tick of its own
  R/C-per-second ticker, so the server sees R requests/s as long as it keeps up (a tick that finds
  its worker still waiting is dropped: the achieved rate then falls short of R, and is reported).
  Debian has no wrk2; hey's percentiles have 0.1 ms resolution.
- ``fixed_count``: ``hey -n N -c C``, for the soak.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LUA_SCRIPT = Path(__file__).with_name("post.lua")
INSTALL_HINT = "apt-get install -y --no-install-recommends wrk hey"


class LoadError(RuntimeError):
    """A load generator is missing, failed, or reported something unreadable."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    tool: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx answers
    target_rps: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def combine(results: list[LoadResult]) -> LoadResult:
    """Several runs of one kind as one: requests, time and errors add up; rate and percentiles
    are the runs' medians."""
    first = results[0]
    return LoadResult(
        tool=first.tool,
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
        target_rps=first.target_rps,
    )


def require_tools() -> None:
    missing = [tool for tool in ("wrk", "hey", "taskset") if shutil.which(tool) is None]
    if missing:
        raise LoadError(f"{', '.join(missing)} not installed: {INSTALL_HINT}")


def _pin(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


def _run(argv: list[str], *, timeout: float) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as err:
        raise LoadError(f"{argv[0]} did not finish within {timeout:.0f}s") from err
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def saturate(
    url: str, body_file: Path, *, seconds: float, connections: int, core: int | None
) -> LoadResult:
    """Closed-loop maximum throughput with wrk; p50/p99 are at saturation."""
    argv = [
        *_pin(core),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(body_file),
    ]
    out = _run(argv, timeout=seconds + 30)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise LoadError(f"wrk printed no summary:\n{out[-1000:]}")
    s = json.loads(line.removeprefix("BENCH_JSON "))
    duration = s["duration_us"] / 1e6
    errors = sum(
        s[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return LoadResult(
        tool="wrk",
        requests=s["requests"],
        seconds=duration,
        rps=s["requests"] / duration if duration else 0.0,
        p50_ms=s["p50_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
        errors=errors,
    )


def _hey(argv_tail: list[str], url: str, body_file: Path, core: int | None, timeout: float) -> str:
    argv = [
        *_pin(core),
        "hey",
        *argv_tail,
        "-m",
        "POST",
        "-T",
        "application/json",
        "-D",
        str(body_file),
        "-t",
        "10",
        url,
    ]
    return _run(argv, timeout=timeout)


_TOTAL = re.compile(r"^\s*Total:\s+([\d.]+) secs", re.MULTILINE)
_SLOWEST = re.compile(r"^\s*Slowest:\s+([\d.]+) secs", re.MULTILINE)
_PERCENTILE = re.compile(r"^\s*(\d+)%+ in ([\d.]+) secs", re.MULTILINE)
_STATUS = re.compile(r"^\s*\[(\d{3})\]\s+(\d+) responses", re.MULTILINE)


def _parse_hey(out: str, *, target_rps: float | None) -> LoadResult:
    total = _TOTAL.search(out)
    if total is None:
        raise LoadError(f"hey printed no summary:\n{out[-1000:]}")
    seconds = float(total.group(1))
    percentiles = {int(p): float(v) * 1000 for p, v in _PERCENTILE.findall(out)}
    slowest = _SLOWEST.search(out)
    if 99 not in percentiles and slowest is not None:
        # hey prints no 99% line for fewer than 100 answers: the slowest one is the p99 then.
        percentiles[99] = float(slowest.group(1)) * 1000
    statuses = {int(code): int(n) for code, n in _STATUS.findall(out)}
    error_section = out.split("Error distribution:", 1)[1] if "Error distribution:" in out else ""
    socket_errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", error_section, re.MULTILINE))
    answered = sum(statuses.values())
    bad = sum(n for code, n in statuses.items() if not 200 <= code < 300)
    return LoadResult(
        tool="hey",
        requests=answered,
        seconds=seconds,
        rps=answered / seconds if seconds else 0.0,
        p50_ms=percentiles.get(50, float("nan")),
        p99_ms=percentiles.get(99, float("nan")),
        errors=bad + socket_errors,
        target_rps=target_rps,
    )


def fixed_rate(
    url: str,
    body_file: Path,
    *,
    rate: float,
    seconds: float,
    connections: int,
    core: int | None,
) -> LoadResult:
    """Latency at a fixed offered rate (open loop per worker) with hey."""
    per_worker = rate / connections
    out = _hey(
        ["-z", f"{seconds:g}s", "-c", str(connections), "-q", f"{per_worker:.3f}"],
        url,
        body_file,
        core,
        timeout=seconds + 30,
    )
    return _parse_hey(out, target_rps=rate)


def fixed_count(
    url: str, body_file: Path, *, count: int, connections: int, core: int | None, timeout: float
) -> LoadResult:
    """``count`` requests (rounded up to a multiple of ``connections``) with hey."""
    count += -count % connections
    out = _hey(["-n", str(count), "-c", str(connections)], url, body_file, core, timeout=timeout)
    return _parse_hey(out, target_rps=None)
