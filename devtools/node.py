"""A real Kubernetes node on this machine for a `ControlPlane`: pods are scheduled, pulled by
containerd and run.

Owns `LocalNode`: containerd (with runc and the CNI bridge plugin), kubelet, kube-proxy
(iptables mode), kube-controller-manager and kube-scheduler, all v1.20, all started with
`subprocess.Popen` against a running `ControlPlane` and stopped by PID. Everything it can keep
private is private: ports (`free_port()`), folders under its work dir (containerd root and state,
the kubelet's root dir, CNI config and IPAM data, logs), a cgroup root of its own, a bridge of its
own (`mgbr0`, 10.217.0.0/24; the node's IP is the bridge's .1, NodePorts answer only on
127.0.0.1), client certificates from the control plane's CA.

What cannot be private is host state: iptables chains (`KUBE-*`), `route_localnet` (kube-proxy
always sets it), a few folders the kubelet and containerd hard-code (`HOST_FOLDERS`), mounts. A
node records what the host looked like before it started (in `<cache>/node/state.json`) and
`stop()` puts it back exactly: only what did not exist before is removed. When a run dies without
`stop()`, the next `start()` finds the record and cleans up after it first; a lock file keeps two
nodes from sharing the machine.

The settings come from what this kind of machine forces (see the constants and comments):
no CAP_SYS_RESOURCE (`restrict_oom_score_adj`, `oomScoreAdj: 0`), cgroup v1 (`cgroupfs`),
no internet registry (images built locally by `mirrorgate.devtools.images`), and a kubelet built
to only warn about kernel tunables (`protectKernelDefaults: true`, see
`scripts/control-plane-assets`) so it never rewrites the machine's sysctls.

`preflight()` / `node_unavailable_reason()` say in one line why a machine cannot run a node (not
root, no cgroup v1 controllers, missing Debian packages or binaries); callers such as the demo
then run without one and print the reason.

With `cluster_services=True` pods also use the cluster the way in-cluster workloads do (a
webhook Deployment, a registry pull-through cache): they reach Services by ClusterIP and by name,
and the API server through the `kubernetes` Service. What that adds, and why it is shaped so:

- a route to the service range in every pod, via the node IP (the CNI IPAM `routes`); without it
  a pod has only its on-link subnet;
- IPv4 forwarding for packets that arrive on the bridge only (`net.ipv4.conf.<bridge>.forwarding`,
  never the machine-wide `ip_forward`): a pod's packet to a ClusterIP is translated by
  kube-proxy's rules to another pod's address and goes back out of the bridge, which is
  forwarding. The setting belongs to the bridge and disappears with it;
- a host route for the service range through the bridge (source: the node IP), so the API server
  reaches a webhook's ClusterIP on any machine, with or without a default route; it too goes
  with the bridge;
- the API server on the node IP: a TCP relay (a thread of this process) from `<node IP>:<port>`
  to the API server's loopback port, and the `kubernetes` Service's Endpoints and EndpointSlice
  pointing at it (the API server runs with no endpoint reconciler: its 127.0.0.1 means the pod
  itself inside a pod). TLS passes through untouched; the API server's certificate names
  10.0.0.1 and `kubernetes.default.svc`, which is what in-cluster clients check;
- cluster DNS (`mirrorgate.devtools.dns`, a thread of this process) on `<node IP>:53`, named as
  the kubelet's `clusterDNS`.
`stop()` removes the Endpoints and EndpointSlice again; the relay and DNS sockets close with it.
`kubelet_sync_seconds` shortens the kubelet's sync period (default 1 minute), which is how soon
an updated Secret or ConfigMap reaches a mounted volume.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from mirrorgate.devtools.dns import DEFAULT_DOMAIN, ClusterDNS
from mirrorgate.devtools.images import OciImage, import_images, pause_image
from mirrorgate.devtools.localcluster import (
    NODE_BINARIES,
    SERVICE_CLUSTER_IP_RANGE,
    ChildProcess,
    ControlPlane,
    LocalClusterError,
    cache_root,
    find_assets,
    free_port,
    http_answers,
    log_tail,
    write_private,
)

log = logging.getLogger(__name__)

DEFAULT_NODE_NAME = "mirrorgate-node"
# Chosen to be unlikely on a developer machine or CI runner; start() refuses to use them when
# anything else already does.
DEFAULT_BRIDGE = "mgbr0"
DEFAULT_SUBNET = "10.217.0.0/24"
READY_TIMEOUT = 120.0
COMPONENT_STOP_GRACE = 5.0
TOOL_TIMEOUT = 60.0
CNI_BIN_DIR = Path("/usr/lib/cni")

# Folders the kubelet, containerd and CNI create on the host whatever they are configured with
# (kubelet: pod logs and device-plugin socket dir; containerd: shim sockets; CNI: result cache;
# libmount, when the kubelet mounts a volume with mount(8): its utab folder).
HOST_FOLDERS = (
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet/device-plugins",
    "/run/containerd",
    "/run/netns",
    "/var/lib/cni",
    "/run/mount",
)
# What snapshot_host_state() watches: HOST_FOLDERS, plus where these programs put things by
# default (so a setting that stops being private shows up), never whole shared folders like /run
# that other programs on the machine change at any time.
WATCHED_PATHS = (
    *HOST_FOLDERS,
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/kube-proxy",
    "/var/run/kubernetes",
    "/etc/kubernetes",
    "/etc/cni",
    "/etc/containerd",
    "/opt/cni",
    "/opt/containerd",
    "/usr/libexec/kubernetes",
)
# Every sysctl a component could change: kube-proxy sets route_localnet (always) and the conntrack
# ones (not with the zero settings used here); the kubelet the kernel/vm ones (not with
# protectKernelDefaults); the bridge plugin ip_forward (not with isGateway false). Recorded at
# start and put back at stop when they differ.
SYSCTLS = (
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
)
CGROUP_PREFIX = "mirrorgate-node-"
IPTABLES = ("iptables", "ip6tables")
IPTABLES_TABLES = ("nat", "filter", "mangle")
CGROUP_V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer")
# program -> Debian package that provides it
REQUIRED_PROGRAMS = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "ip6tables": "iptables",
    "ip6tables-save": "iptables",
    "ip6tables-restore": "iptables",
    "conntrack": "conntrack",
    "ip": "iproute2",
    "mount": "mount",
}
REQUIRED_CNI_PLUGINS = ("bridge", "host-local", "loopback")
# What a node run starts (directly or, for the shims and runc, through containerd).
NODE_PROGRAMS = frozenset(
    {
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "kubelet",
        "kube-proxy",
        "kube-controller-manager",
        "kube-scheduler",
    }
)
# A unix socket path longer than this cannot be bound (sun_path is 108 bytes).
MAX_SOCKET_PATH = 100
_MNT_DETACH = 2


class NodeUnavailableError(LocalClusterError):
    """This machine cannot run a local node; the message is one line saying why and what to do."""


# --- preflight ---------------------------------------------------------------------------------
def _missing_packages() -> list[str]:
    packages = {pkg for prog, pkg in REQUIRED_PROGRAMS.items() if shutil.which(prog) is None}
    if any(not (CNI_BIN_DIR / plugin).is_file() for plugin in REQUIRED_CNI_PLUGINS):
        packages.add("containernetworking-plugins")
    return sorted(packages)


# cgroup v1 mount options that are not controller names.
_CGROUP_MOUNT_FLAGS = frozenset(
    {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode"}
)


def _cgroup_mounts() -> dict[str, Path]:
    """Mounted cgroup hierarchies by name (`memory`, `name=systemd`, `unified` for cgroup2).

    Co-mounted controllers (e.g. `cpu,cpuacct`) map to the same folder.
    """
    found: dict[str, Path] = {}
    for entry in _mountinfo():
        if entry.fstype == "cgroup2":
            found["unified"] = entry.mount_point
        elif entry.fstype == "cgroup":
            for option in entry.super_options.split(","):
                if option not in _CGROUP_MOUNT_FLAGS and (
                    "=" not in option or option.startswith("name=")
                ):
                    found[option] = entry.mount_point
    return found


def _cgroup_folders() -> list[Path]:
    """Each mounted cgroup hierarchy once."""
    return sorted(set(_cgroup_mounts().values()))


def preflight(*, assets: Path | None = None) -> None:
    """Raise NodeUnavailableError (one line) when this machine cannot run a LocalNode (with the
    Kubernetes binaries in `assets`, default: find_assets(node=True))."""
    if not Path("/proc/self/mountinfo").exists():
        raise NodeUnavailableError("a local node needs Linux")
    if os.geteuid() != 0:
        raise NodeUnavailableError(
            "a local node needs root (it creates a bridge, iptables rules, mounts and cgroups)"
        )
    controllers = _cgroup_mounts()
    missing_controllers = [c for c in CGROUP_V1_CONTROLLERS if c not in controllers]
    if missing_controllers:
        only_v2 = "unified" in controllers and len(controllers) == 1
        raise NodeUnavailableError(
            "the kubelet 1.20 here runs on cgroup v1, and "
            + (
                "this machine has cgroup v2 only"
                if only_v2
                else "these cgroup v1 controllers are not mounted: "
                + ", ".join(missing_controllers)
            )
        )
    missing = _missing_packages()
    if missing:
        raise NodeUnavailableError(
            f"missing Debian packages for a local node: {', '.join(missing)} "
            f"(apt-get install -y {' '.join(missing)})"
        )
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise NodeUnavailableError(
            "the kernel has no overlay filesystem (containerd's overlayfs snapshotter needs it)"
        )
    if assets is not None:
        missing = [b for b in NODE_BINARIES if not os.access(assets / b, os.X_OK)]
        if missing:
            raise NodeUnavailableError(
                f"{assets} lacks {', '.join(missing)}; scripts/control-plane-assets builds them"
            )
        return
    try:
        find_assets(node=True)
    except LocalClusterError as err:
        raise NodeUnavailableError(str(err)) from None


def node_unavailable_reason(*, assets: Path | None = None) -> str | None:
    """None when preflight() passes, else its one-line reason (for callers that go on without)."""
    try:
        preflight(assets=assets)
    except NodeUnavailableError as err:
        return str(err)
    return None


# --- host inspection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Mount:
    mount_id: int
    mount_point: Path
    root: str
    fstype: str
    source: str
    super_options: str


def _unescape_mount(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _mountinfo() -> list[_Mount]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(
            _Mount(
                mount_id=int(fields[0]),
                mount_point=Path(_unescape_mount(fields[4])),
                root=_unescape_mount(fields[3]),
                fstype=tail[0],
                source=_unescape_mount(tail[1]),
                super_options=tail[2],
            )
        )
    return mounts


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,  # noqa: A002
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=TOOL_TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        raise LocalClusterError(f"{shlex.join(argv)} timed out after {TOOL_TIMEOUT:.0f}s") from err
    if check and result.returncode != 0:
        raise LocalClusterError(
            f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


def _read_sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:
        return None


def _iptables_dump(binary: str, table: str) -> list[str]:
    """`<binary>-save -t table` without comments, counters zeroed (they change with traffic)."""
    result = _run([f"{binary}-save", "-t", table], check=False)
    lines = []
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            continue
        lines.append(re.sub(r"\[\d+:\d+\]$", "[0:0]", line))
    return lines


def _kube_chains(dump: Iterable[str]) -> list[str]:
    return [line[1:].split()[0] for line in dump if line.startswith(":KUBE-")]


def snapshot_host_state(
    *, bridge: str = DEFAULT_BRIDGE, work_dirs: Sequence[Path] = ()
) -> dict[str, Any]:
    """What a node may touch on the host, in comparable form (for "left as found" checks).

    `iptables-save`/`ip6tables-save` of nat, filter and mangle, `ip -o link` (without the
    kernel's link counters), the SYSCTLS, the WATCHED_PATHS (exists? which entries?), the
    node cgroups at the top of each hierarchy, and the mounts a node could make
    (/proc/self/mountinfo without mount IDs): those under WATCHED_PATHS, `work_dirs` (where the
    nodes' own folders live) and /sys/fs/cgroup, and every network namespace. Mounts elsewhere are
    left out: other programs on a shared machine make and drop them at any time (a container
    build's overlays under /tmp, say).
    """
    roots = [Path(p) for p in WATCHED_PATHS] + [Path(p).resolve() for p in work_dirs]
    roots.append(Path("/sys/fs/cgroup"))
    mounts = sorted(
        f"{m.mount_point} {m.root} {m.fstype} {m.source}"
        for m in _mountinfo()
        if m.fstype == "nsfs" or any(m.mount_point.is_relative_to(root) for root in roots)
    )
    iptables = {
        f"{binary} {table}": _iptables_dump(binary, table)
        for binary in IPTABLES
        for table in IPTABLES_TABLES
    }
    links = sorted(
        re.sub(r"^\d+:\s*", "", line).split("\\")[0]
        for line in _run(["ip", "-o", "link"]).stdout.splitlines()
    )
    folders: dict[str, list[str] | None] = {}
    for folder in WATCHED_PATHS:
        path = Path(folder)
        folders[folder] = sorted(os.listdir(path)) if path.is_dir() else None
    # Only groups a node makes (its root; "kubepods" if cgroupRoot were ignored): other programs
    # on the machine (runc, a build) make and remove their own at any time.
    cgroups = {
        str(mount): sorted(
            p.name
            for p in mount.iterdir()
            if p.is_dir() and p.name.startswith((CGROUP_PREFIX, "kube"))
        )
        for mount in _cgroup_folders()
    }
    return {
        "mounts": mounts,
        "iptables": iptables,
        "links": links,
        "sysctls": {name: _read_sysctl(name) for name in SYSCTLS},
        "folders": folders,
        "cgroups": cgroups,
        "bridge_exists": Path(f"/sys/class/net/{bridge}").exists(),
    }


def _networks(words: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    found = []
    for word in words:
        with contextlib.suppress(ValueError):
            found.append(ipaddress.ip_network(word, strict=False))
    return found


def _proc_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (tells a PID from a reused one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _node_pids_matching(needles: Sequence[str]) -> list[int]:
    """Live node programs (NODE_PROGRAMS) whose command line contains one of `needles`.

    Only those programs: a shell or an editor that happens to name the work dir is left alone.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(os.fsdecode(argv[0])) not in NODE_PROGRAMS:
            continue
        cmdline = b" ".join(argv).decode(errors="replace")
        if any(needle in cmdline for needle in needles):
            found.append(int(entry.name))
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs (zombies count as gone); return those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- the record of what the host looked like ---------------------------------------------------
@dataclass
class _HostRecord:
    """What start() found and made, saved so a later run can undo a crashed one."""

    work_dir: str
    bridge: str
    cgroup_name: str
    containerd_socket: str
    owner_pid: int = field(default_factory=os.getpid)
    # (name, pid, start time) of every process started
    processes: list[tuple[str, int, int]] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    created_paths: list[str] = field(default_factory=list)  # topmost folders that did not exist
    folder_entries: dict[str, list[str]] = field(default_factory=dict)  # existing folders' entries
    made_bridge: bool = False

    def save(self, path: Path) -> None:
        staged = path.with_suffix(".tmp")
        write_private(staged, json.dumps(asdict(self), indent=2) + "\n")
        staged.replace(path)

    @classmethod
    def load(cls, path: Path) -> _HostRecord | None:
        try:
            data = json.loads(path.read_text())
            data["processes"] = [tuple(p) for p in data.get("processes", [])]
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as err:
            raise NodeUnavailableError(
                f"{path} (what an earlier node run changed on this machine) is unreadable: {err}; "
                "check the host by hand (ip link, iptables-save, mounts) and delete the file"
            ) from err


def _record_folders(record: _HostRecord) -> None:
    for folder in HOST_FOLDERS:
        path = Path(folder)
        if path.is_dir():
            record.folder_entries[folder] = sorted(os.listdir(path))
            continue
        top = path
        while not top.parent.exists():
            top = top.parent
        # Never a top-level folder: if /var or /run were missing, something else is wrong.
        if len(top.parts) < 3:
            raise NodeUnavailableError(f"{top} does not exist; a node would have to create it")
        if str(top) not in record.created_paths:
            record.created_paths.append(str(top))


def _paths_to_remove(record: _HostRecord) -> list[Path]:
    """Host paths made since `record` was taken: created folders and new entries of old ones."""
    paths = [Path(p) for p in record.created_paths]
    for folder, before in record.folder_entries.items():
        path = Path(folder)
        if path.is_dir():
            paths += [path / name for name in sorted(set(os.listdir(path)) - set(before))]
    return paths


# --- teardown steps (each safe to run on a half-made or already-clean host) -----------------------
def _cgroup_tree(root: Path) -> list[Path]:
    """`root` and every cgroup below it, deepest first. runc and the kubelet remove groups while
    this walks (a container that just exited), so vanished folders are skipped, not errors."""
    found = [Path(folder) for folder, _dirs, _files in os.walk(root, onerror=lambda _err: None)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _kill_cgroup_processes(cgroup_name: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in the cgroup root (all containers) until none is left."""
    roots = [mount / cgroup_name for mount in _cgroup_folders()]
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for root in roots:
            for group in _cgroup_tree(root):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in (group / "cgroup.procs").read_text().split())
        live = [pid for pid in pids if _alive(pid)]
        if not live:
            return
        if time.monotonic() > deadline:
            raise LocalClusterError(f"processes {live} in cgroup {cgroup_name} survive SIGKILL")
        for pid in live:
            _kill(pid)
        time.sleep(0.05)


def _kill_stale_processes(record: _HostRecord) -> None:
    """Kill what a run started: recorded PIDs (if not reused), then anything naming its folders."""
    pids = [
        pid
        for _name, pid, started in record.processes
        if _proc_start_time(pid) == started and _alive(pid)
    ]
    # containerd's shims are not our children: they carry the containerd socket in their argv.
    pids += _node_pids_matching([record.containerd_socket, record.work_dir])
    for pid in set(pids):
        _kill(pid)
    left = _wait_gone(set(pids), timeout=10)
    if left:
        raise LocalClusterError(f"processes {left} of the node run in {record.work_dir} survive")


def _unmount_under(roots: Sequence[Path]) -> None:
    """Unmount everything mounted at or below `roots`, newest first (children before parents)."""
    libc = ctypes.CDLL(None, use_errno=True)
    resolved = [root.resolve() for root in roots]
    for _attempt in range(5):
        mounts = [m for m in _mountinfo() if any(m.mount_point.is_relative_to(r) for r in resolved)]
        if not mounts:
            return
        for mount in sorted(mounts, key=lambda m: m.mount_id, reverse=True):
            target = os.fsencode(mount.mount_point)
            if libc.umount2(target, 0) != 0 and libc.umount2(target, _MNT_DETACH) != 0:
                code = ctypes.get_errno()
                if code not in (errno.EINVAL, errno.ENOENT):  # already gone
                    log.warning("could not unmount %s: %s", mount.mount_point, os.strerror(code))
    left = [
        str(m.mount_point)
        for m in _mountinfo()
        if any(m.mount_point.is_relative_to(r) for r in resolved)
    ]
    if left:
        raise LocalClusterError(f"mounts left behind: {', '.join(left)}")


def _delete_bridge(bridge: str) -> None:
    if not Path(f"/sys/class/net/{bridge}").exists():
        return
    # Pod veths die with their network namespace; any still attached go first, then the bridge.
    brif = Path(f"/sys/class/net/{bridge}/brif")
    for port in sorted(p.name for p in brif.iterdir()) if brif.is_dir() else []:
        _run(["ip", "link", "delete", port], check=False)
    _run(["ip", "link", "delete", bridge, "type", "bridge"])


def _remove_kube_iptables() -> None:
    """Delete every KUBE-* chain and every rule that jumps to one, in one transaction a table.

    Only called when start() found no KUBE-* chain, so they are all this node's: the kubelet's
    (KUBE-MARK-*, KUBE-FIREWALL, KUBE-KUBELET-CANARY) and kube-proxy's (KUBE-SERVICES, ...).
    """
    for binary in IPTABLES:
        for table in IPTABLES_TABLES:
            dump = _iptables_dump(binary, table)
            chains = _kube_chains(dump)
            jumps = [
                line
                for line in dump
                if line.startswith("-A ")
                and not line.split()[1].startswith("KUBE-")
                and re.search(r"-j KUBE-\S+", line)
            ]
            if not chains and not jumps:
                continue
            script = [f"*{table}"]
            script += ["-D " + line[3:] for line in jumps]
            script += [f"-F {chain}" for chain in chains]
            script += [f"-X {chain}" for chain in chains]
            script.append("COMMIT")
            _run([f"{binary}-restore", "--noflush"], input="\n".join(script) + "\n")


def _restore_sysctls(before: Mapping[str, str]) -> None:
    for name, value in before.items():
        if _read_sysctl(name) not in (None, value):
            (Path("/proc/sys") / name).write_text(value + "\n")
            log.info("restored sysctl %s = %s", name.replace("/", "."), value)


def _remove_cgroups(cgroup_name: str, timeout: float = 10.0) -> None:
    """rmdir the cgroup root in every hierarchy, children first (cgroupfs removes a group with
    rmdir; its control files go with it). A group whose last task is still exiting answers
    EBUSY for a moment: retried until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for mount in _cgroup_folders():
            for group in _cgroup_tree(mount / cgroup_name):
                try:
                    group.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as err:
                    left.append(f"{group} ({err.strerror})")
        if not left:
            return
        if time.monotonic() > deadline:
            raise LocalClusterError(f"cgroups left behind: {', '.join(left)}")
        time.sleep(0.1)


def _restore_host(record: _HostRecord) -> None:
    """Undo everything `record` says a run did (after its processes are gone). Every step runs;
    failures are collected and raised together."""
    problems = []
    steps: list[tuple[str, Callable[[], object]]] = [
        ("cgroup processes", lambda: _kill_cgroup_processes(record.cgroup_name)),
        ("processes", lambda: _kill_stale_processes(record)),
        (
            "mounts",
            lambda: _unmount_under([Path(record.work_dir), *_paths_to_remove(record)]),
        ),
        ("bridge", lambda: _delete_bridge(record.bridge) if record.made_bridge else None),
        ("iptables", _remove_kube_iptables),
        ("sysctls", lambda: _restore_sysctls(record.sysctls)),
        ("cgroups", lambda: _remove_cgroups(record.cgroup_name)),
        ("folders", lambda: _remove_paths(_paths_to_remove(record))),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as err:  # noqa: BLE001 - every step runs; each failure is reported
            problems.append(f"{what}: {err}")
    if problems:
        raise LocalClusterError("the host is not fully restored: " + "; ".join(problems))


def _remove_paths(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


# --- objects the node writes to the API --------------------------------------------------------
# 1.20 serves EndpointSlice as beta only; kube-proxy 1.20 reads slices, not Endpoints.
ENDPOINTSLICE_GROUP, ENDPOINTSLICE_VERSION = "discovery.k8s.io", "v1beta1"
# The label the API server's own endpoint reconciler puts on the `kubernetes` Endpoints, so the
# EndpointSlice mirroring controller leaves them to the slice written next to them.
ENDPOINTSLICE_SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"


def _create_or_replace(
    create: Callable[[], object], read: Callable[[], Any], replace: Callable[[str], object]
) -> None:
    """Create an object; if it exists, replace it (with the live resourceVersion)."""
    try:
        create()
    except ApiException as err:
        if err.status != 409:
            raise
        live = read()
        version = live["metadata"]["resourceVersion"] if isinstance(live, dict) else None
        replace(version or live.metadata.resource_version)


def _delete_ignoring_missing(delete: Callable[[], object]) -> None:
    try:
        delete()
    except ApiException as err:
        if err.status != 404:
            raise


class _NodeLock:
    """An exclusive flock on `<state_dir>/lock`: one node per machine. The kernel drops it when
    the holder dies, so a crashed run never blocks the next one."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeUnavailableError(
                f"another LocalNode runs on this machine (it holds {self.path}); nodes share "
                "iptables and host folders, so only one runs at a time"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _clean_up_record(state_dir: Path) -> bool:
    """With the lock held: undo what the run recorded in `state_dir` did, if one is recorded."""
    path = state_dir / "state.json"
    stale = _HostRecord.load(path)
    if stale is None:
        return False
    log.warning(
        "cleaning up after a node run (pid %d, %s) that did not stop",
        stale.owner_pid,
        stale.work_dir,
    )
    try:
        _restore_host(stale)
    except LocalClusterError as err:
        raise NodeUnavailableError(
            f"could not clean up after an earlier node run ({err}); fix it by hand and "
            f"delete {path}"
        ) from err
    path.unlink()
    return True


def clean_up_after_crashed_run(*, state_dir: Path | None = None) -> bool:
    """Undo what a node run that died without stop() left on this machine; True if it did.

    LocalNode.start() does this itself. Call it before taking a "before" snapshot of the host,
    so the snapshot shows the machine as it was before any node. Raises NodeUnavailableError
    while another LocalNode runs.
    """
    lock = _NodeLock(state_dir or cache_root() / "node")
    lock.acquire()
    try:
        return _clean_up_record(lock.path.parent)
    finally:
        lock.release()


# --- in-cluster access to the API server -------------------------------------------------------
class _TCPRelay:
    """Accepts TCP connections on `host` (a free port) and joins each to `target`.

    How pods reach an API server that listens on 127.0.0.1 only: the `kubernetes` Service's
    endpoint is this relay on the node IP. Bytes pass through unchanged (TLS included). Threads
    of this process (one accepting, two per connection, so a slow reader only stalls its own
    connection); nothing on the host changes, and the sockets close with `stop()` or with the
    process.
    """

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._open: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"api-relay-{host}", daemon=True)

    def start(self) -> _TCPRelay:
        # A timeout, so the accept loop sees stop() within a moment.
        self._listener.settimeout(0.2)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError as err:
                log.warning("API relay: cannot reach %s:%d: %s", *self.target, err)
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._guard:
                self._open.update((client, upstream))
            threading.Thread(target=self._connection, args=(client, upstream), daemon=True).start()

    def _connection(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()
        with self._guard:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            # EOF: pass the half-close on; the other direction may still be sending.
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # A reset on either side ends the connection both ways.
            for end in (src, dst):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Close the listener and end every relayed connection. Idempotent."""
        self._stopping.set()
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._guard:
            live = list(self._open)
        # The connection threads see their sockets end and close them.
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- the node ------------------------------------------------------------------------------------
class LocalNode:
    """One node running on this machine for `control_plane` (which must be started).

    `start()` returns once the node is Ready and schedulable; `stop()` stops every process,
    force-deletes the pods bound to the node and the Node itself from the API (nothing would
    ever run them again), and restores the host. `images` are imported into containerd before
    the kubelet starts (the pause image always is), so pods can use them without any registry.

    `cluster_services=True`: pods reach Services (by ClusterIP and by DNS name) and the API
    server, as in-cluster clients need (see the module docstring); `dns` and `api_endpoint`
    are then set while the node runs. `kubelet_sync_seconds`: the kubelet's syncFrequency,
    i.e. how soon a changed Secret reaches the pods that mount it (default: the kubelet's 60 s).
    Both are off by default, and the node then runs exactly as without them.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        work_dir: Path | str,
        *,
        name: str = DEFAULT_NODE_NAME,
        bridge: str = DEFAULT_BRIDGE,
        subnet: str = DEFAULT_SUBNET,
        images: Sequence[OciImage] = (),
        assets: Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
        state_dir: Path | None = None,
        cluster_services: bool = False,
        kubelet_sync_seconds: float | None = None,
    ) -> None:
        self.plane = control_plane
        self.work_dir = Path(work_dir).absolute()
        self.name = name
        self.bridge = bridge
        self.subnet = ipaddress.ip_network(subnet)
        # The bridge's first address: the pods' gateway and the node's InternalIP. The kubelet
        # rejects a loopback node IP, and this one exists only on this machine.
        self.node_ip = str(next(self.subnet.hosts()))
        self.images = list(images)
        self._assets = assets
        self.ready_timeout = ready_timeout
        self.state_dir = state_dir or cache_root() / "node"
        self.containerd_dir = self.work_dir / "containerd"
        self.containerd_socket = self.containerd_dir / "containerd.sock"
        self.kubelet_dir = self.work_dir / "kubelet"
        self.cni_dir = self.work_dir / "cni"
        self.log_dir = self.work_dir / "logs"
        self.pki_dir = self.work_dir / "pki"
        self.timings: dict[str, float] = {}
        self.cluster_services = cluster_services
        self.kubelet_sync_seconds = kubelet_sync_seconds
        self.service_range = ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE)
        self.cluster_domain = DEFAULT_DOMAIN
        # Set while a node with cluster_services runs.
        self.dns: ClusterDNS | None = None
        self.api_endpoint: tuple[str, int] | None = None
        self._relay: _TCPRelay | None = None
        self._dns_api: kubernetes.client.ApiClient | None = None
        self._controller_port = 0
        self._scheduler_port = 0
        self._processes: dict[str, ChildProcess] = {}
        self._record: _HostRecord | None = None
        self._lock = _NodeLock(self.state_dir)

    # inspection -----------------------------------------------------------------------------
    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The child processes started so far, by name (for inspection, not for stopping)."""
        return {name: proc.popen for name, proc in self._processes.items()}

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> Self:
        if self._record is not None:
            raise LocalClusterError("this LocalNode was already started")
        if not self.plane.url:
            raise LocalClusterError("start the ControlPlane before its LocalNode")
        started = time.monotonic()
        preflight(assets=self._assets)
        assets = self._assets or find_assets(node=True)
        # Unix socket paths are limited to 107 bytes: containerd's socket and the kubelet's
        # pod-resources socket (a random 10-digit name under its root dir) live in the work dir.
        longest = max(
            len(str(self.containerd_socket)),
            len(str(self.kubelet_dir / "root" / "pod-resources")) + 11,
        )
        if longest > MAX_SOCKET_PATH:
            raise NodeUnavailableError(
                f"work dir {self.work_dir} is too long for the node's socket paths (at most "
                f"{len(str(self.work_dir)) - longest + MAX_SOCKET_PATH} characters); use a "
                "shorter one"
            )
        self._lock.acquire()
        try:
            _clean_up_record(self.state_dir)
            self._check_conflicts()
            self._record = self._record_host()
            self._prepare_host()
            self._start_containerd()
            if self.cluster_services:
                self._start_cluster_services()
            self._start_components(assets)
            self._wait_ready()
        except BaseException as err:
            try:
                self.stop()
            except LocalClusterError as cleanup:
                err.add_note(f"and cleaning up after the failed start failed too: {cleanup}")
            raise
        self.timings["start"] = time.monotonic() - started
        log.info("node %s Ready after %.1fs", self.name, self.timings["start"])
        return self

    def stop(self) -> None:
        """Stop everything and restore the host. Idempotent; safe after a failed start().

        Every step runs even when an earlier one fails; the failures are raised together at the
        end, and the record then stays for the next start() to try again.
        """
        record, self._record = self._record, None
        if record is None:
            self._lock.release()
            return
        started = time.monotonic()
        problems: list[str] = []

        def attempt(what: str, step: Callable[[], object]) -> None:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - every step runs; each failure is reported
                problems.append(f"{what}: {err}")

        try:
            # Control loops first, so nothing new is scheduled or started while the rest goes.
            for component in ("kube-scheduler", "kube-controller-manager", "kubelet", "kube-proxy"):
                process = self._processes.get(component)
                if process is not None:
                    attempt(f"stopping {component}", partial(process.stop, COMPONENT_STOP_GRACE))
            if self.cluster_services:
                attempt("stopping cluster services", self._stop_cluster_services)
            attempt("removing the node from the API", self._forget_node)
            # Containers before containerd: containerd does not stop them, the shims hold them.
            attempt("killing containers", partial(_kill_cgroup_processes, record.cgroup_name))
            containerd = self._processes.get("containerd")
            if containerd is not None:
                attempt("stopping containerd", partial(containerd.stop, COMPONENT_STOP_GRACE))
            attempt("restoring the host", partial(_restore_host, record))
            if not problems:
                (self.state_dir / "state.json").unlink(missing_ok=True)
        finally:
            self._lock.release()
            self.timings["stop"] = time.monotonic() - started
        if problems:
            raise LocalClusterError(
                "; ".join(problems) + f" (the record stays in {self.state_dir / 'state.json'}; "
                "the next LocalNode.start() tries again)"
            )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def abandon(self) -> None:
        """Forget this node without stopping anything, as if this process had been killed.

        Its processes keep running and the host keeps its changes; the record of them stays, so
        the next LocalNode.start() on this machine cleans up after it (what tests of exactly
        that need). The relay and DNS threads end, as they would with the process; the
        `kubernetes` Endpoints they served stay in the API, as after a crash.
        """
        self._record = None
        self._close_cluster_sockets()
        self._lock.release()

    def import_images(self, images: Sequence[OciImage]) -> float:
        """Load more images into the node's containerd; returns the seconds it took."""
        if self._record is None:
            raise LocalClusterError("the node is not started")
        return import_images(images, socket=self.containerd_socket, work_dir=self.work_dir / "tmp")

    # start steps ------------------------------------------------------------------------------
    def _check_conflicts(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            raise NodeUnavailableError(
                f"a network interface named {self.bridge} already exists and was not made by a "
                "LocalNode; choose another bridge= or delete it"
            )
        routes = _run(["ip", "-o", "-4", "route", "show", "table", "all"]).stdout.splitlines()
        for route in routes:
            # "10.1.0.0/16 dev x", "local 10.1.0.1 dev x table local", "unreachable 10.2.0.0/16"...
            # the destination is the first word that is a network; "default" overlaps nothing.
            destination = next(iter(_networks(route.split()[:2])), None)
            if destination is not None and destination.overlaps(self.subnet):
                raise NodeUnavailableError(
                    f"pod subnet {self.subnet} overlaps the route {route.strip()!r}; choose "
                    "another subnet="
                )
            # cluster_services routes the service range through the bridge.
            if (
                self.cluster_services
                and destination is not None
                and destination.prefixlen > 0
                and destination.overlaps(self.service_range)
            ):
                raise NodeUnavailableError(
                    f"the service range {self.service_range} overlaps the route "
                    f"{route.strip()!r}, which cluster_services=True would shadow"
                )
        for binary in IPTABLES:
            for table in IPTABLES_TABLES:
                chains = _kube_chains(_iptables_dump(binary, table))
                if chains:
                    raise NodeUnavailableError(
                        f"{binary} table {table} already has {', '.join(chains[:3])}...: another "
                        "Kubernetes node runs on this machine; stop it (or, if it is gone, delete "
                        "its KUBE-* chains) first"
                    )

    def _record_host(self) -> _HostRecord:
        record = _HostRecord(
            work_dir=str(self.work_dir),
            bridge=self.bridge,
            cgroup_name=f"{CGROUP_PREFIX}{secrets.token_hex(4)}",
            containerd_socket=str(self.containerd_socket),
        )
        record.sysctls = {
            name: value for name in SYSCTLS if (value := _read_sysctl(name)) is not None
        }
        _record_folders(record)
        # Saved before anything is made, so a crash from here on is cleaned up next time.
        record.save(self.state_dir / "state.json")
        return record

    def _save_record(self) -> None:
        if self._record is not None:
            self._record.save(self.state_dir / "state.json")

    def _prepare_host(self) -> None:
        assert self._record is not None
        for folder in (self.containerd_dir, self.kubelet_dir, self.cni_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The kubelet wants its cgroup root to exist in every hierarchy; cpuset starts empty and
        # accepts no task until cpus and mems are set, so copy them from the top.
        for mount in _cgroup_folders():
            root = mount / self._record.cgroup_name
            root.mkdir(exist_ok=True)
            if (mount / "cpuset.cpus").exists():
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (root / knob).write_text((mount / knob).read_text())
        # Made here with its address (not by the CNI plugin), so the plugin never needs to turn
        # on ip_forward, and the kubelet can listen on the node IP before any pod exists.
        self._record.made_bridge = True
        self._save_record()
        prefix = self.subnet.prefixlen
        _run(["ip", "link", "add", "name", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.node_ip}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", "dev", self.bridge, "up"])
        if self.cluster_services:
            # Both belong to the bridge and go with it (stop() and a crashed run's cleanup
            # delete it): forwarding for what arrives on the bridge only (a pod's packet to a
            # ClusterIP leaves again towards another pod), and the service range reached
            # through the bridge from the host (the API server calling a webhook's Service).
            (Path("/proc/sys/net/ipv4/conf") / self.bridge / "forwarding").write_text("1\n")
            _run(
                ["ip", "route", "add", str(self.service_range), "dev", self.bridge]
                + ["src", self.node_ip]
            )

    def _spawn(self, name: str, argv: Sequence[str]) -> ChildProcess:
        assert self._record is not None
        process = ChildProcess(name, argv, log_path=self.log_path(name))
        self._processes[name] = process
        self._record.processes.append((name, process.pid, _proc_start_time(process.pid) or 0))
        self._save_record()
        return process

    def _start_containerd(self) -> None:
        started = time.monotonic()
        pause = pause_image()
        self._write_cni_config()
        config = self.containerd_dir / "config.toml"
        config.write_text(self._containerd_config(pause.reference))
        containerd = self._spawn("containerd", ["containerd", "--config", str(config)])
        deadline = time.monotonic() + 30
        while True:
            containerd.check_alive()
            if (
                self.containerd_socket.exists()
                and _run(self._ctr("version"), check=False).returncode == 0
            ):
                break
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"containerd not answering on {self.containerd_socket} after 30s:\n"
                    + log_tail(containerd.log_path)
                )
            time.sleep(0.05)
        self.timings["containerd"] = time.monotonic() - started
        self.timings["images"] = import_images(
            [pause, *self.images], socket=self.containerd_socket, work_dir=self.work_dir / "tmp"
        )

    def _ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args]

    def _containerd_config(self, sandbox_image: str) -> str:
        def q(value: object) -> str:
            return json.dumps(str(value))  # a JSON string is a valid TOML basic string

        root, state = self.containerd_dir / "root", self.containerd_dir / "state"
        return f"""\
# Written by mirrorgate.devtools.node: every path private to this node.
version = 2
root = {q(root)}
state = {q(state)}
oom_score = 0
# Snapshotters this node never uses (each would only log why it cannot load). The v1 runtime
# stays: containerd 1.6's tasks service, and with it the CRI plugin, fails to load without it.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {q(self.containerd_socket)}

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = {q(self.containerd_dir / "opt")}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {q(sandbox_image)}
  stream_server_address = "127.0.0.1"
  stream_server_port = {q(free_port())}
  # No AppArmor profile is loaded for containers here.
  disable_apparmor = true
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails with
  # "runc create failed: can't get final child's PID from pipe: EOF" (oom_score_adj denied).
  restrict_oom_score_adj = true
  # Network namespaces under the state dir instead of /run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroupfs like the kubelet (cgroup v1, no systemd managing cgroups here).
        SystemdCgroup = false
        Root = {q(self.containerd_dir / "runc")}

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {q(CNI_BIN_DIR)}
    conf_dir = {q(self.cni_dir / "net.d")}
    max_conf_num = 1
"""

    def _write_cni_config(self) -> None:
        conf_dir = self.cni_dir / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": "mirrorgate-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    # No address on the bridge from the plugin, no ip_forward, no MASQUERADE
                    # rules: the bridge exists already and pods need not leave this machine.
                    "isGateway": False,
                    "ipMasq": False,
                    # A pod reaching itself through a Service (hairpin) works.
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.node_ip}]],
                        "dataDir": str(self.cni_dir / "ipam"),
                        # ClusterIPs are off the pod subnet: only a route makes them reachable.
                        **(
                            {"routes": [{"dst": str(self.service_range), "gw": self.node_ip}]}
                            if self.cluster_services
                            else {}
                        ),
                    },
                }
            ],
        }
        (conf_dir / "10-mirrorgate.conflist").write_text(json.dumps(conflist, indent=2) + "\n")

    # cluster services (cluster_services=True) ---------------------------------------------------
    def _start_cluster_services(self) -> None:
        """The API relay and its `kubernetes` endpoints, then cluster DNS, on the node IP."""
        started = time.monotonic()
        api = urllib.parse.urlsplit(self.plane.url)
        assert api.hostname is not None and api.port is not None
        self._relay = _TCPRelay(self.node_ip, (api.hostname, api.port)).start()
        self.api_endpoint = self._relay.address
        self._publish_api_endpoints(self.api_endpoint[1])
        # One client for every lookup (urllib3's pool is thread-safe): a query costs one GET
        # on a kept-alive connection, not a new TLS handshake.
        self._dns_api = self.plane.api_client()
        try:
            self.dns = ClusterDNS(
                self._service_addresses, host=self.node_ip, domain=self.cluster_domain
            ).start()
        except OSError as err:
            raise NodeUnavailableError(
                f"cluster DNS cannot listen on {self.node_ip}:53 ({err.strerror or err})"
            ) from err
        self.timings["cluster_services"] = time.monotonic() - started

    def _publish_api_endpoints(self, port: int) -> None:
        """Point the `kubernetes` Service at the relay, as the API server's own reconciler would
        (Endpoints marked not to be mirrored, plus the EndpointSlice kube-proxy reads)."""
        client = kubernetes.client
        endpoints = client.V1Endpoints(
            metadata=client.V1ObjectMeta(
                name="kubernetes", namespace="default", labels={ENDPOINTSLICE_SKIP_MIRROR: "true"}
            ),
            subsets=[
                client.V1EndpointSubset(
                    addresses=[client.V1EndpointAddress(ip=self.node_ip)],
                    ports=[client.CoreV1EndpointPort(name="https", port=port, protocol="TCP")],
                )
            ],
        )
        endpoint_slice = {
            "apiVersion": f"{ENDPOINTSLICE_GROUP}/{ENDPOINTSLICE_VERSION}",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [self.node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }
        with self.plane.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            custom = kubernetes.client.CustomObjectsApi(api)
            slices = (ENDPOINTSLICE_GROUP, ENDPOINTSLICE_VERSION, "default", "endpointslices")

            def with_version(body: dict[str, Any], version: str) -> dict[str, Any]:
                return {**body, "metadata": {**body["metadata"], "resourceVersion": version}}

            def replace_endpoints(version: str) -> object:
                assert endpoints.metadata is not None
                endpoints.metadata.resource_version = version
                return core.replace_namespaced_endpoints("kubernetes", "default", endpoints)

            _create_or_replace(
                lambda: core.create_namespaced_endpoints("default", endpoints),
                lambda: core.read_namespaced_endpoints("kubernetes", "default"),
                replace_endpoints,
            )
            _create_or_replace(
                lambda: custom.create_namespaced_custom_object(*slices, endpoint_slice),
                lambda: custom.get_namespaced_custom_object(*slices, "kubernetes"),
                lambda v: custom.replace_namespaced_custom_object(
                    *slices, "kubernetes", with_version(endpoint_slice, v)
                ),
            )

    def _service_addresses(self, namespace: str, name: str) -> list[str] | None:
        """What cluster DNS answers for `<name>.<namespace>.svc`: the ClusterIP, or the ready
        endpoint addresses of a headless Service; None when there is no such Service."""
        if self._dns_api is None:
            raise LocalClusterError("the node's cluster services are stopped")
        core = kubernetes.client.CoreV1Api(self._dns_api)
        try:
            service = core.read_namespaced_service(name, namespace, _request_timeout=2)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        cluster_ip = service.spec.cluster_ip if service.spec else None
        if cluster_ip and cluster_ip != "None":
            return [cluster_ip]
        try:
            endpoints = core.read_namespaced_endpoints(name, namespace, _request_timeout=2)
        except ApiException as err:
            if err.status == 404:
                return []
            raise
        return [
            address.ip for subset in endpoints.subsets or [] for address in subset.addresses or []
        ]

    def _stop_cluster_services(self) -> None:
        """Remove the `kubernetes` endpoints this node published, then close the sockets."""
        try:
            if self.api_endpoint is not None and self.plane.url:
                with self.plane.api_client() as api:
                    core = kubernetes.client.CoreV1Api(api)
                    custom = kubernetes.client.CustomObjectsApi(api)
                    _delete_ignoring_missing(
                        lambda: core.delete_namespaced_endpoints("kubernetes", "default")
                    )
                    _delete_ignoring_missing(
                        lambda: custom.delete_namespaced_custom_object(
                            ENDPOINTSLICE_GROUP,
                            ENDPOINTSLICE_VERSION,
                            "default",
                            "endpointslices",
                            "kubernetes",
                        )
                    )
        finally:
            self._close_cluster_sockets()

    def _close_cluster_sockets(self) -> None:
        dns, self.dns = self.dns, None
        relay, self._relay = self._relay, None
        dns_api, self._dns_api = self._dns_api, None
        self.api_endpoint = None
        if dns is not None:
            dns.stop()
        if dns_api is not None:
            dns_api.close()
        if relay is not None:
            relay.stop()

    def _kubeconfig_for(self, user: str, groups: Sequence[str] = ()) -> Path:
        cert, key = self.plane.issue_client_certificate(user, groups, directory=self.pki_dir)
        stem = user.replace(":", "-")
        return self.plane.write_kubeconfig(
            self.pki_dir / f"{stem}.kubeconfig",
            user=user,
            client_certificate=cert,
            client_key=key,
        )

    def _start_components(self, assets: Path) -> None:
        assert self._record is not None
        kubelet_config = self.kubelet_dir / "config.json"
        kubelet_port, kubelet_healthz = free_port(), free_port()
        kubelet_config.write_text(
            json.dumps(self._kubelet_config(kubelet_port, kubelet_healthz), indent=2) + "\n"
        )
        kubelet_kubeconfig = self._kubeconfig_for(f"system:node:{self.name}", ["system:nodes"])
        self._spawn(
            "kubelet",
            [
                str(assets / "kubelet"),
                f"--config={kubelet_config}",
                f"--kubeconfig={kubelet_kubeconfig}",
                f"--root-dir={self.kubelet_dir / 'root'}",
                f"--cert-dir={self.kubelet_dir / 'pki'}",
                f"--seccomp-profile-root={self.kubelet_dir / 'seccomp'}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{self.containerd_socket}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.node_ip}",
                "--v=1",
            ],
        )
        proxy_config = self.work_dir / "kube-proxy.json"
        proxy_config.write_text(
            json.dumps(self._proxy_config(self._kubeconfig_for("system:kube-proxy")), indent=2)
            + "\n"
        )
        self._spawn("kube-proxy", [str(assets / "kube-proxy"), f"--config={proxy_config}"])
        self._controller_port, self._scheduler_port = free_port(), free_port()
        self._spawn(
            "kube-controller-manager",
            [
                str(assets / "kube-controller-manager"),
                f"--kubeconfig={self._kubeconfig_for('system:kube-controller-manager')}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self._controller_port}",
                "--port=0",
                f"--cert-dir={self.work_dir / 'controller-manager'}",
                "--leader-elect=false",
                # nodeipam would want --cluster-cidr and allocate node CIDRs the CNI config
                # ignores; there is no cloud.
                "--controllers=*,-nodeipam,-cloud-node-lifecycle",
                f"--service-account-private-key-file={self.plane.sa_key_file}",
                f"--root-ca-file={self.plane.ca_file}",
                # Each controller acts as its own service account, with the RBAC roles the API
                # server bootstraps (the controller-manager's own role cannot create pods).
                "--use-service-account-credentials=true",
                f"--flex-volume-plugin-dir={self.work_dir / 'flexvolume'}",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(assets / "kube-scheduler"),
                f"--kubeconfig={self._kubeconfig_for('system:kube-scheduler')}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self._scheduler_port}",
                "--port=0",
                f"--cert-dir={self.work_dir / 'scheduler'}",
                "--leader-elect=false",
            ],
        )

    def _kubelet_config(self, port: int, healthz_port: int) -> dict[str, Any]:
        assert self._record is not None
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            # Only the API server (client certificate from the control plane's CA) talks to it.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.plane.client_ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self._record.cgroup_name}",
            "cgroupsPerQOS": True,
            "failSwapOn": False,
            # With the kubelet built to warn (scripts/control-plane-assets), this makes it
            # only log kernel tunables instead of rewriting kernel.panic and friends.
            "protectKernelDefaults": True,
            # Root here cannot lower oom_score_adj below 0.
            "oomScoreAdj": 0,
            # A shared developer disk is often fuller than the defaults allow.
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            # Imported images (the pause and registry images) cannot be pulled back: never
            # garbage-collect them, however full the disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "volumePluginDir": str(self.kubelet_dir / "volume-plugins"),
            "serializeImagePulls": False,
            # Report changes (Ready, pressure) within 2 s instead of 10.
            "nodeStatusUpdateFrequency": "2s",
            "clusterDomain": self.cluster_domain,
            "resolvConf": "/etc/resolv.conf",
            **({"clusterDNS": [self.node_ip]} if self.cluster_services else {}),
            **(
                {"syncFrequency": f"{self.kubelet_sync_seconds:g}s"}
                if self.kubelet_sync_seconds is not None
                else {}
            ),
        }

    def _proxy_config(self, kubeconfig: Path) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": str(self.subnet),
            "hostnameOverride": self.name,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # NodePorts answer on loopback only: 127.0.0.1:<nodePort> is what containerd pulls
            # from over plain HTTP; nothing is opened on the machine's real interfaces.
            "nodePortAddresses": ["127.0.0.0/8"],
            # Zeros: kube-proxy leaves nf_conntrack_max and the conntrack timeouts alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
            "oomScoreAdj": 0,
        }

    def _wait_ready(self) -> None:
        """Until the Node is Ready and untainted, and scheduler and controller-manager serve."""
        started = time.monotonic()
        deadline = started + self.ready_timeout
        with self.plane.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            while True:
                for process in self._processes.values():
                    process.check_alive()
                reason, relevant = self._not_ready_reason(core)
                if not reason:
                    break
                if time.monotonic() > deadline:
                    raise LocalClusterError(
                        f"node {self.name} not ready after {self.ready_timeout:g}s: {reason}; "
                        f"last lines of {self.log_path(relevant)}:\n"
                        + log_tail(self.log_path(relevant))
                    )
                time.sleep(0.2)
        self.timings["ready"] = time.monotonic() - started

    def _not_ready_reason(self, core: kubernetes.client.CoreV1Api) -> tuple[str, str]:
        """("", "") when ready, else (why not, the component whose log tells more)."""
        try:
            node = core.read_node(self.name, _request_timeout=5)
        except ApiException as err:
            if err.status == 404:
                return "the kubelet has not registered the node yet", "kubelet"
            raise LocalClusterError(
                f"reading node {self.name} from the API server failed: {err.status} {err.reason}"
            ) from err
        conditions = (node.status.conditions if node.status else None) or []
        ready = next((c for c in conditions if c.type == "Ready"), None)
        if ready is None or ready.status != "True":
            message = ready.message if ready is not None else "no Ready condition yet"
            return f"Ready is not True ({message})", "kubelet"
        taints = [t.key for t in (node.spec.taints if node.spec else None) or []]
        if "node.kubernetes.io/not-ready" in taints:
            return "still tainted not-ready", "kube-controller-manager"
        for component, port in (
            ("kube-controller-manager", self._controller_port),
            ("kube-scheduler", self._scheduler_port),
        ):
            if not http_answers(f"https://127.0.0.1:{port}/healthz", expect_ok=True):
                return f"{component} /healthz does not answer 200", component
        return "", ""

    def _forget_node(self) -> None:
        """Force-delete the pods bound to this node and the Node: no kubelet will run them again
        (what the pod garbage collector would do if its controller-manager still ran)."""
        if not self.plane.url:
            return
        try:
            with self.plane.api_client() as api:
                core = kubernetes.client.CoreV1Api(api)
                pods = core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={self.name}", _request_timeout=5
                ).items
                for pod in pods:
                    meta = pod.metadata
                    if meta is None or not meta.name or not meta.namespace:
                        continue
                    with contextlib.suppress(ApiException):
                        core.delete_namespaced_pod(
                            meta.name,
                            meta.namespace,
                            grace_period_seconds=0,
                            _request_timeout=5,
                        )
                with contextlib.suppress(ApiException):
                    core.delete_node(self.name, _request_timeout=5)
        except (ApiException, OSError) as err:
            # The control plane may be gone already; the host cleanup matters more.
            log.debug("could not remove node %s from the API: %s", self.name, err)
