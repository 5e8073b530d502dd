"""Which job a GPU process belongs to: its cgroup, its environment, as the kernel shows them.

NVML gives each GPU's compute PIDs (`GpuSample.pids`). A batch scheduler puts
every process of a job in a cgroup named after the job, at a place of its own
in the cgroup tree, and that name at that place is what this module reads
(docs/JOBS.md has each layout with its source and versions):

- Slurm, cgroup v1 (task/cgroup, proctrack/cgroup): `/slurm/uid_<uid>/job_<id>/`
  at the root of a controller's hierarchy (`/slurm_<node>/` with several slurmd).
- Slurm, cgroup v2: `/<CgroupSlice>/slurmstepd.scope/<job>/` (`<node>_slurmstepd.scope`
  with several slurmd; the slice is `system.slice` unless cgroup.conf's
  `CgroupSlice` names another, from 25.11), where `<job>` is `job_<id>` up to
  26.05 and with `CgroupJobIdPaths=yes`, else the job's SLUID (`s` and 13
  Crockford base-32 digits, from 26.05). A SLUID does not hold the job's number
  (cluster, milliseconds, sequence: slurm src/common/sluid.h) and changes when
  the job is requeued; nothing the agent can read maps one to the other, so the
  SLUID is the job id it exports.
- Kubernetes: the pod's UID (an API UUID, or 32 hex digits for a static pod),
  `pod<uid>` under `/kubepods/[burstable|besteffort/]` (cgroupfs driver) or
  `<root->kubepods[-burstable|-besteffort]-pod<uid, - as _>.slice` where systemd
  puts that slice (systemd driver; `<root->` is kubelet's `--cgroup-root`).

**Only those places count** (issue 25): a path is read from the hierarchy's
root, and a scheduler's name elsewhere (inside a user's delegated
`user@<uid>.service`, a container, or a job's own cgroup) names no job. A
systemd slice is where the host's service manager puts it (its name spells its
path: `a-b.slice` is `/a.slice/a-b.slice`), and nothing below a delegated unit
is a slice of the host's, so "a chain of slices from the root" cannot be built
by a user. A path the kernel shows relative to the reader's cgroup namespace
(`/../../system.slice/...`: the agent in a container) is anchored by the slices
it shows; the cgroupfs driver's plain names cannot be, and such PIDs are looked
up in the cgroup tree instead.

Where each comes from, in order, and what the hardened unit (an unprivileged
user, `ProtectProc=invisible`) lets it read:

1. `<procfs_root>/<pid>/cgroup`: mode 0444, readable by anyone who can see
   `/proc/<pid>`. Under `ProtectProc=invisible` the agent sees only its own
   processes there, so on a production node this finds nothing for the
   training job's PIDs (ENOENT), and the next source answers.
2. `<sysfs_root>/fs/cgroup`, the other way round: the scheduler's cgroups
   (`slurm*/`, `kubepods/`, and within the slices reachable from the root,
   `*slurmstepd.scope` and `*kubepods.slice`) walked for the `cgroup.procs`
   that lists the PID. cgroupfs is not procfs: `ProtectProc=` does not hide it,
   `ProtectControlGroups=yes` leaves it readable, `cgroup.procs` is 0644 and
   lists PIDs as the reader's PID namespace sees them, which is the host's, as
   NVML's are. Bounded (directories, entries, seconds) and only for PIDs the
   first source could not place.
3. `<procfs_root>/<pid>/environ` (`SLURM_JOB_ID`, `STOKER_JOB_ID`): the kernel
   lets only the process's own user, root or CAP_SYS_PTRACE read it; the unit
   grants none of them. Read only for a PID in no scheduler's cgroup (a PID in
   one belongs to that job, whatever its environment says). What such a claim
   may label is decided where GPUs are bound to jobs (detect/goodput.py): only
   the GPUs of that process, never one a scheduler's process holds, never with
   a job whose processes a scheduler's cgroup places on the node's GPUs.

The hint API's `job` field (a job that says who it is) is the last resort;
the accounting applies it (detect/goodput.py), not this module.

Everything here runs in a worker thread with a deadline, never on the event
loop: `environ` is read from the target's memory, and a process stuck in the
kernel holding its memory map (a page fault on a hung NFS mount) can block that
read. A PID is looked up once while NVML keeps reporting it; one the sources
could not place is tried again after 1, 2, 4 ... 60 seconds.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from stoker.sources.files import read_regular

MAX_CGROUPS = 4096
"""Directories visited per walk of the scheduler cgroups: a Kubernetes node at its 110-pod limit has about 500."""
MAX_CGROUPS_PER_JOB = 256
"""Directories visited per walk in one job's subtree: a Slurm job has a few per step (a task per GPU), a pod
one per container. A job's user may make cgroups in its own (Slurm's cgroup v1 task cgroups are the user's):
4,100 of them used up MAX_CGROUPS before the walk reached any other job."""
MAX_ENTRIES = 4096
"""Entries read of one directory: a job's user may make cgroups in its own (cgroup v1 step cgroups are its)."""
MAX_SLICES, MAX_SLICE_DEPTH = 256, 4
"""Slices looked into for the schedulers' places: a node has a few dozen (one per logged-in user)."""
WALK_SECONDS = 1.0
"""A walk stops after this long (the attributor's deadline is 2 s): a cgroupfs slowed by churn."""
RETRY_FIRST, RETRY_CAP = 1.0, 60.0
CGROUP_LIMIT = 65536
ENVIRON_LIMIT = 256 * 1024
PROCS_LIMIT = 1 << 20
PID_MAX_LIMIT = 4 * 1024 * 1024
"""The largest PID a 64-bit kernel gives (linux include/linux/threads.h): 7 digits."""
V1_CONTROLLERS = ("freezer", "pids", "memory", "cpuset", "devices", "cpu,cpuacct", "systemd")
"""Where a cgroup v1 node keeps the scheduler's tree: proctrack/cgroup uses freezer, task/cgroup the others."""

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")
"""What a job id may be, wherever it comes from: it becomes a label value."""
SLURM_V1_ROOT = re.compile(r"slurm(?:_[A-Za-z0-9._-]{1,64})?")  # CgroupPrepend: /slurm, /slurm_%n (several slurmd)
SLURM_UID = re.compile(r"uid_[0-9]{1,10}")
SLURM_SCOPE = re.compile(r"(?:[A-Za-z0-9:._-]{1,64}_)?slurmstepd\.scope")
SLURM_JOB = re.compile(r"job_([0-9]{1,10})")  # job ids are uint32
SLUID = re.compile(r"s[0-9A-F][0-9A-HJKMNP-TV-Z]{12}")  # print_sluid(): 64 bits, top 4 first, Crockford base 32
UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
POD_SLICE = re.compile(rf"(?:[A-Za-z0-9:._]{{1,64}}-){{0,3}}kubepods(?:-burstable|-besteffort)?-pod({UID})\.slice")
KUBEPODS_SLICE = re.compile(r"(?:[A-Za-z0-9:._]{1,64}-){0,3}kubepods\.slice")
POD_DIR = re.compile(rf"pod({UID})")
QOS = ("burstable", "besteffort")
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


