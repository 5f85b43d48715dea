"""The container image, built from the Dockerfile by scripts/build-image and run as a node runs it.

One build per module (cold it takes about two minutes; scripts/build-image caches the base and
the image under ~/.cache/mirrorgate/image/, so later runs take seconds). The image is unpacked
with umoci and its processes started with runc, with the image's own configuration (user,
entrypoint, environment) plus what the Deployment from `mirrorgate deploy` sets: a read-only root
filesystem, no capabilities, no privilege escalation, an emptyDir on /tmp, the config map and the
TLS secret mounted read-only.

Missing programs or privileges make the tests fail, never skip: a skipped image test would hide a
missing install step.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirrorgate.deploy.render import CONFIG_FILE, TLS_DIR
from mirrorgate.devtools.localcluster import LocalRegistry
from tests.helpers.commands import mirrorgate_exe

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BUILD_IMAGE = ROOT / "scripts" / "build-image"
TAG = "mirrorgate:0.1.0"
UID = 65532
SITE = "opt/mirrorgate/lib/python3.11/site-packages"
# A cold build: debootstrap, the security upgrade, pip; generous for a slow mirror.
BUILD_TIMEOUT = 1800
# The image as a registry stores it, and unpacked on a node. Measured: about 83 MB and 325 MB.
MAX_COMPRESSED_MB = 110
MAX_UNPACKED_MB = 380
CONFIG = """\
mirrors:
  - {upstream: docker.io, mirror: "127.0.0.1:31000"}
