"""The GPU source on the drivers and nvidia-ml-py releases of real nodes: older branches, MIG, MPS, a driver
upgraded in place. The fake NVML answers as each driver branch does (stoker/sim/drivers.py names the
sources); each test names the source of the behaviour it drives."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pynvml as N
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from stoker import config
from stoker.agent.platform import Platform
from stoker.agent.runtime import Agent
from stoker.exporters import gpu as gpu_families
from stoker.exporters.exposition import render
from stoker.sim import scenarios
from stoker.sim.fake_nvml import JOB_INSTANCE, MIG_INSTANCES, MPS_SERVER_PID, FakeNVML
from stoker.sim.node import SimNode, job_pid
from stoker.sources.gpu import GpuSource, LibraryDown
from tests.contract import contract
from tests.test_gpu_source import wait_for

ROOT = Path(__file__).resolve().parent.parent


def source_on(fake, clock, slow_interval: float = 10.0) -> GpuSource:
    return GpuSource(fake, slow_interval=slow_interval, clock=clock, wall=clock)


def ticks(source, clock, n: int, seconds: float = 1.0):
    out = []
    for _ in range(n):
        clock.advance(seconds)
        out.append(source.sample())
    return out


def node(clock, text: str = "", name: str = "case") -> SimNode:
    """A simulated node playing `healthy`'s saturated phase, with these top-level scenario keys."""
    return SimNode(scenarios.parse(text + '\n[[steps]]\ngpu = "saturated"\nseconds = 600\n', name), clock=clock)


# -- nvidia-ml-py releases ------------------------------------------------------------------------------------

def test_the_source_imports_on_a_pynvml_without_the_names_added_after_r535():
    """nvidia-ml-py 12.535.x has no NVML_FI_DEV_PCIE_COUNT_TX_BYTES/RX_BYTES nor NVML_ERROR_GPU_NOT_FOUND,
    12.550.x not the fields (their pynvml.py; NVML change log: the fields came with v555, the error with
    v545): `stoker run` died at import with an AttributeError. Here on whatever pynvml runs the tests, less
    those names."""
    code = ("import pynvml\n"
            "for name in ('NVML_FI_DEV_PCIE_COUNT_TX_BYTES', 'NVML_FI_DEV_PCIE_COUNT_RX_BYTES',"
            " 'NVML_ERROR_GPU_NOT_FOUND'):\n"
            "    if hasattr(pynvml, name): delattr(pynvml, name)\n"
            "from stoker.sources import gpu\n"
            "print(gpu.NO_GPM_FIELDS, gpu.ERROR_GPU_NOT_FOUND)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["{'pcie_tx':", "197,", "'pcie_rx':", "198}", "28"]


def test_the_pin_names_the_lowest_release_that_works_and_the_lowest_venv_runs_it():
    """pyproject.toml's nvidia-ml-py pin; scripts/test.sh runs this file again in .venv-lowest, on exactly that
    release (STOKER_LOWEST_NVML=1)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    lowest = re.search(r'"nvidia-ml-py>=([0-9.]+)"', pyproject).group(1)
    installed = metadata.version("nvidia-ml-py")
    as_tuple = [tuple(int(x) for x in v.split(".")) for v in (installed, lowest)]
    assert as_tuple[0] >= as_tuple[1]
    if os.environ.get("STOKER_LOWEST_NVML"):
        assert installed == lowest


class _ProcessInfoV2(ctypes.Structure):
    """nvmlProcessInfo_v2_t, which nvmlDeviceGetComputeRunningProcesses_v3 fills (nvml.h of NVML 12.2.140, the
    R535 branch, and every header since: `} nvmlProcessInfo_v2_t, nvmlProcessInfo_t;`)."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


def test_the_pinned_pynvml_reads_the_drivers_process_entries(monkeypatch):
    """Why the pin is 12.535.108, not 12.535.77: 12.535.77's c_nvmlProcessInfo_t has a fifth field
    (usedGpuCcProtectedMemory, 32 bytes an entry) that only the first R535 drivers wrote; every later driver
    writes 24-byte entries (nvml.h from NVML 12.2.140 on), so from the second process on its PIDs are garbage
    (XuehaiPan/nvitop pull request 79; 12.535.108 went back to the 24-byte struct). With MPS clients or
    several processes a GPU, the jobs' PIDs are wrong. pynvml's own nvmlDeviceGetComputeRunningProcesses,
    on a libnvidia-ml symbol that answers as the driver does."""
    running = [(2001, 1 << 30), (2002, 2 << 30), (2003, 3 << 30)]

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p)
    def compute_processes_v3(device, count, infos):
        if not infos or count[0] < len(running):
            count[0] = len(running)
            return N.NVML_ERROR_INSUFFICIENT_SIZE
        entries = (_ProcessInfoV2 * len(running)).from_address(infos)
        for entry, (pid, memory) in zip(entries, running):
            entry.pid, entry.usedGpuMemory = pid, memory
            entry.gpuInstanceId = entry.computeInstanceId = 0xFFFFFFFF
        count[0] = len(running)
        return N.NVML_SUCCESS

    monkeypatch.setitem(N._nvmlGetFunctionPointer_cache, "nvmlDeviceGetComputeRunningProcesses_v3",
                        compute_processes_v3)
    processes = N.nvmlDeviceGetComputeRunningProcesses(ctypes.pointer(N.struct_c_nvmlDevice_t()))
    assert [(p.pid, p.usedGpuMemory) for p in processes] == running


