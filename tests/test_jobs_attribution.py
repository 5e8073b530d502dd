"""Which job holds each GPU (sources/jobs.py): real Slurm and Kubernetes cgroup layouts read from
fixture procfs and cgroupfs trees, the environment as a fallback, PIDs the agent cannot see, and
the whole path from a fake NVML process list to `stoker_gpu_job_info`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker.config import DetectConfig
from stoker.detect.goodput import GoodputLedger
from stoker.exporters import jobs as job_families
from stoker.exporters.exposition import render
from stoker.sim import jobs as sim_jobs
from stoker.sim import scenarios
from stoker.sim.drive import ManualClock
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.node import SimNode
from stoker.sources.gpu import GpuSource
from stoker.sources.jobs import JobSource, Owner, parse_cgroup_file

UID = "3f2b8c1e-5d7a-4c9e-9a61-3c1f2e4d5b6a"
CID = "4b1f9e0c2a7d48e1b6c3a5f7d9e2b4c6a8f0e1d3c5b7a9f2e4d6c8b0a1f3e5d7"
STATIC_UID = "6a1f0c9d3e8b27f45c0d1e2f3a4b5c6d"  # kubelet's static pod: hex.EncodeToString(md5) of the manifest
SLUID = "sEKNKTV3WPV500"  # the example in Slurm's doc/man/man5/cgroup.conf.5 (CgroupJobIdPaths)

# /proc/<pid>/cgroup as each layout writes it (trimmed only of controllers that name no job)
CGROUP_FILES = {
    "slurm-v1": ("""12:pids:/system.slice/slurmd.service
11:hugetlb:/
10:memory:/slurm/uid_1001/job_4242/step_0/task_0
9:devices:/slurm/uid_1001/job_4242/step_0
8:cpuset:/slurm/uid_1001/job_4242/step_0
7:freezer:/slurm/uid_1001/job_4242/step_0
6:net_cls,net_prio:/
5:perf_event:/
4:blkio:/system.slice/slurmd.service
3:cpu,cpuacct:/system.slice/slurmd.service
2:rdma:/
1:name=systemd:/system.slice/slurmd.service
""", Owner("4242", "slurm", "cgroup")),
    "slurm-v1-several-slurmd": ("""10:memory:/slurm_node017/uid_1001/job_4245/step_1/task_2
1:name=systemd:/system.slice/slurmd@node017.service
""", Owner("4245", "slurm", "cgroup")),
    "slurm-v2": ("0::/system.slice/slurmstepd.scope/job_4343/step_0/user/task_0\n", Owner("4343", "slurm", "cgroup")),
    "slurm-v2-batch-several-slurmd": ("0::/system.slice/node017_slurmstepd.scope/job_4344/step_batch/user/task_0\n",
                                      Owner("4344", "slurm", "cgroup")),
    "k8s-systemd-v2": (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
                       f".slice/cri-containerd-{CID}.scope\n", Owner(UID, "kubernetes", "cgroup")),
    "k8s-systemd-v2-guaranteed": (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/"
                                  f"cri-containerd-{CID}.scope\n", Owner(UID, "kubernetes", "cgroup")),
    "k8s-systemd-v1-docker": (f"""12:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope
11:devices:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope
1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope
""", Owner(UID, "kubernetes", "cgroup")),
    "k8s-cgroupfs-v1": (f"""11:memory:/kubepods/burstable/pod{UID}/{CID}
