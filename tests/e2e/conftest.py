"""Fixtures that start the real programs the end-to-end tests drive.

A real kube-apiserver + etcd (`ControlPlane`) and a real Debian `docker-registry` (`LocalRegistry`),
each in its own temporary folder and stopped by PID at the end of the session. Missing programs make
the fixtures fail, never skip: a skipped e2e suite would hide a missing install step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest

from webhook.localcluster import ControlPlane, LocalClusterError, LocalRegistry

E2E_DIR = Path(__file__).parent

# A user that exists (token auth) but is bound to nothing until a test binds it.
VIEWER = "viewer"
VIEWER_GROUPS = ("mirrorgate:e2e-viewers",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    plane.add_user(VIEWER, VIEWER_GROUPS)
    try:
        plane.start()
    except LocalClusterError as err:
        # Fail, don't skip, and show only the instructions (no chained traceback).
        raise pytest.fail.Exception(str(err), pytrace=False) from None
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def viewer_token(control_plane: ControlPlane) -> str:
    """Bearer token of the user `viewer`: authenticated, but bound to no role."""
    return control_plane.tokens[VIEWER]


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[kubernetes.client.CoreV1Api]:
    with control_plane.api_client() as api:
        yield kubernetes.client.CoreV1Api(api)


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    registry = LocalRegistry(tmp_path_factory.mktemp("registry"))
    try:
        registry.start()
    except LocalClusterError as err:
        raise pytest.fail.Exception(str(err), pytrace=False) from None
    try:
        yield registry
    finally:
        registry.stop()
