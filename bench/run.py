"""``python -m bench.run``: the one command. Starts everything, measures, prints, stops everything.

Owns the order of a run and its report: backends (registry, Clair stand-in) and images, then both
servers on the server core, the warm hot path (``bench.hot``), the cold path (``bench.cold``), the
soak (``bench.soak``), and a table (or ``--json``) with the targets of the issue checked. Every
process it starts is stopped by its PID when it ends, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import cold, hot, load, profile, soak
from bench.bodies import CATALOG, MIRROR_PREFIXES, SHAPE_TITLES, SHAPES, mirror_repository
from bench.hot import progress
from bench.stack import (
    Backends,
    Cores,
    PinnedServer,
    StackError,
    baseline_server,
    choose_cores,
    metric_total,
    mirrorgate_server,
    start_backends,
    write_config,
    write_serving_pki,
)
from mirrorgate.devtools.localcluster import LocalClusterError
from tests.helpers.clair_standin import load_report
from tests.helpers.registries import registry_requests

THROUGHPUT_TARGET = 0.7  # mirrorgate/baseline saturated requests/s, at least
P99_TARGET = 3.0  # mirrorgate/baseline p99 at 50% of the baseline's saturation, at most

FULL = {"duration": 4.0, "soak": 100_000}
QUICK = {"duration": 1.0, "soak": 5_000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Measure mirrorgate's admission hot path against the bare aiohttp TLS server "
        "it runs on; see bench/README.md.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--quick", action="store_true", help="1 s runs and a 5k soak (about a minute)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of load per server and measurement (default 4)",
    )
    parser.add_argument(
        "--soak", type=int, default=None, metavar="N", help="soak admissions (default 100000)"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="connections per load run (default 32)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=("hot", "cold", "soak"),
        help="run only these parts (repeatable; default all)",
    )
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"pods for the hot path, comma-separated (default {','.join(SHAPES)})",
    )
    parser.add_argument(
        "--endpoints",
        default=",".join(hot.ENDPOINTS),
        help="endpoints for the hot path, comma-separated (default mutate,validate)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="record mirrorgate with py-spy during each saturated run into DIR and print the "
        "top functions",
    )
    parser.add_argument(
        "--mirrorgate-path",
        metavar="DIR",
        default=None,
        help="measure a modified checkout: the server imports mirrorgate from DIR's webhook/, "
        "deploy/ and certs/ instead of the installed ones (the baseline is unchanged)",
    )
    parser.add_argument(
        "--baseline-uvloop",
        action="store_true",
        help="run the baseline on uvloop (needs uvloop importable), to compare event loops",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, bodies, logs)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    seconds = args.duration or defaults["duration"]
    soak_total = args.soak if args.soak is not None else defaults["soak"]
    parts = set(args.only or ("hot", "cold", "soak"))
    shapes = tuple(s for s in args.shapes.split(",") if s)
    endpoints = tuple(e for e in args.endpoints.split(",") if e)
    unknown = (set(shapes) - set(SHAPES)) | (set(endpoints) - set(hot.ENDPOINTS))
    if unknown:
        print(
            f"unknown --shapes/--endpoints {sorted(unknown)}; choose from {SHAPES} and "
            f"{hot.ENDPOINTS}",
            file=sys.stderr,
        )
        return 2
    try:
        load.require_tools()
        if args.profile:
            profile.require_py_spy()
    except (load.LoadError, profile.ProfileError) as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2

    cores = choose_cores()
    if cores.load is not None:
        # This process, the registry and Clair it starts, and the load generators share the
        # load core; only the server under test runs on the server core.
        os.sched_setaffinity(0, {cores.load})
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="mirrorgate-bench-"))
    started = time.monotonic()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "pinning": cores.describe(),
        "duration_s": seconds,
        "connections": args.connections,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with ExitStack() as stack:
            report.update(
                _run(stack, work, args, cores, parts, shapes, endpoints, seconds, soak_total)
            )
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (
        StackError,
        LocalClusterError,
        hot.HotPathError,
        load.LoadError,
        profile.ProfileError,
    ) as err:
        print(f"bench: {err}\neverything started was stopped", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"bench: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    # The server under test and the load generator keep about two cores busy: more than that was
    # someone else's work (noise).
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = _targets(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def _run(
    stack: ExitStack,
    work: Path,
    args: argparse.Namespace,
    cores: Cores,
    parts: set[str],
    shapes: tuple[str, ...],
    endpoints: tuple[str, ...],
    seconds: float,
    soak_total: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    progress("starting docker-registry (TLS, htpasswd) and the Clair stand-in")
    backends = start_backends(work / "backends")
    stack.callback(backends.close)
    _push_catalog(backends)
    config = write_config(backends, work / "mirrorgate.yaml", prefixes=MIRROR_PREFIXES)
    pki = write_serving_pki(work / "pki")
    progress("starting mirrorgate serve and the baseline")
    mirrorgate = mirrorgate_server(
        work / "mirrorgate",
        config_file=config,
        pki=pki,
        core=cores.server,
        pythonpath=args.mirrorgate_path,
    )
    mirrorgate.start()
    stack.callback(mirrorgate.stop)
    rss = out["mirrorgate_rss_mb"] = {"started": round(mirrorgate.rss_mb(), 1)}
    baseline = baseline_server(
        work / "baseline", pki=pki, core=cores.server, uvloop=args.baseline_uvloop
    )
    baseline.start()
    stack.callback(baseline.stop)

    bodies = hot.prepare(mirrorgate, work / "bodies", mirror_host=backends.host)
    warm = hot.warm_up(mirrorgate, bodies)
    progress(f"verdicts known after {warm:.2f}s; caches warm")
    rss["warm"] = round(mirrorgate.rss_mb(), 1)
    out["bodies_bytes"] = {f"{e}-{s}": n for (e, s), n in bodies.sizes.items()}

    if "hot" in parts:
        clair_before = backends.clair.request_count()
        registry_before = registry_requests(backends.registry)
        assert mirrorgate.metrics_url is not None
        answered_before = _answers(mirrorgate.metrics_url)
        spy = _profiler(Path(args.profile), mirrorgate, seconds, cores) if args.profile else None

        rows = hot.measure(
            baseline,
            mirrorgate,
            bodies,
            seconds=seconds,
            connections=args.connections,
            core=cores.load,
            shapes=shapes,
            endpoints=endpoints,
            profiler=spy,
        )
        answered = {
            k: v - answered_before.get(k, 0) for k, v in _answers(mirrorgate.metrics_url).items()
        }
        out["hot"] = [row.as_dict() for row in rows]
        rss["after_hot"] = round(mirrorgate.rss_mb(), 1)
        out["hot_checks"] = {
            "clair_requests_during_hot_runs": backends.clair.request_count() - clair_before,
            "registry_requests_during_hot_runs": registry_requests(backends.registry)
            - registry_before,
            "mirrorgate_answers": answered,
        }
        if args.profile:
            out["profile"] = {
                f"{e}-{s}": profile.top(Path(args.profile) / f"{e}-{s}.txt")
                for e in endpoints
                for s in shapes
            }
    if "cold" in parts:
        progress("cold path: 200 concurrent admissions of 20 new images")
        delay = cold.QUICK_INDEX_DELAY if args.quick else cold.INDEX_DELAY
        out["cold"] = cold.run(mirrorgate, backends, index_delay=delay).as_dict()
        rss["after_cold"] = round(mirrorgate.rss_mb(), 1)
    if "soak" in parts:
        progress(f"soak: {soak_total} admissions")
        out["soak"] = soak.run(
            mirrorgate,
            bodies,
            total=soak_total,
            connections=args.connections,
            core=cores.load,
        ).as_dict()
        rss["after_soak"] = round(mirrorgate.rss_mb(), 1)
    return out


def _profiler(
    directory: Path, server: PinnedServer, seconds: float, cores: Cores
) -> Callable[[str, str], contextlib.AbstractContextManager[None]]:
    def record(endpoint: str, shape: str) -> contextlib.AbstractContextManager[None]:
        return profile.recording(
            server.pid, directory / f"{endpoint}-{shape}.txt", seconds=seconds, core=cores.load
        )

    return record


def _push_catalog(backends: Backends) -> None:
    progress(f"pushing {len(CATALOG)} images to the mirror and mapping their Clair reports")
    images = [(*mirror_repository(c.written), c.multi) for c in CATALOG]
    for i, image in enumerate(backends.push(images)):
        for manifest in image.manifests:
            # Real reports: 26 findings, all below High (pass); or none.
            backends.clair.set_report(manifest, load_report("alpine") if i % 2 else {})


def _answers(metrics_url: str) -> dict[str, float]:
    out = {}
    for webhook, outcome in (
        ("mutate", "mutated"),
        ("validate", "allowed"),
        ("validate", "denied"),
        ("validate", "error"),
        ("mutate", "error"),
    ):
        out[f"{webhook}_{outcome}"] = metric_total(
            metrics_url, "mirrorgate_admission_requests_total", webhook=webhook, outcome=outcome
        )
    return out


# --- the report ---------------------------------------------------------------------------------


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if "hot" in report:
        misses = []
        for row in report["hot"]:
            name = f"{row['endpoint']} {row['pod']}"
            if row["saturated_rps"]["ratio"] < THROUGHPUT_TARGET:
                misses.append(f"{name}: throughput {row['saturated_rps']['ratio']:.2f}x")
            if not row["p99_ms_at_50pct"]["ratio"] <= P99_TARGET:
                misses.append(f"{name}: p99 {row['p99_ms_at_50pct']['ratio']:.2f}x")
        checks = report["hot_checks"]
        if checks["clair_requests_during_hot_runs"]:
            misses.append(f"{checks['clair_requests_during_hot_runs']} Clair calls while warm")
        targets["hot"] = {"met": not misses, "misses": misses}
    if "cold" in report:
        targets["cold"] = {"met": report["cold"]["target_met"]}
    if "soak" in report:
        targets["soak"] = {"met": report["soak"]["target_met"]}
    return targets


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    out = [
        f"mirrorgate hot-path benchmark, {report['date']} ({report['machine']})",
        f"pinning: {report['pinning']}",
        f"{report['duration_s']:g} s per run, {report['connections']} connections; "
        f"wall time {report['wall_seconds']} s; load average before "
        f"{report['load_average_before'][0]:.2f}, after {report['load_average_after'][0]:.2f} "
        "(this run keeps about 2 busy: more means other work shared the machine)",
        "",
    ]
    if "hot" in report:
        rows = []
        for r in report["hot"]:
            sat, p50, p99, rss = (
                r["saturated_rps"],
                r["p50_ms_at_50pct"],
                r["p99_ms_at_50pct"],
                r["rss_mb_after"],
            )
            mark = "" if r["mirrorgate_kept_up_with_fixed_rate"] else " (overloaded)"
            rows.append(
                [
                    r["endpoint"],
                    SHAPE_TITLES[r["pod"]],
                    _fmt(sat["baseline"], 0),
                    _fmt(sat["mirrorgate"], 0),
                    _fmt(sat["ratio"]) + ("" if sat["ratio"] >= THROUGHPUT_TARGET else " !"),
                    _fmt(r["fixed_rate_rps"], 0),
                    f"{_fmt(p50['baseline'])} / {_fmt(p50['mirrorgate'])}",
                    _fmt(p50["ratio"]),
                    f"{_fmt(p99['baseline'])} / {_fmt(p99['mirrorgate'])}{mark}",
                    _fmt(p99["ratio"]) + ("" if p99["ratio"] <= P99_TARGET else " !"),
                    f"{_fmt(rss['baseline'], 0)} / {_fmt(rss['mirrorgate'], 0)}",
                    _fmt(rss["ratio"]),
                ]
            )
        header = [
            "endpoint",
            "pod",
            "base rps",
            "mg rps",
            "mg/base",
            "@50% rps",
            "p50 ms base / mg",
            "mg/base",
            "p99 ms base / mg",
            "mg/base",
            "RSS MiB base / mg",
            "mg/base",
        ]
        out.append(
            "Warm hot path (mg = mirrorgate; ! = misses the target: throughput >= "
            f"{THROUGHPUT_TARGET}x, p99 <= {P99_TARGET:g}x)"
        )
        out.append(_table(header, rows, right={2, 3, 4, 5, 7, 9, 11}))
        checks = report["hot_checks"]
        answers = checks["mirrorgate_answers"]
        out.append(
            f"during the warm runs: {checks['clair_requests_during_hot_runs']} Clair requests, "
            f"{checks['registry_requests_during_hot_runs']:.0f} registry requests; mirrorgate "
            f"answered {answers['mutate_mutated']:.0f} /mutate with a patch, "
            f"{answers['validate_allowed']:.0f} /validate allowed, "
            f"{answers['validate_denied']:.0f} denied, "
            f"{answers['mutate_error'] + answers['validate_error']:.0f} errors"
        )
        out.append("")
    if "profile" in report:
        out.append("Profile of mirrorgate while saturated (py-spy, share of busy samples):")
        for name, prof in report["profile"].items():
            self_top = ", ".join(
                f"{p['function'].split(' (')[0]} {p['share']:.0%}" for p in prof["self"][:6]
            )
            out.append(f"  {name}: self: {self_top}")
        out.append("")
    if "cold" in report:
        c = report["cold"]
        out.append(
            f"Cold path: {c['admissions']} concurrent pod creates (/mutate then /validate) over "
            f"{c['images']} new images ({c['manifests']} manifests); Clair takes "
            f"{c['clair_index_delay_s']:g} s per index"
        )
        rows = [
            [what, str(v["min"]), str(v["max"]), str(v["total"])]
            for what, v in [*c["per_image"].items(), *c["per_manifest"].items()]
        ]
        per = ["per image"] * len(c["per_image"]) + ["per manifest"] * len(c["per_manifest"])
        rows = [[p, *r] for p, r in zip(per, rows, strict=True)]
        out.append(_table(["", "requests", "min", "max", "total"], rows, right={2, 3, 4}))
        out.append(
            f"answers: {c['answers']}; burst answered in {c['burst_seconds']:.2f} s; every "
            f"verdict known after {c['all_verdicts_known_seconds']:.2f} s; target (1 resolution "
            f"per image, 1 index per manifest): {'met' if c['target_met'] else 'MISSED'}"
        )
        out.append("")
    if "soak" in report:
        s = report["soak"]
        rss = s["rss_mb"]
        out.append(
            f"Soak: {s['admissions']} admissions in {s['seconds']:.0f} s ({s['errors']} errors); "
            f"RSS start {rss['start']:.1f} MiB, half {rss['half']:.1f}, end {rss['end']:.1f}, "
            f"max {rss['max']:.1f}; second half {rss['second_half_growth']:+.2f} MiB; target "
            f"(< {soak.RSS_LIMIT_MB:g} MiB, flat within {soak.FLAT_MB:g} MiB): "
            f"{'met' if s['target_met'] else 'MISSED'}"
        )
        out.append("")
    if "mirrorgate_rss_mb" in report:
        steps = ", ".join(f"{k} {v:.0f}" for k, v in report["mirrorgate_rss_mb"].items())
        out.append(f"mirrorgate RSS (MiB) along the run: {steps}")
    verdicts = ", ".join(
        f"{part} {'met' if t['met'] else 'MISSED'}" for part, t in report["targets"].items()
    )
    out.append(f"Targets: {verdicts}")
    for miss in report["targets"].get("hot", {}).get("misses", []):
        out.append(f"  - {miss}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