10:cpuset:/kubepods/burstable/pod{UID}/{CID}
4:pids:/kubepods/burstable/pod{UID}/{CID}
1:name=systemd:/kubepods/burstable/pod{UID}/{CID}
""", Owner(UID, "kubernetes", "cgroup")),
    "k8s-cgroupfs-v2-guaranteed": (f"0::/kubepods/pod{UID}/{CID}\n", Owner(UID, "kubernetes", "cgroup")),
    "k8s-kind-kubelet-in-container": (
        f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod"
        f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n", Owner(UID, "kubernetes", "cgroup")),
    # Slurm 26.05 (src/plugins/cgroup/v2/cgroup_v2.c, cgroup_p_step_create): the job's cgroup is its SLUID
    # (src/common/sluid.c print_sluid) unless cgroup.conf has CgroupJobIdPaths=yes (26.05.2)
    "slurm-v2-26.05-sluid": (f"0::/system.slice/slurmstepd.scope/{SLUID}/step_0/user/task_0\n",
                             Owner(SLUID, "slurm", "cgroup")),
    "slurm-v2-26.05-sluid-several-slurmd": (f"0::/system.slice/node017_slurmstepd.scope/{SLUID}/step_extern/user/"
                                            "task_special\n", Owner(SLUID, "slurm", "cgroup")),
    # Slurm 25.11 cgroup.conf CgroupSlice=: _set_int_cg_ns() puts the scope in that slice, where systemd puts it
    "slurm-v2-25.11-cgroupslice": ("0::/slurm.slice/slurmstepd.scope/job_4346/step_0/user/task_0\n",
                                   Owner("4346", "slurm", "cgroup")),
    "slurm-v2-25.11-nested-cgroupslice": ("0::/hpc.slice/hpc-jobs.slice/node017_slurmstepd.scope/job_4347/step_1/user/"
                                          "task_0\n", Owner("4347", "slurm", "cgroup")),
    # kubelet pkg/kubelet/config/common.go applyDefaults: a static pod's UID is the manifest's md5 in hex
    "k8s-static-pod-systemd-v2": (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{STATIC_UID}"
                                  f".slice/cri-containerd-{CID}.scope\n", Owner(STATIC_UID, "kubernetes", "cgroup")),
    "k8s-static-pod-cgroupfs-v1": (f"4:pids:/kubepods/burstable/pod{STATIC_UID}/{CID}\n",
                                   Owner(STATIC_UID, "kubernetes", "cgroup")),
    # cri-o: crio-<id>.scope (systemd), crio-<id> (cgroupfs), its monitor in crio-conmon-<id>.scope
    "k8s-crio-systemd-v2": (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
                            f".slice/crio-{CID}.scope\n", Owner(UID, "kubernetes", "cgroup")),
    "k8s-crio-conmon": (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-conmon-{CID}.scope\n",
                        Owner(UID, "kubernetes", "cgroup")),
    "k8s-crio-cgroupfs-v2": (f"0::/kubepods/besteffort/pod{UID}/crio-{CID}\n", Owner(UID, "kubernetes", "cgroup")),
    # the agent in a container with its own cgroup namespace (hostPID): the kernel shows other processes'
    # cgroups relative to it (linux Documentation/admin-guide/cgroup-v2.rst, "Namespace"); slices anchor them
    "slurm-v2-seen-from-a-cgroup-namespace": ("0::/../../../../system.slice/slurmstepd.scope/job_4343/step_0/user/"
                                              "task_0\n", Owner("4343", "slurm", "cgroup")),
    "k8s-systemd-seen-from-a-cgroup-namespace": (f"0::/../../../kubepods-pod{UID.replace('-', '_')}.slice/"
                                                 f"cri-containerd-{CID}.scope\n", Owner(UID, "kubernetes", "cgroup")),
    "k8s-cgroupfs-seen-from-a-cgroup-namespace": (f"0::/../../../pod{UID}/{CID}\n", None),  # the walk places it
    # scheduler-like names where no scheduler puts them (issue 25): a user's delegated systemd, a container,
    # a job's own cgroup (cgroup v1 step cgroups belong to the job's user: src/plugins/cgroup/v1/xcgroup.c)
    "spoof-user-delegated-slurm": ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x_slurmstepd.scope/"
                                   "job_4242/step_0\n", None),
    "spoof-user-delegated-pod": (f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods.slice/"
                                 f"kubepods-pod{UID.replace('-', '_')}.slice/x.scope\n", None),
    "spoof-inside-a-container": ("0::/system.slice/docker-" + CID + ".scope/system.slice/slurmstepd.scope/job_4242/"
                                 "step_0\n", None),
    "spoof-pod-slice-out-of-place": (f"0::/system.slice/kubepods-pod{UID.replace('-', '_')}.slice/x.scope\n", None),
    "spoof-pod-below-a-slurm-job": (f"4:pids:/slurm/uid_1001/job_4242/step_0/kubepods/pod{UID}/x\n",
                                    Owner("4242", "slurm", "cgroup")),
    "spoof-job-below-a-job": ("0::/system.slice/slurmstepd.scope/job_4343/step_0/user/task_0/job_4242\n",
                              Owner("4343", "slurm", "cgroup")),
    "slurmstepd-itself": ("0::/system.slice/slurmstepd.scope/system\n", None),
    "login-session": ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
    "docker-not-kubernetes": (f"0::/system.slice/docker-{CID}.scope\n", None),
    "job-dir-not-slurm": ("0::/system.slice/batch.service/job_1/worker\n", None),
}


@pytest.mark.parametrize("layout", CGROUP_FILES)
def test_cgroup_file_layouts(layout):
    text, owner = CGROUP_FILES[layout]
    assert parse_cgroup_file(text) == owner


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


def test_procfs_each_pid_from_its_cgroup_else_its_environment(tmp_path):
    files = {f"proc/{1000 + i}/cgroup": text for i, (text, _) in enumerate(CGROUP_FILES.values())}
    files["proc/2000/cgroup"] = CGROUP_FILES["login-session"][0]  # srun without task/cgroup: the environment says
    files["proc/2000/environ"] = b"HOME=/home/a\0SLURM_JOB_ID=777\0SLURM_LOCALID=0\0"
    files["proc/2001/cgroup"] = CGROUP_FILES["login-session"][0]
    files["proc/2001/environ"] = b"STOKER_JOB_ID=notebook-7\0"
    files["proc/2002/cgroup"] = CGROUP_FILES["login-session"][0]
    files["proc/2002/environ"] = b"SLURM_JOB_ID=$(rm -rf)\0"  # not a job id
    write(tmp_path, files)
    source = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys"))
    snap = source.resolve([*(1000 + i for i in range(len(CGROUP_FILES))), 2000, 2001, 2002])
    for i, (_, owner) in enumerate(CGROUP_FILES.values()):
        assert snap.owners[1000 + i] == owner
    assert snap.owners[2000] == Owner("777", "slurm", "environ")
    assert snap.owners[2001] == Owner("notebook-7", "none", "environ")
    assert snap.owners[2002] is None
    assert snap.hidden == frozenset() and snap.problems == []


def test_an_unreadable_environment_is_no_owner_not_an_error(tmp_path):
    """Another user's environ is EACCES for an unprivileged agent (root reads it: chmod cannot make
    it fail here), so the file is simply absent in this fixture."""
    write(tmp_path, {"proc/3000/cgroup": CGROUP_FILES["login-session"][0]})
    snap = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve([3000])
    assert snap.owners == {3000: None} and snap.problems == []


# cgroupfs as each layout lays it out: what the agent reads when /proc/<pid> is hidden from it
CGROUP_TREES = {
    "slurm-v2": ({
        "fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        "fs/cgroup/system.slice/slurmd.service/cgroup.procs": "812\n",
        "fs/cgroup/system.slice/slurmstepd.scope/system/cgroup.procs": "1801\n",
        "fs/cgroup/system.slice/slurmstepd.scope/job_4343/cgroup.procs": "",
        "fs/cgroup/system.slice/slurmstepd.scope/job_4343/step_extern/user/task_special/cgroup.procs": "7000\n",
        "fs/cgroup/system.slice/slurmstepd.scope/job_4343/step_0/slurm/cgroup.procs": "7010\n",
        "fs/cgroup/system.slice/slurmstepd.scope/job_4343/step_0/user/task_0/cgroup.procs": "7001\n",
        "fs/cgroup/system.slice/slurmstepd.scope/job_4343/step_0/user/task_1/cgroup.procs": "7002\n",
        "fs/cgroup/user.slice/user-1000.slice/session-3.scope/cgroup.procs": "7003\n",
    }, {7001: "4343", 7002: "4343", 7003: None}, "slurm"),
    "slurm-v1": ({
        "fs/cgroup/freezer/slurm/uid_1001/job_4242/step_0/cgroup.procs": "7101\n7102\n",
        "fs/cgroup/freezer/slurm/uid_1001/job_4242/step_batch/cgroup.procs": "7100\n",
        "fs/cgroup/memory/slurm/uid_1001/job_4242/step_0/task_0/cgroup.procs": "7101\n",
        "fs/cgroup/memory/slurm/uid_1001/job_4242/step_0/task_1/cgroup.procs": "7102\n",
        "fs/cgroup/memory/user.slice/cgroup.procs": "7103\n",
    }, {7101: "4242", 7102: "4242", 7103: None}, "slurm"),
    "k8s-systemd-v2": ({
        "fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        "fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope/cgroup.procs": "7201\n7202\n",
        "fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{UID.replace('-', '_')}.slice/cri-containerd-{'e' * 64}.scope/cgroup.procs": "7200\n",  # the pause container
        "fs/cgroup/system.slice/containerd.service/cgroup.procs": "7203\n",
    }, {7201: UID, 7202: UID, 7203: None}, "kubernetes"),
    "k8s-cgroupfs-v1": ({
        f"fs/cgroup/pids/kubepods/burstable/pod{UID}/{CID}/cgroup.procs": "7301\n",
        f"fs/cgroup/pids/kubepods/pod{'0' * 8}-1111-2222-3333-444444444444/{CID}/cgroup.procs": "7302\n",
        "fs/cgroup/pids/system.slice/cgroup.procs": "7303\n",
    }, {7301: UID, 7302: "00000000-1111-2222-3333-444444444444", 7303: None}, "kubernetes"),
    # Slurm 26.05: the job's cgroup named by its SLUID (cgroup_v2.c cgroup_p_step_create)
    "slurm-v2-26.05-sluid": ({
        "fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        "fs/cgroup/system.slice/slurmstepd.scope/system/cgroup.procs": "1801\n",
        f"fs/cgroup/system.slice/slurmstepd.scope/{SLUID}/step_0/slurm/cgroup.procs": "7410\n",
        f"fs/cgroup/system.slice/slurmstepd.scope/{SLUID}/step_0/user/task_0/cgroup.procs": "7401\n",
        f"fs/cgroup/system.slice/slurmstepd.scope/{SLUID}/step_0/user/task_1/cgroup.procs": "7402\n",
    }, {7401: SLUID, 7402: SLUID}, "slurm"),
    # Slurm 25.11 cgroup.conf CgroupSlice=hpc-jobs.slice: systemd puts the scope at /hpc.slice/hpc-jobs.slice/;
    # a user's delegated systemd (user@.service, Delegate=yes: systemd.resource-control(5)) may make any name
    "slurm-v2-25.11-cgroupslice": ({
        "fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        "fs/cgroup/system.slice/slurmd.service/cgroup.procs": "812\n",
        "fs/cgroup/hpc.slice/hpc-jobs.slice/node017_slurmstepd.scope/job_4348/step_0/user/task_0/cgroup.procs":
            "7501\n",
        "fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/x_slurmstepd.scope/job_4242/step_0/"
        "cgroup.procs": "7502\n",
        f"fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods.slice/kubepods-pod"
        f"{UID.replace('-', '_')}.slice/cgroup.procs": "7503\n",
    }, {7501: "4348", 7502: None, 7503: None}, "slurm"),
    # kubelet pkg/kubelet/config/common.go: a static pod's UID is 32 hex digits; --cgroup-root=/kubelet
    # (kind) puts kubepods at /kubelet.slice/kubelet-kubepods.slice (pkg/kubelet/cm CgroupName.ToSystemd)
    "k8s-static-pod-cgroup-root": ({
        "fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        f"fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-"
        f"besteffort-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope/cgroup.procs": "7601\n",
        f"fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID.replace('-', '_')}.slice/"
        f"crio-{CID}.scope/cgroup.procs": "7602\n",
    }, {7601: STATIC_UID, 7602: UID}, "kubernetes"),
}


@pytest.mark.parametrize("layout", CGROUP_TREES)
def test_hidden_pids_are_found_in_the_scheduler_cgroup_tree(tmp_path, layout):
    """ProtectProc=invisible: /proc/<pid> of another user's process does not exist for the agent;
    the scheduler's cgroups list it all the same."""
    tree, expected, scheduler = CGROUP_TREES[layout]
    write(tmp_path / "sys", tree)
    (tmp_path / "proc").mkdir()
    source = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys"))
    snap = source.resolve(expected)
    got = {pid: None if o is None else o.job_id for pid, o in snap.owners.items()}
    assert got == expected
    assert {o.scheduler for o in snap.owners.values() if o} == {scheduler}
    assert snap.hidden == frozenset(expected) and source.walks == 1


