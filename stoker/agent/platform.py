"""Where the agent's hardware comes from: the real node, or the simulated one.

Every path to hardware is a parameter (DESIGN.md): the NVML backend, the
netlink link-state provider, the ethtool opener, and the sysfs/procfs roots
in the configuration. Production and the simulator run the same collectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from stoker.agent.runtime import Agent


@dataclass
class Platform:
    nvml: Any
    links: Any
    open_ethtool: Callable[[str], Any]
    background: list[Callable[[Agent], Awaitable[None]]] = field(default_factory=list)
    """Jobs that run beside the agent's collectors (the simulator's clockwork), given the agent."""


def real() -> Platform:
    import pynvml

    from stoker.sources.netdev import IPRouteLinks, open_ethtool
    return Platform(nvml=pynvml, links=IPRouteLinks(), open_ethtool=open_ethtool)
