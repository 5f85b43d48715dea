"""The pod-start bench's shaped link (bench.shaper) really shapes: measured round-trip time and
rate are within 20% of the setting, and the bench reports a missed expectation as missed.

The link is a child process forwarding to a real TCP server on 127.0.0.1; the test measures what
a client sees through it: ping-pong round trips of one byte, and the time to receive 4 MB.
"""

from __future__ import annotations

import socket
import socketserver
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from bench.shaper import ShapedLink

PAYLOAD = 4 * 1024 * 1024


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            command = self.request.recv(1)
            if not command:
                return
            if command == b"p":  # ping: one byte back
                self.request.sendall(b"p")
            elif command == b"d":  # download
                self.request.sendall(b"x" * PAYLOAD)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _rtt(address: str, n: int = 15) -> float:
    with _connect(address) as sock:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            sock.sendall(b"p")
            assert sock.recv(1) == b"p"
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rate_mbit(address: str) -> float:
    with _connect(address) as sock:
        started = time.perf_counter()
        sock.sendall(b"d")
        got = 0
        while got < PAYLOAD:
            chunk = sock.recv(1 << 16)
            assert chunk, "the link closed early"
            got += len(chunk)
        return PAYLOAD * 8 / (time.perf_counter() - started) / 1e6


@pytest.mark.parametrize(("rtt_ms", "mbit"), [(40, 50), (100, 20)], ids=["40ms-50M", "100ms-20M"])
def test_the_link_adds_the_round_trip_time_and_caps_the_rate(server, rtt_ms, mbit):
    direct = _rtt(server)
    with ShapedLink(server, rtt_ms=rtt_ms, mbit=mbit) as link:
        rtt = _rtt(link.address) - direct
        rate = _rate_mbit(link.address)
    print(f"\nset {rtt_ms} ms / {mbit} Mbit/s: measured {rtt * 1000:.1f} ms / {rate:.1f} Mbit/s")
    assert abs(rtt * 1000 - rtt_ms) <= 0.2 * rtt_ms, f"RTT {rtt * 1000:.1f} ms"
    # The first round trip of the download (request + first byte) is part of what is timed.
    expected = PAYLOAD * 8 / (PAYLOAD * 8 / (mbit * 1e6) + rtt_ms / 1000) / 1e6
    assert abs(rate - expected) <= 0.2 * expected, f"{rate:.1f} Mbit/s, expected {expected:.1f}"


def test_unshaped_the_same_download_is_much_faster(server):
    """The shaping is the link's doing, not the test server's."""
    assert _rate_mbit(server) > 200


def test_a_missed_expectation_is_reported_as_missed():
    """The bench's verdicts come from its figures: a (b)/(a) ratio under 5x, an upstream-down
    pod that ran anyway and a slow admission are each reported MISSED, and exit non-zero."""
    from bench.podstart import Results, expectations, report

    good = Results(rtt_ms=40, mbit=50)
    good.starts[100] = {"a": [16.0] * 5, "b": [1.9] * 5, "c": [17.0] * 5}
    good.starts[100] |= {"a_down": [None], "b_down": [1.8]}
    good.admission = {"without": [0.004] * 200, "with": [0.006] * 200}
    assert all(e.ok for e in expectations(good)), report(good)
    assert "8.42" not in report(good) and "0.12" in report(good)  # b/a printed as a ratio

    bad = Results(rtt_ms=40, mbit=50)
    bad.starts[100] = {"a": [6.0] * 5, "b": [2.0] * 5, "a_down": [5.0], "b_down": [None]}
    bad.admission = {"without": [0.004] * 200, "with": [0.004] * 190 + [0.030] * 10}
    lines = report(bad).splitlines()
    assert "(b) vs (a), 100 MB: at least 5x faster: MISSED (3.0x)" in lines
    assert "upstream down, 100 MB: (a) fails, (b) runs: MISSED ((a) ran 1/1, (b) ran 0/1)" in lines
    assert "admission overhead p99: under 10 ms: MISSED (26.0 ms)" in lines
    # A run that never got the pod Running is not averaged away.
    flaky = Results(rtt_ms=40, mbit=50)
    flaky.starts[100] = {"a": [16.0, None], "b": [1.0, 1.0]}
    assert [e.got for e in expectations(flaky)][0] == "not measured"
