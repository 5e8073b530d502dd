"""Fleet scale on VictoriaMetrics: simulated nodes scraped by vmagent into victoria-metrics, with vmalert
evaluating the shipped rules, everything with the shipped configuration (packaging/victoriametrics/).

For each fleet size, over a measurement window after a warm-up, from the components' own metrics:
series per node and active series; ingestion rate; VictoriaMetrics, vmagent and vmalert RSS and CPU (per
1,000 active series, and the marginal cost between two sizes); remote_write bytes per sample (vmagent's
disk buffer holds the same blocks); bytes per sample and per series on disk (after a flush and a forced
merge); vmalert's evaluation time per group. Then the series per node a default install sends against
`[rdma] hw_counters = "all"`, and the Fleet dashboard's query cost on a synthetic fleet of recorded series
(`--synthetic-nodes`, with `--synthetic-minutes` of history). docs/SCALE.md derives the sizing plan from
these figures.

    python -m bench.fleet_vm [--nodes 20 60] [--per-process 10] [--warmup 90] [--seconds 120]
                             [--synthetic-nodes 10000] [--synthetic-minutes 30]
                             [--disk-nodes 6] [--disk-minutes 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import yaml

from bench.common import emit
from bench.fleet import ROOT, start_workers, stop_workers
from bench.scrape import wait_http

RULE_FILES = sorted((ROOT / "alerts").glob("*.rules.yml"))
SCRAPE_SECONDS = 15.0  # packaging/victoriametrics/vmagent.yml
RECORDED = re.compile(r"[a-z_]+:stoker_[a-z0-9_]+:[a-z0-9_]+")


def servers():
    from tests import servers  # the same launchers and shipped flags the tests use
    return servers


def scrape_config(targets_dir: Path) -> str:
    config = yaml.safe_load((ROOT / "packaging" / "victoriametrics" / "vmagent.yml").read_text())
    config["scrape_configs"] = [j for j in config["scrape_configs"] if "file_sd_configs" in j]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(targets_dir / "stoker-*.yml")]
    return yaml.safe_dump(config)


def total(metrics: dict[str, float], name: str, match: str = "") -> float:
    """The sum of a metric's samples whose labels contain `match`."""
    return sum(v for k, v in metrics.items() if (k == name or k.startswith(name + "{")) and match in k)


def snapshot(urls: dict[str, str]) -> dict:
    return {"t": time.monotonic(), **{name: servers().own_metrics(url) for name, url in urls.items()}}


def rate(a: dict, b: dict, component: str, name: str, match: str = "") -> float:
    return (total(b[component], name, match) - total(a[component], name, match)) / (b["t"] - a["t"])


def group_eval_seconds(a: dict, b: dict) -> dict[str, float]:
    """vmalert's mean evaluation time per group over the window."""
    out = {}
    for key in b["vmalert"]:
        m = re.match(r'vmalert_iteration_duration_seconds_sum\{group="([^"]+)"', key)
        if m:
            count_key = key.replace("_seconds_sum", "_seconds_count")
            n = b["vmalert"][count_key] - a["vmalert"].get(count_key, 0)
            s = b["vmalert"][key] - a["vmalert"].get(key, 0)
            out[m[1]] = round(s / n, 5) if n else float("nan")
    return out


def wait_nodes(ports: list[int], workers, timeout: float = 300) -> None:
    for p in ports:
        dead = [w.args[-1] for w in workers if w.poll() is not None]
        if dead:
            raise RuntimeError(f"{len(dead)} worker processes exited (ports {dead} ...): see bench.fleet --worker")
        wait_http(f"http://127.0.0.1:{p}/metrics", timeout=timeout)


