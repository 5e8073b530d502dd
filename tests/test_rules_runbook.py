"""The alerts' runbook links: a default that resolves on the node, a base the operator sets
(`stoker rules --runbook-base`), and anchors that are the runbook's own headings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stoker import rules as rules_mod
from stoker.cli import main
from tests.conftest import need_binary

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "alerts"
RULES = ALERTS / "stoker.rules.yml"
WIKI = "https://wiki.example.org/ops/Stoker_runbook"


def alerts(text: str) -> list[dict]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"] if "alert" in r]


def github_anchors(markdown: str) -> set[str]:
    """The fragment of each heading as GitHub (and most Markdown renderers) make it: lower case,
    punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", markdown, re.M)}


def stoker_rules(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["rules", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_runbook_anchor_is_a_heading_of_the_runbook():
    anchors = github_anchors((ALERTS / "runbook.md").read_text())
    shipped = alerts(RULES.read_text())
    assert len(shipped) >= 20
    for rule in shipped:
        base, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert anchor in anchors, f"{rule['alert']}: alerts/runbook.md has no heading for #{anchor}"
        assert anchor == rule["alert"].lower(), rule["alert"]


def test_shipped_rules_point_at_the_runbook_the_package_installs():
    for rule in alerts(RULES.read_text()):
        assert rule["annotations"]["runbook_url"].startswith(rules_mod.DEFAULT_BASE + "#"), rule["alert"]
    # packaging/deb/build.sh copies alerts/runbook.md to /opt/stoker/share/doc/stoker/ (test_deb installs it)
    assert rules_mod.DEFAULT_BASE == "file:///opt/stoker/share/doc/stoker/runbook.md"
    assert '"$repo/alerts/runbook.md" "$venv/share/doc/stoker/"' in (REPO / "packaging/deb/build.sh").read_text()
    # and the unit tests expect the links the shipped rules carry
    for test_file in (ALERTS / "tests").glob("*.yml"):
        for url in re.findall(r"runbook_url: (\S+)", test_file.read_text()):
            assert url.startswith(rules_mod.DEFAULT_BASE + "#"), (test_file.name, url)


def test_stoker_rules_without_a_base_prints_the_shipped_rules(capsys):
    code, out, err = stoker_rules(capsys)
    assert (code, err) == (0, "")
    assert out == RULES.read_text()


def test_stoker_rules_rewrites_only_the_runbook_links(capsys):
    code, out, err = stoker_rules(capsys, "--runbook-base", WIKI, str(RULES))
    assert (code, err) == (0, "")
    before, after = RULES.read_text().splitlines(), out.splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert changed and all("runbook_url:" in a and "runbook_url:" in b for a, b in changed)
    assert len(changed) == len(alerts(out))  # one link per alert, nothing else touched
    for rule in alerts(out):
        assert rule["annotations"]["runbook_url"] == f"{WIKI}#{rule['alert'].lower()}"
    # a second rewrite starts from the first: the base is replaced, never stacked
    again = rules_mod.with_runbook_base(out, "https://other.example.org/runbook")
    assert WIKI not in again and again.count("https://other.example.org/runbook#") == len(changed)


def test_a_pattern_puts_the_alert_where_percent_s_is(capsys):
    code, out, _ = stoker_rules(capsys, "--runbook-base", "https://wiki.example.org/stoker/%s")
    assert code == 0
    urls = {r["alert"]: r["annotations"]["runbook_url"] for r in alerts(out)}
    assert urls["StokerGpuLost"] == "https://wiki.example.org/stoker/stokergpulost"
    assert "#" not in "".join(urls.values())


@pytest.mark.parametrize("base", ["wiki.example.org/runbook", "https://wiki.example.org/run book",
                                  "https://wiki.example.org/runbook#section", 'https://x/"q', ""])
def test_a_bad_base_is_refused_with_exit_2_and_nothing_printed(capsys, base):
    code, out, err = stoker_rules(capsys, "--runbook-base", base)
    assert (code, out) == (2, "")
    assert err.startswith("stoker: runbook base")


def test_a_file_that_is_not_the_rules_is_refused(capsys, tmp_path):
    code, out, err = stoker_rules(capsys, str(REPO / "README.md"))
    assert (code, out) == (2, "") and "not a Prometheus rules file" in err
    lost = tmp_path / "rules.yml"
    lost.write_text(re.sub(r"^ *runbook_url: \S+#stokergpulost\n", "", RULES.read_text(), flags=re.M))
    code, out, err = stoker_rules(capsys, "--runbook-base", WIKI, str(lost))
    assert (code, out) == (2, "") and "StokerGpuLost" in err
    code, _, err = stoker_rules(capsys, str(tmp_path / "missing.yml"))
    assert code == 2 and "missing.yml" in err


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_rules_file_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    """`stoker rules FILE` opened the file with open(): a FIFO that nobody writes to blocked the command
    for good, and /dev/zero was read until memory ran out. It is read as the agent's own files are
    (config.read_text: only a regular file, opened without blocking, at most 1 MiB): one line, exit 2.
    The subprocess's timeout is the proof that nothing waits."""
    path = tmp_path / "rules.yml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.write_text(RULES.read_text() + "#" * (1 << 20))
    done = subprocess.run([sys.executable, "-m", "stoker", "rules", str(path)], capture_output=True, text=True,
                          timeout=30)
    expected = "larger than 1 MiB" if kind == "huge" else "not a regular file"
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.count("\n") == 1 and str(path) in done.stderr and expected in done.stderr, done.stderr


def test_rewritten_rules_pass_promtool_and_the_unit_tests(tmp_path):
    """The rewritten file is what Prometheus loads: `promtool check rules`, and the whole unit-test
    suite with its expected annotations moved to the same base."""
    promtool = need_binary("promtool")
    done = subprocess.run([sys.executable, "-m", "stoker", "rules", "--runbook-base", WIKI],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (tmp_path / "stoker.rules.yml").write_text(done.stdout)
    tests = tmp_path / "tests"
    tests.mkdir()
    for path in (ALERTS / "tests").glob("*.yml"):
        (tests / path.name).write_text(path.read_text().replace(rules_mod.DEFAULT_BASE + "#", WIKI + "#"))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "stoker.rules.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", *sorted(map(str, tests.glob("*.yml")))],
                          capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout
