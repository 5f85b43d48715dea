"""What tests/e2e/test_in_cluster.py needs besides the cluster: the webhook's image on the node,
a stand-in upstream registry, volumes for the registry's claims, and load while things change.

- `build_webhook_image()` runs `scripts/build-image --output docker-archive:FILE` (the README's
  way to get the image onto containerd), `import_archive()` is the `ctr -n k8s.io images import`
  that follows.
- `upstream_manifests()`: a plain distribution registry in the cluster that the deployed
  pull-through cache mirrors (`registry.proxies[].remoteURL`); no internet registry is reachable
  here, and distribution's proxy mode exits at start when its upstream does not answer.
- `claim_volumes()`: hostPath PersistentVolumes bound ahead to the claims the deployer renders
  (the local cluster has no storage provisioner).
- `AdmissionLoop`: creates pods through the API server, one every `period` seconds, for as long
  as it runs, and records for each whether the in-cluster webhook rewrote it. The webhook fails
  open (`failurePolicy: Ignore`), so an admission it did not answer is a pod stored unchanged:
  that is what "dropped" means, and what the tests count. The pods select a node label no node
  has, so they are stored and never run; each is deleted right after its creation was checked.
- `BundleWatch`: samples the mutating webhook configuration's caBundle, so a test sees the CA
  rotation's steps (one CA, old and new, the new one alone) as the API server saw them.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from mirrorgate.devtools.images import REGISTRY_PORT
from mirrorgate.devtools.localcluster import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
BUILD_IMAGE = ROOT / "scripts" / "build-image"
# A cold build (debootstrap, pip) takes minutes; a cached one seconds.
BUILD_TIMEOUT = 1800
UNSCHEDULABLE = {"mirrorgate.test/never": "true"}


@dataclass(frozen=True)
class BuiltImage:
    archive: Path
    tag: str
    seconds: float
    cached: bool  # build-image found the image in its cache (nothing changed since it was built)


def build_webhook_image(archive: Path, tag: str) -> BuiltImage:
    """The project's Dockerfile as a `docker save` archive; AssertionError with the build's last
    lines when it fails."""
    started = time.monotonic()
    result = subprocess.run(
        [str(BUILD_IMAGE), "--tag", tag, "--output", f"docker-archive:{archive}"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    tail = "\n".join(result.stderr.splitlines()[-30:])
    assert result.returncode == 0, f"scripts/build-image failed ({result.returncode}):\n{tail}"
    assert result.stdout.split() == [f"docker-archive:{archive}:{tag}"], (result.stdout, tail)
    return BuiltImage(archive, tag, time.monotonic() - started, "cached image" in result.stderr)


def import_archive(containerd_socket: Path, archive: Path) -> float:
    """`ctr -n k8s.io images import` into the node's containerd; returns the seconds it took."""
    started = time.monotonic()
    result = subprocess.run(
        ["ctr", "--address", str(containerd_socket), "--namespace", "k8s.io"]
        + ["images", "import", str(archive)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"ctr images import {archive} failed: {result.stderr}"
    return time.monotonic() - started


def upstream_manifests(namespace: str, *, image: str, node_port: int) -> list[dict[str, Any]]:
    """A plain (no auth) registry Deployment and its Service `registry` in `namespace`: the
    cache reaches it as `http://registry.<namespace>.svc:5000`, the test pushes to the
    NodePort."""
    labels = {"app": "upstream-registry"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
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
                        "automountServiceAccountToken": False,
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {
                                "name": "registry",
                                "image": image,
                                "imagePullPolicy": "Never",
                                "ports": [{"containerPort": REGISTRY_PORT}],
                                "readinessProbe": {
                                    "tcpSocket": {"port": REGISTRY_PORT},
                                    "periodSeconds": 1,
                                },
                                "volumeMounts": [
                                    {"name": "data", "mountPath": "/var/lib/registry"}
                                ],
                            }
                        ],
                        "volumes": [{"name": "data", "emptyDir": {}}],
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
                "ports": [
                    {"port": REGISTRY_PORT, "targetPort": REGISTRY_PORT, "nodePort": node_port}
                ],
            },
        },
    ]


