"""Harnesses for end-to-end tests on a real node (`mirrorgate.devtools.node.LocalNode`).

- `require_node()`, `start_node()`: a node on a control plane, or a test failure (never a skip)
  saying why this machine cannot run one.
- kubectl conveniences: `apply()`, `create_namespace()`, `wait_ready()`, `eventually()`,
  `free_node_ports()`.
- `ClusterRegistry`: Debian's docker-registry as a pod (the locally built image) behind a
  NodePort, htpasswd auth, reached by the node as `127.0.0.1:<nodePort>`.
- `HostRegistry`: docker-registry as a host process on one given address, plain HTTP, no auth:
  on the node IP it is an upstream that pods can reach (127.0.0.1 inside a pod is the pod).
- `Prometheus`: a real Prometheus scraping one target with given rule files, optionally started
  with a recorded alert history (see `Prometheus.__init__`).
- `metric()`: one sample family summed from a `/metrics` text.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import bcrypt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mirrorgate.devtools.images import REGISTRY_PORT, OciImage
from mirrorgate.devtools.localcluster import (
    ChildProcess,
    ControlPlane,
    Kubectl,
    LocalClusterError,
    free_port,
    http_answers,
    log_tail,
    wait_until,
)
from mirrorgate.devtools.node import LocalNode, node_unavailable_reason

POD_TIMEOUT = 90
NODE_PORT_RANGE = (30000, 32767)


def fail(err: Exception | str) -> NoReturn:
    """Fail (never skip) with only the reason and what to do: no chained traceback."""
    raise pytest.fail.Exception(str(err), pytrace=False) from None


def require_node() -> None:
    """Fail the test, before anything is started, when this machine cannot run a node."""
    reason = node_unavailable_reason()
    if reason is not None:
        fail(f"this machine cannot run a local node: {reason}")


def start_node(plane: ControlPlane, work_dir: Path, *, images: Sequence[OciImage]) -> LocalNode:
    """A started node with `images` imported, or a failed test naming what this machine lacks."""
    require_node()
    try:
        return LocalNode(plane, work_dir, images=images).start()
    except LocalClusterError as err:
        fail(err)


def apply(kubectl: Kubectl, *documents: Mapping[str, Any]) -> str:
    """`kubectl apply -f -` of a v1 List; returns what kubectl printed (stdout and stderr)."""
    result = kubectl.run(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(documents)}),
    )
    return result.stdout + result.stderr


def eventually(check: Callable[[], str | None], *, timeout: float, what: str) -> float:
    """Poll `check()` (None when satisfied, else what is still wrong) until `timeout`; returns
    the seconds it took."""
    started = time.monotonic()
    while (problem := check()) is not None:
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what} after {timeout:.0f}s: {problem}")
        time.sleep(0.3)
    return time.monotonic() - started


def create_namespace(
    kubectl: Kubectl, prefix: str, *, labels: Mapping[str, str] | None = None
) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", name)
    if labels:
        kubectl.run("label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()))
    return name


def wait_ready(kubectl: Kubectl, namespace: str, target: str) -> float:
    """Seconds until `target` (pod/NAME, or -l SELECTOR) is Ready; on timeout the failure shows
    `kubectl describe` of the namespace's pods."""
    started = time.monotonic()
    selector = target.split() if target.startswith("-l") else [target]
    result = kubectl.run(
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        *selector,
        f"--timeout={POD_TIMEOUT}s",
        check=False,
        timeout=POD_TIMEOUT + 30,
    )
    if result.returncode != 0:
        described = kubectl.run("describe", "pods", "-n", namespace, check=False).stdout
        pytest.fail(f"{namespace} {target} not Ready: {result.stderr.strip()}\n{described}")
    return time.monotonic() - started


def free_node_ports(kubectl: Kubectl, count: int) -> list[int]:
    """Ports in the NodePort range that no Service holds and nothing on the host listens on."""
    taken = set(
        kubectl.run(
            "get",
            "services",
            "--all-namespaces",
            "-o",
            "jsonpath={.items[*].spec.ports[*].nodePort}",
        ).stdout.split()
    )
    found: list[int] = []
    while len(found) < count:
        port = random.randint(*NODE_PORT_RANGE)
        if str(port) in taken or port in found:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
    return found


def dockerconfigjson(host: str, username: str, password: str) -> str:
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


