"""What the gate's pod watch costs in memory: 20,000 pods through `controllers.running`.

    .venv/bin/python -m bench.running [--pods 20000] [--replicasets 200]

Pods shaped as a ReplicaSet controller creates them (bench.bodies, 5 containers) with the status
a kubelet writes (an imageID per container), delivered in pages of 500 as the watch lists them,
each page projected (`controllers.running.project`) before the next arrives. Prints the index's
size (tracemalloc), the process RSS before and after, and, as a baseline in the same process,
what keeping the whole pods would hold (what a watch without projection keeps).
"""

from __future__ import annotations

import argparse
import copy
import gc
import tracemalloc
import uuid
from typing import Any

from bench.bodies import pod
from mirrorgate.webhook.controllers.running import RunningImages, project

PAGE = 500


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / (1 << 20)


def _pods(n: int, replicasets: int) -> Any:
    template = pod("5c")
    for i in range(n):
        r = i % replicasets
        p = copy.deepcopy(template)
        meta = p.setdefault("metadata", {})
        meta.update(
            {"name": f"web-{r}-{i:06}", "namespace": f"team-{r % 50}", "uid": str(uuid.uuid4())}
        )
        statuses = []
        for c in p["spec"]["containers"]:
            repo = c["image"].split("@")[0].rsplit(":", 1)[0]
            statuses.append({"name": c["name"], "imageID": f"{repo}@sha256:{r:064x}"})
        p["status"] = {"phase": "Running", "containerStatuses": statuses}
        yield p


def _index(n: int, replicasets: int) -> RunningImages:
    running = RunningImages()
    projected: list[dict[str, Any]] = []
    page: list[dict[str, Any]] = []
    for p in _pods(n, replicasets):
        page.append(p)
        if len(page) == PAGE:
            projected.extend(map(project, page))  # what Watch._list keeps of a page
            page = []
    projected.extend(map(project, page))
    running.replace(projected)
    return running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=20_000)
    parser.add_argument("--replicasets", type=int, default=200)
    args = parser.parse_args()

    gc.collect()
    start_rss = _rss_mib()
    running = _index(args.pods, args.replicasets)
    gc.collect()
    index_rss = _rss_mib()
    # The same again under tracemalloc: what the index itself holds.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    again = _index(args.pods, args.replicasets)
    gc.collect()
    index = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del again

    # Baseline in the same process: the whole pods, as an unprojected watch would keep them.
    tracemalloc.start()
    whole = list(_pods(args.pods, args.replicasets))
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del whole
    gc.collect()

    mib = 1 << 20
    print(f"pods: {running.pods()} in {args.replicasets} ReplicaSets, 5 containers each")
    print(f"index (tracemalloc):        {index / mib:8.1f} MiB")
    print(f"whole pods (baseline):      {kept / mib:8.1f} MiB")
    print(f"ratio index / whole pods:   {index / kept:8.3f}")
    print(f"RSS start {start_rss:.1f} MiB, after listing and indexing {index_rss:.1f} MiB")


if __name__ == "__main__":
    main()
