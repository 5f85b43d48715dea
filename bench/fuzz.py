"""``python -m bench.fuzz``: the long run of hostile input against `mirrorgate serve`.

What tests/e2e/test_fuzz.py checks in a few hundred examples, at scale, with figures:

- ``bodies``: ``--count`` generated reviews (tests/helpers/hostile.py: type confusion, deep
  nesting, thousands of containers, duplicate keys, megabyte images; plain, gzip, deflate,
  broken gzip, gzip bombs; Content-Length or chunked) to /mutate and /validate over TLS, with
  mirror verification, a pull secret and the gate on: answers by status, 5xx, answers over 1 s,
  rule violations, p50/p99/max, and RSS; then the same number of normal reviews against a fresh
  server, and the two RSS figures compared (hostile within 20% of normal is the target);
- ``idle``: 2,000 idle TLS connections held open, then a normal admission, timed;
- ``slowloris``: 500 connections sending their headers a byte a second, then a normal admission;
- ``sigterm``: SIGTERM while 8 clients send admissions, with --shutdown-delay: every request
  answered, readiness 503 during the delay, exit code;
- ``rotation``: the certificate files replaced 50 times in place under load, with
  --cert-reload-interval 0.05: failed handshakes and requests.

Everything runs on 127.0.0.1 and is stopped by PID at the end. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.bodies import CATALOG, MIRROR_PREFIXES, admission_review, encode, mirror_repository, pod
from bench.stack import (
    PinnedServer,
    choose_cores,
    mirrorgate_server,
    start_backends,
    write_config,
    write_serving_pki,
)
from mirrorgate.certs.pki import generate_ca, issue_serving
from tests.helpers.hostile import ENCODINGS, Answer, Tally, bodies, check_answer, send
from tests.helpers.hostile import encode as encode_hostile

PARTS = ("bodies", "idle", "slowloris", "sigterm", "rotation")
CONCURRENCY = 8


def progress(text: str) -> None:
    print(f"[fuzz] {text}", file=sys.stderr, flush=True)


def context(server: PinnedServer) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=server.ca_pem.decode())


def normal_body(i: int) -> bytes:
    return encode(admission_review(pod("5c"), uid=f"normal-{i}"))


async def admit(server: PinnedServer, ctx: ssl.SSLContext, uid: str = "probe") -> Answer:
    return await send(
        "127.0.0.1",
        server.port,
        ctx,
        "/mutate?timeout=10s",
        encode(admission_review(pod("1c"), uid=uid)),
        encoding=None,
        chunked=False,
    )


# --- bodies ---------------------------------------------------------------------------------
def run_bodies(server: PinnedServer, count: int) -> dict[str, Any]:
    ctx = context(server)
    tally = Tally()
    seconds: list[float] = []
    batch: list[tuple[str, bytes, str, bool, str]] = []

    async def flush() -> None:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(kind: str, body: bytes, encoding: str, chunked: bool, path: str) -> None:
            wire, header = encode_hostile(body, encoding)
            async with sem:
                try:
                    answer = await send(
                        "127.0.0.1",
                        server.port,
                        ctx,
                        f"{path}?timeout=10s",
                        wire,
                        encoding=header,
                        chunked=chunked,
                    )
                except (OSError, TimeoutError, ValueError, IndexError) as err:
                    tally.fail(f"{path} {kind} {encoding}: no answer ({err!r})")
                    return
            seconds.append(answer.seconds)
            check_answer(f"{path} {kind}", body, answer, tally)

        await asyncio.gather(*(one(*item) for item in batch))
        batch.clear()

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=bodies(),
        encoding=st.sampled_from(ENCODINGS),
        chunked=st.booleans(),
        path=st.sampled_from(["/mutate", "/validate"]),
    )
    def generate(case: tuple[str, bytes], encoding: str, chunked: bool, path: str) -> None:
        batch.append((case[0], case[1], encoding, chunked, path))
        if len(batch) >= 200:
            asyncio.run(flush())
            if len(seconds) % 2000 < 200:
                progress(f"{len(seconds)} bodies, RSS {server.rss_mb():.0f} MiB")

    started = time.monotonic()
    generate()
    asyncio.run(flush())
    statuses: dict[str, int] = {}
    for key, n in tally.answers.items():
        status = key.rsplit(" ", 1)[-1]
        statuses[status] = statuses.get(status, 0) + n
    qs = statistics.quantiles(seconds, n=100) if len(seconds) > 1 else [0.0] * 99
    return {
        "bodies": len(seconds),
        "statuses": statuses,
        "5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "over_1s": tally.slow,
        "p50_ms": round(qs[49] * 1000, 1),
        "p99_ms": round(qs[98] * 1000, 1),
        "max_ms": round(tally.worst * 1000, 1),
        "problems": tally.problems,
        "by_category": dict(sorted(tally.answers.items())),
        "seconds": round(time.monotonic() - started, 1),
        "rss_mib": round(server.rss_mb(), 1),
    }


def run_normal(server: PinnedServer, count: int) -> dict[str, Any]:
    ctx = context(server)
    failures: list[int] = []

    async def go() -> None:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with sem:
                answer = await send(
                    "127.0.0.1",
                    server.port,
                    ctx,
                    "/mutate?timeout=10s",
                    normal_body(i),
                    encoding=None,
                    chunked=False,
                )
            if answer.status != 200:
                failures.append(answer.status)

        for start in range(0, count, 1000):
            await asyncio.gather(*(one(i) for i in range(start, min(count, start + 1000))))

    asyncio.run(go())
    return {"normal": count, "failures": len(failures), "rss_mib": round(server.rss_mb(), 1)}


# --- connections ----------------------------------------------------------------------------
def run_idle(server: PinnedServer, connections: int = 2000) -> dict[str, Any]:
    ctx = context(server)

    async def go() -> dict[str, Any]:
        writers = []
        for _ in range(connections):
            try:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", server.port, ssl=ctx), 5
                )
            except (OSError, TimeoutError):
                break
            writers.append(w)
        answer = await admit(server, ctx)
        still = sum(not w.transport.is_closing() for w in writers)
        for w in writers:
            w.close()
        return {
            "idle_opened": len(writers),
            "idle_still_open": still,
            "admission_status": answer.status,
            "admission_ms": round(answer.seconds * 1000, 1),
        }

    return asyncio.run(go())


def run_slowloris(server: PinnedServer, connections: int = 500) -> dict[str, Any]:
    ctx = context(server)

    async def go() -> dict[str, Any]:
        writers = []
        for _ in range(connections):
            try:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", server.port, ssl=ctx), 5
                )
            except (OSError, TimeoutError):
                break
            w.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\n")
            writers.append(w)

        async def trickle() -> None:
            for _ in range(40):
                await asyncio.sleep(1)
                for w in writers:
                    if not w.transport.is_closing():
                        w.write(b"X")

        task = asyncio.create_task(trickle())
        await asyncio.sleep(1)
        answer = await admit(server, ctx)
        open_at = {}
        for second in (10, 35):
            await asyncio.sleep(second - (10 if second == 35 else 1))
            open_at[f"open_after_{second}s"] = sum(not w.transport.is_closing() for w in writers)
        task.cancel()
        for w in writers:
            w.close()
        return {
            "slow_opened": len(writers),
            **open_at,
            "admission_status": answer.status,
            "admission_ms": round(answer.seconds * 1000, 1),
        }

    return asyncio.run(go())


def run_sigterm(server: PinnedServer) -> dict[str, Any]:
    ctx = context(server)
    statuses: dict[int, int] = {}
    errors: list[str] = []
    ready: dict[int, int] = {}

    async def client(i: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            try:
                answer = await admit(server, ctx, uid=f"term-{i}-{n}")
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
            except (OSError, TimeoutError, ValueError, IndexError) as err:
                if not stop.is_set():
                    errors.append(repr(err))
            n += 1

    async def readiness(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                code = int((await reader.readline()).split()[1])
                ready[code] = ready.get(code, 0) + 1
                writer.close()
            except (OSError, ValueError, IndexError):
                pass
            await asyncio.sleep(0.1)

    async def go() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(i, stop)) for i in range(CONCURRENCY)]
        tasks.append(asyncio.create_task(readiness(stop)))
        await asyncio.sleep(1)
        server._process.send_signal(signal.SIGTERM)  # noqa: SLF001 - the bench owns it
        await asyncio.sleep(2.5)  # inside --shutdown-delay 3
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(go())
    code = server._process.wait(timeout=30)  # noqa: SLF001
    return {"answers": statuses, "lost": len(errors), "readyz": ready, "exit_code": code}


def run_rotation(server: PinnedServer, pki_dir: Path) -> dict[str, Any]:
    ctx = context(server)
    ca_pem = server.ca_pem
    failures: list[str] = []
    answered = 0

    async def go() -> None:
        nonlocal answered
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    answer = await admit(server, ctx)
                    answered += answer.status == 200
                    if answer.status != 200:
                        failures.append(f"HTTP {answer.status}")
                except (OSError, ssl.SSLError, TimeoutError, ValueError, IndexError) as err:
                    failures.append(repr(err))

        tasks = [asyncio.create_task(load()) for _ in range(CONCURRENCY)]
        ca = ROTATION_CA
        for _ in range(50):
            pair = issue_serving(ca, ["127.0.0.1", "localhost"], days=1)
            (pki_dir / "tls.key").write_bytes(pair.key_pem)
            (pki_dir / "tls.crt").write_bytes(pair.cert_pem)
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)

    assert ca_pem
    asyncio.run(go())
    return {"requests_ok": answered, "failed": len(failures), "examples": failures[:3]}


ROTATION_CA = generate_ca("mirrorgate-fuzz-rotation-ca", days=2)


# --- the run --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz",
        description="Hostile input against mirrorgate serve at scale; see bench/README.md.",
    )
    parser.add_argument("--count", type=int, default=24_000, help="hostile bodies (24000)")
    parser.add_argument(
        "--normal",
        type=int,
        default=None,
        help="normal reviews for the RSS comparison (default: --count)",
    )
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    parts = args.only or list(PARTS)
    out: dict[str, Any] = {}
    # As bench.run: serve on one core, this process (the clients, registry, Clair) on the other.
    cores = choose_cores()
    if cores.load is not None:
        os.sched_setaffinity(0, {cores.load})
    out["cores"] = cores.describe()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="mirrorgate-fuzz-") as tmp:
        work = Path(tmp)
        progress("starting docker-registry and the Clair stand-in")
        backends = start_backends(work / "backends")
        stack.callback(backends.close)
        # The normal pods' images, on the mirror with clean reports: those admissions pass.
        for image in backends.push([(*mirror_repository(c.written), c.multi) for c in CATALOG]):
            for manifest in image.manifests:
                backends.clair.set_report(manifest, {})
        config = write_config(backends, work / "mirrorgate.yaml", prefixes=MIRROR_PREFIXES)
        # Budgets under a second, so that every answer must leave within one.
        doc = json.loads(config.read_text())
        doc["verifyTimeout"] = "500ms"
        doc["scan"]["admissionBudget"] = "800ms"
        config.write_text(json.dumps(doc))

        def serve(name: str, *extra: str) -> tuple[PinnedServer, Path]:
            pki = write_serving_pki(work / name / "pki")
            if name == "rotation":
                pair = issue_serving(ROTATION_CA, ["127.0.0.1", "localhost"], days=1)
                pki.cert_file.write_bytes(pair.cert_pem)
                pki.key_file.write_bytes(pair.key_pem)
                pki = type(pki)(ROTATION_CA.cert_pem, pki.cert_file, pki.key_file)
            server = mirrorgate_server(
                work / name,
                config_file=config,
                pki=pki,
                core=cores.server,
                log_level="warning",
                args=extra,
            )
            server.start()
            stack.callback(server.stop)
            return server, pki.cert_file.parent

        runners: dict[str, Callable[[], dict[str, Any]]] = {}
        if "bodies" in parts:

            def both() -> dict[str, Any]:
                hostile_server, _ = serve("hostile")
                progress(f"{args.count} hostile bodies")
                hostile = run_bodies(hostile_server, args.count)
                normal_server, _ = serve("normal")
                progress(f"{args.normal or args.count} normal reviews")
                normal = run_normal(normal_server, args.normal or args.count)
                ratio = hostile["rss_mib"] / normal["rss_mib"]
                return {"hostile": hostile, "normal": normal, "rss_ratio": round(ratio, 2)}

            runners["bodies"] = both
        runners["idle"] = lambda: run_idle(serve("idle")[0])
        runners["slowloris"] = lambda: run_slowloris(serve("slowloris")[0])
        runners["sigterm"] = lambda: run_sigterm(serve("sigterm", "--shutdown-delay", "3")[0])

        def rotation() -> dict[str, Any]:
            server, pki_dir = serve("rotation", "--cert-reload-interval", "0.05")
            return run_rotation(server, pki_dir)

        runners["rotation"] = rotation
        for part in parts:
            progress(part)
            out[part] = runners[part]()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for part, figures in out.items():
            print(f"{part}: {json.dumps(figures, indent=None)[:2000]}")
    hostile = out.get("bodies", {}).get("hostile", {})
    ok = not hostile.get("5xx") and not hostile.get("over_1s") and not hostile.get("problems")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