def test_a_cgroupfs_pod_seen_from_another_cgroup_namespace_is_placed_by_the_walk(tmp_path):
    """The agent in a container with hostPID and its own cgroup namespace reads `0::/../../../pod<uid>/<id>`
    (linux Documentation/admin-guide/cgroup-v2.rst, "Namespace"): kubelet's cgroupfs names are plain and
    say nothing of where they stand, so the host's cgroupfs (a hostPath mount) places the PID."""
    write(tmp_path, {"proc/8001/cgroup": f"0::/../../../pod{UID}/{CID}\n",
                     "proc/8001/environ": b"SLURM_JOB_ID=4242\0",  # not read: the walk answers
                     "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
                     f"sys/fs/cgroup/kubepods/burstable/pod{UID}/{CID}/cgroup.procs": "8001\n"})
    snap = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve([8001])
    assert snap.owners == {8001: Owner(UID, "kubernetes", "cgroup")} and snap.hidden == frozenset()


def test_a_pid_is_read_once_and_one_not_placed_is_retried_with_backoff(tmp_path):
    tree = CGROUP_TREES["slurm-v2"][0]
    write(tmp_path / "sys", tree)
    (tmp_path / "proc").mkdir()
    clock = ManualClock(0.0)
    source = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys"), clock=clock)
    source.resolve([7001, 7003])
    assert source.walks == 1 and not source.due([7001])
    assert not source.due([7001, 7003])  # 7003 (in no job) waits a second before another try
    clock.advance(1.0)
    assert source.due([7003])
    source.resolve([7001, 7003])
    assert source.walks == 2
    clock.advance(1.0)
    assert not source.due([7003])  # then two seconds, four, ... a minute
    clock.advance(1.0)
    assert source.due([7003])
    snap = source.resolve([7002])  # 7001 and 7003 are gone from the GPUs: forgotten
    assert set(snap.owners) == {7002} and snap.owners[7002].job_id == "4343"


def test_a_pid_of_4300_digits_in_cgroup_procs_costs_only_its_own_line(tmp_path):
    """Issue 25 item 8: `cgroup.procs` lists one decimal PID a line (linux Documentation/admin-guide/
    cgroup-v2.rst); a PID has at most 7 digits (PID_MAX_LIMIT, include/linux/threads.h). A line of 4,300
    digits made int() raise (Python's limit on digits) and failed the lookup of every PID, every tick."""
    write(tmp_path / "sys", {
        "fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        "fs/cgroup/system.slice/slurmstepd.scope/job_4343/step_0/user/task_0/cgroup.procs":
            "9" * 4300 + "\n7001\n\x00\n-5\n0\n4194305\n+7\n٣\n",
        "fs/cgroup/system.slice/slurmstepd.scope/job_4343/step_0/user/task_1/cgroup.procs": "7002\n",
    })
    (tmp_path / "proc").mkdir()
    snap = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve([7001, 7002, 4194305])
    assert {pid: o and o.job_id for pid, o in snap.owners.items()} == {7001: "4343", 7002: "4343", 4194305: None}
    from stoker.sources.jobs import parse_pids
    assert parse_pids(b"1\n" + b"9" * 4300 + b"\n4194304\n4194305\n0\n12345678\nx\n") == {1, 4194304}


def test_a_walk_stops_at_its_time_and_entry_bounds(tmp_path, monkeypatch):
    """Each directory is read for at most MAX_ENTRIES entries and the walk stops after WALK_SECONDS."""
    from stoker.sources import jobs
    tree = {"fs/cgroup/cgroup.controllers": "",
            **{f"fs/cgroup/kubepods/pod{i:08x}-0000-0000-0000-000000000000/cgroup.procs": f"{9000 + i}\n"
               for i in range(30)}}
    write(tmp_path / "sys", tree)
    (tmp_path / "proc").mkdir()
    monkeypatch.setattr(jobs, "MAX_ENTRIES", 10)  # entries of /kubepods read: 10 of 30, then no more
    snap = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve(range(9000, 9030))
    assert sum(o is not None for o in snap.owners.values()) == 10
    monkeypatch.setattr(jobs, "MAX_ENTRIES", 4096)
    monkeypatch.setattr(jobs, "WALK_SECONDS", -1.0)
    snap = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve([9000])
    assert snap.owners == {9000: None} and snap.problems == ["cgroup_walk_slow"]


def test_a_huge_cgroup_tree_is_walked_within_a_bound(tmp_path, monkeypatch):
    from stoker.sources import jobs
    monkeypatch.setattr(jobs, "MAX_CGROUPS", 20)
    write(tmp_path / "sys", {"fs/cgroup/cgroup.controllers": "",
                             **{f"fs/cgroup/kubepods.slice/pod-{i}/cgroup.procs": f"{9000 + i}\n" for i in range(50)}})
    (tmp_path / "proc").mkdir()
    snap = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve([1])
    assert snap.owners == {1: None} and snap.problems == ["cgroup_walk_truncated"]


