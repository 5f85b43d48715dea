"""A shaped link in user space: a TCP forwarder that adds latency and caps the rate.

    python -m bench.shaper --listen 10.0.0.1:5001 --target 127.0.0.1:5000 --rtt-ms 40 --mbit 50

The pod-start bench (bench.podstart) puts the "upstream" registry behind it, so that pulling
from the upstream costs what it costs over a WAN. The natural tool, `tc qdisc ... netem`, is not
available on this kind of machine: its kernel has no sch_netem ("Specified qdisc kind is
unknown"), so the link is emulated here, with netem's model:

- every chunk read on one side is delivered to the other side ``rtt / 2`` after it arrived
  (a delay line: the delay adds latency but, as on a real link, does not lower throughput,
  because chunks in flight overlap);
- each direction is one link of ``mbit`` Mbit/s shared by every connection (a chunk takes
  ``bytes * 8 / rate`` seconds on it, queued behind the chunks before it).

Runs until SIGTERM/SIGINT; prints ``listening on HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

CHUNK = 16 * 1024


class Link:
    """One direction: a delay line in front of a shared, rate-limited wire."""

    def __init__(self, *, delay: float, rate_bps: float) -> None:
        self.delay = delay
        self.rate = rate_bps / 8.0  # bytes per second
        self._free_at = 0.0  # when the wire has sent everything queued so far

    def departure(self, arrived: float, size: int) -> float:
        """When a chunk of ``size`` bytes that arrived at ``arrived`` has crossed the link."""
        start = max(arrived + self.delay, self._free_at)
        self._free_at = start + size / self.rate
        return self._free_at


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    loop = asyncio.get_running_loop()
    queue: deque[tuple[float, bytes]] = deque()
    ready = asyncio.Event()
    done = False

    async def deliver() -> None:
        while True:
            while not queue:
                if done:
                    return
                ready.clear()
                await ready.wait()
            due, data = queue.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.append((link.departure(loop.time(), len(data)), data))
            ready.set()
            # Back-pressure: don't read further ahead than a second of the link.
            while len(queue) * CHUNK > link.rate and not sender.done():
                await asyncio.sleep(0.005)
    except (ConnectionError, OSError):
        pass
    finally:
        done = True
        ready.set()
        with contextlib.suppress(ConnectionError, OSError):
            await sender
            if writer.can_write_eof():
                writer.write_eof()


async def serve(
    listen: tuple[str, int], target: tuple[str, int], *, rtt: float, rate_bps: float
) -> None:
    up = Link(delay=rtt / 2, rate_bps=rate_bps)
    down = Link(delay=rtt / 2, rate_bps=rate_bps)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pump(client_r, server_w, up), _pump(server_r, client_w, down))
        except asyncio.CancelledError:
            pass  # the link is being stopped: connections just end
        finally:
            for w in (client_w, server_w):
                with contextlib.suppress(Exception):
                    w.close()

    server = await asyncio.start_server(handle, *listen, limit=CHUNK * 4)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        server.close()
        current = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT (port 0: any)")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time added")
    parser.add_argument("--mbit", type=float, default=50.0, help="rate per direction, Mbit/s")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.target, rtt=args.rtt_ms / 1000, rate_bps=args.mbit * 1e6))


class ShapedLink:
    """``python -m bench.shaper`` as a child process, stopped by its PID."""

    def __init__(
        self, target: str, *, listen_host: str = "127.0.0.1", rtt_ms: float, mbit: float
    ) -> None:
        self.target = target
        self.listen_host = listen_host
        self.rtt_ms = rtt_ms
        self.mbit = mbit
        self.address = ""
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> ShapedLink:
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.shaper",
                "--listen",
                f"{self.listen_host}:0",
                "--target",
                self.target,
                "--rtt-ms",
                str(self.rtt_ms),
                "--mbit",
                str(self.mbit),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"bench.shaper did not start: {line!r}")
        self.address = line.removeprefix("listening on ")
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def __enter__(self) -> ShapedLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