def claim_volumes(
    claims: list[tuple[str, str]], *, folder: Path, size: str, prefix: str
) -> list[dict[str, Any]]:
    """One hostPath PersistentVolume per (namespace, claim), bound ahead to it (claimRef).

    The folders are world-writable: the registry runs as uid 1000, and the kubelet applies
    fsGroup to hostPath volumes no more than a real cluster's local volumes do.
    """
    volumes = []
    for namespace, claim in claims:
        path = folder / f"{namespace}-{claim}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        volumes.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {
                    "name": f"{prefix}-{namespace}-{claim}",
                    "labels": {"mirrorgate.test/volume": prefix},
                },
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "claimRef": {"namespace": namespace, "name": claim},
                    "hostPath": {"path": str(path), "type": "Directory"},
                },
            }
        )
    return volumes


def unschedulable_pod(name: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"mirrorgate.test/loop": "true"}},
        "spec": {
            "nodeSelector": dict(UNSCHEDULABLE),
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": image}],
        },
    }


@dataclass(frozen=True)
class Admission:
    started: float  # time.monotonic() when the create was sent
    finished: float
    pod: str
    rewritten: bool  # stored with the mirror's image and the pull secret
    detail: str  # the image as stored, or the API server's error


class AdmissionLoop:
    """Creates a pod every `period` seconds in `namespace` and checks what was stored."""

    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        *,
        image: str,
        rewritten_image: str,
        pull_secret: str,
        period: float = 0.25,
    ) -> None:
        self.plane = plane
        self.namespace = namespace
        self.image = image
        self.rewritten_image = rewritten_image
        self.pull_secret = pull_secret
        self.period = period
        self._results: list[Admission] = []
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="admission-loop", daemon=True)

    def start(self) -> AdmissionLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def results(self, since: float = 0.0, until: float = float("inf")) -> list[Admission]:
        with self._guard:
            return [a for a in self._results if since <= a.started <= until]

    def _run(self) -> None:
        number = 0
        with self.plane.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            while not self._stop.is_set():
                number += 1
                name = f"loop-{number:05d}"
                started = time.monotonic()
                admission = self._create(core, name, started)
                with self._guard:
                    self._results.append(admission)
                # Not bound to a node, so it goes at once; a failure here is not the webhook's.
                try:
                    core.delete_namespaced_pod(
                        name, self.namespace, grace_period_seconds=0, _request_timeout=10
                    )
                except ApiException as err:
                    if err.status != 404:
                        raise
                self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def _create(self, core: kubernetes.client.CoreV1Api, name: str, started: float) -> Admission:
        try:
            stored = core.create_namespaced_pod(
                self.namespace, unschedulable_pod(name, self.image), _request_timeout=30
            )
        except ApiException as err:
            return Admission(started, time.monotonic(), name, False, f"{err.status} {err.body}")
        spec = stored.spec
        image = spec.containers[0].image if spec and spec.containers else ""
        secrets = [s.name for s in (spec.image_pull_secrets or [])] if spec else []
        ok = image == self.rewritten_image and self.pull_secret in secrets
        detail = f"stored image {image}, imagePullSecrets {secrets}"
        return Admission(started, time.monotonic(), name, ok, detail)


def ca_fingerprints(bundle_b64: str) -> tuple[str, ...]:
    """Short sha256 fingerprints of each certificate in a base64 caBundle, in order."""
    pem = base64.b64decode(bundle_b64 or "")
    blocks = [b for b in pem.split(b"-----END CERTIFICATE-----") if b"BEGIN CERTIFICATE" in b]
    return tuple(hashlib.sha256(b.strip()).hexdigest()[:12] for b in blocks)


class BundleWatch:
    """Samples the caBundle of a mutating webhook configuration every `period` seconds and keeps
    the distinct values in the order they appeared."""

    def __init__(self, plane: ControlPlane, configuration: str, *, period: float = 0.5) -> None:
        self.plane = plane
        self.configuration = configuration
        self.period = period
        self.history: list[tuple[float, tuple[str, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bundle-watch", daemon=True)

    def start(self) -> BundleWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with self.plane.api_client() as api:
            hooks = kubernetes.client.AdmissionregistrationV1Api(api)
            while not self._stop.is_set():
                try:
                    live = hooks.read_mutating_webhook_configuration(
                        self.configuration, _request_timeout=5
                    )
                    bundle = live.webhooks[0].client_config.ca_bundle or ""
                    seen = ca_fingerprints(bundle)
                    if not self.history or self.history[-1][1] != seen:
                        self.history.append((time.monotonic(), seen))
                except ApiException:
                    pass  # deleted at uninstall, or a moment's error: the next sample tells
                self._stop.wait(self.period)

    def wait_for(self, done: Callable[[list[tuple[str, ...]]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done([seen for _t, seen in self.history]):
                return True
            time.sleep(0.5)
        return False
