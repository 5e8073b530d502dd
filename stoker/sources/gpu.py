"""GPU activity and health through NVML, as typed samples.

Everything here runs in the GPU collector's worker thread, never on the event
loop. The NVML backend is a parameter: the `pynvml` module in production, the
simulated node's fake (which implements the same functions) otherwise.

Why it is shaped this way (costs measured on an H200, ../shared/fixtures/h200):
- SM, tensor and DRAM activity come from GPM (`nvmlGpmSampleGet` each tick,
  `nvmlGpmMetricsGet` over the previous and current sample): `utilization.gpu`
  reads 15% on copy-bound work whose SM activity is 0.3%.
- PCIe and NVLink bytes integrate the GPM rates over the exact window between
  two samples, at no extra cost. `nvmlDeviceGetPcieThroughput` (21 ms a call)
  is never used. Without GPM, PCIe bytes come from the cumulative byte fields.
- Throttle seconds integrate the clock event reason bitmask (18 us) rather than
  the violation getters (1 ms each).
- Energy (3.4 ms), ECC, row remaps and PCIe replays move slowly and are read in
  one field-value batch on a slower tier (`slow_interval`), with the GPU and
  memory temperatures and the SM clock: only exported (the verdicts do not
  read them) for a Prometheus scraping every 15 s, they cost three calls a GPU
  each cycle otherwise (72 us of the 369 us a fast cycle takes the driver on
  an H200, a fifth of the collector with the simulated NVML).
- Errors are classified: NotSupported drops that series for good; a lost GPU
  (GpuIsLost, Unknown, ...) is marked down and re-acquired with backoff while
  the other GPUs keep their GPM baselines; a library-wide failure (no driver,
  Uninitialized) re-initialises NVML with backoff.
- NoPermission is a policy, not a fault: the drivers restrict GPU performance
  counters (GPM) to administrators by default (`RmProfilingAdminOnly`), and
  the service runs unprivileged. A refused call is not made again, nor counted
  as an error, until `REPROBE_AFTER` seconds have passed (a driver reloaded
  with the restriction lifted grants it then). Without GPM the GPU's activity
  comes from `utilization.gpu`; `activity_source` says which.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pynvml as N

from stoker import logs
from stoker.counters import CounterSet

log = logs.get("gpu")

MIB = 1 << 20
REPROBE_AFTER = 600.0
"""Seconds before a call NVML refused for lack of permission is tried again."""
GPM_REMEDY = ("GPU profiling is restricted to administrators: set NVreg_RestrictProfilingToAdminUsers=0 or give "
              "the service CAP_SYS_ADMIN (docs/OPERATIONS.md); until then SM activity comes from utilization.gpu")

GPM_METRICS = {
    "sm_active": N.NVML_GPM_METRIC_SM_UTIL,
    "sm_occupancy": N.NVML_GPM_METRIC_SM_OCCUPANCY,
    "tensor_active": N.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
    "dram_active": N.NVML_GPM_METRIC_DRAM_BW_UTIL,
    "pcie_tx": N.NVML_GPM_METRIC_PCIE_TX_PER_SEC,
    "pcie_rx": N.NVML_GPM_METRIC_PCIE_RX_PER_SEC,
    "nvlink_tx": N.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC,
    "nvlink_rx": N.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC,
}
GPM_RATIOS = ("sm_active", "sm_occupancy", "tensor_active", "dram_active")
GPM_RATES = ("pcie_tx", "pcie_rx", "nvlink_tx", "nvlink_rx")  # MiB/s, integrated into bytes

THROTTLE_REASONS = {
    "sw_power_cap": N.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": N.nvmlClocksEventReasonHwSlowdown,
    "hw_thermal": N.nvmlClocksEventReasonHwThermalSlowdown,
    "sw_thermal": N.nvmlClocksEventReasonSwThermalSlowdown,
    "hw_power_brake": N.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    "sync_boost": N.nvmlClocksEventReasonSyncBoost,
}

NO_GPM_FIELDS = {"pcie_tx": N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, "pcie_rx": N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES}
SLOW_FIELDS = {
    "energy_mj": N.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
    "ecc_corrected": N.NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
    "ecc_uncorrected": N.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
    "pcie_replays": N.NVML_FI_DEV_PCIE_REPLAY_COUNTER,
    "remap_correctable": N.NVML_FI_DEV_REMAPPED_COR,
    "remap_uncorrectable": N.NVML_FI_DEV_REMAPPED_UNC,
    "remap_pending": N.NVML_FI_DEV_REMAPPED_PENDING,
    "remap_failure": N.NVML_FI_DEV_REMAPPED_FAILURE,
    "memory_temp": N.NVML_FI_DEV_MEMORY_TEMP,
}

# Errors that mean this GPU (or the whole library) no longer answers.
GPU_LOST = {
    N.NVML_ERROR_GPU_IS_LOST, N.NVML_ERROR_UNKNOWN, N.NVML_ERROR_RESET_REQUIRED,
    N.NVML_ERROR_GPU_NOT_FOUND, N.NVML_ERROR_IRQ_ISSUE, N.NVML_ERROR_CORRUPTED_INFOROM,
}
LIBRARY_DOWN = {
    N.NVML_ERROR_UNINITIALIZED, N.NVML_ERROR_DRIVER_NOT_LOADED, N.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    N.NVML_ERROR_LIBRARY_NOT_FOUND, N.NVML_ERROR_FUNCTION_NOT_FOUND,
}

ERROR_NAMES = {
    N.NVML_ERROR_LIBRARY_NOT_FOUND: "library_not_found",
    N.NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    N.NVML_ERROR_UNINITIALIZED: "uninitialized",
    N.NVML_ERROR_GPU_IS_LOST: "gpu_lost",
    N.NVML_ERROR_UNKNOWN: "unknown",
    N.NVML_ERROR_NO_PERMISSION: "no_permission",
    N.NVML_ERROR_TIMEOUT: "timeout",
}


def error_name(exc: N.NVMLError) -> str:
    return ERROR_NAMES.get(exc.value, f"nvml_{exc.value}")


class LibraryDown(Exception):
    def __init__(self, exc: N.NVMLError):
        super().__init__(str(exc))
        self.reason = error_name(exc)


class _GpuLost(Exception):
    def __init__(self, exc: N.NVMLError):
        super().__init__(str(exc))
        self.reason = error_name(exc)


@dataclass
class GpuSample:
    """One GPU at one instant. None means the series is absent (unsupported or unread)."""

    index: int
    uuid: str
    model: str = ""
    pci_bus_id: str = ""
    up: bool = True
    utilization: float | None = None
    processes: int | None = None
    pids: tuple[int, ...] = ()  # of the compute processes: a new set is a new job
    activity_source: str = ""  # gpm | utilization: where the SM activity the verdicts judge comes from
    refused: tuple[str, ...] = ()  # calls NVML refuses to this user (no_permission), e.g. "gpm"
    gpm: dict[str, float] = field(default_factory=dict)  # GPM_RATIOS keys, as ratios 0..1
    pcie_tx_bytes: float | None = None
    pcie_rx_bytes: float | None = None
    nvlink_tx_bytes: float | None = None
    nvlink_rx_bytes: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    temperature: dict[str, float] = field(default_factory=dict)
    sm_clock_hertz: float | None = None
    throttle_seconds: dict[str, float] = field(default_factory=dict)
    ecc_errors: dict[str, float] = field(default_factory=dict)
    remapped_rows: dict[str, float] = field(default_factory=dict)
    pcie_replays: float | None = None
    xid_counts: dict[int, int] = field(default_factory=dict)
    xid_last_seen: dict[int, float] = field(default_factory=dict)
    slow_at: float | None = None  # when the slow tier's values were read (the source's clock)


@dataclass
class GpuSnapshot:
    gpus: list[GpuSample]
    driver_version: str = ""
    nvml_version: str = ""
    problems: list[str] = field(default_factory=list)  # partial failures, by reason


class _Backoff:
    def __init__(self, first: float = 1.0, cap: float = 60.0):
        self.first, self.cap = first, cap
        self.delay = first
        self.next_at = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> None:
        self.next_at = now + self.delay
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay, self.next_at = self.first, 0.0


class _Gpu:
    """What we keep about one GPU between cycles."""

    def __init__(self, index: int):
        self.index = index
        self.handle: Any = None
        self.uuid = ""
        self.model = ""
        self.pci_bus_id = ""
        self.up = False
        self.backoff = _Backoff()
        self.unsupported: set[str] = set()
        self.gpm = False
        self.gpm_samples: list[Any] = []
        self.gpm_prev_at: float | None = None
        self.last_fast_at: float | None = None
        self.totals: dict[str, float] = {}  # integrated counters: bytes, throttle seconds
        self.raw = CounterSet()  # hardware cumulative counters: reset-safe
        self.raw32 = CounterSet(width=32)
        self.raw32_seen: dict[str, float] = {}  # the 32-bit counters' totals at their last reading
        self.refused: dict[str, float] = {}  # call -> when NVML last refused it for lack of permission
        self.slow: dict[str, float] = {}  # last slow-tier values
        self.last_slow_at: float | None = None
        self.power_limit_watts: float | None = None
        self.temperature: dict[str, float] = {}
        self.sm_clock_hertz: float | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle_key(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def _field_value(fv: Any) -> float:
    t = fv.valueType
    v = fv.value
    if t == N.NVML_VALUE_TYPE_DOUBLE:
        return float(v.dVal)
    if t == N.NVML_VALUE_TYPE_UNSIGNED_INT:
        return float(v.uiVal)
    if t == N.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return float(v.ulVal)
    if t == N.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return float(v.sllVal)
    if t == N.NVML_VALUE_TYPE_SIGNED_INT:
        return float(v.siVal)
    return float(v.ullVal)


_GpmMetricView = type("_GpmMetricView", (ctypes.Structure,), {"_fields_": N.c_nvmlGpmMetric_t._fields_})


class _GpmRequest:
    """The `nvmlGpmMetricsGet` request, built once and reused for every GPU and tick (the samples run in
    one thread): the metrics wanted are set once, the two samples before each call, and NVML writes
    each metric's value and status anew on each call. Built for each call, it took 100 attribute
    calls through pynvml's structure wrappers per GPU and tick. One for all GPUs: it holds room for
    every GPM metric NVML knows (19 KB); one per GPU and sample pair held 0.3 MB."""

    __slots__ = ("struct", "metrics")

    def __init__(self) -> None:
        request = N.c_nvmlGpmMetricsGet_t()
        request.version = N.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(GPM_METRICS)
        metrics = request.metrics
        for i, metric_id in enumerate(GPM_METRICS.values()):
            metrics[i].metricId = metric_id
        self.struct = request
        # views of the request's memory as plain ctypes structures: pynvml's wrapper runs a Python
        # `__getattribute__` on every field read, 16 a GPU and tick
        first, size = N.c_nvmlGpmMetricsGet_t.metrics.offset, ctypes.sizeof(N.c_nvmlGpmMetric_t)
        self.metrics = [_GpmMetricView.from_buffer(request, first + i * size) for i in range(len(GPM_METRICS))]

    def get(self, nvml: Any, prev: Any, cur: Any) -> list:
        """The metrics between two samples of one GPU, in `GPM_METRICS` order (raises NVMLError)."""
        request = self.struct
        request.sample1 = prev
        request.sample2 = cur
        nvml.nvmlGpmMetricsGet(request)
        return self.metrics


class XidRecorder:
    """XID events from `nvmlEventSetWait` in a thread of their own.

    The wait blocks in the driver for up to `wait_ms`; the sampler only reads
    the counts under a lock, so the fast tier never waits on events. An event
    ends the wait at once, so the timeout only says how often the thread wakes
    for nothing (each wake-up costs tens of microseconds on a virtual machine)
    and how long a stopped thread lingers: nothing waits for it (a daemon
    thread), and it records nothing once stopped, so a thread replaced by
    `watch` never counts an event twice with its successor.
    """

    def __init__(self, nvml: Any, wait_ms: int = 5000, clock: Callable[[], float] = time.time):
        self._nvml = nvml
        self._wait_ms = wait_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, dict[int, int]] = {}
        self._last: dict[str, dict[int, float]] = {}
        self._handles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def watch(self, gpus: list[_Gpu]) -> None:
        """(Re)start watching the given GPUs' handles."""
        self.stop()
        self._stop = threading.Event()
        self._handles = {_handle_key(g.handle): g.uuid for g in gpus if g.up}
        handles = [g.handle for g in gpus if g.up]
        self._thread = threading.Thread(target=self._run, args=(handles, self._stop),
                                        name="stoker-xid", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, handles: list[Any], stop: threading.Event) -> None:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except N.NVMLError as exc:
            self.error = error_name(exc)
            return
        try:
            for handle in handles:
                try:
                    supported = nvml.nvmlDeviceGetSupportedEventTypes(handle)
                    if supported & N.nvmlEventTypeXidCriticalError:
                        nvml.nvmlDeviceRegisterEvents(handle, N.nvmlEventTypeXidCriticalError, event_set)
                except N.NVMLError as exc:
                    self.error = error_name(exc)
            while not stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait(event_set, self._wait_ms)
                except N.NVMLError as exc:
                    if exc.value == N.NVML_ERROR_TIMEOUT:
                        continue
                    self.error = error_name(exc)
                    stop.wait(self._wait_ms / 1000)
                    continue
                if data.eventType & N.nvmlEventTypeXidCriticalError and not stop.is_set():
                    self._record(self._handles.get(_handle_key(data.device)), int(data.eventData))
        finally:
            try:
                nvml.nvmlEventSetFree(event_set)
            except N.NVMLError:
                pass

    def _record(self, uuid: str | None, xid: int) -> None:
        if uuid is None:
            return
        with self._lock:
            counts = self._counts.setdefault(uuid, {})
            counts[xid] = counts.get(xid, 0) + 1
            self._last.setdefault(uuid, {})[xid] = self._clock()

    def read(self, uuid: str) -> tuple[dict[int, int], dict[int, float]]:
        with self._lock:
            return dict(self._counts.get(uuid, {})), dict(self._last.get(uuid, {}))