def measure(nodes: int, per_process: int, warmup: float, seconds: float, keep_templates: bool = False) -> dict:
    s = servers()
    ports, workers = start_workers(nodes, per_process)
    hook = s.Webhook()
    try:
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
            targets = Path(tmp)
            (targets / "stoker-bench.yml").write_text(yaml.safe_dump(
                [{"targets": [f"127.0.0.1:{p}"], "labels": {"node": f"node-{i:04d}", "rack": f"r{i // 20:02d}"}}
                 for i, p in enumerate(ports)]))
            wait_nodes(ports, workers)
            vm = stack.enter_context(s.victoria_metrics(s.shipped_args("victoria-metrics.default")))
            am = stack.enter_context(s.alertmanager(hook.url))
            agent = stack.enter_context(s.vmagent(scrape_config(targets), vm.write_url,
                                                  s.shipped_args("vmagent.default")))
            rules = stack.enter_context(s.vmalert([str(p) for p in RULE_FILES], vm.url, am,
                                                  s.shipped_args("vmalert.default")))
            urls = {"vm": vm.url, "vmagent": agent, "vmalert": rules.url}
            time.sleep(warmup)
            a = snapshot(urls)
            time.sleep(seconds)
            b = snapshot(urls)
            per_node = [float(r["value"][1]) for r in vm.query('count by (node) ({job="stoker"})')]
            up = sum(float(r["value"][1]) for r in vm.query('up{job="stoker"}'))
            active = total(b["vm"], "vm_cache_entries", 'type="storage/hour_metric_ids"')
            samples = rate(a, b, "vm", "vm_rows_inserted_total")
            rows = {
                "nodes": nodes, "nodes_up": up, "window_s": round(b["t"] - a["t"], 1),
                "series_per_node": round(statistics.fmean(per_node), 1) if per_node else 0,
                "active_series": active,
                "recorded_series": len(vm.query('{__name__=~"[a-z_]+:stoker_.+"}')),
                "ingested_samples_per_s": round(samples, 1),
                "scraped_samples_per_s": round(rate(a, b, "vmagent", "vm_promscrape_scraped_samples_sum"), 1),
                "remote_write_bytes_per_s": round(rate(a, b, "vmagent", "vmagent_remotewrite_bytes_sent_total"), 1),
            }
            rows["remote_write_bytes_per_sample"] = round(
                rows["remote_write_bytes_per_s"] / max(1.0, rows["scraped_samples_per_s"]), 2)
            for name in urls:
                rows[f"{name}_rss_bytes"] = total(b[name], "process_resident_memory_bytes")
                rows[f"{name}_cpu_cores"] = round(rate(a, b, name, "process_cpu_seconds_total"), 4)
            rows["vmalert_group_eval_s"] = group_eval_seconds(a, b)
            rows["vmalert_eval_s_per_15s"] = round(sum(
                v * (15.0 / {"stoker.fleet": 30.0}.get(g, 15.0)) for g, v in rows["vmalert_group_eval_s"].items()), 4)
            # disk: everything received made searchable and merged, then measured
            m = merged_metrics(vm, timeout=300)
            data = total(m, "vm_data_size_bytes", "storage/")
            stored = total(m, "vm_rows", "storage/")
            rows["stored_samples"] = stored
            rows["bytes_per_sample"] = round(data / stored, 3) if stored else float("nan")
            rows["index_bytes_per_series"] = round(total(m, "vm_data_size_bytes", "indexdb") / active, 1)
            rows["data_dir_bytes"] = sum(f.stat().st_size for f in vm.data.rglob("*") if f.is_file())
            if keep_templates:
                rows["_templates"] = export_templates(vm)
            return rows
    finally:
        hook.close()
        stop_workers(workers)


def merged_metrics(vm, timeout: float) -> dict[str, float]:
    """VictoriaMetrics' own metrics once everything received is searchable and merged (sizes on disk)."""
    vm.flush()
    month = time.strftime("%Y_%m", time.gmtime())
    urllib.request.urlopen(f"{vm.url}/internal/force_merge?partition_prefix={month}", timeout=timeout).read()
    time.sleep(5)
    return vm.metrics()


def disk(nodes: int, minutes: float) -> dict:
    """Bytes per sample on disk, with enough samples per series for VictoriaMetrics' blocks to fill: agents
    sampling every second, scraped every second (deduplication off) for `minutes`, then merged. Counters are
    stored as deltas of deltas and gauges by value, so a sample costs about the same at 1 s as at 15 s; at 15 s
    a few minutes would leave a dozen samples a series and measure the blocks' headers, not the samples."""
    s = servers()
    ports, workers = start_workers(nodes, nodes, interval=1.0)
    try:
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
            targets = Path(tmp)
            (targets / "stoker-bench.yml").write_text(yaml.safe_dump(
                [{"targets": [f"127.0.0.1:{p}"], "labels": {"node": f"node-{i:04d}", "rack": "r0"}}
                 for i, p in enumerate(ports)]))
            wait_nodes(ports, workers)
            vm = stack.enter_context(s.victoria_metrics(s.with_flags(s.shipped_args("victoria-metrics.default"),
                                                                     dedup__minScrapeInterval=None)))
            config = scrape_config(targets).replace("scrape_interval: 15s", "scrape_interval: 1s")
            config = config.replace("scrape_timeout: 10s", "scrape_timeout: 1s")
            stack.enter_context(s.vmagent(config, vm.write_url, s.shipped_args("vmagent.default")))
            time.sleep(minutes * 60)
            m = merged_metrics(vm, timeout=600)
            stored = total(m, "vm_rows", "storage/")
            series = total(m, "vm_cache_entries", 'type="storage/hour_metric_ids"')
            data = total(m, "vm_data_size_bytes", "storage/")
            return {"nodes": nodes, "minutes": minutes, "scrape_interval_s": 1.0, "series": series,
                    "stored_samples": stored, "samples_per_series": round(stored / series, 1),
                    "bytes_per_sample": round(data / stored, 3),
                    "index_bytes_per_series": round(total(m, "vm_data_size_bytes", "indexdb") / series, 1)}
    finally:
        stop_workers(workers)


