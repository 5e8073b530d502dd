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
- Drivers and pynvml releases differ (docs/OPERATIONS.md, supported drivers):
  a name an older pynvml lacks is taken at its value in the NVML header that
  added it (the ABI does not change); a field id the driver does not know is
  answered INVALID_ARGUMENT in that field and never asked again; a function
  the driver's library lacks (FUNCTION_NOT_FOUND: a newer pynvml over an older
  driver) drops that call, not the library.
- After an in-place driver upgrade NVML answers LIB_RM_VERSION_MISMATCH at
  every nvmlInit: the process keeps the old libnvidia-ml loaded (pynvml never
  unloads it). Seen after NVML once worked in this process, that needs a new
  process (`DriverReplaced`); seen at the first nvmlInit, the library on disk
  is newer than the loaded kernel module, and retrying (after a reboot or a
  module reload) is the cure.
- MIG: a MIG-enabled GPU answers no utilisation, and its processes and memory
  only per instance to an unprivileged user (nvml.h). Its mode is read on the
  slow tier, so MIG turned on or off is seen without a restart (not while a
  GPU without MIG runs processes: a new mode takes effect only at a GPU
  reset, which a GPU in use does not get; `nvidia-smi -mig 1` leaves it
  pending, "In use by another client"); its GPU
  instances are read through their MIG device handles: GPM per instance
  (`nvmlGpmMigSampleGet`), processes and memory. The GPU's activity is that of
  the instances holding processes (its own GPM sample still gives its PCIe and
  NVLink bytes); without GPM (profiling refused, or a GPU without it) NVML
  gives none: `activity_source` is `none`.
- MPS: the compute-process list shows the MPS server, not its clients; where a
  listed process is an MPS server, its clients (`nvmlDeviceGetMPSComputeRunning
  Processes`) stand for it, so the job's processes are its ranks, each once.
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

