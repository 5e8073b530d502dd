"""The GPU collector on a real GPU node: every exported value against nvidia-smi read at the same
moment, and the cost of one NVML cycle.

    python -m bench.nvml_check [--seconds 60] [--interval 1] [--out FILE]

For `seconds` it runs `GpuSource` on the real NVML (pynvml) every `interval`, as the agent does,
and around each cycle reads what nvidia-smi says:

- `nvidia-smi -q -x` right after the cycle: utilisation, framebuffer used and total, power draw
  and enforced limit, GPU and memory temperature, SM clock, clock event reasons, compute
  processes, volatile ECC totals, remapped rows, PCIe replays (the temperatures and the SM clock
  on the cycles that read them: the slow tier's, every `slow_interval`);
- `nvidia-smi dmon -s t -o T` running beside it: PCIe RX/TX throughput each second, against the
  collector's PCIe byte counters over the same seconds;
- `nvidia-smi nvlink -gt d` after each cycle: NVLink data counters, against the collector's
  NVLink byte counters over the same window;
- energy: the collector's energy counter over the run against the power it read, integrated.

Each comparison has a tolerance (`TOLERANCES`, for values that nvidia-smi reads a few hundred
milliseconds apart from the collector, or averages differently); the report gives, per field and
GPU, the share of readings within it, the largest difference, and `agree` when every reading of
every GPU is within it. The cost: CPU (thread time) and wall time of each cycle, p50/p99, and the
share of one core at `interval`. Needs an NVIDIA driver, pynvml and nvidia-smi; run as the agent's
user to see what it sees (GPM needs the profiling permission, docs/OPERATIONS.md).

    python -m bench.nvml_check --fake [--profile NAME] [--seconds 30] [--out FILE]

Without a GPU: the same comparisons against the fake NVML's driver profiles (`FAKE_PROFILES`: each driver
branch of stoker/sim/drivers.py, MIG on two GPUs, MPS, GPM refused), the simulated node's own values in
place of nvidia-smi's (`FakeNVML.truth`), on a manual clock. Per profile: agreement, which readings the
collector has and leaves out, where the busy ratio comes from, the problems it counted, the cycle's CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

from bench.common import emit, summary_ms

MIB = 1 << 20
NUMBER = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)")

# field -> (absolute tolerance, relative tolerance): |collector - smi| <= abs + rel * |smi|
TOLERANCES = {
    "utilization_ratio": (0.10, 0.0),  # both sample a window; the windows differ
    "memory_used_bytes": (256 * MIB, 0.02),
    "memory_total_bytes": (2 * MIB, 0.0),
    "power_watts": (15.0, 0.10),  # 1 s averages, read some 100 ms apart
    "power_limit_watts": (1.0, 0.0),
    "temperature_gpu": (2.0, 0.0),
    "temperature_memory": (2.0, 0.0),
    "sm_clock_hertz": (30e6, 0.05),
    "processes": (0.0, 0.0),
    "ecc_corrected": (0.0, 0.0),
    "ecc_uncorrected": (0.0, 0.0),
    "remapped_correctable": (0.0, 0.0),
    "remapped_uncorrectable": (0.0, 0.0),
    "remapped_pending": (0.0, 0.0),
    "remapped_failure": (0.0, 0.0),
    "pcie_replays": (0.0, 0.0),
    "pcie_rx_bytes_per_second": (20e6, 0.15),
    "pcie_tx_bytes_per_second": (20e6, 0.15),
    "nvlink_rx_bytes_per_second": (5e6, 0.15),
    "nvlink_tx_bytes_per_second": (5e6, 0.15),
    "energy_joules_over_run": (50.0, 0.10),  # against the power readings integrated
    "throttle_active": (0.0, 0.0),  # a clock event reason active now and in the collector's last interval
}


def _number(text: str | None) -> float | None:
    m = NUMBER.match(text or "")
    return float(m.group(1)) if m else None


def _text(node: ET.Element | None, *paths: str) -> str | None:
    """The text of the first of `paths` under `node` that exists (nvidia-smi renames tags across drivers)."""
    if node is None:
        return None
    for path in paths:
        found = node.find(path)
        if found is not None and found.text is not None:
            return found.text.strip()
    return None


def parse_smi_xml(text: str) -> dict[str, dict[str, float]]:
    """`nvidia-smi -q -x` as {uuid: {field: value}} in the collector's units (N/A left out)."""
    out: dict[str, dict[str, float]] = {}
    root = ET.fromstring(text)
    for gpu in root.findall("gpu"):
        uuid = _text(gpu, "uuid") or ""
        v: dict[str, float] = {}

        def put(name: str, value: float | None, scale: float = 1.0) -> None:
            if value is not None:
                v[name] = value * scale

        put("utilization_ratio", _number(_text(gpu, "utilization/gpu_util")), 0.01)
        put("memory_used_bytes", _number(_text(gpu, "fb_memory_usage/used")), MIB)
        put("memory_total_bytes", _number(_text(gpu, "fb_memory_usage/total")), MIB)
        power = gpu.find("gpu_power_readings")
        if power is None:
            power = gpu.find("power_readings")
        put("power_watts", _number(_text(power, "average_power_draw", "power_draw")))
        put("power_watts_instant", _number(_text(power, "instant_power_draw", "power_draw")))
        put("power_limit_watts", _number(_text(power, "enforced_power_limit", "power_limit")))
        put("temperature_gpu", _number(_text(gpu, "temperature/gpu_temp")))
        put("temperature_memory", _number(_text(gpu, "temperature/memory_temp")))
        put("sm_clock_hertz", _number(_text(gpu, "clocks/sm_clock")), 1e6)
        processes = gpu.find("processes")
        if processes is not None:
            v["processes"] = float(len([p for p in processes.findall("process_info")
                                        if (_text(p, "type") or "C") in ("C", "C+G")]))
        volatile = gpu.find("ecc_errors/volatile")
        if volatile is not None:
            corrected = [_number(_text(volatile, p)) for p in ("sram_correctable", "dram_correctable",
                                                                "single_bit/total")]
            uncorrected = [_number(_text(volatile, p)) for p in ("sram_uncorrectable", "dram_uncorrectable",
                                                                  "double_bit/total")]
            if any(c is not None for c in corrected[:2]):
                v["ecc_corrected"] = sum(c or 0.0 for c in corrected[:2])
            elif corrected[2] is not None:
                v["ecc_corrected"] = corrected[2]
            if any(u is not None for u in uncorrected[:2]):
                v["ecc_uncorrected"] = sum(u or 0.0 for u in uncorrected[:2])
            elif uncorrected[2] is not None:
                v["ecc_uncorrected"] = uncorrected[2]
        rows = gpu.find("remapped_rows")
        if rows is not None:
            put("remapped_correctable", _number(_text(rows, "remapped_row_corr")))
            put("remapped_uncorrectable", _number(_text(rows, "remapped_row_unc")))
            for name in ("pending", "failure"):
                flag = _text(rows, f"remapped_row_{name}")
                if flag in ("Yes", "No"):
                    v[f"remapped_{name}"] = 1.0 if flag == "Yes" else 0.0
        put("pcie_replays", _number(_text(gpu, "pci/replay_counter")))
        reasons = gpu.find("clocks_event_reasons")
        if reasons is None:
            reasons = gpu.find("clocks_throttle_reasons")
        if reasons is not None:
            for reason in reasons:
                name = re.sub(r"^clocks?_(event|throttle)_reasons?_", "", reason.tag)
                if reason.text and reason.text.strip() in ("Active", "Not Active"):
                    v[f"reason:{name}"] = 1.0 if reason.text.strip() == "Active" else 0.0
        out[uuid] = v
    return out


