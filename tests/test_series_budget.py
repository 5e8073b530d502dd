"""The series a node sends: `[rdma] hw_counters` chooses the hw_counters exported ("default", "all" or a
list), filtered at export only, so the verdicts still read every counter (docs/SCALE.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stoker import config
from stoker.agent.platform import Platform
from stoker.agent.runtime import Agent
from stoker.detect.evidence import CONGESTION, RETRANSMITS
from stoker.exporters import rdma as rdma_families
from stoker.exporters.exposition import render
from stoker.sources.rdma import RdmaSource

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "sysfs" / "xe9680"
HW = re.compile(r'stoker_rdma_hw_events_total\{[^}]*?counter(=~|=)\\?"([^"\\]+)\\?"')


def hw_series(families) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for family in families:
        if family.name == "stoker_rdma_hw_events":
            for s in family.samples:
                out.setdefault((s.labels["device"], s.labels["port"]), set()).add(s.labels["counter"])
    return out


def named_counters(text: str) -> set[str]:
    return {name for _, names in HW.findall(text) for name in names.split("|")}


def test_the_default_exports_every_counter_the_verdicts_rules_and_dashboards_read():
    rules = named_counters((ROOT / "alerts" / "stoker.rules.yml").read_text())
    dashboards = set().union(*(named_counters(json.dumps(json.loads(p.read_text())))
                               for p in (ROOT / "dashboards").glob("*.json")))
    assert rules and dashboards, "the patterns found nothing: they no longer match the rules or dashboards"
    wanted = rules | dashboards | set(CONGESTION) | set(RETRANSMITS)
    assert wanted <= rdma_families.DEFAULT_HW_COUNTERS, wanted - rdma_families.DEFAULT_HW_COUNTERS


def test_export_filters_and_the_snapshot_keeps_every_counter():
    snapshot = RdmaSource(str(FIXTURE)).sample()
    every = {name for p in snapshot.ports for name in p.hw_counters}
    assert len(every) == 26 and len(snapshot.ports) == 8
    default = hw_series(rdma_families.families(snapshot))
    assert set(default) == {(p.device, p.port) for p in snapshot.ports}
    assert all(names == rdma_families.DEFAULT_HW_COUNTERS & every for names in default.values())
    assert all(names == every for names in hw_series(rdma_families.families(snapshot, None)).values())
    assert {name for p in snapshot.ports for name in p.hw_counters} == every, "the snapshot lost counters"
    chosen = hw_series(rdma_families.RdmaFamilies(("out_of_buffer", "rx_write_requests"))(snapshot))
    assert all(names == {"out_of_buffer", "rx_write_requests"} for names in chosen.values())
    assert not hw_series(rdma_families.RdmaFamilies(())(snapshot))
    text = render(rdma_families.RdmaFamilies("all")(snapshot)).decode()
    assert text.count("stoker_rdma_hw_events_total{") == 26 * 8


@pytest.mark.parametrize("value, error", [
    ("everything", 'must be "default", "all" or a list'), (["np_cnp_sent", "../x"], "'../x' is not"),
    ([""], "'' is not"), (3, "unexpected type"),
])
def test_the_setting_refuses_what_is_not_a_selection(value, error):
    with pytest.raises(config.ConfigError, match=re.escape(f"rdma.hw_counters: {error}") if "type" not in error
                       else "rdma.hw_counters"):
        config.load(overrides={"rdma": {"hw_counters": value}})


def test_the_setting_defaults_to_default_and_takes_all_or_a_list():
    assert config.load().rdma.hw_counters == "default"
    assert config.load(overrides={"rdma": {"hw_counters": "all"}}).rdma.hw_counters == "all"
    assert config.load(overrides={"rdma": {"hw_counters": ["np_cnp_sent"]}}).rdma.hw_counters == ("np_cnp_sent",)


async def test_a_reload_changes_the_selection_without_a_restart():
    def cfg(hw_counters):
        return config.load(overrides={
            "agent": {"listen": "127.0.0.1:0", "sysfs_root": str(FIXTURE)}, "rdma": {"hw_counters": hw_counters},
            **{k: {"enabled": False} for k in ("gpu", "netdev", "nfs", "host", "detect")}})
    agent = Agent(cfg("default"), Platform(nvml=None, links=None, open_ethtool=None))
    try:
        await agent.rdma.cycle()
        assert all(len(n) == len(rdma_families.DEFAULT_HW_COUNTERS) for n in hw_series(agent.rdma.families()).values())
        agent.apply(cfg("all"))
        assert all(len(n) == 26 for n in hw_series(agent.rdma.families()).values())
        assert len(agent.rdma.snapshot.ports[0].hw_counters) == 26
    finally:
        await agent.stop()


def test_the_contract_names_the_default_selection():
    row = next(line for line in (ROOT / "docs" / "METRICS.md").read_text().splitlines()
               if line.startswith("| stoker_rdma_hw_events_total |"))
    listed = set(re.findall(r"\b([a-z_]+)\b", row.split("read and the errors checked first:", 1)[1].split(".", 1)[0]))
    assert listed == rdma_families.DEFAULT_HW_COUNTERS
    assert f"the {len(rdma_families.DEFAULT_HW_COUNTERS)} the verdicts" in row