# -- older drivers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["535", "550"])
def test_a_field_the_driver_does_not_know_is_dropped_once_not_an_error_each_cycle(clock, driver):
    """A driver answers a field id it does not know with INVALID_ARGUMENT in that field (the H200 recording on
    580.159.04 does for ids 289-293); the PCIe byte fields (197, 198) came with v555 (NVML change log), and
    the R535/R550 headers do not define them. They are read exactly when GPM is refused: that was 16 collector
    errors a second on an 8-GPU node, for ever."""
    fake = FakeNVML(SimNode("healthy", clock=clock), driver=driver)
    fake.gpm_permission = False
    source = source_on(fake, clock)
    with capture_logs() as lines:
        snaps = ticks(source, clock, 12)
    assert [p for s in snaps for p in s.problems] == []
    last = snaps[-1].gpus[0]
    assert last.pcie_tx_bytes is None and last.pcie_rx_bytes is None, "unknown to the driver: absent, not 0"
    assert last.utilization > 0.5 and last.energy_joules > 0 and last.ecc_errors, "the other fields still come"
    unknown = [x for x in lines if x["event"].startswith("this driver does not know an NVML field")]
    assert sorted(x["field_id"] for x in unknown) == [197, 198]
    assert fake.calls["nvmlDeviceGetFieldValues"] == 1 + 8 * 2, "asked once for the node, then the slow tier's batch"


@pytest.mark.parametrize("driver, pcie", [("535", False), ("550", False), ("570", True), ("580", True)])
def test_pcie_bytes_without_gpm_exist_from_r555(clock, driver, pcie):
    """The same 12 cycles on each profile with GPM refused: the PCIe counters move where the driver has them."""
    fake = FakeNVML(SimNode("healthy", clock=clock), driver=driver)
    fake.gpm_permission = False
    snaps = ticks(source_on(fake, clock), clock, 12)
    assert (snaps[-1].gpus[3].pcie_rx_bytes is not None and snaps[-1].gpus[3].pcie_rx_bytes > 0) == pcie
    assert snaps[-1].driver_version.startswith(driver)


