"""`mirrorgate demo`, run as a newcomer runs it: through the installed command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import kubernetes.client
import kubernetes.config

from tests.helpers.commands import mirrorgate_exe


def processes_under(workdir: Path) -> list[int]:
    """PIDs of live processes whose command line mentions ``workdir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if str(workdir) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_demo_shows_before_and_after_and_leaves_nothing_running(tmp_path):
    workdir = tmp_path / "demo"
    r = subprocess.run(
        [mirrorgate_exe(), "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    rows = {
        tuple(line.split()[:3])
        for line in out.splitlines()
        if line.startswith(("shop/", "legacy/"))
    }
    mirror = next(
        line.split()[2] for line in out.splitlines() if line.startswith("shop/storefront")
    )
    host = mirror.split("/")[0]
    assert ("shop/storefront", "nginx:1.25.3", f"{host}/library/nginx:1.25.3") in rows
    assert ("legacy/legacy-app", "nginx:1.25.3", "nginx:1.25.3") in rows
    assert "Warning: mirrorgate:" in out and "Prom/Statsd-Exporter:v0.26" in out
    assert "no kubelet" in out.lower() or "There is no kubelet" in out
    assert processes_under(workdir) == []


def test_demo_keep_leaves_a_usable_cluster_until_ctrl_c(tmp_path):
    workdir = tmp_path / "kept"
    proc = subprocess.Popen(
        [mirrorgate_exe(), "demo", "--keep", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("Press Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)
        kubeconfig = next(line.split("=", 1)[1].strip() for line in lines if "KUBECONFIG=" in line)
        api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        with api:
            pods = kubernetes.client.CoreV1Api(api).list_namespaced_pod("shop")
        assert {p.metadata.name for p in pods.items} == {"storefront", "cache", "metrics"}
        assert len(processes_under(workdir)) >= 4  # etcd, kube-apiserver, registry, webhook
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Cleaned up" in proc.stdout.read()
    deadline = time.monotonic() + 10
    while processes_under(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(workdir) == []
    assert os.path.isdir(workdir)  # an explicit --workdir is kept for its logs