def expand_slice(name: str) -> list[str] | None:
    """Where systemd puts a slice, from the root: `a-b.slice` -> [a.slice, a-b.slice] (systemd's
    unit_name_to_path; kubelet's cgroup manager and runc call it ExpandSlice); None if no slice name."""
    if not name.endswith(".slice") or name == "-.slice":
        return None
    parts = name[: -len(".slice")].split("-")
    if "" in parts:
        return None
    return ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))]


def _slices_in_place(slices: list[str], relative: bool) -> bool:
    """Whether these slices, the path's components before its first other one, stand where systemd
    puts the last of them: its whole expansion from the root, or (a path seen from another cgroup
    namespace, after its `..`) the end of it. Only root makes a directory at the root, and nothing
    below a delegated unit is reached through slices alone."""
    expected = expand_slice(slices[-1]) if slices else None
    if expected is None:
        return False
    if relative:
        return slices == expected[-len(slices):]
    return slices == expected or len(slices) == 1  # one slice at the root: made there (IgnoreSystemd=yes)


def _slurm(parts: list[str], relative: bool) -> Owner | None:
    if not relative and len(parts) >= 3 and SLURM_V1_ROOT.fullmatch(parts[0]) and SLURM_UID.fullmatch(parts[1]):
        m = SLURM_JOB.fullmatch(parts[2])  # cgroup v1: /slurm[_<node>]/uid_<uid>/job_<id>/
        return Owner(m.group(1), "slurm", "cgroup") if m else None
    k = next((i for i, p in enumerate(parts) if not p.endswith(".slice")), len(parts))
    if k + 1 < len(parts) and SLURM_SCOPE.fullmatch(parts[k]) and _slices_in_place(parts[:k], relative):
        job = parts[k + 1]  # cgroup v2: /<slice>/[<node>_]slurmstepd.scope/{job_<id>|<SLUID>}/
        m = SLURM_JOB.fullmatch(job)
        if m:
            return Owner(m.group(1), "slurm", "cgroup")
        if SLUID.fullmatch(job):
            return Owner(job, "slurm", "cgroup")
    return None


