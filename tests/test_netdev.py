"""The netdev side at the pyroute2 boundary: `IoctlEthtool` with its kernel calls replaced."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

import pytest
from pyroute2.ethtool.ioctl import IoctlEthtool, generate_EthtoolGStats
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from stoker.agent.netdev import NetdevCollector, watched_interfaces
from stoker.exporters import netdev as netdev_families
from stoker.exporters import rdma as rdma_families
from stoker.exporters.exposition import render
from stoker.sources.netdev import EthtoolReader
from stoker.sources.rdma import RdmaSource

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"


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


# -- interface names that are not ASCII ---------------------------------------------------------------

def rename_netdev(root: Path, device: str, name: bytes) -> str:
    """Give the netdev behind `device`'s port 1 the name `name` (Linux names are bytes, anything but "/",
    ":", NUL and white space: net/core/dev.c, dev_valid_name), where sysfs shows it: the port's GID
    table (`gid_attrs/ndevs/0`, drivers/infiniband/core/sysfs.c) and the PCI function's `net/`."""
    function = root / "class" / "infiniband" / device / "device"
    (old,) = os.listdir(function / "net")
    os.rename(function / "net" / old, os.fsencode(function / "net") + b"/" + name)
    ndev = root / "class" / "infiniband" / device / "ports" / "1" / "gid_attrs" / "ndevs" / "0"
    ndev.write_bytes(name + b"\n")
    return old


async def test_a_netdev_name_that_is_not_ascii_is_followed_exactly_or_skipped_as_bad_name(tmp_path, kernel):
    """The netdev collector watches the interfaces the RDMA ports name. A port's netdev came from its
    GID table's `ndevs/0` file decoded as ASCII, each other byte a U+FFFD: `ens\\xff0` (not UTF-8) and
    `ensé0` (UTF-8) were exported in stoker_rdma_port_info as `ens\\ufffd0` and `ens\\ufffd\\ufffd0`,
    names no interface has, and the netdev collector failed on them every cycle (`vanished`), so
    `ensé0`'s pause and discard counters were never read. Now a name that is not ASCII is taken from
    the PCI function's `net/` listing, where os.listdir gives it exactly: `ensé0` is watched under its
    name; `ens\\xff0`, which no label can hold, is skipped as a `bad_name` (as a listing's bad names
    are: test_rdma.py) and every other interface is as before."""
    root = tmp_path / "sys"
    shutil.copytree(SYSFS / "xe9680", root, symlinks=True)
    rename_netdev(root, "mlx5_0", b"ens\xff0")
    rename_netdev(root, "mlx5_1", "ensé0".encode())
    rdma = RdmaSource(str(root)).sample()
    interfaces = {p.device: p.interface for p in rdma.ports}
    assert interfaces["mlx5_0"] == "" and interfaces["mlx5_1"] == "ensé0", interfaces
    assert rdma.problems == ["bad_name"]
    for name in filter(None, interfaces.values()):
        kernel.add(name, rx_prio3_pause=4, rx_bytes_phy=10, tx_bytes_phy=20)
    named = filter(None, interfaces.values())
    links = Links({**{name: "UP" for name in named}, b"ens\xff0": "UP"})  # a name not UTF-8, as pyroute2 gives it
    wanted = watched_interfaces(lambda: [p.interface for p in rdma.ports], (), ())
    collector = NetdevCollector(1.0, wanted, links, reader_for(kernel), timeout=1.0)
    assert await collector.cycle() == []
    text = render(collector.families()).decode()
    assert 'stoker_net_up{interface="ensé0"} 1.0' in text
    assert 'stoker_net_pause_frames_total{direction="rx",interface="ensé0",priority="3"} 4.0' in text
    assert text.count("stoker_net_up{") == 7 and "\ufffd" not in text
    assert "\ufffd" not in render(rdma_families.families(rdma)).decode()


def test_pyroute2_keeps_a_link_name_that_is_not_utf8_as_bytes():
    """Where netlink names enter: pyroute2 decodes IFLA_IFNAME as UTF-8 and keeps the bytes when that
    fails (pyroute2/netlink/__init__.py, nla_base `string.decode`), so a link dump never raises on such
    a name. `IPRouteLinks.operstates` keys its states by that name: a bytes key matches no watched
    name (every watched name can be a label), and costs the other links nothing."""
    names = {}
    for name in (b"ens\xff0", "ensé0"):
        msg = ifinfmsg()
        msg["index"] = 3
        msg["attrs"] = [("IFLA_IFNAME", name), ("IFLA_OPERSTATE", "UP")]
        msg.encode()
        dumped = ifinfmsg(msg.data)
        dumped.decode()
        names[name] = dumped.get("ifname")
    assert names == {b"ens\xff0": b"ens\xff0", "ensé0": "ensé0"}
