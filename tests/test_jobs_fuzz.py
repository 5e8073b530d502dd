"""Fuzzing job attribution (sources/jobs.py): its parsers and its cgroup walk never raise, never place
a PID from a scheduler's name where no scheduler puts it, and a damaged line costs only itself.

Inputs are the real layouts (tests/test_jobs_attribution.py: Slurm's cgroup/v1 and v2 plugins,
kubelet's cgroup names, the kernel's cgroup.procs and environ formats) taken apart and mixed with
noise. Each run draws a new seed and prints it; a failure replays with the seed it prints:

    STOKER_FUZZ_SEED=<seed> .venv/bin/python -m pytest tests/test_jobs_fuzz.py

`STOKER_FUZZ_EXAMPLES=3000` explores further (as tests/test_fuzz.py does).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from stoker.sources.jobs import (JOB_ID, PID_MAX_LIMIT, JobSource, outside_namespace, parse_cgroup_file,
                                 parse_cgroup_path, parse_environ, parse_pids)

SEED = int(os.environ.get("STOKER_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
LONG = int(os.environ.get("STOKER_FUZZ_EXAMPLES", "0"))
HANG_SECONDS = 5.0  # one input; the parsers take microseconds, a walk of a small tree milliseconds

pytestmark = pytest.mark.timeout(0 if LONG else 120)


def budget(ci_examples: int):
    return settings(max_examples=LONG or ci_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(autouse=True)
def say_seed():
    print(f"job attribution fuzz seed {SEED} (replay: STOKER_FUZZ_SEED={SEED})")
    yield


UID = "3f2b8c1e-5d7a-4c9e-9a61-3c1f2e4d5b6a"
STATIC_UID = "6a1f0c9d3e8b27f45c0d1e2f3a4b5c6d"
CID = "4b1f9e0c2a7d48e1b6c3a5f7d9e2b4c6a8f0e1d3c5b7a9f2e4d6c8b0a1f3e5d7"
COMPONENTS = st.one_of(
    st.sampled_from([
        "system.slice", "slurmstepd.scope", "node017_slurmstepd.scope", "job_4343", "sEKNKTV3WPV500",
        "s0000000000000", "sZZZZZZZZZZZZZ", "job_", "job_99999999999", "step_0", "step_batch", "user", "task_0",
        "slurm", "slurm_node017", "uid_1000", "system", "kubepods", "burstable", "besteffort", "kubepods.slice",
        "kubepods-burstable.slice", "kubepods-besteffort.slice", f"kubepods-burstable-pod{UID.replace('-', '_')}.slice",
        f"kubepods-pod{STATIC_UID}.slice", f"kubelet-kubepods-pod{UID.replace('-', '_')}.slice", "kubelet.slice",
        "kubelet-kubepods.slice", f"pod{UID}", f"pod{STATIC_UID}", f"pod{UID.upper()}", "user.slice",
        "user-1000.slice", "user@1000.service", "app.slice", "session-3.scope", "hpc.slice", "hpc-jobs.slice",
        "-.slice", ".slice", "a--b.slice", f"cri-containerd-{CID}.scope", f"crio-{CID}.scope", f"docker-{CID}.scope",
        CID, "..", ".", "", " ", "\x00", "\ufffd", "é.slice"]),
    st.text(max_size=20))
PLAIN = st.from_regex(r"[a-z0-9_@.-]{1,12}", fullmatch=True).filter(lambda c: c not in (".", ".."))
DELEGATED = ["/user.slice/user-1000.slice/user@1000.service", "/user.slice/user-1000.slice/user@1000.service/app.slice",
             f"/system.slice/docker-{CID}.scope", "/system.slice/slurmd.service",
             f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"]
PLACED = {  # a job's own cgroup, and what owns whatever is below it
    "/system.slice/slurmstepd.scope/job_4343/step_0/user/task_0": "4343",
    "/slurm.slice/node017_slurmstepd.scope/sEKNKTV3WPV500/step_extern/user/task_special": "sEKNKTV3WPV500",
    "/slurm/uid_1001/job_4242/step_0/task_1": "4242",
    f"/kubepods/burstable/pod{UID}/{CID}": UID,
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{STATIC_UID}.slice/crio-{CID}.scope": STATIC_UID,
}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    assert time.perf_counter() - start < HANG_SECONDS, f"{fn.__name__} took over {HANG_SECONDS} s"
    return out


def sound(owner) -> None:
    if owner is not None:
        assert JOB_ID.fullmatch(owner.job_id) and owner.scheduler in ("slurm", "kubernetes", "none")
        assert owner.source in ("cgroup", "environ")


@seed(SEED)
@budget(600)
@given(st.lists(COMPONENTS, max_size=12), st.booleans())
def test_a_cgroup_path_is_read_without_raising(components, leading_slash):
    path = ("/" if leading_slash else "") + "/".join(components)
    note(f"seed {SEED}: {path!r}")
    owner = timed(parse_cgroup_path, path)
    sound(owner)
    assert owner is None or owner.source == "cgroup"


@seed(SEED)
@budget(400)
@given(st.sampled_from(DELEGATED), st.lists(COMPONENTS, max_size=10))
def test_no_name_below_a_delegated_unit_names_another_job(prefix, components):
    """Below a unit with Delegate=yes (systemd.resource-control(5)) its owner makes any name: what is
    there is the unit's own job (a pod's container is the pod's) or none, whatever the names say."""
    path = prefix + "/" + "/".join(components)
    note(f"seed {SEED}: {path!r}")
    owner = parse_cgroup_path(path)
    assert owner is None or owner == parse_cgroup_path(prefix)