def _kubernetes(parts: list[str], relative: bool) -> Owner | None:
    k = next((i for i, p in enumerate(parts) if not p.endswith(".slice")), len(parts))
    if k:  # systemd driver: the pod's slice, the last of the slices, where systemd puts it
        m = POD_SLICE.fullmatch(parts[k - 1])
        if m and _slices_in_place(parts[:k], relative):
            return Owner(m.group(1).replace("_", "-"), "kubernetes", "cgroup")
        return None
    if relative or not parts or parts[0] != "kubepods":  # cgroupfs driver: /kubepods/[<qos>/]pod<uid>/
        return None
    m = POD_DIR.fullmatch(parts[2] if len(parts) > 2 and parts[1] in QOS else parts[1] if len(parts) > 1 else "")
    return Owner(m.group(1).replace("_", "-"), "kubernetes", "cgroup") if m else None


def parse_cgroup_path(path: str) -> Owner | None:
    """The job a cgroup path names, if a scheduler put it there: `/system.slice/slurmstepd.scope/job_42/...`,
    `/slurm/uid_1000/job_42/...`, `/kubepods/burstable/pod<uid>/<container>`, `/kubepods.slice/...`.
    A path that climbs (`/../..`: seen from another cgroup namespace) is anchored by its slices."""
    parts = [p for p in path.split("/") if p]
    up = next((i for i, p in enumerate(parts) if p != ".."), len(parts))
    parts, relative = parts[up:], up > 0
    if not parts or ".." in parts or "." in parts:
        return None
    return _slurm(parts, relative) or _kubernetes(parts, relative)


def parse_cgroup_file(text: str) -> Owner | None:
    """`/proc/<pid>/cgroup`: `hierarchy:controllers:path` per line; the v2 line (`0::`) first."""
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    for _, _, path in sorted(lines, key=lambda f: f[0] != "0"):
        owner = parse_cgroup_path(path)
        if owner is not None:
            return owner
    return None


def outside_namespace(text: str) -> bool:
    """Whether `/proc/<pid>/cgroup` shows the process outside the reader's cgroup namespace (`/..`)."""
    return any(line.split(":", 2)[-1].startswith("/..") for line in text.splitlines() if line.count(":") >= 2)


def parse_environ(data: bytes) -> Owner | None:
    variables = dict(item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)
    for key, scheduler in ENV_KEYS:
        value = variables.get(key, b"").decode("ascii", "replace")
        if JOB_ID.fullmatch(value) and (scheduler != "slurm" or value.isdigit()):
            return Owner(value, scheduler, "environ")
    return None


