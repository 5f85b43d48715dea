"""Vulnerability report + policy -> verdict, and verdicts -> the admission decision.

Pure: no HTTP, no Clair client. A verdict is one of four outcomes, and the difference matters to
the user: **pass** (scanned, nothing blocks), **fail** (scanned, the policy is violated),
**pending** (not scanned yet, or the scan is still running) and **unavailable** (the scanner or
the registry could not be asked). Reports are Clair v4 ``VulnerabilityReport`` documents, parsed
leniently: real reports do not validate against Clair's own schemas (tests/data/clair/README.md).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from mirrorgate.webhook.core.config import SEVERITIES, AllowEntry, ScanSettings

Outcome = Literal["pass", "fail", "pending", "unavailable"]
# Worst first when several platforms (or images) disagree.
OUTCOME_RANK: dict[Outcome, int] = {"pass": 0, "pending": 1, "unavailable": 2, "fail": 3}
SEVERITY_RANK: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}
SHOWN_FINDINGS = 5
SHOWN_IMAGE = 200
_CVE = re.compile(r"CVE-\d{4}-\d{4,}")
# RHSA-2023:5837, GHSA-jq35-85cj-fj4p, DSA-5678-1, ALAS2-2024-001 ...
_ADVISORY = re.compile(r"[A-Z][A-Z0-9]*-[0-9A-Za-z][0-9A-Za-z:.-]*")


@dataclass(frozen=True, slots=True)
class Finding:
    """One vulnerability in one installed package."""

    id: str  # what users put in scan.allow: a CVE id, else the advisory's id (e.g. RHSA-2023:5837)
    name: str  # Clair's vulnerability name
    cves: tuple[str, ...]
    severity: str  # Clair's normalized_severity
    package: str
    version: str  # installed version
    fixed_in: str  # "" when there is no fix
    link: str

    @property
    def rank(self) -> int:
        return SEVERITY_RANK.get(self.severity, 0)

    def line(self) -> str:
        fix = f"fixed in {self.fixed_in}" if self.fixed_in else "no fix"
        version = f" {self.version}" if self.version else ""
        link = f" {self.link}" if self.link else ""
        cves = [c for c in self.cves if c != self.id]
        also = f" ({', '.join(cves[:3])}{', ...' if len(cves) > 3 else ''})" if cves else ""
        return f"{self.id}{also} {self.severity} in {self.package}{version}, {fix}{link}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What is known about one manifest (one platform of an image)."""

    outcome: Outcome
    digest: str = ""
    platform: str = ""
    findings: tuple[Finding, ...] = ()  # blocking findings, worst first
    allowed: tuple[Finding, ...] = ()  # findings an unexpired allow entry accepted
    expired: tuple[AllowEntry, ...] = ()  # allow entries that would have applied but expired
    detail: str = ""  # pending/unavailable: what is going on

    @property
    def worst_severity(self) -> str:
        return self.findings[0].severity if self.findings else "none"


@dataclass(frozen=True, slots=True)
class ImageVerdict:
    """The verdict for one image: the worst of its platforms."""

    image: str
    verdict: Verdict
    platforms: tuple[Verdict, ...] = ()
    # The digest the image's reference resolved to (an index or a manifest): what a node pulls,
    # and what the kubelet reports as the running container's imageID.
    digest: str = ""

    @property
    def outcome(self) -> Outcome:
        return self.verdict.outcome

    @property
    def digests(self) -> tuple[str, ...]:
        """Every digest that names this image: the resolved one and each platform's."""
        found = (self.digest, self.verdict.digest, *(p.digest for p in self.platforms))
        return tuple(dict.fromkeys(d for d in found if d))