@seed(SEED)
@budget(400)
@given(st.sampled_from(sorted(PLACED)), st.lists(st.one_of(COMPONENTS.filter(lambda c: c.strip("/.") and "/" not in c
                                                                              and c not in ("..", ".")), PLAIN),
                                                 max_size=8))
def test_whatever_is_below_a_jobs_cgroup_is_that_jobs(job_cgroup, components):
    """A job's user can make cgroups in its own (cgroup v1 step cgroups are its: slurm
    src/plugins/cgroup/v1/xcgroup.c): a job or pod name down there changes nothing."""
    path = job_cgroup + "".join("/" + c for c in components)
    note(f"seed {SEED}: {path!r}")
    owner = parse_cgroup_path(path)
    assert owner is not None and owner.job_id == PLACED[job_cgroup]


@seed(SEED)
@budget(300)
@given(st.lists(st.tuples(st.sampled_from(["0", "1", "4", "12", "", "x", "99999999999999999999"]),
                          st.sampled_from(["", "pids", "memory", "name=systemd", "cpu,cpuacct", ":"]),
                          st.lists(COMPONENTS, max_size=8)), max_size=14),
       st.sampled_from(["\n", "\r\n", ":", "\x00"]))
def test_a_proc_cgroup_file_is_read_without_raising(lines, separator):
    text = separator.join(f"{h}:{c}:/{'/'.join(p)}" for h, c, p in lines)
    note(f"seed {SEED}: {text!r}")
    sound(timed(parse_cgroup_file, text))
    assert timed(outside_namespace, text) in (True, False)


ENV_VALUES = st.one_of(st.sampled_from([b"4343", b"", b"0", b"9" * 5000, b"$(rm -rf /)", b"4343\n4242", b"\xff\xfe",
                                        b"notebook-7", b"a" * 200, b"=", b"4242=1"]), st.binary(max_size=40))


@seed(SEED)
@budget(300)
@given(st.lists(st.tuples(st.sampled_from([b"SLURM_JOB_ID", b"STOKER_JOB_ID", b"SLURM_JOB_SLUID", b"HOME", b"",
                                           b"SLURM_JOB_ID ", b"slurm_job_id"]), ENV_VALUES), max_size=10),
       st.binary(max_size=64))