def export_templates(vm) -> dict:
    """The recorded series of the live fleet at the last instant: the template of the synthetic one."""
    q = urllib.parse.urlencode({"match[]": '{__name__=~"[a-z_]+:stoker_.+|ALERTS"}',
                                "start": str(int(time.time() - 120))})
    lines = urllib.request.urlopen(f"{vm.url}/api/v1/export?{q}", timeout=60).read().decode().splitlines()
    per_node: dict[str, list] = {}
    per_site: list = []
    for line in lines:
        series = json.loads(line)
        labels, value = series["metric"], series["values"][-1]
        if value is None:  # a staleness marker (exported as null): the series is gone at the last instant
            continue
        (per_node.setdefault(labels["node"], []) if "node" in labels else per_site).append((labels, value))
    return {"per_node": per_node, "per_site": per_site}


def series_per_node(hw_counters: str, settle: float = 20.0) -> int:
    """The series one simulated node serves with this [rdma] hw_counters (the most over a few scrapes)."""
    ports, workers = start_workers(1, 1, hw_counters, interval=1.0)
    try:
        url = f"http://127.0.0.1:{ports[0]}/metrics"
        wait_http(url, timeout=120)
        time.sleep(settle)
        counts = []
        for _ in range(3):
            body = urllib.request.urlopen(url, timeout=10).read().decode()
            counts.append(sum(1 for line in body.splitlines() if line and not line.startswith("#")))
            time.sleep(3)
        return max(counts)
    finally:
        stop_workers(workers)


def synthetic_fleet(templates: dict, nodes: int, minutes: float, end: float, step: float = 30.0):
    """JSON lines for /api/v1/import: the template nodes' recorded series copied onto `nodes` nodes in 2 sites
    (20 nodes a rack), each with `minutes` of history every `step` seconds, values jittered."""
    rng = random.Random(7)
    stamps = [int((end - i * step) * 1000) for i in range(int(minutes * 60 / step))][::-1]
    stamps_text = json.dumps(stamps)
    pattern = [1 + 0.05 * rng.uniform(-1, 1) for _ in stamps]
    names = sorted(templates["per_node"])

    def line(labels: dict, value: float) -> str:
        m = rng.uniform(0.5, 1.5)
        values = [round(value * m * p, 6) for p in pattern]
        return f'{{"metric":{json.dumps(labels)},"values":{json.dumps(values)},"timestamps":{stamps_text}}}'

    for site in ("s0", "s1"):
        for labels, value in templates["per_site"]:
            yield line({**labels, "site": site}, float(value))
    for i in range(nodes):
        site, rack = f"s{i % 2}", f"r{i // 20:03d}"
        for labels, value in templates["per_node"][names[i % len(names)]]:
            out = {**labels, "node": f"n{i:05d}", "site": site}
            if "rack" in out:
                out["rack"] = rack
            yield line(out, float(value))


def fleet_queries() -> list[dict]:
    fleet = json.loads((ROOT / "dashboards" / "fleet.json").read_text())
    out = []
    for p in fleet["panels"]:
        for t in p.get("targets", []):
            out.append({"panel": p["title"], "ref": t["refId"], "kind": p["type"], "range": t.get("range", False),
                        "expr": t["expr"]})
    return out


def substitute(expr: str, minutes: float) -> str:
    for var, value in (("$__rate_interval", "1m"), ("$__range_s", str(int(minutes * 60))),
                       ("$__range", f"{int(minutes)}m"), ("$site", ".*")):
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def query_cost(url: str, expr: str, end: float, minutes: float, ranged: bool, repeat: int = 3) -> tuple[float, int]:
    """Median seconds of the query (a range of `minutes` at a 30 s step, or an instant) with the cache off,
    and the series it returned."""
    params = {"query": expr, "nocache": "1"}
    if ranged:
        params.update(start=str(end - minutes * 60), end=str(end), step="30s")
        path = "query_range"
    else:
        params.update(time=str(end))
        path = "query"
    times, result = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=300) as resp:
            data = json.load(resp)
        times.append(time.perf_counter() - started)
        assert data["status"] == "success", data
        result = data["data"]["result"]
    return statistics.median(times), len(result)


