"""The vulnerability policy on Clair's real reports: verdicts, exceptions, and what users read."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from mirrorgate.webhook.core.config import AllowEntry, ClairSettings, ScanSettings
from mirrorgate.webhook.core.policy import (
    ImageVerdict,
    Verdict,
    decide,
    evaluate,
    explain,
    findings_in,
    worst,
)

CLAIR = Path(__file__).resolve().parent / "data" / "clair"  # copied from Clair, see its README
TRIMMED = json.loads((CLAIR / "derived" / "vulnerabilityreport.trimmed.json").read_text())
FULL = json.loads((CLAIR / "testdata" / "quay" / "vulnerabilityreport.json").read_text())
ALPINE = json.loads(
    (CLAIR / "testdata" / "quay" / "vulnerabilityreport_withenrichments.json").read_text()
)
TODAY = dt.date(2026, 11, 28)
IMAGE = "127.0.0.1:31000/library/app:1.0"
DIGEST = "sha256:" + "d" * 64


def policy(**kw) -> ScanSettings:
    return ScanSettings(clair=ClairSettings(url="http://clair:6060", psk_file="/psk"), **kw)


def verdict(report=TRIMMED, **kw) -> Verdict:
    return evaluate(report, policy(**kw), image=IMAGE, digest=DIGEST, today=TODAY)


@pytest.mark.parametrize(
    ("kw", "outcome", "ids"),
    [
        pytest.param(
            {"block_severity": "Critical"},
            "pass",
            [],
            id="nothing is Critical so a Critical threshold passes",
        ),
        pytest.param(
            {"block_severity": "High"},
            "fail",
            ["RHSA-2023:5837"],
            id="the High advisory fails a High threshold",
        ),
        pytest.param(
            {"block_severity": "Medium"},
            "fail",
            ["RHSA-2023:5837", "RHSA-2024:0628"],
            id="Medium adds the libssh advisory, worst first",
        ),
        pytest.param(
            {"block_severity": "Low"},
            "fail",
            [
                "RHSA-2023:5837",
                "RHSA-2024:0628",
                "CVE-2022-41409",
                "CVE-2023-6004",
                "CVE-2023-6918",
            ],
            id="Low adds the unfixed CVEs, fixable before unfixable",
        ),
        pytest.param(
            {"block_severity": "Low", "fixable_only": True},
            "fail",
            ["RHSA-2023:5837", "RHSA-2024:0628"],
            id="fixableOnly drops findings without a fixed version",
        ),
        pytest.param(
            {"block_severity": "Unknown"},
            "fail",
            [
                "RHSA-2023:5837",
                "RHSA-2024:0628",
                "CVE-2022-41409",
                "CVE-2023-6004",
                "CVE-2023-6918",
                "GHSA-jq35-85cj-fj4p",
            ],
            id="Unknown blocks everything, the GHSA advisory included",
        ),
    ],
)
def test_thresholds_on_a_real_report(kw, outcome, ids):
    v = verdict(**kw)
    assert v.outcome == outcome
    assert [f.id for f in v.findings] == ids


def test_findings_carry_package_installed_version_fix_and_link():
    (first, *_) = verdict(block_severity="High").findings
    assert first.package == "libnghttp2" and first.version == "1.33.0-3.el8_2.1"
    assert first.fixed_in == "0:1.33.0-5.el8_8"
    assert first.cves == ("CVE-2023-44487",)
    assert first.link == "https://access.redhat.com/errata/RHSA-2023:5837"


def test_the_full_real_report_counts_match_its_severities():
    by_severity: dict[str, set[str]] = {}
    for f in findings_in(FULL):
        by_severity.setdefault(f.severity, set()).add(f.name)
    assert verdict(FULL, block_severity="Critical").outcome == "pass"
    high = verdict(FULL, block_severity="High")
    assert high.outcome == "fail"
    assert {f.name for f in high.findings} == by_severity["High"]


def test_an_all_unknown_report_passes_unless_unknown_blocks():
    assert verdict(ALPINE, block_severity="Negligible").outcome == "pass"
    assert verdict(ALPINE, block_severity="Unknown").outcome == "fail"


def allow(id_, *, images=("*/library/app*",), until=dt.date(2027, 3, 31)):
    return AllowEntry(id=id_, images=tuple(images), until=until, reason="not reachable")


@pytest.mark.parametrize(
    "entry_id",
    [
        pytest.param("RHSA-2023:5837", id="by advisory id"),
        pytest.param("CVE-2023-44487", id="by a CVE named in the links"),
        pytest.param("RHSA-2023:5837: nghttp2 security update (Important)", id="by full name"),
    ],
)
def test_an_allow_entry_accepts_a_finding(entry_id):
    v = verdict(block_severity="High", allow=(allow(entry_id),))
    assert v.outcome == "pass"
    assert [f.id for f in v.allowed] == ["RHSA-2023:5837"]


def test_an_allow_entry_for_other_images_does_not_apply():
    v = verdict(block_severity="High", allow=(allow("CVE-2023-44487", images=["*/other/*"]),))
    assert v.outcome == "fail"


def test_an_expired_allow_entry_no_longer_applies_and_is_reported():
    old = allow("CVE-2023-44487", until=dt.date(2026, 11, 27))
    v = verdict(block_severity="High", allow=(old,))
    assert v.outcome == "fail" and v.expired == (old,)
    d = decide([ImageVerdict(IMAGE, v)], policy(block_severity="High"), mode="enforce")
    assert any("expired on 2026-11-27" in w for w in d.warnings)


def test_an_allow_entry_is_valid_through_its_last_day():
    v = verdict(block_severity="High", allow=(allow("CVE-2023-44487", until=TODAY),))
    assert v.outcome == "pass"


def test_the_denial_message_says_what_and_how_to_fix():
    v = verdict(block_severity="Low")
    text = explain(ImageVerdict(IMAGE, v), policy(block_severity="Low"))
    lines = text.splitlines()
    assert lines[0] == (
        f"image {IMAGE} (sha256:dddddddddddd...) has 5 vulnerabilities at or above Low:"
    )
    assert lines[1] == (
        "  - RHSA-2023:5837 (CVE-2023-44487) High in libnghttp2 1.33.0-3.el8_2.1, fixed in "
        "0:1.33.0-5.el8_8 https://access.redhat.com/errata/RHSA-2023:5837"
    )
    assert "no fix" in text
    assert lines[-1].startswith(
        "  To accept a finding until it is fixed, add to scan.allow: "
        '{id: RHSA-2023:5837, images: ["127.0.0.1:31000/library/app*"]'
    )


def test_more_than_five_findings_are_summarised():
    v = verdict(FULL, block_severity="Low")
    text = explain(ImageVerdict(IMAGE, v), policy(block_severity="Low"))
    assert f"... and {len(v.findings) - 5} more" in text
    assert text.count("\n  - ") == 5


def test_worst_of_platforms_is_fail_over_unavailable_over_pending_over_pass():
    vs = [Verdict("pass"), Verdict("pending"), Verdict("unavailable"), Verdict("fail")]
    assert worst(vs).outcome == "fail"
    assert worst(vs[:3]).outcome == "unavailable"
    assert worst(vs[:2]).outcome == "pending"


PENDING = ImageVerdict(IMAGE, Verdict("pending", digest=DIGEST, detail="indexing is still running"))
DOWN = ImageVerdict(
    IMAGE,
    Verdict(
        "unavailable",
        detail="vulnerability scanner unavailable: Clair at http://clair:6060 unreachable",
    ),
)


@pytest.mark.parametrize(
    ("verdicts", "kw", "mode", "allowed", "warned", "rejected"),
    [
        pytest.param(
            [PENDING],
            {},
            "enforce",
            False,
            False,
            ["pending"],
            id="pending is denied by default so the controller retries",
        ),
        pytest.param(
            [PENDING],
            {"on_pending": "warn"},
            "enforce",
            True,
            True,
            [],
            id="pending with onPending warn is admitted with a warning",
        ),
        pytest.param(
            [PENDING],
            {"on_pending": "allow"},
            "enforce",
            True,
            False,
            [],
            id="pending with onPending allow is admitted silently",
        ),
        pytest.param([DOWN], {}, "enforce", True, True, [], id="scanner down warns by default"),
        pytest.param(
            [DOWN],
            {"on_unavailable": "deny"},
            "enforce",
            False,
            False,
            ["unavailable"],
            id="scanner down with onUnavailable deny is denied",
        ),
        pytest.param(
            [ImageVerdict(IMAGE, verdict())],
            {},
            "audit",
            True,
            True,
            ["fail"],
            id="audit mode warns and counts a failure but admits",
        ),
        pytest.param(
            [ImageVerdict(IMAGE, verdict())],
            {},
            "enforce",
            False,
            False,
            ["fail"],
            id="enforce mode denies a failure",
        ),
    ],
)
def test_decisions(verdicts, kw, mode, allowed, warned, rejected):
    d = decide(verdicts, policy(**kw), mode=mode)
    assert d.allowed is allowed
    assert bool(d.warnings) is warned
    assert [outcome for _, outcome in d.rejected] == rejected
    if not allowed:
        assert d.message
    if rejected == ["pending"]:
        assert "scan in progress, the controller will retry" in d.message


def test_audit_annotations_record_every_image():
    ok = ImageVerdict("a:1", Verdict("pass", digest=DIGEST))
    bad = ImageVerdict(IMAGE, verdict())
    d = decide([ok, bad], policy(), mode="enforce")
    assert d.audit == {
        "image-0": f"a:1 pass {DIGEST}",
        "image-1": f"{IMAGE} fail worst=High {DIGEST}",
    }
