"""The multi-node rules at fleet scale on VictoriaMetrics: what StokerJobHeldBackByNode, the jobs view's recording
rules and the per-node starvation alerts (which now carry each node's jobs) cost vmalert at 10,000 nodes and 1,000
jobs, and the series they add. docs/SCALE.md, "Multi-node jobs", reports it.

Synthetic series, imported into a victoria-metrics with the shipped flags: `--nodes` nodes in `--sites` sites,
`--jobs` jobs of nodes / jobs nodes each (within a site), 15 minutes of history every 15 s ending now, then a
sample of each every 15 s while the rules run (as the agents' scrapes would bring them). Per node
what the rules read: its 8 GPUs' `stoker_gpu_job_info`, `stoker_starved` by cause, `stoker_job_seconds_total` by
state and, for half the jobs (those that hint their steps), `stoker_job_step_seconds_sum` and
`stoker_job_data_wait_seconds_total`. A tenth of the jobs is held back by a node's storage (its 9 other nodes
`peer`), a tenth by a node's compute (it works, the others wait), the rest train.

vmalert (shipped flags) then evaluates the rules of alerts/stoker.rules.yml that this change added or changed,
each in a group of its own at its shipped interval, beside the per-node alerts as they were before it (the
reference, in the same run): once as one site's vmalert (`extra_label=site=s0`, as shipped) and once as a single
vmalert for every node. Reported per group: the mean evaluation time (vmalert_iteration_duration_seconds), its
share of the group's interval, and the series each recording rule and the alert write.

    python -m bench.multinode_vm [--nodes 10000] [--jobs 1000] [--sites 10] [--seconds 120] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from bench.common import emit
from bench.fleet_vm import RULE_FILES, group_eval_seconds, servers, snapshot, total

CAUSES = ("storage", "network", "checkpoint", "host", "peer")
STATES = ("productive", "idle", "storage", "network", "host", "checkpoint", "peer")
STEP = 15  # seconds between samples
MINUTES = 15
ADDED = {  # group: (interval, the rules of alerts/stoker.rules.yml it evaluates)
    "multinode.alert": ("15s", ["StokerJobHeldBackByNode"]),
    "multinode.recording": ("15s", ["node_job:stoker_job_data_wait_share:rate2m"]),
    "multinode.fleet": ("30s", ["node_job:stoker_gpus:count", "node_cause:stoker_starved:max",
                                "job_state:stoker_job_gpus:rate10m"]),
    "starvation.with_jobs": ("15s", ["StokerGpusStarvedByStorage", "StokerGpusStarvedByNetwork",
                                     "StokerGpusStarvedByHost"]),
}
BEFORE = {  # the per-node alerts as shipped before (the reference)
    f"StokerGpusStarvedBy{cause.title()}": f'max by (node) (stoker_starved{{cause="{cause}"}}) == 1'
    for cause in ("storage", "network", "host")}


def rule_file() -> str:
    shipped = {r.get("record") or r.get("alert"): r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
               for r in g["rules"]}
    groups = [{"name": name, "interval": interval, "rules": [shipped[r] for r in rules]}
              for name, (interval, rules) in ADDED.items()]
    groups.append({"name": "starvation.before", "interval": "15s", "rules": [
        {**shipped[name], "expr": expr} for name, expr in BEFORE.items()]})
    return yaml.safe_dump({"groups": groups})


def synthetic(nodes: int, jobs: int, sites: int) -> list[tuple[str, float, float]]:
    """Every series the rules read (module docstring): (its labels as JSON, its value, its rise per second)."""
    per_site, per_job = nodes // sites, nodes // jobs
    out = []
    for i in range(nodes):
        job, rank = divmod(i, per_job)
        node = {"job": "stoker", "instance": f"n{i:05d}:9477", "node": f"n{i:05d}", "site": f"s{i // per_site}"}
        job_id = str(1_000_000 + job)
        storage, compute = job % 10 == 0, job % 10 == 1  # held back by a node's NAS, by a node's GPUs
        cause = ("storage" if rank == 0 else "peer") if storage else ("peer" if rank else None) if compute else None
        for gpu in range(8):
            out.append(({**node, "__name__": "stoker_gpu_job_info", "gpu": str(gpu), "uuid": f"GPU-{i:05d}-{gpu}",
                         "job_id": job_id, "scheduler": "slurm", "source": "cgroup"}, 1.0, 0.0))
        for c in CAUSES:
            out.append(({**node, "__name__": "stoker_starved", "cause": c}, float(c == cause), 0.0))
        for state in STATES:
            out.append(({**node, "__name__": "stoker_job_seconds_total", "job_id": job_id, "state": state}, 0.0,
                        float(state == (cause or "productive"))))
        if job % 2 == 0:  # the job hints its steps: 1 s steps, the held-back node waiting 60% of each for data
            wait = 0.6 if storage and rank == 0 else 0.01
            for name, per_s in (("stoker_job_step_seconds_sum", 1.0), ("stoker_job_data_wait_seconds_total", wait)):
                out.append(({**node, "__name__": name, "job_id": job_id}, 0.0, per_s))
    return [(json.dumps(labels), value, rise) for labels, value, rise in out]


def history(series, end: float):
    """JSON lines for /api/v1/import: MINUTES of samples every STEP seconds up to `end`."""
    stamps = [int((end - i * STEP) * 1000) for i in range(MINUTES * 60 // STEP)][::-1]
    times = json.dumps(stamps)
    for labels, value, rise in series:
        values = json.dumps([value + rise * (t / 1000 - stamps[0] / 1000) for t in stamps])
        yield f'{{"metric":{labels},"values":{values},"timestamps":{times}}}'


class Feeder(threading.Thread):
    """One sample of every series every STEP seconds from `start` on, as the agents' scrapes would bring them:
    VictoriaMetrics keeps no sample stamped in the future, and the rules' windows must not run dry."""

    def __init__(self, url: str, series, start: float, first: float):
        super().__init__(daemon=True)
        self.url, self.series, self.since, self.first = url, series, start, first
        self.stop = threading.Event()

    def run(self) -> None:
        at = self.since + STEP
        while not self.stop.wait(max(0.0, at - time.time())):
            ms, elapsed = int(at * 1000), at - self.first
            import_lines(self.url, (f'{{"metric":{labels},"values":[{value + rise * elapsed}],"timestamps":[{ms}]}}'
                                    for labels, value, rise in self.series))
            at += STEP


