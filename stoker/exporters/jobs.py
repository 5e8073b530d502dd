"""Jobs and goodput as metric families: which job holds each GPU, where its time went, its steps.

The job is an info metric per GPU (`stoker_gpu_job_info`) that queries join on,
never a label on the GPU series. The label is `job_id`, not `job`: Prometheus
sets `job` on every series it scrapes (the scrape job), and an exported `job`
label would be renamed `exported_job`.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from stoker.detect.goodput import NODE_STATES, STATES, GoodputLedger


def families(ledger: GoodputLedger):
    info = GaugeMetricFamily("stoker_gpu_job_info", "The job holding the GPU (1): its id, its scheduler "
                             "(slurm, kubernetes, none) and where the agent learned it (cgroup, environ, hint, none).",
                             labels=["gpu", "uuid", "job_id", "scheduler", "source"])
    for (gpu, uuid), bindings in sorted(ledger.gpus.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        for b in bindings:
            info.add_metric([gpu, uuid, b.job_id, b.scheduler, b.source], 1)
    node = CounterMetricFamily("stoker_goodput_seconds", "The node's wall time by state: productive, idle, "
                               "starved by a cause (storage, network, host, checkpoint, peer), no_job, unknown.",
                               labels=["state"])
    for state in NODE_STATES:
        node.add_metric([state], ledger.node[state])
    L = ["job_id"]
    seconds = CounterMetricFamily("stoker_job_seconds", "The job's wall time on this node by state: productive, "
                                  "idle, or starved by a cause (storage, network, host, checkpoint, peer).",
                                  labels=L + ["state"])
    steps = CounterMetricFamily("stoker_job_steps", "Training steps the job reported.", labels=L)
    tokens = CounterMetricFamily("stoker_job_tokens", "Tokens of the steps the job reported.", labels=L)
    samples = CounterMetricFamily("stoker_job_samples", "Samples of the steps the job reported.", labels=L)
    duration = HistogramMetricFamily("stoker_job_step_seconds", "Duration of the job's training steps.", labels=L)
    restarts = CounterMetricFamily("stoker_job_restarts", "Times the job's processes were replaced by new ones "
                                   "with the same job id.", labels=L)
    lost = CounterMetricFamily("stoker_job_lost_seconds", "Productive seconds since the last completed checkpoint, "
                               "lost at the job's restarts.", labels=L)
    lost_steps = CounterMetricFamily("stoker_job_lost_steps", "Steps done again after the job's restarts "
                                     "(the steps it reported beyond the one it resumed from).", labels=L)
    unsaved = GaugeMetricFamily("stoker_job_unsaved_seconds", "Productive seconds since the job's last completed "
                                "checkpoint: what a restart now would lose.", labels=L)
    last_step = GaugeMetricFamily("stoker_job_last_step", "The last training step the job reported.", labels=L)
    data_wait = CounterMetricFamily("stoker_job_data_wait_seconds", "Of the job's step time, the time its steps "
                                    "waited for their next batch (the input pipeline), as the job reported it.",
                                    labels=L)
    for job_id, a in sorted(ledger.jobs.items()):
        for state in STATES:
            seconds.add_metric([job_id, state], a.seconds[state])
        steps.add_metric([job_id], a.steps)
        tokens.add_metric([job_id], a.tokens)
        samples.add_metric([job_id], a.samples)
        duration.add_metric([job_id], a.step_seconds.buckets(), a.step_seconds.total)
        restarts.add_metric([job_id], a.restarts)
        lost.add_metric([job_id], a.lost_seconds)
        lost_steps.add_metric([job_id], a.lost_steps)
        unsaved.add_metric([job_id], a.unsaved)
        if a.last_step is not None:
            last_step.add_metric([job_id], a.last_step)
        if a.data_wait_seconds is not None:
            data_wait.add_metric([job_id], a.data_wait_seconds)
    return [info, node, seconds, steps, tokens, samples, duration, restarts, lost, lost_steps, unsaved, last_step,
            data_wait]
