"""The simulated node's ConnectX-7 NICs: a sysfs tree on disk and fakes at the pyroute2 boundary.

The RDMA collector reads the tree this module writes with the same code it
uses on `/sys`; the netdev collector talks to `FakeEthtool` (the
`IoctlEthtool` interface) and `SimLinks` (what it asks `AsyncIPRoute`).
Counters move with the simulated GPU traffic (rail i carries GPU i's
collectives) and with the scenario's network condition.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field

from stoker.sim.kernfs import KernelFiles
from stoker.sim.node import SimNode, Ticker

LINK_GBPS = 400
LINK_BYTES_PER_S = LINK_GBPS * 1e9 / 8
ROCE_PACKET = 4096
PFC_PRIORITY = 3
DOWN_PORT = 3  # the port that `port-down` takes down
WRAP_32 = 1 << 32
PCI_BUSES = [0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB]
FW = "28.39.1002"

HW_COUNTERS = (
    "duplicate_request", "implied_nak_seq_err", "lifespan", "local_ack_timeout_err",
    "np_cnp_sent", "np_ecn_marked_roce_packets", "out_of_buffer", "out_of_sequence",
    "packet_seq_err", "req_cqe_error", "req_remote_access_errors", "req_remote_invalid_request",
    "req_transport_retries_exceeded", "resp_cqe_error", "resp_local_length_error",
    "resp_remote_access_errors", "rnr_nak_retry_err", "roce_adp_retrans", "roce_adp_retrans_to",
    "roce_slow_restart", "roce_slow_restart_cnps", "roce_slow_restart_trans", "rp_cnp_handled",
    "rp_cnp_ignored", "rx_atomic_requests", "rx_read_requests", "rx_write_requests",
)
PORT_COUNTERS = (
    "excessive_buffer_overrun_errors", "link_downed", "link_error_recovery", "local_link_integrity_errors",
    "multicast_rcv_packets", "multicast_xmit_packets", "port_rcv_constraint_errors", "port_rcv_data",
    "port_rcv_errors", "port_rcv_packets", "port_rcv_remote_physical_errors", "port_rcv_switch_relay_errors",
    "port_xmit_constraint_errors", "port_xmit_data", "port_xmit_discards", "port_xmit_packets",
    "port_xmit_wait", "symbol_error", "unicast_rcv_packets", "unicast_xmit_packets", "VL15_dropped",
)

# Per second, by network condition: (hw counter or ethtool stat, rate at full traffic)
CONDITION_RATES = {
    "normal": {"np_ecn_marked_roce_packets": 3, "np_cnp_sent": 3, "rp_cnp_handled": 2},
    "congested": {"np_ecn_marked_roce_packets": 6000, "np_cnp_sent": 6000, "rp_cnp_handled": 5000,
                  "rp_cnp_ignored": 40, "rx_pfc_frames": 3000, "rx_pfc_us": 300_000,
                  "tx_pfc_frames": 800, "tx_pfc_us": 60_000, "roce_slow_restart": 2},
    "lossy": {"out_of_sequence": 400, "packet_seq_err": 120, "local_ack_timeout_err": 8,
              "roce_adp_retrans": 300, "roce_adp_retrans_to": 6, "duplicate_request": 30,
              "implied_nak_seq_err": 40},
}
TRAFFIC_SHARE = {"normal": 0.55, "congested": 0.3, "lossy": 0.35}


@dataclass
class SimPort:
    index: int
    device: str
    netdev: str
    pci: str
    up: bool = True
    port: dict[str, float] = field(default_factory=dict)
    hw: dict[str, float] = field(default_factory=dict)
    eth: dict[str, float] = field(default_factory=dict)


def _eth_names(priorities: tuple[int, ...]) -> list[str]:
    names = ["rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_bytes_phy", "tx_bytes_phy",
             "rx_packets_phy", "tx_packets_phy", "rx_discards_phy", "tx_discards_phy", "rx_out_of_buffer",
             "outbound_pci_buffer_overflow", "rx_buffer_passed_thres_phy", "rx_pause_ctrl_phy",
             "tx_pause_ctrl_phy", "tx_pause_storm_warning_events", "tx_pause_storm_error_events"]
    for p in priorities:
        names += [f"rx_prio{p}_bytes", f"rx_prio{p}_packets", f"tx_prio{p}_bytes", f"tx_prio{p}_packets",
                  f"rx_prio{p}_pause", f"rx_prio{p}_pause_duration", f"tx_prio{p}_pause",
                  f"tx_prio{p}_pause_duration", f"rx_prio{p}_pause_transition"]
    return names


class SimNetwork:
    def __init__(self, node: SimNode, sysfs_root: str, ports: int = 8):
        self.node = node
        self.root = sysfs_root
        self.ports = [self._port(i, ports) for i in range(ports)]
        self._lock = threading.Lock()
        self._ticker = Ticker(node)
        self._files = KernelFiles()
        self._paths: dict[int, tuple[dict[str, str], dict[str, str], dict[str, str]]] = {}
        self._written: dict[int, tuple[dict[str, int], dict[str, int]]] = {}  # port -> the numbers its files hold

    def _port(self, i: int, total: int) -> SimPort:
        bus = PCI_BUSES[i * (8 // total)] if total <= len(PCI_BUSES) else 0x10 + i  # >8: benchmarks only
        p = SimPort(i, f"mlx5_{i}", f"ens{bus:x}f0np0", f"0000:{bus:02x}:00.0")
        p.port = {name: 0.0 for name in PORT_COUNTERS}
        p.port.update(port_xmit_data=3.1e11 + i * 7e9, port_rcv_data=3.0e11 + i * 7e9,
                      port_xmit_packets=3.1e11 / 1024 + i, port_rcv_packets=3.0e11 / 1024 + i,
                      # a little history, as on ports that have run for weeks
                      symbol_error=3 * i, port_rcv_errors=i % 3, link_error_recovery=i // 4,
                      port_xmit_discards=11 * i, port_xmit_wait=1000 * i)
        p.hw = {name: 0.0 for name in HW_COUNTERS}
        p.hw.update(lifespan=12, np_cnp_sent=1200.0 + i, rp_cnp_handled=900.0 + i,
                    np_ecn_marked_roce_packets=1500.0 + i)
        if i == 2:  # close below 2^32: the demo shows a 32-bit wrap within a minute of congestion
            p.hw["np_ecn_marked_roce_packets"] = WRAP_32 - 5_000
        p.eth = {name: 0.0 for name in _eth_names((PFC_PRIORITY,))}
        p.eth.update(rx_bytes_phy=1.25e12 + i * 3e10, tx_bytes_phy=1.26e12 + i * 3e10)
        return p

    # -- the sysfs tree ----------------------------------------------------------

    def _device_dir(self, p: SimPort) -> str:
        return os.path.join(self.root, "devices", "pci0000:00", p.pci)

    def build(self) -> None:
        """Lay out devices/ and the class/infiniband symlinks as the kernel does."""
        cls = os.path.join(self.root, "class", "infiniband")
        os.makedirs(cls, exist_ok=True)
        for p in self.ports:
            dev = self._device_dir(p)
            ib = os.path.join(dev, "infiniband", p.device)
            port = os.path.join(ib, "ports", "1")
            for sub in ("counters", "hw_counters", "gid_attrs/ndevs"):
                os.makedirs(os.path.join(port, sub), exist_ok=True)
            os.makedirs(os.path.join(dev, "net", p.netdev), exist_ok=True)
            _write(os.path.join(dev, "net", p.netdev, "operstate"), "up")
            _write(os.path.join(ib, "fw_ver"), FW)
            _write(os.path.join(ib, "hca_type"), "MT4129")
            _write(os.path.join(ib, "board_id"), "MT_0000000838")
            _write(os.path.join(ib, "node_type"), "1: CA")
            _write(os.path.join(port, "link_layer"), "Ethernet")
            _write(os.path.join(port, "gid_attrs", "ndevs", "0"), p.netdev)
            _symlink(os.path.relpath(dev, ib), os.path.join(ib, "device"))
            _symlink(os.path.relpath(ib, cls), os.path.join(cls, p.device))
        self.advance()

    def _port_paths(self, p: SimPort) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        paths = self._paths.get(p.index)
        if paths is None:
            port = os.path.join(self._device_dir(p), "infiniband", p.device, "ports", "1")
            paths = self._paths[p.index] = (
                {name: os.path.join(port, name) for name in ("state", "phys_state", "rate")},
                {name: os.path.join(port, "counters", name) for name in p.port},
                {name: os.path.join(port, "hw_counters", name) for name in p.hw})
        return paths

    def _write_port(self, p: SimPort) -> None:
        """Write the port's files whose number changed (most counters sit still), in place."""
        top, counters, hw = self._port_paths(p)
        put = self._files.put
        if p.up:
            put(top["state"], "4: ACTIVE\n")
            put(top["phys_state"], "5: LinkUp\n")
            put(top["rate"], f"{LINK_GBPS} Gb/sec (4X NDR)\n")
        else:
            put(top["state"], "1: DOWN\n")
            put(top["phys_state"], "3: Disabled\n")
            put(top["rate"], "40 Gb/sec (4X QDR)\n")  # the stale default of a down port
        written, written_hw = self._written.setdefault(p.index, ({}, {}))
        for name, value in p.port.items():
            raw = int(value) // 4 if name.endswith("_data") else int(value)
            if written.get(name) != raw:
                put(counters[name], f"{raw}\n")
                written[name] = raw
        for name, value in p.hw.items():
            raw = int(value) % WRAP_32
            if written_hw.get(name) != raw:
                put(hw[name], f"{raw}\n")
                written_hw[name] = raw

    # -- the simulation ------------------------------------------------------------

    def advance(self) -> None:
        """Move every counter to now and write the files that changed."""
        with self._lock:
            t, dt = self._ticker.tick()
            condition = self.node.step().network
            down = condition == "port-down"
            rates = CONDITION_RATES.get(condition, CONDITION_RATES["normal"])
            share = TRAFFIC_SHARE.get(condition, TRAFFIC_SHARE["normal"])
            gpus_per_port = max(1, self.node.gpu_count // len(self.ports))
            for p in self.ports:
                was_up = p.up
                p.up = not (down and p.index == DOWN_PORT % len(self.ports))
                if was_up and not p.up:
                    p.port["link_downed"] += 1
                if not p.up:
                    continue
                tensor = sum(self.node.gpu_row(g, t)["gpm_any_tensor_util"]
                             for g in range(p.index * gpus_per_port, (p.index + 1) * gpus_per_port)) / gpus_per_port
                load = tensor / 100.0 if self.node.fabric(t) else 0.0
                moved = LINK_BYTES_PER_S * share * load * dt
                for direction, key in (("xmit", "tx"), ("rcv", "rx")):
                    p.port[f"port_{direction}_data"] += moved
                    p.port[f"port_{direction}_packets"] += moved / ROCE_PACKET
                    p.port[f"unicast_{direction}_packets"] += moved / ROCE_PACKET
                    p.eth[f"{key}_bytes_phy"] += moved * 1.02
                    p.eth[f"{key}_packets_phy"] += moved / ROCE_PACKET
                    p.eth[f"{key}_prio{PFC_PRIORITY}_bytes"] += moved
                for name, per_s in rates.items():
                    amount = per_s * max(load, 0.2) * dt
                    if name in p.hw:
                        p.hw[name] += amount
                    elif name.endswith("_frames"):
                        p.eth[f"{name[:2]}_prio{PFC_PRIORITY}_pause"] += amount
                    elif name.endswith("_us"):
                        p.eth[f"{name[:2]}_prio{PFC_PRIORITY}_pause_duration"] += amount
            for p in self.ports:
                self._write_port(p)

    # -- the pyroute2 boundary -----------------------------------------------------------

    def port_by_netdev(self, ifname: str) -> SimPort | None:
        return next((p for p in self.ports if p.netdev == ifname), None)

    def operstates(self) -> dict[str, str]:
        return {p.netdev: "UP" if p.up else "DOWN" for p in self.ports}


class FakeEthtool:
    """`pyroute2.ethtool.ioctl.IoctlEthtool` over a simulated port: same attributes, same failures."""

    def __init__(self, network: SimNetwork, ifname: str):
        self.network = network
        self.ifname = ifname
        self.stat_names: list[str] | None = None
        if network.port_by_netdev(ifname) is None:
            raise OSError(errno.ENODEV, "No such device")

    def get_statistics(self) -> list[tuple[str, int]]:
        port = self.network.port_by_netdev(self.ifname)
        if port is None:
            raise OSError(errno.ENODEV, "No such device")
        if not self.stat_names:
            self.stat_names = list(port.eth)
        values = [int(v) for v in port.eth.values()]
        return list(zip(self.stat_names, values))  # stale names misalign, as with the real ioctl

    def close(self) -> None:
        pass


class SimLinks:
    """The link states the netdev collector would get from `AsyncIPRoute.get_links()`."""

    def __init__(self, network: SimNetwork):
        self.network = network

    async def operstates(self) -> dict[str, str]:
        return self.network.operstates()

    async def close(self) -> None:
        pass


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text + "\n")


def _symlink(target: str, link: str) -> None:
    if not os.path.islink(link):
        os.symlink(target, link)