skip: ["registry.example.org/*"]
pullSecret: {name: mirrorgate-pull}
"""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise pytest.fail.Exception(message, pytrace=False)


def require_programs() -> None:
    require(os.geteuid() == 0, "the image tests need root: buildah, umoci unpack and runc do")
    missing = [p for p in ("buildah", "skopeo", "umoci", "runc") if shutil.which(p) is None]
    require(not missing, f"missing {' '.join(missing)}: apt-get install {' '.join(missing)}")


def build(*args: str, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUILD_IMAGE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def tail(text: str, lines: int = 30, chars: int = 6000) -> str:
    return "\n".join(text.splitlines()[-lines:])[-chars:]


@dataclass
class Image:
    layout: Path
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    rootfs: Path
    runtime_config: dict[str, Any]


def read_layout(layout: Path, ref: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    entries = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
    ]
    assert len(entries) == 1, f"{layout} has no single image named {ref}: {index}"
    digest = entries[0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text())
    config_digest = manifest["config"]["digest"].split(":", 1)[1]
    config = json.loads((layout / "blobs" / "sha256" / config_digest).read_text())
    return digest, manifest, config


def mounts_under(path: Path) -> list[str]:
    prefix = f"{path}/"
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    require_programs()
    work = tmp_path_factory.mktemp("image")
    layout = work / "layout"
    r = build("--tag", TAG, "--output", f"oci:{layout}")
    require(r.returncode == 0, f"scripts/build-image failed ({r.returncode}):\n{tail(r.stderr)}")
    assert r.stdout.splitlines() == [f"oci:{layout}:{TAG}"], (r.stdout, tail(r.stderr))
    digest, manifest, config = read_layout(layout, TAG)
    bundle = work / "bundle"
    u = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    require(u.returncode == 0, f"umoci unpack failed:\n{tail(u.stderr)}")
    runtime_config = json.loads((bundle / "config.json").read_text())
    try:
        yield Image(
            layout=layout,
            manifest_digest=digest,
            manifest=manifest,
            config=config,
            rootfs=bundle / "rootfs",
            runtime_config=runtime_config,
        )
    finally:
        # The unpacked root is a full Debian: do not leave it in pytest's kept temporary folders.
        if not mounts_under(work):
            shutil.rmtree(work, ignore_errors=True)


class Container:
    """One runc container over the unpacked image: its own bundle, the shared root, read-only."""

    def __init__(
        self,
        image: Image,
        work: Path,
        *,
        args: list[str] | None = None,
        binds: dict[str, Path] | None = None,
    ) -> None:
        self.id = f"mirrorgate-image-test-{uuid.uuid4().hex[:12]}"
        self.state = work / "runc-state"
        self.bundle = work / f"bundle-{self.id}"
        self.bundle.mkdir(parents=True)
        self.log = work / f"{self.id}.log"
        spec = json.loads(json.dumps(image.runtime_config))
        process = spec["process"]
        process["terminal"] = False
        if args is not None:
            process["args"] = args
        # securityContext of the Deployment: capabilities drop ALL, allowPrivilegeEscalation false.
        process["capabilities"] = {
            k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
        }
        process["noNewPrivileges"] = True
        # umoci's default caps open files at 1024; a node's runtime passes its own higher limit on.
        process.pop("rlimits", None)
        spec["root"] = {"path": str(image.rootfs), "readonly": True}
        # The host's network, so the test reaches the server on 127.0.0.1 (ports chosen free).
        spec["linux"]["namespaces"] = [
            ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"
        ]
        spec["mounts"].append(
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", "size=16m"],
            }
        )
        for destination, source in (binds or {}).items():
            spec["mounts"].append(
                {
                    "destination": destination,
                    "type": "bind",
                    "source": str(source),
                    "options": ["rbind", "ro", "nosuid", "nodev"],
                }
            )
        (self.bundle / "config.json").write_text(json.dumps(spec))

    def _runc(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.state), *args]

    def run(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                self._runc("run", "--bundle", str(self.bundle), self.id),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        finally:
            self.delete()

    @contextlib.contextmanager
    def started(self) -> Iterator[subprocess.Popen[bytes]]:
        # Output to a file, not a pipe: a server logging faster than the test reads would block on a
        # full pipe and look hung.
        with open(self.log, "wb") as log:
            proc = subprocess.Popen(
                self._runc("run", "--bundle", str(self.bundle), self.id),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                subprocess.run(self._runc("kill", self.id, "KILL"), capture_output=True)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
            self.delete()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pid(self) -> int:
        out = subprocess.run(
            self._runc("state", self.id), capture_output=True, text=True, check=True
        )
        return int(json.loads(out.stdout)["pid"])

    def signal(self, sig: str) -> None:
        subprocess.run(self._runc("kill", self.id, sig), capture_output=True, check=True)

    def delete(self) -> None:
        subprocess.run(self._runc("delete", "--force", self.id), capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_help_says_how_to_build_cache_and_load_the_image():
    r = build("--help", timeout=30)
    assert r.returncode == 0, r.stderr
    for needle in (
        "--output oci:DIR",
        "docker-archive:FILE",
        "--push docker://",
        "~/.cache/mirrorgate}/image/",
        "ctr -n k8s.io images import",
        "kind load image-archive",
        "k3d image import",
        "skopeo copy",
    ):
        assert needle in r.stdout, f"--help does not mention {needle!r}:\n{r.stdout}"


def test_build_refuses_to_run_without_root_and_says_why():
    # As root, drop to nobody the way a user without sudo would run it.
    cmd = [str(BUILD_IMAGE), "--output", "oci:/nonexistent"]
    if os.geteuid() == 0:
        require(shutil.which("setpriv") is not None, "setpriv is missing: install util-linux")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert r.stdout == ""
    assert "must run as root" in r.stderr, r.stderr


def test_image_runs_mirrorgate_serve_as_nonroot_with_the_deployments_paths(image):
    cfg = image.config["config"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == ["mirrorgate", "serve"]
    # The default arguments name the files where `mirrorgate deploy` mounts them.
    assert cfg["Cmd"] == [
        "--config",
        CONFIG_FILE,
        "--tls-cert",
        f"{TLS_DIR}/tls.crt",
        "--tls-key",
        f"{TLS_DIR}/tls.key",
    ]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PATH"].startswith("/opt/mirrorgate/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert set(cfg["ExposedPorts"]) == {"8443/tcp", "9090/tcp"}
    assert image.runtime_config["process"]["user"] == {"uid": UID, "gid": UID}


def test_version_inside_the_image(image, tmp_path):
    r = Container(image, tmp_path, args=["mirrorgate", "--version"]).run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "mirrorgate 0.1.0"


def test_serve_answers_healthz_over_tls_on_a_read_only_root(image, tmp_path):
    config_dir, tls_dir, certs = tmp_path / "config", tmp_path / "tls", tmp_path / "issued"
    config_dir.mkdir()
    (config_dir / "mirrorgate.yaml").write_text(CONFIG)
    issue = subprocess.run(
        [
            mirrorgate_exe(),
            "certs",
            "issue",
            "--service",
            "mirrorgate",
            "--namespace",
            "mirrorgate",
            "--name",
            "127.0.0.1",
            "--out",
            str(certs),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issue.returncode == 0, issue.stderr
    # As the Deployment mounts the Secret: mode 0440, group 65532 (its fsGroup), owner root.
    tls_dir.mkdir()
    for name in ("tls.crt", "tls.key"):
        shutil.copyfile(certs / name, tls_dir / name)
        os.chown(tls_dir / name, 0, UID)
        os.chmod(tls_dir / name, 0o440)
    for d in (config_dir, tls_dir):
        os.chmod(d, 0o755)
    port, mport = free_port(), free_port()
    # The image's own entrypoint and default arguments, plus listen addresses free on this machine.
    args = [
        *image.runtime_config["process"]["args"],
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
    ]
    binds = {str(Path(CONFIG_FILE).parent): config_dir, TLS_DIR: tls_dir}
    container = Container(image, tmp_path, args=args, binds=binds)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with container.started() as proc:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=5
                ) as r:
                    assert r.status == 200
                    break
            except urllib.error.HTTPError as err:
                # An answer, just the wrong one: no point waiting for a better one.
                pytest.fail(f"/healthz answered {err.code}:\n{tail(container.output(), lines=5)}")
            except OSError as err:
                if proc.poll() is not None:
                    pytest.fail(f"mirrorgate serve exited {proc.returncode}:\n{container.output()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no answer on /healthz in 30 s: {err}\n{tail(container.output())}")
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            assert b"mirrorgate_certificate_expiry_timestamp_seconds" in r.read()
        # The process itself: uid and gid 65532, no capabilities at all. It is PID 1 of its
        # namespace (no shell, no init), so the TERM below only works if it handles the signal.
        status = Path(f"/proc/{container.pid()}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split() == [str(UID)] * 4
        assert fields["Gid"].split() == [str(UID)] * 4
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
        container.signal("TERM")
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mirrorgate serve did not stop on SIGTERM:\n{tail(container.output())}")
        stderr = container.output()
    assert rc == 0, stderr
    messages = [json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{")]
    assert "serving" in messages and "stopped" in messages, stderr
    assert "Read-only file system" not in stderr


def stale_reason(src: Path, pyc: Path) -> str | None:
    """Why Python would ignore ``pyc`` for ``src`` (PEP 552 header), or None if it would use it."""
    data = pyc.read_bytes()
    (flags,) = struct.unpack("<I", data[4:8])
    if flags & 0b01:  # hash-based; bit 2 says whether the import checks it
        same_python = data[:4] == importlib.util.MAGIC_NUMBER
        if (
            flags & 0b10
            and same_python
            and data[8:16] != importlib.util.source_hash(src.read_bytes())
        ):
            return "source hash differs"
        return None
    mtime, size = struct.unpack("<II", data[8:16])
    st = src.stat()
    if mtime != int(st.st_mtime) & 0xFFFFFFFF or size != st.st_size & 0xFFFFFFFF:
        return f"timestamp {mtime} but the source's is {int(st.st_mtime)}"
    return None


def test_bytecode_is_compiled_at_build_time_and_still_current(image):
    # With PYTHONDONTWRITEBYTECODE and a read-only root nothing is ever cached at run time, so each
    # module's .pyc must ship in the image and still match its source, or every start recompiles
    # the kubernetes client.
    site = image.rootfs / SITE
    stale, missing, checked = [], [], 0
    for pkg in ("mirrorgate", "kubernetes/client", "aiohttp", "cryptography", "yaml"):
        for src in (site / pkg).rglob("*.py"):
            pyc = src.parent / "__pycache__" / f"{src.stem}.cpython-311.pyc"
            if not pyc.exists():
                missing.append(str(src.relative_to(site)))
                continue
            reason = stale_reason(src, pyc)
            if reason:
                stale.append(f"{src.relative_to(site)}: {reason}")
            checked += 1
    assert checked > 100
    assert not missing, f"{len(missing)} modules without bytecode, e.g. {missing[:5]}"
    assert not stale, f"{len(stale)} stale .pyc files, e.g. {stale[:5]}"


def test_image_holds_the_runtime_package_and_no_development_tooling(image):
    root, site = image.rootfs, image.rootfs / SITE
    # One import root holding exactly the runtime subpackages (mirrorgate is a namespace package).
    assert sorted(p.name for p in (site / "mirrorgate").iterdir()) == ["certs", "deploy", "webhook"]
    dists = sorted(p.name for p in site.glob("*.dist-info"))
    assert [d for d in dists if d.startswith("mirrorgate")] == ["mirrorgate-0.1.0.dist-info"]
    for name in ("tests", "bench", "devtools", "pip", "setuptools", "pkg_resources"):
        assert not (site / name).exists(), f"{SITE}/{name} is in the image"
    assert not (root / "src").exists(), "the build stage's source tree is in the image"
    assert not list((root / "opt/mirrorgate/bin").glob("pip*"))
    for tool in ("gcc", "cc", "c++", "make", "ld", "as", "git"):
        for d in ("usr/bin", "usr/local/bin"):
            assert not (root / d / tool).exists(), f"/{d}/{tool} is in the image"
    assert not (root / "root/.cache").exists(), "a pip cache is in the image"
    # What scripts/build-image bind-mounts into the build for pip must stay out of every layer.
    assert not (root / "etc/pip.conf").exists() and not (root / "run/mirrorgate-build").exists()
    lists = [p.name for p in (root / "var/lib/apt/lists").glob("*") if p.is_file()]
    assert [n for n in lists if n != "lock"] == [], f"apt lists in the image: {lists}"
    assert not list((root / "var/cache/apt/archives").glob("*.deb"))


def test_image_size_stays_small(image, record_property):
    compressed = sum(layer["size"] for layer in image.manifest["layers"]) / 1e6
    seen: set[tuple[int, int]] = set()
    unpacked = 0
    for dirpath, _dirs, files in os.walk(image.rootfs):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                unpacked += st.st_size
    unpacked_mb = unpacked / 1e6
    record_property("image_compressed_mb", round(compressed, 1))
    record_property("image_unpacked_mb", round(unpacked_mb, 1))
    print(f"image {TAG}: {compressed:.1f} MB compressed, {unpacked_mb:.1f} MB unpacked")
    assert compressed < MAX_COMPRESSED_MB, f"{compressed:.1f} MB compressed"
    assert unpacked_mb < MAX_UNPACKED_MB, f"{unpacked_mb:.1f} MB unpacked"


def test_rebuild_with_nothing_changed_comes_from_the_cache(image, tmp_path):
    started = time.monotonic()
    r = build("--tag", TAG, "--output", f"oci:{tmp_path / 'again'}", timeout=300)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, tail(r.stderr)
    assert r.stdout.splitlines() == [f"oci:{tmp_path / 'again'}:{TAG}"]
    assert "cached image" in r.stderr, r.stderr
    digest, _manifest, _config = read_layout(tmp_path / "again", TAG)
    assert digest == image.manifest_digest
    assert elapsed < 60, f"a cached rebuild took {elapsed:.0f} s"


def test_docker_archive_output_names_the_image_for_containerd(image, tmp_path):
    archive = tmp_path / "mirrorgate.tar"
    r = build("--tag", TAG, "--output", f"docker-archive:{archive}", timeout=300)
    assert r.returncode == 0, tail(r.stderr)
    assert r.stdout.strip() == f"docker-archive:{archive}:{TAG}"
    listing = subprocess.run(
        ["tar", "-xOf", str(archive), "manifest.json"], capture_output=True, check=True
    )
    (entry,) = json.loads(listing.stdout)
    # `ctr images import`, `kind load image-archive` and `k3d image import` name it from RepoTags.
    assert entry["RepoTags"] == [f"docker.io/library/{TAG}"]


def test_push_puts_the_same_image_in_a_registry(image, tmp_path):
    require(shutil.which("docker-registry") is not None, "docker-registry is missing: run setup")
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"docker://{registry.host}/mirrorgate:0.1.0"
        r = build("--tag", TAG, "--push", ref, "--insecure", timeout=300)
        assert r.returncode == 0, tail(r.stderr)
        assert r.stdout.strip() == ref
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    assert f"sha256:{hashlib.sha256(raw).hexdigest()}" == image.manifest_digest


def test_build_without_the_package_index_fails_early_and_says_so(image):
    # The base is cached by now; a different index changes the image's key, so pip must reach it.
    # Port 9 on the loopback answers nothing: the script has to notice before buildah starts.
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    r = subprocess.run(
        [str(BUILD_IMAGE), "--tag", TAG],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 1
    assert r.stdout == ""
    assert "cannot reach the package index at http://127.0.0.1:9/simple/" in r.stderr, r.stderr
    assert "buildah bud" not in r.stderr
