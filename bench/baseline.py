"""The baseline server: the floor mirrorgate runs on.

The same aiohttp stack as ``mirrorgate serve`` (``web.Application`` with the same body limit,
``AppRunner`` without access log, ``TCPSite`` with the TLS context ``webhook.server.tls`` builds)
whose handler only parses the AdmissionReview and answers ``allowed: true`` with its uid, on every
path mirrorgate serves. Whatever mirrorgate costs beyond this is mirrorgate's own.

    python -m bench.baseline --tls-cert F --tls-key F --listen 127.0.0.1:PORT [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from mirrorgate.webhook.core.reviews import MAX_BODY_BYTES
from mirrorgate.webhook.server.tls import load_pair

API_VERSION = "admission.k8s.io/v1"


async def handle_review(request: web.Request) -> web.Response:
    doc = json.loads(await request.read())
    uid = doc["request"]["uid"]
    answer = {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": True},
    }
    return web.Response(
        body=json.dumps(answer, separators=(",", ":")).encode(), content_type="application/json"
    )


async def handle_health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def create_baseline_app() -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1)
    app.router.add_post("/mutate", handle_review)
    app.router.add_post("/validate", handle_review)
    app.router.add_get("/readyz", handle_health)
    app.router.add_get("/healthz", handle_health)
    return app


async def serve(host: str, port: int, cert: str, key: str) -> None:
    _info, ssl_context = load_pair(Path(cert), Path(key))
    runner = web.AppRunner(create_baseline_app(), shutdown_timeout=15, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--tls-cert", required=True)
    parser.add_argument("--tls-key", required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop (to compare event loops)"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    coro = serve(host, int(port), args.tls_cert, args.tls_key)
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
