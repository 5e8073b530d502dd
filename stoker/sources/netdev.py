"""The Ethernet side of the RoCE NICs: link state (netlink) and ethtool statistics (ioctl).

- Link state comes from `AsyncIPRoute` on the event loop (the synchronous
  IPRoute would block it); `IPRouteLinks` wraps it.
- ethtool statistics come from `IoctlEthtool(ifname).get_statistics()` in
  the collector's worker thread. The counter-name list changes at runtime
  (mlx5 adds per-priority pause counters when PFC is enabled on a priority),
  and `IoctlEthtool` caches it: `stat_names` is reset before every read, or
  values would be paired with the wrong names. Names are stripped (some carry
  a trailing space). A vanished interface (`OSError` errno 19) drops that
  interface only, and its handle is reopened when it comes back.
- mlx5 reports pause durations in microseconds.
- Names: the interfaces watched are those the RDMA ports name (each one a
  label can hold: sources/rdma.py) and `netdev.include`; the link dump's
  names are only looked up. pyroute2 keeps an IFLA_IFNAME that is not UTF-8
  as bytes (its nla `string.decode`), which matches no watched name.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from stoker.counters import CounterSet
from stoker.sources.files import error_reason

PAUSE = re.compile(r"^(rx|tx)_prio(\d)_pause(_duration)?$")
STORMS = {"tx_pause_storm_warning_events": "warning", "tx_pause_storm_error_events": "error"}
DISCARDS = ("rx_discards_phy", "tx_discards_phy", "rx_out_of_buffer", "outbound_pci_buffer_overflow",
            "rx_buffer_passed_thres_phy")
PHYSICAL_BYTES = {"rx_bytes_phy": "rx", "tx_bytes_phy": "tx"}
PAUSE_DURATION_UNIT = 1e-6  # microseconds


@dataclass
class NetInterface:
    name: str
    up: bool | None = None
    pause_frames: dict[tuple[str, str], float] = field(default_factory=dict)  # (priority, direction)
    pause_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    discards: dict[str, float] = field(default_factory=dict)
    storms: dict[str, float] = field(default_factory=dict)
    physical_bytes: dict[str, float] = field(default_factory=dict)


@dataclass
class NetSnapshot:
    interfaces: list[NetInterface]
    problems: list[str] = field(default_factory=list)


def _plan(names: list[str]) -> list[tuple[int, str, str, Any, float]]:
    """(index, counter name, `NetInterface` field, key in it, unit) of each statistic the agent keeps."""
    plan: list[tuple[int, str, str, Any, float]] = []
    for i, raw_name in enumerate(names):
        name = raw_name.strip()
        if (m := PAUSE.match(name)) is not None:
            direction, priority, duration = m.groups()
            if duration:
                plan.append((i, name, "pause_seconds", (priority, direction), PAUSE_DURATION_UNIT))
            else:
                plan.append((i, name, "pause_frames", (priority, direction), 1))
        elif name in STORMS:
            plan.append((i, name, "storms", STORMS[name], 1))
        elif name in DISCARDS:
            plan.append((i, name, "discards", name, 1))
        elif name in PHYSICAL_BYTES:
            plan.append((i, name, "physical_bytes", PHYSICAL_BYTES[name], 1))
    return plan


def open_ethtool(ifname: str) -> Any:
    from pyroute2.ethtool.ioctl import IoctlEthtool
    return IoctlEthtool(ifname)


def _vanished(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENODEV:
        return True
    return type(exc).__name__ == "NoSuchDevice"  # pyroute2's own wrapper of ENODEV


class EthtoolReader:
    """Reads ethtool statistics for a set of interfaces; runs in a worker thread."""

    def __init__(self, open_ethtool: Callable[[str], Any] = open_ethtool):
        self._open = open_ethtool
        self._handles: dict[str, Any] = {}
        self._counters = CounterSet()
        self._plans: dict[str, tuple[list[str], list[tuple]]] = {}  # interface -> (its names, their plan)

    def read(self, names: list[str]) -> tuple[dict[str, NetInterface], list[str]]:
        problems: list[str] = []
        out: dict[str, NetInterface] = {}
        for name in names:
            try:
                stats = self._statistics(name)
            except Exception as exc:  # one interface's failure never hides the others
                self._drop(name)
                problems.append("vanished" if _vanished(exc) else error_reason(exc))
                continue
            out[name] = self._interpret(name, stats)
        for gone in set(self._handles) - set(names):
            self._drop(gone)
        return out, problems

    def _statistics(self, name: str) -> list[tuple[str, int]]:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = self._open(name)
        handle.stat_names = None  # the list changes at runtime: fetch it with every read
        return handle.get_statistics()

    def _drop(self, name: str) -> None:
        self._plans.pop(name, None)
        handle = self._handles.pop(name, None)
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass

    def _interpret(self, ifname: str, stats: list[tuple[str, int]]) -> NetInterface:
        """The counters the agent keeps, by the interface's plan: the names of a mlx5 port's 300-odd
        statistics are matched once, and again only when the list changes (PFC enabled on a priority)."""
        names = [name for name, _ in stats]
        plan = self._plans.get(ifname)
        if plan is None or plan[0] != names:
            plan = self._plans[ifname] = (names, _plan(names))
        iface = NetInterface(ifname)
        update = self._counters.update
        for i, name, kept_in, key, unit in plan[1]:
            getattr(iface, kept_in)[key] = update((ifname, name), stats[i][1]) * unit
        return iface

    def close(self) -> None:
        for name in list(self._handles):
            self._drop(name)


class IPRouteLinks:
    """Operational state of every link, from one netlink dump through `AsyncIPRoute`."""

    def __init__(self) -> None:
        self._ipr: Any = None

    async def operstates(self) -> dict[str, str]:
        from pyroute2 import AsyncIPRoute
        if self._ipr is None:
            self._ipr = AsyncIPRoute()
        try:
            links = await self._ipr.get_links()
            return {msg.get("ifname"): msg.get("operstate") async for msg in links}
        except Exception:
            await self.close()  # reopen the socket next cycle
            raise

    async def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()


def snapshot(names: list[str], states: dict[str, str] | None, stats: dict[str, NetInterface],
             problems: list[str]) -> NetSnapshot:
    interfaces = []
    for name in names:
        iface = stats.get(name) or NetInterface(name)
        if states is not None and name in states:
            iface.up = states[name] == "UP"
        interfaces.append(iface)
    return NetSnapshot(interfaces, problems)
