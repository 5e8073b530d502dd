"""Which job a GPU process belongs to: its cgroup, its environment, as the kernel shows them.

NVML gives each GPU's compute PIDs (`GpuSample.pids`). A batch scheduler puts
every process of a job in a cgroup named after the job, and that name is what
this module reads:

- Slurm (task/cgroup, proctrack/cgroup): `job_<id>` under `slurm/uid_<uid>/`
  (cgroup v1, `slurm_<node>/` with several slurmd) or under
  `system.slice/slurmstepd.scope/` (cgroup v2, `<node>_slurmstepd.scope`
  with several slurmd).
- Kubernetes: the pod's UID, `pod<uid>` under `kubepods/` (cgroupfs driver)
  or `kubepods-...-pod<uid with _ for ->.slice` under `kubepods.slice/`
  (systemd driver), in v1 and v2 alike.

Where each comes from, in order, and what the hardened unit (an unprivileged
user, `ProtectProc=invisible`) lets it read (docs/JOBS.md):

1. `<procfs_root>/<pid>/cgroup`: mode 0444, readable by anyone who can see
   `/proc/<pid>`. Under `ProtectProc=invisible` the agent sees only its own
   processes there, so on a production node this finds nothing for the
   training job's PIDs (ENOENT), and the next source answers.
2. `<sysfs_root>/fs/cgroup`, the other way round: the scheduler's cgroups
   (`slurmstepd.scope`, `slurm*/`, `kubepods*`) walked for the `cgroup.procs`
   that lists the PID. cgroupfs is not procfs: `ProtectProc=` does not hide it,
   `ProtectControlGroups=yes` leaves it readable, `cgroup.procs` is 0644 and
   lists PIDs as the reader's PID namespace sees them, which is the host's, as
   NVML's are. Bounded (`MAX_CGROUPS` directories) and only for PIDs the first
   source could not see.
3. `<procfs_root>/<pid>/environ` (`SLURM_JOB_ID`, `STOKER_JOB_ID`): the kernel
   lets only the process's own user, root or CAP_SYS_PTRACE read it; the unit
   grants none of them. It serves an agent run as root (a container with
   `hostPID`) for processes outside any scheduler cgroup (`srun` without
   task/cgroup, `mpirun` over ssh).

The hint API's `job` field (a job that says who it is) is the last resort;
the accounting applies it (detect/goodput.py), not this module.

Everything here runs in a worker thread with a deadline, never on the event
loop: `environ` is read from the target's memory, and a process stuck in the
kernel holding its memory map (a page fault on a hung NFS mount) can block that
read. A PID is looked up once while NVML keeps reporting it; one the sources
could not place is tried again after 1, 2, 4 ... 60 seconds.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from stoker.sources.files import read_regular

MAX_CGROUPS = 4096
"""Directories visited per walk of the scheduler cgroups: a Kubernetes node at its 110-pod limit has about 500."""
RETRY_FIRST, RETRY_CAP = 1.0, 60.0
ENVIRON_LIMIT = 256 * 1024
PROCS_LIMIT = 1 << 20
V1_CONTROLLERS = ("freezer", "pids", "memory", "cpuset", "devices", "cpu,cpuacct", "systemd")
"""Where a cgroup v1 node keeps the scheduler's tree: proctrack/cgroup uses freezer, task/cgroup the others."""

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")
"""What a job id may be, wherever it comes from: it becomes a label value."""
SLURM_JOB = re.compile(r"job_([0-9]{1,20})")
SLURM_PARENT = re.compile(r"(?:slurm(?:_[^/]+)?|[^/]*slurmstepd\.scope)")
K8S_POD = re.compile(r"(?:.*-)?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?")
ENV_KEYS = ((b"SLURM_JOB_ID", "slurm"), (b"STOKER_JOB_ID", "none"))


@dataclass(frozen=True)
class Owner:
    job_id: str
    scheduler: str  # slurm | kubernetes | none
    source: str  # cgroup | environ (the accounting adds hint)


@dataclass
class JobSnapshot:
    owners: dict[int, Owner | None]  # every PID asked about; None: in no job the sources could see
    hidden: frozenset[int] = frozenset()  # PIDs whose /proc entry the agent cannot see
    problems: list[str] = field(default_factory=list)


