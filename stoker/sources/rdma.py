"""RDMA ports from `<sysfs>/class/infiniband/*/ports/*`: state, rate, counters, hw_counters.

Traps handled here (../shared/DESIGN.md):
- `port_xmit_data`/`port_rcv_data` count 4-byte words: exported as bytes.
- `hw_counters` queue counters are 32 bits wide and wrap; a drop that a wrap
  does not explain (driver reload resets hw_counters only) is a reset of that
  counter alone, or a glitch when the counter kept most of its value.
  `counters.Monotonic` keeps every exported counter monotonic.
- A step no link could carry is a glitch, not traffic: byte counters are bounded
  by twice the port's `rate` (`FASTEST_LINK_BYTES` when unknown), event
  counters by `EVENTS_PER_SECOND`, over the time since the counter's last read.
- Any single file may fail (EINVAL from a firmware query, EACCES, the legacy
  `N/A (no PMA)`, garbage, a number beyond u64, a FIFO that would block the
  read): that one series is dropped, the failure counted, and the file
  retried with backoff; the rest of the port and the other ports keep flowing.
- Devices and ports come and go between cycles; names need not be `mlx5_N`.
  The counter state of a port gone for `counters.FORGET_AFTER` is dropped.
- `rate` is trusted only while `state` is ACTIVE: a down port reports a stale default.
- `lifespan` in hw_counters is the counters' refresh period, not a counter.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from stoker.counters import CounterSet, Presence
from stoker.sources.files import Backoff, BadValue, FileReader, error_reason, parse_counter

WORD_BYTES = 4
TRAFFIC = {
    "port_xmit_data": "transmit_bytes",
    "port_rcv_data": "receive_bytes",
    "port_xmit_packets": "transmit_packets",
    "port_rcv_packets": "receive_packets",
}
ERROR_COUNTERS = (
    "symbol_error", "port_rcv_errors", "link_downed", "link_error_recovery", "port_xmit_discards",
    "port_rcv_remote_physical_errors", "port_rcv_switch_relay_errors", "local_link_integrity_errors",
    "excessive_buffer_overrun_errors", "VL15_dropped", "port_xmit_constraint_errors",
    "port_rcv_constraint_errors",
)
NOT_COUNTERS = {"lifespan"}
RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*Gb/sec")
# Bounds on how fast a counter can move. Twice the link rate: counters lag their
# traffic by a refresh period, and the rate can change within an interval.
LINK_HEADROOM = 2.0
FASTEST_LINK_BYTES = 800e9 / 8  # XDR, the fastest RDMA port shipping: the bound when `rate` is unknown
EVENTS_PER_SECOND = 2e9  # packets or error events: above minimum-size frames at 800 Gb/s (1.19e9/s)


@dataclass
class RdmaPort:
    device: str
    port: str
    interface: str = ""
    link_layer: str = ""
    fw_version: str = ""
    state: str = ""
    up: bool | None = None
    speed_bytes_per_second: float | None = None
    traffic: dict[str, float] = field(default_factory=dict)  # TRAFFIC values -> monotonic totals
    errors: dict[str, float] = field(default_factory=dict)
    hw_counters: dict[str, float] = field(default_factory=dict)


@dataclass
class RdmaSnapshot:
    ports: list[RdmaPort]
    problems: list[str] = field(default_factory=list)


def parse_state(text: str) -> str:
    """`4: ACTIVE` -> `ACTIVE`."""
    return text.strip().split(":", 1)[-1].strip().upper()


def parse_rate(text: str) -> float | None:
    """`400 Gb/sec (4X NDR)` -> bytes per second; None unless a positive rate (a port of
    unknown width reads `0 Gb/sec`, and a zero bound would count no traffic at all)."""
    m = RATE.match(text)
    rate = float(m.group(1)) * 1e9 / 8 if m else 0.0
    return rate if 0.0 < rate < math.inf else None


class RdmaSource:
    def __init__(self, sysfs_root: str, reader: FileReader | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.base = os.path.join(sysfs_root, "class", "infiniband")
        self.reader = reader or FileReader()
        self.backoff = Backoff()
        self._clock = clock
        self._counters = CounterSet()  # counters/: 64-bit on extended-PMA ports
        self._hw = CounterSet(width=32)  # hw_counters/: 32-bit queue counters that wrap
        self._present = Presence()

    def sample(self) -> RdmaSnapshot:
        problems: list[str] = []
        ports: list[RdmaPort] = []
        try:
            devices = self.reader.listdir(self.base)
        except FileNotFoundError:
            devices = []  # no RDMA devices (or no driver): nothing to report, not a failure
        now = self._clock()
        for device in devices:
            ports.extend(self._device(device, now, problems))
        for p in ports:
            self._present.seen((p.device, p.port), now)
        self._forget(self._present.gone(now))
        return RdmaSnapshot(ports, problems)

    def _forget(self, gone: set) -> None:
        """Ports gone past the grace period: their counter and backoff state goes too."""
        self._counters.forget(gone)
        self._hw.forget(gone)
        for device, port in gone:
            self.backoff.forget(os.path.join(self.base, device, "ports", port) + os.sep)

    def _device(self, device: str, now: float, problems: list[str]) -> list[RdmaPort]:
        root = os.path.join(self.base, device)
        try:
            port_names = self.reader.listdir(os.path.join(root, "ports"))
        except OSError:
            return []  # vanished between listing and reading: it is simply gone this cycle
        fw = self._text(os.path.join(root, "fw_ver"))
        out = []
        for port in port_names:
            p = RdmaPort(device, port, fw_version=fw)
            self._port(p, os.path.join(root, "ports", port), root, now, problems)
            out.append(p)
        return out

    def _port(self, p: RdmaPort, path: str, device_root: str, now: float, problems: list[str]) -> None:
        p.link_layer = self._text(os.path.join(path, "link_layer"))
        p.interface = self._netdev(path, device_root)
        state = self._text(os.path.join(path, "state"))
        p.state = parse_state(state) if state else ""
        p.up = (p.state == "ACTIVE") if p.state else None
        if p.up:
            rate = self._text(os.path.join(path, "rate"))
            p.speed_bytes_per_second = parse_rate(rate)
            if rate and p.speed_bytes_per_second is None:
                problems.append("garbage")
        owner = (p.device, p.port)
        link_bytes = LINK_HEADROOM * (p.speed_bytes_per_second or FASTEST_LINK_BYTES)

        counters = os.path.join(path, "counters")
        for name, what in TRAFFIC.items():
            raw = self._counter(os.path.join(counters, name), now, problems)
            if raw is not None:
                if name.endswith("_data"):
                    raw, bound = raw * WORD_BYTES, link_bytes
                else:
                    bound = EVENTS_PER_SECOND
                p.traffic[what] = self._counters.update((owner, name), raw, now, bound)
        for name in ERROR_COUNTERS:
            raw = self._counter(os.path.join(counters, name), now, problems)
            if raw is not None:
                p.errors[name] = self._counters.update((owner, name), raw, now, EVENTS_PER_SECOND)

        hw = os.path.join(path, "hw_counters")
        try:
            names = self.reader.listdir(hw)
        except OSError:
            names = []
        for name in names:
            if name in NOT_COUNTERS:
                continue
            raw = self._counter(os.path.join(hw, name), now, problems)
            if raw is not None:
                p.hw_counters[name] = self._hw.update((owner, name), raw, now, EVENTS_PER_SECOND)

    def _counter(self, path: str, now: float, problems: list[str]) -> int | None:
        if not self.backoff.ready(path, now):
            return None
        try:
            value = parse_counter(self.reader.read(path))
        except FileNotFoundError:
            return None  # this port simply has no such counter
        except (OSError, BadValue) as exc:
            self.backoff.failed(path, now)
            problems.append(error_reason(exc))
            return None
        self.backoff.succeeded(path)
        return value

    def _text(self, path: str) -> str:
        try:
            return self.reader.read(path).strip()
        except OSError:
            return ""

    def _netdev(self, port_path: str, device_root: str) -> str:
        """The Ethernet interface behind the port: its GID table's netdev, else the PCI function's."""
        name = self._text(os.path.join(port_path, "gid_attrs", "ndevs", "0"))
        if name:
            return name
        try:
            nets = self.reader.listdir(os.path.join(device_root, "device", "net"))
        except OSError:
            return ""
        return nets[0] if nets else ""
