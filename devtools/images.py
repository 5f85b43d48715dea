"""Tiny OCI images built on this machine for the local node: no image comes from a registry.

Owns three images and the two ways they reach a node:

- `pause_image()`: the pod sandbox. A 20-line static C program (the same logic as Kubernetes'
  own `build/pause/linux/pause.c`) compiled with `gcc -static`; without gcc, busybox-static
  running a shell loop (see `_PAUSE_SCRIPT` for why that is acceptable).
- `app_image()`: busybox-static with its applet links; it prints one line and sleeps.
- `registry_image()`: Debian's `docker-registry` binary. It is dynamically linked, so the image
  carries the libraries `ldd` names (libc and the loader) at the paths the binary asks for.

Each image is an OCI image layout (oci-layout, index.json, one gzip layer, config, manifest)
written with the standard library, byte for byte reproducible (sorted entries, uid 0, mtime 0),
and cached under `<cache>/images/<name>-<hash of every input>/`: a changed busybox, libc, source
or script gives a new folder, an unchanged one is reused without rebuilding.

`import_images()` loads images into a containerd (`ctr images import` of the layout as a tar), for
images a node must have without pulling (the pause image, the registry).
`push_image()` pushes to a registry with skopeo; credentials go through a private auth file, never
the command line.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import platform
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mirrorgate.devtools.localcluster import LocalClusterError, cache_root

# Part of every cache key: bump when the layout writer or an image recipe changes.
BUILDER_VERSION = "2"
LOCAL_REGISTRY_HOST = "mirrorgate.local"
PAUSE_IMAGE = f"{LOCAL_REGISTRY_HOST}/pause:1"
APP_IMAGE = f"{LOCAL_REGISTRY_HOST}/app:1"
REGISTRY_IMAGE = f"{LOCAL_REGISTRY_HOST}/registry:1"
APP_LINE = "mirrorgate demo app: up and running"
REGISTRY_PORT = 5000
TOOL_TIMEOUT = 120.0

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_IMAGE_NAME = "io.containerd.image.name"

# The logic of Kubernetes' pause: exit 0 on SIGINT/SIGTERM, reap every child on SIGCHLD (with
# shareProcessNamespace the sandbox is PID 1 of the whole pod and inherits its orphans).
PAUSE_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void sigdown(int signo) {
  psignal(signo, "mirrorgate pause: shutting down, got signal");
  exit(0);
}

static void sigreap(int signo) {
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction down = {.sa_handler = sigdown};
  struct sigaction reap = {.sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP};
  if (getpid() != 1) fprintf(stderr, "mirrorgate pause: warning: not PID 1\n");
  if (sigaction(SIGINT, &down, NULL) < 0) return 1;
  if (sigaction(SIGTERM, &down, NULL) < 0) return 2;
  if (sigaction(SIGCHLD, &reap, NULL) < 0) return 3;
  for (;;) pause();
}
"""

# Fallback pause without gcc. As PID 1 of its PID namespace busybox ash gets no default signal
# actions, so TERM/INT must be trapped (done); `wait` returns as soon as a trapped signal arrives.
# ash reaps only its own children, not adopted orphans: that matters only for pods with
# shareProcessNamespace, which nothing here uses.
_PAUSE_SCRIPT = 'trap "exit 0" TERM INT; while :; do sleep 2147483647 & wait $!; done'

# The app: PID 1 of its container, so it traps TERM itself (else the kubelet waits out the whole
# grace period before SIGKILL); `sleep & wait` keeps the shell able to act on the signal.
_APP_SCRIPT = 'trap "exit 0" TERM INT; echo "$APP_LINE"; while :; do sleep 3600 & wait $!; done'

