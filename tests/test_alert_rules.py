"""The shipped alert rules, checked and unit-tested with the real promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mirrorgate.webhook.infra.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "monitoring" / "mirrorgate.rules.yml"
RULE_TESTS = ROOT / "deploy" / "monitoring" / "mirrorgate.rules_test.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: apt-get install prometheus (scripts/setup does)"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent
    )


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rules():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout


def test_every_alert_fires_and_stays_silent_in_promtool_unit_tests():
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} never fires in a test"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} has no silent case"


def test_a_wrong_expectation_makes_promtool_fail(tmp_path):
    broken = RULE_TESTS.read_text().replace(
        "mirrorgate rejected 2 image(s)", "mirrorgate rejected 3 image(s)"
    )
    (tmp_path / "t.yml").write_text(
        broken.replace("rule_files: [mirrorgate.rules.yml]", f"rule_files: [{RULES}]")
    )
    r = promtool("test", "rules", str(tmp_path / "t.yml"))
    assert r.returncode == 1 and "FAILED" in r.stdout + r.stderr


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_each_alert_explains_itself_and_links_a_runbook_section(rule):
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]
    anchor = annotations["runbook_url"].split("#", 1)[1]
    headings = {h.strip().lower() for h in re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.M)}
    assert anchor in headings, f"docs/runbooks.md has no section for {rule['alert']}"
    assert rule["labels"]["severity"] in ("warning", "critical")


def test_every_metric_the_rules_use_is_one_mirrorgate_exposes():
    exposed = set()
    for family in Metrics().registry.collect():
        exposed.add(family.name)
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            exposed.add(family.name + suffix)
    used = set()
    for rule in alerts():
        used |= set(re.findall(r"\b(mirrorgate_[a-z_]+)", rule["expr"]))
    assert used and used <= exposed, f"unknown metrics in rules: {sorted(used - exposed)}"
