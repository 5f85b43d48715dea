"""`mirrorgate demo`, run as a newcomer runs it: through the installed command."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import kubernetes.config
import pytest

from mirrorgate.devtools.node import snapshot_host_state
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


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A work dir short enough for the node's unix sockets (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="mgdemo-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_work_dir_too_long_for_the_node_is_named_and_the_demo_admits_without_one(tmp_path):
    """Where no node can run the demo says why and still shows admission."""
    workdir = tmp_path / ("x" * 60) / "demo"
    r = subprocess.run(
        [mirrorgate_exe(), "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no node on this machine (work dir" in r.stdout and "use a shorter one" in r.stdout
    assert "There is no kubelet here" in r.stdout
    assert processes_under(workdir) == []


def test_demo_shows_before_and_after_runs_the_pods_and_leaves_nothing_running(short_dir):
    """The newcomer's first command: what the API server stored, what the node ran and from
    where, the containers' own log lines, and afterwards no process, mount or rule left."""
    workdir = short_dir / "demo"
    before = snapshot_host_state(work_dirs=(short_dir,))
    r = subprocess.run(
        [mirrorgate_exe(), "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
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
    assert "no node on this machine" not in out, out
    node = {
        (cols[0], cols[2]): (cols[1], " ".join(cols[3:-1]), cols[-1])
        for line in out.splitlines()
        if (cols := line.split()) and len(cols) >= 5 and cols[1] in ("Running", "Pending")
    }
    assert node[("shop/storefront", "web")] == ("Running", "running", host)
    assert node[("shop/storefront", "app")] == ("Running", "running", host)
    assert node[("shop/storefront", "migrate")][1:] == ("terminated: Completed", host)
    assert node[("shop/metrics", "typo")] == ("Pending", "waiting: InvalidImageName", "-")
    assert node[("legacy/legacy-app", "app")][0] == "Pending"  # docker.io: offline here
    assert "ghcr/acme/storefront:2.3.1 from the mirror: up and running" in out
    assert processes_under(workdir) == []
    assert snapshot_host_state(work_dirs=(short_dir,)) == before


def test_demo_keep_leaves_a_usable_cluster_until_ctrl_c(short_dir):
    workdir = short_dir / "kept"
    proc = subprocess.Popen(
        [mirrorgate_exe(), "demo", "--keep", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
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
        # etcd, kube-apiserver, registry, webhook, and the node's five
        assert len(processes_under(workdir)) >= 9
        alias = next(
            line.split("=", 1)[1].strip(" '\n") for line in lines if "alias kubectl" in line
        )
        got = subprocess.run(
            [*alias.split(), "--kubeconfig", kubeconfig, "get", "pods", "-n", "shop"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.returncode == 0, got.stderr
        assert re.search(r"^storefront\s+2/2\s+Running", got.stdout, re.M), got.stdout
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