def test_a_function_the_drivers_library_lacks_drops_that_call_not_the_library(clock):
    """pynvml raises FUNCTION_NOT_FOUND when libnvidia-ml lacks the symbol it calls (`_nvmlGetFunctionPointer`):
    a newer pynvml over an older driver. nvmlDeviceGetCurrentClocksEventReasons came with v535 (NVML change
    log, "Introduced ClockEventReasons"): on an R530 driver the whole collector was treated as down."""
    fake = FakeNVML(SimNode("healthy", clock=clock))
    fake.missing.add("nvmlDeviceGetCurrentClocksEventReasons")
    source = source_on(fake, clock)
    with capture_logs() as lines:
        snaps = ticks(source, clock, 3)
    g = snaps[-1].gpus[0]
    assert g.up and g.throttle_seconds == {} and g.power_watts > 0 and "sm_active" in g.gpm
    assert snaps[-1].problems == [] and fake.init_count == 1
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 8, "not asked again"
    assert len([x for x in lines if "lacks the function" in x["event"]]) == 1


def test_a_node_without_a_gpu_says_so_from_r545(clock):
    """NVML_ERROR_GPU_NOT_FOUND: "No GPUs were found" (nvml.h; NVML change log, v545). R535 initialises with
    no device."""
    old = GpuSource(FakeNVML(SimNode("healthy", gpu_count=0, clock=clock), driver="535"), clock=clock, wall=clock)
    assert old.sample().gpus == []
    new = GpuSource(FakeNVML(SimNode("healthy", gpu_count=0, clock=clock), driver="550"), clock=clock, wall=clock)
    with pytest.raises(LibraryDown) as err:
        new.sample()
    assert err.value.reason == "no_gpu" and new.down == "the NVIDIA driver is loaded but found no GPU"


# -- a driver upgraded in place ------------------------------------------------------------------------------

def _agent(fake) -> Agent:
    cfg = config.load(overrides={"agent": {"listen": "127.0.0.1:0", "interval": 0.1},
                                 "gpu": {"call_timeout": 0.5}, "rdma": {"enabled": False},
                                 "netdev": {"enabled": False}, "nfs": {"enabled": False}})
    return Agent(cfg, Platform(nvml=fake, links=None, open_ethtool=None))


async def test_a_driver_replaced_under_the_agent_ends_it_with_the_restart_status():
    """After an in-place upgrade the module differs from the libnvidia-ml this process loaded, which pynvml
    never unloads: every nvmlInit answers LIB_RM_VERSION_MISMATCH (open-gpu-kernel-modules checks the version
    when a client opens the control device, NV_ESC_CHECK_VERSION_STR). Only a new process helps: the agent
    logs why and exits 75, which the unit's Restart=on-failure restarts; it used to retry for ever."""
    fake = FakeNVML(SimNode("healthy"))
    agent = _agent(fake)
    with capture_logs() as lines:
        run = asyncio.create_task(agent.run())
        await asyncio.sleep(0.5)
        assert not run.done()
        fake.upgrade_driver()
        status = await asyncio.wait_for(run, timeout=15)
    assert status == 75
    why = [x for x in lines if x["event"] == "NVML cannot be used"]
    assert len(why) == 1 and "replaced under the running agent" in why[0]["why"]
    assert [x["exit_status"] for x in lines if x["event"] == "exiting for a restart"] == [75]


