"""The RDMA collector on fixture trees shaped like real sysfs, with faults injected at the file boundary."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from stoker.config import DetectConfig
from stoker.detect.evidence import CONGESTION, RETRANSMITS, EvidenceTracker
from stoker.detect.view import NodeView
from stoker.exporters import rdma as rdma_families
from stoker.exporters.exposition import render
from stoker.sources.files import FileReader
from stoker.sim.simulation import Simulation
from stoker.sources.rdma import RdmaSource, parse_rate
from tests.conftest import ManualClock

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"


@pytest.fixture
def small(tmp_path) -> Path:
    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "small", root, symlinks=True)
    return root


def port_dir(root: Path, device: str, port: str = "1") -> Path:
    return root / "class" / "infiniband" / device / "ports" / port


def by_port(snapshot):
    return {(p.device, p.port): p for p in snapshot.ports}


def test_full_xe9680_tree():
    snap = RdmaSource(str(FIXTURES / "xe9680")).sample()
    ports = by_port(snap)
    assert sorted(ports) == [(f"mlx5_{i}", "1") for i in range(8)]
    assert snap.problems == []
    p = ports[("mlx5_3", "1")]
    assert p.up and p.speed_bytes_per_second == 400e9 / 8
    assert p.link_layer == "Ethernet" and p.fw_version == "28.39.1002"
    assert p.interface == "ens5df0np0"
    raw_words = int((port_dir(FIXTURES / "xe9680", "mlx5_3") / "counters" / "port_xmit_data").read_text())
    assert p.traffic["transmit_bytes"] == raw_words * 4
    assert p.errors["symbol_error"] == 9
    assert "lifespan" not in p.hw_counters and p.hw_counters["np_cnp_sent"] == 1203


def test_kernel_named_device_down_port_and_no_pma(small):
    snap = RdmaSource(str(small)).sample()
    ports = by_port(snap)
    up, down = ports[("rocep24s0f0", "1")], ports[("rocep24s0f0", "2")]
    assert up.interface == "ens24f0np0"  # from device/net/, no GID table here
    assert up.up and up.speed_bytes_per_second == 100e9 / 8
    assert down.up is False and down.speed_bytes_per_second is None, "a down port's rate is stale"
    assert "port_xmit_discards" not in up.errors and up.errors["port_rcv_errors"] == 3
    assert snap.problems == ["no_pma"]


def test_32_bit_wrap_counts_forward(small):
    source = RdmaSource(str(small))
    before = by_port(source.sample())[("rocep24s0f0", "1")].hw_counters["np_cnp_sent"]
    assert before == 4294967000
    (port_dir(small, "rocep24s0f0") / "hw_counters" / "np_cnp_sent").write_text("704\n")
    after = by_port(source.sample())[("rocep24s0f0", "1")].hw_counters["np_cnp_sent"]
    assert after - before == 1000


def test_reset_of_one_counter_carries_on_from_the_new_value(small):
    source = RdmaSource(str(small))
    hw = port_dir(small, "rocep24s0f0") / "hw_counters"
    (hw / "out_of_sequence").write_text("3000000000\n")
    first = by_port(source.sample())[("rocep24s0f0", "1")]
    (hw / "out_of_sequence").write_text("25\n")  # driver reload: hw_counters start again
    second = by_port(source.sample())[("rocep24s0f0", "1")]
    assert second.hw_counters["out_of_sequence"] == 3000000025
    assert second.hw_counters["np_cnp_sent"] == first.hw_counters["np_cnp_sent"]
    assert second.traffic == first.traffic


def test_device_vanishes_and_returns(small):
    source = RdmaSource(str(small))
    first = by_port(source.sample())[("rocep24s0f0", "1")]
    link = small / "class" / "infiniband" / "rocep24s0f0"
    target = os.readlink(link)
    link.unlink()
    assert source.sample().ports == []
    os.symlink(target, link)
    # it returns after a driver reload: hw_counters were reset, counters/ were not
    (port_dir(small, "rocep24s0f0") / "hw_counters" / "out_of_sequence").write_text("2\n")
    back = by_port(source.sample())[("rocep24s0f0", "1")]
    assert back.hw_counters["out_of_sequence"] == first.hw_counters["out_of_sequence"] + 2
    assert back.traffic["transmit_bytes"] == first.traffic["transmit_bytes"]


class FailingReader(FileReader):
    """Fails chosen files the way the kernel does; counts every read."""

    def __init__(self, failures: dict[str, int]):
        self.failures = failures
        self.reads: dict[str, int] = {}

    def read(self, path: str) -> str:
        name = os.path.basename(path)
        self.reads[name] = self.reads.get(name, 0) + 1
        if name in self.failures:
            raise OSError(self.failures[name], os.strerror(self.failures[name]), path)
        return super().read(path)


@pytest.mark.parametrize("code, reason", [(errno.EINVAL, "einval"), (errno.EACCES, "eacces")])
def test_failing_file_drops_one_series_and_backs_off(small, code, reason):
    reader = FailingReader({"out_of_sequence": code})
    clock = ManualClock()
    source = RdmaSource(str(small), reader=reader, clock=clock)
    snap = source.sample()
    port = by_port(snap)[("rocep24s0f0", "1")]
    assert "out_of_sequence" not in port.hw_counters
    assert port.hw_counters["np_cnp_sent"] == 4294967000 and port.traffic["transmit_bytes"] == 4000
    assert snap.problems == ["no_pma", reason, reason]  # port 1 and port 2 both fail
    reads = reader.reads["out_of_sequence"]
    clock.advance(0.5)
    source.sample()
    assert reader.reads["out_of_sequence"] == reads, "retried only after its backoff"
    clock.advance(1.0)
    source.sample()
    assert reader.reads["out_of_sequence"] == reads + 2
    del reader.failures["out_of_sequence"]
    clock.advance(2.5)
    port = by_port(source.sample())[("rocep24s0f0", "1")]
    assert port.hw_counters["out_of_sequence"] == 7


def test_garbage_is_a_counted_failure(small):
    (port_dir(small, "rocep24s0f0") / "counters" / "symbol_error").write_text("\x00\xffjunk\n")
    snap = RdmaSource(str(small)).sample()
    assert "symbol_error" not in by_port(snap)[("rocep24s0f0", "1")].errors
    assert "garbage" in snap.problems


def test_no_infiniband_class_is_an_empty_snapshot(tmp_path):
    snap = RdmaSource(str(tmp_path)).sample()
    assert snap.ports == [] and snap.problems == []


def test_rate_parsing():
    assert parse_rate("400 Gb/sec (4X NDR)") == 5e10
    assert parse_rate("25 Gb/sec (1X EDR)") == 25e9 / 8
    assert parse_rate("unknown") is None


def test_families_render_every_rdma_metric():
    text = render(rdma_families.families(RdmaSource(str(FIXTURES / "xe9680")).sample())).decode()
    for name in ("stoker_rdma_port_info", "stoker_rdma_port_up", "stoker_rdma_port_speed_bytes_per_second",
                 "stoker_rdma_port_transmit_bytes_total", "stoker_rdma_port_receive_packets_total",
                 "stoker_rdma_port_errors_total", "stoker_rdma_hw_events_total"):
        assert f"\n{name}{{" in text


# -- tiers: what the verdicts judge each cycle, what is only exported every SLOW_EVERY ------------

def tiered(root, clock, reader=None) -> RdmaSource:
    """The source as the agent builds it (agent/runtime.py)."""
    return RdmaSource(str(root), reader=reader, clock=clock, every_cycle=CONGESTION + RETRANSMITS)


@pytest.mark.parametrize("scenario", ["network-congested", "network-lossy", "port-down"])
def test_tiers_leave_the_verdicts_evidence_unchanged_each_second(tmp_path, scenario):
    """The evidence measured each second from the tiered source is the evidence from reading every
    file every cycle, in the scenarios that move the counters the verdicts judge and the port state."""
    clock = ManualClock(0.0)
    sim = Simulation(scenario, str(tmp_path), clock=clock)
    every, tiers = RdmaSource(sim.sysfs_root, clock=clock), tiered(sim.sysfs_root, clock)
    trackers = [EvidenceTracker(DetectConfig()), EvidenceTracker(DetectConfig())]
    signals_seen = 0
    for _ in range(40):
        clock.advance(1.0)
        sim.network.advance()
        views = [NodeView(clock(), rdma=source.sample()) for source in (every, tiers)]
        a, b = (tracker.signals(view) for tracker, view in zip(trackers, views))
        assert a == b
        assert [(p.device, p.port, p.up, p.state) for p in views[0].rdma.ports] == \
               [(p.device, p.port, p.up, p.state) for p in views[1].rdma.ports]
        signals_seen += len(a)
    assert signals_seen, "the scenario raised no RDMA evidence: nothing was compared"


def test_only_exported_counters_are_read_on_the_slow_tier_and_held_between(small):
    clock = ManualClock()
    reader = FailingReader({})
    source = tiered(small, clock, reader)
    first = by_port(source.sample())[("rocep24s0f0", "1")]
    reads = dict(reader.reads)
    counters = port_dir(small, "rocep24s0f0") / "counters"
    words = int((counters / "port_xmit_data").read_text())
    (counters / "port_xmit_data").write_text(f"{words + 1000}\n")
    (counters / "symbol_error").write_text("20\n")
    for _ in range(4):
        clock.advance(1.0)
        held = by_port(source.sample())[("rocep24s0f0", "1")]
        assert held.traffic == first.traffic and held.errors == first.errors, "held, every series still there"
        assert held.fw_version == first.fw_version and held.interface == first.interface
    assert reader.reads["port_xmit_data"] == reads["port_xmit_data"]
    assert reader.reads["fw_ver"] == reads["fw_ver"] and reader.reads["rate"] == reads["rate"]
    assert reader.reads["state"] == reads["state"] + 8 and reader.reads["np_cnp_sent"] == reads["np_cnp_sent"] + 8
    clock.advance(1.0)  # SLOW_EVERY after the first read
    later = by_port(source.sample())[("rocep24s0f0", "1")]
    assert later.traffic["transmit_bytes"] == first.traffic["transmit_bytes"] + 4000
    assert later.errors["symbol_error"] == 20


def test_a_port_that_comes_up_shows_its_rate_in_the_same_cycle(small):
    clock = ManualClock()
    source = tiered(small, clock)
    down = by_port(source.sample())[("rocep24s0f0", "2")]
    assert down.up is False and down.speed_bytes_per_second is None
    clock.advance(1.0)
    source.sample()
    (port_dir(small, "rocep24s0f0", "2") / "state").write_text("4: ACTIVE\n")
    clock.advance(1.0)
    up = by_port(source.sample())[("rocep24s0f0", "2")]
    rate = (port_dir(small, "rocep24s0f0", "2") / "rate").read_text()
    assert up.up and up.speed_bytes_per_second == parse_rate(rate) > 0
    (port_dir(small, "rocep24s0f0", "2") / "state").write_text("1: DOWN\n")
    clock.advance(1.0)
    again = by_port(source.sample())[("rocep24s0f0", "2")]
    assert again.up is False and again.speed_bytes_per_second is None


def test_a_slow_tier_32_bit_counter_that_moves_fast_is_read_every_cycle_from_then_on(small):
    """Read every 5 s, a 32-bit counter that moves 2^28 between reads could not be unwrapped: one that
    moved more than 2^24 between two slow reads goes to the every-cycle tier, and its wraps count."""
    clock = ManualClock()
    source = RdmaSource(str(small), clock=clock, every_cycle=("np_cnp_sent",))  # out_of_sequence: slow tier
    path = port_dir(small, "rocep24s0f0") / "hw_counters" / "out_of_sequence"
    path.write_text("0\n")
    total = lambda: by_port(source.sample())[("rocep24s0f0", "1")].hw_counters["out_of_sequence"]
    assert total() == 0
    path.write_text(f"{(1 << 24) + 1}\n")
    clock.advance(1.0)
    assert total() == 0, "held until its slow read"
    clock.advance(4.0)
    assert total() == (1 << 24) + 1
    raw = (1 << 24) + 1
    for _ in range(20):  # 200 M a second: a wrap every 21 s, each seen one second apart
        raw = (raw + 200_000_000) % (1 << 32)
        path.write_text(f"{raw}\n")
        clock.advance(1.0)
        assert total() == (1 << 24) + 1 + 200_000_000 * (_ + 1)


def test_with_tiers_a_vanished_device_leaves_at_once_and_a_new_one_joins_within_the_slow_tier(small):
    clock = ManualClock()
    source = tiered(small, clock)
    assert len(source.sample().ports) == 2
    cls = small / "class" / "infiniband"
    target = os.readlink(cls / "rocep24s0f0")
    (cls / "rocep24s0f0").unlink()
    clock.advance(1.0)
    assert source.sample().ports == [], "gone in the cycle it is found gone, as when listed each cycle"
    os.symlink(target, cls / "rocep24s0f0")
    clock.advance(1.0)
    assert len(source.sample().ports) == 2, "listed again after a port was found gone"
    os.symlink(target, cls / "rocep99s0f0")  # hot plug (the same tree under a second name)
    seen = []
    for _ in range(5):
        clock.advance(1.0)
        seen.append(sorted({p.device for p in source.sample().ports}))
    assert seen[-1] == ["rocep24s0f0", "rocep99s0f0"]


# -- names that are not UTF-8 -----------------------------------------------------------------------

def plant_bad_name(root: Path, where: str) -> None:
    """A directory entry whose name is not UTF-8 (Linux names are bytes: anything but "/" and NUL)."""
    device = root / "class" / "infiniband" / "rocep24s0f0"
    if where == "device":  # a second device, its ports the first one's
        os.symlink(os.readlink(device), os.fsencode(device.parent) + b"/mlx5_\xff")
    elif where == "port":
        shutil.copytree(os.fsencode(port_dir(root, "rocep24s0f0")), os.fsencode(device / "ports") + b"/\xfe")
    elif where == "hw_counter":
        with open(os.fsencode(port_dir(root, "rocep24s0f0") / "hw_counters") + b"/rx_\xe9", "w") as fh:
            fh.write("5\n")
    else:  # a netdev of the PCI function, listed before the real one
        os.mkdir(os.fsencode(device / "device" / "net") + b"/0\xff")


@pytest.mark.parametrize("where", ["device", "port", "hw_counter", "netdev"])
def test_a_name_that_is_not_utf8_degrades_only_itself(small, where):
    """A label value must be UTF-8: one device, port, counter or netdev name that is not made the whole
    exposition fail to render, and every port's series froze at its last value. Now that name is left
    out, counted as a `bad_name` problem each cycle, and every other series is as without it."""
    clean = RdmaSource(str(small)).sample()
    plant_bad_name(small, where)
    source = RdmaSource(str(small))
    for _ in range(2):
        snap = source.sample()
        # the netdev listing is the PCI function's, read for each of its two ports
        assert snap.problems.count("bad_name") == (2 if where == "netdev" else 1), snap.problems
        assert by_port(snap).keys() == by_port(clean).keys()
        for key, port in by_port(clean).items():
            got = by_port(snap)[key]
            assert (got.interface, got.traffic, got.errors, got.hw_counters) == (
                port.interface, port.traffic, port.errors, port.hw_counters), key
        assert render(rdma_families.families(snap)) == render(rdma_families.families(clean))
