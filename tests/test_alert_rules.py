"""The alerting and recording rules: promtool check and unit tests, coverage, style, runbook."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import need_binary

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
RULES = ALERTS / "stoker.rules.yml"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    result = subprocess.run([need_binary("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    files = sorted(str(p) for p in (ALERTS / "tests").glob("*.yml"))
    result = subprocess.run([need_binary("promtool"), "test", "rules", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    firing, quiet = set(), set()
    for path in (ALERTS / "tests").glob("*.yml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {r["alert"] for r in rules() if "alert" in r}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_alert_style_and_runbook_sections():
    runbook = (ALERTS / "runbook.md").read_text()
    anchors = {re.sub(r"[^a-z0-9]", "", h.lower()) for h in re.findall(r"^## (.+)$", runbook, re.M)}
    for r in (r for r in rules() if "alert" in r):
        name = r["alert"]
        assert re.fullmatch(r"Stoker([A-Z][a-z0-9]*)+", name), name
        assert r["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description", "runbook_url"} <= set(r["annotations"]), name
        anchor = r["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == name.lower() and anchor in anchors, f"{name}: no runbook section #{anchor}"


def test_recording_rules_follow_the_naming_convention():
    for r in (r for r in rules() if "record" in r):
        assert re.fullmatch(r"[a-z_]+:stoker_[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]
