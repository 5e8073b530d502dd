"""The systemd side: the unit verified and scored, sd_notify READY and watchdog pings, SIGHUP
reload, and the mount namespace a hardened unit runs in."""

from __future__ import annotations

import fnmatch
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
PROC_DEVICES = Path(__file__).resolve().parent / "fixtures" / "procfs" / "devices"


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
                    "CapabilityBoundingSet=\n", "DevicePolicy=closed", "User=stoker"):
        assert setting in unit, setting


def majors(name: str, kind: str, proc_devices: str) -> set[int]:
    """The majors systemd allows for `DeviceAllow=char-NAME` (kind "c") or `block-NAME` ("b"), as
    bpf_devices_allow_list_major() in systemd's src/core/bpf-devices.c resolves them when the unit starts:
    "*" is every device of the kind, a number is that major; otherwise each line of /proc/devices' section
    for the kind ("Character devices:" up to the blank line) is stripped, split at its first blank into a
    major (a positive number) and a name, and every major whose name matches NAME with fnmatch(3) (flags 0:
    a glob, `*` crossing `/`) is allowed, all its minors. A NAME that matches nothing allows nothing."""
    if name == "*":
        return {-1}
    if name.isdigit():
        return {int(name)}
    found, section = set(), False
    for line in proc_devices.splitlines():
        if line == {"c": "Character devices:", "b": "Block devices:"}[kind]:
            section = True
        elif not line:
            section = False
        elif section and len(line.split(None, 1)) == 2:
            major, device = line.split(None, 1)
            if major.isdigit() and int(major) > 0 and fnmatch.fnmatchcase(device, name):
                found.add(int(major))
    return found


def device_rules(unit: str, proc_devices: str) -> list[tuple[str, int, str]]:
    """The unit's DeviceAllow= entries as (kind, major, access) on a node whose /proc/devices is this."""
    rules = []
    for line in unit.splitlines():
        if line.startswith("DeviceAllow="):
            spec, access = line.removeprefix("DeviceAllow=").split()
            kind, _, name = spec.partition("-")
            rules += [(kind[0], major, access) for major in majors(name, kind[0], proc_devices)]
    return rules


def allows(rules, kind: str, major: int, access: str) -> bool:
    """systemd's BPF program passes an access when one rule is of its kind and major (or any major) and
    holds every bit it asks for (bpf_prog_allow_list_major(): requested & allowed == requested)."""
    return any(k == kind and m in (major, -1) and set(access) <= set(a) for k, m, a in rules)


@pytest.mark.parametrize("driver", ["535", "580"])
def test_device_rules_give_nvml_its_devices_and_no_other_on_each_driver(driver):
    """/proc/devices as each driver writes it (tests/fixtures/procfs/devices/, from NVIDIA's
    open-gpu-kernel-modules at tags 535.288.01 and 580.95.05): the major NV_MAJOR_DEVICE_NUMBER 195 is
    `register_chrdev(195, "nvidia-frontend")` in kernel-open/nvidia/nv-frontend.c up to 535; that file is gone
    from 545.23.06 on, and kernel-open/nvidia/nv.c registers 195:0-247 as "nvidia" and 195:255 as "nvidiactl"
    (nv_register_chrdev), kernel-open/nvidia-modeset/nvidia-modeset-linux.c 195:254 as "nvidia-modeset".
    Dynamic majors, allocated by name: "nvidia-caps" (nv-caps.c), "nvidia-nvlink" (nvlink_linux.c),
    "nvidia-nvswitch" (linux_nvswitch.c), "nvidia-uvm" (nvidia-uvm/uvm.c), "nvidia-caps-imex-channels"
    (nv-caps-imex.c, 550.90 on). The unit must let NVML open /dev/nvidiactl and /dev/nvidiaN read-write and,
    with MIG, /dev/nvidia-caps/* for reading (their mode is 0444: OS_RUGO for mig/monitor and each instance's
    access file, src/nvidia/arch/nvalloc/unix/src/os.c), and nothing else the driver registers: NVML
    needs none of it (libnvidia-container's src/nvc_mount.c gives containers without the compute capability,
    nvidia-smi's, only major 195 and, for MIG monitoring, the caps device)."""
    proc_devices = (PROC_DEVICES / f"nvidia-{driver}.txt").read_text()
    rules = device_rules(UNIT.read_text(), proc_devices)
    assert allows(rules, "c", 195, "rw"), f"NVML cannot open /dev/nvidiactl on a {driver} driver: {rules}"
    caps = majors("nvidia-caps", "c", proc_devices)
    assert len(caps) == 1 and allows(rules, "c", *caps, "r") and not allows(rules, "c", *caps, "w")
    others = majors("nvidia*", "c", proc_devices) - {195} - caps
    assert others, "the fixture lists the driver's other devices"
    assert not [m for m in others if allows(rules, "c", m, "r")], f"more than NVML needs: {rules}"
    assert {m for _, m, _ in rules} == {195} | caps


def test_each_device_rule_names_what_one_driver_registers_and_the_driver_is_loaded_first():
    """A name no driver registers would be a rule that silently allows nothing. systemd resolves names once,
    at start ("device groups not resolvable then are not added", systemd.resource-control(5)): the unit pulls
    in modprobe@nvidia.service and starts after it."""
    unit = UNIT.read_text()
    fixtures = [p.read_text() for p in sorted(PROC_DEVICES.glob("nvidia-*.txt"))]
    for line in unit.splitlines():
        if line.startswith("DeviceAllow=char-"):
            name = line.removeprefix("DeviceAllow=char-").split()[0]
            assert any(majors(name, "c", f) for f in fixtures), f"{name} is registered by no driver"
    for setting in ("After=", "Wants="):
        assert "modprobe@nvidia.service" in next(v for v in unit.splitlines() if v.startswith(setting))


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
