"""Small waits and port picks the end-to-end tests share."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable


def node_ports(count: int) -> list[int]:
    """Free loopback ports in the API server's NodePort range: a node reaches a NodePort on
    127.0.0.1, so the registries run exactly where the rewritten references point."""
    found: list[int] = []
    while len(found) < count:
        port = random.randint(30000, 32767)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in found:
            found.append(port)
    return found


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
