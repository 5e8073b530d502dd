"""Cost of one GPU sampling cycle on the simulated 8-GPU node, and of rendering it.

Reference run in the same process: the same fake-NVML calls made bare, without
the collector, so `collector_over_fake` is the collector's own overhead as a
ratio. The real-hardware estimate adds the driver cost of those calls as
measured on an H200 (../shared/fixtures/h200/call_costs.json medians).
`mig_over_plain`: the same node with two GPUs in MIG mode (two GPU instances
each, read per instance), against the plain node in the same run; with the
NVML calls each makes a cycle.

    python -m bench.gpu_cycle [--cycles N] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import pynvml as N

from bench.common import emit, summary_ms
from stoker.exporters import gpu as gpu_families
from stoker.exporters.exposition import render
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim import scenarios
from stoker.sim.node import SimNode
from stoker.sources.gpu import GPM_METRICS, GpuSource

# Driver time per GPU per fast cycle on a real H200, microseconds (call_costs.json medians):
# utilization 14.2, memory 27.7, power 15.9, clock event reasons 18.0, compute processes 40.5,
# GPM sample + metrics 184.2. Temperatures (15.7, and ~43 for the memory's in a field batch) and the
# SM clock (12.8) are read on the slow tier.
H200_FAST_US_PER_GPU = 14.2 + 27.7 + 15.9 + 18.0 + 40.5 + 184.2


def bare_calls(fake: FakeNVML, handles: list, samples: list) -> None:
    """The fake-NVML work of one fast cycle, with no collector logic around it."""
    for h, (a, b) in zip(handles, samples):
        fake.nvmlDeviceGetUtilizationRates(h)
        fake.nvmlDeviceGetComputeRunningProcesses(h)
        fake.nvmlDeviceGetMemoryInfo(h)
        fake.nvmlDeviceGetPowerUsage(h)
        fake.nvmlDeviceGetCurrentClocksEventReasons(h)
        fake.nvmlGpmSampleGet(h, b)
        req = N.c_nvmlGpmMetricsGet_t()
        req.version = N.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(GPM_METRICS)
        req.sample1, req.sample2 = a, b
        for i, m in enumerate(GPM_METRICS.values()):
            req.metrics[i].metricId = m
        fake.nvmlGpmMetricsGet(req)


def collector_cycles(fake: FakeNVML, cycles: int) -> tuple[list[float], list[float], float, GpuSource]:
    """CPU of each collector cycle and of rendering it; the NVML calls a cycle makes, on average; the source
    (to close once the fake is no longer needed)."""
    source = GpuSource(fake, slow_interval=10.0)
    source.sample()
    time.sleep(0.01)
    fake.calls.clear()
    collector_cpu, render_cpu = [], []
    for _ in range(cycles):
        t0 = time.thread_time()
        snapshot = source.sample()
        t1 = time.thread_time()
        render(gpu_families.families(snapshot))
        t2 = time.thread_time()
        collector_cpu.append(t1 - t0)
        render_cpu.append(t2 - t1)
    return collector_cpu, render_cpu, sum(fake.calls.values()) / cycles, source


def run(cycles: int) -> dict:
    fake = FakeNVML(SimNode("cycle"))
    collector_cpu, render_cpu, calls, source = collector_cycles(fake, cycles)
    mig_fake = FakeNVML(SimNode(dataclasses.replace(scenarios.get("cycle"), mig=(0, 1))))
    mig_cpu, _, mig_calls, mig_source = collector_cycles(mig_fake, cycles)
    mig_source.close()

    handles = [g.handle for g in fake.gpus]
    samples = []
    for h in handles:
        a, b = fake.nvmlGpmSampleAlloc(), fake.nvmlGpmSampleAlloc()
        fake.nvmlGpmSampleGet(h, a)
        samples.append((a, b))
    bare_cpu = []
    for _ in range(cycles):
        t0 = time.thread_time()
        bare_calls(fake, handles, samples)
        bare_cpu.append(time.thread_time() - t0)
    source.close()

    cycle = summary_ms(collector_cpu)
    bare = summary_ms(bare_cpu)
    overhead_ms = max(0.0, cycle["mean_ms"] - bare["mean_ms"])
    real_estimate_ms = overhead_ms + 8 * H200_FAST_US_PER_GPU / 1000
    return {
        "gpus": 8,
        "cycle_cpu_with_fake": cycle,
        "fake_nvml_alone": bare,
        "collector_over_fake": round(cycle["mean_ms"] / bare["mean_ms"], 3),
        "collector_overhead_ms": round(overhead_ms, 4),
        "render_cpu": summary_ms(render_cpu),
        "estimated_real_cycle_ms": round(real_estimate_ms, 3),
        "estimated_core_share_at_1s": round(real_estimate_ms / 1000, 5),
        "simulated_core_share_at_1s": round((cycle["mean_ms"] + summary_ms(render_cpu)["mean_ms"]) / 1000, 5),
        "nvml_calls_per_cycle": round(calls, 2),
        "mig_two_gpus": {"cycle_cpu": summary_ms(mig_cpu), "nvml_calls_per_cycle": round(mig_calls, 2),
                         "mig_over_plain": round(summary_ms(mig_cpu)["mean_ms"] / cycle["mean_ms"], 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("gpu_cycle", run(args.cycles), args.out)


if __name__ == "__main__":
    main()