def import_lines(url: str, lines) -> int:
    sent, batch = 0, []
    for line in lines:
        batch.append(line)
        if len(batch) >= 5000:
            urllib.request.urlopen(f"{url}/api/v1/import", data="\n".join(batch).encode(), timeout=300).read()
            sent, batch = sent + len(batch), []
    if batch:
        urllib.request.urlopen(f"{url}/api/v1/import", data="\n".join(batch).encode(), timeout=300).read()
        sent += len(batch)
    return sent


def evaluate(vm, rules: str, site: str | None, seconds: float) -> dict:
    """vmalert over `rules` against `vm` for `seconds` after a first round: each group's mean evaluation time and
    the series the rules wrote."""
    s = servers()
    args = s.shipped_args("vmalert.default")
    if site is None:  # one vmalert for every site; what it writes is labelled site="all"
        args = [a.replace("?extra_label=site=dc1-pod-a", "").replace("site=dc1-pod-a", "site=all") for a in args]
    else:
        args = [a.replace("site=dc1-pod-a", f"site={site}") for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(rules)
        hook = s.Webhook()
        try:
            with s.alertmanager(hook.url) as am, s.vmalert([str(path)], vm.url, am, args) as evaluator:
                time.sleep(40)  # the first evaluations: vmalert warms its caches, the recorded series appear
                a = snapshot({"vmalert": evaluator.url})
                time.sleep(seconds)
                b = snapshot({"vmalert": evaluator.url})
                vm.flush()
                time.sleep(5)
                written = {}
                for name in [*ADDED["multinode.recording"][1], *ADDED["multinode.fleet"][1], "StokerJobHeldBackByNode"]:
                    selector = f'{name}{{site="{site or "all"}"}}' if ":" in name else \
                        f'ALERTS{{alertname="{name}", site="{site or "all"}"}}'
                    r = vm.query(f"count({selector})")
                    written[name] = int(float(r[0]["value"][1])) if r else 0
        finally:
            hook.close()
    evals = group_eval_seconds(a, b)
    return {"site": site or "all", "window_s": round(b["t"] - a["t"], 1),
            "groups": {g: {"eval_s": v, "interval_s": int(ADDED.get(g, ("15s",))[0][:-1]),
                           "share_of_interval": round(v / int(ADDED.get(g, ("15s",))[0][:-1]), 5)}
                       for g, v in sorted(evals.items())},
            "vs_before": round(evals.get("starvation.with_jobs", float("nan"))
                               / max(1e-9, evals.get("starvation.before", float("nan"))), 2),
            "series_written": written,
            "vmalert_rss_bytes": total(b["vmalert"], "process_resident_memory_bytes")}


def agent_series() -> dict:
    """Series one agent of a multi-node job adds (a simulated 2-node job, node 0 waiting for node 1)."""
    from stoker.sim.cluster import Cluster, ClusterDrive, parse, scratch

    spec = parse('nodes = 2\n[[jobs]]\nname = "j"\nnodes = "0-1"\nstep_rate = 0.5\n[[faults]]\nnodes = 1\nfrom = 20\n',
                 "bench")
    with tempfile.TemporaryDirectory(dir=scratch()) as root:
        drive = ClusterDrive(Cluster(spec), root)
        try:
            drive.run(40)
            added = [(s.name, s.labels) for f in drive.drives[0].verdicts.families() for s in f.samples
                     if "peer" in s.labels.values() or s.name.startswith(("stoker_job_nodes", "stoker_job_multinode",
                                                                           "stoker_job_data_wait"))]
        finally:
            drive.close()
    return {"per_node": len(added), "series": sorted(f"{n}{sorted(labels.items())}" for n, labels in added)}


def run(nodes: int, jobs: int, sites: int, seconds: float) -> dict:
    s = servers()
    out: dict = {"nodes": nodes, "jobs": jobs, "sites": sites, "history_minutes": MINUTES, "step_s": STEP}
    with s.victoria_metrics(s.with_flags(s.shipped_args("victoria-metrics.default"),
                                         search__maxUniqueTimeseries="5000000")) as vm:
        series = synthetic(nodes, jobs, sites)
        started, end = time.monotonic(), time.time()
        out["series_imported"] = import_lines(vm.url, history(series, end))
        vm.flush()
        out["import_s"] = round(time.monotonic() - started, 1)
        feeder = Feeder(vm.url, series, end, end - (MINUTES * 60 // STEP - 1) * STEP)
        feeder.start()
        try:
            rules = rule_file()
            out["per_site"] = evaluate(vm, rules, "s0", seconds)
            out["all_sites"] = evaluate(vm, rules, None, seconds)
        finally:
            feeder.stop.set()
        out["vm_rss_bytes"] = total(vm.metrics(), "process_resident_memory_bytes")
    out["agent"] = agent_series()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("multinode_vm", run(args.nodes, args.jobs, args.sites, args.seconds), args.out)


if __name__ == "__main__":
    main()
