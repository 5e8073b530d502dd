"""A fake NVML: the `pynvml` functions the GPU collector calls, over a simulated node.

It returns the same ctypes structures and raises the same `pynvml.NVMLError`
subclasses as the real library, so the collector cannot tell the difference.
What it answers follows a driver profile (sim/drivers.py: which field ids
that branch knows, from NVIDIA's headers; what a known field answers, from the
H200 recording in data/inventory.json), chosen by the scenario's `driver`.
The scenario also puts GPUs in MIG mode (`mig`, what each call answers under
MIG from nvml.h's notes), runs the job under MPS (`mps`), and replaces the
driver in place (`driver_upgrade_at`).
Tests use the fault switches (`library_missing`, `lost`, `unsupported`,
`missing`, `gpm_supported`, `gpm_permission`, `privileged`, `mig`, `hang`,
`inject_xid`, `upgrade_driver`, `reboot_pending`) to drive the collector's error paths; a
scenario step with `profiling = "admin-only"` refuses GPM as a stock driver
does to an unprivileged user.
"""

from __future__ import annotations

import ctypes
import json
import queue
import threading
from functools import lru_cache
from importlib import resources
from operator import itemgetter
from typing import Any

import pynvml as N

from stoker.sim import drivers
from stoker.sim.node import SimNode, job_memory_mib, job_pid
from stoker.sources.gpu import ERROR_GPU_NOT_FOUND, FI_PCIE_COUNT_RX_BYTES, FI_PCIE_COUNT_TX_BYTES

MIB = 1 << 20
MODEL = "NVIDIA H100 80GB HBM3"
MEMORY_TOTAL = 81559 * MIB
POWER_LIMIT_MW = 700_000
NVLINK_MIB_PER_TENSOR_PERCENT = 1200.0  # ~125 GB/s of all-reduce traffic at full tensor load
SMS = 132  # an H100 SXM5's streaming multiprocessors

# MIG: two 3g.40gb GPU instances (ids 1 and 2), one compute instance each; the job's rank runs in the first.
# An H100 80GB offers up to 7 MIG devices; a 3g.40gb instance has 60 SMs and 4 of the 8 memory slices.
MIG_INSTANCES = (1, 2)
MIG_MAX_DEVICES = 7
MIG_SMS = 60
MIG_MEMORY = MEMORY_TOTAL // 2
JOB_INSTANCE = 1
NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId and computeInstanceId of a process without MIG (nvml.h)
MPS_SERVER_PID = 4321  # nvidia-cuda-mps-server, started by the MPS control daemon for the job's user
# Volatile ECC counts are not read through the device handle of a MIG-enabled GPU (nvml.h,
# nvmlDeviceGetMemoryErrorCounter: "Querying volatile errors using device handles is currently not supported").
MIG_UNSUPPORTED_FIELDS = {N.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, N.NVML_FI_DEV_ECC_DBE_VOL_TOTAL}

GPM_COLUMNS = {
    N.NVML_GPM_METRIC_SM_UTIL: "gpm_sm_util",
    N.NVML_GPM_METRIC_SM_OCCUPANCY: "gpm_sm_occupancy",
    N.NVML_GPM_METRIC_ANY_TENSOR_UTIL: "gpm_any_tensor_util",
    N.NVML_GPM_METRIC_DRAM_BW_UTIL: "gpm_dram_bw_util",
    N.NVML_GPM_METRIC_PCIE_TX_PER_SEC: "gpm_pcie_tx_per_sec",
    N.NVML_GPM_METRIC_PCIE_RX_PER_SEC: "gpm_pcie_rx_per_sec",
}
NVLINK_METRICS = {N.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC, N.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC}
TENSOR = itemgetter("gpm_any_tensor_util")


@lru_cache(maxsize=1)
def recorded_fields() -> dict[int, int]:
    """What the recorded H200 answered for each field id: NVML_SUCCESS, or the error in that field."""
    inv = json.loads((resources.files("stoker.sim") / "data" / "inventory.json").read_text())
    values = inv["devices"][0]["field_values"]["values"]
    return {v["id"]: v["ret"] for v in values.values()}