def parse_dmon_line(line: str) -> tuple[str, int, float, float] | None:
    """One line of `nvidia-smi dmon -s t -o T` (time, gpu, rxpci MB/s, txpci MB/s) as
    (time, gpu index, rx bytes/s, tx bytes/s); None for headers and dashes."""
    parts = line.split()
    if len(parts) < 4 or line.lstrip().startswith("#"):
        return None
    try:
        return parts[0], int(parts[1]), float(parts[2]) * 1e6, float(parts[3]) * 1e6
    except ValueError:
        return None


def parse_nvlink_counters(text: str) -> dict[int, tuple[float, float]]:
    """`nvidia-smi nvlink -gt d` as {gpu index: (rx bytes, tx bytes)} summed over its links."""
    out: dict[int, list[float]] = {}
    gpu = None
    for line in text.splitlines():
        m = re.match(r"^GPU (\d+):", line)
        if m:
            gpu = int(m.group(1))
            out.setdefault(gpu, [0.0, 0.0])
            continue
        m = re.match(r"^\s+Link \d+: Data (Tx|Rx): (\d+) KiB", line)
        if m and gpu is not None:
            out[gpu][0 if m.group(1) == "Rx" else 1] += float(m.group(2)) * 1024
    return {g: (rx, tx) for g, (rx, tx) in out.items()}


