"""The Kubernetes access layer: where the client comes from, and how a watch survives.

The end-to-end tests drive every watch against the real API server. What a fresh local server
never does on cue (end a watch with 410 Gone, fail mid-stream) is scripted here, at the one seam
the watch thread uses: a list call and a streaming watch call.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest

from mirrorgate.devtools.localcluster import free_port
from mirrorgate.webhook.adapters import kube as kube_module
from mirrorgate.webhook.adapters.kube import (
    Kube,
    KubeConfigError,
    KubeError,
    SyncKube,
    load_api_client,
)
from tests.helpers.commands import mirrorgate_exe
from tests.helpers.pki import make_ca


def test_outside_a_cluster_the_client_comes_from_kubeconfig(tmp_path, monkeypatch):
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    client = load_api_client()
    try:
        assert client.configuration.host == "https://127.0.0.1:6443"
        assert client.configuration.auth_settings()["BearerToken"]["value"] == "Bearer t0ken"
    finally:
        client.close()


def test_without_a_cluster_or_a_kubeconfig_the_error_names_both(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(KubeConfigError, match="not in a cluster .* kubeconfig .*missing"):
        load_api_client()


def test_serve_with_a_pull_secret_source_and_no_api_access_refuses_to_start(tmp_path):
    ca = make_ca(tmp_path / "ca")
    issued = ca.issue(tmp_path / "tls")
    config = tmp_path / "mirrorgate.yaml"
    config.write_text("pullSecret: {name: mirrorgate-pull, source: mirrorgate/registry-pull}\n")
    r = subprocess.run(
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
            f"127.0.0.1:{free_port()}",
            "--metrics-listen",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "missing"), "HOME": "/"},
    )
    assert r.returncode == 2, r.stderr
    assert "no Kubernetes API access" in r.stderr and "missing" in r.stderr


def test_an_api_status_gives_the_error_its_reason_and_message():
    body = json.dumps({"kind": "Status", "reason": "Forbidden", "message": "no, not you"})
    err = KubeError.from_body(403, body)
    assert (err.status, err.reason, err.message) == (403, "Forbidden", "no, not you")
    assert KubeError.from_body(502, b"<html>bad gateway</html>").reason == ""


class Stream:
    """A watch response: JSON lines, or an HTTP status without a stream."""

    def __init__(self, *events: dict[str, Any], status: int = 200) -> None:
        self.status = status
        self.response = self
        self.chunks = [json.dumps(e).encode() + b"\n" for e in events]

    def read(self) -> bytes:
        return b""

    def stream(self, amt: int, decode_content: bool = True):
        # Split each line in two: a chunk boundary inside a line must not matter.
        for chunk in self.chunks:
            yield chunk[:7]
            yield chunk[7:]

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def obj(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": version}}


def page(*items: dict[str, Any], version: str, more: str = "") -> dict[str, Any]:
    meta = {"resourceVersion": version, **({"continue": more} if more else {})}
    return {"items": list(items), "metadata": meta}


class ScriptedKube(SyncKube):
    """Answers list and watch calls from a script, in order; then fails until closed."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.requests: list[tuple[str, dict[str, str]]] = []

    def _next(self) -> Any:
        step = self.script.pop(0) if self.script else KubeError(0, "network", "script done")
        if isinstance(step, Exception):
            raise step
        return step

    def request(self, method: str, path: str, *, query: Any = None, **_: Any) -> Any:
        self.requests.append(("list", dict(query or {})))
        return self._next()

    def open(self, method: str, path: str, *, query: Any = None, **_: Any) -> Any:
        self.requests.append(("watch", dict(query or {})))
        return self._next()


async def test_a_watch_pages_its_list_resumes_after_the_stream_ends_and_relists_when_gone(
    monkeypatch,
):
    monkeypatch.setattr(kube_module, "WATCH_BACKOFF_INITIAL", 0.01)
    a, b, c = obj("a", "9"), obj("b", "10"), obj("c", "12")
    scripted = ScriptedKube(
        [
            page(a, version="10", more="next-page"),
            page(b, version="11"),
            Stream(
                {"type": "ADDED", "object": c},
                {"type": "BOOKMARK", "object": obj("", "15")},
            ),  # the server ended the stream: watch again from 15
            Stream({"type": "ERROR", "object": {"kind": "Status", "code": 410}}),
            page(a, c, version="20"),
            Stream(status=410),  # too old before the stream even started
            page(c, version="30"),
            KubeError(0, "network", "connection reset"),  # back off, resume from 30
            Stream({"type": "DELETED", "object": obj("c", "31")}),
        ]
    )
    kube = Kube(scripted)
    restarts: list[str] = []
    watch = kube.watch("/api/v1/secrets", query={"fieldSelector": "x"}, on_restart=restarts.append)
    watch.start()
    events = [await asyncio.wait_for(anext(watch), 5) for _ in range(5)]
    await watch.close()

    assert [
        (e.type, [o["metadata"]["name"] for o in e.objects] or e.obj["metadata"]["name"])
        for e in events
    ] == [
        ("RELIST", ["a", "b"]),
        ("ADDED", "c"),
        ("RELIST", ["a", "c"]),
        ("RELIST", ["c"]),
        ("DELETED", "c"),
    ]
    lists = [q for kind, q in scripted.requests if kind == "list"]
    assert lists[:2] == [
        {"fieldSelector": "x", "limit": "500"},
        {"fieldSelector": "x", "limit": "500", "continue": "next-page"},
    ]
    watched_from = [q["resourceVersion"] for kind, q in scripted.requests if kind == "watch"]
    assert watched_from[:5] == ["11", "15", "20", "30", "30"]
    assert all(
        q["fieldSelector"] == "x" and q["watch"] == "true" and q["allowWatchBookmarks"] == "true"
        for kind, q in scripted.requests
        if kind == "watch"
    )
    assert restarts[:3] == ["gone", "gone", "error"]


async def test_a_projected_watch_hands_over_only_the_projection_of_listed_and_watched_objects():
    big = {"metadata": {"name": "a", "resourceVersion": "9"}, "spec": {"huge": "x" * 10_000}}
    scripted = ScriptedKube(
        [page(big, version="10"), Stream({"type": "MODIFIED", "object": dict(big)})]
    )
    watch = Kube(scripted).watch(
        "/api/v1/pods", project=lambda o: {"metadata": o["metadata"], "size": len(str(o))}
    )
    watch.start()
    events = [await asyncio.wait_for(anext(watch), 5) for _ in range(2)]
    await watch.close()
    assert events[0].type == "RELIST" and set(events[0].objects[0]) == {"metadata", "size"}
    assert events[1].type == "MODIFIED" and set(events[1].obj) == {"metadata", "size"}
