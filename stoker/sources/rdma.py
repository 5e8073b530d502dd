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
- A name is bytes (only "/" and NUL are out): a device, port, hw_counters or
  netdev directory whose name is not UTF-8 (os.listdir gives it surrogate
  escapes) can be no label value, and one such label failed the rendering of
  the whole exposition. It is skipped, a `bad_name` problem each cycle, and the
  rest is reported as if it were not there. So is the netdev that a port's
  `gid_attrs/ndevs/0` names with such bytes (`_netdev`).
- `rate` is trusted only while `state` is ACTIVE: a down port reports a stale default.
- `lifespan` in hw_counters is the counters' refresh period, not a counter.

Cost (docs/PERFORMANCE.md): about 45 files per port. Each is kept open and
re-read with one pread (`files.KeptFiles`), its path and counter key are built
once per port, and a counter whose text is what it was last cycle is not parsed
again (its counter still sees the reading, so bounds and resets behave as
before). With tiers (`every_cycle`, as the agent runs it), only what the
verdicts judge is read each cycle: `state` and the hw_counters they read. The
rest is only exported, and Prometheus scrapes it every 15 s: `counters/`, the
other hw_counters, the port's identity (link_layer, netdev, rate, fw_ver) and
the listing of devices and ports are read every `SLOW_EVERY` seconds, and on
the cycle a port's state changes (its rate then); a port whose directory is
gone leaves the snapshot in the cycle it is found gone, as when it was listed
each cycle, and a new one joins within `SLOW_EVERY`. Between those reads a
port carries the totals of the last, so every series stays and stays
monotonic. A 32-bit counter read on the slow tier must not move 2^28 between
two reads, or its wrap could not be told from a reset (counters.Monotonic):
one that moves more than `PROMOTE_STEP` between two slow reads is read every
cycle from then on.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Collection

from stoker.counters import CounterSet, Presence
from stoker.sources.files import Backoff, BadValue, FileReader, KeptFiles, error_reason, parse_counter

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
SLOW_EVERY = 5.0
"""Seconds between reads of what only the exposition shows, with tiers: a third of a 15 s scrape."""
SLACK = 0.1
"""A slow read due within this many seconds is done now: cycles come a few milliseconds early or late."""
PROMOTE_STEP = 1 << 24
"""A slow-tier hw_counter that moved this much between two reads (1/16 of the 2^28 a read may see and still
unwrap) is read every cycle from then on."""


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


TRAFFIC_TARGET, ERRORS_TARGET, HW_TARGET = 0, 1, 2  # which of a port's dicts a counter goes to


class _File:
    """One counter file of a port: where it is, where its total goes, its last text and value, and
    its total after its last read (None when that read failed or found no such file)."""

    __slots__ = ("path", "key", "target", "label", "scale", "bound", "text", "value", "total", "every_cycle")

    def __init__(self, directory: str, name: str, owner: tuple[str, str], target: int, label: str,
                 scale: int = 1, bound: float | None = EVENTS_PER_SECOND, every_cycle: bool = False):
        self.path = os.path.join(directory, name)
        self.key = (owner, name)
        self.target, self.label = target, label
        self.scale, self.bound = scale, bound  # bound None: the link's rate
        self.text: str | None = None  # the last text that parsed, and its value
        self.value = 0
        self.total: float | None = None
        self.every_cycle = every_cycle


class _PortFiles:
    """The paths of one port's files, built once, and what its slow tier read last."""

    def __init__(self, path: str, owner: tuple[str, str]):
        self.owner, self.path = owner, path
        self.link_layer = os.path.join(path, "link_layer")
        self.state = os.path.join(path, "state")
        self.rate = os.path.join(path, "rate")
        self.ndev = os.path.join(path, "gid_attrs", "ndevs", "0")
        counters = os.path.join(path, "counters")
        self.counters = [
            _File(counters, name, owner, TRAFFIC_TARGET, what, *((WORD_BYTES, None) if name.endswith("_data") else ()))
            for name, what in TRAFFIC.items()
        ] + [_File(counters, name, owner, ERRORS_TARGET, name) for name in ERROR_COUNTERS]
        self.hw_dir = os.path.join(path, "hw_counters")
        self._hw: dict[str, _File] = {}
        self._hw_names: list[str] | None = None
        self._hw_files: tuple[list[_File], list[_File]] = ([], [])
        self.bad_hw_names = 0  # names of that listing skipped: not UTF-8
        self.read_at: float | None = None  # when the slow tier was last read
        self.state_text: str | None = None  # `state` as last read: a change reads the identity at once
        self.link_layer_text = self.interface = ""
        self.speed: float | None = None  # the rate read with the identity, while the port was up

    def hw(self, names: list[str], every_cycle: frozenset[str] | None) -> tuple[list[_File], list[_File]]:
        """The hw_counters files of this listing read every cycle (`every_cycle`, None: all), and those
        read on the slow tier; kept while the listing is the same and nothing was promoted."""
        if names is not self._hw_names:
            fast, slow = [], []
            self.bad_hw_names = 0
            for name in names:
                if name in NOT_COUNTERS:
                    continue
                if not _label_safe(name):
                    self.bad_hw_names += 1
                    continue
                f = self._hw.get(name)
                if f is None:
                    f = self._hw[name] = _File(self.hw_dir, name, self.owner, HW_TARGET, name,
                                               every_cycle=every_cycle is None or name in every_cycle)
                (fast if f.every_cycle else slow).append(f)
            self._hw_files, self._hw_names = (fast, slow), names
        return self._hw_files


