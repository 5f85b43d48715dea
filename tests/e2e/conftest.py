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

from mirrorgate.devtools.localcluster import ControlPlane, LocalClusterError, LocalRegistry
from tests.helpers.cluster import VIEWER, VIEWER_GROUPS, WEBHOOK_USER

E2E_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    plane.add_user(VIEWER, VIEWER_GROUPS)
    plane.add_user(WEBHOOK_USER)
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


@pytest.fixture(scope="session")
def webhook_user_token(control_plane: ControlPlane) -> str:
    """Bearer token of `mirrorgate-webhook`: bound to nothing until a test binds it."""
    return control_plane.tokens[WEBHOOK_USER]


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


# Real registries for the registry v2 client tests (helpers: tests/registries.py). All use one test
# CA (registry_pki), listen on 127.0.0.1 and expose host, url, credentials, ca_file, cert_dir and
# metrics_url. Counters only grow and the registries are shared by the session: compare deltas.
from tests.helpers.registries import (  # noqa: E402 - appended section, kept apart from the fixtures above
    Credentials,
    HarnessRegistry,
    RegistryPKI,
    TokenServer,
    require_tools,
    write_registry_pki,
)


def _fail_without_registry_tools() -> None:
    try:
        require_tools()
    except LocalClusterError as err:
        raise pytest.fail.Exception(str(err), pytrace=False) from None


def _running(server: HarnessRegistry | TokenServer) -> Iterator[HarnessRegistry | TokenServer]:
    """Start `server` (failing the test, not skipping, when it can't), yield it, always stop it."""
    _fail_without_registry_tools()
    try:
        try:
            server.start()
        except LocalClusterError as err:
            raise pytest.fail.Exception(str(err), pytrace=False) from None
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry_pki(tmp_path_factory: pytest.TempPathFactory) -> RegistryPKI:
    """A test CA and a serving certificate for 127.0.0.1 and localhost (files)."""
    _fail_without_registry_tools()
    return write_registry_pki(tmp_path_factory.mktemp("registry-pki"))


@pytest.fixture(scope="session")
def htpasswd_registry(
    tmp_path_factory: pytest.TempPathFactory, registry_pki: RegistryPKI
) -> Iterator[HarnessRegistry]:
    """TLS + htpasswd (bcrypt cost 4): user `testuser` with a random password."""
    registry = HarnessRegistry(
        tmp_path_factory.mktemp("htpasswd-registry"),
        pki=registry_pki,
        credentials=Credentials.random("testuser"),
    )
    yield from _running(registry)  # type: ignore[misc]


@pytest.fixture(scope="session")
def token_server(
    tmp_path_factory: pytest.TempPathFactory, registry_pki: RegistryPKI
) -> Iterator[TokenServer]:
    """HTTPS token server; user `testuser` (random password) gets every action it asks for."""
    server = TokenServer(
        tmp_path_factory.mktemp("token-server"),
        tls_cert=registry_pki.cert_file,
        tls_key=registry_pki.key_file,
    )
    yield from _running(server)  # type: ignore[misc]


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, registry_pki: RegistryPKI, token_server: TokenServer
) -> Iterator[HarnessRegistry]:
    """TLS + `auth.token` via token_server; `credentials` are the token server's user."""
    registry = HarnessRegistry(
        tmp_path_factory.mktemp("token-registry"), pki=registry_pki, token_server=token_server
    )
    yield from _running(registry)  # type: ignore[misc]


@pytest.fixture(scope="session")
def proxy_mirror(
    tmp_path_factory: pytest.TempPathFactory,
    registry_pki: RegistryPKI,
    token_registry: HarnessRegistry,
) -> Iterator[HarnessRegistry]:
    """A pull-through cache of token_registry: TLS, no client auth, read-only."""
    registry = HarnessRegistry(
        tmp_path_factory.mktemp("proxy-mirror"), pki=registry_pki, upstream=token_registry
    )
    yield from _running(registry)  # type: ignore[misc]


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HarnessRegistry]:
    """Plain HTTP, no auth (ca_file, cert_dir and credentials are None)."""
    registry = HarnessRegistry(tmp_path_factory.mktemp("plain-registry"))
    yield from _running(registry)  # type: ignore[misc]


# A Clair v4 stand-in (tests/clair_standin.py): Clair's real HTTP API (PSK auth, index, reports,
# notifier pages) on 127.0.0.1, trusting the registry CA to fetch layers. One per test: fresh state.
import base64  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402 - appended section, kept apart from the fixtures above

from tests.helpers.clair_standin import ClairStandIn  # noqa: E402

CLAIR_ISSUER = "mirrorgate"


@pytest.fixture
def clair(registry_pki: RegistryPKI) -> Iterator[ClairStandIn]:
    """Running, with a random 32-byte PSK (`psk_b64`) and issuer `mirrorgate`; stopped after."""
    standin = ClairStandIn(
        base64.b64encode(secrets.token_bytes(32)).decode(),
        [CLAIR_ISSUER],
        ca_file=registry_pki.ca_file,
    )
    with standin:
        yield standin


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung registry)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
