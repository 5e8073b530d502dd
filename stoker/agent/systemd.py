"""systemd integration without libsystemd: sd_notify READY/RELOADING/STOPPING and the watchdog.

The watchdog is pinged from a task on the event loop, every half of
`WATCHDOG_USEC`: if the loop freezes, the pings stop and systemd restarts the
service, which is the point (a thread would keep pinging a dead agent).
"""

from __future__ import annotations

import asyncio
import os
import socket


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def notify(message: str) -> bool:
    """Send one sd_notify message; False when not under systemd (no NOTIFY_SOCKET)."""
    address = _address()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for this process, or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