def collector_values(sample, previous=None, seconds: float | None = None, gauges_read: bool = True) -> dict[str, float]:
    """A `GpuSample` in the comparison's field names (rates over `seconds` since `previous`).
    `gauges_read`: the slow tier's temperatures and SM clock were read in this cycle (else they are
    as old as the slow tier's last read, and not compared with what nvidia-smi reads now)."""
    v: dict[str, float] = {}
    for name, value in (("utilization_ratio", sample.utilization), ("memory_used_bytes", sample.memory_used_bytes),
                        ("memory_total_bytes", sample.memory_total_bytes), ("power_watts", sample.power_watts),
                        ("power_limit_watts", sample.power_limit_watts),
                        ("sm_clock_hertz", sample.sm_clock_hertz if gauges_read else None),
                        ("processes", sample.processes), ("pcie_replays", sample.pcie_replays)):
        if value is not None:
            v[name] = float(value)
    for kind, value in sample.temperature.items() if gauges_read else ():
        v[f"temperature_{kind}"] = value
    for kind, value in sample.ecc_errors.items():
        v[f"ecc_{kind}"] = value
    for kind, value in sample.remapped_rows.items():
        v[f"remapped_{kind}"] = value
    if previous is not None and seconds:
        for name in ("pcie_rx_bytes", "pcie_tx_bytes", "nvlink_rx_bytes", "nvlink_tx_bytes"):
            a, b = getattr(previous, name), getattr(sample, name)
            if a is not None and b is not None:
                v[f"{name}_per_second"] = (b - a) / seconds
        for reason, total in sample.throttle_seconds.items():
            v[f"reason:{reason}"] = 1.0 if total > previous.throttle_seconds.get(reason, total) else 0.0
    return v


THROTTLE_NAMES = {  # the collector's clock event reason -> nvidia-smi's tag, less its prefix
    "sw_power_cap": "sw_power_cap", "hw_slowdown": "hw_slowdown", "hw_thermal": "hw_thermal_slowdown",
    "sw_thermal": "sw_thermal_slowdown", "hw_power_brake": "hw_power_brake_slowdown", "sync_boost": "sync_boost",
}


@dataclass
class Agreement:
    """Readings of one field of one GPU against nvidia-smi."""

    n: int = 0
    within: int = 0
    max_abs_diff: float = 0.0
    examples: list[tuple[float, float]] = field(default_factory=list)

    def add(self, mine: float, theirs: float, tolerance: tuple[float, float]) -> None:
        diff = abs(mine - theirs)
        self.n += 1
        self.max_abs_diff = max(self.max_abs_diff, diff)
        if diff <= tolerance[0] + tolerance[1] * abs(theirs):
            self.within += 1
        elif len(self.examples) < 3:
            self.examples.append((mine, theirs))

    def report(self) -> dict:
        return {"n": self.n, "within": round(self.within / self.n, 4) if self.n else None,
                "max_abs_diff": self.max_abs_diff, "outside_examples": self.examples}


class Comparison:
    def __init__(self) -> None:
        self.fields: dict[tuple[str, str], Agreement] = {}

    def add(self, gpu: str, name: str, mine: float | None, theirs: float | None) -> None:
        if mine is None or theirs is None:
            return
        key = name if name in TOLERANCES else ("throttle_active" if name.startswith("reason:") else None)
        if key is None:
            return
        self.fields.setdefault((name, gpu), Agreement()).add(mine, theirs, TOLERANCES[key])

    def compare(self, gpu: str, mine: dict[str, float], smi: dict[str, float]) -> None:
        for name, value in mine.items():
            if name.startswith("reason:"):
                theirs = smi.get("reason:" + THROTTLE_NAMES.get(name[7:], name[7:]))
            elif name == "power_watts":  # nvidia-smi shows an average and an instant draw: the closer
                candidates = [smi[k] for k in ("power_watts", "power_watts_instant") if k in smi]
                theirs = min(candidates, key=lambda c: abs(c - value)) if candidates else None
            else:
                theirs = smi.get(name)
            self.add(gpu, name, value, theirs)

    def report(self) -> dict:
        by_field: dict[str, dict] = {}
        for (name, gpu), agreement in sorted(self.fields.items()):
            by_field.setdefault(name, {})[gpu] = agreement.report()
        agree = {name: all(r["within"] == 1.0 for r in gpus.values()) for name, gpus in by_field.items()}
        return {"fields": by_field, "agree": agree, "all_agree": all(agree.values()) if agree else False}