# Names a supported pynvml may lack, at their value in the NVML header that added them: the values are the
# driver's ABI, the same whatever the pynvml. Field ids 197/198: NVML change log, "Changes between v550 and
# v555"; error 28: "Changes between v535 and v545" (nvidia-ml-py 12.535.x has neither, 12.550.x not the fields).
FI_PCIE_COUNT_TX_BYTES = getattr(N, "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 197)
FI_PCIE_COUNT_RX_BYTES = getattr(N, "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 198)
ERROR_GPU_NOT_FOUND = getattr(N, "NVML_ERROR_GPU_NOT_FOUND", 28)

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

NO_GPM_FIELDS = {"pcie_tx": FI_PCIE_COUNT_TX_BYTES, "pcie_rx": FI_PCIE_COUNT_RX_BYTES}
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
    ERROR_GPU_NOT_FOUND, N.NVML_ERROR_IRQ_ISSUE, N.NVML_ERROR_CORRUPTED_INFOROM,
}
LIBRARY_DOWN = {
    N.NVML_ERROR_UNINITIALIZED, N.NVML_ERROR_DRIVER_NOT_LOADED, N.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    N.NVML_ERROR_LIBRARY_NOT_FOUND,
}
UNSUPPORTED = {N.NVML_ERROR_NOT_SUPPORTED, N.NVML_ERROR_FUNCTION_NOT_FOUND}
"""A call this GPU or this driver's library does not offer: its series is dropped for good."""

ERROR_NAMES = {
    N.NVML_ERROR_LIBRARY_NOT_FOUND: "library_not_found",
    N.NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    N.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "driver_version_mismatch",
    N.NVML_ERROR_UNINITIALIZED: "uninitialized",
    N.NVML_ERROR_GPU_IS_LOST: "gpu_lost",
    N.NVML_ERROR_UNKNOWN: "unknown",
    N.NVML_ERROR_NO_PERMISSION: "no_permission",
    N.NVML_ERROR_TIMEOUT: "timeout",
    N.NVML_ERROR_FUNCTION_NOT_FOUND: "function_not_found",
    N.NVML_ERROR_INVALID_ARGUMENT: "invalid_argument",
    ERROR_GPU_NOT_FOUND: "no_gpu",
}

WHY = {
    N.NVML_ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 was not found: no NVIDIA driver is installed, or its "
                                    "library is not on the loader's path",
    N.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel module is not loaded (modprobe nvidia; dmesg says why not)",
    N.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "the loaded NVIDIA kernel module and libnvidia-ml are different versions "
                                          "(a driver upgraded without a reboot): reboot, or reload the nvidia "
                                          "modules; a running agent restarts itself once it sees the new driver",
    N.NVML_ERROR_NO_PERMISSION: "no permission to talk to the driver: the agent's user cannot open /dev/nvidiactl "
                                "or /dev/nvidia* (docs/OPERATIONS.md: GPU device permissions)",
    ERROR_GPU_NOT_FOUND: "the NVIDIA driver is loaded but found no GPU",
    N.NVML_ERROR_UNINITIALIZED: "NVML is not initialised (the driver was unloaded or reset)",
}
RESTART_WHY = ("the NVIDIA driver was replaced under the running agent (LIB_RM_VERSION_MISMATCH after NVML had "
               "worked): this process still holds the old libnvidia-ml, which no retry can unload; exiting so "
               "that the service restarts on the new driver")


def error_name(exc: N.NVMLError) -> str:
    return ERROR_NAMES.get(exc.value, f"nvml_{exc.value}")


def explain(exc: N.NVMLError) -> str:
    """Why NVML cannot be used, for an operator (`stoker check`, the logs)."""
    return WHY.get(exc.value, f"NVML answered {error_name(exc)} ({exc})")


class LibraryDown(Exception):
    def __init__(self, exc: N.NVMLError):
        super().__init__(str(exc))
        self.reason = error_name(exc)
        self.explanation = explain(exc)


class DriverReplaced(LibraryDown):
    """The driver changed under this process: only a new process can load its library."""

    def __init__(self, exc: N.NVMLError):
        super().__init__(exc)
        self.reason = "driver_replaced"
        self.explanation = RESTART_WHY


class _GpuLost(Exception):
    def __init__(self, exc: N.NVMLError):
        super().__init__(str(exc))
        self.reason = error_name(exc)


@dataclass
class InstanceSample:
    """One MIG GPU instance at one instant (its compute instances together)."""

    gpu_instance: int  # the GPU instance id NVML gives (nvmlDeviceGetGpuInstanceId)
    uuid: str  # MIG-... of its first compute instance: what CUDA_VISIBLE_DEVICES names
    pids: tuple[int, ...] = ()
    gpm: dict[str, float] = field(default_factory=dict)  # GPM_RATIOS keys, as ratios 0..1
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None


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
    pids: tuple[int, ...] = ()  # of the compute processes (MPS clients for their server): a new set is a new job
    activity_source: str = ""  # gpm | utilization | none (MIG without GPM): where the verdicts' SM activity comes from
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
    mig: bool | None = None  # MIG mode, where the GPU has one
    instances: tuple[InstanceSample, ...] = ()  # its MIG GPU instances


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


class _GpmPair:
    """The two latest GPM samples of a GPU or a GPU instance (driver memory), and when the latest was taken."""

    __slots__ = ("samples", "taken_at")

    def __init__(self) -> None:
        self.samples: list[Any] = []
        self.taken_at: float | None = None


class _Procs:
    """What is known of the processes on one GPU or MIG device between cycles: the last set listed, and
    which of them are MPS servers (their clients are listed apart, and stand for them)."""

    __slots__ = ("last", "servers")

    def __init__(self) -> None:
        self.last: frozenset[int] | None = None
        self.servers: frozenset[int] = frozenset()


class _Instance:
    """A MIG GPU instance: its compute instances' MIG device handles, GPM samples and processes."""

    def __init__(self, gi: int, uuid: str, handle: Any, weight: float):
        self.gi = gi
        self.uuid = uuid
        self.handles = [handle]
        self.weight = weight  # its SMs: the GPU's activity weighs its instances by them
        self.gpm = _GpmPair()
        self.procs = [_Procs()]


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
        self.gpm_pair = _GpmPair()
        self.procs = _Procs()
        self.mig: bool | None = None  # None: not read yet, or the GPU has no MIG mode
        self.instances: list[_Instance] = []
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

    An event names its device by a handle NVML fills in (`nvmlEventData_t.device`):
    on a MIG-enabled GPU an event of one instance may name that instance's MIG
    device, not the GPU. The GPU is found by UUID (a MIG device's through its
    parent), the one stable key; by the handle's address only when NVML cannot
    say the UUID (a GPU fallen off the bus: XID 79).
    """

    def __init__(self, nvml: Any, wait_ms: int = 5000, clock: Callable[[], float] = time.time):
        self._nvml = nvml
        self._wait_ms = wait_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, dict[int, int]] = {}
        self._last: dict[str, dict[int, float]] = {}
        self._handles: dict[int, str] = {}
        self._uuids: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def watch(self, gpus: list[_Gpu]) -> None:
        """(Re)start watching the given GPUs' handles."""
        self.stop()
        self._stop = threading.Event()
        self._handles = {_handle_key(g.handle): g.uuid for g in gpus if g.up}
        self._uuids = frozenset(self._handles.values())
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
                    self._record(self._gpu_of(data.device), int(data.eventData))
        finally:
            try:
                nvml.nvmlEventSetFree(event_set)
            except N.NVMLError:
                pass

    def _gpu_of(self, device: Any) -> str | None:
        """The UUID of the watched GPU an event's device handle names (an event is rare: two calls at most)."""
        nvml = self._nvml
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(device))
            if uuid.startswith("MIG-"):
                uuid = _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(device)))
        except N.NVMLError:
            return self._handles.get(_handle_key(device))
        return uuid if uuid in self._uuids else None

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
        self._worked = False  # NVML initialised once in this process: the library loaded matched a driver
        self._library_backoff = _Backoff()
        self._library_error = N.NVMLError(N.NVML_ERROR_UNINITIALIZED)
        self.down: str | None = None
        """Why NVML cannot be used, while it cannot (`explain`); None once it answers."""
        self._gpus: list[_Gpu] = []
        self.driver_version = ""
        self.nvml_version = ""
        self.xid = XidRecorder(nvml, clock=wall)
        self._announced: set[str] = set()  # refused or missing calls already logged
        self._unknown_fields: set[str] = set()  # field ids this driver does not know (INVALID_ARGUMENT)
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
            replaced = self._worked and exc.value == N.NVML_ERROR_LIB_RM_VERSION_MISMATCH
            down = DriverReplaced(exc) if replaced else LibraryDown(exc)
            if self.down != down.explanation:  # once per cause, not once per retry
                log.error("NVML cannot be used", reason=down.reason, why=down.explanation)
            self.down = down.explanation
            raise down from exc
        self._library_backoff.reset()
        self._initialised = self._worked = True
        self.down = None
        known = {g.index: g for g in self._gpus}
        self._gpus = [known.get(i) or _Gpu(i) for i in range(count)]
        for gpu in self._gpus:
            self._acquire(gpu)
        self.xid.watch(self._gpus)

    def _free_gpm(self, gpu: _Gpu) -> None:
        """GPM samples are driver memory: give them back before dropping a handle."""
        for pair in [gpu.gpm_pair] + [i.gpm for i in gpu.instances]:
            self._free_pair(pair)

    def _free_pair(self, pair: _GpmPair) -> None:
        for sample in pair.samples:
            try:
                self.nvml.nvmlGpmSampleFree(sample)
            except N.NVMLError:
                pass  # the GPU or the library is gone, and the memory with it
        pair.samples = []
        pair.taken_at = None

    def _drop_library(self) -> None:
        self.xid.stop()
        for gpu in self._gpus:
            gpu.up = False
            self._free_gpm(gpu)
            gpu.instances = []
            gpu.mig = None
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
            if exc.value in LIBRARY_DOWN or exc.value == N.NVML_ERROR_FUNCTION_NOT_FOUND:
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
        gpu.instances = []  # MIG device handles are the GPU's: read again with its mode
        gpu.mig = None
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
        """One NVML getter on the GPU, classified: None when unsupported, refused or failed this cycle."""
        return self._call_on(gpu, gpu.handle, key, problems, fn, *args)

    def _call_on(self, gpu: _Gpu, handle: Any, key: str, problems: list[str], fn: Callable, *args: Any) -> Any:
        """`_call` on a handle of the GPU's (its own, or a MIG device's), the outcome kept with the GPU."""
        if key in gpu.unsupported or not self._allowed(gpu, key):
            return None
        try:
            return fn(handle, *args)
        except N.NVMLError as exc:
            return self._classify(gpu, key, exc, problems)

    def _classify(self, gpu: _Gpu, key: str, exc: N.NVMLError, problems: list[str]) -> None:
        if exc.value in UNSUPPORTED:
            gpu.unsupported.add(key)
            if exc.value == N.NVML_ERROR_FUNCTION_NOT_FOUND:
                self._announce(f"missing:{key}", "this driver's NVML library lacks the function pynvml calls; "
                               "that reading is left out", call=key, driver=self.driver_version)
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

    def _announce(self, key: str, event: str, **kw: Any) -> None:
        """Log once for the node, not once per GPU and cycle."""
        if key not in self._announced:
            self._announced.add(key)
            log.warning(event, **kw)

    def _fields(self, gpu: _Gpu, wanted: dict[str, int], problems: list[str]) -> dict[str, float]:
        unknown = self._unknown_fields
        names = [k for k in wanted if k not in unknown and f"field:{k}" not in gpu.unsupported]
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
            elif ret == N.NVML_ERROR_INVALID_ARGUMENT:
                # a field id the driver does not know (older than the id): never asked again, on any GPU
                unknown.add(name)
                self._announce(f"field:{name}", "this driver does not know an NVML field; it is not asked again",
                               field=name, field_id=wanted[name], driver=self.driver_version)
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
        slow = gpu.last_slow_at is None or now - gpu.last_slow_at >= self.slow_interval
        if slow:
            self._read_mig(gpu, problems)
        s = GpuSample(gpu.index, gpu.uuid, gpu.model, gpu.pci_bus_id, mig=gpu.mig)

        if gpu.mig:  # no utilisation on a MIG GPU (nvml.h); processes and memory per instance
            s.instances = tuple(self._sample_instance(gpu, inst, problems) for inst in gpu.instances)
            pids = {p for i in s.instances for p in i.pids}
            s.processes, s.pids = len(pids), tuple(sorted(pids))
            used = [i.memory_used_bytes for i in s.instances if i.memory_used_bytes is not None]
            total = [i.memory_total_bytes for i in s.instances if i.memory_total_bytes is not None]
            s.memory_used_bytes = sum(used) if used else None
            s.memory_total_bytes = sum(total) if total else None
        else:
            util = self._call(gpu, "utilization", problems, nvml.nvmlDeviceGetUtilizationRates)
            if util is not None:
                s.utilization = util.gpu / 100.0
            procs = self._processes(gpu, gpu.handle, gpu.procs, problems)
            if procs is not None:
                s.processes = len(procs)
                s.pids = tuple(sorted(procs))
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
            self._sample_gpm(gpu, s, problems)  # on a MIG GPU too: the whole GPU's, and its PCIe and NVLink bytes
        if gpu.mig:
            s.gpm = _mig_activity(gpu.instances, s.instances)  # the job's instances, not the whole GPU
        with_gpm = gpu.gpm and "gpm" not in gpu.refused
        if not with_gpm:
            self._pcie_from_counters(gpu, problems)
        self._carry_byte_totals(gpu, s)
        s.activity_source = "gpm" if with_gpm else ("none" if gpu.mig else "utilization")
        s.refused = tuple(sorted(gpu.refused))

        self._sample_slow(gpu, s, now, slow, problems)
        s.xid_counts, s.xid_last_seen = self.xid.read(gpu.uuid)
        return s

    def _processes(self, gpu: _Gpu, handle: Any, known: _Procs, problems: list[str]) -> list[int] | None:
        """The PIDs of the compute processes on a GPU or MIG device, an MPS server's clients in its place.

        One call a cycle while no MPS server is known; the clients' list also when new processes appear
        (are they MPS servers?), and each cycle while a known server holds the device."""
        listed = self._call_on(gpu, handle, "processes", problems, self.nvml.nvmlDeviceGetComputeRunningProcesses)
        if listed is None:
            known.last = None  # not known now: a GPU turned to MIG refuses them, and must not look in use
            return None
        pids = frozenset(int(p.pid) for p in listed)
        if pids != known.last:
            known.last = pids
            known.servers &= pids
            if pids - known.servers:
                clients = self._mps_clients(gpu, handle, problems)
                if clients:  # what the list shows beside an MPS server's clients is the server
                    known.servers |= pids - clients
                return _without_servers(pids, known.servers, clients) if known.servers else list(pids)
        if not known.servers:
            return list(pids)
        return _without_servers(pids, known.servers, self._mps_clients(gpu, handle, problems))

    def _mps_clients(self, gpu: _Gpu, handle: Any, problems: list[str]) -> set[int]:
        clients = self._call_on(gpu, handle, "mps_processes", problems,
                                self.nvml.nvmlDeviceGetMPSComputeRunningProcesses)
        return {int(p.pid) for p in clients or ()}

    def _refused(self, gpu: _Gpu, key: str) -> None:
        gpu.refused[key] = self._clock()
        self._announce(key, "NVML refuses this call to the agent's user; not calling it again for a while",
                       call=key, retry_after_seconds=REPROBE_AFTER, remedy=GPM_REMEDY if key == "gpm" else None)

    def _granted(self, gpu: _Gpu) -> None:
        """A GPM sample was taken: profiling is (again) allowed to this user."""
        if gpu.refused.pop("gpm", None) is not None and "gpm" in self._announced:
            self._announced.discard("gpm")
            log.info("GPU profiling granted: SM activity from GPM again")

    def _gpm_window(self, pair: _GpmPair, read: Callable, *args: Any) -> tuple[Any, Any, float | None]:
        """A new GPM sample into `pair` (`read(*args, sample)`, raises NVMLError): the previous and the new
        sample, and the seconds between them (None for the first)."""
        nvml = self.nvml
        if not pair.samples:
            pair.samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
        prev, cur = pair.samples
        read(*args, cur)
        taken_at = self._clock()
        window = None if pair.taken_at is None else taken_at - pair.taken_at
        pair.taken_at = taken_at
        pair.samples = [cur, prev]  # this sample becomes the baseline of the next tick
        return prev, cur, window

    def _gpm_metrics(self, prev: Any, cur: Any) -> list:
        if self._gpm_request is None:
            self._gpm_request = _GpmRequest()
        return self._gpm_request.get(self.nvml, prev, cur)

    def _sample_gpm(self, gpu: _Gpu, s: GpuSample, problems: list[str]) -> None:
        try:
            prev, cur, window = self._gpm_window(gpu.gpm_pair, self.nvml.nvmlGpmSampleGet, gpu.handle)
        except N.NVMLError as exc:
            self._gpm_failed(gpu, gpu.gpm_pair, exc, problems)
            return
        self._granted(gpu)
        if window is None or window <= 0:
            return
        try:
            metrics = self._gpm_metrics(prev, cur)
        except N.NVMLError as exc:
            self._gpm_failed(gpu, gpu.gpm_pair, exc, problems)
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

    def _gpm_failed(self, gpu: _Gpu, pair: _GpmPair, exc: N.NVMLError, problems: list[str]) -> None:
        if exc.value in UNSUPPORTED:
            gpu.gpm = False  # fall back to cumulative PCIe fields from the next tick
            return
        pair.taken_at = None  # the next granted sample starts a new window
        self._classify(gpu, "gpm", exc, problems)

    # -- MIG ---------------------------------------------------------------------

    def _read_mig(self, gpu: _Gpu, problems: list[str]) -> None:
        """The slow tier: MIG mode, and, while it is on, the GPU instances (they come and go without a change
        of mode). A change of mode changes what the GPU answers: what it did not support or refused is asked
        again.
        A GPU without MIG running processes keeps its mode (module doc): not asked."""
        in_use = gpu.mig is False and bool(gpu.procs.last)
        mode = None if in_use else self._call(gpu, "mig_mode", problems, self.nvml.nvmlDeviceGetMigMode)
        on = None if mode is None else mode[0] == N.NVML_DEVICE_MIG_ENABLE
        if on is not None and gpu.mig is not None and on != gpu.mig:
            log.info("MIG mode changed", gpu=gpu.index, uuid=gpu.uuid, mig=on)
            gpu.unsupported.clear()
            gpu.refused.clear()  # a MIG GPU refuses its processes and memory to an unprivileged user (nvml.h)
            gpu.gpm = self._gpm_supported(gpu.handle)
            self._free_gpm(gpu)
            gpu.procs = _Procs()
        if on is not None:
            gpu.mig = on
        if gpu.mig:
            self._read_instances(gpu, problems)
        elif gpu.instances:
            self._free_gpm(gpu)
            gpu.instances = []
        for known in [gpu.procs] + [p for i in gpu.instances for p in i.procs]:
            known.last = None  # ask once whether the processes are MPS servers (one started idle, then served)

    def _read_instances(self, gpu: _Gpu, problems: list[str]) -> None:
        nvml = self.nvml
        count = self._call(gpu, "mig_devices", problems, nvml.nvmlDeviceGetMaxMigDeviceCount) or 0
        kept = {i.uuid: i for i in gpu.instances}
        found: dict[int, _Instance] = {}
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                inst = kept.pop(uuid, None)
                if inst is None:
                    gi = int(nvml.nvmlDeviceGetGpuInstanceId(handle))
                    if gi in found:  # another compute instance of that GPU instance
                        found[gi].handles.append(handle)
                        found[gi].procs.append(_Procs())
                        continue
                    sms = float(nvml.nvmlDeviceGetAttributes(handle).multiprocessorCount)
                    inst = _Instance(gi, uuid, handle, sms)
                else:
                    inst.handles = [handle]  # handles may be reused and change (nvml.h)
                    inst.procs = inst.procs[:1]
                found.setdefault(inst.gi, inst)
            except N.NVMLError as exc:
                if exc.value == N.NVML_ERROR_NOT_FOUND:
                    continue  # no MIG device at that index
                self._classify(gpu, "mig_devices", exc, problems)
        for gone in kept.values():
            self._free_pair(gone.gpm)
        gpu.instances = sorted(found.values(), key=lambda i: i.gi)

    def _sample_instance(self, gpu: _Gpu, inst: _Instance, problems: list[str]) -> InstanceSample:
        nvml = self.nvml
        out = InstanceSample(inst.gi, inst.uuid)
        pids: set[int] = set()
        for handle, known in zip(inst.handles, inst.procs):
            pids.update(self._processes(gpu, handle, known, problems) or ())
        out.pids = tuple(sorted(pids))
        mem = self._call_on(gpu, inst.handles[0], "memory", problems, nvml.nvmlDeviceGetMemoryInfo)
        if mem is not None:  # the GPU instance's memory, which its compute instances share
            out.memory_used_bytes, out.memory_total_bytes = float(mem.used), float(mem.total)
        if gpu.gpm and self._allowed(gpu, "gpm"):
            try:
                prev, cur, window = self._gpm_window(inst.gpm, nvml.nvmlGpmMigSampleGet, gpu.handle, inst.gi)
                self._granted(gpu)
                if window is not None and window > 0:
                    for name, metric in zip(GPM_METRICS, self._gpm_metrics(prev, cur)):
                        if name in GPM_RATIOS and metric.nvmlReturn == N.NVML_SUCCESS:
                            out.gpm[name] = max(0.0, min(1.0, metric.value / 100.0))
            except N.NVMLError as exc:
                self._gpm_failed(gpu, inst.gpm, exc, problems)
        return out

    # -- slow tier ---------------------------------------------------------------

    def _sample_slow(self, gpu: _Gpu, s: GpuSample, now: float, due: bool, problems: list[str]) -> None:
        """The slow tier: read every `slow_interval`, carried by every sample between."""
        if due:
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


def _without_servers(pids: frozenset[int], servers: frozenset[int], clients: set[int]) -> list[int]:
    """The processes listed less the MPS servers, and the servers' clients, each once."""
    return [p for p in pids if p not in servers] + [c for c in clients if c not in pids]


def _mig_activity(instances: list[_Instance], samples: tuple[InstanceSample, ...]) -> dict[str, float]:
    """A MIG GPU's GPM ratios: those of its instances that hold processes (the job's), weighted by their
    SMs; of all its instances while none does."""
    measured = [(inst.weight, s) for inst, s in zip(instances, samples) if s.gpm]
    held = [(w, s) for w, s in measured if s.pids] or measured
    out: dict[str, float] = {}
    for name in GPM_RATIOS:
        parts = [(w, s.gpm[name]) for w, s in held if name in s.gpm]
        total = sum(w for w, _ in parts)
        if total > 0:
            out[name] = sum(w * v for w, v in parts) / total
    return out