# distribution's configuration inside the registry image. Auth is added per pod through the
# documented environment overrides (REGISTRY_AUTH=htpasswd, REGISTRY_AUTH_HTPASSWD_PATH, ...).
REGISTRY_CONFIG = {
    "version": "0.1",
    "log": {"level": "info", "fields": {"service": "registry"}},
    "storage": {
        "filesystem": {"rootdirectory": "/var/lib/registry"},
        "delete": {"enabled": True},
        "cache": {"blobdescriptor": "inmemory"},
    },
    "http": {"addr": f":{REGISTRY_PORT}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
}


class ImageBuildError(LocalClusterError):
    """An image could not be built, imported or pushed; the message says which tool failed."""


@dataclass(frozen=True)
class OciImage:
    """An OCI image layout on disk holding one tagged image."""

    name: str
    layout: Path
    tag: str
    reference: str  # the name a node knows it by, e.g. mirrorgate.local/pause:1
    digest: str  # of the manifest
    size: int  # bytes of all blobs

    @property
    def oci_ref(self) -> str:
        """The skopeo/containers-transport name: `oci:<layout>:<tag>`."""
        return f"oci:{self.layout}:{self.tag}"

    def blob_digests(self) -> list[str]:
        """Digests of the config and layers: the blobs a client pulling this image fetches."""
        manifest_path = self.layout / "blobs" / "sha256" / self.digest.removeprefix("sha256:")
        manifest = json.loads(manifest_path.read_text())
        return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


@dataclass(frozen=True)
class _Entry:
    """One tar entry: a file (from `source` or `data`), a directory or a symlink."""

    path: str
    kind: str  # "file", "dir" or "symlink"
    mode: int = 0o755
    source: Path | None = None
    data: bytes | None = None
    target: str = ""

    def content(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.source is None:
            return b""
        return self.source.read_bytes()


def _file(
    path: str, *, source: Path | None = None, data: bytes | None = None, mode: int = 0o755
) -> _Entry:
    return _Entry(path, "file", mode, source=source, data=data)


def _symlink(path: str, target: str) -> _Entry:
    return _Entry(path, "symlink", 0o777, target=target)


def _dir(path: str, mode: int = 0o755) -> _Entry:
    return _Entry(path, "dir", mode)


def _oci_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _layer_tar(entries: Iterable[_Entry]) -> bytes:
    """A reproducible tar: every parent directory present, sorted, root-owned, mtime 0."""
    by_path: dict[str, _Entry] = {}
    for entry in entries:
        relative = PurePosixPath(entry.path.lstrip("/"))
        for parent in reversed(relative.parents[:-1]):
            by_path.setdefault(str(parent), _dir(str(parent)))
        by_path[str(relative)] = entry
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(by_path):
            entry = by_path[path]
            info = tarfile.TarInfo(path)
            info.mode, info.mtime, info.uid, info.gid = entry.mode, 0, 0, 0
            info.uname = info.gname = "root"
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
                tar.addfile(info)
            else:
                data = entry.content()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = _sha256(data)
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _write_layout(
    layout: Path, *, entries: Sequence[_Entry], config: Mapping[str, Any], tag: str
) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    tar_bytes = _layer_tar(entries)
    # mtime=0 keeps the gzip header, and so every digest, a function of the inputs alone.
    layer = _put_blob(layout, gzip.compress(tar_bytes, compresslevel=6, mtime=0))
    image_config = {
        "architecture": _oci_arch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": dict(config),
        "rootfs": {"type": "layers", "diff_ids": [_sha256(tar_bytes)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "mirrorgate.devtools"}],
    }
    config_blob = _put_blob(layout, _canonical_json(image_config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config_blob},
        "layers": [{"mediaType": OCI_LAYER_GZIP, **layer}],
    }
    top = {
        "mediaType": OCI_MANIFEST,
        **_put_blob(layout, _canonical_json(manifest)),
        "annotations": {REF_NAME: tag},
    }
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [top]}, indent=2) + "\n"
    )


def _load(name: str, layout: Path, reference: str) -> OciImage:
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    size = sum(blob.stat().st_size for blob in (layout / "blobs" / "sha256").iterdir())
    return OciImage(
        name=name,
        layout=layout,
        tag=top["annotations"][REF_NAME],
        reference=reference,
        digest=top["digest"],
        size=size,
    )