def test_an_environment_is_read_without_raising(variables, tail):
    data = b"".join(k + b"=" + v + b"\0" for k, v in variables) + tail
    note(f"seed {SEED}: {data[:200]!r}")
    owner = timed(parse_environ, data)
    sound(owner)
    if owner is not None and owner.scheduler == "slurm":
        assert owner.job_id.isdigit()


JUNK = st.one_of(st.sampled_from([b"0", b"-1", b"+7", b"4194305", b"12345678", b"9" * 4300, b"9" * 4301, b"0x10",
                                  "\u0663".encode(), b"\x00", b"7.0", b"1e3"]),
                 st.from_regex(rb"[0-9]{8,6000}", fullmatch=True),
                 st.binary(max_size=12).filter(lambda b: not b.strip().isdigit()))


@seed(SEED)
@budget(300)
@given(st.lists(st.integers(1, PID_MAX_LIMIT), max_size=40), st.lists(JUNK, max_size=20), st.randoms(use_true_random=False))
def test_cgroup_procs_gives_each_good_pid_whatever_else_it_holds(pids, junk, rnd):
    """A damaged line costs only itself: the good PIDs around it are all read, nothing else is."""
    lines = [str(p).encode() for p in pids] + junk
    rnd.shuffle(lines)
    data = b"\n".join(lines) + b"\n"
    note(f"seed {SEED}: {data[:300]!r}")
    got = timed(parse_pids, data)
    assert set(pids) <= got and all(0 < p <= PID_MAX_LIMIT for p in got)
    assert got <= set(pids) | {int(t) for line in junk for t in line.split() if t.isdigit() and len(t) <= 7}


@seed(SEED)
@budget(60)
@given(st.lists(st.tuples(st.lists(COMPONENTS.filter(lambda c: c.strip("/.") and "/" not in c and "\x00" not in c),
                                   min_size=1, max_size=6),
                          st.one_of(st.binary(max_size=40), st.lists(st.integers(1, 40), max_size=4).map(
                              lambda ps: b"".join(b"%d\n" % (7000 + p) for p in ps)))), max_size=12),
       st.dictionaries(st.integers(1, 40), st.tuples(st.lists(COMPONENTS, max_size=8), st.binary(max_size=60)),
                       max_size=6),
       st.booleans())
def test_the_lookup_over_a_damaged_tree_places_or_leaves_each_pid(cgroups, procs, v2):
    """A cgroupfs and a procfs of random names and contents: every PID asked about gets an owner or
    None, within the bounds, and nothing escapes."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / ("sys/fs/cgroup" if v2 else "sys/fs/cgroup/freezer")
        base.mkdir(parents=True)
        if v2:
            (base / "cgroup.controllers").write_text("cpu memory pids\n")
        for components, content in cgroups:
            d = base.joinpath(*components)
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / "cgroup.procs").write_bytes(content)
            except OSError:  # a name the file system refuses (too long, a file already there)
                continue
        for pid, (components, environ) in procs.items():
            d = Path(tmp) / "proc" / str(7000 + pid)
            d.mkdir(parents=True, exist_ok=True)
            (d / "cgroup").write_text(f"0::/{'/'.join(components)}\n", errors="surrogateescape")
            (d / "environ").write_bytes(environ)
        (Path(tmp) / "proc").mkdir(exist_ok=True)
        note(f"seed {SEED}")
        asked = range(7001, 7041)
        snap = timed(JobSource(str(Path(tmp) / "proc"), str(Path(tmp) / "sys")).resolve, asked)
        assert set(snap.owners) == set(asked)
        for owner in snap.owners.values():
            sound(owner)
        assert set(snap.problems) <= {"cgroup_walk_truncated", "cgroup_walk_slow", "cgroup_walk_job_truncated"}
