"""Verdicts as the `stoker_gpu_busy_ratio`, `stoker_starved*`, cause state, evidence and `stoker_checkpoint*`
families, rendered from the tick's snapshot (detect/snapshot.py) and nothing else."""

from __future__ import annotations

import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stoker.detect import causes, starvation
from stoker.detect.checkpoint import OUTCOMES
from stoker.detect.peer import GAP, PEER, VERDICT_CAUSES
from stoker.detect.policy import CAUSE_NAMES
from stoker.detect.snapshot import Snapshot


def families(v: Snapshot):
    busy = GaugeMetricFamily("stoker_gpu_busy_ratio", "Useful GPU work: GPM SM activity (else NVML "
                             "utilisation) over the last sampling window.", labels=["gpu", "uuid"])
    for (gpu, uuid), value in sorted(v.busy_ratio.items()):
        busy.add_metric([gpu, uuid], value)
    busy_seconds = CounterMetricFamily("stoker_gpu_busy_seconds", "The busy ratio integrated over time: its "
                                       "rate is the busy ratio over any window, however often it is scraped.",
                                       labels=["gpu", "uuid"])
    for (gpu, uuid), value in sorted(v.busy_seconds.items()):
        busy_seconds.add_metric([gpu, uuid], value)
    job = CounterMetricFamily("stoker_job_present_seconds", "Time a job held the GPUs (the verdicts judge only "
                              "then).")
    job.add_metric([], v.job_present_seconds)
    baseline = GaugeMetricFamily("stoker_busy_baseline_ratio",
                                 "The level the current job sustains (median of its busy ratio while not starved).")
    if v.baseline is not None:
        baseline.add_metric([], v.baseline)
    starved = GaugeMetricFamily("stoker_starved", "1 while the node's GPUs are starved for that cause.",
                                labels=["cause"])
    seconds = CounterMetricFamily("stoker_starved_seconds", "Time spent starved, by cause.", labels=["cause"])
    score = GaugeMetricFamily("stoker_cause_evidence_score", "Weight of the evidence for each cause: 0 none, "
                              "1 at a threshold, more when stronger, less when stale or older than the drop.",
                              labels=["cause"])
    state = GaugeMetricFamily("stoker_cause_state", "1 for the state each cause's machine is in: inactive, "
                              "pending (challenging the verdict's cause), active, resolving (only remembered), "
                              "resolved.", labels=["cause", "state"])
    for cause in VERDICT_CAUSES:  # `peer`: waiting for another node of the job (detect/peer.py)
        starved.add_metric([cause], 1 if v.cause == cause else 0)
        seconds.add_metric([cause], v.starved_seconds.get(cause, 0.0))
    for cause in CAUSE_NAMES:
        score.add_metric([cause], round(v.scores.get(cause, 0.0), 3))
        current = v.cause_states.get(cause, causes.INACTIVE)
        for name in causes.STATES:
            state.add_metric([cause, name], 1 if name == current else 0)
    gpus = GaugeMetricFamily("stoker_starvation_state", "1 for the state of the GPU machine: ok, low (starved), "
                             "recovering (back, the verdict not yet cleared).", labels=["state"])
    for name in starvation.STATES:
        gpus.add_metric([name], 1 if name == v.gpu_state else 0)
    strength = GaugeMetricFamily("stoker_evidence_strength", "Each signal seen in the last window, as its "
                                 "measured value over its threshold.", labels=["cause", "signal", "source"])
    for s in sorted(v.signals, key=lambda s: s.key):
        if s.kind != "checkpoint":
            strength.add_metric([s.cause, s.kind, s.source], round(s.strength, 3))
    if v.collective_wait is not None:  # the GPUs wait in a collective: utilization above the busy ratio, over GAP
        strength.add_metric([PEER, "collective_wait", "node"], round(v.collective_wait / GAP, 3))
    return [busy, busy_seconds, baseline, job, starved, seconds, score, state, gpus, strength,
            *checkpoint_families(v), *recent_checkpoint_families(v)]


def checkpoint_families(v: Snapshot):
    L = ["mountpoint"]
    in_progress = GaugeMetricFamily("stoker_checkpoint_in_progress", "1 while a checkpoint is being written.", labels=L)
    stalled = GaugeMetricFamily("stoker_checkpoint_stalled", "1 while an in-progress checkpoint makes no progress.", labels=L)
    over = GaugeMetricFamily("stoker_checkpoint_over_budget", "1 while a checkpoint runs past its budget.", labels=L)
    started = GaugeMetricFamily("stoker_checkpoint_started_timestamp_seconds", "Start of the current or last checkpoint.", labels=L)
    progress = GaugeMetricFamily("stoker_checkpoint_progress_timestamp_seconds", "Last time checkpoint bytes reached the server.", labels=L)
    written = GaugeMetricFamily("stoker_checkpoint_written_bytes", "Bytes written by the current or last checkpoint.", labels=L)
    duration = GaugeMetricFamily("stoker_checkpoint_last_duration_seconds", "Duration of the last finished checkpoint.", labels=L)
    total = CounterMetricFamily("stoker_checkpoints", "Finished checkpoints.", labels=L + ["outcome"])
    for m in v.checkpoints:
        mp = m.mountpoint
        in_progress.add_metric([mp], 1 if m.in_progress else 0)
        stalled.add_metric([mp], 1 if m.stalled else 0)
        over.add_metric([mp], 1 if m.over_budget else 0)
        for fam, value in ((started, m.started), (progress, m.progress), (written, m.written_bytes),
                           (duration, m.last_duration)):
            if value is not None:
                fam.add_metric([mp], value)
        for outcome in OUTCOMES:
            total.add_metric([mp, outcome], m.outcomes[outcome])
    return [in_progress, stalled, over, started, progress, written, duration, total]


def recent_checkpoint_families(v: Snapshot):
    """The last few finished checkpoints per mount, each its own series keyed by its start, so that a
    table shows every one of them, however short, and a range query every one that ended in the range."""
    L = ["mountpoint", "started", "outcome"]
    duration = GaugeMetricFamily("stoker_checkpoint_recent_duration_seconds", "Duration of each of the last "
                                 "finished checkpoints (started: its start, UTC).", labels=L)
    written = GaugeMetricFamily("stoker_checkpoint_recent_written_bytes", "Bytes that reached the server "
                                "for each of the last finished checkpoints.", labels=L)
    rows = {(m.mountpoint, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started or 0)), outcome): (seconds, nbytes)
            for m in v.checkpoints for started, seconds, nbytes, outcome in m.recent}
    for key, (seconds, nbytes) in rows.items():  # two in one second: the later one
        duration.add_metric(list(key), seconds or 0.0)
        written.add_metric(list(key), nbytes or 0.0)
    return [duration, written]
