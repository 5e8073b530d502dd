"""The netdev side at the pyroute2 boundary: `IoctlEthtool` with its kernel calls replaced."""

from __future__ import annotations

import ctypes
import errno

import pytest
from pyroute2.ethtool.ioctl import IoctlEthtool, generate_EthtoolGStats

from stoker.agent.netdev import NetdevCollector, watched_interfaces
from stoker.exporters import netdev as netdev_families
from stoker.exporters.exposition import render
from stoker.sources.netdev import EthtoolReader


class Kernel:
    """What the driver would answer: a name list that can change, values, presence."""

    def __init__(self):
        self.stats: dict[str, dict[str, int]] = {}

    def add(self, ifname: str, **values: int) -> None:
        self.stats[ifname] = dict(values)


class KernelEthtool(IoctlEthtool):
    """The real `IoctlEthtool` (its caching of `stat_names` included) with the two
    ioctls answered from `Kernel` instead of a NIC."""

    kernel: Kernel

    def get_stringset(self, set_id=0, drvinfo_offset=0, null_terminate=1):
        stats = self.kernel.stats.get(self.ifname.rstrip(b"\0").decode())
        if stats is None:
            raise OSError(errno.ENODEV, "No such device")
        return list(stats)

    def ioctl(self):
        stats = self.kernel.stats.get(self.ifname.rstrip(b"\0").decode())
        if stats is None:
            raise OSError(errno.ENODEV, "No such device")
        size = len(self.stat_names)
        buf = ctypes.cast(self.ifreq.gstats, ctypes.POINTER(generate_EthtoolGStats(size))).contents
        for i, value in enumerate(list(stats.values())[:size]):  # the kernel writes its current list
            buf.data[i] = value


@pytest.fixture
def kernel():
    k = Kernel()
    k.add("ens18f0np0", rx_prio3_pause=10, tx_prio3_pause=2, rx_prio3_pause_duration=5_000_000,
          tx_prio3_pause_duration=1_000, rx_discards_phy=7, rx_bytes_phy=1000, tx_bytes_phy=2000,
          tx_pause_storm_warning_events=0, tx_pause_storm_error_events=0)
    k.add("ens2af0np0", rx_prio3_pause=1, rx_bytes_phy=5, tx_bytes_phy=6)
    return k


def reader_for(kernel: Kernel) -> EthtoolReader:
    def opener(ifname: str) -> KernelEthtool:
        handle = KernelEthtool(ifname)
        handle.kernel = kernel
        return handle
    return EthtoolReader(opener)


def test_pause_frames_seconds_discards_and_bytes(kernel):
    stats, problems = reader_for(kernel).read(["ens18f0np0"])
    i = stats["ens18f0np0"]
    assert problems == []
    assert i.pause_frames == {("3", "rx"): 10, ("3", "tx"): 2}
    assert i.pause_seconds == {("3", "rx"): 5.0, ("3", "tx"): 0.001}  # microseconds -> seconds
    assert i.discards == {"rx_discards_phy": 7}
    assert i.physical_bytes == {"rx": 1000, "tx": 2000}
    assert i.storms == {"warning": 0, "error": 0}


def test_counter_list_that_grows_between_reads(kernel):
    reader = reader_for(kernel)
    reader.read(["ens18f0np0"])
    # PFC enabled on priority 4: the driver inserts its counters in the middle of the list
    old = kernel.stats["ens18f0np0"]
    grown = {}
    for name, value in old.items():
        grown[name] = value
        if name == "tx_prio3_pause_duration":
            grown.update(rx_prio4_pause=40, tx_prio4_pause=4)
    grown["rx_discards_phy"] = 8
    kernel.stats["ens18f0np0"] = grown
    stats, problems = reader.read(["ens18f0np0"])
    i = stats["ens18f0np0"]
    assert problems == []
    assert i.pause_frames[("4", "rx")] == 40 and i.pause_frames[("4", "tx")] == 4
    assert i.discards == {"rx_discards_phy": 8}, "values stay paired with their own names"
    assert i.physical_bytes == {"rx": 1000, "tx": 2000}


def test_trailing_space_in_a_counter_name(kernel):
    kernel.add("ens3af0np0", **{"rx_prio3_pause ": 12, "rx_discards_phy  ": 3})
    stats, _ = reader_for(kernel).read(["ens3af0np0"])
    assert stats["ens3af0np0"].pause_frames == {("3", "rx"): 12}
    assert stats["ens3af0np0"].discards == {"rx_discards_phy": 3}


def test_vanished_interface_drops_alone_and_comes_back(kernel):
    reader = reader_for(kernel)
    reader.read(["ens18f0np0", "ens2af0np0"])
    saved = kernel.stats.pop("ens18f0np0")
    stats, problems = reader.read(["ens18f0np0", "ens2af0np0"])
    assert list(stats) == ["ens2af0np0"] and problems == ["vanished"]
    kernel.stats["ens18f0np0"] = {**saved, "rx_prio3_pause": 15}
    stats, problems = reader.read(["ens18f0np0", "ens2af0np0"])
    assert problems == [] and stats["ens18f0np0"].pause_frames[("3", "rx")] == 15


def test_counter_reset_by_driver_reload_stays_monotonic(kernel):
    reader = reader_for(kernel)
    reader.read(["ens18f0np0"])
    kernel.stats["ens18f0np0"]["rx_prio3_pause"] = 3
    stats, _ = reader.read(["ens18f0np0"])
    assert stats["ens18f0np0"].pause_frames[("3", "rx")] == 13


class Links:
    def __init__(self, states):
        self.states = states

    async def operstates(self):
        if isinstance(self.states, Exception):
            raise self.states
        return self.states

    async def close(self):
        pass


async def test_collector_follows_rdma_netdevs_with_include_and_exclude(kernel):
    kernel.add("bond0", rx_bytes_phy=1, tx_bytes_phy=1)
    wanted = watched_interfaces(lambda: ["ens18f0np0", "ens2af0np0", ""], include=("bond0",),
                                exclude=("ens2af0np0",))
    links = Links({"ens18f0np0": "UP", "bond0": "DOWN", "lo": "UNKNOWN"})
    collector = NetdevCollector(1.0, wanted, links, reader_for(kernel), timeout=1.0)
    assert await collector.cycle() == []
    text = render(collector.families()).decode()
    assert 'stoker_net_up{interface="ens18f0np0"} 1.0' in text
    assert 'stoker_net_up{interface="bond0"} 0.0' in text
    assert "ens2af0np0" not in text
    assert 'stoker_net_pause_seconds_total{direction="rx",interface="ens18f0np0",priority="3"} 5.0' in text


async def test_netlink_failure_costs_link_state_not_counters(kernel):
    collector = NetdevCollector(1.0, lambda: ["ens18f0np0"], Links(OSError(errno.EBADF, "bad fd")),
                                reader_for(kernel), timeout=1.0)
    assert await collector.cycle() == ["netlink_ebadf"]
    text = render(netdev_families.families(collector.snapshot)).decode()
    assert "stoker_net_up{" not in text and "stoker_net_physical_bytes_total{" in text