@pytest.mark.slow
def test_stoker_run_exits_75_when_the_scenario_upgrades_the_driver(tmp_path):
    """The process's exit status, which the unit's Restart=on-failure acts on: `stoker run` on a simulated node
    whose driver is replaced in place after 6 s (a scenario's `driver_upgrade_at`)."""
    scenario = tmp_path / "upgrade.toml"
    scenario.write_text('driver_upgrade_at = 6\n[[steps]]\ngpu = "saturated"\nseconds = 60\n')
    run = subprocess.run([sys.executable, "-m", "stoker", "run", "--simulate", str(scenario), "--listen",
                          "127.0.0.1:0", "--interval", "0.5", "--log-format", "json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 75, run.stdout[-2000:] + run.stderr[-2000:]
    assert '"event": "exiting for a restart"' in run.stdout + run.stderr


def test_a_mismatch_at_the_first_init_is_retried_and_explained(clock):
    """At a process's first nvmlInit the mismatch means the library on disk is newer than the loaded module (an
    upgrade waiting for a reboot): a new process would see the same, so the source retries, and says why."""
    fake = FakeNVML(SimNode("healthy", clock=clock))
    fake.reboot_pending = True
    source = source_on(fake, clock)
    for _ in range(3):
        with pytest.raises(LibraryDown) as err:
            ticks(source, clock, 1, 70.0)
        assert type(err.value) is LibraryDown and err.value.reason == "driver_version_mismatch"
    assert "reboot, or reload the nvidia modules" in source.down
    fake.reboot_pending = False  # rebooted, or the modules reloaded
    assert all(g.up for g in ticks(source, clock, 1, 70.0)[0].gpus) and source.down is None


def test_stoker_check_says_why_nvml_cannot_be_used(tmp_path):
    """This machine has no NVIDIA driver: the real pynvml answers NVML_ERROR_LIBRARY_NOT_FOUND, and the check
    says that, not "no driver?" whatever the reason."""
    cfg = tmp_path / "stoker.toml"
    cfg.write_text("[rdma]\nenabled = false\n[netdev]\nenabled = false\n[nfs]\nenabled = false\n")
    run = subprocess.run([sys.executable, "-m", "stoker", "check", "--config", str(cfg), "--seconds", "2"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2 and "COULD NOT CHECK" in run.stdout
    assert "NVML cannot be used: libnvidia-ml.so.1 was not found" in run.stdout, run.stdout


async def test_stoker_check_says_a_reboot_is_pending():
    from stoker import check
    fake = FakeNVML(SimNode("healthy"))
    fake.reboot_pending = True
    report = await check.run_check(_agent(fake), 0.5)
    assert report.exit_code() == check.UNCHECKED
    assert any("are different versions (a driver upgraded without a reboot): reboot" in u for u in report.unchecked)


# -- XIDs ---------------------------------------------------------------------------------------------------------

def test_an_xid_of_one_mig_instance_is_counted_on_its_gpu(clock):
    """nvmlEventData_t names "the specific device where the event occurred" and, under MIG, the GPU instance
    (nvml.h); an instance's XID names its MIG device, whose handle is not the GPU's. The GPU is found by UUID,
    the MIG device's through its parent (nvmlDeviceGetDeviceHandleFromMigDeviceHandle). Only a privileged
    agent gets such events: "In absence of required privileges, only the events which affect all the
    instances (i.e. whole device) are reported" (nvml.h, nvmlEventSetWait)."""
    fake = FakeNVML(node(clock, "mig = [1]"))
    fake.privileged = True
    source = source_on(fake, clock)
    source.sample()
    assert wait_for(lambda: sum(1 in w for w in fake._registered.values()) == 1)
    fake.inject_xid(1, 43, gpu_instance=JOB_INSTANCE)
    fake.inject_xid(1, 79)
    assert wait_for(lambda: ticks(source, clock, 1)[0].gpus[1].xid_counts == {43: 1, 79: 1})
    assert all(g.xid_counts == {} for g in ticks(source, clock, 1)[0].gpus if g.index != 1)
    source.close()


# -- MIG ------------------------------------------------------------------------------------------------------

def test_a_mig_gpu_is_read_per_instance_and_keeps_the_jobs_processes(clock):
    """On a MIG-enabled GPU "querying device utilization rates is not currently supported", and processes and
    memory through the GPU's handle are "aggregate information, only if the caller has appropriate
    privileges. Per-instance information can be queried by using specific MIG device handles" (nvml.h). GPM
    per GPU instance: nvmlGpmMigSampleGet (nvml.h; NVIDIA/DCGM DcgmGpmManager.cpp). The unprivileged agent
    used to see no utilisation, no processes (so no job) and no memory."""
    fake = FakeNVML(node(clock, "mig = [0, 1]"))
    plain = FakeNVML(node(clock))
    source, reference = source_on(fake, clock), source_on(plain, clock)
    for _ in range(3):
        clock.advance(1.0)
        snap, ref = source.sample(), reference.sample()
    assert snap.problems == [] and ref.problems == []
    g, r = snap.gpus[0], ref.gpus[0]
    assert g.pids == r.pids and g.processes == 1, "the job's process, so its attribution, as without MIG"
    assert g.mig is True and r.mig is False and g.utilization is None
    assert [i.gpu_instance for i in g.instances] == list(MIG_INSTANCES)
    job, idle = g.instances
    assert job.gpu_instance == JOB_INSTANCE and job.pids == r.pids == (job_pid("train", 0),) and idle.pids == ()
    assert g.gpm["sm_active"] == pytest.approx(r.gpm["sm_active"]), "the job's instance, not the idle one"
    assert 0.6 < job.gpm["sm_active"] and idle.gpm["sm_active"] == 0.0
    assert g.activity_source == "gpm" and g.memory_used_bytes == job.memory_used_bytes > 20 * 2**30
    assert g.memory_total_bytes == job.memory_total_bytes + idle.memory_total_bytes
    assert "corrected" not in g.ecc_errors, "volatile ECC is not read through a MIG GPU's handle (nvml.h)"
    assert snap.gpus[2].mig is False and snap.gpus[2].utilization > 0.5 and snap.gpus[2].instances == ()


def between_jobs(clock) -> SimNode:
    """A job for 3 s, the GPUs free for 30 s (when an operator can change their MIG mode), a job again."""
    return SimNode(scenarios.parse('[[steps]]\ngpu = "saturated"\nseconds = 3\njob = "a"\n'
                                   '[[steps]]\ngpu = "idle"\nseconds = 30\njob = ""\n'
                                   '[[steps]]\ngpu = "saturated"\nseconds = 600\njob = "b"\n', "between-jobs"),
                   clock=clock)


def test_mig_turned_on_and_off_is_seen_without_a_restart(clock):
    """MIG mode is read on the slow tier (nvmlDeviceGetMigMode): what the GPU did not answer under MIG
    (utilisation, volatile ECC) is asked again when MIG is turned off; it used to stay dropped until a new
    UUID; the GPU's processes and memory, refused to an unprivileged user while MIG was on ("aggregate
    information, only if the caller has appropriate privileges", nvml.h), stayed refused for ten minutes
    after it was turned off (no job on that GPU). Changed between jobs, as the driver allows."""
    fake = FakeNVML(between_jobs(clock))
    source = source_on(fake, clock, slow_interval=10.0)
    ticks(source, clock, 4)  # the GPUs are free from t=3
    fake.set_mig(4, True)
    during = ticks(source, clock, 12)[-1].gpus[4]
    fake.set_mig(4, False)
    ticks(source, clock, 12)
    after = ticks(source, clock, 6)[-1].gpus[4]  # the next job runs
    assert after.utilization > 0.5 and after.ecc_errors == {"corrected": 0, "uncorrected": 0}
    assert during.mig and during.utilization is None and len(during.instances) == 2 and "sm_active" in during.gpm
    assert after.mig is False and after.instances == () and after.processes == 1
    assert "sm_active" in after.gpm and after.activity_source == "gpm"
    assert fake.calls["nvmlDeviceGetMigMode"] <= 8 * 4, "on the slow tier only"


def test_the_mig_mode_of_a_gpu_in_use_is_not_asked(clock):
    """A GPU without MIG running processes keeps its mode: `nvidia-smi -mig 1` leaves it pending ("In use
    by another client") until a GPU reset, which needs the GPU free (NVIDIA's MIG user guide). The slow
    tier does not ask it (0.15 ms a GPU on the recorded H200), and asks again once the GPU is free: the
    mode asked for during the job is then seen. (With the fake resetting the GPU as the job left, its
    processes were refused from then on, MIG's rule for an unprivileged user, and the agent kept the job's
    last list: the GPU looked in use for good and MIG was never seen.)"""
    fake = FakeNVML(between_jobs(clock))
    source = source_on(fake, clock, slow_interval=10.0)
    ticks(source, clock, 1)
    asked = fake.calls["nvmlDeviceGetMigMode"]
    assert asked == 8, "the first cycle reads every GPU's mode"
    fake.set_mig(4, True)  # during the job: pending
    busy = ticks(source, clock, 1)[-1].gpus[4]
    assert busy.mig is False and busy.processes == 1
    ticks(source, clock, 1)
    assert fake.calls["nvmlDeviceGetMigMode"] == asked, "t=1 to 3: the job's processes hold every GPU"
    free = ticks(source, clock, 12)[-1].gpus[4]
    assert fake.calls["nvmlDeviceGetMigMode"] == 2 * asked, "free: asked on the slow tier"
    assert free.mig is True and free.processes == 0


def test_mig_without_gpu_profiling_is_a_degraded_mode_the_metrics_say(clock):
    """Profiling refused (RmProfilingAdminOnly, the stock driver's default) and no utilisation under MIG: NVML
    gives no activity at all for that GPU. It says so (`activity_source` none) instead of passing for an
    idle GPU; the other GPUs fall back to utilization.gpu."""
    fake = FakeNVML(node(clock, "mig = [0, 1]"))
    fake.gpm_permission = False
    snap = ticks(source_on(fake, clock), clock, 3)[-1]
    mig, plain = snap.gpus[0], snap.gpus[2]
    assert mig.activity_source == "none" and mig.gpm == {} and mig.utilization is None and mig.refused == ("gpm",)
    assert mig.pids == (job_pid("train", 0),) and mig.pcie_rx_bytes > 0
    assert plain.activity_source == "utilization" and plain.utilization > 0.5
    exported = {f.name: f for f in text_string_to_metric_families(render(gpu_families.families(snap)).decode())}
    sources = {s.labels["gpu"]: s.labels["source"] for s in exported["stoker_gpu_activity_source"].samples}
    assert sources == {"0": "none", "1": "none", **{str(i): "utilization" for i in range(2, 8)}}
    assert {s.labels["gpu"]: s.value for s in exported["stoker_gpu_mig_enabled"].samples} == \
        {"0": 1, "1": 1, **{str(i): 0 for i in range(2, 8)}}


def test_instance_metrics_follow_the_contract(clock):
    """docs/METRICS.md: each stoker_gpu_instance_* family with its type and labels, one series per instance."""
    fake = FakeNVML(node(clock, "mig = [0, 1]"))
    snap = ticks(source_on(fake, clock), clock, 3)[-1]
    expected = contract()
    families = {f.name: f for f in gpu_families.families(snap) if f.name.startswith("stoker_gpu_instance_")}
    assert set(families) == {n for n in expected if n.startswith("stoker_gpu_instance_")}
    for name, fam in families.items():
        kind, labels = expected[name]
        assert fam.type == kind and len(fam.samples) == 4, name
        assert all(set(s.labels) == labels for s in fam.samples), name
    info = {(s.labels["gpu"], s.labels["gpu_instance"]): s.labels["mig_uuid"]
            for s in families["stoker_gpu_instance_info"].samples}
    assert sorted(info) == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert all(u.startswith("MIG-") for u in info.values())


# -- MPS ------------------------------------------------------------------------------------------------------

def test_under_mps_the_jobs_processes_are_its_ranks_not_the_mps_server(clock):
    """Under MPS, nvmlDeviceGetComputeRunningProcesses lists the MPS server (nvidia-cuda-mps-server), which
    holds its clients' contexts; nvmlDeviceGetMPSComputeRunningProcesses lists the clients ("processes ...
    utilizing MPS", nvml.h). The PIDs were the server's for every job: no new job was ever seen."""
    text = ('mps = true\n[[steps]]\ngpu = "saturated"\nseconds = 5\njob = "a"\n'
            '[[steps]]\ngpu = "saturated"\nseconds = 5\njob = "b"\n')
    fake = FakeNVML(SimNode(scenarios.parse(text, "mps"), clock=clock))
    source = source_on(fake, clock)
    first = ticks(source, clock, 3)[-1]
    assert [g.pids for g in first.gpus] == [(job_pid("a", i),) for i in range(8)]
    assert all(g.processes == 1 for g in first.gpus), "the server is not counted beside its client"
    second = ticks(source, clock, 4)[-1]
    assert [g.pids for g in second.gpus] == [(job_pid("b", i),) for i in range(8)], "the next job is seen"
    assert MPS_SERVER_PID not in {p for g in first.gpus + second.gpus for p in g.pids}


def test_without_mps_the_clients_list_is_asked_only_when_the_processes_change(clock):
    """The cycle's cost stays one process call a GPU: the MPS list is asked when a new set of processes
    appears, and once a slow-tier interval."""
    fake = FakeNVML(SimNode("healthy", clock=clock))
    snaps = ticks(source_on(fake, clock, slow_interval=10.0), clock, 30)
    assert all(g.pids == (job_pid("train", g.index),) for g in snaps[-1].gpus)
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 8 * 30
    assert fake.calls["nvmlDeviceGetMPSComputeRunningProcesses"] == 8 * 3


def test_mps_in_mig_instances(clock):
    """MPS clients in a MIG instance: the instance's process list shows the server, its MPS list the clients."""
    fake = FakeNVML(node(clock, "mig = [0]\nmps = true"))
    g = ticks(source_on(fake, clock), clock, 3)[-1].gpus[0]
    assert g.instances[0].pids == g.pids == (job_pid("train", 0),)


# -- bench/nvml_check.py without a GPU ------------------------------------------------------------------------

def test_nvml_check_runs_on_every_fake_profile():
    """`python -m bench.nvml_check --fake`: the collector against the simulated node's own values (the
    nvidia-smi of the fake), on each driver profile, MIG, MPS and GPM refused: all agree, no problem counted."""
    from bench import nvml_check
    for profile in nvml_check.FAKE_PROFILES:
        result = nvml_check.run_fake(profile, seconds=12)
        assert result["all_agree"] and result["problems"] == {}, (profile, result["agree"], result["problems"])
        assert result["agree"]["processes"] and result["agree"]["power_watts"], profile
    mig = nvml_check.run_fake("mig-gpm-refused", seconds=3)
    assert mig["activity_sources"] == {"none": 6, "utilization": 18} and "instances" in mig["readings"]["gpu 0"]


def test_jobs_are_attributed_through_mps_clients_and_mig_instances(tmp_path, clock):
    """From NVML's processes to stoker_gpu_job_info, MPS clients and MIG instances included: the ranks' cgroups
    in the simulated procfs name the Slurm job (docs/JOBS.md). The MPS server (no job's process) and the MIG
    GPUs' hidden processes left the job unknown."""
    from stoker.config import DetectConfig
    from stoker.detect.goodput import GoodputLedger
    from stoker.exporters import jobs as job_families
    from stoker.sim import jobs as sim_jobs
    from stoker.sources.jobs import JobSource

    sim = node(clock, "mps = true\nmig = [0, 1]")
    sim_jobs.SimJobs(sim, str(tmp_path / "proc")).build()
    snapshot = ticks(source_on(FakeNVML(sim), clock), clock, 2)[-1]
    owners = JobSource(str(tmp_path / "proc"), str(tmp_path / "sys")).resolve(p for g in snapshot.gpus for p in g.pids)
    ledger = GoodputLedger(DetectConfig(), clock)
    ledger.tick(clock(), snapshot, owners, None, {})
    body = render(job_families.families(ledger)).decode()
    info = next(f for f in text_string_to_metric_families(body) if f.name == "stoker_gpu_job_info")
    assert sorted(int(s.labels["gpu"]) for s in info.samples) == list(range(8))
    assert {s.labels["job_id"] for s in info.samples} == {sim_jobs.job_id("train", "slurm")}
