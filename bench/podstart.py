"""What the mirror buys: pod start time through mirrorgate vs the upstream, on the real node.

    .venv/bin/python -m bench.podstart [--sizes 10,100,500] [--runs 5] [--creations 200]
                                       [--rtt-ms 40] [--mbit 50] [--json]

Everything runs on this machine: a control plane and a real node (containerd, kubelet, ...;
devtools), an "upstream" registry (Debian's docker-registry) reached only through a shaped link
(bench.shaper: `--rtt-ms` round trip, `--mbit` per direction; this kernel has no netem), a warm
hosted mirror and a pull-through cache as registry pods behind NodePorts, and `mirrorgate serve`
registered for the namespaces of (b) and (c). Images of `--sizes` MB (random, incompressible
bytes; built locally, cached) are pushed to the upstream and the mirror beforehand, unshaped.

For each size, `--runs` times each, with the node's image cache emptied before every run
(`ctr images rm --sync`), the time from `create` to the pod Running:

  (a) the pod names the upstream image, no webhook;
  (b) the same pod in a namespace mirrorgate serves: rewritten to the warm mirror;
  (c) the same, rewritten to a pull-through cache restarted empty (its first pull goes upstream);
  (d) the upstream down (the link stopped): (a) must fail, (b) must still run.

Then the admission overhead on pod creation: `--creations` pod creates (the mirror's image,
bound to a node that does not exist, so nothing is pulled) with the webhook registered vs not,
p50/p99 of the API server's answer. Medians, ratios (b)/(a) and (c)/(a), and the expectations
(b at least 5x faster than a for 100 MB; admission overhead p99 under 10 ms), met or MISSED,
all from this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OPT_IN = "bench.mirrorgate.io/podstart"


@dataclass(frozen=True)
class Expectation:
    name: str
    want: str
    ok: bool
    got: str

    def line(self) -> str:
        return f"{self.name}: {self.want}: {'met' if self.ok else 'MISSED'} ({self.got})"


@dataclass
class Results:
    rtt_ms: float
    mbit: float
    # size MB -> scenario -> seconds per run (None: the pod never ran)
    starts: dict[int, dict[str, list[float | None]]] = field(default_factory=dict)
    # "with" / "without" -> seconds per create
    admission: dict[str, list[float]] = field(default_factory=dict)


def median(values: list[float | None]) -> float | None:
    ran = [v for v in values if v is not None]
    return statistics.median(ran) if ran and len(ran) == len(values) else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def expectations(results: Results) -> list[Expectation]:
    out = []
    hundred = results.starts.get(100, {})
    a, b = median(hundred.get("a", [])), median(hundred.get("b", []))
    if a is not None and b is not None:
        out.append(
            Expectation("(b) vs (a), 100 MB", "at least 5x faster", a / b >= 5, f"{a / b:.1f}x")
        )
    else:
        out.append(Expectation("(b) vs (a), 100 MB", "at least 5x faster", False, "not measured"))
    for size, by in sorted(results.starts.items()):
        down_a, down_b = by.get("a_down", []), by.get("b_down", [])
        if down_a or down_b:
            ok = all(v is None for v in down_a) and all(v is not None for v in down_b)
            got = (
                f"(a) ran {sum(v is not None for v in down_a)}/{len(down_a)}, "
                f"(b) ran {sum(v is not None for v in down_b)}/{len(down_b)}"
            )
            out.append(Expectation(f"upstream down, {size} MB", "(a) fails, (b) runs", ok, got))
    with_hook, without = results.admission.get("with", []), results.admission.get("without", [])
    if with_hook and without:
        overhead = (percentile(with_hook, 0.99) - percentile(without, 0.99)) * 1000
        out.append(
            Expectation(
                "admission overhead p99", "under 10 ms", overhead < 10, f"{overhead:.1f} ms"
            )
        )
    return out


def report(results: Results) -> str:
    lines = [
        f"pod start, create -> Running (median of runs; link {results.rtt_ms:g} ms RTT, "
        f"{results.mbit:g} Mbit/s)",
        f"{'size':>6}  {'(a) upstream':>13}  {'(b) warm mirror':>15}  {'(c) cold cache':>14}  "
        f"{'b/a':>6}  {'c/a':>6}  {'(d) a / b, upstream down':>24}",
    ]

    def secs(v: float | None) -> str:
        return f"{v:.2f} s" if v is not None else "failed"

    for size, by in sorted(results.starts.items()):
        a, b, c = (median(by.get(k, [])) for k in ("a", "b", "c"))
        ba = f"{b / a:.2f}" if a and b else "-"
        ca = f"{c / a:.2f}" if a and c else "-"
        down_a = "failed" if all(v is None for v in by.get("a_down", [None])) else "ran"
        down_b = secs(median(by.get("b_down", [])))
        lines.append(
            f"{size:>4} MB  {secs(a):>13}  {secs(b):>15}  {secs(c):>14}  {ba:>6}  {ca:>6}  "
            f"{down_a + ' / ' + down_b:>24}"
        )
    if results.admission:
        lines.append("")
        lines.append("admission on pod create (API server answer), ms:")
        for key in ("without", "with"):
            values = results.admission.get(key, [])
            if values:
                lines.append(
                    f"  webhook {'registered' if key == 'with' else 'not registered':<15} "
                    f"p50 {percentile(values, 0.5) * 1000:6.1f}  "
                    f"p99 {percentile(values, 0.99) * 1000:6.1f}  ({len(values)} creates)"
                )
    lines.append("")
    lines += [e.line() for e in expectations(results)]
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------


def _chain_ids(image: Any) -> list[str]:
    """The snapshot names containerd unpacks `image`'s layers into (OCI chain ids)."""
    import hashlib

    config_digest = image.blob_digests()[0].removeprefix("sha256:")
    config = json.loads((image.layout / "blobs" / "sha256" / config_digest).read_text())
    chains: list[str] = []
    for diff_id in config["rootfs"]["diff_ids"]:
        chains.append(
            diff_id
            if not chains
            else "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
        )
    return chains


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.results = Results(rtt_ms=args.rtt_ms, mbit=args.mbit)

    def log(self, text: str) -> None:
        print(f"[podstart] {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def cluster(self) -> Iterator[None]:
        from mirrorgate.devtools.images import registry_image
        from mirrorgate.devtools.localcluster import ControlPlane
        from mirrorgate.devtools.node import LocalNode

        self.plane = ControlPlane(self.work / "plane")
        try:
            self.plane.start()
            self.log("control plane up; starting the node")
            self.registry_image = registry_image()
            self.node = LocalNode(self.plane, self.work / "node", images=[self.registry_image])
            self.node.start()
            try:
                self.kubectl = self.plane.kubectl()
                yield
            finally:
                self.node.stop()
        finally:
            self.plane.stop()

    def apply(self, *objects: dict[str, Any]) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        self.kubectl.run("apply", "-f", "-", input=json.dumps(doc))

    def registry_pod(self, namespace: str, *, proxy: str | None = None) -> str:
        from tests.helpers.node import registry_manifests

        namespace_object = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace},
        }
        self.apply(
            namespace_object,
            *registry_manifests(namespace, self.registry_image.reference, proxy=proxy),
        )
        self.kubectl.run("rollout", "status", "-n", namespace, "deploy/registry", "--timeout=120s")
        port = self.kubectl.run(
            "get", "svc", "-n", namespace, "registry", "-o", "jsonpath={.spec.ports[0].nodePort}"
        ).stdout.strip()
        host = f"127.0.0.1:{port}"
        self._wait_http(f"http://{host}/v2/")
        return host

    def _wait_http(self, url: str, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def empty_node_cache(self) -> None:
        """Remove every payload image from the node and wait until containerd no longer holds
        their blobs (a container being torn down keeps them referenced for a moment): a pull
        that found a layer already there would measure nothing."""
        ctr = ["ctr", "--address", str(self.node.containerd_socket), "-n", "k8s.io"]
        deadline = time.monotonic() + 60
        while True:
            # The kubelet removes a deleted pod's dead containers only at its next container GC
            # (a minute): remove the payload ones now, so their images and snapshots can go.
            containers = subprocess.run(
                [*ctr, "containers", "ls"], capture_output=True, text=True
            ).stdout.splitlines()[1:]
            for line in containers:
                cid, image = (line.split() + ["", ""])[:2]
                if "/bench/payload-" in image:
                    subprocess.run([*ctr, "tasks", "rm", "-f", cid], capture_output=True)
                    subprocess.run([*ctr, "containers", "rm", cid], capture_output=True)
            listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True)
            # The CRI plugin names an image by tag, by digest and by its id (config digest).
            refs = [
                r
                for r in listed.stdout.split()
                if "/bench/payload-" in r or r in self.payload_configs
            ]
            if refs:
                subprocess.run([*ctr, "images", "rm", "--sync", *refs], capture_output=True)
            content = subprocess.run(
                [*ctr, "content", "ls", "-q"], capture_output=True, text=True
            ).stdout.split()
            # An unpacked layer left behind (its snapshot, named by the layer's chain id) makes
            # containerd skip downloading that layer at all.
            snapshots = subprocess.run(
                [*ctr, "snapshots", "ls"], capture_output=True, text=True
            ).stdout.split()
            # A download still running (its ingest) would feed the next pull.
            active = subprocess.run(
                [*ctr, "content", "active"], capture_output=True, text=True
            ).stdout.splitlines()[1:]
            left = (self.payload_blobs & set(content)) | (self.payload_chains & set(snapshots))
            if not left and not active:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd still holds {len(left)} payload blobs")
            time.sleep(0.2)

    def start_time(self, namespace: str, image: str, *, timeout: float) -> float | None:
        """Seconds from create to Running; None when the pod has not run within `timeout`."""
        self.empty_node_cache()
        name = f"p-{time.monotonic_ns() % 10**9}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always"}],
            },
        }
        started = time.monotonic()
        self.kubectl.run("create", "-f", "-", input=json.dumps(pod))
        took: float | None = None
        while time.monotonic() - started < timeout:
            phase = self.kubectl.run(
                "get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.phase}"
            ).stdout
            if phase == "Running":
                took = time.monotonic() - started
                break
            time.sleep(0.05)
        # Not --force: a force-deleted pod leaves the API at once while the kubelet may still sync
        # it, and with imagePullPolicy Always pull its image once more, in parallel with the
        # next run's pull of the same layers (found: a 500 MB "mirror" pull waiting 88 s on the
        # upstream's). A graceful delete returns once the kubelet has stopped the pod.
        self.kubectl.run(
            "delete",
            "pod",
            "-n",
            namespace,
            name,
            "--grace-period=1",
            "--wait=true",
            "--timeout=120s",
            check=False,
            timeout=150,
        )
        return took

    def run(self) -> Results:
        from bench.shaper import ShapedLink
        from mirrorgate.deploy.webhooks import mutating_webhook_configuration
        from mirrorgate.devtools.demo import LocalWebhook
        from mirrorgate.devtools.images import payload_image, push_image
        from tests.helpers.node import HostRegistry

        args = self.args
        sizes = [int(s) for s in args.sizes.split(",")]
        with self.cluster():
            upstream = HostRegistry(self.work / "upstream", address=self.node.node_ip).start()
            self.log("building and pushing the payload images (cached after the first run)")
            images = {
                mb: payload_image(megabytes=mb, reference=f"mirrorgate.local/payload-{mb}m:1")
                for mb in sizes
            }
            # The layers (each image's config is tiny), and the ids the node knows them by.
            self.payload_blobs = {d for img in images.values() for d in img.blob_digests()[1:]}
            self.payload_configs = {img.blob_digests()[0] for img in images.values()}
            self.payload_chains = {chain for img in images.values() for chain in _chain_ids(img)}
            mirror = self.registry_pod("podstart-mirror")
            for mb, img in images.items():
                push_image(img, f"{upstream.host}/bench/payload-{mb}m:1")
                push_image(img, f"{mirror}/bench/payload-{mb}m:1")
            # The node pulls over plain HTTP from 127.0.0.1 only; the cache pod reaches the
            # upstream on the node IP: one shaped link for each.
            node_link = ShapedLink(upstream.host, rtt_ms=args.rtt_ms, mbit=args.mbit).start()
            cache_link = ShapedLink(
                upstream.host, listen_host=self.node.node_ip, rtt_ms=args.rtt_ms, mbit=args.mbit
            ).start()
            cache = self.registry_pod("podstart-cache", proxy=f"http://{cache_link.address}")
            webhooks = []
            try:
                for scenario, target, kind in (("b", mirror, "hosted"), ("c", cache, "proxy")):
                    config = self.work / f"mirrorgate-{scenario}.yaml"
                    config.write_text(
                        f'mirrors:\n  - {{upstream: "{node_link.address}", mirror: "{target}", '
                        f"type: {kind}}}\n"
                        f'registries:\n  "{target}": {{plainHTTP: true}}\n'
                        "namespaces: {mode: clusterWide}\nverifyTimeout: 3s\n"
                    )
                    hook = LocalWebhook(self.work / f"serve-{scenario}", config).start()
                    webhooks.append(hook)
                    self.apply(
                        {
                            "apiVersion": "v1",
                            "kind": "Namespace",
                            "metadata": {
                                "name": f"podstart-{scenario}",
                                "labels": {OPT_IN: scenario},
                            },
                        },
                        mutating_webhook_configuration(
                            f"podstart-{scenario}",
                            url=hook.url,
                            ca_pem=hook.ca_pem,
                            namespace_selector={"matchLabels": {OPT_IN: scenario}},
                            timeout_seconds=10,
                        ),
                    )
                self.apply(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "podstart-a"}}
                )
                time.sleep(2)  # the API server picks the webhook configurations up
                for mb in sizes:
                    ref = f"{node_link.address}/bench/payload-{mb}m:1"
                    # The slowest run: the whole image over the link, plus slack.
                    timeout = 60 + mb * 8 / args.mbit * 3
                    by = self.results.starts.setdefault(mb, {})
                    for i in range(args.runs):  # interleaved: drift hits every scenario alike
                        for scenario in ("a", "b", "c"):
                            if scenario == "c":  # the cache starts empty every run
                                self.kubectl.run(
                                    "delete", "pod", "-n", "podstart-cache", "-l", "app=registry"
                                )
                                self.kubectl.run(
                                    "rollout",
                                    "status",
                                    "-n",
                                    "podstart-cache",
                                    "deploy/registry",
                                    "--timeout=120s",
                                )
                                self._wait_http(f"http://{cache}/v2/")
                            took = self.start_time(f"podstart-{scenario}", ref, timeout=timeout)
                            by.setdefault(scenario, []).append(took)
                            self.log(f"{mb} MB ({scenario}) run {i + 1}: {took}")
                # (d): the upstream goes away.
                node_link.stop()
                cache_link.stop()
                for mb in sizes:
                    ref = f"{node_link.address}/bench/payload-{mb}m:1"
                    by = self.results.starts[mb]
                    by["a_down"] = [self.start_time("podstart-a", ref, timeout=30)]
                    by["b_down"] = [self.start_time("podstart-b", ref, timeout=60)]
                    self.log(f"{mb} MB upstream down: a {by['a_down']}, b {by['b_down']}")
                self.admission(mirror, f"{node_link.address}/bench/payload-{sizes[0]}m:1")
            finally:
                for hook in webhooks:
                    hook.stop()
                node_link.stop()
                cache_link.stop()
                upstream.stop()
        return self.results

    def admission(self, mirror: str, upstream_ref: str) -> None:
        """Pod creates with the webhook registered (namespace b) vs not (namespace a): the API
        server's answer time, raw HTTP (no kubectl process per create)."""
        from tests.helpers.kubehttp import KubeHTTP

        kapi = KubeHTTP(self.plane.url, self.plane.admin_token, str(self.plane.ca_file))
        for key, namespace, image in (
            ("without", "podstart-a", upstream_ref.replace(upstream_ref.split("/")[0], mirror, 1)),
            ("with", "podstart-b", upstream_ref),
        ):
            times = self.results.admission.setdefault(key, [])
            for i in range(self.args.creations):
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"adm-{key}-{i}"},
                    # Bound to a node that does not exist: stored, never pulled.
                    "spec": {
                        "nodeName": "nowhere",
                        "containers": [{"name": "app", "image": image}],
                    },
                }
                started = time.perf_counter()
                reply = kapi.create_pod(namespace, pod)
                times.append(time.perf_counter() - started)
                if reply.status != 201:
                    raise RuntimeError(f"pod create answered {reply.status}: {reply.message}")
            self.log(f"admission {key}: {len(times)} creates")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="10,100,500", help="image sizes in MB (default %(default)s)"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per size and scenario")
    parser.add_argument("--creations", type=int, default=200, help="creates per admission case")
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--mbit", type=float, default=50.0)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    # SIGTERM (a timeout, Ctrl-C from a supervisor) must unwind: the node, its bridge and
    # mounts, and every child are stopped in the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="mirrorgate-podstart-"))
    try:
        results = Bench(args, work).run()
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(report(results))
    if args.json:
        print(json.dumps(asdict(results), indent=2))
    sys.exit(0 if all(e.ok for e in expectations(results)) else 1)


if __name__ == "__main__":
    main()