class RdmaSource:
    def __init__(self, sysfs_root: str, reader: FileReader | None = None,
                 clock: Callable[[], float] = time.monotonic, every_cycle: Collection[str] | None = None,
                 slow_every: float = SLOW_EVERY):
        """`every_cycle`: the hw_counters read each cycle (those the verdicts judge), with `state`; the
        rest on the slow tier (module doc). None: every file every cycle."""
        self.base = os.path.join(sysfs_root, "class", "infiniband")
        self.reader = reader or KeptFiles()
        self.backoff = Backoff()
        self._clock = clock
        self._counters = CounterSet()  # counters/: 64-bit on extended-PMA ports
        self._hw = CounterSet(width=32)  # hw_counters/: 32-bit queue counters that wrap
        self._present = Presence()
        self._files: dict[tuple[str, str], _PortFiles] = {}
        self._fw: dict[str, str] = {}  # device -> fw_ver as last read
        self._listing: list[tuple[str, str, list[str]]] | None = None  # (device, its directory, its ports)
        self._bad_names = 0  # names of that listing skipped: not UTF-8
        self.slow_every = slow_every
        self._every_cycle = None if every_cycle is None else frozenset(every_cycle)
        self._slow_due = -math.inf

    def sample(self) -> RdmaSnapshot:
        problems: list[str] = []
        ports: list[RdmaPort] = []
        now = self._clock()
        slow = self._every_cycle is None or now >= self._slow_due
        self.reader.refresh(everything=slow)
        if slow:
            self._slow_due = now + self.slow_every - SLACK
        if slow or self._listing is None:
            self._listing = self._list()
            listed = {device for device, _, _ in self._listing}
            self._fw = {d: v for d, v in self._fw.items() if d in listed}
        problems += ["bad_name"] * self._bad_names
        for device, root, port_names in self._listing:
            ports.extend(self._device(device, root, port_names, now, slow, problems))
        for p in ports:
            self._present.seen((p.device, p.port), now)
        self._forget(self._present.gone(now))
        return RdmaSnapshot(ports, problems)

    def close(self) -> None:
        """Close the files kept open."""
        self.reader.close()

    def _forget(self, gone: set) -> None:
        """Ports gone past the grace period: their counter and backoff state goes too."""
        self._counters.forget(gone)
        self._hw.forget(gone)
        for device, port in gone:
            self.backoff.forget(os.path.join(self.base, device, "ports", port) + os.sep)
            self._files.pop((device, port), None)

    def _list(self) -> list[tuple[str, str, list[str]]]:
        """The devices and their ports."""
        self._bad_names = 0
        try:
            devices = self._named(self.reader.listdir(self.base))
        except FileNotFoundError:
            return []  # no RDMA devices (or no driver): nothing to report, not a failure
        out = []
        for device in devices:
            root = os.path.join(self.base, device)
            try:
                out.append((device, root, self._named(self.reader.listdir(os.path.join(root, "ports")))))
            except OSError:
                continue  # vanished between listing and reading: it is simply gone this cycle
        return out

    def _named(self, names: list[str]) -> list[str]:
        """The names of a listing that can be label values; the others counted in `_bad_names`."""
        good = [n for n in names if _label_safe(n)]
        self._bad_names += len(names) - len(good)
        return good

    def _device(self, device: str, root: str, port_names: list[str], now: float, slow: bool,
                problems: list[str]) -> list[RdmaPort]:
        if slow or device not in self._fw:
            self._fw[device] = self._text(os.path.join(root, "fw_ver"))
        out = []
        for port in port_names:
            p = RdmaPort(device, port, fw_version=self._fw[device])
            if self._port(p, root, now, slow, problems):
                out.append(p)
        return out

    def _port(self, p: RdmaPort, device_root: str, now: float, slow: bool, problems: list[str]) -> bool:
        """Fill `p`; False when its directory is gone since the listing (then listed again next cycle)."""
        owner = (p.device, p.port)
        files = self._files.get(owner)
        if files is None:
            files = self._files[owner] = _PortFiles(os.path.join(device_root, "ports", p.port), owner)
        try:
            state = self.reader.read(files.state).strip()
        except FileNotFoundError:
            if not os.path.isdir(files.path):
                self._listing = None
                return False
            state = ""
        except OSError:
            state = ""
        p.state = parse_state(state) if state else ""
        p.up = (p.state == "ACTIVE") if p.state else None
        slow = slow or files.read_at is None
        if slow or state != files.state_text:
            self._identity(files, p.up, device_root, problems)
        files.state_text = state
        p.link_layer, p.interface = files.link_layer_text, files.interface
        if p.up:
            p.speed_bytes_per_second = files.speed
        link_bytes = LINK_HEADROOM * (p.speed_bytes_per_second or FASTEST_LINK_BYTES)
        try:
            names = self.reader.listdir(files.hw_dir)
        except OSError:
            names = []
        fast_hw, slow_hw = files.hw(names, self._every_cycle)
        if files.bad_hw_names:
            problems += ["bad_name"] * files.bad_hw_names
        if slow:
            files.read_at = now
            self._read(files.counters, self._counters, now, link_bytes, problems)
        self._read(fast_hw, self._hw, now, link_bytes, problems)
        if slow and self._read(slow_hw, self._hw, now, link_bytes, problems, promote=True):
            files._hw_names = None  # a promoted counter moves to the every-cycle list
        targets = (p.traffic, p.errors, p.hw_counters)
        for group in (files.counters, fast_hw, slow_hw):
            for f in group:
                if f.total is not None:
                    targets[f.target][f.label] = f.total
        return True

    def _read(self, files: list[_File], counters: CounterSet, now: float, link_bytes: float, problems: list[str],
              promote: bool = False) -> bool:
        """Read these counter files into their totals; True when one of them moved past `PROMOTE_STEP`
        since its last read (with `promote`: it is read every cycle from now on)."""
        read, backoff = self.reader.read, self.backoff
        waiting = backoff._state  # the files in backoff; when none is, nothing to ask it
        promoted = False
        for f in files:
            if waiting and not backoff.ready(f.path, now):
                f.total = None
                continue
            try:
                text = read(f.path)
                if text == f.text:
                    raw = f.value  # as last cycle: parsed then
                else:
                    raw = parse_counter(text)
                    f.text, f.value = text, raw
            except FileNotFoundError:
                f.total = None
                continue  # this port simply has no such counter
            except (OSError, BadValue) as exc:
                backoff.failed(f.path, now)
                problems.append(error_reason(exc))
                f.total = None
                continue
            if waiting:
                backoff.succeeded(f.path)
            before = f.total
            f.total = counters.update(f.key, raw * f.scale, now, f.bound or link_bytes)
            if promote and before is not None and f.total - before > PROMOTE_STEP:
                f.every_cycle = promoted = True
        return promoted

    def _identity(self, files: _PortFiles, up: bool | None, device_root: str, problems: list[str]) -> None:
        """What names and bounds the port: link layer, netdev, and its rate while it is up."""
        files.link_layer_text = self._text(files.link_layer)
        files.interface = self._netdev(files.ndev, device_root, problems)
        files.speed = None
        if up:
            rate = self._text(files.rate)
            files.speed = parse_rate(rate)
            if rate and files.speed is None:
                problems.append("garbage")

    def _text(self, path: str) -> str:
        try:
            return self.reader.read(path).strip()
        except OSError:
            return ""

    def _netdev(self, ndev_path: str, device_root: str, problems: list[str]) -> str:
        """The Ethernet interface behind the port: its GID table's netdev, else the PCI function's.
        The file's text comes decoded as ASCII, each other byte a U+FFFD: a name that is not ASCII is
        taken from the function's listing instead, where os.listdir gives it exactly (and skips it as
        a bad_name when it is not UTF-8). Taken as read, `ens\\xff0` was exported as `ens\\ufffd0`, a
        name no interface has, so the netdev collector failed on it every cycle."""
        name = self._text(ndev_path)
        if name and name.isascii():
            return name
        try:
            nets = self.reader.listdir(os.path.join(device_root, "device", "net"))
        except OSError:
            nets = []
        good = [n for n in nets if _label_safe(n)]
        skipped = len(nets) - len(good) or (1 if name and not good else 0)  # the file's name, counted once
        problems += ["bad_name"] * skipped
        return good[0] if good else ""


def _label_safe(name: str) -> bool:
    """A name from os.listdir that is UTF-8 (bytes that are not come back as lone surrogates)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
