"""The systemd side: the unit verified and scored, sd_notify READY and watchdog pings, SIGHUP
reload, and the mount namespace a hardened unit runs in."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, need_binary, start_agent_process, wait_http

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "stoker.service"


def test_unit_verifies(tmp_path):
    """`systemd-analyze verify` checks that ExecStart exists: only that path is pointed at a real binary."""
    unit = tmp_path / "stoker.service"
    unit.write_text(UNIT.read_text().replace("/opt/stoker/bin/stoker", shutil.which("true")))
    result = subprocess.run([need_binary("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_security_exposure_is_low():
    result = subprocess.run([need_binary("systemd-analyze"), "security", "--offline=yes", str(UNIT)],
                            capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for stoker.service: ([\d.]+)", result.stdout).group(1))
    assert score <= 2.0, result.stdout  # docs/OPERATIONS.md records 1.7
    unit = UNIT.read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=2",
                    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "CapabilityBoundingSet=\n", "DeviceAllow=char-nvidia-frontend rw", "User=stoker"):
        assert setting in unit, setting


def samples(url: str) -> dict:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_ready_and_watchdog_pings_reach_the_notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--listen", f"127.0.0.1:{port}",
                                env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        messages = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in messages), messages
        assert sum("WATCHDOG=1" in m for m in messages) >= 3
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=5)
        sock.settimeout(2)
        assert "STOPPING=1" in sock.recv(4096).decode()
    finally:
        agent.kill()
        sock.close()


def cycles(url: str) -> float:
    return samples(url)[("stoker_collector_duration_seconds_count", (("collector", "gpu"),))]


@pytest.mark.slow
def test_sighup_reload_applies_a_new_interval_refuses_a_broken_file_and_keeps_counters(tmp_path):
    config = tmp_path / "stoker.toml"
    config.write_text('[agent]\ninterval = 1.0\n[checkpoint]\nlisten = "127.0.0.1:0"\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    agent = start_agent_process("--simulate", "healthy", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                "--log-format", "json")
    try:
        wait_http(url)
        time.sleep(1.0)
        before = samples(url)
        c0 = cycles(url)
        time.sleep(3)
        slow = cycles(url) - c0
        config.write_text('[agent]\ninterval = 0.2\n[checkpoint]\nlisten = "127.0.0.1:0"\n')
        agent.send_signal(signal.SIGHUP)
        time.sleep(1.2)
        c1 = cycles(url)
        time.sleep(3)
        fast = cycles(url) - c1
        assert fast >= 3 * slow, (slow, fast)
        config.write_text("[agent]\ninterval = -5\n")
        agent.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert agent.poll() is None, "a broken file must not stop the agent"
        c2 = cycles(url)
        time.sleep(2)
        assert cycles(url) - c2 >= 5, "the running interval (0.2 s) was kept"
        after = samples(url)
        for key, value in before.items():
            if key[0].endswith("_total") and key in after:
                assert after[key] >= value, f"{key} went back across the reload"
        assert "configuration reload refused" in agent.log() and "agent.interval" in agent.log()
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_a_slave_mount_namespace_sees_nfs_mounts_made_after_it_started(tmp_path):
    """What ProtectSystem= and friends give the service: a mount namespace that is a *slave*
    of the host's. A mount made on the host later still appears in the service's
    /proc/self/mountstats; with private propagation (PrivateMounts=) it would not."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    host = tmp_path / "host"
    target = host / "mnt"
    target.mkdir(parents=True)
    # systemd makes / a shared mount at boot; a container's is often private: make one shared here
    shared = subprocess.run(f"mount --bind {host} {host} && mount --make-shared {host}", shell=True,
                            capture_output=True, text=True)
    if shared.returncode != 0:
        pytest.skip(f"cannot make a shared mount here: {shared.stderr.strip()}")
    seen = {}
    for propagation in ("slave", "private"):
        child = subprocess.Popen(["unshare", "--mount", f"--propagation={propagation}", "sh", "-c",
                                  "sleep 1.5; cat /proc/self/mountstats"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", f"stoker-{propagation}", str(target)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            child.kill()
            pytest.skip(f"cannot mount here: {mounted.stderr.strip()}")
        try:
            seen[propagation] = f"mounted on {target} " in child.communicate(timeout=10)[0]
        finally:
            subprocess.run(["umount", str(target)], check=False)
    subprocess.run(["umount", str(host)], check=False)
    assert seen == {"slave": True, "private": False}
