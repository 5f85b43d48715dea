"""`mirrorgate serve` against clients that hold connections, trickle bytes or stop it under load.

Each test runs the real console script over TLS, as a user runs it, and asserts what the API
server (the well-behaved client) would notice: answers within a second, never a reset.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorgate.devtools.localcluster import free_port
from tests.helpers.admission import pod, review
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.pki import make_ca

CONFIG = 'mirrors: [{upstream: docker.io, mirror: "127.0.0.1:31000", verify: false}]\n'


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, ctx: ssl.SSLContext) -> None:
        self.proc, self.port, self.ctx = proc, port, ctx
        # Drained as it is written: a full pipe (64 KiB of log lines) would block serve's
        # event loop in write(2) and look like a hang of serve itself.
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.append(line)

    def stderr(self) -> str:
        """Everything serve wrote to stderr; after it exited, all of it."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=10)
        return "".join(self._lines)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.ctx)

    async def mutate(self, uid: str = "u1", *, timeout: float = 1.0) -> int:
        """One admission on a fresh connection; its HTTP status (raises after ``timeout``)."""
        body = review(pod(), uid=uid)

        async def go() -> int:
            reader, writer = await self.connect()
            writer.write(
                b"POST /mutate?timeout=10s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status = int((await reader.readline()).split()[1])
            await reader.read()
            writer.close()
            return status

        return await asyncio.wait_for(go(), timeout)

    async def get(self, path: str) -> int:
        reader, writer = await self.connect()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = int((await reader.readline()).split()[1])
        await reader.read()
        writer.close()
        return status


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def start(*flags: str, open_files: int | None = None) -> Served:
        ca = make_ca(tmp_path / "ca")
        issued = ca.issue(tmp_path / "tls")
        config = tmp_path / "mirrorgate.yaml"
        config.write_text(CONFIG)
        port = free_port()

        def limit() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        proc = subprocess.Popen(
            [
                mirrorgate_exe(),
                "serve",
                "--config",
                str(config),
                "--tls-cert",
                str(issued.cert_file),
                "--tls-key",
                str(issued.key_file),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                "off",
                *flags,
            ],
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit,
        )
        procs.append(proc)
        ctx = ssl.create_default_context(cadata=ca.pem.decode())
        served = Served(proc, port, ctx)
        deadline = time.monotonic() + 15
        while True:
            try:
                if asyncio.run(served.get("/readyz")) == 200:
                    return served
            except OSError:
                pass
            assert proc.poll() is None, served.stderr()
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


async def _open_idle(served: Served, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        try:
            _, writer = await asyncio.wait_for(served.connect(), 2)
        except (OSError, TimeoutError):
            break
        writers.append(writer)
    return writers


def test_idle_connections_past_the_open_file_limit_never_lock_out_the_api_server(serve):
    """With 256 open files, 400 idle TLS connections: the cap keeps descriptors free and closes
    idle connections to make room, so a real admission is answered within a second (on c698f4d
    idle connections used up the descriptors and every new connection was reset)."""
    served = serve(open_files=256)

    async def attack() -> tuple[int, float, int]:
        idle = await _open_idle(served, 400)
        started = time.monotonic()
        status = await served.mutate(timeout=1.0)
        elapsed = time.monotonic() - started
        for w in idle:
            w.close()
        return status, elapsed, len(idle)

    status, elapsed, opened = asyncio.run(attack())
    assert status == 200 and elapsed < 1.0
    assert opened >= 128  # the attack really reached the cap (256 - 128 reserved)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=20) == 0
    log = [json.loads(line) for line in served.stderr().splitlines() if line.strip()]
    assert any(line["msg"] == "connection cap lowered to fit the open-file limit" for line in log)


def test_connections_that_never_finish_their_headers_are_closed_at_the_idle_timeout(serve):
    """Slowloris: 200 connections each sending a byte of headers a second stay open for
    --idle-timeout at most (on c698f4d they were all open after 120 s), while admissions go on."""
    served = serve("--idle-timeout", "2")

    async def attack() -> tuple[int, int]:
        slow = await _open_idle(served, 200)
        for w in slow:
            w.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\n")
        closed_by_server = 0

        async def trickle(w: asyncio.StreamWriter) -> bool:
            for _ in range(6):
                await asyncio.sleep(1)
                if w.is_closing():
                    return True
                w.write(b"X")
                try:
                    await w.drain()
                except ConnectionError:
                    return True
            return w.transport.is_closing()

        trickling = asyncio.gather(*(trickle(w) for w in slow))
        assert await served.mutate(timeout=1.0) == 200
        results = await trickling
        closed_by_server = sum(results)
        for w in slow:
            w.close()
        return closed_by_server, len(slow)

    closed, opened = asyncio.run(attack())
    assert opened == 200 and closed == opened


def test_a_body_that_trickles_in_is_a_400_after_five_seconds(serve):
    served = serve()

    async def slow_body() -> tuple[bytes, float]:
        reader, writer = await served.connect()
        writer.write(
            b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{"
        )
        started = time.monotonic()
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return line, time.monotonic() - started

    line, elapsed = asyncio.run(slow_body())
    assert line.startswith(b"HTTP/1.1 400") and 4.5 < elapsed < 7


def test_sigterm_under_load_drains_with_readiness_off_and_loses_no_request(serve):
    """--shutdown-delay: after SIGTERM /readyz is 503 and admissions keep being answered until
    the delay ends; then the process exits 0 and no request was lost or failed."""
    served = serve("--shutdown-delay", "1.5")

    async def load() -> tuple[list[int], list[int]]:
        statuses: list[int] = []
        ready: list[int] = []
        served.proc.send_signal(signal.SIGTERM)
        for i in range(50):  # the signal is handled by the event loop, soon but not at once
            statuses.append(await served.mutate(f"w{i}", timeout=2))
            if await served.get("/readyz") == 503:
                break
        stop = time.monotonic() + 0.8
        i = 0
        while time.monotonic() < stop:
            statuses.append(await served.mutate(f"u{i}", timeout=2))
            ready.append(await served.get("/readyz"))
            i += 1
        return statuses, ready

    statuses, ready = asyncio.run(load())
    assert served.proc.wait(timeout=30) == 0
    assert len(ready) >= 3 and set(ready) == {503}
    assert set(statuses) == {200}
    log = [json.loads(line) for line in served.stderr().splitlines() if line.strip()]
    messages = [line["msg"] for line in log]
    assert messages.index("draining: readiness fails, still serving") < messages.index("stopped")
