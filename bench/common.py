"""Helpers shared by the benchmarks: percentiles, CPU clocks, a results table."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(percentile(ms, 50), 4), "p99_ms": round(percentile(ms, 99), 4),
            "mean_ms": round(statistics.fmean(ms), 4), "n": len(ms)}


def process_cpu(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process or another one (from /proc)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def thread_sum_cpu(pid: int) -> float:
    """CPU seconds of another process, to the nanosecond: the scheduler's runtime of each of its
    threads (/proc/PID/task/*/schedstat; /proc/PID/stat counts in ticks of 10 ms)."""
    import os
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def emit(name: str, result: dict, out: str | None) -> None:
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text, file=sys.stdout)