class Dmon:
    """`nvidia-smi dmon -s t -o T` in the background: PCIe throughput per GPU, per second."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, int, float, float]] = []  # (monotonic, gpu, rx B/s, tx B/s)
        self._proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "t", "-o", "T"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            parsed = parse_dmon_line(line)
            if parsed is not None:
                self.lines.append((time.monotonic(), *parsed[1:]))

    def average(self, gpu: int, start: float, end: float) -> tuple[float, float] | None:
        rows = [(rx, tx) for t, g, rx, tx in self.lines if g == gpu and start < t <= end + 0.5]
        if not rows:
            return None
        return sum(r for r, _ in rows) / len(rows), sum(t for _, t in rows) / len(rows)

    def close(self) -> None:
        self._proc.terminate()


def smi(*args: str) -> str:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def run(seconds: float, interval: float) -> dict:
    import pynvml

    from stoker.sources.gpu import GpuSource

    source = GpuSource(pynvml, slow_interval=10.0)
    dmon = Dmon()
    comparison = Comparison()
    cpu, wall = [], []
    previous, previous_at, previous_nvlink, first, snap = None, None, {}, None, None
    power_integral: dict[str, float] = {}
    try:
        source.sample()  # the GPM baselines
        time.sleep(interval)
        end = time.monotonic() + seconds
        due = time.monotonic()
        while time.monotonic() < end:
            started = time.monotonic()  # the source's clock: a sample whose slow_at is later read it now
            t0, c0 = time.perf_counter(), time.thread_time()
            snap = source.sample()
            c1, t1 = time.thread_time(), time.perf_counter()
            cpu.append(c1 - c0)
            wall.append(t1 - t0)
            now = time.monotonic()
            readings = parse_smi_xml(smi("-q", "-x"))
            try:
                nvlink = parse_nvlink_counters(smi("nvlink", "-gt", "d"))
            except (subprocess.SubprocessError, OSError):
                nvlink = {}  # no NVLink (a PCIe card), or a driver without the query
            by_uuid = {g.uuid: g for g in snap.gpus if g.up}
            for uuid, g in by_uuid.items():
                before = previous.get(uuid) if previous else None
                window = now - previous_at if previous_at else None
                mine = collector_values(g, before, window, gauges_read=(g.slow_at or 0.0) >= started)
                comparison.compare(uuid, mine, readings.get(uuid, {}))
                if before is not None and window:
                    rates = dmon.average(g.index, previous_at, now)
                    if rates is not None:
                        comparison.add(uuid, "pcie_rx_bytes_per_second", mine.get("pcie_rx_bytes_per_second"), rates[0])
                        comparison.add(uuid, "pcie_tx_bytes_per_second", mine.get("pcie_tx_bytes_per_second"), rates[1])
                    if g.index in nvlink and previous_nvlink and g.index in previous_nvlink:
                        (rx0, tx0), (rx1, tx1) = previous_nvlink[g.index], nvlink[g.index]
                        comparison.add(uuid, "nvlink_rx_bytes_per_second", mine.get("nvlink_rx_bytes_per_second"),
                                       (rx1 - rx0) / window)
                        comparison.add(uuid, "nvlink_tx_bytes_per_second", mine.get("nvlink_tx_bytes_per_second"),
                                       (tx1 - tx0) / window)
                    if g.power_watts is not None:
                        power_integral[uuid] = power_integral.get(uuid, 0.0) + g.power_watts * window
            if first is None:
                first = {u: g for u, g in by_uuid.items()}
            previous, previous_at, previous_nvlink = by_uuid, now, nvlink
            due += interval
            time.sleep(max(0.0, due - time.monotonic()))
        for uuid, g in (previous or {}).items():  # energy over the run against the power integrated
            start = first.get(uuid) if first else None
            if start is not None and start.energy_joules is not None and g.energy_joules is not None:
                comparison.add(uuid, "energy_joules_over_run", g.energy_joules - start.energy_joules,
                               power_integral.get(uuid))
    finally:
        dmon.close()
        source.close()
    c, w = summary_ms(cpu), summary_ms(wall)
    return {
        "driver_version": snap.driver_version, "nvml_version": snap.nvml_version, "gpus": len(snap.gpus),
        "seconds": seconds, "interval_s": interval,
        "cycle_cpu": c, "cycle_wall": w,
        "core_share_at_interval": round(c["mean_ms"] / 1000 / interval, 5),
        "tolerances": {k: {"abs": a, "rel": r} for k, (a, r) in TOLERANCES.items()},
        **comparison.report(),
    }


# profile -> (scenario keys, fake NVML switches)
FAKE_PROFILES = {
    "535": ({"driver": "535"}, {}),
    "550": ({"driver": "550"}, {}),
    "570": ({"driver": "570"}, {}),
    "580": ({}, {}),
    "535-gpm-refused": ({"driver": "535"}, {"gpm_permission": False}),
    "580-gpm-refused": ({}, {"gpm_permission": False}),
    "mig": ({"mig": (0, 1)}, {}),
    "mig-gpm-refused": ({"mig": (0, 1)}, {"gpm_permission": False}),
    "mps": ({"mps": True}, {}),
}
READINGS = ("utilization", "gpm", "pcie_tx_bytes", "nvlink_tx_bytes", "memory_used_bytes", "energy_joules",
            "ecc_errors", "throttle_seconds", "instances")


def run_fake(profile: str, seconds: float, interval: float = 1.0) -> dict:
    """The collector on one fake driver profile, against the simulated node's own values."""
    from stoker.sim import scenarios
    from stoker.sim.drive import ManualClock
    from stoker.sim.fake_nvml import FakeNVML
    from stoker.sim.node import SimNode
    from stoker.sources.gpu import GpuSource

    keys, switches = FAKE_PROFILES[profile]
    clock = ManualClock()
    fake = FakeNVML(SimNode(dataclasses.replace(scenarios.get("healthy"), **keys), clock=clock))
    for name, value in switches.items():
        setattr(fake, name, value)
    source = GpuSource(fake, slow_interval=10.0, clock=clock, wall=clock)
    comparison, cpu, problems, sources = Comparison(), [], Counter(), Counter()
    snap = source.sample()
    for _ in range(max(1, round(seconds / interval))):
        clock.advance(interval)
        started = time.thread_time()
        snap = source.sample()
        cpu.append(time.thread_time() - started)
        problems.update(snap.problems)
        for g in snap.gpus:
            comparison.compare(g.uuid, collector_values(g, gauges_read=g.slow_at == clock()), fake.truth(g.index))
            sources[g.activity_source] += 1
    source.close()
    readings = {f"gpu {g.index}": sorted(r for r in READINGS if getattr(g, r) not in (None, {}, ()))
                for g in snap.gpus[:3]}
    return {"profile": profile, "driver_version": snap.driver_version, "readings": readings,
            "activity_sources": dict(sources), "problems": dict(problems), "cycle_cpu": summary_ms(cpu),
            **comparison.report()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--fake", action="store_true", help="no GPU: every fake driver profile (FAKE_PROFILES)")
    parser.add_argument("--profile", choices=sorted(FAKE_PROFILES), help="with --fake: this profile only")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.fake:
        profiles = [args.profile] if args.profile else list(FAKE_PROFILES)
        results = [run_fake(p, args.seconds, args.interval) for p in profiles]
        result = {"device": "fake NVML, no GPU", "profiles": results,
                  "all_agree": all(r["all_agree"] and not r["problems"] for r in results)}
    else:
        if not shutil.which("nvidia-smi"):
            parser.error("nvidia-smi is not installed: run this on a node with an NVIDIA driver (or --fake)")
        result = run(args.seconds, args.interval)
    emit("nvml_check", result, args.out)
    sys.exit(0 if result["all_agree"] else 1)


if __name__ == "__main__":
    main()