def findings_in(report: Mapping[str, Any]) -> list[Finding]:
    """Every (vulnerability, package) pair of a Clair VulnerabilityReport."""
    packages = report.get("packages") or {}
    vulns = report.get("vulnerabilities") or {}
    out: list[Finding] = []
    for pkg_id, vuln_ids in (report.get("package_vulnerabilities") or {}).items():
        pkg = packages.get(pkg_id) or {}
        for vid in vuln_ids or []:
            v = vulns.get(vid)
            if not isinstance(v, dict):
                continue
            name = str(v.get("name") or vid)
            links = str(v.get("links") or "")
            cves = tuple(dict.fromkeys(_CVE.findall(name) + _CVE.findall(links)))
            vpkg = v.get("package") or {}
            out.append(
                Finding(
                    id=_finding_id(name, cves),
                    name=name,
                    cves=cves,
                    severity=_severity(v),
                    package=str(pkg.get("name") or vpkg.get("name") or "?"),
                    version=str(pkg.get("version") or ""),
                    fixed_in=str(v.get("fixed_in_version") or ""),
                    link=links.split()[0] if links.split() else "",
                )
            )
    return out


def _severity(v: Mapping[str, Any]) -> str:
    # Notifications carry the normalized value under "severity" (tests/data/clair/README.md).
    sev = v.get("normalized_severity") or v.get("severity") or "Unknown"
    return sev if sev in SEVERITY_RANK else "Unknown"


def _finding_id(name: str, cves: tuple[str, ...]) -> str:
    """A short id users can write in scan.allow: the advisory id, else the CVE, else the name."""
    if _CVE.fullmatch(name):
        return name
    head = name.split()[0].rstrip(":") if name.split() else name
    if _ADVISORY.fullmatch(head):
        return head  # "RHSA-2023:5837: nghttp2 security update" -> RHSA-2023:5837
    return cves[0] if cves else head


def allow_applies(entry: AllowEntry, finding: Finding, image: str) -> bool:
    """Whether ``entry`` names ``finding`` (by name, advisory id or CVE) for ``image``."""
    ids = {finding.name, finding.id, *finding.cves}
    if entry.id not in ids:
        return False
    return any(fnmatchcase(image, pattern) for pattern in entry.images)


def evaluate(
    report: Mapping[str, Any],
    policy: ScanSettings,
    *,
    image: str,
    digest: str,
    today: dt.date,
    platform: str = "",
) -> Verdict:
    """Apply ``policy`` to a vulnerability report of ``image``'s manifest ``digest``."""
    threshold = SEVERITY_RANK[policy.block_severity]
    blocking: list[Finding] = []
    allowed: list[Finding] = []
    expired: dict[tuple[str, dt.date], AllowEntry] = {}
    for finding in findings_in(report):
        if finding.rank < threshold:
            continue
        if policy.fixable_only and not finding.fixed_in:
            continue
        accepted = False
        for entry in policy.allow:
            if not allow_applies(entry, finding, image):
                continue
            if entry.until >= today:
                accepted = True
                break
            expired[(entry.id, entry.until)] = entry
        (allowed if accepted else blocking).append(finding)
    blocking.sort(key=lambda f: (-f.rank, f.fixed_in == "", f.id, f.package))
    return Verdict(
        outcome="fail" if blocking else "pass",
        digest=digest,
        platform=platform,
        findings=tuple(_unique(blocking)),
        allowed=tuple(_unique(allowed)),
        expired=tuple(expired.values()),
    )


def _unique(findings: Iterable[Finding]) -> list[Finding]:
    seen: dict[tuple[str, str, str], Finding] = {}
    for f in findings:
        seen.setdefault((f.id, f.package, f.version), f)
    return list(seen.values())


def worst(verdicts: Sequence[Verdict]) -> Verdict:
    return max(verdicts, key=lambda v: OUTCOME_RANK[v.outcome])


# --- the admission decision ----------------------------------------------------------------------


