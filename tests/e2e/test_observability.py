"""What operators see: pull failures counted from real Events, a real Prometheus firing the
rejection alert after a real denial, and a dashboard that only queries metrics that exist."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mirrorgate.devtools.demo import LocalWebhook
from mirrorgate.devtools.localcluster import free_port
from tests.helpers.admission import pod_review as review
from tests.helpers.admission import write_gate_config as write_config
from tests.helpers.kubehttp import KubeHTTP
from tests.helpers.registries import push_image

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "monitoring" / "mirrorgate.rules.yml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "mirrorgate-dashboard.json"


def scrape(webhook: LocalWebhook) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{webhook.metrics_port}/metrics") as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def failed_pull_event(ns: str, name: str, image: str, tail: str, count: int = 1) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ns},
        "involvedObject": {"kind": "Pod", "namespace": ns, "name": "web", "apiVersion": "v1"},
        "reason": "Failed",
        "type": "Warning",
        "count": count,
        "source": {"component": "kubelet", "host": "node-1"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "message": f'Failed to pull image "{image}": rpc error: code = NotFound desc = failed to '
        f'pull and unpack image "{image}": {tail}',
    }


def test_kubelet_pull_failures_are_counted_once_per_occurrence(control_plane, tmp_path):
    kapi = KubeHTTP(control_plane.url, control_plane.admin_token, str(control_plane.ca_file))
    ns = f"e2e-obs-{secrets.token_hex(3)}"
    kapi.create_namespace(ns)
    config = tmp_path / "mirrorgate.yaml"
    config.write_text(
        'mirrors: [{upstream: docker.io, mirror: "127.0.0.1:31000", verify: false}]\n'
    )
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", token=control_plane.admin_token
    )
    env = {"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": ns, "POD_NAME": "obs-0"}
    mirror_image = "127.0.0.1:31000/library/nginx:1.25"
    events = f"/api/v1/namespaces/{ns}/events"
    with LocalWebhook(tmp_path / "serve", config, env=env, args=["--lease-duration", "3"]) as wh:
        # Probe until the leader's watch is live: Events older than the watch are a baseline.
        probes = iter(range(1000))

        def live() -> bool:
            kapi.request(
                "POST",
                events,
                failed_pull_event(
                    ns, f"probe-{next(probes)}", "quay.io/x/y:1", "quay.io/x/y:1: not found"
                ),
            )
            time.sleep(0.3)
            return (
                sample(
                    scrape(wh), "mirrorgate_image_pull_failures_total", kind="upstream_not_found"
                )
                > 0
            )

        wait_for(live, "the pull-failure watch")
        created = kapi.request(
            "POST",
            events,
            failed_pull_event(
                ns, "web.1", mirror_image, "127.0.0.1:31000/library/nginx:1.25: not found"
            ),
        )
        assert created.status == 201, created.body

        def count() -> float:
            return sample(
                scrape(wh),
                "mirrorgate_image_pull_failures_total",
                namespace=ns,
                registry="127.0.0.1:31000",
                kind="mirror_not_found",
            )

        wait_for(lambda: count() == 1, "the first failure to be counted", 10)
        # The kubelet repeats the same Event with count 4: three more failures, not four.
        patched = kapi.request(
            "PATCH", f"{events}/web.1", {"count": 4}, content_type="application/merge-patch+json"
        )
        assert patched.status == 200
        wait_for(lambda: count() == 4, "the repeats to be counted", 10)
        time.sleep(0.5)
        assert count() == 4


@pytest.fixture
def prometheus(tmp_path):
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: apt-get install prometheus (scripts/setup does)"
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> str:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{RULES}]\n"
            "scrape_configs:\n"
            "  - job_name: mirrorgate\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    exe,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, "prometheus to be ready")
        return url

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=20)


def alerts(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=5) as r:
        return json.loads(r.read())["data"]["alerts"]


def test_a_denied_admission_fires_the_rejection_alert_in_a_real_prometheus(
    prometheus, clair, htpasswd_registry, tmp_path
):
    tag = secrets.token_hex(4)
    digest = push_image(htpasswd_registry, "obs/vulnerable", tag)
    clair.set_report(digest, "trimmed")
    config = write_config(tmp_path, clair, htpasswd_registry)
    with LocalWebhook(tmp_path / "serve", config) as wh:
        url = prometheus(wh.metrics_port)
        wait_for(lambda: [t for t in _targets(url) if t["health"] == "up"], "the scrape target")
        assert not [
            a for a in alerts(url) if a["labels"]["alertname"] == "MirrorgateImagesRejected"
        ]

        image = f"{htpasswd_registry.host}/obs/vulnerable:{tag}"
        ctx = ssl.create_default_context(cadata=wh.ca_pem.decode())
        req = urllib.request.Request(
            f"{wh.url}/validate?timeout=10s",
            method="POST",
            data=json.dumps(review(image, namespace="payments")).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=ctx, timeout=15) as r:
            assert json.loads(r.read())["response"]["allowed"] is False

        def firing() -> list[dict]:
            return [
                a
                for a in alerts(url)
                if a["labels"]["alertname"] == "MirrorgateImagesRejected" and a["state"] == "firing"
            ]

        (alert,) = wait_for(firing, "MirrorgateImagesRejected to fire", 30)
        assert alert["labels"]["namespace"] == "payments" and alert["labels"]["reason"] == "fail"
        assert (
            alert["annotations"]["summary"] == "mirrorgate rejected 1 image(s) in payments (fail)"
        )


def _targets(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as r:
        return json.loads(r.read())["data"]["activeTargets"]


def test_every_dashboard_query_uses_metrics_a_live_serve_exposes(tmp_path):
    config = tmp_path / "mirrorgate.yaml"
    config.write_text(
        'mirrors: [{upstream: docker.io, mirror: "127.0.0.1:31000", verify: false}]\n'
    )
    with LocalWebhook(tmp_path / "serve", config) as wh:
        text = scrape(wh)
    exposed = set()
    for name in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        base, kind = name
        exposed |= {base}
        if kind == "counter":
            exposed |= {base + "_total"}
        if kind == "histogram":
            exposed |= {base + "_bucket", base + "_count", base + "_sum"}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        m
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for m in re.findall(r"\b(mirrorgate_[a-z_]+)", target["expr"])
    }
    assert len(dashboard["panels"]) >= 8
    assert used and used <= exposed, f"dashboard queries unknown metrics: {sorted(used - exposed)}"