def _raise(code: int) -> None:
    raise N.NVMLError(code)


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _process(pid: int, memory: int, gpu_instance: int = NO_INSTANCE, compute_instance: int = NO_INSTANCE):
    return N.nvmlFriendlyObject({"pid": pid, "usedGpuMemory": memory,
                                 "gpuInstanceId": gpu_instance, "computeInstanceId": compute_instance})


class _FakeGpu:
    def __init__(self, index: int):
        self.index = index
        self.struct = N.struct_c_nvmlDevice_t()
        self.handle = ctypes.pointer(self.struct)
        self.uuid = f"GPU-5a0c4e12-7d1b-4c39-9e8f-{0xb0a4d0000000 + index:012x}"
        self.bus_id = f"00000000:{[0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB][index % 8]:02X}:00.0"
        self.energy_mj = 1.5e9 + index * 1.1e7
        self.pcie_bytes = {"tx": 2.6e9 + index * 1e6, "rx": 8.2e8 + index * 1e6}
        self.errors = {"ecc_sbe": 0, "ecc_dbe": 0, "replay": 0,
                       "remap_cor": 0, "remap_unc": 0, "remap_pending": 0, "remap_failure": 0}
        self.integrated_at: float | None = None
        self.instances = {gi: _FakeMig(self, gi) for gi in MIG_INSTANCES}


class _FakeMig:
    """A MIG device (one compute instance of a GPU instance), with a handle of its own."""

    def __init__(self, gpu: _FakeGpu, gi: int):
        self.gpu = gpu
        self.gi = gi
        self.struct = N.struct_c_nvmlDevice_t()
        self.handle = ctypes.pointer(self.struct)
        self.uuid = f"MIG-7c1e0a35-{gpu.index:04x}-5f2b-9d40-{0x3e81c0000000 + gi:012x}"


