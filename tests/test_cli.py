"""The `mirrorgate` command through its installed entry point, as a user runs it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.commands import mirrorgate_exe
from tests.helpers.pki import make_ca

CONFIG = """\
mirrors:
  - {upstream: docker.io, mirror: "127.0.0.1:31000"}
  - {upstream: ghcr.io, mirror: registry.example.org/ghcr}
skip: ["registry.example.org/*"]
pullSecret: {name: mirrorgate-pull}
"""


def mirrorgate(*args, stdin=None, env=None, timeout=30):
    exe = mirrorgate_exe()
    return subprocess.run(
        [exe, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "mirrorgate.yaml"
    path.write_text(CONFIG)
    return path


def test_rewrite_prints_one_line_per_image_in_order(config):
    r = mirrorgate("rewrite", "--config", config, "nginx:1.25", "quay.io/a/b", "ghcr.io/o/app:v1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "127.0.0.1:31000/library/nginx:1.25",
        "quay.io/a/b",
        "registry.example.org/ghcr/o/app:v1",
    ]


def test_rewrite_json_explains_each_decision(config):
    r = mirrorgate(
        "rewrite",
        "--config",
        config,
        "--json",
        "nginx",
        "registry.example.org/x/y:1",
        "registry.example.org/ghcr/x/y:1",
    )
    assert r.returncode == 0
    assert json.loads(r.stdout) == [
        {
            "input": "nginx",
            "normalized": "docker.io/library/nginx",
            "rewritten": "127.0.0.1:31000/library/nginx",
            "reason": "rewritten",
        },
        {
            "input": "registry.example.org/x/y:1",
            "normalized": "registry.example.org/x/y:1",
            "rewritten": "registry.example.org/x/y:1",
            "reason": "skipped",
        },
        {
            "input": "registry.example.org/ghcr/x/y:1",
            "normalized": "registry.example.org/ghcr/x/y:1",
            "rewritten": "registry.example.org/ghcr/x/y:1",
            "reason": "already-mirrored",
        },
    ]


def test_rewrite_of_an_invalid_reference_errors_for_that_input_and_exits_1(config):
    r = mirrorgate("rewrite", "--config", config, "nginx", "Bad/Repo:x", "redis")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "127.0.0.1:31000/library/nginx",
        "Bad/Repo:x",
        "127.0.0.1:31000/library/redis",
    ]
    assert "Bad/Repo:x" in r.stderr and "lowercase" in r.stderr


def test_rewrite_reads_images_from_stdin(config):
    r = mirrorgate("rewrite", "--config", config, "-", stdin="nginx\n\nalpine:3\n")
    assert r.stdout.splitlines() == [
        "127.0.0.1:31000/library/nginx",
        "127.0.0.1:31000/library/alpine:3",
    ]


def test_a_broken_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "mirrors:\n  - {upstream: docker.io, mirror: ok.io}\n  - {upstream: ghcr.io, mirror: 'https://x'}\n"
    )
    r = mirrorgate("rewrite", "--config", bad, "nginx")
    assert r.returncode == 2
    assert "mirrors[1].mirror" in r.stderr and "Traceback" not in r.stderr


def test_a_missing_config_says_how_to_pass_one(tmp_path):
    r = subprocess.run(
        [mirrorgate_exe(), "rewrite", "nginx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"} | _pyenv(),
    )
    assert r.returncode == 2 and "--config" in r.stderr


def _pyenv():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("MIRRORGATE_CONFIG",)}


def test_review_of_a_pod_manifest_prints_the_response_and_the_patched_pod(config, tmp_path):
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n"
        "spec:\n  containers:\n  - {name: app, image: 'nginx:1.25'}\n"
        "  - {name: bad, image: 'UPPER:1'}\n"
    )
    r = mirrorgate("review", "--config", config, manifest)
    assert r.returncode == 0, r.stderr
    review, patched = list(yaml.safe_load_all(r.stdout))
    assert review["response"]["allowed"] is True and review["response"]["patchType"] == "JSONPatch"
    assert patched["spec"]["containers"][0]["image"] == "127.0.0.1:31000/library/nginx:1.25"
    assert patched["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    assert "Warning: mirrorgate:" in r.stderr and "UPPER:1" in r.stderr


def test_review_rewrites_an_image_volume_like_a_container_image(tmp_path):
    """The issue's reproduction: on c698f4d only the container image was rewritten."""
    cfg = tmp_path / "mirrorgate.yaml"
    cfg.write_text(
        "mirrors: [{upstream: quay.io, mirror: mirror.example.org/quay, verify: false}]\n"
        "pullSecret: {name: mirrorgate-pull}\n"
    )
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n"
        "spec:\n  containers:\n  - {name: app, image: 'quay.io/x/app:1'}\n"
        "  volumes: [{name: v, image: {reference: 'quay.io/x/y:v2'}}]\n"
    )
    r = mirrorgate("review", "--config", cfg, manifest)
    assert r.returncode == 0, r.stderr
    _, patched = list(yaml.safe_load_all(r.stdout))
    assert patched["spec"]["containers"][0]["image"] == "mirror.example.org/quay/x/app:1"
    assert patched["spec"]["volumes"] == [
        {"name": "v", "image": {"reference": "mirror.example.org/quay/x/y:v2"}}
    ]
    assert patched["spec"]["imagePullSecrets"] == [{"name": "mirrorgate-pull"}]
    originals = json.loads(patched["metadata"]["annotations"]["mirrorgate.io/original-images"])
    assert originals == {"app": "quay.io/x/app:1", "volume/v": "quay.io/x/y:v2"}