def instant(url: str, expr: str, at: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "time": str(at)})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=60) as resp:
        data = json.load(resp)
    assert data["status"] == "success", data
    return data["data"]["result"]


def fleet_dashboard_cost(templates: dict, nodes: int, minutes: float) -> dict:
    s = servers()
    end = time.time() - 60
    with s.victoria_metrics(s.with_flags(s.shipped_args("victoria-metrics.default"),
                                         search__maxUniqueTimeseries="5000000")) as vm:
        started, batch, sent = time.monotonic(), [], 0
        for line in synthetic_fleet(templates, nodes, minutes, end):
            batch.append(line)
            if len(batch) >= 5000:
                urllib.request.urlopen(f"{vm.url}/api/v1/import", data="\n".join(batch).encode(), timeout=300).read()
                sent += len(batch)
                batch = []
        if batch:
            urllib.request.urlopen(f"{vm.url}/api/v1/import", data="\n".join(batch).encode(), timeout=300).read()
            sent += len(batch)
        vm.flush()
        imported_s = time.monotonic() - started
        per_node = sum(len(v) for v in templates["per_node"].values()) / len(templates["per_node"])
        rows = []
        for q in fleet_queries():
            expr = substitute(q["expr"], minutes)
            seconds, returned = query_cost(vm.url, expr, end, minutes, q["range"])
            touched = 0
            for name, labels in re.findall(r"\b([a-z_]+:stoker_[a-z0-9_]+:[a-z0-9_]+|ALERTS)\b(\{[^}]*\})?", expr):
                # at `end`, as the dashboard's queries: the import may outlast the 5-minute lookback
                r = instant(vm.url, f"count({name}{labels or ''})", end)
                touched += int(float(r[0]["value"][1])) if r else 0
            rows.append({"panel": q["panel"], "ref": q["ref"], "kind": q["kind"], "range": q["range"],
                         "seconds": round(seconds, 4), "series_touched": touched, "series_returned": returned})
        return {"nodes": nodes, "minutes": minutes, "series": sent, "recorded_series_per_node": round(per_node, 1),
                "samples": sent * int(minutes * 2), "import_s": round(imported_s, 1),
                "vm_rss_bytes": total(vm.metrics(), "process_resident_memory_bytes"), "queries": rows,
                "total_s": round(sum(r["seconds"] for r in rows), 3),
                "ranged_per_node_s": round(sum(r["seconds"] for r in rows if r["range"]
                                               and r["series_touched"] > 20), 3)}


def marginal(rows: list[dict], key: str) -> float:
    """Cost per 1,000 active series between the smallest and the largest fleet (the slope), when it grows."""
    lo, hi = rows[0], rows[-1]
    ds = hi["active_series"] - lo["active_series"]
    return round((hi[key] - lo[key]) / ds * 1000, 6) if ds > 0 else float("nan")


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    """Least squares of `key` against active series: (per series, at zero series)."""
    xs, ys = [r["active_series"] for r in rows], [r[key] for r in rows]
    if len(rows) < 2:
        return ys[0] / xs[0], 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sum((x - mx) ** 2 for x in xs) or 1.0)
    return slope, my - slope * mx