class FakeNVML:
    def __init__(self, node: SimNode | None = None, driver: str | None = None):
        """`driver`: the branch to answer as (sim/drivers.py), else the scenario's."""
        self.node = node or SimNode()
        scenario = self.node.scenario
        self.profile = drivers.PROFILES[driver or scenario.driver]
        self.gpus = [_FakeGpu(i) for i in range(self.node.gpu_count)]
        self._by_address: dict[int, _FakeGpu | _FakeMig] = {_address(g.handle): g for g in self.gpus}
        self._by_address.update((_address(m.handle), m) for g in self.gpus for m in g.instances.values())
        # id -> (handle, device) of the handles the agent holds: one cast each, not one per call
        self._by_handle: dict = {}
        self._lock = threading.Lock()
        self._samples: dict[int, tuple[int, int | None, float]] = {}  # sample -> GPU, GPU instance, when
        self._events: dict[int, queue.SimpleQueue] = {}
        self._registered: dict[int, set[int]] = {}
        self.init_count = 0
        self.calls: dict[str, int] = {}
        self._announced_lost: set[int] = set()
        self._loaded_at: float | None = None  # when this process first loaded the library (nvmlInit)
        self._upgraded_at = scenario.driver_upgrade_at
        # fault switches
        self.library_missing = False
        self.lost: set[int] = set()
        self.unsupported: set[str] = set()
        self.missing: set[str] = set()  # functions this driver's library lacks (pynvml: FUNCTION_NOT_FOUND)
        self.gpm_supported = True
        self.gpm_permission = True  # False: GPM sampling answers NO_PERMISSION, as to an unprivileged user
        self.privileged = False  # the agent runs as root (or CAP_SYS_ADMIN): MIG aggregates, instances' XIDs
        self.reboot_pending = False  # a driver upgraded, not yet loaded: the library is newer than the module
        self.mig: set[int] = set(scenario.mig)  # GPUs in MIG mode (the current mode; `set_mig` to change it)
        self._mig_pending: dict[int, bool] = {}  # GPU -> the mode asked of it while in use
        self.mps = scenario.mps
        self.hang = threading.Event()  # set: every getter blocks until it is cleared
        self.hang_release = threading.Event()

    # -- helpers -------------------------------------------------------------

    def _device(self, handle: Any, fn: str) -> _FakeGpu | _FakeMig:
        """The GPU or MIG device a handle names, after what every call checks."""
        self.calls[fn] = self.calls.get(fn, 0) + 1
        if self._mig_pending:
            self._apply_mig()
        if self.hang.is_set():
            self.hang_release.wait()
        if self._stale():
            _raise(N.NVML_ERROR_UNINITIALIZED)
        if self.init_count <= 0:
            _raise(N.NVML_ERROR_UNINITIALIZED)
        if fn in self.missing:
            _raise(N.NVML_ERROR_FUNCTION_NOT_FOUND)
        held = self._by_handle.get(id(handle))
        if held is not None and held[0] is handle:
            device = held[1]
        else:
            device = self._by_address.get(_address(handle))
            if device is None:
                _raise(N.NVML_ERROR_INVALID_ARGUMENT)
            self._by_handle[id(handle)] = (handle, device)
        gpu = device if isinstance(device, _FakeGpu) else device.gpu
        if isinstance(device, _FakeMig) and gpu.index not in self.mig:
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)  # MIG turned off: its MIG device handles are gone
        if self._is_lost(gpu.index):
            _raise(N.NVML_ERROR_GPU_IS_LOST)
        if fn in self.unsupported:
            _raise(N.NVML_ERROR_NOT_SUPPORTED)
        return device

    def _gpu(self, handle: Any, fn: str) -> _FakeGpu:
        """The GPU of a call that takes a GPU's handle only."""
        device = self._device(handle, fn)
        if not isinstance(device, _FakeGpu):
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        return device

    def _aggregate(self, gpu: _FakeGpu) -> None:
        """Processes and memory of a MIG-enabled GPU through its own handle: "aggregate information, only if
        the caller has appropriate privileges. Per-instance information can be queried by using specific
        MIG device handles" (nvml.h)."""
        if gpu.index in self.mig and not self.privileged:
            _raise(N.NVML_ERROR_NO_PERMISSION)

    def _stale(self) -> bool:
        """The driver was replaced after this process loaded its library: the session is over."""
        upgraded = self._upgraded_at
        return (upgraded is not None and self._loaded_at is not None and self._loaded_at < upgraded
                and self._t() >= upgraded)

    def _is_lost(self, index: int) -> bool:
        """Lost by a test's switch or by the scenario; a scenario loss announces itself with XID 79."""
        if index in self.node.lost_gpus():
            if index not in self._announced_lost:
                self._announced_lost.add(index)
                self.inject_xid(index, 79)
            return True
        return index in self.lost

    def _t(self) -> float:
        return self.node.elapsed()

    def _row(self, gpu: _FakeGpu, t: float | None = None) -> dict[str, float]:
        return self.node.gpu_row(gpu.index, self._t() if t is None else t)

    def _integrate(self, gpu: _FakeGpu) -> None:
        """Advance the GPU's cumulative counters (energy, PCIe bytes) to now."""
        with self._lock:
            t = self._t()
            if gpu.integrated_at is not None and t > gpu.integrated_at:
                row = self._row(gpu, t)
                dt = t - gpu.integrated_at
                gpu.energy_mj += row["power_w"] * 1000.0 * dt
                gpu.pcie_bytes["tx"] += row["gpm_pcie_tx_per_sec"] * MIB * dt
                gpu.pcie_bytes["rx"] += row["gpm_pcie_rx_per_sec"] * MIB * dt
            gpu.integrated_at = t

    # -- library ---------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.library_missing:
            _raise(N.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self._loaded_at is None:
            self._loaded_at = self._t()
        if self._stale() or self.reboot_pending:  # the kernel module and this process's library differ
            _raise(N.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
        if not self.gpus and self.profile.gpu_not_found:
            _raise(ERROR_GPU_NOT_FOUND)
        self.init_count += 1

    def upgrade_driver(self) -> None:
        """The driver is replaced in place now (a test's switch; scenarios say `driver_upgrade_at`)."""
        self._upgraded_at = self._t()

    def nvmlShutdown(self) -> None:
        if self.init_count <= 0:
            _raise(N.NVML_ERROR_UNINITIALIZED)
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.profile.version

    def nvmlSystemGetNVMLVersion(self) -> str:
        return self.profile.nvml_version

    def nvmlDeviceGetCount(self) -> int:
        if self.init_count <= 0:
            _raise(N.NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int):
        if self.init_count <= 0:
            _raise(N.NVML_ERROR_UNINITIALIZED)
        if not 0 <= index < len(self.gpus):
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        if self._is_lost(index):
            _raise(N.NVML_ERROR_GPU_IS_LOST)
        return self.gpus[index].handle

    # -- identity --------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle) -> str:
        return self._device(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle) -> str:
        device = self._device(handle, "nvmlDeviceGetName")
        return MODEL if isinstance(device, _FakeGpu) else f"{MODEL} MIG 3g.40gb"

    def nvmlDeviceGetPciInfo(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetPciInfo")
        info = N.nvmlPciInfo_t()
        info.busId = gpu.bus_id.encode()
        info.busIdLegacy = gpu.bus_id[4:].encode()
        return info

    # -- MIG ---------------------------------------------------------------------

    def set_mig(self, index: int, on: bool) -> None:
        """`nvidia-smi -i INDEX -mig 1|0`: the mode takes effect at a GPU reset, which a GPU running
        processes does not get; there it stays pending ("In use by another client"), here until the GPU
        is free (reset as soon as the job has left). NVIDIA's MIG user guide; nvml.h
        nvmlDeviceGetMigMode: `currentMode`, `pendingMode`."""
        self._mig_pending[index] = on
        self._apply_mig()

    def _apply_mig(self) -> None:
        if self._mig_pending and not self.node.job():
            for index, on in self._mig_pending.items():
                (self.mig.add if on else self.mig.discard)(index)
            self._mig_pending.clear()

    def nvmlDeviceGetMigMode(self, handle) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetMigMode")
        current = gpu.index in self.mig
        pending = self._mig_pending.get(gpu.index, current)
        return [N.NVML_DEVICE_MIG_ENABLE if on else N.NVML_DEVICE_MIG_DISABLE for on in (current, pending)]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle) -> int:
        """"Returns zero if MIG is not supported or enabled" (nvml.h)."""
        gpu = self._gpu(handle, "nvmlDeviceGetMaxMigDeviceCount")
        return MIG_MAX_DEVICES if gpu.index in self.mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index: int):
        gpu = self._gpu(handle, "nvmlDeviceGetMigDeviceHandleByIndex")
        if gpu.index not in self.mig:
            _raise(N.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < len(MIG_INSTANCES):
            _raise(N.NVML_ERROR_NOT_FOUND)  # "if no valid MIG device was found at index" (nvml.h)
        return gpu.instances[MIG_INSTANCES[index]].handle

    def nvmlDeviceGetGpuInstanceId(self, handle) -> int:
        device = self._device(handle, "nvmlDeviceGetGpuInstanceId")
        if not isinstance(device, _FakeMig):
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        return device.gi

    def nvmlDeviceGetAttributes(self, handle):
        device = self._device(handle, "nvmlDeviceGetAttributes")
        attributes = N.c_nvmlDeviceAttributes()
        mig = isinstance(device, _FakeMig)
        attributes.multiprocessorCount = MIG_SMS if mig else SMS
        attributes.gpuInstanceSliceCount = 3 if mig else 7
        attributes.computeInstanceSliceCount = 3 if mig else 7
        attributes.memorySizeMB = (MIG_MEMORY if mig else MEMORY_TOTAL) // MIB
        return attributes

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        device = self._device(handle, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        if not isinstance(device, _FakeMig):
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        return device.gpu.handle

    # -- fast tier ---------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        if gpu.index in self.mig:  # "On MIG-enabled GPUs, querying device utilization rates is not currently
            _raise(N.NVML_ERROR_NOT_SUPPORTED)  # supported" (nvml.h)
        row = self._row(gpu)
        return N.c_nvmlUtilization_t(gpu=int(row["util_gpu"]), memory=int(row["util_mem"]))

    def _ranks(self, device: _FakeGpu | _FakeMig) -> list:
        """The job's processes on a GPU, or on a MIG device (the job's rank runs in JOB_INSTANCE)."""
        job = self.node.job()
        gpu = device if isinstance(device, _FakeGpu) else device.gpu
        if not job:
            return []
        pid = job_pid(job, gpu.index, self.node.launch())
        if gpu.index not in self.mig:
            return [_process(pid, self._memory_used(gpu))]
        if isinstance(device, _FakeMig) and device.gi != JOB_INSTANCE:
            return []
        return [_process(pid, self._memory_used(gpu), JOB_INSTANCE, 0)]

    def nvmlDeviceGetComputeRunningProcesses(self, handle) -> list:
        """Under MPS the list shows the MPS server, which holds the clients' contexts, not the clients."""
        device = self._device(handle, "nvmlDeviceGetComputeRunningProcesses")
        if isinstance(device, _FakeGpu):
            self._aggregate(device)
        ranks = self._ranks(device)
        if not self.mps or not ranks:
            return ranks
        return [_process(MPS_SERVER_PID, r.usedGpuMemory, r.gpuInstanceId, r.computeInstanceId) for r in ranks[:1]]

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle) -> list:
        device = self._device(handle, "nvmlDeviceGetMPSComputeRunningProcesses")
        if isinstance(device, _FakeGpu):
            self._aggregate(device)
        return self._ranks(device) if self.mps else []

    def _memory_used(self, gpu: _FakeGpu) -> int:
        """The recorded context and phase, plus what the job holding the GPUs keeps allocated."""
        used = int((self._row(gpu)["mem_used_mib"] + job_memory_mib(self.node.job())) * MIB)
        return min(used, MIG_MEMORY) if gpu.index in self.mig else used

    def nvmlDeviceGetMemoryInfo(self, handle):
        device = self._device(handle, "nvmlDeviceGetMemoryInfo")
        if isinstance(device, _FakeMig):
            used = self._memory_used(device.gpu) if device.gi == JOB_INSTANCE else 0
            return N.c_nvmlMemory_t(total=MIG_MEMORY, free=MIG_MEMORY - used, used=used)
        self._aggregate(device)
        used = self._memory_used(device)
        return N.c_nvmlMemory_t(total=MEMORY_TOTAL, free=MEMORY_TOTAL - used, used=used)

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        return int(self._row(self._gpu(handle, "nvmlDeviceGetPowerUsage"))["power_w"] * 1000)

    def _temperature(self, gpu: _FakeGpu) -> float:
        return round(31.0 + 0.055 * self._row(gpu)["power_w"])

    def nvmlDeviceGetTemperature(self, handle, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != N.NVML_TEMPERATURE_GPU:
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        return int(self._temperature(gpu))

    def nvmlDeviceGetClockInfo(self, handle, clock_type: int) -> int:
        row = self._row(self._gpu(handle, "nvmlDeviceGetClockInfo"))
        return int(row["sm_mhz"]) if clock_type == N.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle) -> int:
        return int(self._row(self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons"))["clk_reasons"])

    def nvmlDeviceGetEnforcedPowerLimit(self, handle) -> int:
        self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit")
        return POWER_LIMIT_MW

    def nvmlDeviceGetFieldValues(self, handle, field_ids: list[int]):
        """Per field: INVALID_ARGUMENT for an id this driver does not know, else what the recording answered."""
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        self._integrate(gpu)
        values = (N.c_nvmlFieldValue_t * len(field_ids))()
        recorded = recorded_fields()
        mig = gpu.index in self.mig
        for i, fid in enumerate(field_ids):
            fv = values[i]
            fv.fieldId = fid
            if not self.profile.knows(fid):
                fv.nvmlReturn = N.NVML_ERROR_INVALID_ARGUMENT
                continue
            ret = recorded.get(fid, N.NVML_ERROR_NOT_SUPPORTED)
            value = self._field(gpu, fid) if ret == N.NVML_SUCCESS and not (mig and fid in MIG_UNSUPPORTED_FIELDS) \
                else None
            if value is None:
                fv.nvmlReturn = N.NVML_ERROR_NOT_SUPPORTED if ret == N.NVML_SUCCESS else ret
                continue
            fv.nvmlReturn = N.NVML_SUCCESS
            fv.valueType = N.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            fv.value.ullVal = int(value)
        return values

    def _field(self, gpu: _FakeGpu, fid: int) -> float | None:
        e = gpu.errors
        return {
            N.NVML_FI_DEV_MEMORY_TEMP: lambda: self._temperature(gpu) + 6,
            N.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: lambda: gpu.energy_mj,
            FI_PCIE_COUNT_TX_BYTES: lambda: int(gpu.pcie_bytes["tx"]) % (1 << 32),
            FI_PCIE_COUNT_RX_BYTES: lambda: int(gpu.pcie_bytes["rx"]) % (1 << 32),
            N.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: lambda: e["ecc_sbe"],
            N.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: lambda: e["ecc_dbe"],
            N.NVML_FI_DEV_PCIE_REPLAY_COUNTER: lambda: e["replay"],
            N.NVML_FI_DEV_REMAPPED_COR: lambda: e["remap_cor"],
            N.NVML_FI_DEV_REMAPPED_UNC: lambda: e["remap_unc"],
            N.NVML_FI_DEV_REMAPPED_PENDING: lambda: e["remap_pending"],
            N.NVML_FI_DEV_REMAPPED_FAILURE: lambda: e["remap_failure"],
        }.get(fid, lambda: None)()

    # -- GPM -------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle):
        self._gpu(handle, "nvmlGpmQueryDeviceSupport")
        support = N.c_nvmlGpmSupport_t()
        support.version = N.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = 1 if self.gpm_supported else 0
        return support

    def nvmlGpmSampleAlloc(self):
        return ctypes.pointer(N.struct_c_nvmlGpmSample_t())

    def nvmlGpmSampleFree(self, sample) -> None:
        self._samples.pop(_address(sample), None)

    def _gpm_allowed(self) -> None:
        if not self.gpm_supported:
            _raise(N.NVML_ERROR_NOT_SUPPORTED)
        if not self.gpm_permission or self.node.step().profiling == "admin-only":
            _raise(N.NVML_ERROR_NO_PERMISSION)

    def nvmlGpmSampleGet(self, handle, sample):
        """On a MIG-enabled GPU too: its whole-GPU metrics (NVIDIA/DCGM dcgmlib/src/DcgmGpmManager.cpp samples
        the GPU with nvmlGpmSampleGet and its GPU instances with nvmlGpmMigSampleGet)."""
        gpu = self._gpu(handle, "nvmlGpmSampleGet")
        self._gpm_allowed()
        self._samples[_address(sample)] = (gpu.index, None, self._t())
        return sample

    def nvmlGpmMigSampleGet(self, handle, gpu_instance: int, sample):
        gpu = self._gpu(handle, "nvmlGpmMigSampleGet")
        if gpu.index not in self.mig or gpu_instance not in MIG_INSTANCES:
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        self._gpm_allowed()
        self._samples[_address(sample)] = (gpu.index, gpu_instance, self._t())
        return sample

    def nvmlGpmMetricsGet(self, request):
        first = self._samples.get(_address(request.sample1))
        second = self._samples.get(_address(request.sample2))
        if first is None or second is None or first[:2] != second[:2]:
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[first[0]]
        if self._is_lost(gpu.index):
            _raise(N.NVML_ERROR_GPU_IS_LOST)
        rows = self._rows_between(gpu, first[2], second[2])
        share = self._share(gpu, first[1])
        metrics = request.metrics
        for i in range(request.numMetrics):
            metric = metrics[i]
            metric_id = metric.metricId
            if metric_id in GPM_COLUMNS:
                metric.value = share * sum(map(itemgetter(GPM_COLUMNS[metric_id]), rows)) / len(rows)
            elif metric_id in NVLINK_METRICS:
                metric.value = share * NVLINK_MIB_PER_TENSOR_PERCENT * sum(map(TENSOR, rows)) / len(rows)
            else:
                metric.nvmlReturn = N.NVML_ERROR_NOT_SUPPORTED
                continue
            metric.nvmlReturn = N.NVML_SUCCESS
        return request

    def _share(self, gpu: _FakeGpu, gpu_instance: int | None) -> float:
        """How much of the recorded activity a sample sees: all of it on a GPU without MIG and in the job's
        GPU instance, none in the others; the GPU of a MIG-enabled board sees the job's instance's SMs."""
        if gpu.index not in self.mig:
            return 1.0
        if gpu_instance is None:
            return MIG_SMS / SMS
        return 1.0 if gpu_instance == JOB_INSTANCE else 0.0

    def _rows_between(self, gpu: _FakeGpu, t1: float, t2: float) -> list[dict[str, float]]:
        """The recorded rows GPM would have averaged over (t1, t2]."""
        steps = max(1, min(100, int((t2 - t1) * 10)))
        return [self._row(gpu, t2 - k * (t2 - t1) / steps) for k in range(steps)]

    def truth(self, index: int) -> dict[str, float]:
        """What nvidia-smi would show of a GPU now, from the simulated node itself (bench/nvml_check.py --fake
        compares the collector with it): no utilisation, and memory per instance, under MIG; the job's ranks
        as its processes (under MPS, the clients, not their server)."""
        gpu = self.gpus[index]
        row = self._row(gpu)
        mig = index in self.mig
        used = self._memory_used(gpu)
        out = {"power_watts": row["power_w"], "power_limit_watts": POWER_LIMIT_MW / 1000,
               "temperature_gpu": self._temperature(gpu), "temperature_memory": self._temperature(gpu) + 6,
               "sm_clock_hertz": row["sm_mhz"] * 1e6, "processes": float(len(self._ranks(gpu))),
               "memory_used_bytes": used,
               "memory_total_bytes": len(MIG_INSTANCES) * MIG_MEMORY if mig else MEMORY_TOTAL}
        if not mig:
            out["utilization_ratio"] = row["util_gpu"] / 100
        return out

    # -- events ----------------------------------------------------------------

    def nvmlEventSetCreate(self):
        event_set = ctypes.pointer(N.struct_c_nvmlEventSet_t())
        self._events[_address(event_set)] = queue.SimpleQueue()
        self._registered[_address(event_set)] = set()
        return event_set

    def nvmlDeviceGetSupportedEventTypes(self, handle) -> int:
        self._gpu(handle, "nvmlDeviceGetSupportedEventTypes")
        return N.nvmlEventTypeXidCriticalError | N.nvmlEventTypeSingleBitEccError | N.nvmlEventTypeDoubleBitEccError

    def nvmlDeviceRegisterEvents(self, handle, event_types: int, event_set) -> None:
        gpu = self._gpu(handle, "nvmlDeviceRegisterEvents")
        self._registered[_address(event_set)].add(gpu.index)

    def nvmlEventSetWait(self, event_set, timeout_ms: int):
        events = self._events.get(_address(event_set))
        if events is None:
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        try:
            index, xid, gpu_instance = events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            _raise(N.NVML_ERROR_TIMEOUT)
        gpu = self.gpus[index]
        data = N.c_nvmlEventData_t()
        data.device = gpu.handle if gpu_instance is None else gpu.instances[gpu_instance].handle
        data.eventType = N.nvmlEventTypeXidCriticalError
        data.eventData = xid
        data.gpuInstanceId = NO_INSTANCE if gpu_instance is None else gpu_instance
        data.computeInstanceId = NO_INSTANCE if gpu_instance is None else 0
        return data

    def nvmlEventSetFree(self, event_set) -> None:
        self._events.pop(_address(event_set), None)
        self._registered.pop(_address(event_set), None)

    def inject_xid(self, gpu: int, xid: int, gpu_instance: int | None = None) -> None:
        """Deliver an XID event to every event set watching that GPU; `gpu_instance`: an error of one GPU
        instance of a MIG-enabled GPU, named by its MIG device. "In absence of required privileges, only the
        events which affect all the instances (i.e. whole device) are reported" (nvml.h, nvmlEventSetWait)."""
        if gpu_instance is not None and (gpu not in self.mig or not self.privileged):
            return
        for key, watched in list(self._registered.items()):
            if gpu in watched and key in self._events:
                self._events[key].put((gpu, xid, gpu_instance))