def pull_secret(namespace: str, name: str, config_json: str) -> dict[str, Any]:
    """A `kubernetes.io/dockerconfigjson` Secret holding `config_json`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": name, "namespace": namespace},
        "data": {".dockerconfigjson": base64.b64encode(config_json.encode()).decode()},
    }


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` in a `/metrics` text whose labels include
    `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


# --- registries ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterRegistry:
    """The registry pod behind its NodePort, as the node reaches it."""

    namespace: str
    host: str  # 127.0.0.1:<nodePort>
    username: str
    password: str

    def logs(self, kubectl: Kubectl) -> str:
        return kubectl.run("logs", "-n", self.namespace, "deploy/registry").stdout


def registry_manifests(
    namespace: str, image: str, *, htpasswd: str | None = None, proxy: str | None = None
) -> list[dict[str, Any]]:
    """A registry Deployment (the locally built image, emptyDir storage) and its NodePort
    Service; with `htpasswd` its Secret and basic auth, with `proxy` a pull-through cache of
    that upstream URL."""
    labels = {"app": "registry"}
    env = {"REGISTRY_HTTP_SECRET": secrets.token_hex(16)}
    if htpasswd is not None:
        env |= {
            "REGISTRY_AUTH": "htpasswd",
            "REGISTRY_AUTH_HTPASSWD_REALM": "node-e2e",
            "REGISTRY_AUTH_HTPASSWD_PATH": "/auth/htpasswd",
        }
    if proxy is not None:
        env["REGISTRY_PROXY_REMOTEURL"] = proxy
    mounts = [{"name": "data", "mountPath": "/var/lib/registry"}]
    volumes: list[dict[str, Any]] = [{"name": "data", "emptyDir": {}}]
    if htpasswd is not None:
        mounts.append({"name": "auth", "mountPath": "/auth", "readOnly": True})
        volumes.append({"name": "auth", "secret": {"secretName": "registry-htpasswd"}})
    container = {
        "name": "registry",
        # Imported into the node's containerd: no registry serves it.
        "image": image,
        "imagePullPolicy": "Never",
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"containerPort": REGISTRY_PORT}],
        "readinessProbe": {"tcpSocket": {"port": REGISTRY_PORT}, "periodSeconds": 1},
        "volumeMounts": mounts,
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "registry-htpasswd", "namespace": namespace},
        "stringData": {"htpasswd": htpasswd},
    }
    return [
        *([secret] if htpasswd is not None else []),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "registry", "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        # No Service links: distribution reads every REGISTRY_* variable as a
                        # config override, and a Service named registry makes several.
                        "enableServiceLinks": False,
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "registry", "namespace": namespace},
            "spec": {
                "type": "NodePort",
                "selector": labels,
                "ports": [{"port": REGISTRY_PORT, "targetPort": REGISTRY_PORT}],
            },
        },
    ]


def _serving(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return None
    except urllib.error.HTTPError:
        return None  # 401 without credentials: it is serving
    except OSError as err:
        return str(err)


def start_cluster_registry(
    kubectl: Kubectl, namespace: str, *, image: str, username: str
) -> ClusterRegistry:
    """The registry Deployment and NodePort Service in `namespace`, available and answering on
    `127.0.0.1:<nodePort>`; a random password (bcrypt cost 4: about 1 ms per request)."""
    password = secrets.token_urlsafe(18)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    apply(kubectl, *registry_manifests(namespace, image, htpasswd=f"{username}:{hashed}\n"))
    kubectl.run(
        "rollout",
        "status",
        "-n",
        namespace,
        "deploy/registry",
        f"--timeout={POD_TIMEOUT}s",
        timeout=POD_TIMEOUT + 30,
    )
    node_port = kubectl.run(
        "get", "service", "-n", namespace, "registry", "-o", "jsonpath={.spec.ports[0].nodePort}"
    ).stdout.strip()
    host = f"127.0.0.1:{node_port}"
    # kube-proxy writes the NodePort rules shortly after the Service exists.
    eventually(lambda: _serving(f"http://{host}/v2/"), timeout=30, what=f"registry at {host}")
    return ClusterRegistry(namespace, host, username, password)


class HostRegistry:
    """Debian's docker-registry as a host process on `address:<free port>`: plain HTTP, no auth.

    `devtools.localcluster.LocalRegistry` always binds 127.0.0.1; this one binds the address it
    is given (the node IP, for an upstream that pods reach). Stopped by the PID started here.
    """

    def __init__(self, work_dir: Path, *, address: str) -> None:
        self.work_dir = work_dir
        self.host = f"{address}:{free_port()}"
        self.url = f"http://{self.host}"
        self.log_path = work_dir / "registry.log"
        self._process: ChildProcess | None = None

    def start(self) -> HostRegistry:
        binary = shutil.which("docker-registry")
        if binary is None:
            fail("docker-registry is not installed: apt-get install -y docker-registry")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "version": "0.1",
            "log": {"level": "info"},
            "storage": {"filesystem": {"rootdirectory": str(self.work_dir / "data")}},
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        config_file = self.work_dir / "config.yml"
        config_file.write_text(json.dumps(config))  # JSON is valid YAML
        self._process = ChildProcess(
            "docker-registry", [binary, "serve", str(config_file)], log_path=self.log_path
        )
        try:
            wait_until(
                lambda: http_answers(f"{self.url}/v2/"),
                what=f"docker-registry on {self.host}",
                timeout=15,
                processes=[self._process],
            )
        except LocalClusterError as err:
            self.stop()
            fail(err)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()


# --- Prometheus ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PendingSince:
    """An alert Prometheus is told it has been evaluating as pending since `active_at` (unix
    seconds), last seen `seen_ago` seconds before start: an `ALERTS_FOR_STATE` sample."""

    alert: str
    labels: Mapping[str, str]  # what the alert's expression yields (the rule's labels are added)
    active_at: float
    seen_ago: float = 20.0


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping `target` (host:port) every second.

    `history` writes `ALERTS_FOR_STATE` samples into the TSDB before the start (with `promtool
    tsdb create-blocks-from openmetrics`): what a Prometheus that restarts finds of the alerts it
    had pending. On its first rule evaluations Prometheus restores each active alert's pending
    start from them (`--rules.alert.for-outage-tolerance`, 1 h); `--rules.alert.for-grace-period`
    is lowered to 1 s so an alert whose `for` has elapsed by then fires at the next evaluation.
    That is how a test sees an alert with `for: 5m` fire without waiting five minutes: the
    alert still has to be active, with exactly these labels, when the restore happens.
    """

    # The restore happens after the second evaluation, once: it must come after the first
    # scrape, which Prometheus's scrape manager applies up to 5 s after start.
    EVALUATION_INTERVAL = 10

    def __init__(
        self,
        work_dir: Path,
        *,
        target: str,
        rule_files: Sequence[Path],
        history: Sequence[PendingSince] = (),
        evaluation_interval: int = EVALUATION_INTERVAL,
    ) -> None:
        self.evaluation_interval = evaluation_interval
        self.work_dir = work_dir
        self.target = target
        self.rule_files = list(rule_files)
        self.history = list(history)
        self.url = ""
        self._process: ChildProcess | None = None

    def _rule_labels(self, alert: str) -> dict[str, str]:
        for path in self.rule_files:
            for group in yaml.safe_load(path.read_text())["groups"]:
                for rule in group["rules"]:
                    if rule.get("alert") == alert:
                        return {str(k): str(v) for k, v in (rule.get("labels") or {}).items()}
        fail(f"no alert {alert} in {', '.join(map(str, self.rule_files))}")

    def _write_history(self, tsdb: Path) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            fail("promtool is missing: apt-get install -y prometheus (scripts/setup does)")
        lines = ["# TYPE ALERTS_FOR_STATE gauge"]
        now = time.time()
        for pending in self.history:
            labels = {
                **self._rule_labels(pending.alert),
                **pending.labels,
                "alertname": pending.alert,
            }
            text = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
            lines.append(
                f"ALERTS_FOR_STATE{{{text}}} {int(pending.active_at)} {now - pending.seen_ago:.3f}"
            )
        source = self.work_dir / "history.om"
        source.write_text("\n".join([*lines, "# EOF", ""]))
        result = subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(tsdb)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            fail(f"promtool could not write the alert history: {result.stderr.strip()}")

    def start(self) -> Prometheus:
        exe = shutil.which("prometheus")
        if exe is None:
            fail("prometheus is missing: apt-get install -y prometheus (scripts/setup does)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tsdb = self.work_dir / "tsdb"
        if self.history:
            self._write_history(tsdb)
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": f"{self.evaluation_interval}s",
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": "mirrorgate", "static_configs": [{"targets": [self.target]}]}
            ],
        }
        config_file = self.work_dir / "prometheus.yml"
        config_file.write_text(json.dumps(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._process = ChildProcess(
            "prometheus",
            [
                exe,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tsdb}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--rules.alert.for-grace-period=1s",
            ],
            log_path=self.work_dir / "prometheus.log",
        )
        try:
            wait_until(
                lambda: http_answers(f"{self.url}/-/ready", expect_ok=True),
                what="prometheus",
                timeout=30,
                processes=[self._process],
            )
        except LocalClusterError as err:
            self.stop()
            fail(err)
        return self

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=5) as r:
            return list(json.loads(r.read())["data"]["alerts"])

    def log_tail(self) -> str:
        return log_tail(self.work_dir / "prometheus.log")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(grace=20)