def _cached_image(
    name: str,
    *,
    reference: str,
    key_parts: Sequence[str],
    build: Callable[[], tuple[Sequence[_Entry], Mapping[str, Any]]],
    cache: Path | None,
) -> OciImage:
    """The image from `<cache>/images/<name>-<key>/`, built by `build()` only on a miss.

    `key_parts` must name every input `build()` reads (file hashes, tool versions, scripts).
    A build goes to a temporary sibling that is renamed into place, so a crash mid-build never
    leaves a half-written folder that looks cached, and two concurrent builders both succeed.
    """
    key = hashlib.sha256("\n".join([BUILDER_VERSION, name, reference, *key_parts]).encode())
    root = (cache or cache_root()) / "images"
    final = root / f"{name}-{key.hexdigest()[:16]}"
    if (final / "index.json").is_file():
        return _load(name, final, reference)
    root.mkdir(parents=True, exist_ok=True)
    entries, config = build()
    tag = reference.rpartition(":")[2]
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as scratch:
        staged = Path(scratch) / "layout"
        _write_layout(staged, entries=entries, config=config, tag=tag)
        try:
            staged.rename(final)
        except OSError:
            if not (final / "index.json").is_file():
                raise
    return _load(name, final, reference)


def _busybox() -> Path:
    found = shutil.which("busybox")
    if found is None:
        raise ImageBuildError("busybox is not installed: apt-get install -y busybox-static")
    path = Path(found).resolve()
    # A dynamically linked busybox (Debian's `busybox` package) would not run in an image
    # without its libraries.
    if _needed_libraries(path):
        raise ImageBuildError(
            f"{path} is dynamically linked: the images need busybox-static "
            "(apt-get install -y busybox-static)"
        )
    return path


def _applet_links(busybox: Path) -> list[_Entry]:
    result = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise ImageBuildError(f"{busybox} --list failed: {result.stderr.strip()}")
    applets = sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})
    # `[` and `[[` are applets too; a name with a slash would escape /bin. busybox lists itself:
    # a link named busybox would replace the binary.
    return [
        _symlink(f"/bin/{applet}", "busybox")
        for applet in applets
        if "/" not in applet and applet != "busybox"
    ]