@dataclass(slots=True)
class Decision:
    allowed: bool
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    audit: dict[str, str] = field(default_factory=dict)
    # (image, outcome): pending, unavailable, fail, or fail_running (admitted: already running)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def decide(
    verdicts: Sequence[ImageVerdict],
    policy: ScanSettings,
    *,
    mode: str,
    clair_url: str = "",
    running: Collection[str] = (),
) -> Decision:
    """Turn per-image verdicts into allow/deny, the user's message, warnings and audit notes.

    ``mode`` is the namespace's scan mode: ``audit`` never denies (it warns, and the rejection is
    still counted), ``enforce`` applies ``onPending``/``onUnavailable`` and denies failures.
    ``running`` holds the images whose digest already runs in the pod's namespace: with
    ``scan.running: warn`` a failing one is admitted with a warning (``fail_running``), so a CVE
    published after a workload was deployed does not block its restarts, rescheduling and
    scale-ups; a new image is judged as always.
    """
    decision = Decision(allowed=True)
    denials: list[str] = []
    for i, iv in enumerate(verdicts):
        v = iv.verdict
        # The API server prefixes keys with the webhook name: keep them plain qualified names.
        decision.audit[f"image-{i}"] = _audit_value(iv)
        for entry in {e.id: e for p in (iv.platforms or (v,)) for e in p.expired}.values():
            decision.warnings.append(
                f"mirrorgate: exception {entry.id} for {_shown(iv.image)} expired on "
                f"{entry.until.isoformat()} and no longer applies"
            )
        action = _action(v.outcome, policy)
        if action == "allow":
            continue
        text = explain(iv, policy, clair_url=clair_url)
        if v.outcome == "fail" and policy.running == "warn" and iv.image in running:
            decision.warnings.append(
                "mirrorgate: already running in this namespace, admitted (scan.running: warn): "
                f"{_one_line(text)}"
            )
            decision.rejected.append((iv.image, "fail_running"))
            continue
        if action == "deny" and mode != "audit":
            denials.append(text)
            decision.rejected.append((iv.image, v.outcome))
        else:
            prefix = "audit mode, would be denied: " if action == "deny" else ""
            decision.warnings.append(f"mirrorgate: {prefix}{_one_line(text)}")
            if action == "deny":
                decision.rejected.append((iv.image, v.outcome))
    if denials:
        decision.allowed = False
        decision.message = "\n".join(denials)
    return decision


def _action(outcome: Outcome, policy: ScanSettings) -> str:
    if outcome == "pass":
        return "allow"
    if outcome == "fail":
        return "deny"
    if outcome == "pending":
        return policy.on_pending
    return policy.on_unavailable


def explain(iv: ImageVerdict, policy: ScanSettings, *, clair_url: str = "") -> str:
    """The text a kubectl user reads for a non-passing image."""
    v = iv.verdict
    where = (
        f"{_shown(iv.image)} ({_short_digest(v.digest)}{', ' + v.platform if v.platform else ''})"
    )
    if v.outcome == "pending":
        return (
            f"image {where} has not been scanned yet: scan in progress, the controller will "
            f"retry{': ' + v.detail if v.detail else ''}"
        )
    if v.outcome == "unavailable":
        return f"image {_shown(iv.image)} could not be checked: {v.detail or 'scanner unavailable'}"
    shown = v.findings[:SHOWN_FINDINGS]
    lines = [
        f"image {where} has {len(v.findings)} "
        f"{'vulnerability' if len(v.findings) == 1 else 'vulnerabilities'} at or above "
        f"{policy.block_severity}{' with a fix' if policy.fixable_only else ''}:"
    ]
    lines += [f"  - {f.line()}" for f in shown]
    if len(v.findings) > len(shown):
        lines.append(f"  ... and {len(v.findings) - len(shown)} more")
    first = v.findings[0].id if v.findings else "ID"
    lines.append(
        f"  To accept a finding until it is fixed, add to scan.allow: {{id: {first}, "
        f'images: ["{_shown(_glob_for(iv.image))}"], until: YYYY-MM-DD, reason: "..."}}'
    )
    return "\n".join(lines)


def _glob_for(image: str) -> str:
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return f"{name}*"


def _shown(image: str) -> str:
    """An image as the messages show it: printable, and a hostile one cut to a readable length
    (a valid reference is never that long)."""
    text = "".join(c if c.isprintable() else "?" for c in image[: SHOWN_IMAGE + 1])
    return text if len(text) <= SHOWN_IMAGE else text[: SHOWN_IMAGE - 3] + "..."


def _short_digest(digest: str) -> str:
    return digest[:19] + "..." if len(digest) > 19 else (digest or "digest unknown")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines())


def _audit_value(iv: ImageVerdict) -> str:
    v = iv.verdict
    worst_sev = f" worst={v.worst_severity}" if v.outcome == "fail" else ""
    return f"{_shown(iv.image)} {v.outcome}{worst_sev} {v.digest}".strip()