def info_samples(ledger: GoodputLedger) -> list[dict]:
    body = render(job_families.families(ledger)).decode()
    fam = next(f for f in text_string_to_metric_families(body) if f.name == "stoker_gpu_job_info")
    return [s.labels for s in fam.samples]


@pytest.mark.parametrize("scheduler", ["slurm", "kubernetes"])
def test_from_a_fake_nvml_process_list_to_the_info_metric(tmp_path, scheduler):
    """NVML's compute PIDs (the fake returns one rank per GPU) looked up in the simulated procfs."""
    clock = ManualClock(0.0)
    scenario = scenarios.parse(f'[[steps]]\ngpu = "saturated"\nseconds = 60\njob = "llama70b"\n'
                               f'scheduler = "{scheduler}"\n', "one-job")
    node = SimNode(scenario, clock=clock)
    sim_jobs.SimJobs(node, str(tmp_path / "proc")).build()
    gpu = GpuSource(FakeNVML(node), clock=clock, wall=clock)
    try:
        clock.advance(1.0)
        snapshot = gpu.sample()
    finally:
        gpu.close()
    pids = [p for g in snapshot.gpus for p in g.pids]
    assert len(pids) == 8
    owners = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve(pids)
    ledger = GoodputLedger(DetectConfig(), clock)
    ledger.tick(clock(), snapshot, owners, None, {})
    expected = sim_jobs.job_id("llama70b", scheduler)
    samples = info_samples(ledger)
    assert [s["gpu"] for s in samples] == [str(i) for i in range(8)]
    assert {(s["job_id"], s["scheduler"], s["source"]) for s in samples} == {(expected, scheduler, "cgroup")}
    assert all(s["uuid"].startswith("GPU-") for s in samples)
    assert "job" not in samples[0]  # Prometheus would rename it exported_job


def test_gpus_whose_processes_nobody_can_place_are_held_by_an_unknown_job(tmp_path):
    clock = ManualClock(0.0)
    node = SimNode(scenarios.parse('[[steps]]\ngpu = "saturated"\nseconds = 60\njob = "x"\n', "x"), clock=clock)
    gpu = GpuSource(FakeNVML(node), clock=clock, wall=clock)  # no procfs entries: hidden, or another namespace
    try:
        clock.advance(1.0)
        snapshot = gpu.sample()
    finally:
        gpu.close()
    os.makedirs(tmp_path / "proc")
    owners = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve(p for g in snapshot.gpus for p in g.pids)
    assert owners.hidden == frozenset(p for g in snapshot.gpus for p in g.pids)
    ledger = GoodputLedger(DetectConfig(), clock)
    ledger.tick(clock(), snapshot, owners, None, {})
    assert {(s["job_id"], s["scheduler"], s["source"]) for s in info_samples(ledger)} == {("unknown", "none", "none")}


async def test_a_hung_lookup_fails_alone_and_the_verdicts_go_on():
    """An environ read blocked behind a process stuck on a hung NFS mount: the verdict cycle waits
    at most the deadline once, then not at all, and takes the owners when the read comes back."""
    import asyncio
    import threading
    import time

    from stoker.agent.jobs import JobAttributor
    from stoker.agent.verdicts import VerdictCollector
    from stoker.config import CheckpointConfig
    from stoker.detect.view import NodeView
    from stoker.sources.gpu import GpuSample, GpuSnapshot
    from stoker.sources.jobs import JobSnapshot

    class Stuck:
        def __init__(self):
            self.release = threading.Event()

        def due(self, pids):
            return True

        def resolve(self, pids):
            self.release.wait(10)
            return JobSnapshot({p: Owner("4242", "slurm", "cgroup") for p in pids})

    source = Stuck()
    gpu = GpuSnapshot([GpuSample(i, f"GPU-{i}", processes=1, pids=(100 + i,), memory_used_bytes=50e9)
                       for i in range(8)])
    attributor = JobAttributor(source, timeout=0.2)
    verdicts = VerdictCollector(1.0, DetectConfig(), CheckpointConfig(), view=lambda t: NodeView(t, gpu=gpu),
                                jobs=attributor)
    try:
        started = time.monotonic()
        await verdicts.cycle()
        await verdicts.cycle()
        assert time.monotonic() - started < 0.6  # the deadline once, then "hung" at once
        assert {b.job_id for bs in verdicts.goodput.gpus.values() for b in bs} == {"unknown"}
        source.release.set()
        await asyncio.sleep(0.1)
        await verdicts.cycle()
        assert {b.job_id for bs in verdicts.goodput.gpus.values() for b in bs} == {"4242"}
    finally:
        source.release.set()
        await verdicts.close()


