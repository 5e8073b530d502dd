"""What job attribution needs of the hardened unit, and that it gets it without loosening it.

The unit runs the agent as `stoker` with `ProtectProc=invisible`: another user's /proc/<pid> does not
exist for it, and /proc/<pid>/environ would be refused anyway (ptrace access). The design reads the
scheduler's cgroups from cgroupfs instead (sources/jobs.py). The first test checks the unit keeps
what that needs; the second proves the premises on the running kernel, as an unprivileged user
behind a hidepid=invisible /proc: what it can and cannot read, and that the agent's source finds
the job all the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need_binary

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "stoker.service"
JOB_USER, AGENT_USER = 4242, 65534


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_unit_keeps_its_hardening_and_leaves_cgroupfs_readable(tmp_path):
    unit = settings()
    assert unit["User"] == ["stoker"]  # unprivileged: other users' environ is refused (EACCES)
    assert unit["ProtectProc"] == ["invisible"]  # kept: attribution does not read other users' /proc/<pid>
    assert unit["ProtectControlGroups"] == ["yes"]  # read-only, still readable ("private" would hide the tree)
    for absent in ("PrivatePIDs", "ProcSubset", "PrivateUsers"):  # other PID namespace: NVML's PIDs unmatched
        assert absent not in unit, absent
    assert not unit.get("CapabilityBoundingSet", [""])[0], "no capability (CAP_SYS_PTRACE would open environ)"
    copy = tmp_path / "stoker.service"
    copy.write_text(UNIT.read_text().replace("/opt/stoker/bin/stoker", shutil.which("true")))
    verify = subprocess.run([need_binary("systemd-analyze"), "verify", str(copy)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    security = subprocess.run([need_binary("systemd-analyze"), "security", "--offline=yes", str(UNIT)],
                              capture_output=True, text=True).stdout
    assert re.search(r"✓ ProtectProc=\s+Service has restricted access to process tree", security), security
    assert re.search(r"✓ ProtectControlGroups=", security), security
    assert float(re.search(r"Overall exposure level for stoker.service: ([\d.]+)", security).group(1)) <= 1.7


def _job_cgroup() -> tuple[Path, Path] | None:
    """A scratch Slurm job cgroup on this kernel: (the leaf to put the process in, the top to remove)."""
    base = Path("/sys/fs/cgroup")
    job = f"job_{os.getpid()}"
    if (base / "pids").is_dir():  # cgroup v1: Slurm's task/cgroup layout
        top = base / "pids" / "slurm"
        return top / f"uid_{JOB_USER}" / job / "step_0" / "task_0", top
    if (base / "cgroup.controllers").exists():  # cgroup v2: Slurm's cgroup/v2 layout
        top = base / "system.slice" / "stoker-test_slurmstepd.scope"
        return top / job / "step_0" / "user" / "task_0", top
    return None


PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
from stoker.sources.jobs import JobSource
pid = {pid}
def readable(path):
    try:
        open(path, "rb").read()
        return "yes"
    except OSError as exc:
        return type(exc).__name__
snap = JobSource("/proc", "/sys").resolve([pid])
owner = snap.owners[pid]
print(json.dumps({{"proc_dir": os.path.exists(f"/proc/{{pid}}"), "cgroup": readable(f"/proc/{{pid}}/cgroup"),
                  "environ": readable(f"/proc/{{pid}}/environ"), "owner": owner and [owner.job_id, owner.source],
                  "hidden": pid in snap.hidden}}))
"""


def test_what_an_unprivileged_agent_reads_of_another_users_job():
    """As root: a process of user 4242 in a Slurm job cgroup; probed as `nobody`, first with /proc as
    it is, then behind a hidepid=invisible /proc (what ProtectProc=invisible mounts for the unit)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("needs root, setpriv and unshare")
    python = shutil.which("python3", path="/usr/bin:/bin")
    importable = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import stoker.sources.jobs"
    if python is None or subprocess.run([python, "-c", importable], user=AGENT_USER, group=AGENT_USER,
                                        extra_groups=[], capture_output=True).returncode != 0:
        pytest.skip("the unprivileged user cannot run Python on this checkout")
    where = _job_cgroup()
    if where is None:
        pytest.skip("no cgroup hierarchy to make a job cgroup in")
    leaf, top = where
    try:
        leaf.mkdir(parents=True)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    job = subprocess.Popen(["setpriv", f"--reuid={JOB_USER}", f"--regid={JOB_USER}", "--clear-groups", "sleep", "60"],
                           env={"SLURM_JOB_ID": str(os.getpid()), "PATH": os.environ["PATH"]})
    try:
        (leaf / "cgroup.procs").write_text(f"{job.pid}\n")
        as_agent = ["setpriv", f"--reuid={AGENT_USER}", f"--regid={AGENT_USER}", "--clear-groups", python, "-c",
                    PROBE.format(root=str(ROOT), pid=job.pid)]
        plain = subprocess.run(as_agent, capture_output=True, text=True, timeout=30)
        remount = 'mount -t proc -o hidepid=invisible proc /proc && exec "$@"'
        hidden = subprocess.run(["unshare", "--mount", "sh", "-c", remount, "sh", *as_agent], capture_output=True,
                                text=True, timeout=30)
        if hidden.returncode != 0 and "mount" in hidden.stderr:
            pytest.skip(f"cannot mount a procfs here: {hidden.stderr.strip()}")
        assert plain.returncode == 0 and hidden.returncode == 0, plain.stderr + hidden.stderr
        seen, behind = json.loads(plain.stdout), json.loads(hidden.stdout)
        job_id = str(os.getpid())
        # /proc as it is: the cgroup file is world-readable, the environment is the process owner's
        assert seen == {"proc_dir": True, "cgroup": "yes", "environ": "PermissionError",
                        "owner": [job_id, "cgroup"], "hidden": False}, plain.stderr
        # ProtectProc=invisible: no /proc/<pid> at all; the scheduler's cgroup still lists the PID
        assert behind == {"proc_dir": False, "cgroup": "FileNotFoundError", "environ": "FileNotFoundError",
                          "owner": [job_id, "cgroup"], "hidden": True}, hidden.stderr
    finally:
        job.kill()
        job.wait()
        time.sleep(0.1)  # the kernel empties the cgroup once the process is reaped
        for d in sorted((p for p in [leaf, *leaf.parents] if p == top or top in p.parents), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
