"""Hostile and buggy AdmissionReviews, and a client that sends them to `serve` as raw HTTP/1.1.

The strategies (hypothesis) cover what a buggy client or an attacker sends: type confusion in
every field mirrorgate reads, annotations that are not strings, deep nesting, thousands of
containers, duplicate keys, megabyte images, non-printable text, and odd but valid pods. Each
body travels plain, gzip, deflate, as broken gzip, as a gzip bomb, with a Content-Length or
chunked. ``check_answer`` states what every answer must be: a 200 that is a valid AdmissionReview
for the same uid whose patch applies (and leaves a pod the API server accepts), or a one-line 400.

Used by tests/e2e/test_fuzz.py (bounded, seeded) and by ``python -m bench.fuzz`` (the long run).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gzip
import json
import ssl
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
from hypothesis import strategies as st

UID = "fuzz-uid"
ENCODINGS = ("identity", "gzip", "deflate", "broken-gzip", "gzip-bomb", "gzip-of-nothing")
WARNING_MAX = 512
WARNINGS_TOTAL_MAX = 4096

# --- bodies ---------------------------------------------------------------------------------------
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_names = st.text(st.characters(codec="utf-8"), min_size=0, max_size=20)
_images = st.one_of(
    st.sampled_from(
        [
            "nginx:1.25",
            "docker.io/library/redis:7@sha256:" + "a" * 64,
            "ghcr.io/acme/app:v1",
            "127.0.0.1:31000/library/nginx:1.25",
            "Prom/Statsd:v1",
            "",
            "a" * 300,
        ]
    ),
    st.text(max_size=60),
    st.integers(min_value=1, max_value=3).map(lambda n: "x" * (n * 700_000)),  # megabyte images
    st.text(st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=20),  # control chars
)


def _container(image: Any, name: Any = "app") -> dict[str, Any]:
    return {"name": name, "image": image}


@st.composite
def _pod(draw: st.DrawFn) -> dict[str, Any]:
    """A pod whose every field mirrorgate reads is either right or type-confused."""

    def maybe(good: Any) -> Any:
        return draw(st.one_of(st.just(good), _junk)) if draw(st.booleans()) else good

    containers = draw(
        st.lists(
            st.one_of(
                st.builds(_container, _images, _names),
                _junk,
            ),
            max_size=6,
        )
    )
    annotations = draw(
        st.one_of(
            st.dictionaries(_names, st.text(max_size=30), max_size=3),
            st.dictionaries(_names, _junk, max_size=3),
            st.just({"mirrorgate.io/original-images": "{not json"}),
            st.just({"mirrorgate.io/skip": "true"}),
            _junk,
        )
    )
    spec: dict[str, Any] = {
        "containers": maybe(containers),
        "initContainers": maybe(draw(st.lists(st.builds(_container, _images), max_size=2))),
        "imagePullSecrets": draw(
            st.one_of(
                st.none(),
                st.lists(st.fixed_dictionaries({"name": _names}), max_size=2),
                st.lists(_junk, max_size=3),
                _junk,
            )
        ),
        "volumes": draw(
            st.one_of(st.none(), st.lists(st.fixed_dictionaries({"name": _names}), max_size=2))
        ),
    }
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": maybe({"name": maybe("web"), "annotations": annotations}),
        "spec": maybe(spec),
    }
    return pod


def review(obj: Any, *, operation: Any = "CREATE", old: Any = None, kind: Any = "Pod") -> Any:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": operation,
            "namespace": "team-a",
            "object": obj,
            "oldObject": old,
        },
    }


@st.composite
def _confused_review(draw: st.DrawFn) -> Any:
    """The envelope itself type-confused: any field may be junk."""
    doc = review(draw(_pod()))
    path = draw(
        st.sampled_from(
            [
                ("kind",),
                ("request",),
                ("request", "uid"),
                ("request", "kind"),
                ("request", "resource"),
                ("request", "operation"),
                ("request", "namespace"),
                ("request", "object"),
                ("request", "oldObject"),
                ("request", "dryRun"),
                ("request", "subResource"),
            ]
        )
    )
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = draw(_junk)
    return doc


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def _many_containers(n: int) -> Any:
    return review({"spec": {"containers": [_container(f"img{i}:v1", f"c{i}") for i in range(n)]}})


def _duplicate_keys(body: bytes) -> bytes:
    # JSON parsers keep the last of duplicate keys: the uid and the object twice, differing.
    return body.replace(b'"uid":', b'"uid":"first","uid":', 1).replace(
        b'"object":', b'"object":{"spec":{"containers":[]}},"object":', 1
    )


BODY_KINDS = (
    "pod",
    "confused",
    "update",
    "ephemeral",
    "nested",
    "many",
    "duplicates",
    "not-json",
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(kind, body) of one hostile or odd review."""
    kind = draw(st.sampled_from(BODY_KINDS))
    if kind == "pod":
        doc: Any = review(draw(_pod()))
    elif kind == "confused":
        doc = draw(_confused_review())
    elif kind == "update":
        doc = review(draw(_pod()), operation="UPDATE", old=draw(_pod()))
    elif kind == "ephemeral":
        doc = review(
            {"ephemeralContainers": draw(st.lists(st.builds(_container, _images), max_size=3))},
            operation="UPDATE",
            kind="EphemeralContainers",
            old=draw(st.one_of(st.none(), _junk)),
        )
        doc["request"]["subResource"] = "ephemeralcontainers"
    elif kind == "nested":
        doc = review(
            {"spec": {"containers": [_container(_nested(draw(st.sampled_from([300, 2000]))))]}}
        )
    elif kind == "many":
        doc = _many_containers(draw(st.sampled_from([999, 1001, 10_000])))
    elif kind == "duplicates":
        return kind, _duplicate_keys(json.dumps(review(draw(_pod()))).encode())
    else:
        return kind, draw(st.binary(max_size=200))
    try:
        return kind, json.dumps(doc).encode()
    except (ValueError, RecursionError):
        return kind, b"[" * 5000


