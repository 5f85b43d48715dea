"""Cluster DNS for a local node: `<service>.<namespace>.svc.<domain>` answered from the API.

Owns `ClusterDNS`, a small authoritative DNS server (UDP, standard library only) that a
`LocalNode` started with `cluster_services=True` runs on its node IP and names as the kubelet's
`clusterDNS`. A real cluster runs CoreDNS for this; here nothing may be downloaded, and pods only
need what the deployer relies on: Service names (`http://registry.<ns>.svc:5000`) resolving to
ClusterIPs, which kube-proxy then translates to pod addresses.

What it answers, for names in `svc.<domain>`:

- `A` for `<service>.<namespace>.svc.<domain>`: the Service's ClusterIP, or for a headless
  Service (clusterIP `None`) the ready addresses of its Endpoints; TTL 5 s, so a re-created
  Service is seen almost at once.
- any other type for an existing name (`AAAA` first of all, which glibc asks next to `A`):
  NOERROR without answers, so resolvers use the `A` record instead of waiting.
- everything else, inside or outside the domain: NXDOMAIN at once. Pods here reach nothing
  beyond this machine, and an immediate answer lets resolvers walk their search list (pods
  query `registry.ns.svc.<pod-ns>.svc.cluster.local` and `registry.ns.svc.svc.cluster.local`
  before `registry.ns.svc.cluster.local`) without a timeout.

The lookup itself is a callable (`lookup(namespace, name) -> addresses | None`), asked on every
query: always current, and a Service created a moment ago resolves. Answers are small (a few A
records), so UDP without truncation is enough; there is no TCP listener.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = "cluster.local"
TTL_SECONDS = 5
# DNS wire format (RFC 1035): header flags, record types, response codes.
_QR = 0x8000
_AA = 0x0400
_RD = 0x0100
_OPCODE_MASK = 0x7800
TYPE_A = 1
CLASS_IN = 1
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
# At most this many A records in one answer: 12 + question + 16 bytes each stays below 512.
MAX_ANSWERS = 24

# (namespace, service name) -> its addresses, or None when there is no such Service.
Lookup = Callable[[str, str], Sequence[str] | None]


class DNSFormatError(ValueError):
    """A query that is not a well-formed DNS question."""


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower case, without the trailing dot
    qtype: int
    qclass: int
    end: int  # offset just past the question in the query


def parse_question(query: bytes) -> tuple[int, int, Question]:
    """(id, flags, the first question) of a DNS query; DNSFormatError when malformed."""
    if len(query) < 12:
        raise DNSFormatError("shorter than a DNS header")
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & _QR or qdcount < 1:
        raise DNSFormatError("not a query with a question")
    labels = []
    offset = 12
    while True:
        if offset >= len(query):
            raise DNSFormatError("name runs past the end")
        length = query[offset]
        offset += 1
        if length == 0:
            break
        # Compression pointers (0xC0) never appear in a question's first name.
        if length > 63 or offset + length > len(query):
            raise DNSFormatError("bad label")
        labels.append(query[offset : offset + length].decode("ascii", "replace").lower())
        offset += length
    if offset + 4 > len(query):
        raise DNSFormatError("question without type and class")
    qtype, qclass = struct.unpack("!HH", query[offset : offset + 4])
    return ident, flags, Question(".".join(labels), qtype, qclass, offset + 4)


def build_response(
    query: bytes, ident: int, flags: int, question: Question, rcode: int, addresses: Sequence[str]
) -> bytes:
    """The answer to `query`: its header and question echoed, then one A record per address."""
    answers = [a for a in addresses if ipaddress.ip_address(a).version == 4][:MAX_ANSWERS]
    out_flags = _QR | _AA | (flags & (_OPCODE_MASK | _RD)) | rcode
    header = struct.pack("!HHHHHH", ident, out_flags, 1, len(answers), 0, 0)
    body = query[12 : question.end]
    for address in answers:
        # 0xC00C: a pointer to the question's name, right after the 12-byte header.
        body += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL_SECONDS, 4)
        body += socket.inet_aton(address)
    return header + body


def answer(query: bytes, lookup: Lookup, *, domain: str = DEFAULT_DOMAIN) -> bytes | None:
    """The response to one query; None for something that is not even a DNS header."""
    try:
        ident, flags, question = parse_question(query)
    except DNSFormatError:
        if len(query) < 12:
            return None
        ident, flags = struct.unpack("!HH", query[:4])
        return struct.pack("!HHHHHH", ident, _QR | (flags & _RD) | RCODE_FORMERR, 0, 0, 0, 0)
    if flags & _OPCODE_MASK:  # only standard queries (opcode 0)
        return build_response(query, ident, flags, question, RCODE_NOTIMP, ())
    zone = f"svc.{domain}"
    parts = question.name.removesuffix(f".{zone}").split(".")
    if not question.name.endswith(f".{zone}") or len(parts) != 2 or not all(parts):
        return build_response(query, ident, flags, question, RCODE_NXDOMAIN, ())
    service, namespace = parts
    try:
        addresses = lookup(namespace, service)
    except Exception as err:  # noqa: BLE001 - the API is unreachable: say so, keep serving
        log.warning("cluster DNS: looking up %s failed: %s", question.name, err)
        return build_response(query, ident, flags, question, RCODE_SERVFAIL, ())
    if addresses is None:
        return build_response(query, ident, flags, question, RCODE_NXDOMAIN, ())
    wanted = question.qtype == TYPE_A and question.qclass == CLASS_IN
    return build_response(query, ident, flags, question, RCODE_NOERROR, addresses if wanted else ())


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        data, sock = self.request
        response = answer(data, self.server.lookup, domain=self.server.domain)
        if response is not None:
            sock.sendto(response, self.client_address)


class _Server(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], lookup: Lookup, domain: str) -> None:
        self.lookup = lookup
        self.domain = domain
        super().__init__(address, _Handler)


class ClusterDNS:
    """The DNS server on `host:port` for as long as it runs (a thread of this process).

    `start()` binds the socket (port 53 needs root) and returns once it answers; `stop()` closes
    it. Nothing outside this process changes: the socket goes with the process.
    """

    def __init__(
        self, lookup: Lookup, *, host: str, port: int = 53, domain: str = DEFAULT_DOMAIN
    ) -> None:
        self.lookup = lookup
        self.host = host
        self.port = port
        self.domain = domain
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the cluster DNS server is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("this ClusterDNS was already started")
        self._server = _Server((self.host, self.port), self.lookup, self.domain)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"cluster-dns-{self.host}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the socket. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