def _hash_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pause_image(*, cache: Path | None = None) -> OciImage:
    """The pod sandbox image (`PAUSE_IMAGE`): static C pause with gcc, else busybox."""
    gcc = shutil.which("gcc")
    if gcc is not None:
        version = subprocess.run(
            [gcc, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[:1]

        def build_c() -> tuple[Sequence[_Entry], Mapping[str, Any]]:
            with tempfile.TemporaryDirectory(prefix="mirrorgate-pause-") as scratch:
                source, binary = Path(scratch) / "pause.c", Path(scratch) / "pause"
                source.write_text(PAUSE_C)
                result = subprocess.run(
                    [gcc, "-static", "-Os", "-s", "-o", str(binary), str(source)],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=TOOL_TIMEOUT,
                )
                if result.returncode != 0:
                    raise ImageBuildError(
                        "gcc -static could not build the pause program (is libc6-dev "
                        f"installed?): {result.stderr.strip()[-2000:]}"
                    )
                data = binary.read_bytes()
            return [_file("/pause", data=data)], {"Entrypoint": ["/pause"]}

        return _cached_image(
            "pause",
            reference=PAUSE_IMAGE,
            key_parts=["gcc", PAUSE_C, *version, _libc_version()],
            build=build_c,
            cache=cache,
        )
    busybox = _busybox()

    def build_sh() -> tuple[Sequence[_Entry], Mapping[str, Any]]:
        entries = [_file("/bin/busybox", source=busybox), *_applet_links(busybox)]
        return entries, {"Entrypoint": ["/bin/sh", "-c", _PAUSE_SCRIPT], "Env": ["PATH=/bin"]}

    return _cached_image(
        "pause",
        reference=PAUSE_IMAGE,
        key_parts=["busybox", _PAUSE_SCRIPT, _hash_file(busybox)],
        build=build_sh,
        cache=cache,
    )


def _libc_version() -> str:
    # A static binary embeds libc.a: a libc6-dev upgrade must give a new cache key.
    return " ".join(platform.libc_ver())


def _app_layer(busybox: Path, line: str) -> tuple[list[_Entry], dict[str, Any]]:
    """busybox with its applets, printing `line` and sleeping until TERM (_APP_SCRIPT)."""
    entries = [_file("/bin/busybox", source=busybox), *_applet_links(busybox), _dir("/tmp", 0o1777)]
    config = {
        "Env": ["PATH=/bin", f"APP_LINE={line}"],
        "Cmd": ["/bin/sh", "-c", _APP_SCRIPT],
        "WorkingDir": "/",
    }
    return entries, config


def app_image(
    *, line: str = APP_LINE, reference: str = APP_IMAGE, cache: Path | None = None
) -> OciImage:
    """busybox-static with its applets; prints `line` (env APP_LINE) and sleeps until TERM."""
    busybox = _busybox()

    def build() -> tuple[Sequence[_Entry], Mapping[str, Any]]:
        return _app_layer(busybox, line)

    return _cached_image(
        "app",
        reference=reference,
        key_parts=[line, _APP_SCRIPT, _hash_file(busybox)],
        build=build,
        cache=cache,
    )


def payload_image(*, megabytes: int, reference: str, cache: Path | None = None) -> OciImage:
    """The app image (prints `mirrorgate payload <N> MB`) plus `megabytes` of incompressible
    bytes in /payload.bin (seeded, so the same size always gives the same digest): what a
    pull of an image of that size costs (the pod-start bench)."""
    busybox = _busybox()
    line = f"mirrorgate payload {megabytes} MB"

    def build() -> tuple[Sequence[_Entry], Mapping[str, Any]]:
        seeded = random.Random(f"mirrorgate-payload-{megabytes}")
        payload = b"".join(seeded.randbytes(1 << 20) for _ in range(megabytes))
        entries, config = _app_layer(busybox, line)
        return [*entries, _file("/payload.bin", data=payload, mode=0o644)], config

    return _cached_image(
        f"payload-{megabytes}m",
        reference=reference,
        key_parts=[line, _APP_SCRIPT, _hash_file(busybox), str(megabytes), "1 MiB chunks"],
        build=build,
        cache=cache,
    )


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)$")


def _needed_libraries(binary: Path) -> list[Path]:
    """Absolute paths `ldd` names for `binary` (loader included), [] for a static binary."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise ImageBuildError("ldd is missing (Debian package libc-bin)")
    result = subprocess.run([ldd, str(binary)], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in result.stdout + result.stderr:
        return []
    if result.returncode != 0:
        raise ImageBuildError(f"ldd {binary} failed: {result.stderr.strip()}")
    found = []
    for line in result.stdout.splitlines():
        if "not found" in line:
            raise ImageBuildError(f"{binary} needs a library that is not installed: {line.strip()}")
        match = _LDD_LINE.match(line)
        if match:
            found.append(Path(match.group(2)))
    return found


def registry_image(*, cache: Path | None = None) -> OciImage:
    """Debian's docker-registry (distribution 2.8) with its libraries, serving on :5000."""
    found = shutil.which("docker-registry")
    if found is None:
        raise ImageBuildError(
            "docker-registry is not installed: apt-get install -y docker-registry"
        )
    binary = Path(found).resolve()
    libraries = _needed_libraries(binary)
    config_yml = json.dumps(REGISTRY_CONFIG, indent=2).encode() + b"\n"  # JSON is valid YAML

    def build() -> tuple[Sequence[_Entry], Mapping[str, Any]]:
        # Each library goes where the binary looks for it (the loader at its PT_INTERP path,
        # libc on the loader's default search path); content from the resolved file.
        entries = [
            _file("/usr/bin/docker-registry", source=binary),
            # The official image calls it `registry` (the deployer's GC CronJob runs that name).
            _symlink("/usr/bin/registry", "docker-registry"),
            *(_file(str(lib), source=lib.resolve(), mode=0o755) for lib in libraries),
            _file("/etc/docker/registry/config.yml", data=config_yml, mode=0o644),
            _dir("/var/lib/registry"),
            _dir("/tmp", 0o1777),
        ]
        config = {
            "Entrypoint": ["/usr/bin/docker-registry"],
            "Cmd": ["serve", "/etc/docker/registry/config.yml"],
            "ExposedPorts": {f"{REGISTRY_PORT}/tcp": {}},
            "Volumes": {"/var/lib/registry": {}},
        }
        return entries, config

    key_parts = [
        "layout 2: /usr/bin/registry link",  # bump when the entries above change
        config_yml.decode(),
        _hash_file(binary),
        *(f"{lib} {_hash_file(lib.resolve())}" for lib in libraries),
    ]
    return _cached_image(
        "registry", reference=REGISTRY_IMAGE, key_parts=key_parts, build=build, cache=cache
    )


# getting images onto a node ----------------------------------------------------------------
def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ImageBuildError(f"{name} is not installed: apt-get install -y {package}")
    return found


def _run(argv: Sequence[str], *, what: str) -> None:
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, timeout=TOOL_TIMEOUT
        )
    except subprocess.TimeoutExpired as err:
        raise ImageBuildError(f"{what} timed out after {TOOL_TIMEOUT:.0f}s") from err
    if result.returncode != 0:
        raise ImageBuildError(f"{what} failed ({result.returncode}): {result.stderr.strip()}")