# -- claims: what a process can make the agent say about GPUs (issue 25 item 5) ------------------

SPOOF_CGROUP = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/x_slurmstepd.scope/job_4242/step_0\n"


def slurm_rank(i: int, job: str = "4343") -> dict[str, str | bytes]:
    """A rank as slurmstepd starts it: in its task cgroup (cgroup_v2.c), SLURM_JOB_ID set (src/common/env.c)."""
    return {f"proc/{100 + i}/cgroup": f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_{i}\n",
            f"proc/{100 + i}/environ": f"SLURM_JOB_ID={job}\0SLURM_LOCALID={i}\0".encode()}


def account(tmp_path, files: dict, gpu_pids: dict[int, tuple[int, ...]]) -> GoodputLedger:
    """The PIDs looked up in the fixture procfs (as root or hostPID: every environ readable) and bound."""
    from stoker.sources.gpu import GpuSample, GpuSnapshot
    write(tmp_path, files)
    gpu = GpuSnapshot([GpuSample(i, f"GPU-{i}", processes=len(p), pids=p, memory_used_bytes=50e9)
                       for i, p in gpu_pids.items()])
    owners = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve(p for ps in gpu_pids.values() for p in ps)
    ledger = GoodputLedger(DetectConfig(), ManualClock(0.0))
    ledger.tick(0.0, gpu, owners, None, {})
    return ledger


def held(ledger: GoodputLedger) -> dict[str, set]:
    out: dict[str, set] = {}
    for s in info_samples(ledger):
        out.setdefault(s["gpu"], set()).add((s["job_id"], s["source"]))
    return out


def test_one_spoofed_process_on_every_gpu_relabels_none_of_them(tmp_path):
    """A user's process with contexts on all eight GPUs (as a process that touches every device has),
    in a cgroup its own delegated systemd made with a Slurm-like name (user@.service has Delegate=yes:
    systemd.resource-control(5)), and SLURM_JOB_ID=4242 in its environment. Before: every GPU showed job
    4242 too, and every rank's PID was taken for 4242's, so rank 0's step hints counted for 4242."""
    from stoker.detect.goodput import StepRecord
    files = {k: v for i in range(8) for k, v in slurm_rank(i).items()}
    files |= {"proc/900/cgroup": SPOOF_CGROUP, "proc/900/environ": b"SLURM_JOB_ID=4242\0"}
    ledger = account(tmp_path, files, {i: (100 + i, 900) for i in range(8)})
    assert held(ledger) == {str(i): {("4343", "cgroup")} for i in range(8)}
    assert set(ledger.jobs) == {"4343"} and ledger.jobs["4343"].pids == frozenset(range(100, 108))
    assert ledger.record_steps([StepRecord(1)], pid=100)[0] == "4343"


def test_an_environment_cannot_join_a_job_its_scheduler_places_on_the_node(tmp_path):
    """Job 4343's ranks are in its cgroup on GPUs 0-6; a process outside it says SLURM_JOB_ID=4343 on GPU 7.
    A real member would be in the job's cgroup (slurmstepd puts every task there; pam_slurm_adopt the
    processes that ssh in), so GPU 7 is not 4343's: it is held by an unknown job."""
    files = {k: v for i in range(7) for k, v in slurm_rank(i).items()}
    files |= {"proc/107/cgroup": "0::/user.slice/user-1000.slice/session-3.scope\n",
              "proc/107/environ": b"SLURM_JOB_ID=4343\0"}
    ledger = account(tmp_path, files, {i: (100 + i,) for i in range(8)})
    assert held(ledger) == {**{str(i): {("4343", "cgroup")} for i in range(7)}, "7": {("unknown", "none")}}
    assert ledger.jobs["4343"].pids == frozenset(range(100, 107))


