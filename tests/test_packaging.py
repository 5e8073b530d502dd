"""The configuration examples operators copy: valid for the real tools, routed as documented."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import need_binary

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
RULES = Path(__file__).resolve().parent.parent / "alerts" / "stoker.rules.yml"


def test_prometheus_example_is_valid_with_the_shipped_rules(tmp_path):
    config = yaml.safe_load((PACKAGING / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"][1]["file_sd_configs"][0]["files"] = [str(PACKAGING / "prometheus" / "targets" / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([need_binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_file_sd_targets_carry_the_node_label():
    for path in (PACKAGING / "prometheus" / "targets").glob("*.yml"):
        for group in yaml.safe_load(path.read_text()):
            assert group["labels"]["node"] and group["targets"]


def test_alertmanager_example_is_valid_and_routes_by_severity():
    config = PACKAGING / "alertmanager" / "alertmanager.yml"
    amtool = need_binary("amtool")
    check = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def route(*labels: str) -> str:
        out = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}", *labels],
                             capture_output=True, text=True)
        return out.stdout.strip()

    assert route("alertname=StokerGpusStarvedByStorage", "severity=critical", "node=n1") == "gpu-oncall-pager"
    assert route("alertname=StokerGpusStarvedByHost", "severity=warning", "node=n1") == "tickets"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    ds = yaml.safe_load((PACKAGING / "grafana" / "provisioning" / "datasources" / "stoker.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((PACKAGING / "grafana" / "provisioning" / "dashboards" / "stoker.yml").read_text())
    assert dash["providers"][0]["type"] == "file" and dash["providers"][0]["options"]["path"]


def test_remote_write_and_federation_examples_are_valid(tmp_path):
    for name in ("remote-write.yml", "federation.yml"):
        config = yaml.safe_load((PACKAGING / "prometheus" / name).read_text())
        if "rule_files" in config:
            config["rule_files"] = [str(RULES)]
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([need_binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, name + result.stdout + result.stderr


def test_federation_matches_every_recording_rule():
    import re
    match = yaml.safe_load((PACKAGING / "prometheus" / "federation.yml").read_text())[
        "scrape_configs"][0]["params"]["match[]"][0]
    pattern = re.search(r'__name__=~"([^"]+)"', match).group(1)
    for record in re.findall(r"record: (\S+)", RULES.read_text()):
        assert re.fullmatch(pattern, record), f"{record} is not federated"