def encode(body: bytes, encoding: str) -> tuple[bytes, str | None]:
    """(wire bytes, Content-Encoding header) for ``encoding`` in ENCODINGS."""
    if encoding == "gzip":
        return gzip.compress(body), "gzip"
    if encoding == "deflate":
        return zlib.compress(body), "deflate"
    if encoding == "broken-gzip":
        return gzip.compress(body)[:-9] + b"garbage!", "gzip"
    if encoding == "gzip-of-nothing":
        return body, "gzip"  # a header that lies about a plain body
    if encoding == "gzip-bomb":
        return BOMB, "gzip"
    return body, None


def _bomb() -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(z.compress(block) for _ in range(256)) + z.flush()  # 256 MiB of zeros


BOMB = _bomb()


# --- sending -------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float


async def send(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    path: str,
    body: bytes,
    *,
    encoding: str | None,
    chunked: bool,
    timeout: float = 10.0,
) -> Answer:
    """POST ``body`` over a new TLS connection as raw HTTP/1.1; the status, the body, and the
    seconds from the last byte sent to the answer read."""
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
    try:
        head = [f"POST {path} HTTP/1.1", "Host: mirrorgate", "Content-Type: application/json"]
        head.append("Connection: close")
        if encoding:
            head.append(f"Content-Encoding: {encoding}")
        if chunked:
            head.append("Transfer-Encoding: chunked")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            for i in range(0, len(body), 64 << 10):
                piece = body[i : i + (64 << 10)]
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            writer.write(b"0\r\n\r\n")
        else:
            head.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        # The server may refuse early and close: its answer is still readable.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        # From here on the time is the server's, not this client's writing (one event loop
        # sends many bodies at once, some of megabytes).
        started = time.monotonic()
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        status = int(status_line.split()[1])
        length = None
        while (line := await asyncio.wait_for(reader.readline(), timeout)) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        data = await asyncio.wait_for(
            reader.readexactly(length) if length is not None else reader.read(), timeout
        )
        return Answer(status, data, time.monotonic() - started)
    finally:
        writer.close()


# --- what every answer must be --------------------------------------------------------------------
@dataclass
class Tally:
    """Counts of a fuzz run by category; ``problems`` holds the first few violations."""

    answers: dict[str, int] = field(default_factory=dict)
    slow: int = 0
    worst: float = 0.0
    problems: list[str] = field(default_factory=list)

    def count(self, key: str) -> None:
        self.answers[key] = self.answers.get(key, 0) + 1

    def fail(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


def check_answer(
    kind: str, body: bytes, answer: Answer, tally: Tally, *, limit: float = 1.0
) -> None:
    """Record ``answer`` to ``body`` (as sent before any encoding) and every way it breaks the
    rules (see the module docstring)."""
    tally.count(f"{kind} -> {answer.status}")
    tally.worst = max(tally.worst, answer.seconds)
    if answer.seconds > limit:
        tally.slow += 1
        tally.fail(f"{kind}: answered in {answer.seconds:.2f}s")
    if answer.status == 400:
        text = answer.body.decode(errors="replace").strip()
        if "\n" in text or not text:
            tally.fail(f"{kind}: 400 without a one-line reason: {text[:200]!r}")
        return
    if answer.status != 200:
        tally.fail(f"{kind}: HTTP {answer.status}: {answer.body[:300]!r}")
        return
    try:
        doc = json.loads(answer.body)
        response = doc["response"]
        assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
        assert isinstance(response["allowed"], bool)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        tally.fail(f"{kind}: a 200 that is not an AdmissionReview ({err!r}): {answer.body[:200]!r}")
        return
    warnings = response.get("warnings") or []
    if any(len(w) > WARNING_MAX or not w.isprintable() for w in warnings) or (
        sum(map(len, warnings)) > WARNINGS_TOTAL_MAX
    ):
        tally.fail(f"{kind}: warnings past the API server's limits: {warnings[:2]!r}")
    message = (response.get("status") or {}).get("message", "")
    if len(message) > 8192:
        tally.fail(f"{kind}: a {len(message)}-character denial message")
    if "patch" not in response:
        return
    try:
        request = json.loads(body)["request"]
    except (ValueError, KeyError, TypeError) as err:
        tally.fail(f"{kind}: patched, but the request does not parse ({err!r})")
        return
    if response.get("uid") != request.get("uid"):
        tally.fail(f"{kind}: answer uid {response.get('uid')!r} for {request.get('uid')!r}")
    try:
        ops = json.loads(base64.b64decode(response["patch"]))
        patched = jsonpatch.apply_patch(copy.deepcopy(request["object"]), ops)
    except Exception as err:  # noqa: BLE001 - any failure to apply is the finding
        tally.fail(f"{kind}: the patch does not apply ({err!r})")
        return
    secrets = (patched.get("spec") or {}).get("imagePullSecrets")
    # LocalObjectReference: an object whose name, if any, is a string (an empty one is valid).
    if secrets is not None and not all(
        isinstance(s, dict) and isinstance(s.get("name", ""), str) for s in secrets
    ):
        tally.fail(f"{kind}: the patched pod has imagePullSecrets {secrets!r}")