class GpuSource:
    """Samples every GPU of the node; call `sample()` from one worker thread only."""

    def __init__(self, nvml: Any, slow_interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.nvml = nvml
        self.slow_interval = slow_interval
        self._clock = clock
        self._wall = wall
        self._initialised = False
        self._library_backoff = _Backoff()
        self._library_error = N.NVMLError(N.NVML_ERROR_UNINITIALIZED)
        self._gpus: list[_Gpu] = []
        self.driver_version = ""
        self.nvml_version = ""
        self.xid = XidRecorder(nvml, clock=wall)
        self._announced: set[str] = set()  # refused calls already logged
        self._gpm_request: _GpmRequest | None = None

    # -- library lifecycle -------------------------------------------------

    def _init_library(self) -> None:
        now = self._clock()
        if not self._library_backoff.ready(now):
            raise LibraryDown(self._library_error)
        try:
            self.nvml.nvmlInit()
            self.driver_version = _text(self.nvml.nvmlSystemGetDriverVersion())
            self.nvml_version = _text(self.nvml.nvmlSystemGetNVMLVersion())
            count = self.nvml.nvmlDeviceGetCount()
        except N.NVMLError as exc:
            self._library_error = exc
            self._library_backoff.failed(now)
            raise LibraryDown(exc) from exc
        self._library_backoff.reset()
        self._initialised = True
        known = {g.index: g for g in self._gpus}
        self._gpus = [known.get(i) or _Gpu(i) for i in range(count)]
        for gpu in self._gpus:
            self._acquire(gpu)
        self.xid.watch(self._gpus)

    def _free_gpm(self, gpu: _Gpu) -> None:
        """GPM samples are driver memory: give them back before dropping a handle."""
        for sample in gpu.gpm_samples:
            try:
                self.nvml.nvmlGpmSampleFree(sample)
            except N.NVMLError:
                pass  # the GPU or the library is gone, and the memory with it
        gpu.gpm_samples = []
        gpu.gpm_prev_at = None

    def _drop_library(self) -> None:
        self.xid.stop()
        for gpu in self._gpus:
            gpu.up = False
            self._free_gpm(gpu)
        if self._initialised:
            try:
                self.nvml.nvmlShutdown()
            except N.NVMLError:
                pass
        self._initialised = False

    def close(self) -> None:
        self._drop_library()

    def _acquire(self, gpu: _Gpu) -> bool:
        """Get (or get back) a GPU's handle and identity; False while it stays lost."""
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            model = _text(nvml.nvmlDeviceGetName(handle))
            bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
        except N.NVMLError as exc:
            if exc.value in LIBRARY_DOWN:
                raise LibraryDown(exc) from exc
            gpu.up = False
            gpu.backoff.failed(self._clock())
            return False
        self._free_gpm(gpu)
        if uuid != gpu.uuid:  # a different board in this slot: start its counters afresh
            fresh = _Gpu(gpu.index)
            fresh.backoff = gpu.backoff
            gpu.__dict__.update(fresh.__dict__)
        gpu.handle, gpu.uuid, gpu.model, gpu.pci_bus_id = handle, uuid, model, bus_id
        gpu.gpm = self._gpm_supported(handle)
        gpu.last_fast_at = None
        gpu.last_slow_at = None
        gpu.up = True
        gpu.backoff.reset()
        return True

    def _gpm_supported(self, handle: Any) -> bool:
        try:
            return bool(self.nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except N.NVMLError:
            return False

    # -- sampling ------------------------------------------------------------

    def sample(self) -> GpuSnapshot:
        """One cycle over every GPU. Raises `LibraryDown` when NVML cannot be used at all."""
        if not self._initialised:
            self._init_library()
        problems: list[str] = []
        samples: list[GpuSample] = []
        now = self._clock()
        reacquired = False
        for gpu in self._gpus:
            if not gpu.up:
                if gpu.backoff.ready(now) and self._acquire(gpu):
                    reacquired = True
                else:
                    samples.append(self._down_sample(gpu))
                    continue
            try:
                samples.append(self._sample_gpu(gpu, problems))
            except _GpuLost as exc:
                gpu.up = False
                gpu.backoff.failed(self._clock())
                problems.append(exc.reason)
                samples.append(self._down_sample(gpu))
            except LibraryDown as exc:
                self._library_error = exc.__cause__ or self._library_error
                self._drop_library()
                self._library_backoff.failed(self._clock())
                raise
        if reacquired:
            self.xid.watch(self._gpus)
        return GpuSnapshot(samples, self.driver_version, self.nvml_version, problems)

    def _down_sample(self, gpu: _Gpu) -> GpuSample:
        """A lost GPU keeps its identity and its XIDs (79: fallen off the bus), nothing else."""
        s = GpuSample(gpu.index, gpu.uuid, gpu.model, gpu.pci_bus_id, up=False)
        s.xid_counts, s.xid_last_seen = self.xid.read(gpu.uuid)
        return s

    def _allowed(self, gpu: _Gpu, key: str) -> bool:
        """False while a call refused for lack of permission waits for its next try."""
        refused = gpu.refused.get(key)
        return refused is None or self._clock() - refused >= REPROBE_AFTER

    def _call(self, gpu: _Gpu, key: str, problems: list[str], fn: Callable, *args: Any) -> Any:
        """One NVML getter, classified: None when unsupported, refused or failed this cycle."""
        if key in gpu.unsupported or not self._allowed(gpu, key):
            return None
        try:
            return fn(gpu.handle, *args)
        except N.NVMLError as exc:
            return self._classify(gpu, key, exc, problems)

    def _classify(self, gpu: _Gpu, key: str, exc: N.NVMLError, problems: list[str]) -> None:
        if exc.value == N.NVML_ERROR_NOT_SUPPORTED:
            gpu.unsupported.add(key)
            return None
        if exc.value == N.NVML_ERROR_NO_PERMISSION:
            self._refused(gpu, key)
            return None
        if exc.value in LIBRARY_DOWN:
            raise LibraryDown(exc) from exc
        if exc.value in GPU_LOST:
            raise _GpuLost(exc) from exc
        problems.append(error_name(exc))
        return None

    def _fields(self, gpu: _Gpu, wanted: dict[str, int], problems: list[str]) -> dict[str, float]:
        names = [k for k in wanted if f"field:{k}" not in gpu.unsupported]
        if not names:
            return {}
        values = self._call(gpu, "fields", problems, self.nvml.nvmlDeviceGetFieldValues,
                            [wanted[k] for k in names])
        out: dict[str, float] = {}
        for name, fv in zip(names, values or ()):
            ret = fv.nvmlReturn
            if ret == N.NVML_SUCCESS:
                out[name] = _field_value(fv)
            elif ret == N.NVML_ERROR_NOT_SUPPORTED:
                gpu.unsupported.add(f"field:{name}")
            elif ret == N.NVML_ERROR_NO_PERMISSION:
                gpu.unsupported.add(f"field:{name}")  # a field refused to this user stays refused
            elif ret in GPU_LOST:
                raise _GpuLost(N.NVMLError(ret))
            else:
                problems.append(error_name(N.NVMLError(ret)))
        return out

    def _sample_gpu(self, gpu: _Gpu, problems: list[str]) -> GpuSample:
        nvml = self.nvml
        now = self._clock()
        dt = 0.0 if gpu.last_fast_at is None else max(0.0, now - gpu.last_fast_at)
        gpu.last_fast_at = now
        s = GpuSample(gpu.index, gpu.uuid, gpu.model, gpu.pci_bus_id)

        util = self._call(gpu, "utilization", problems, nvml.nvmlDeviceGetUtilizationRates)
        if util is not None:
            s.utilization = util.gpu / 100.0
        procs = self._call(gpu, "processes", problems, nvml.nvmlDeviceGetComputeRunningProcesses)
        if procs is not None:
            s.processes = len(procs)
            s.pids = tuple(sorted(int(p.pid) for p in procs))
        mem = self._call(gpu, "memory", problems, nvml.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            s.memory_used_bytes = float(mem.used)
            s.memory_total_bytes = float(mem.total)
        power = self._call(gpu, "power", problems, nvml.nvmlDeviceGetPowerUsage)
        if power is not None:
            s.power_watts = power / 1000.0
        reasons = self._call(gpu, "clock_events", problems, nvml.nvmlDeviceGetCurrentClocksEventReasons)
        if reasons is not None:
            for name, bit in THROTTLE_REASONS.items():
                active = dt if reasons & bit else 0.0
                s.throttle_seconds[name] = gpu.totals[f"throttle:{name}"] = (
                    gpu.totals.get(f"throttle:{name}", 0.0) + active)

        if gpu.gpm and self._allowed(gpu, "gpm"):
            self._sample_gpm(gpu, s, problems)
        with_gpm = gpu.gpm and "gpm" not in gpu.refused
        if not with_gpm:
            self._pcie_from_counters(gpu, problems)
        self._carry_byte_totals(gpu, s)
        s.activity_source = "gpm" if with_gpm else "utilization"
        s.refused = tuple(sorted(gpu.refused))

        self._sample_slow(gpu, s, now, problems)
        s.xid_counts, s.xid_last_seen = self.xid.read(gpu.uuid)
        return s

    def _refused(self, gpu: _Gpu, key: str) -> None:
        gpu.refused[key] = self._clock()
        if key not in self._announced:  # once for the node, not once per GPU and cycle
            self._announced.add(key)
            log.warning("NVML refuses this call to the agent's user; not calling it again for a while",
                        call=key, retry_after_seconds=REPROBE_AFTER, remedy=GPM_REMEDY if key == "gpm" else None)

    def _sample_gpm(self, gpu: _Gpu, s: GpuSample, problems: list[str]) -> None:
        nvml = self.nvml
        try:
            if not gpu.gpm_samples:
                gpu.gpm_samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
            prev, cur = gpu.gpm_samples
            nvml.nvmlGpmSampleGet(gpu.handle, cur)
        except N.NVMLError as exc:
            self._gpm_failed(gpu, exc, problems)
            return
        if gpu.refused.pop("gpm", None) is not None and "gpm" in self._announced:
            self._announced.discard("gpm")
            log.info("GPU profiling granted: SM activity from GPM again")
        taken_at = self._clock()
        window = None if gpu.gpm_prev_at is None else taken_at - gpu.gpm_prev_at
        gpu.gpm_prev_at = taken_at
        gpu.gpm_samples = [cur, prev]  # this sample becomes the baseline of the next tick
        if window is None or window <= 0:
            return
        if self._gpm_request is None:
            self._gpm_request = _GpmRequest()
        try:
            metrics = self._gpm_request.get(nvml, prev, cur)
        except N.NVMLError as exc:
            self._gpm_failed(gpu, exc, problems)
            return
        for name, metric in zip(GPM_METRICS, metrics):
            if metric.nvmlReturn != N.NVML_SUCCESS:
                continue
            if name in GPM_RATIOS:
                s.gpm[name] = max(0.0, min(1.0, metric.value / 100.0))
            else:
                key = f"bytes:{name}"
                gpu.totals[key] = gpu.totals.get(key, 0.0) + max(0.0, metric.value) * MIB * window

    def _pcie_from_counters(self, gpu: _Gpu, problems: list[str]) -> None:
        """Without GPM, PCIe bytes move with the cumulative 32-bit byte counters. They add to the
        same totals as GPM's rates, so a switch between the two never makes a counter go back."""
        for name, value in self._fields(gpu, NO_GPM_FIELDS, problems).items():
            before = gpu.raw32_seen.get(name)
            gpu.raw32_seen[name] = after = gpu.raw32.update(name, value)
            key = f"bytes:{name}"
            gpu.totals[key] = gpu.totals.get(key, 0.0) + (0.0 if before is None else after - before)

    def _carry_byte_totals(self, gpu: _Gpu, s: GpuSample) -> None:
        for name in GPM_RATES:
            key = f"bytes:{name}"
            if key in gpu.totals:
                setattr(s, f"{name}_bytes", gpu.totals[key])

    def _gpm_failed(self, gpu: _Gpu, exc: N.NVMLError, problems: list[str]) -> None:
        if exc.value == N.NVML_ERROR_NOT_SUPPORTED:
            gpu.gpm = False  # fall back to cumulative PCIe fields from the next tick
            return
        gpu.gpm_prev_at = None  # the next granted sample starts a new window
        self._classify(gpu, "gpm", exc, problems)

    def _sample_slow(self, gpu: _Gpu, s: GpuSample, now: float, problems: list[str]) -> None:
        """The slow tier: read every `slow_interval`, carried by every sample between."""
        if gpu.last_slow_at is None or now - gpu.last_slow_at >= self.slow_interval:
            gpu.last_slow_at = now
            self._read_slow(gpu, problems)
        v = gpu.slow
        s.slow_at = gpu.last_slow_at
        s.power_limit_watts = gpu.power_limit_watts
        s.temperature = dict(gpu.temperature)
        s.sm_clock_hertz = gpu.sm_clock_hertz
        if "energy_mj" in v:
            s.energy_joules = v["energy_mj"] / 1000.0
        for kind, key in (("corrected", "ecc_corrected"), ("uncorrected", "ecc_uncorrected")):
            if key in v:
                s.ecc_errors[kind] = v[key]
        for kind in ("correctable", "uncorrectable", "pending", "failure"):
            if f"remap_{kind}" in v:
                s.remapped_rows[kind] = v[f"remap_{kind}"]
        s.pcie_replays = v.get("pcie_replays")

    def _read_slow(self, gpu: _Gpu, problems: list[str]) -> None:
        """Energy, ECC, remaps, replays and the memory temperature in one field batch; the power limit,
        the GPU temperature and the SM clock."""
        values = self._fields(gpu, SLOW_FIELDS, problems)
        for name in ("energy_mj", "ecc_corrected", "ecc_uncorrected", "pcie_replays"):
            if name in values:
                values[name] = gpu.raw.update(name, values[name])
        gpu.slow = values
        limit = self._call(gpu, "power_limit", problems, self.nvml.nvmlDeviceGetEnforcedPowerLimit)
        gpu.power_limit_watts = None if limit is None else limit / 1000.0
        temp = self._call(gpu, "temperature", problems, self.nvml.nvmlDeviceGetTemperature, N.NVML_TEMPERATURE_GPU)
        gpu.temperature = {} if temp is None else {"gpu": float(temp)}
        if "memory_temp" in values:
            gpu.temperature["memory"] = values["memory_temp"]
        clock = self._call(gpu, "sm_clock", problems, self.nvml.nvmlDeviceGetClockInfo, N.NVML_CLOCK_SM)
        gpu.sm_clock_hertz = None if clock is None else clock * 1e6
