"""Where the agent's hardware comes from: the real node, or the simulated one.

Every path to hardware is a parameter (DESIGN.md): the NVML backend, the
netlink link-state provider, the ethtool opener, and the sysfs/procfs roots
in the configuration. Production and the simulator run the same collectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


@dataclass
class Platform:
    nvml: Any
    links: Any
    open_ethtool: Callable[[str], Any]
    background: list[Callable[[Any], Awaitable[None]]] = field(default_factory=list)
    """Jobs that run beside the agent's collectors (the simulator's clockwork), given the agent
    (agent/runtime.py's `Agent`, which imports this module: named here, it would close a circle)."""


def real() -> Platform:
    import pynvml

    from stoker.sources.netdev import IPRouteLinks, open_ethtool
    return Platform(nvml=pynvml, links=IPRouteLinks(), open_ethtool=open_ethtool)