def _oci_archive(image: OciImage, archive: Path) -> None:
    """A tar of the image's layout whose index names the image (`io.containerd.image.name`).

    That annotation is how `ctr images import` names what it imports from an OCI archive; the
    cached layout itself stays untouched.
    """
    index = json.loads((image.layout / "index.json").read_text())
    for entry in index["manifests"]:
        entry.setdefault("annotations", {})[CONTAINERD_IMAGE_NAME] = image.reference
    index_bytes = json.dumps(index, indent=2).encode() + b"\n"
    with tarfile.open(archive, "w") as tar:
        tar.add(image.layout / "oci-layout", arcname="oci-layout")
        info = tarfile.TarInfo("index.json")
        info.size, info.mode = len(index_bytes), 0o644
        tar.addfile(info, io.BytesIO(index_bytes))
        tar.add(image.layout / "blobs", arcname="blobs")


def import_images(
    images: Sequence[OciImage],
    *,
    socket: Path,
    work_dir: Path,
    namespace: str = "k8s.io",
) -> float:
    """Load `images` into the containerd at `socket` under their `reference`; returns seconds.

    `k8s.io` is the namespace the CRI plugin (and so the kubelet) sees. Images loaded this way
    are present on the node: pods using them with `imagePullPolicy: IfNotPresent` or `Never`
    never contact a registry.

    `ctr images import` reads the OCI layout as a tar directly. Not through `skopeo copy ...
    docker-archive:`: skopeo running as root keeps a blob-info cache in /var/lib/containers,
    which would be host state a node leaves behind.
    """
    ctr = _tool("ctr", "containerd")
    started = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)
    for image in images:
        archive = work_dir / f"{image.name}-{image.digest.removeprefix('sha256:')[:12]}.tar"
        _oci_archive(image, archive)
        try:
            _run(
                [ctr, "--namespace", namespace, "--address", str(socket)]
                + ["images", "import", str(archive)],
                what=f"ctr images import of {image.reference}",
            )
        finally:
            archive.unlink(missing_ok=True)
    return time.monotonic() - started


def push_image(
    image: OciImage,
    destination: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls_verify: bool = False,
) -> None:
    """Push `image` to `destination` (`host:port/repo:tag`) with skopeo.

    Credentials go into a private (0600) auth file that skopeo reads, never the command line, so
    they show up neither in the process list nor in an error message. (skopeo run as root, like
    every skopeo call of the test suite, keeps its blob-info cache in /var/lib/containers/cache.)
    """
    skopeo = _tool("skopeo", "skopeo")
    host = destination.split("/", 1)[0]
    argv = [skopeo, "copy", "--quiet", f"--dest-tls-verify={str(tls_verify).lower()}"]
    with tempfile.TemporaryDirectory(prefix="mirrorgate-push-") as scratch:
        if username is not None and password is not None:
            auth_file = Path(scratch) / "auth.json"
            token = base64.b64encode(f"{username}:{password}".encode()).decode()
            fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"auths": {host: {"auth": token}}}, out)
            argv.append(f"--dest-authfile={auth_file}")
        _run(
            [*argv, image.oci_ref, f"docker://{destination}"],
            what=f"skopeo push of {image.name} to {destination}",
        )
