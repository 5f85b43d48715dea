"""The listening socket: how many connections, how long a handshake may take, and how serve stops.

aiohttp's ``TCPSite`` has no connection limit and waits a minute for a TLS handshake, so a few
thousand idle or half-open connections would use up the process's file descriptors and leave the
API server's own connections reset. ``Listener`` owns the socket instead:

- at most ``max_connections`` connections: when a new one would pass the cap, the connections that
  are idle between requests are closed first, oldest first (a client that holds connections open
  without using them loses them, one that sends admissions does not); when every connection is
  busy the new one is closed at once and a warning says so (at most once a minute);
- a TLS handshake must finish within ``handshake_timeout``; slow or absent headers and idle
  keep-alive connections end at aiohttp's keep-alive timeout (``http.server_options``) and a
  slow body at ``http.BODY_TIMEOUT``;
- ``raise_open_files_limit`` lifts the soft open-file limit to the hard one at start and sizes the
  cap below it; running out of descriptors anyway is logged as one clear line per minute, not
  asyncio's traceback per accept.

Draining: ``ServeStatus.draining`` turns ``/readyz`` to 503 and every answer to
``Connection: close`` while serve keeps answering for ``--shutdown-delay`` seconds, so that
endpoints move to the other replicas before the socket closes (``cli._serve``).
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mirrorgate.webhook.infra.logs import get_logger

log = get_logger("listener")
HANDSHAKE_TIMEOUT = 10.0
# Descriptors left for everything else: registry and API server connections, files, watches.
RESERVED_FDS = 128
WARN_INTERVAL = 60.0


@dataclass(slots=True)
class ServeStatus:
    """What serve is doing, for readiness and for the connection cap."""

    draining: bool = False
    # Connections with a request in progress (the middleware below keeps it; aiohttp's
    # RequestHandler has __slots__ and no weak references, and each leaves when answered).
    busy: set[Any] = field(default_factory=set)


STATUS = web.AppKey("serve_status", ServeStatus)


@web.middleware
async def track_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Marks the connection busy while a request is handled; closes it after the answer while
    serve drains."""
    status = request.app[STATUS]
    protocol = request.protocol
    status.busy.add(protocol)
    try:
        response = await handler(request)
    finally:
        status.busy.discard(protocol)
    if status.draining:
        response.force_close()
    return response


def raise_open_files_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the connection cap that fits under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    fits = max(16, soft - RESERVED_FDS)
    if wanted > fits:
        log.warning(
            "connection cap lowered to fit the open-file limit",
            extra={"fields": {"max_connections": fits, "asked": wanted, "open_files": soft}},
        )
        return fits
    return wanted


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Listener:
    """One TLS listening socket for ``runner``'s server, with the limits above."""

    def __init__(
        self,
        runner: web.AppRunner,
        status: ServeStatus,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.runner = runner
        self.status = status
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.base_events.Server | None = None
        self._warned = 0.0
        self.refused = 0
        self.closed_idle = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self.host,
            self.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.handshake_timeout if self.ssl_context else None,
            backlog=min(self.max_connections, socket.SOMAXCONN),
            reuse_address=True,
        )

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server else []

    async def stop(self) -> None:
        """Stop accepting; the runner's cleanup then ends the open connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self.runner.server
        assert server is not None, "the runner is set up before the listener starts"
        open_now = server.connections
        if len(open_now) >= self.max_connections:
            idle = [c for c in open_now if c not in self.status.busy]
            for conn in idle[: len(open_now) - self.max_connections + 1]:
                conn.force_close()
                self.closed_idle += 1
            if len(idle) < len(open_now) - self.max_connections + 1:
                self.refused += 1
                self._warn(len(open_now))
                return _Refused()
        return server()

    def _warn(self, open_now: int) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_INTERVAL:
            self._warned = now
            log.warning(
                "connection limit reached: every connection is busy, refusing new ones",
                extra={
                    "fields": {
                        "open": open_now,
                        "max_connections": self.max_connections,
                        "refused_so_far": self.refused,
                    }
                },
            )


class FdExhaustionReporter:
    """A loop exception handler that turns "out of file descriptors" into one clear line a
    minute; everything else goes to the default handler."""

    def __init__(self) -> None:
        self._last = 0.0
        self.seen = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.seen += 1
            now = time.monotonic()
            if now - self._last >= WARN_INTERVAL:
                self._last = now
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                log.error(
                    "out of file descriptors: new connections are not accepted; raise the "
                    "open-file limit or lower --max-connections",
                    extra={"fields": {"open_files_limit": soft, "errors": self.seen}},
                )
            return
        loop.default_exception_handler(context)
