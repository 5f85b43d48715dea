"""Hostile input against a real `mirrorgate serve` over TLS: never a 5xx, a hang or a leak.

serve runs as a user runs it, with mirror verification (a real registry), a pull secret and the
vulnerability gate (the Clair stand-in) on. Hypothesis generates the bodies (tests/helpers/
hostile.py: type confusion in every field, deep nesting, thousands of containers, duplicate
keys, megabyte images) and sends each plain, gzip, deflate, as broken gzip, as a 256 MiB gzip
bomb, with a Content-Length or chunked, to /mutate and /validate. Bounded (a few hundred
examples) and seeded (derandomized), so CI runs the same inputs every time; `python -m bench.fuzz`
is the long run.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorgate.devtools.demo import LocalWebhook
from tests.helpers.admission import write_gate_config
from tests.helpers.hostile import ENCODINGS, Tally, bodies, check_answer, encode, send
from tests.helpers.registries import push_image

EXAMPLES = 300


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def served(tmp_path, clair, htpasswd_registry):
    digest = push_image(htpasswd_registry, "library/nginx", "1.25")
    clair.set_report(digest, "alpine")
    # Budgets under a second: every answer must leave within one, whatever registry or Clair do.
    config = write_gate_config(
        tmp_path / "config", clair, htpasswd_registry, "  admissionBudget: 800ms\n"
    )
    host = htpasswd_registry.host
    # The gate's config plus mirrors that verify against the same registry, and a pull secret.
    config.write_text(
        f'mirrors:\n  - {{upstream: docker.io, mirror: "{host}"}}\n'
        f'  - {{upstream: ghcr.io, mirror: "{host}/ghcr"}}\n'
        "pullSecret: {name: mirrorgate-pull}\nverifyTimeout: 500ms\n" + config.read_text()
    )
    with LocalWebhook(tmp_path / "serve", config, log_level="warning") as webhook:
        yield webhook


def test_hostile_reviews_never_get_a_5xx_a_slow_answer_or_a_broken_patch(served):
    ctx = ssl.create_default_context(cadata=served.ca_pem.decode())
    tally = Tally()
    pid = served.process.pid

    async def one(kind: str, body: bytes, encoding: str, chunked: bool, path: str) -> None:
        wire, header = encode(body, encoding)
        answer = await send(
            "127.0.0.1",
            served.port,
            ctx,
            f"{path}?timeout=10s",
            wire,
            encoding=header,
            chunked=chunked,
        )
        check_answer(kind, body, answer, tally)

    asyncio.run(one("warm-up", b"{}", "identity", False, "/mutate"))
    before = rss_mib(pid)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        case=bodies(),
        encoding=st.sampled_from(ENCODINGS),
        chunked=st.booleans(),
        path=st.sampled_from(["/mutate", "/validate"]),
    )
    def fuzz(case: tuple[str, bytes], encoding: str, chunked: bool, path: str) -> None:
        kind, body = case
        asyncio.run(one(f"{path} {kind} {encoding}", body, encoding, chunked, path))

    fuzz()
    first = rss_mib(pid)
    fuzz()  # the same inputs again (derandomized): what a leak would add, a high-water mark not
    after = rss_mib(pid)
    assert not tally.problems, "\n".join(tally.problems)
    assert not any(key.endswith(("-> 500", "-> 502", "-> 503")) for key in tally.answers)
    assert tally.worst < 1.0, tally.worst
    assert after - first < 15, f"RSS {before:.0f} -> {first:.0f} -> {after:.0f} MiB"
    assert first < 250, f"RSS {before:.0f} -> {first:.0f} MiB over {EXAMPLES} reviews"
    statuses = {key.rsplit(" ", 1)[-1] for key in tally.answers}
    assert statuses == {"200", "400"}, tally.answers  # both kinds of answer were exercised
    assert served.process.poll() is None  # and serve is still up
