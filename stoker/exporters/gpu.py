"""GPU samples as the `stoker_gpu_*` families of METRICS.md.

A value of None in a sample means "absent": that series is left out rather
than exported as zero, so an unsupported reading never looks like an idle GPU.
A GPU that is down keeps only `stoker_gpu_info` and `stoker_gpu_up 0`.
A MIG-enabled GPU's instances are series of their own, labelled by GPU
instance id (`stoker_gpu_instance_*`).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from stoker.sources.gpu import GpuSample, GpuSnapshot

L = ["gpu", "uuid"]

# (attribute of GpuSample, metric name, help, is counter)
SCALARS = [
    ("utilization", "stoker_gpu_utilization_ratio", "NVML utilization.gpu / 100 (counts copy engines and NCCL spin as busy).", False),
    ("pcie_tx_bytes", "stoker_gpu_pcie_transmit_bytes", "PCIe bytes sent by the GPU.", True),
    ("pcie_rx_bytes", "stoker_gpu_pcie_receive_bytes", "PCIe bytes received by the GPU.", True),
    ("nvlink_tx_bytes", "stoker_gpu_nvlink_transmit_bytes", "NVLink bytes sent, all links.", True),
    ("nvlink_rx_bytes", "stoker_gpu_nvlink_receive_bytes", "NVLink bytes received, all links.", True),
    ("memory_used_bytes", "stoker_gpu_memory_used_bytes", "Framebuffer memory in use.", False),
    ("memory_total_bytes", "stoker_gpu_memory_total_bytes", "Framebuffer memory size.", False),
    ("power_watts", "stoker_gpu_power_watts", "Power draw.", False),
    ("power_limit_watts", "stoker_gpu_power_limit_watts", "Enforced power limit.", False),
    ("energy_joules", "stoker_gpu_energy_joules", "Energy consumed since the driver loaded.", True),
    ("sm_clock_hertz", "stoker_gpu_sm_clock_hertz", "Current SM clock.", False),
    ("pcie_replays", "stoker_gpu_pcie_replays", "PCIe replays.", True),
    ("processes", "stoker_gpu_compute_processes", "Compute processes running on the GPU.", False),
]

GPM = [
    ("sm_active", "stoker_gpu_sm_active_ratio", "GPM SM activity / 100."),
    ("sm_occupancy", "stoker_gpu_sm_occupancy_ratio", "GPM SM occupancy / 100."),
    ("tensor_active", "stoker_gpu_tensor_active_ratio", "GPM any-tensor activity / 100."),
    ("dram_active", "stoker_gpu_dram_active_ratio", "GPM DRAM bandwidth utilisation / 100."),
]

# (attribute holding a dict, metric name, help, extra label, is counter)
KEYED = [
    ("temperature", "stoker_gpu_temperature_celsius", "Temperatures.", "sensor", False),
    ("throttle_seconds", "stoker_gpu_throttle_seconds", "Time with that clock event (throttle) reason active.", "reason", True),
    ("ecc_errors", "stoker_gpu_ecc_errors", "Volatile ECC errors.", "type", True),
    ("remapped_rows", "stoker_gpu_remapped_rows", "Row remapping state.", "kind", False),
]


def _family(name: str, help_text: str, labels: list[str], counter: bool) -> Metric:
    cls = CounterMetricFamily if counter else GaugeMetricFamily
    return cls(name, help_text, labels=labels)


def families(snapshot: GpuSnapshot) -> Iterable[Metric]:
    gpus = snapshot.gpus
    info = GaugeMetricFamily("stoker_gpu_info", "GPU identity.",
                             labels=["gpu", "uuid", "model", "pci_bus_id", "driver_version"])
    up = GaugeMetricFamily("stoker_gpu_up", "1 while NVML answers for this GPU, 0 when it is lost.", labels=L)
    for g in gpus:
        info.add_metric([str(g.index), g.uuid, g.model, g.pci_bus_id, snapshot.driver_version], 1)
        up.add_metric(_ids(g), 1 if g.up else 0)
    out: list[Metric] = [info, up]
    live = [g for g in gpus if g.up]

    for attr, name, help_text, counter in SCALARS:
        fam = _family(name, help_text, L, counter)
        for g in live:
            value = getattr(g, attr)
            if value is not None:
                fam.add_metric(_ids(g), value)
        out.append(fam)
    for key, name, help_text in GPM:
        fam = GaugeMetricFamily(name, help_text, labels=L)
        for g in live:
            if key in g.gpm:
                fam.add_metric(_ids(g), g.gpm[key])
        out.append(fam)
    for attr, name, help_text, label, counter in KEYED:
        fam = _family(name, help_text, L + [label], counter)
        for g in live:
            for k, value in getattr(g, attr).items():
                fam.add_metric(_ids(g) + [k], value)
        out.append(fam)

    source = GaugeMetricFamily("stoker_gpu_activity_source", "1 for where the GPU's busy ratio comes from: gpm "
                               "(SM activity), utilization (utilization.gpu bounded by power draw), or none (a "
                               "MIG-enabled GPU without GPM: NVML gives no activity).", labels=L + ["source"])
    denied = GaugeMetricFamily("stoker_gpu_permission_denied", "1 for each NVML call refused to the agent's user "
                               "(gpm: profiling restricted to administrators).", labels=L + ["call"])
    for g in live:
        if g.activity_source:
            source.add_metric(_ids(g) + [g.activity_source], 1)
        for call in g.refused:
            denied.add_metric(_ids(g) + [call], 1)
    out += [source, denied]
    out += _mig(live)

    xid = CounterMetricFamily("stoker_gpu_xid_errors", "XID events.", labels=L + ["xid"])
    xid_ts = GaugeMetricFamily("stoker_gpu_xid_last_timestamp_seconds", "When that XID was last seen.",
                               labels=L + ["xid"])
    for g in gpus:  # XIDs matter most when the GPU is down: keep them
        for code, n in g.xid_counts.items():
            xid.add_metric(_ids(g) + [str(code)], n)
            xid_ts.add_metric(_ids(g) + [str(code)], g.xid_last_seen.get(code, 0.0))
    out += [xid, xid_ts]
    return out


INSTANCE_GPM = [
    ("sm_active", "stoker_gpu_instance_sm_active_ratio", "GPM SM activity of the MIG GPU instance / 100."),
    ("sm_occupancy", "stoker_gpu_instance_sm_occupancy_ratio", "GPM SM occupancy of the MIG GPU instance / 100."),
    ("tensor_active", "stoker_gpu_instance_tensor_active_ratio",
     "GPM any-tensor activity of the MIG GPU instance / 100."),
    ("dram_active", "stoker_gpu_instance_dram_active_ratio", "GPM DRAM bandwidth utilisation of the MIG GPU "
     "instance / 100."),
]


def _mig(gpus: list[GpuSample]) -> list[Metric]:
    """MIG mode where the GPU has one, and each GPU instance of a MIG-enabled GPU."""
    mode = GaugeMetricFamily("stoker_gpu_mig_enabled", "1 while the GPU is in MIG mode, 0 when it is not.", labels=L)
    il = L + ["gpu_instance"]
    info = GaugeMetricFamily("stoker_gpu_instance_info", "MIG GPU instance identity: mig_uuid names its first "
                             "compute instance, as CUDA_VISIBLE_DEVICES does.", labels=il + ["mig_uuid"])
    procs = GaugeMetricFamily("stoker_gpu_instance_compute_processes", "Compute processes in the MIG GPU instance.",
                              labels=il)
    used = GaugeMetricFamily("stoker_gpu_instance_memory_used_bytes", "Framebuffer memory in use in the MIG GPU "
                             "instance.", labels=il)
    total = GaugeMetricFamily("stoker_gpu_instance_memory_total_bytes", "Framebuffer memory of the MIG GPU instance.",
                              labels=il)
    ratios = [(key, GaugeMetricFamily(name, help_text, labels=il)) for key, name, help_text in INSTANCE_GPM]
    for g in gpus:
        if g.mig is not None:
            mode.add_metric(_ids(g), 1 if g.mig else 0)
        for inst in g.instances:
            ids = _ids(g) + [str(inst.gpu_instance)]
            info.add_metric(ids + [inst.uuid], 1)
            procs.add_metric(ids, len(inst.pids))
            if inst.memory_used_bytes is not None:
                used.add_metric(ids, inst.memory_used_bytes)
            if inst.memory_total_bytes is not None:
                total.add_metric(ids, inst.memory_total_bytes)
            for key, fam in ratios:
                if key in inst.gpm:
                    fam.add_metric(ids, inst.gpm[key])
    return [mode, info, procs, used, total, *(fam for _, fam in ratios)]


def _ids(g: GpuSample) -> list[str]:
    return [str(g.index), g.uuid]
