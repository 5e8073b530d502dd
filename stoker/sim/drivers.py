"""What each NVIDIA driver branch answers the agent, for the fake NVML: from NVIDIA's sources, not our code.

A profile holds what differs between the branches the agent supports for the calls it makes:

- The field ids the driver knows are those its NVML header defines: nvml.h as NVIDIA ships it with the
  CUDA release of that branch, kept in NVIDIA/go-nvml (pkg/nvml/nvml.h at the commits "Bump to NVML
  version 12.2" (NVML 12.2.140, CUDA 12.2: R535), "Bump to NVML version 12.4" (12.4.127, CUDA 12.4: R550),
  "Bump to NVML version 12.8" (12.8.90, CUDA 12.8: R570)). The version strings are releases of each branch.
  A driver answers an id it does not know with NVML_ERROR_INVALID_ARGUMENT in that field's nvmlReturn: the
  recorded H200 on 580.159.04 does for ids 289-293 (data/inventory.json). So the PCIe byte counters (197,
  198: NVML change log, "Changes between v550 and v555") are INVALID_ARGUMENT before R555; the v550 header
  skips 197 and 198 and defines 199 (NVML_FI_DEV_IS_MIG_MODE_INDEPENDENT_MIG_QUERY_CAPABLE).
- "580" is the recording itself (the default): the ids it answered, including 301 and 302, which its
  header (NVML 13.0.39, ids 1-273) does not define yet.
- What a known id answers (a value, or NOT_SUPPORTED on this board) is the recording's: the same Hopper
  board answers the same on each branch.
- Compute-process entries are nvmlProcessInfo_v2_t (pid, usedGpuMemory, gpuInstanceId, computeInstanceId:
  24 bytes) from the 12.2 header on (`nvmlProcessInfo_v2_t, nvmlProcessInfo_t`), although
  nvmlDeviceGetComputeRunningProcesses_v3 kept its name; the R535 drivers before 535.86 wrote a 32-byte
  entry (with usedGpuCcProtectedMemory), which nvidia-ml-py 12.535.77 reads and every later driver does
  not write (XuehaiPan/nvitop pull request 79; pynvml.py of 12.535.77 against 12.535.108).
- NVML_ERROR_GPU_NOT_FOUND exists from R545 (NVML change log, "Changes between v535 and v545").
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class DriverProfile:
    name: str  # the branch: what a scenario's `driver` names
    version: str  # nvmlSystemGetDriverVersion
    nvml_version: str  # nvmlSystemGetNVMLVersion
    fields: tuple[tuple[int, int], ...]  # the field ids it knows, as inclusive ranges
    gpu_not_found: bool  # nvmlInit answers NVML_ERROR_GPU_NOT_FOUND on a node without a GPU (else 0 GPUs)
    source: str

    def knows(self, field_id: int) -> bool:
        return any(low <= field_id <= high for low, high in self.fields)


PROFILES = {p.name: p for p in (
    DriverProfile("535", "535.104.05", "12.535.104.05", ((1, 196),), False,
                  "NVIDIA/go-nvml pkg/nvml/nvml.h, NVML 12.2.140: NVML_FI_MAX 197"),
    DriverProfile("550", "550.54.15", "12.550.54.15", ((1, 196), (199, 199)), True,
                  "NVIDIA/go-nvml pkg/nvml/nvml.h, NVML 12.4.127: NVML_FI_MAX 200, no 197/198"),
    DriverProfile("570", "570.86.10", "12.570.86.10", ((1, 230), (235, 268)), True,
                  "NVIDIA/go-nvml pkg/nvml/nvml.h, NVML 12.8.90: NVML_FI_MAX 269, no 231-234"),
    DriverProfile("580", "580.159.04", "13.580.159.04", ((1, 273), (301, 302)), True,
                  "the H200 recording (data/inventory.json): INVALID_ARGUMENT for 289-293"),
)}
DEFAULT = "580"
