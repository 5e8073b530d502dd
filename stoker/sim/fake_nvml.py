"""A fake NVML: the `pynvml` functions the GPU collector calls, over a simulated node.

It returns the same ctypes structures and raises the same `pynvml.NVMLError`
subclasses as the real library, so the collector cannot tell the difference;
field support follows what the real H200 answered (data/inventory.json).
Tests use the fault switches (`library_missing`, `lost`, `unsupported`,
`gpm_supported`, `gpm_permission`, `hang`, `inject_xid`) to drive the
collector's error paths; a scenario step with `profiling = "admin-only"`
refuses GPM as a stock driver does to an unprivileged user.
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

from stoker.sim.node import SimNode, job_memory_mib, job_pid

MIB = 1 << 20
MODEL = "NVIDIA H100 80GB HBM3"
MEMORY_TOTAL = 81559 * MIB
POWER_LIMIT_MW = 700_000
DRIVER = "580.159.04"
NVML_VERSION = "13.580.159.04"
NVLINK_MIB_PER_TENSOR_PERCENT = 1200.0  # ~125 GB/s of all-reduce traffic at full tensor load

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
def supported_fields() -> frozenset[int]:
    """Field ids the recorded H200 answered without error."""
    inv = json.loads((resources.files("stoker.sim") / "data" / "inventory.json").read_text())
    values = inv["devices"][0]["field_values"]["values"]
    return frozenset(v["id"] for v in values.values() if v["ret"] == N.NVML_SUCCESS)


def _raise(code: int) -> None:
    raise N.NVMLError(code)


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


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


class FakeNVML:
    def __init__(self, node: SimNode | None = None):
        self.node = node or SimNode()
        self.gpus = [_FakeGpu(i) for i in range(self.node.gpu_count)]
        self._by_address = {_address(g.handle): g for g in self.gpus}
        self._by_handle: dict = {}  # id -> (handle, GPU) of the handles the agent holds: one cast each, not one per call
        self._lock = threading.Lock()
        self._samples: dict[int, tuple[int, float]] = {}
        self._events: dict[int, queue.SimpleQueue] = {}
        self._registered: dict[int, set[int]] = {}
        self.init_count = 0
        self.calls: dict[str, int] = {}
        self._announced_lost: set[int] = set()
        # fault switches
        self.library_missing = False
        self.lost: set[int] = set()
        self.unsupported: set[str] = set()
        self.gpm_supported = True
        self.gpm_permission = True  # False: GPM sampling answers NO_PERMISSION, as to an unprivileged user
        self.hang = threading.Event()  # set: every getter blocks until it is cleared
        self.hang_release = threading.Event()

    # -- helpers -------------------------------------------------------------

    def _gpu(self, handle: Any, fn: str) -> _FakeGpu:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        if self.hang.is_set():
            self.hang_release.wait()
        if self.init_count <= 0:
            _raise(N.NVML_ERROR_UNINITIALIZED)
        held = self._by_handle.get(id(handle))
        if held is not None and held[0] is handle:
            gpu = held[1]
        else:
            gpu = self._by_address.get(_address(handle))
            if gpu is None:
                _raise(N.NVML_ERROR_INVALID_ARGUMENT)
            self._by_handle[id(handle)] = (handle, gpu)
        if self._is_lost(gpu.index):
            _raise(N.NVML_ERROR_GPU_IS_LOST)
        if fn in self.unsupported:
            _raise(N.NVML_ERROR_NOT_SUPPORTED)
        return gpu

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
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        if self.init_count <= 0:
            _raise(N.NVML_ERROR_UNINITIALIZED)
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return DRIVER

    def nvmlSystemGetNVMLVersion(self) -> str:
        return NVML_VERSION

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
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle) -> str:
        self._gpu(handle, "nvmlDeviceGetName")
        return MODEL

    def nvmlDeviceGetPciInfo(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetPciInfo")
        info = N.nvmlPciInfo_t()
        info.busId = gpu.bus_id.encode()
        info.busIdLegacy = gpu.bus_id[4:].encode()
        return info

    # -- fast tier ---------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle):
        row = self._row(self._gpu(handle, "nvmlDeviceGetUtilizationRates"))
        return N.c_nvmlUtilization_t(gpu=int(row["util_gpu"]), memory=int(row["util_mem"]))

    def nvmlDeviceGetComputeRunningProcesses(self, handle) -> list:
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        job = self.node.job()
        if not job:
            return []
        return [N.nvmlFriendlyObject({"pid": job_pid(job, gpu.index, self.node.launch()),
                                      "usedGpuMemory": self._memory_used(gpu),
                                      "gpuInstanceId": 0xFFFFFFFF, "computeInstanceId": 0xFFFFFFFF})]

    def _memory_used(self, gpu: _FakeGpu) -> int:
        """The recorded context and phase, plus what the job holding the GPUs keeps allocated."""
        return int((self._row(gpu)["mem_used_mib"] + job_memory_mib(self.node.job())) * MIB)

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = self._memory_used(self._gpu(handle, "nvmlDeviceGetMemoryInfo"))
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
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        self._integrate(gpu)
        values = (N.c_nvmlFieldValue_t * len(field_ids))()
        supported = supported_fields()
        for i, fid in enumerate(field_ids):
            fv = values[i]
            fv.fieldId = fid
            value = self._field(gpu, fid) if fid in supported else None
            if value is None:
                fv.nvmlReturn = N.NVML_ERROR_NOT_SUPPORTED
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
            N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES: lambda: int(gpu.pcie_bytes["tx"]) % (1 << 32),
            N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES: lambda: int(gpu.pcie_bytes["rx"]) % (1 << 32),
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

    def nvmlGpmSampleGet(self, handle, sample):
        gpu = self._gpu(handle, "nvmlGpmSampleGet")
        if not self.gpm_supported:
            _raise(N.NVML_ERROR_NOT_SUPPORTED)
        if not self.gpm_permission or self.node.step().profiling == "admin-only":
            _raise(N.NVML_ERROR_NO_PERMISSION)
        self._samples[_address(sample)] = (gpu.index, self._t())
        return sample

    def nvmlGpmMetricsGet(self, request):
        first = self._samples.get(_address(request.sample1))
        second = self._samples.get(_address(request.sample2))
        if first is None or second is None or first[0] != second[0]:
            _raise(N.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[first[0]]
        if self._is_lost(gpu.index):
            _raise(N.NVML_ERROR_GPU_IS_LOST)
        rows = self._rows_between(gpu, first[1], second[1])
        metrics = request.metrics
        for i in range(request.numMetrics):
            metric = metrics[i]
            metric_id = metric.metricId
            if metric_id in GPM_COLUMNS:
                metric.value = sum(map(itemgetter(GPM_COLUMNS[metric_id]), rows)) / len(rows)
            elif metric_id in NVLINK_METRICS:
                metric.value = NVLINK_MIB_PER_TENSOR_PERCENT * sum(map(TENSOR, rows)) / len(rows)
            else:
                metric.nvmlReturn = N.NVML_ERROR_NOT_SUPPORTED
                continue
            metric.nvmlReturn = N.NVML_SUCCESS
        return request

    def _rows_between(self, gpu: _FakeGpu, t1: float, t2: float) -> list[dict[str, float]]:
        """The recorded rows GPM would have averaged over (t1, t2]."""
        steps = max(1, min(100, int((t2 - t1) * 10)))
        return [self._row(gpu, t2 - k * (t2 - t1) / steps) for k in range(steps)]

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
            index, xid = events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            _raise(N.NVML_ERROR_TIMEOUT)
        data = N.c_nvmlEventData_t()
        data.device = self.gpus[index].handle
        data.eventType = N.nvmlEventTypeXidCriticalError
        data.eventData = xid
        return data

    def nvmlEventSetFree(self, event_set) -> None:
        self._events.pop(_address(event_set), None)
        self._registered.pop(_address(event_set), None)

    def inject_xid(self, gpu: int, xid: int) -> None:
        """Deliver an XID event to every event set watching that GPU."""
        for key, watched in list(self._registered.items()):
            if gpu in watched and key in self._events:
                self._events[key].put((gpu, xid))
