"""The local control plane and registry behave like the real things the product relies on."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import kubernetes.client
import kubernetes.config
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes.client.exceptions import ApiException

from mirrorgate.devtools.localcluster import (
    ControlPlane,
    LocalClusterError,
    LocalRegistry,
    find_assets,
)


@pytest.fixture
def namespace(kube: kubernetes.client.CoreV1Api) -> str:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(
        kubernetes.client.V1Namespace(
            metadata=kubernetes.client.V1ObjectMeta(
                name=name, labels={"mirrorgate.io/enabled": "true"}
            ),
        )
    )
    return name


def _eventually(call: Callable[[], object], *, while_status: int, attempts: int = 50) -> None:
    # The RBAC authorizer reads bindings from an informer cache: a new one applies shortly after.
    for _ in range(attempts - 1):
        try:
            call()
            return
        except ApiException as err:
            if err.status != while_status:
                raise
            time.sleep(0.1)
    call()


def _port_open(url: str) -> bool:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _unrelated_ca(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unrelated-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_api_server_reports_version_1_20_2(control_plane: ControlPlane) -> None:
    with control_plane.api_client() as api:
        info = kubernetes.client.VersionApi(api).get_code()
    assert info.git_version == "v1.20.2"


def test_namespace_is_stored_with_its_labels(
    kube: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    stored = kube.read_namespace(namespace)
    assert stored.metadata.labels["mirrorgate.io/enabled"] == "true"


def test_pod_is_stored_and_stays_pending_without_a_kubelet(
    kube: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    pod = kubernetes.client.V1Pod(
        metadata=kubernetes.client.V1ObjectMeta(name="app"),
        spec=kubernetes.client.V1PodSpec(
            containers=[
                kubernetes.client.V1Container(name="app", image="docker.io/library/nginx:1.25"),
            ]
        ),
    )
    kube.create_namespaced_pod(namespace, pod)
    stored = kube.read_namespaced_pod("app", namespace)
    assert stored.spec.containers[0].image == "docker.io/library/nginx:1.25"
    assert stored.status.phase == "Pending"
    assert stored.spec.node_name is None


def test_rbac_denies_a_non_admin_token_what_its_role_does_not_grant(
    control_plane: ControlPlane, viewer_token: str
) -> None:
    name = f"e2e-pod-reader-{uuid.uuid4().hex[:8]}"
    with (
        control_plane.api_client() as admin_api,
        control_plane.api_client(viewer_token) as viewer_api,
    ):
        viewer = kubernetes.client.CoreV1Api(viewer_api)
        rbac = kubernetes.client.RbacAuthorizationV1Api(admin_api)
        with pytest.raises(ApiException) as unbound:
            viewer.list_secret_for_all_namespaces()
        # 403, not 401: the token authenticated and RBAC said no.
        assert unbound.value.status == 403
        message = json.loads(unbound.value.body)["message"]
        assert 'User "viewer" cannot list resource "secrets"' in message

        # Granted "list pods", the same user may list pods but still not secrets. (The built-in
        # "view" role would not do: it is aggregated, and with no controller-manager running its
        # rules stay empty.)
        rbac.create_cluster_role(
            kubernetes.client.V1ClusterRole(
                metadata=kubernetes.client.V1ObjectMeta(name=name),
                rules=[
                    kubernetes.client.V1PolicyRule(
                        api_groups=[""], resources=["pods"], verbs=["get", "list"]
                    )
                ],
            )
        )
        rbac.create_cluster_role_binding(
            kubernetes.client.V1ClusterRoleBinding(
                metadata=kubernetes.client.V1ObjectMeta(name=name),
                role_ref=kubernetes.client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=name
                ),
                subjects=[
                    kubernetes.client.RbacV1Subject(
                        api_group="rbac.authorization.k8s.io", kind="User", name="viewer"
                    )
                ],
            )
        )
        try:
            _eventually(viewer.list_pod_for_all_namespaces, while_status=403)
            with pytest.raises(ApiException) as granted_pods_only:
                viewer.list_secret_for_all_namespaces()
            assert granted_pods_only.value.status == 403
        finally:
            rbac.delete_cluster_role_binding(name)
            rbac.delete_cluster_role(name)


def test_ephemeral_containers_subresource_is_served(kube: kubernetes.client.CoreV1Api) -> None:
    resources = {resource.name for resource in kube.get_api_resources().resources}
    assert "pods/ephemeralcontainers" in resources


def test_kubeconfig_file_reaches_the_api_server(control_plane: ControlPlane) -> None:
    with kubernetes.config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        names = {ns.metadata.name for ns in kubernetes.client.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_client_rejects_an_api_server_certificate_it_was_not_told_to_trust(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    config = kubernetes.client.Configuration()
    config.host = control_plane.url
    config.ssl_ca_cert = str(_unrelated_ca(tmp_path / "unrelated-ca.crt"))
    config.api_key = {"authorization": control_plane.admin_token}
    config.api_key_prefix = {"authorization": "Bearer"}
    config.retries = False
    with kubernetes.client.ApiClient(config) as api, pytest.raises(ApiException) as rejected:
        kubernetes.client.CoreV1Api(api).list_namespace()
    # The client (v37) reports TLS failures as ApiException with status 0 and the SSL reason.
    assert rejected.value.status == 0
    assert "CERTIFICATE_VERIFY_FAILED" in rejected.value.reason


def test_local_registry_speaks_the_distribution_v2_api(local_registry: LocalRegistry) -> None:
    with urllib.request.urlopen(f"{local_registry.url}/v2/", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert local_registry.url == f"http://{local_registry.host}"


def test_stopping_a_control_plane_leaves_no_process_behind(tmp_path: Path) -> None:
    plane = ControlPlane(tmp_path)
    with plane:
        processes = plane.processes
        assert set(processes) == {"etcd", "kube-apiserver"}
        assert all(process.poll() is None for process in processes.values())
        assert _port_open(plane.url)
    assert all(process.poll() is not None for process in processes.values())
    for process in processes.values():
        with pytest.raises(ProcessLookupError):
            os.kill(process.pid, 0)
    assert not _port_open(plane.url)
    plane.stop()  # idempotent


def test_an_api_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    plane = ControlPlane(tmp_path, extra_apiserver_args=["--no-such-flag"])
    with pytest.raises(LocalClusterError, match="(?s)kube-apiserver exited.*unknown flag"):
        plane.start()
    # etcd, started first, was stopped again.
    assert all(process.poll() is not None for process in plane.processes.values())


def test_missing_assets_tell_the_user_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "empty"))
    monkeypatch.setenv("MIRRORGATE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LocalClusterError, match="scripts/control-plane-assets"):
        find_assets()