def parse_cgroup_path(path: str) -> Owner | None:
    """The job a cgroup path names, if a scheduler's: `/system.slice/slurmstepd.scope/job_42/step_0/...`,
    `/slurm/uid_1000/job_42/...`, `/kubepods/burstable/pod<uid>/<container>`, `/kubepods.slice/...`."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        m = SLURM_JOB.fullmatch(part)
        if m and i > 0 and (SLURM_PARENT.fullmatch(parts[i - 1])
                            or (i > 1 and parts[i - 1].startswith("uid_") and SLURM_PARENT.fullmatch(parts[i - 2]))):
            return Owner(m.group(1), "slurm", "cgroup")
    if any(p.startswith(("kubepods", "kubelet-kubepods")) for p in parts):
        for part in parts:
            m = K8S_POD.fullmatch(part)
            if m:
                return Owner(m.group(1).replace("_", "-"), "kubernetes", "cgroup")
    return None


def parse_cgroup_file(text: str) -> Owner | None:
    """`/proc/<pid>/cgroup`: `hierarchy:controllers:path` per line; the v2 line (`0::`) first."""
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    for _, _, path in sorted(lines, key=lambda f: f[0] != "0"):
        owner = parse_cgroup_path(path)
        if owner is not None:
            return owner
    return None


def parse_environ(data: bytes) -> Owner | None:
    variables = dict(item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)
    for key, scheduler in ENV_KEYS:
        value = variables.get(key, b"").decode("ascii", "replace")
        if JOB_ID.fullmatch(value) and (scheduler != "slurm" or value.isdigit()):
            return Owner(value, scheduler, "environ")
    return None


class JobSource:
    def __init__(self, procfs_root: str = "/proc", sysfs_root: str = "/sys", clock: Callable[[], float] = time.monotonic):
        self.procfs_root = procfs_root
        self.cgroup_root = os.path.join(sysfs_root, "fs", "cgroup")
        self._clock = clock
        self._known: dict[int, Owner | None] = {}
        self._retry: dict[int, tuple[float, float]] = {}  # pid -> (try again at, next delay): not placed yet
        self._hidden: set[int] = set()
        self.walks = 0  # cgroup tree walks done (tests, benchmarks)

    def due(self, pids: Iterable[int]) -> bool:
        """Whether `resolve(pids)` would read anything: a new PID, or one due for another try."""
        now = self._clock()
        return any(p not in self._known or (p in self._retry and now >= self._retry[p][0]) for p in pids)

    def resolve(self, pids: Iterable[int]) -> JobSnapshot:
        """The owner of each PID; PIDs no longer asked about are forgotten (a PID reused later is looked up again)."""
        pids = frozenset(pids)
        for gone in [p for p in self._known if p not in pids]:
            self._known.pop(gone)
            self._retry.pop(gone, None)
            self._hidden.discard(gone)
        now, problems = self._clock(), []
        todo = [p for p in sorted(pids) if p not in self._known or (p in self._retry and now >= self._retry[p][0])]
        placed: dict[int, tuple[Owner | None, bool]] = {}  # pid -> (owner, hidden)
        for pid in todo:
            owner, visible = self._from_proc(pid, problems)
            placed[pid] = (owner, not visible)
        invisible = {pid for pid, (_, hidden) in placed.items() if hidden}
        if invisible:
            placed.update((pid, (owner, True)) for pid, owner in self._walk(invisible, problems).items())
        for pid, (owner, hidden) in placed.items():
            self._settle(pid, owner, now, hidden)
        return JobSnapshot(dict(self._known), frozenset(self._hidden), problems)

    def _settle(self, pid: int, owner: Owner | None, now: float, hidden: bool) -> None:
        self._known[pid] = owner
        (self._hidden.add if hidden else self._hidden.discard)(pid)
        if owner is not None:
            self._retry.pop(pid, None)
        else:
            delay = self._retry.get(pid, (0.0, RETRY_FIRST))[1]
            self._retry[pid] = (now + delay, min(2 * delay, RETRY_CAP))

    def _from_proc(self, pid: int, problems: list[str]) -> tuple[Owner | None, bool]:
        """(owner, whether /proc/<pid> could be read at all)."""
        base = os.path.join(self.procfs_root, str(pid))
        try:
            owner = parse_cgroup_file(read_regular(os.path.join(base, "cgroup"), 65536).decode("utf-8", "replace"))
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            return None, False  # hidden (hidepid, ProtectProc=) or gone
        except OSError as exc:
            problems.append(f"cgroup_{type(exc).__name__.lower()}")
            return None, False
        if owner is not None:
            return owner, True
        try:
            return parse_environ(read_regular(os.path.join(base, "environ"), ENVIRON_LIMIT)), True
        except OSError:  # EACCES for another user's process unless root or CAP_SYS_PTRACE: expected
            return None, True

    # -- the cgroup tree, for PIDs /proc does not show ---------------------------------------

    def _roots(self) -> list[tuple[str, str]]:
        """(directory, the hierarchy's root) of each scheduler subtree: v2 first, then one v1 hierarchy."""
        out: list[tuple[str, str]] = []
        hierarchies = [h for h in (self.cgroup_root, os.path.join(self.cgroup_root, "unified"))
                       if os.path.exists(os.path.join(h, "cgroup.controllers"))]
        for h in hierarchies:
            out += [(d, h) for d in self._scheduler_dirs(h, v2=True)]
        for controller in V1_CONTROLLERS:
            h = os.path.join(self.cgroup_root, controller)
            found = [(d, h) for d in self._scheduler_dirs(h, v2=False)]
            if found:
                out += found
                break
        return out

    @staticmethod
    def _scheduler_dirs(hierarchy: str, v2: bool) -> list[str]:
        try:
            top = sorted(os.listdir(hierarchy))
        except OSError:
            return []
        dirs = [os.path.join(hierarchy, n) for n in top if n.startswith(("kubepods", "kubelet"))
                or (not v2 and SLURM_PARENT.fullmatch(n) and n.startswith("slurm"))]
        try:
            dirs += [os.path.join(hierarchy, "system.slice", n) for n in sorted(os.listdir(os.path.join(
                hierarchy, "system.slice"))) if n.endswith("slurmstepd.scope")]
        except OSError:
            pass
        return [d for d in dirs if os.path.isdir(d)]

    def _walk(self, wanted: set[int], problems: list[str]) -> dict[int, Owner | None]:
        self.walks += 1
        found: dict[int, Owner | None] = {}
        visited = 0
        for top, hierarchy in self._roots():
            stack = [top]
            while stack and wanted - found.keys():
                path = stack.pop()
                visited += 1
                if visited > MAX_CGROUPS:
                    problems.append("cgroup_walk_truncated")
                    return found
                try:
                    with os.scandir(path) as entries:
                        stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
                    procs = read_regular(os.path.join(path, "cgroup.procs"), PROCS_LIMIT).split()
                except OSError:  # gone meanwhile (a job ended), or a directory without processes
                    continue
                hits = wanted.intersection(int(p) for p in procs if p.isdigit())
                if hits:
                    owner = parse_cgroup_path("/" + os.path.relpath(path, hierarchy))
                    found.update((pid, owner) for pid in hits)
        return found