def test_prewarm_from_manifests_finds_image_volumes_and_checks_platform_flags(tmp_path):
    cfg = tmp_path / "mirrorgate.yaml"
    cfg.write_text("mirrors: []\n")
    k8s = tmp_path / "k8s"
    k8s.mkdir()
    (k8s / "job.yaml").write_text(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  template:\n    spec:\n"
        "      containers: [{name: a, image: 'quay.io/x/app:1'}]\n"
        "      volumes: [{name: m, image: {reference: 'quay.io/x/models:v2'}},\n"
        "                {name: e, emptyDir: {}}]\n"
    )
    r = mirrorgate("prewarm", "--config", cfg, "--from-manifests", k8s)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "quay.io/x/app:1: skipped (no-mirror)",
        "quay.io/x/models:v2: skipped (no-mirror)",
    ]
    bad = mirrorgate("prewarm", "--config", cfg, "--platform", "amd64", "nginx")
    assert bad.returncode == 2 and "--platform 'amd64' is not a platform os/arch" in bad.stderr


def test_review_reads_an_admission_review_as_json_from_stdin(config):
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-9",
            "kind": {"kind": "Pod"},
            "resource": {"resource": "pods"},
            "operation": "CREATE",
            "namespace": "kube-system",
            "object": {"kind": "Pod", "spec": {"containers": [{"name": "a", "image": "nginx"}]}},
        },
    }
    r = mirrorgate("review", "--config", config, "-o", "json", "-", stdin=json.dumps(body))
    out = json.loads(r.stdout)
    assert out["review"]["response"] == {"uid": "u-9", "allowed": True}
    assert out["patched"]["spec"]["containers"][0]["image"] == "nginx"


def test_review_refuses_a_deployment_with_a_reason(config, tmp_path):
    manifest = tmp_path / "deploy.yaml"
    manifest.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
    r = mirrorgate("review", "--config", config, manifest)
    assert r.returncode == 2 and "Pods only" in r.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_to_start_on_a_bad_config(tmp_path):
    ca = make_ca(tmp_path / "ca")
    issued = ca.issue(tmp_path / "tls")
    bad = tmp_path / "bad.yaml"
    bad.write_text("namespaces: {mode: sometimes}\n")
    r = mirrorgate(
        "serve",
        "--config",
        bad,
        "--tls-cert",
        issued.cert_file,
        "--tls-key",
        issued.key_file,
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert r.returncode == 2 and "namespaces.mode" in r.stderr


def test_serve_refuses_a_missing_certificate(config, tmp_path):
    r = mirrorgate(
        "serve",
        "--config",
        config,
        "--tls-cert",
        tmp_path / "none.crt",
        "--tls-key",
        tmp_path / "none.key",
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert r.returncode == 2 and "none.crt" in r.stderr and "cannot read" in r.stderr


def test_serve_answers_logs_json_and_stops_cleanly_on_sigterm(config, tmp_path):
    import ssl
    import urllib.request

    ca = make_ca(tmp_path / "ca")
    issued = ca.issue(tmp_path / "tls")
    port, mport = free_port(), free_port()
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
            f"127.0.0.1:{mport}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ctx = ssl.create_default_context(cadata=ca.pem.decode())
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=ctx) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics") as r:
            assert b"mirrorgate_certificate_expiry_timestamp_seconds" in r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    assert rc == 0
    lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.strip()]
    messages = [line["msg"] for line in lines]
    assert "serving" in messages and "stopped" in messages


def test_help_explains_every_command():
    r = mirrorgate("--help")
    for cmd in ("serve", "rewrite", "review", "demo"):
        assert cmd in r.stdout
    r = mirrorgate("serve", "--help")
    assert "--tls-cert" in r.stdout and "kube-system" in r.stdout


def test_python_dash_m_runs_the_same_cli(config):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirrorgate.webhook.cli",
            "rewrite",
            "--config",
            str(config),
            "nginx",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert r.stdout.strip() == "127.0.0.1:31000/library/nginx"


def test_demo_is_a_plugin_and_without_devtools_says_how_to_get_it(monkeypatch, capsys):
    """The runtime package carries no demo: mirrorgate-devtools registers it. Where that is not
    installed (the container image), `mirrorgate demo` says what to do instead of a traceback."""
    import importlib.metadata

    from mirrorgate.webhook import cli

    installed = [e.name for e in importlib.metadata.entry_points(group=cli.PLUGIN_GROUP)]
    assert installed == ["demo"]  # the checkout's scripts/setup installs devtools/

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "mirrorgate demo: the demo is development tooling" in err
    assert "scripts/setup" in err
    assert "(not installed)" in cli.build_parser().format_help()


def test_scan_running_explains_what_it_needs(tmp_path):
    cfg = tmp_path / "mirrorgate.yaml"
    cfg.write_text("scan: {clair: {url: 'http://127.0.0.1:9', pskFile: /nonexistent}}\n")
    both = mirrorgate("scan", "--config", str(cfg), "--running", "nginx:1")
    assert both.returncode == 2 and "give no IMAGE" in both.stderr
    none = mirrorgate("scan", "--config", str(cfg))
    assert none.returncode == 2 and "--running" in none.stderr
    # No kubeconfig and not in a cluster: the reason, never a traceback.
    away = mirrorgate(
        "scan", "--config", str(cfg), "--running", env={"KUBECONFIG": str(tmp_path / "none")}
    )
    assert away.returncode == 2, away.stderr
    assert "--running needs Kubernetes API access" in away.stderr
    assert "Traceback" not in away.stderr