def plan(out: dict, nodes_per_site: int = 1000, retention_days: int = 30) -> dict:
    """The figures of docs/SCALE.md at 1,000 and 10,000 nodes, each from a measurement above:
    series = nodes x active series per node; samples/s = nodes x samples/s per node; disk a day = samples/s x
    86,400 x bytes per sample + series x index bytes per series (VictoriaMetrics indexes each day's series);
    memory and CPU = series x the fitted cost per series + the fitted constant; vmalert evaluation = the fitted
    seconds per node x the nodes of one site (one vmalert per site)."""
    rows = out["sizes"]
    big = rows[-1]
    per_node_series = big["active_series"] / big["nodes"]
    per_node_samples = big["ingested_samples_per_s"] / big["nodes"]
    disk = out.get("disk") or big
    costs = {key: fit(rows, key) for key in ("vm_rss_bytes", "vm_cpu_cores", "vmagent_rss_bytes",
                                             "vmagent_cpu_cores", "vmalert_eval_s_per_15s")}
    node_fit = (lambda key: (costs[key][0] * per_node_series, costs[key][1]))
    result = {"inputs": {
        "active_series_per_node": round(per_node_series, 1), "samples_per_s_per_node": round(per_node_samples, 2),
        "bytes_per_sample": disk["bytes_per_sample"], "index_bytes_per_series": disk["index_bytes_per_series"],
        "remote_write_bytes_per_sample": big["remote_write_bytes_per_sample"],
        **{f"{k}_per_1000_series": round(v[0] * 1000, 6) for k, v in costs.items()},
        **{f"{k}_constant": round(v[1], 4) for k, v in costs.items()}}}
    for nodes in (1000, 10000):
        series = nodes * per_node_series
        samples = nodes * per_node_samples
        day = samples * 86400 * disk["bytes_per_sample"] + series * disk["index_bytes_per_series"]
        slope, const = node_fit("vmalert_eval_s_per_15s")
        result[str(nodes)] = {
            "series": round(series), "samples_per_s": round(samples),
            "disk_bytes_per_day": round(day), f"disk_bytes_{retention_days}d": round(day * retention_days),
            "vm_rss_bytes": round(costs["vm_rss_bytes"][0] * series + costs["vm_rss_bytes"][1]),
            "vm_cpu_cores": round(costs["vm_cpu_cores"][0] * series + costs["vm_cpu_cores"][1], 2),
            "vmagent_rss_bytes_total": round(costs["vmagent_rss_bytes"][0] * series),
            "vmagent_cpu_cores_total": round(costs["vmagent_cpu_cores"][0] * series, 2),
            "vmalert_eval_s_per_15s_per_site": round(slope * min(nodes, nodes_per_site) + const, 3),
            "sites_of_1000_nodes": max(1, nodes // nodes_per_site),
            # vmagent sends the scraped samples only: vmalert writes its recorded series to the store itself
            "remote_write_bytes_per_s": round(nodes * big["scraped_samples_per_s"] / big["nodes"]
                                              * big["remote_write_bytes_per_sample"]),
        }
    return result


def run(sizes: list[int], per_process: int, warmup: float, seconds: float, synthetic_nodes: int,
        synthetic_minutes: float, disk_nodes: int = 6, disk_minutes: float = 8) -> dict:
    out: dict = {"scrape_interval_s": SCRAPE_SECONDS, "versions": versions()}
    out["series_per_node"] = {hw: series_per_node(hw) for hw in ("default", "all")}
    if disk_nodes:
        out["disk"] = disk(disk_nodes, disk_minutes)
    rows = [measure(n, per_process, warmup, seconds, keep_templates=(n == sizes[-1])) for n in sizes]
    templates = rows[-1].pop("_templates")
    for r in rows:
        k = r["active_series"] / 1000
        for name in ("vm", "vmagent", "vmalert"):
            r[f"{name}_rss_bytes_per_1000_series"] = round(r[f"{name}_rss_bytes"] / k)
            r[f"{name}_cpu_cores_per_1000_series"] = round(r[f"{name}_cpu_cores"] / k, 6)
    out["sizes"] = rows
    out["marginal_per_1000_series"] = {key: marginal(rows, key) for key in (
        "vm_rss_bytes", "vm_cpu_cores", "vmagent_rss_bytes", "vmagent_cpu_cores", "vmalert_cpu_cores",
        "vmalert_eval_s_per_15s", "data_dir_bytes")} if len(rows) > 1 else {}
    out["plan"] = plan(out)
    if synthetic_nodes:
        out["fleet_dashboard"] = fleet_dashboard_cost(templates, synthetic_nodes, synthetic_minutes)
    return out


def versions() -> dict:
    import subprocess
    out = {}
    for pkg in ("victoria-metrics", "prometheus-alertmanager"):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False)
        out[pkg] = r.stdout.strip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 60])
    parser.add_argument("--per-process", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=90)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--synthetic-nodes", type=int, default=10000)
    parser.add_argument("--synthetic-minutes", type=float, default=30)
    parser.add_argument("--disk-nodes", type=int, default=6, help="nodes of the bytes-per-sample run (0: skip it)")
    parser.add_argument("--disk-minutes", type=float, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("fleet_vm", run(sorted(args.nodes), args.per_process, args.warmup, args.seconds, args.synthetic_nodes,
                         args.synthetic_minutes, args.disk_nodes, args.disk_minutes), args.out)


if __name__ == "__main__":
    main()