def test_an_environment_labels_only_its_own_gpus_and_its_own_process(tmp_path):
    """srun without task/cgroup: every rank in the login session, SLURM_JOB_ID=777 in each environment.
    Another process says 4242 on GPU 3: it labels GPU 3 (it holds a context there) and nothing else,
    and rank 3 stays 777's (before: rank 3's PID was taken for 4242's)."""
    from stoker.detect.goodput import StepRecord
    session = "0::/user.slice/user-1000.slice/session-3.scope\n"
    files = {f"proc/{100 + i}/cgroup": session for i in range(8)}
    files |= {f"proc/{100 + i}/environ": b"SLURM_JOB_ID=777\0" for i in range(8)}
    files |= {"proc/900/cgroup": session, "proc/900/environ": b"SLURM_JOB_ID=4242\0"}
    ledger = account(tmp_path, files, {i: (100 + i, 900) if i == 3 else (100 + i,) for i in range(8)})
    assert held(ledger) == {**{str(i): {("777", "environ")} for i in range(8)}, "3": {("777", "environ"),
                                                                                     ("4242", "environ")}}
    assert ledger.jobs["777"].pids == frozenset(range(100, 108)) and ledger.jobs["4242"].pids == {900}
    assert ledger.record_steps([StepRecord(1)], pid=103)[0] == "777"


def _jobs_seen(sim, clock: ManualClock) -> set[str]:
    """The job ids the agent's path (NVML's PIDs, their cgroups in the simulated procfs, the ledger's
    info metric) attributes the simulated node's GPUs to."""
    gpu = GpuSource(sim.platform().nvml, clock=clock, wall=clock)
    try:
        clock.advance(1.0)
        snapshot = gpu.sample()
    finally:
        gpu.close()
    owners = JobSource(sim.procfs_root, sim.sysfs_root).resolve(p for g in snapshot.gpus for p in g.pids)
    ledger = GoodputLedger(DetectConfig(), clock)
    ledger.tick(clock(), snapshot, owners, None, {})
    return {s["job_id"] for s in info_samples(ledger)}


@pytest.mark.parametrize("scheduler", ["slurm", "kubernetes"])
def test_simulated_nodes_side_by_side_run_jobs_of_their_own(tmp_path, scheduler):
    """Every simulated node reported Slurm job 3247075 (the id of the name "train"): a simulated fleet
    looked like one job across all its nodes. Two nodes started side by side on the same scenario now
    each run a job of their own, each attributed to one job on all of its 8 GPUs."""
    from stoker.sim.simulation import Simulation

    clock = ManualClock(0.0)
    scenario = scenarios.parse(f'scheduler = "{scheduler}"\n[[steps]]\ngpu = "saturated"\nseconds = 60\n', "fleet")
    a, b = (Simulation(scenario, str(tmp_path / n), clock=clock) for n in ("a", "b"))
    seen_a, seen_b = _jobs_seen(a, clock), _jobs_seen(b, clock)
    assert len(seen_a) == len(seen_b) == 1 and seen_a != seen_b
    assert seen_a == {sim_jobs.job_id(a.node.job_key("train"), scheduler)}
    assert sim_jobs.slurm_job_id("train") not in seen_a | seen_b


def test_a_scenario_that_shares_its_job_runs_it_on_every_node(tmp_path):
    """`shared_jobs = true`: one multi-node job, the same Slurm job id on every node (a job named by a
    number is that id, as docs/JOBS.md's `4242`)."""
    from stoker.sim.simulation import Simulation

    clock = ManualClock(0.0)
    scenario = scenarios.parse('shared_jobs = true\njob = "4242"\n[[steps]]\ngpu = "saturated"\nseconds = 60\n',
                               "one-job")
    nodes = [Simulation(scenario, str(tmp_path / n), clock=clock) for n in ("a", "b", "c")]
    assert [_jobs_seen(sim, clock) for sim in nodes] == [{"4242"}] * 3
    with pytest.raises(scenarios.ScenarioError, match="shared_jobs: expected true or false"):
        scenarios.parse('shared_jobs = "yes"\n[[steps]]\ngpu = "saturated"\nseconds = 1\n', "bad")