def parse_pids(data: bytes) -> set[int]:
    """The PIDs a `cgroup.procs` lists, one decimal a line. What cannot be a PID is skipped, so a
    damaged line costs its own PID only (a number of 4,300 digits would make int() raise)."""
    return {pid for pid in (int(p) for p in data.split() if len(p) <= 7 and p.isdigit()) if 0 < pid <= PID_MAX_LIMIT}


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
        looked = {pid: self._from_proc(pid, problems) for pid in todo}  # pid -> (owner, where)
        unplaced = {pid for pid, (owner, where) in looked.items() if owner is None and where != "seen"}
        walked = self._walk(unplaced, problems) if unplaced else {}
        for pid, (owner, where) in looked.items():
            if owner is None and pid in walked:
                owner = walked[pid]
            elif owner is None and where == "outside":  # in no scheduler's cgroup, seen in another namespace
                owner = self._from_environ(pid)
            self._settle(pid, owner, now, where == "hidden")
        return JobSnapshot(dict(self._known), frozenset(self._hidden), problems)

    def _settle(self, pid: int, owner: Owner | None, now: float, hidden: bool) -> None:
        self._known[pid] = owner
        (self._hidden.add if hidden else self._hidden.discard)(pid)
        if owner is not None:
            self._retry.pop(pid, None)
        else:
            delay = self._retry.get(pid, (0.0, RETRY_FIRST))[1]
            self._retry[pid] = (now + delay, min(2 * delay, RETRY_CAP))

    def _from_proc(self, pid: int, problems: list[str]) -> tuple[Owner | None, str]:
        """(owner, where): `hidden` (/proc/<pid> cannot be read), `outside` (its cgroup is outside the
        agent's cgroup namespace and names no job there), or `seen`."""
        base = os.path.join(self.procfs_root, str(pid))
        try:
            text = read_regular(os.path.join(base, "cgroup"), CGROUP_LIMIT).decode("utf-8", "replace")
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            return None, "hidden"  # hidepid, ProtectProc=, or gone
        except OSError as exc:
            problems.append(f"cgroup_{type(exc).__name__.lower()}")
            return None, "hidden"
        owner = parse_cgroup_file(text)
        if owner is not None:
            return owner, "seen"
        if outside_namespace(text):
            return None, "outside"
        return self._from_environ(pid), "seen"

    def _from_environ(self, pid: int) -> Owner | None:
        try:
            return parse_environ(read_regular(os.path.join(self.procfs_root, str(pid), "environ"), ENVIRON_LIMIT))
        except OSError:  # EACCES for another user's process unless root or CAP_SYS_PTRACE: expected
            return None

    # -- the cgroup tree, for PIDs /proc does not place --------------------------------------

    def _roots(self) -> list[tuple[str, str]]:
        """(directory, the hierarchy's root) of each scheduler subtree: v2 first, then one v1 hierarchy."""
        out: list[tuple[str, str]] = []
        hierarchies = [h for h in (self.cgroup_root, os.path.join(self.cgroup_root, "unified"))
                       if os.path.exists(os.path.join(h, "cgroup.controllers"))]
        for h in hierarchies:
            out += [(d, h) for d in self._scheduler_dirs(h)]
        for controller in V1_CONTROLLERS:
            h = os.path.join(self.cgroup_root, controller)
            found = [(d, h) for d in self._scheduler_dirs(h)]
            if found:
                out += found
                break
        return out

    @staticmethod
    def _subdirs(path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return sorted(e.name for e in itertools.islice(entries, MAX_ENTRIES) if e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def _scheduler_dirs(self, hierarchy: str) -> list[str]:
        """Where schedulers put their cgroups in this hierarchy: `slurm*/` and `kubepods/` at its root,
        and `*slurmstepd.scope` and `*kubepods.slice` in any slice reachable from the root through
        slices only (any `CgroupSlice`, any `--cgroup-root`), at most `MAX_SLICES` of them."""
        out, queue, looked = [], [""], 0
        while queue and looked <= MAX_SLICES:
            chain = queue.pop(0)
            looked += 1
            for name in self._subdirs(os.path.join(hierarchy, chain)):
                rel = os.path.join(chain, name)
                if (not chain and (name == "kubepods" or SLURM_V1_ROOT.fullmatch(name))) or KUBEPODS_SLICE.fullmatch(
                        name) or (chain and SLURM_SCOPE.fullmatch(name)):
                    out.append(os.path.join(hierarchy, rel))
                elif name.endswith(".slice") and rel.count("/") < MAX_SLICE_DEPTH - 1:
                    queue.append(rel)
        return out

    def _walk(self, wanted: set[int], problems: list[str]) -> dict[int, Owner | None]:
        """The owner of each wanted PID some scheduler subtree lists (None: in one, at no job's place)."""
        self.walks += 1
        found: dict[int, Owner | None] = {}
        visited, deadline = 0, time.monotonic() + WALK_SECONDS
        per_job: dict[str, int] = {}
        for top, hierarchy in self._roots():
            stack = [top]
            while stack and wanted - found.keys():
                path = stack.pop()
                owner = parse_cgroup_path("/" + os.path.relpath(path, hierarchy))
                if owner is not None:
                    per_job[owner.job_id] = per_job.get(owner.job_id, 0) + 1
                    if per_job[owner.job_id] > MAX_CGROUPS_PER_JOB:
                        if per_job[owner.job_id] == MAX_CGROUPS_PER_JOB + 1:
                            problems.append("cgroup_walk_job_truncated")
                        continue
                visited += 1
                if visited > MAX_CGROUPS:
                    problems.append("cgroup_walk_truncated")
                    return found
                if time.monotonic() > deadline:
                    problems.append("cgroup_walk_slow")
                    return found
                stack += [os.path.join(path, name) for name in self._subdirs(path)]
                try:
                    procs = parse_pids(read_regular(os.path.join(path, "cgroup.procs"), PROCS_LIMIT))
                except OSError:  # gone meanwhile (a job ended), or a directory without processes
                    continue
                hits = wanted & procs
                if hits:
                    found.update((pid, owner) for pid in hits)
        return found
