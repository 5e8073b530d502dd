"""Generates Stoker's Grafana dashboards as JSON: `python dashboards/generate.py`.

Plain Python rather than grafana-foundation-sdk: the SDK (PyPI, tried for rows, links
and mappings) writes schemaVersion 36, `options: null` and empty refIds, types data
links as dashboard links, and takes five to eight chained calls for what is one line
here; the dashboards need no more than a few builders over dicts, add no dependency,
and produce JSON whose diffs review well. tests/test_dashboards.py checks that the
committed JSON is what this file generates, lints it (mappings, stacking, links,
alert evidence, percent sums) and runs every query on real Prometheus servers: Node
and GPU health on one that scraped simulated agents with the rules, Fleet on one that
only federates from it (packaging/prometheus/federation.yml), at 1,000 nodes too.

Fleet reads recording rules only (alerts/stoker.rules.yml, groups stoker.recording and
stoker.fleet): time series from the per-site aggregates (`site:`, `cause:`, `outcome:`:
a few series per site), tables and distributions from the per-node ones (a few series
per node, read at one instant). Node and GPU health read the raw series of one node.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
RANGE = "$__range"
SITE = 'site=~"$site"'
NODE = 'node="$node"'
JOB = 'job_id=~"$job_id"'
GOODPUT_LOW = 0.8  # StokerJobGoodputLow
PRODUCTIVE, NOT_PRODUCTIVE = ', state="productive"', ', state!="productive"'
GPU = 'node="$node", gpu=~"$gpu"'
# What the Site and Node pickers list. Fleet: the recording rule, all a federating store holds. Node and GPU
# health: a series every agent exports from its first scrape, so their pickers fill where the rules are not
# loaded (their panels read raw series anyway).
FLEET_NODES = "node_rack:stoker_agent_up:max"
AGENT_NODES = "stoker_build_info"
ROCE_RETRANSMITS = "out_of_sequence|packet_seq_err|local_ack_timeout_err|roce_adp_retrans"
HW_THROTTLE = "hw_slowdown|hw_thermal|sw_thermal|hw_power_brake"
CRITICAL_XIDS = "48|63|64|74|79|92|94|95|119|120"
TOP = 20

# Thresholds: where an alert fires (alerts/stoker.rules.yml) or where the verdicts count evidence
# (docs/VERDICTS.md, defaults). tests/test_dashboards.py checks the alerts' against the rules file.
ALERT_STARVED_SHARE = 0.5      # StokerGpusStarvedIntermittently, StokerGpusOftenStarvedByHost
ALERT_CONGESTION = 1000        # StokerRoceCongestion (ECN marks + CNPs sent + CNPs handled)
ALERT_RETRANSMITS = 20         # StokerRocePacketLoss
ALERT_FLAPS = 2                # StokerRdmaPortFlapping, in 15 minutes
ALERT_PROBE_P99 = 0.5          # StokerNasLatencyHigh
ALERT_HUNG = 30                # StokerNasMountHung
ALERT_STALL = 180              # StokerCheckpointStalled: the agent's stall_after (120 s) and 1 minute
ALERT_BUDGET = 600             # StokerCheckpointOverBudget: the agent's budget
ALERT_THROTTLE = 0.1           # StokerGpuThrottling
ALERT_XID_AGE = 900            # StokerGpuXidError: seen in the last 15 minutes
ALERT_COLLECTOR = 300          # StokerCollectorDown: failing for 5 minutes
CNP, PAUSE, READ_LAT, READ_QUEUE, WRITE_LAT, PROBE_SLOW, PROBE_HUNG = 500, 0.02, 0.02, 0.01, 0.1, 1.0, 5.0
CPU_PRESSURE, MEMORY_PRESSURE, DROP_RATIO = 0.4, 0.2, 0.5

UP, DOWN = ("up", "green"), ("DOWN", "red")


# -- builders --------------------------------------------------------------------------------------

def q(expr: str, legend: str = "", instant: bool = False, table: bool = False) -> dict:
    """A PromQL target; tables and stats read one instant."""
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": not (instant or table),
            "instant": instant or table, "format": "table" if table else "time_series"}


def th(*steps: tuple[float, str], base: str = "green") -> dict:
    return {"mode": "absolute", "steps": [{"color": base, "value": None}]
            + [{"color": c, "value": v} for v, c in steps]}


def mappings(states: dict[str, tuple[str, str]]) -> list[dict]:
    return [{"type": "value", "options": {
        k: {"text": text, "color": color, "index": i} for i, (k, (text, color)) in enumerate(states.items())}}]


def link(title: str, uid: str, **vars: str) -> dict:
    """A data link that keeps the time range, the data source and the site."""
    params = "&".join(f"var-{k}={v}" for k, v in vars.items())
    return {"title": title, "url": f"/d/{uid}/{uid}?${{__url_time_range}}&${{datasource:queryparam}}"
                                   f"&${{site:queryparam}}&{params}"}


TO_GPU = link("GPU ${__field.labels.gpu}", "stoker-gpu-health", node="${__field.labels.node}",
              gpu="${__field.labels.gpu}")
ROW_TO_NODE = link("Node ${__data.fields.node}", "stoker-node", node="${__data.fields.node}")


def override(name: str, by: str = "byName", **props) -> dict:
    key = {"unit": "unit", "thresholds": "thresholds", "links": "links", "mappings": "mappings",
           "color": "color", "cell": "custom.cellOptions", "style": "custom.lineStyle",
           "stack": "custom.stacking", "fill": "custom.fillOpacity"}
    return {"matcher": {"id": by, "options": name},
            "properties": [{"id": key[k], "value": v} for k, v in props.items()]}


def panel(kind: str, title: str, unit: str, description: str, targets: list[dict], w: int, h: int,
          defaults: dict | None = None, options: dict | None = None, overrides: list | None = None,
          transformations: list | None = None) -> dict:
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": overrides or []},
        "options": options or {}, "transformations": transformations or [],
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "gridPos": {"w": w, "h": h},
    }


def ts(title: str, unit: str, description: str, *targets: dict, w: int = 12, h: int = 9, thresholds=None,
       stack: bool = False, bars: bool = False, calcs=("lastNotNull", "max"), links=None,
       overrides=None, **limits) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "fillOpacity": 60 if bars or stack else 10,
              "lineWidth": 1, "showPoints": "never", "spanNulls": False,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"},
              "thresholdsStyle": {"mode": "dashed" if thresholds else "off"}}
    defaults = {"custom": custom, **limits, **({"thresholds": thresholds} if thresholds else {}),
                **({"links": links} if links else {})}
    options = {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                          "calcs": list(calcs), "sortBy": "Max" if "max" in calcs else None, "sortDesc": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel("timeseries", title, unit, description, list(targets), w, h, defaults, options, overrides)


def reference(name: str) -> dict:
    """A series drawn as a reference line (a level, a line rate): dashed, never stacked or filled."""
    return override(name, "byFrameRefID", style={"fill": "dash", "dash": [10, 10]}, stack={"mode": "none"},
                    fill=0, color={"mode": "fixed", "fixedColor": "red"})


def stat(title: str, unit: str, description: str, target: dict, thresholds=None, states=None, w: int = 3,
         no_value: str | None = None, text: str = "value") -> dict:
    defaults = {"thresholds": thresholds or th(), "color": {"mode": "thresholds"}}
    if states:
        defaults["mappings"] = mappings(states)
    if no_value:
        defaults["noValue"] = no_value
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "background", "graphMode": "none", "textMode": text, "justifyMode": "center"}
    return panel("stat", title, unit, description, [{**target, "instant": True, "range": False}], w, 4,
                 defaults, options)


def state(title: str, description: str, *targets: dict, states: dict, w: int = 12, h: int = 8,
          links=None, overrides=None) -> dict:
    defaults = {"mappings": mappings(states), "color": {"mode": "thresholds"}, "thresholds": th(),
                "custom": {"fillOpacity": 80, "lineWidth": 0}, **({"links": links} if links else {})}
    options = {"showValue": "auto", "mergeValues": True, "rowHeight": 0.9, "alignValue": "left",
               "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
               "tooltip": {"mode": "single", "sort": "none"}}
    return panel("state-timeline", title, "none", description, list(targets), w, h, defaults, options, overrides)


def table(title: str, description: str, *targets: dict, columns: dict, w: int = 12, h: int = 9,
          sort: str | None = None, row_link: bool = False, hide=()) -> dict:
    """`columns`: each query's value column (by refId) -> (name, unit, thresholds or None), or None to
    hide it (an info metric's 1); `hide`: label columns not shown. A node column links to the Node
    dashboard when `row_link`."""
    single = len(targets) == 1
    rename, overrides, hidden = {}, [], []
    for ref, column in columns.items():
        value = "Value" if single else f"Value #{ref}"
        if column is None:
            hidden.append(value)
            continue
        name, unit, thresholds = column
        rename[value] = name
        props = {"unit": unit}
        if thresholds:
            props.update(thresholds=thresholds, cell={"type": "color-background"})
        overrides.append(override(name, **props))
    if row_link:
        overrides.append(override("node", links=[ROW_TO_NODE]))
    exclude = {k: True for k in ("Time", "job", "instance", "__name__", "alertstate", *hidden, *hide)}
    transformations = ([] if single else [{"id": "merge", "options": {}}]) + [
        {"id": "organize", "options": {"excludeByName": exclude, "renameByName": rename}}]
    options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False},
               "sortBy": [{"displayName": sort, "desc": True}] if sort else []}
    return panel("table", title, "none", description, [{**t, **q(t["expr"], table=True)} for t in targets],
                 w, h, {"custom": {"align": "auto", "filterable": True}}, options, overrides, transformations)


def bars(title: str, unit: str, description: str, *targets: dict, w: int = 8, h: int = 9) -> dict:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}
    return panel("bargauge", title, unit, description, [{**t, "instant": True, "range": False} for t in targets],
                 w, h, {"thresholds": th(), "color": {"mode": "palette-classic"}, "min": 0}, options)


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def layout(panels: list[dict]) -> list[dict]:
    """Left to right, top to bottom; a row starts a new line."""
    x = y = line = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y, line = 0, y + line, 0
        p["gridPos"].update(x=x, y=y)
        p["id"] = i
        x, line = x + w, max(line, h)
        if p["type"] == "row":
            x, y, line = 0, y + 1, 0
    return panels


def variable(name: str, label: str, query: str, multi: bool = False, sort: int = 1) -> dict:
    """Refreshed with the time range; sort 1 alphabetical, 3 numerical."""
    v = {"name": name, "label": label, "type": "query", "datasource": DS, "refresh": 2, "sort": sort,
         "query": {"query": query, "refId": name}, "definition": query, "multi": multi, "includeAll": multi,
         "current": {}, "hide": 0}
    if multi:
        v["allValue"] = ".*"
    return v


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict],
              alerts: str, nodes: str) -> dict:
    """`nodes`: the series whose `site` labels the Site picker lists (FLEET_NODES or AGENT_NODES)."""
    return {
        "uid": uid, "title": title, "description": description, "tags": ["stoker"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "1m", "time": {"from": "now-6h", "to": "now"},
        "graphTooltip": 1,  # shared crosshair
        "links": [{"title": "Stoker", "type": "dashboards", "tags": ["stoker"], "asDropdown": False,
                   "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False}],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            variable("site", "Site / cluster", f"label_values({nodes}, site)", multi=True),
            *variables,
        ]},
        "annotations": {"list": [{
            "name": "Stoker alerts", "datasource": DS, "enable": True, "iconColor": "red",
            "expr": f'ALERTS{{alertstate="firing", alertname=~"Stoker.*", {alerts}}}',
            "step": "1m", "titleFormat": "{{alertname}}", "tagKeys": "severity,node", "useValueForTime": False,
        }]},
        "panels": layout(panels),
    }


def with_rack(expr: str) -> str:
    """Adds each node's rack (file_sd) to a per-node result."""
    return f"({expr}) + on (site, node) group_left (rack) 0 * node_rack:stoker_agent_up:max{{{SITE}}}"


def quantiles(expr: str, qs=((0, "min"), (0.1, "p10"), (0.5, "median"), (0.9, "p90"), (1, "max"))) -> list[dict]:
    return [q(f"quantile({v}, {expr})", name) for v, name in qs]


# -- Fleet -------------------------------------------------------------------------------------------

def fleet() -> dict:
    s = SITE
    job_nodes = f"sum(site:stoker_job_share:sum_rate10m{{{s}}})"
    with_job = f"and on (site, node) node:stoker_job_share:rate10m{{{s}}} > 0.5"

    def gpu_hours(metric: str) -> str:
        return f"avg_over_time({metric}{{{s}}}[{RANGE}])) * $__range_s / 3600"

    firing = f'ALERTS{{alertstate="firing", alertname=~"Stoker.*", {s}}}'
    starved_by_node = f"sum by (site, node) (node_cause:stoker_starved_share:rate10m{{{s}}})"
    return dashboard("stoker-fleet", "Stoker / Fleet", "Every node's verdicts, rails, NAS and checkpoints, from "
                     "the recording rules: distributions and top-N tables that link to the node.", [
        row("Now"),
        stat("Agents down", "short", "Nodes whose agent Prometheus cannot scrape (up == 0): blind to every alert. "
             "Red: find them in Agents below, then StokerTargetDown in the runbook.",
             q(f"sum(site:stoker_agents_down:sum{{{s}}})"), th((1, "red"))),
        stat("Nodes with a job", "short", "Nodes whose GPUs held a job over the last 10 minutes (node-equivalents): "
             "the denominator of every starved share on this dashboard.", q(job_nodes), th(), no_value="0"),
        stat("Nodes starved now", "short", "Nodes the agents call starved at this instant, whatever the cause. "
             "Orange: look at the most starved nodes below; many at once point at shared infrastructure.",
             q(f"sum(cause:stoker_starved_nodes:sum{{{s}}})"), th((1, "orange"), (10, "red"))),
        stat("Starved, share of job time", "percentunit", "Node-seconds starved over node-seconds with a job, last "
             "10 minutes: what the fleet loses. Red above 20%: the cause breakdown below says where to look.",
             q(f"sum(cause:stoker_starved_share:sum_rate10m{{{s}}}) / {job_nodes}"),
             th((0.05, "orange"), (0.2, "red")), no_value="no job"),
        stat("GPU-hours starved", "suffix: GPU-h", "GPU-hours spent starved over the selected time range, all causes "
             "(the breakdown is below): the GPUs ran under half their job's level, or idle, all that time.",
             q("sum(" + gpu_hours("cause:stoker_starved_gpus:sum_rate10m")), th((1, "orange"))),
        stat("GPUs lost", "short", "GPUs NVML no longer answers for (StokerGpuLost). Red: drain the node, see the "
             "GPU alerts below and the runbook.", q(f"sum(site:stoker_gpus_lost:sum{{{s}}})"), th((1, "red"))),
        stat("Rail ports down", "short", "RDMA ports not ACTIVE across the fleet (StokerRdmaPortDown). Red: the "
             "Rails table below names the nodes; reseat or replace the cable or transceiver.",
             q(f"sum(site:stoker_rdma_ports_down:sum{{{s}}})"), th((1, "red"))),
        stat("Critical alerts", "short", "Stoker alerts firing with severity critical (paging). The table below "
             "lists every firing alert with a link to its node.",
             q(f'count(ALERTS{{alertstate="firing", alertname=~"Stoker.*", severity="critical", {s}}}) or vector(0)'),
             th((1, "red"))),
        table("Firing alerts", "Every Stoker alert firing now, as the Prometheuses that scrape the nodes evaluate them. "
              "Click a node for its evidence; the runbook (alerts/runbook.md) has a section per alert.",
              q(firing), columns={"A": None}, w=24, h=8, row_link=True),

        row("Starvation"),
        ts("Starved share of job time, by cause", "percentunit", "Node-seconds starved per node-second with a job "
           "(10-minute rates), stacked: 0.25 = a quarter of the fleet's job time lost to starvation. Storage or "
           "network on many nodes at once is shared infrastructure: call that team.",
           q(f"sum by (cause) (cause:stoker_starved_share:sum_rate10m{{{s}}}) / scalar({job_nodes})", "{{cause}}"),
           stack=True, min=0, calcs=("mean", "max")),
        ts("Nodes starved, by cause, and nodes with a job", "short", "How many nodes are starved at each moment, "
           "stacked by cause, against the nodes running a job (dashed).",
           q(f"sum by (cause) (cause:stoker_starved_nodes:sum{{{s}}})", "{{cause}}"), q(job_nodes, "nodes with a job"),
           stack=True, min=0, overrides=[reference("B")]),
        bars("GPU-hours starved or lost, over the range", "suffix: GPU-h", "GPU-hours over the selected time range: "
             "starved, by cause (the node's GPUs times the time it was starved), and lost (GPUs NVML did not "
             "answer for). The largest bar is where the fleet's compute goes.",
             q("sum by (cause) (" + gpu_hours("cause:stoker_starved_gpus:sum_rate10m"), "starved: {{cause}}"),
             q("sum(" + gpu_hours("site:stoker_gpus_lost:sum"), "GPUs lost")),
        table("Most starved nodes", f"The {TOP} node and cause pairs with the largest share of time starved over the "
              "last 10 minutes. Above 50% StokerGpusStarvedIntermittently pages. Click the node for its evidence.",
              q(with_rack(f"topk({TOP}, node_cause:stoker_starved_share:rate10m{{{s}}} > 0)")),
              columns={"A": ("starved share", "percentunit", th((0.2, "orange"), (ALERT_STARVED_SHARE, "red")))},
              w=10, sort="starved share", row_link=True),
        table("Starved nodes by rack", "Starved node-equivalents per rack (10-minute rates), the 10 worst racks: "
              "several starved nodes in one rack point at its leaf switch, its storage path or its power.",
              q(f"topk(10, sum by (site, rack) ({with_rack(starved_by_node)}))"),
              columns={"A": ("starved nodes", "short", th((1, "orange"), (3, "red")))}, w=6, sort="starved nodes"),

        row("Jobs across nodes"),
        table("Jobs held back by a node", "Multi-node jobs whose other nodes wait for one of theirs "
              "(StokerJobHeldBackByNode, pending then firing): the job, the node that holds it back and its cause "
              "(storage, network, checkpoint, host; compute: its GPUs work while the others wait). Click the node "
              "for its evidence; the nodes that wait (peer) are healthy.",
              q(f'ALERTS{{alertname="StokerJobHeldBackByNode", {s}}}'), columns={"A": None}, w=10, h=8,
              row_link=True),
        table("Multi-node jobs: each node's verdict", "Every node of each job that spans nodes: the GPUs the job "
              "holds there and the node's verdict now (empty: not starved). peer: its GPUs wait for another node of "
              "the job, whose own cause is elsewhere in the table and in the table on the left.",
              q(f"(node_job:stoker_gpus:count{{{s}}} * on (site, node) group_left (cause) "
                f"node_cause:stoker_starved:max{{{s}}} or on (site, node, job_id) node_job:stoker_gpus:count{{{s}}}) "
                f"and on (job_id) count by (job_id) (node_job:stoker_gpus:count{{{s}}}) > 1"),
              columns={"A": ("GPUs", "short", None)}, w=14, h=8, sort="cause", row_link=True),
        table("GPU-hours lost per job, by cause, over the range", f"The {TOP} job and cause pairs that cost the "
              "most GPU-hours over the selected range: each of the job's nodes' GPUs times the time it spent "
              "starved by that cause (peer: waiting for another node of the job), in a checkpoint, or idle.",
              q(f"topk({TOP}, sum by (job_id, state) (avg_over_time(job_state:stoker_job_gpus:rate10m{{{s}}}"
                f"[{RANGE}])) * $__range_s / 3600)"),
              columns={"A": ("GPU-hours", "suffix: GPU-h", th((1, "orange"), (10, "red")))}, w=24, h=7,
              sort="GPU-hours"),

        row("GPUs"),
        ts("Busy ratio across nodes with a job", "percentunit", "The distribution of the nodes' busy ratio (GPM SM "
           "activity from its counter, 5-minute rate) over the nodes running a job: a falling min or p10 is a few "
           "nodes slowing their jobs; a falling median is the fleet.",
           *quantiles(f"node:stoker_gpu_busy_seconds:avg_rate5m{{{s}}} {with_job}"), min=0, max=1,
           calcs=("mean", "min", "lastNotNull")),
        table("Least busy nodes with a job", f"The {TOP} nodes running a job with the lowest busy ratio (5 minutes). "
              "A node far below its neighbours in the same job slows the whole job: click it.",
              q(with_rack(f"bottomk({TOP}, node:stoker_gpu_busy_seconds:avg_rate5m{{{s}}} {with_job})")),
              columns={"A": ("busy", "percentunit", th((0.5, "orange"), (0.8, "green"), base="red"))},
              row_link=True),
        ts("GPUs lost", "short", "GPUs NVML does not answer for, over time (StokerGpuLost after 1 minute).",
           q(f"sum(site:stoker_gpus_lost:sum{{{s}}})", "GPUs lost"), thresholds=th((1, "red")), min=0, w=8,
           calcs=("lastNotNull", "max")),
        table("GPU alerts firing", "XIDs, lost GPUs, row remaps, throttling and refused profiling counters, per GPU. "
              "Click the node, then its GPU health dashboard.",
              q(f'ALERTS{{alertstate="firing", alertname=~"StokerGpu.*", {s}}}'),
              columns={"A": None}, w=16, h=9, row_link=True),

        row("Rails (RoCE)"),
        ts("Nodes with rail trouble", "short", "Nodes whose worst rail is congested (above 1,000 ECN marks and CNPs "
           "per second: StokerRoceCongestion), losing packets (above 20 retransmissions per second: "
           "StokerRocePacketLoss), paused over 2% of the time, or with a port down. Many nodes at once: the fabric.",
           # per-site counts recorded at these thresholds (stoker.fleet): one series a site over the range
           q(f"sum(site:stoker_nodes_rail_congested:count{{{s}}})", "congested"),
           q(f"sum(site:stoker_nodes_rail_losing_packets:count{{{s}}})", "losing packets"),
           q(f"sum(site:stoker_nodes_rail_paused:count{{{s}}})", "paused"),
           q(f"sum(site:stoker_nodes_rail_port_down:count{{{s}}})", "port down"), min=0, w=8),
        table("Worst rails", f"Per node, its worst rail: congestion events/s, retransmissions/s, transport retries "
              f"exceeded in 5 minutes (fatal: a queue pair gave up), share of time the switch paused it, pause storms "
              f"in 5 minutes, ports down; the {TOP} worst nodes by each. Red where an alert fires; click the node for "
              "the rail.",
              q(f"topk({TOP}, node:stoker_rdma_congestion_events:max_rate1m{{{s}}} > 0)"),
              q(f"topk({TOP}, node:stoker_rdma_retransmits:max_rate1m{{{s}}} > 0)"),
              q(f"topk({TOP}, node:stoker_rdma_retries_exceeded:increase5m{{{s}}} > 0)"),
              q(f"topk({TOP}, node:stoker_net_rx_pause_ratio:max_rate1m{{{s}}} > 0)"),
              q(f"topk({TOP}, node:stoker_net_pause_storm_events:increase5m{{{s}}} > 0)"),
              q(f"topk({TOP}, node:stoker_rdma_ports_down:sum{{{s}}} > 0)"),
              columns={"A": ("congestion/s", "cps", th((CNP, "orange"), (ALERT_CONGESTION, "red"))),
                       "B": ("retransmits/s", "cps", th((ALERT_RETRANSMITS, "red"))),
                       "C": ("retries exceeded", "short", th((0.5, "red"))),
                       "D": ("paused", "percentunit", th((PAUSE, "red"))),
                       "E": ("pause storms", "short", th((0.5, "red"))),
                       "F": ("ports down", "short", th((1, "red")))},
              w=16, sort="congestion/s", row_link=True),

        row("Storage (NAS)"),
        ts("NFS READ time per operation across mounts", "s", "The distribution over every node's mounts of the "
           "time one READ takes (client queue and round trip). The median rising is the NAS; a max alone is a node "
           "or its path. The verdicts count READs over 20 ms.",
           *quantiles(f"node_mountpoint:stoker_nfs_read_seconds_per_op:rate1m{{{s}}}",
                      ((0.5, "median"), (0.9, "p90"), (0.99, "p99"), (1, "max"))),
           thresholds=th((READ_LAT, "red")), min=0, w=8),
        ts("Mounts in trouble", "short", "Mounts not answering probes for over 30 s (StokerNasMountHung), with NFS "
           "major timeouts in 5 minutes (StokerNfsMajorTimeouts), or whose probes fail.",
           q(f"sum(site:stoker_mounts_hung:count{{{s}}})", "hung"),
           q(f"sum(site:stoker_mounts_major_timeouts:count{{{s}}})", "major timeouts"),
           q(f"sum(site:stoker_mounts_probes_failing:count{{{s}}})", "probes failing"), min=0, w=4),
        table("Worst mounts", f"Per node and mount: the slowest NAS probe's p99 (5 minutes), how long the mount has "
              f"not answered probes, the share of probes that failed (timeouts never reach the latency histogram), "
              f"major timeouts in 5 minutes, READ time per operation; the {TOP} worst by each. Red where an alert "
              "fires.",
              q(f"topk({TOP}, node_mountpoint:stoker_nas_probe_seconds:max_p99_5m{{{s}}})"),
              q(f"topk({TOP}, node_mountpoint:stoker_nas_probe_inflight_seconds:max{{{s}}} > 0)"),
              q(f"topk({TOP}, node_mountpoint:stoker_nas_probe_failure_ratio:rate5m{{{s}}} > 0)"),
              q(f"topk({TOP}, node_mountpoint:stoker_nfs_major_timeouts:increase5m{{{s}}} > 0)"),
              q(f"topk({TOP}, node_mountpoint:stoker_nfs_read_seconds_per_op:rate1m{{{s}}})"),
              columns={"A": ("probe p99", "s", th((ALERT_PROBE_P99, "red"))),
                       "B": ("unanswered for", "s", th((PROBE_HUNG, "orange"), (ALERT_HUNG, "red"))),
                       "C": ("probes failed", "percentunit", th((0.01, "red"))),
                       "D": ("major timeouts", "short", th((0.5, "red"))),
                       "E": ("READ time/op", "s", th((READ_LAT, "red")))},
              w=12, sort="probe p99", row_link=True),

        row("Checkpoints"),
        ts("Checkpoints in progress, stalled, over budget", "short", "Mounts with a checkpoint being written, "
           "stalled (no byte reached the NAS for the agent's stall_after: StokerCheckpointStalled pages a minute "
           "later) and past the budget (StokerCheckpointOverBudget). Stalled on many nodes: the NAS.",
           q(f"sum(site:stoker_checkpoints_in_progress:sum{{{s}}})", "in progress"),
           q(f"sum(site:stoker_checkpoints_stalled:sum{{{s}}})", "stalled"),
           q(f"sum(site:stoker_checkpoints_over_budget:sum{{{s}}})", "over budget"), min=0, w=8),
        bars("Checkpoints finished, by outcome, over the range", "short", "Checkpoints that ended in the selected "
             "time range: completed, stalled (stalled when it ended), aborted (said by the job), abandoned (nobody "
             "ended it), lost (its mount went away). Anything but completed deserves a look.",
             q(f"sum by (outcome) (avg_over_time(outcome:stoker_checkpoints:rate10m{{{s}}}[{RANGE}])) * $__range_s",
               "{{outcome}}")),
        ts("Last checkpoint duration across nodes", "s", "The distribution over nodes of how long their last "
           "checkpoint took. Past the 10-minute budget the agent raises StokerCheckpointOverBudget.",
           *quantiles(f"node:stoker_checkpoint_last_duration_seconds:max{{{s}}}",
                      ((0.5, "median"), (0.9, "p90"), (1, "max"))),
           thresholds=th((ALERT_BUDGET, "red")), min=0, w=8),
        table("Slowest last checkpoints", f"The {TOP} nodes whose last checkpoint took longest. Click the node for "
              "its recent checkpoints, their bytes and outcomes.",
              q(with_rack(f"topk({TOP}, node:stoker_checkpoint_last_duration_seconds:max{{{s}}})")),
              columns={"A": ("last duration", "s", th((ALERT_BUDGET, "red")))}, w=24, h=8,
              sort="last duration", row_link=True),

        row("Agents"),
        ts("Agents down and blind collectors", "short", "Agents not scraped (up == 0) and collectors failing "
           "(stoker_collector_up == 0). A blind collector makes its node read \"not starved\": trust no verdict of "
           "those nodes.",
           q(f"sum(site:stoker_agents_down:sum{{{s}}})", "agents down"),
           q(f"sum(site:stoker_collectors_down:sum{{{s}}})", "collectors failing"), thresholds=th((1, "red")), min=0,
           w=8),
        table("Agents down and collectors failing", "Per node: agent down (1), collectors failing. StokerTargetDown "
              "and StokerCollectorDown in the runbook say what to do.",
              q(f"node_rack:stoker_agent_up:max{{{s}}} == 0"),
              q(with_rack(f"topk(50, node:stoker_collectors_down:sum{{{s}}} > 0)")),
              columns={"A": ("agent up", "short", th((1, "green"), base="red")),
                       "B": ("collectors failing", "short", th((1, "red")))}, w=10, row_link=True),
        bars("Agent versions", "short", "Agents per version: a rollout in progress, or nodes left behind (their "
             "metrics or verdicts may differ: see the changelog).",
             q(f"sum by (version) (version:stoker_build_info:count{{{s}}})", "{{version}}"), w=6),
    ], [], f'severity="critical", {SITE}', FLEET_NODES)  # at 10,000 nodes, warnings would bury the time axis


# -- Node --------------------------------------------------------------------------------------------

def job_time(states: str = "") -> str:
    """The selected jobs' time across all their nodes, per second, in the states asked for."""
    return f"rate(stoker_job_seconds_total{{{JOB}{states}}}[{RI}])"


def node() -> dict:
    n = NODE

    def rate(metric: str, extra: str = "") -> str:
        return f"rate({metric}{{{n}{extra}}}[{RI}])"

    def hw(counters: str) -> str:
        return rate("stoker_rdma_hw_events_total", f', counter=~"{counters}"')

    def per_op(kind: str, op: str) -> str:
        where = f', operation="{op}"'
        return (f"sum by (mountpoint) ({rate(f'stoker_nfs_{kind}_seconds_total', where)})"
                f" / sum by (mountpoint) ({rate('stoker_nfs_operations_total', where)})")

    role = f'on (mountpoint) group_left () stoker_nfs_mount_info{{{n}, role="checkpoint"}}'
    expected, present = (f"max by (kind) (stoker_inventory_{m}{{{n}}})" for m in ("expected", "present"))
    missing = f"{expected} - {present}"  # StokerInventoryMissing's

    return dashboard("stoker-node", "Stoker / Node", "One node: the verdict and its evidence, GPUs, rails, NAS, "
                     "checkpoints, host and the agent itself.", [
        row("Now"),
        stat("Agent", "none", "Whether Prometheus scrapes the agent. DOWN: every panel below is stale and the node is "
             "blind to every alert (StokerTargetDown): systemctl status stoker on the node.",
             q(f'up{{job="stoker", {n}}}'), states={"0": DOWN, "1": UP}, no_value="not scraped", w=2),
        stat("Starved", "none", "The agent's verdict now: the cause the node's GPUs are starved by, or not starved. "
             "\"not starved\" is only true when Agent is up and no collector fails (next stats).",
             q(f"stoker_starved{{{n}}} == 1", "{{cause}}"), th(base="red"), no_value="not starved", text="name", w=4),
        stat("Busy", "percentunit", "Mean busy ratio of the node's GPUs (GPM SM activity, from its counter) over the "
             "rate interval. Compare with the job's level next to it.",
             q(f"avg({rate('stoker_gpu_busy_seconds_total')})"), th((0.5, "orange"), (0.8, "green"), base="red"),
             w=2),
        stat("Job level", "percentunit", "The level the job sustains (median busy ratio while not starved): starved "
             "below half of it. Empty: no job, or not yet learned.", q(f"stoker_busy_baseline_ratio{{{n}}}"),
             no_value="no job", w=2),
        stat("GPUs lost", "short", "GPUs NVML does not answer for. Red: StokerGpuLost; the GPU health dashboard has "
             "the XIDs.", q(f"count(stoker_gpu_up{{{n}}} == 0) or vector(0)"), th((1, "red")), w=2),
        stat("Rail ports down", "short", "RDMA ports not ACTIVE. Red: StokerRdmaPortDown; the Rails row shows which.",
             q(f"count(stoker_rdma_port_up{{{n}}} == 0) or vector(0)"), th((1, "red"))),
        stat("Devices missing", "short", "GPUs and RDMA ports the node should have ([inventory] in its "
             "configuration, else the most it has shown) that the agent does not find: a GPU that did not come back "
             "after a reboot or a reset, a port gone from class/infiniband: missing since boot, no other alert "
             "sees it. Red for 5 minutes: StokerInventoryMissing. The Inventory table (GPUs row) says which kind.",
             q(f"sum(clamp_min({missing}, 0)) or vector(0)"), th((1, "red"))),
        stat("Checkpoint", "none", "A checkpoint being written (writing), stalled (no byte reaching the NAS), or "
             "none. Stalled: StokerCheckpointStalled; see the Checkpoints row.",
             q(f"max(stoker_checkpoint_in_progress{{{n}}} + 2 * stoker_checkpoint_stalled{{{n}}})"),
             states={"0": ("none", "green"), "1": ("writing", "blue"), "3": ("STALLED", "red")}, no_value="none"),
        stat("Collectors failing", "short", "Collectors whose last cycle failed: their metrics are missing and the "
             "verdict is blind to them. Red: the Agent row names them (StokerCollectorDown).",
             q(f"count(stoker_collector_up{{{n}}} == 0) or vector(0)"), th((1, "red"))),

        row("Verdict: starved, by what, and the evidence"),
        ts("Busy ratio per GPU, and the job's level", "percentunit", "Each GPU's busy ratio from its counter "
           "(exact over the interval, however seldom scraped), the job's level and the starved line at half of it "
           "(drop_ratio). A GPU alone below the line: its GPU health. All of them: the cause on the right.",
           q(rate("stoker_gpu_busy_seconds_total"), "GPU {{gpu}}"),
             q(f"stoker_busy_baseline_ratio{{{n}}}", "job level"),
           q(f"{DROP_RATIO} * stoker_busy_baseline_ratio{{{n}}}", "starved below"), min=0, max=1,
           calcs=("mean", "min", "lastNotNull"), links=[TO_GPU], overrides=[reference("B"), reference("C")]),
        state("Starved, by cause", "The agent's verdict each second it was scraped: at most one cause at a time. "
              "The share panel below counts every second, scraped or not.",
              q(f"stoker_starved{{{n}}}", "{{cause}}"), states={"0": ("no", "transparent"), "1": ("STARVED", "red")}),
        state("Why the verdict holds: the GPU and cause machines", "The verdict engine's machines "
              "(docs/VERDICTS.md): the GPUs low or recovering (back at the level, the verdict not yet cleared), "
              "and each cause not inactive: pending (challenging the verdict's cause), active (its evidence "
              "present), resolving (only remembered: the verdict holds on it a while), resolved.",
              q(f'stoker_starvation_state{{state!="ok", {n}}}', "GPUs {{state}}"),
              q(f'stoker_cause_state{{state!="inactive", {n}}}', "{{cause}} {{state}}"),
              states={"0": ("", "transparent"), "1": ("yes", "orange")}),
        ts("Starved share of time, by cause, and the job's", "percentunit", "Share of each interval the GPUs were "
           "starved, stacked by cause, against the share a job held them (dashed). Above 50% over 10 minutes by "
           "storage or network StokerGpusStarvedIntermittently pages; by the host, StokerGpusOftenStarvedByHost.",
           q(rate("stoker_starved_seconds_total"), "{{cause}}"),
             q(rate("stoker_job_present_seconds_total"), "job on the GPUs"),
           stack=True, min=0, max=1, thresholds=th((ALERT_STARVED_SHARE, "red")), overrides=[reference("B")],
           calcs=("mean", "max")),
        ts("Evidence score, by cause", "none", "How strongly each cause explains a drop, as the verdict ranks it: 1 "
           "at a threshold (it explains a drop), 2 and fresh is strong. The runner-up shows here too.",
           q(f"stoker_cause_evidence_score{{{n}}}", "{{cause}}"), thresholds=th((1, "orange"), (2, "red")), min=0),
        ts("Evidence signals", "none", "Each signal seen, as its measured value over its threshold (1 = at the "
           "threshold): which rail, interface or mount supports which cause (docs/VERDICTS.md lists them).",
           q(f"stoker_evidence_strength{{{n}}}", "{{cause}}: {{signal}} {{source}}"),
           thresholds=th((1, "red")), min=0),
        table("Firing alerts", "Stoker alerts firing for this node; the runbook has a section for each.",
              q(f'ALERTS{{alertstate="firing", {n}}}'), columns={"A": None}, hide=("node",)),

        row("Jobs and goodput (the job's panels cover all its nodes)"),
        table("Job on each GPU", "Which job holds each GPU, from its processes' cgroups (Slurm job, Kubernetes "
              "pod), their environment, or the job's own step hints (source); unknown: processes NVML cannot see "
              "(another PID namespace) and no hint (docs/JOBS.md).",
              q(f"max by (gpu, job_id, scheduler, source) (stoker_gpu_job_info{{{n}}})"), columns={"A": None}, w=8),
        table("Job span", "Whether each job spans other nodes as this agent knows it (1: it does; source: its step "
              "hints, or its collectives on the node's RDMA ports at its level) and the nodes it says it spans: "
              "what makes a starved node `peer`, waiting for another node (docs/VERDICTS.md).",
              q(f"max by (job_id, source) (stoker_job_multinode{{{n}}})"),
              q(f"max by (job_id) (stoker_job_nodes{{{n}}})"),
              columns={"A": ("spans nodes", "short", None), "B": ("nodes", "short", None)}, w=6),
        ts("This node's time, by state", "percentunit", "Share of each interval this node spent productive, "
           "starved by each cause, in a checkpoint, idle with a job holding the GPUs, or with no job: the parts "
           "add up to 1.", q(rate("stoker_goodput_seconds_total"), "{{state}}"), stack=True, min=0, max=1,
           calcs=("mean", "max"), w=10),
        ts("Job goodput", "percentunit", "Share of the job's time, across all its nodes, spent productive: GPUs "
           "held, working, not starved. Below 80% over an hour StokerJobGoodputLow warns.",
           q(f"sum by (job_id) ({job_time(PRODUCTIVE)}) / sum by (job_id) ({job_time()})", "{{job_id}}"),
           min=0, max=1, thresholds=th((GOODPUT_LOW, "red"), base="red"), calcs=("mean", "min"), w=8),
        ts("Job time lost, by cause", "short", "How many of the job's nodes, on average, were not productive, and "
           "why: starved by storage, network or host, waiting for another node of the job (peer), waiting on a "
           "checkpoint, or idle with the GPUs held.",
           q(f"sum by (state) ({job_time(NOT_PRODUCTIVE)})", "{{state}}"), stack=True, min=0,
           calcs=("mean", "max"), w=8),
        ts("Job step time", "s", "Time between two reported steps (evaluations and checkpoints count): mean and "
           "median. 1.3 times its level of the 6 hours before, for 15 minutes: StokerJobStepTimeRegressed. And of it, "
           "the time this node's steps waited for their batch (its step hints): the node with the longest wait "
           "holds a multi-node job back.",
           q(f"sum by (job_id) (rate(stoker_job_step_seconds_sum{{{JOB}}}[{RI}])) / "
             f"sum by (job_id) (rate(stoker_job_step_seconds_count{{{JOB}}}[{RI}]))", "{{job_id}} mean"),
           q(f"histogram_quantile(0.5, sum by (job_id, le) (rate(stoker_job_step_seconds_bucket{{{JOB}}}[{RI}])))",
             "{{job_id}} median"),
           q(f"sum by (job_id) (rate(stoker_job_data_wait_seconds_total{{{n}, {JOB}}}[{RI}])) / "
             f"sum by (job_id) (rate(stoker_job_step_seconds_count{{{n}, {JOB}}}[{RI}]))",
             "{{job_id}} waiting for data (this node)"), min=0, calcs=("mean", "max"), w=8),
        table("Job work", "Per job: tokens and samples a second (from its hints), steps so far, restarts and the "
              "work they lost over the range (productive time since the last checkpoint Stoker saw complete), and "
              "the work not yet in a checkpoint now.",
              q(f"max by (job_id) (rate(stoker_job_tokens_total{{{JOB}}}[{RI}]))"),
              q(f"max by (job_id) (rate(stoker_job_samples_total{{{JOB}}}[{RI}]))"),
              q(f"max by (job_id) (stoker_job_last_step{{{JOB}}})"),
              q(f"sum by (job_id) (increase(stoker_job_restarts_total{{{JOB}}}[{RANGE}]))"),
              q(f"sum by (job_id) (increase(stoker_job_lost_seconds_total{{{JOB}}}[{RANGE}]))"),
              q(f"max by (job_id) (increase(stoker_job_lost_steps_total{{{JOB}}}[{RANGE}]))"),
              q(f"max by (job_id) (stoker_job_unsaved_seconds{{{JOB}}})"),
              columns={"A": ("tokens/s", "short", None), "B": ("samples/s", "short", None),
                       "C": ("last step", "short", None), "D": ("restarts", "short", th((1, "orange"))),
                       "E": ("work lost", "s", th((1, "red"))), "F": ("steps lost", "short", None),
                       "G": ("unsaved now", "s", None)}, w=24, h=7),

        row("GPUs (details: GPU health)"),
        state("GPU up", "Whether NVML answers for each GPU. LOST: StokerGpuLost; click for its GPU health.",
              q(f"stoker_gpu_up{{{n}}}", "GPU {{gpu}}"), states={"0": ("LOST", "red"), "1": ("up", "green")},
              links=[TO_GPU], w=9),
        ts("Compute processes per GPU", "short", "Processes of the job on each GPU (a job in another PID namespace "
           "shows none; its memory still counts as a job).",
           q(f"stoker_gpu_compute_processes{{{n}}}", "GPU {{gpu}}"), min=0, links=[TO_GPU], w=9),
        table("Inventory: GPUs and RDMA ports", "How many GPUs and RDMA ports the node should have ([inventory], "
              "else the most it has shown, kept in the state file) and how many the agent finds (a lost GPU still "
              "counts: GPU up says which). Missing for 5 minutes: StokerInventoryMissing.",
              q(expected), q(present), q(missing),
              columns={"A": ("expected", "short", None), "B": ("present", "short", None),
                       "C": ("missing", "short", th((1, "red")))}, w=6),

        row("Rails (RoCE)"),
        state("Rail state", "Each RDMA port (ACTIVE or not) and its netdev's link. DOWN: StokerRdmaPortDown after a "
              "minute; drain the node, reseat or replace the cable or transceiver.",
              q(f"stoker_rdma_port_up{{{n}}}", "{{device}}/{{port}}"), q(f"stoker_net_up{{{n}}}", "{{interface}} link"),
              states={"0": DOWN, "1": UP}),
        ts("Link flaps, last 15 minutes", "short", "Port state changes and link_downed events per rail over the "
           "last 15 minutes: above 2, StokerRdmaPortFlapping (a cable, a transceiver, a switch port).",
           q(f"changes(stoker_rdma_port_up{{{n}}}[15m])", "{{device}}/{{port}} state changes"),
           q(f'increase(stoker_rdma_port_errors_total{{{n}, counter="link_downed"}}[15m])',
             "{{device}}/{{port}} link downs"),
           thresholds=th((ALERT_FLAPS, "red")), min=0),
        ts("Transmit per rail, against the line rate", "bps", "Bits per second each rail sends (RDMA data), against "
           "its line rate (dashed). A rail far below its siblings in the same job is slow or rerouted.",
           q(f"8 * {rate('stoker_rdma_port_transmit_bytes_total')}", "{{device}}/{{port}}"),
           q(f"8 * max(stoker_rdma_port_speed_bytes_per_second{{{n}}})", "line rate"), min=0,
           overrides=[reference("B")], calcs=("mean", "max")),
        ts("Receive per rail, against the line rate", "bps", "Bits per second each rail receives (RDMA data), "
           "against its line rate (dashed).",
           q(f"8 * {rate('stoker_rdma_port_receive_bytes_total')}", "{{device}}/{{port}}"),
           q(f"8 * max(stoker_rdma_port_speed_bytes_per_second{{{n}}})", "line rate"), min=0,
           overrides=[reference("B")], calcs=("mean", "max")),
        ts("Congestion, receiver side: ECN-marked packets", "cps", "Per rail, packets arriving with an ECN mark "
           "(the larger of marks and CNPs sent back for them: one event, counted once). Above 500/s the verdicts "
           "count congestion; StokerRoceCongestion adds both sides and CNPs sent, above 1,000/s for 10 minutes.",
           q(f'max by (device, port) ({hw("np_ecn_marked_roce_packets|np_cnp_sent")})', "{{device}}/{{port}}"),
           thresholds=th((CNP, "red")), min=0),
        ts("Congestion, sender side: CNPs handled", "cps", "Per rail, congestion notifications received and acted on: "
           "this node's sends are being slowed by DCQCN. Above 500/s the verdicts count congestion. Many nodes "
           "under one leaf: the fabric.",
           q(hw("rp_cnp_handled"), "{{device}}/{{port}}"),
           thresholds=th((CNP, "red")), min=0),
        ts("Retransmissions per rail", "cps", "Out of sequence, sequence errors, local ACK timeouts and adaptive "
           "retransmissions per second: a lossless fabric losing packets. Above 20/s for 5 minutes, "
           "StokerRocePacketLoss: check the port errors next to it.",
           q(f"sum by (device, port) ({hw(ROCE_RETRANSMITS)})", "{{device}}/{{port}}"),
           thresholds=th((ALERT_RETRANSMITS, "red")), min=0),
        ts("Transport retries exceeded (fatal)", "short", "Queue pairs that gave up after their retries, per rail: "
           "the NCCL communicator using it has failed or will (StokerRoceRetriesExceeded pages on any).",
           q(f'increase(stoker_rdma_hw_events_total{{{n}, counter="req_transport_retries_exceeded"}}[{RI}])',
             "{{device}}/{{port}}"),
           bars=True, thresholds=th((1, "red")), min=0),
        ts("PFC pause: share of time paused", "percentunit", "rx: the switch paused this rail; tx: this node paused "
           "the switch (a host that cannot drain its receive queues). The worst priority per interface. Above 2% the "
           "verdicts count it.",
           q(f"max by (interface, direction) ({rate('stoker_net_pause_seconds_total')})",
             "{{interface}} {{direction}}"),
           thresholds=th((PAUSE, "red")), min=0),
        ts("PFC pause frames and pause storms", "short", "Pause frames per second by direction, and pause storms "
           "(the NIC stopped honouring PFC: StokerPfcPauseStorm pages on any).",
           q(f"sum by (interface, direction) ({rate('stoker_net_pause_frames_total')})",
             "{{interface}} {{direction}} frames/s"),
           q(f"increase(stoker_net_pause_storm_events_total{{{n}}}[{RI}])", "{{interface}} storms {{severity}}"),
           thresholds=th((1, "red")), min=0),
        ts("Port errors and NIC discards", "cps", "Per second: the RDMA port error counters (symbol errors, link "
           "error recovery, discards: a cable or transceiver) and the netdev's discards (buffers overrun).",
           q(f'sum by (device, port, counter) ({rate("stoker_rdma_port_errors_total")}) > 0',
             "{{device}}/{{port}} {{counter}}"),
           q(f"sum by (interface, counter) ({rate('stoker_net_discards_total')}) > 0",
             "{{interface}} {{counter}}"), min=0),
        ts("Packets and wire bytes, all rails", "short", "All rails together: RDMA packets per second each way, and "
           "every byte on the wire (bits/s, right axis; netdev counters, RDMA and everything else).",
           q(f"sum({rate('stoker_rdma_port_transmit_packets_total')})", "RDMA packets/s sent"),
           q(f"sum({rate('stoker_rdma_port_receive_packets_total')})", "RDMA packets/s received"),
           q(f"8 * sum by (direction) ({rate('stoker_net_physical_bytes_total')})", "wire {{direction}}"),
           overrides=[override("C", "byFrameRefID", unit="bps")], min=0),
        table("Rails", "Each RDMA port: its netdev, link layer, firmware and line rate (active ports only).",
              q(f"8 * stoker_rdma_port_speed_bytes_per_second{{{n}}} * on (device, port) group_left (interface, "
                f"link_layer, fw_version) stoker_rdma_port_info{{{n}}}"),
              columns={"A": ("line rate", "bps", None)}, hide=("node",)),

        row("NAS (NFS and probes)"),
        ts("READ: client queue and round trip per operation", "s", "Per mount, the time one READ waits in the client "
           "(transports saturated, server not draining them) and its round trip to the NAS. The verdicts count a "
           "queue above 10 ms and a READ above 20 ms as storage evidence.",
           q(per_op("queue", "READ"), "{{mountpoint}} queue"), q(per_op("rtt", "READ"), "{{mountpoint}} round trip"),
           thresholds=th((READ_QUEUE, "orange"), (READ_LAT, "red")), min=0),
        ts("WRITE: client queue and round trip per operation", "s", "Per mount, the time one WRITE waits in the "
           "client and its round trip. Above 100 ms per WRITE the NAS cannot absorb the writes (checkpoints stall).",
           q(per_op("queue", "WRITE"), "{{mountpoint}} queue"), q(per_op("rtt", "WRITE"), "{{mountpoint}} round trip"),
           thresholds=th((WRITE_LAT, "red")), min=0),
        ts("Time per operation, every operation", "s", "Execute time (queue, round trip and client processing) per "
           "operation and mount. Metadata operations slowing alone: the NAS's metadata path.",
           q(f"sum by (mountpoint, operation) ({rate('stoker_nfs_execute_seconds_total')})"
             f" / sum by (mountpoint, operation) ({rate('stoker_nfs_operations_total')})",
               "{{mountpoint}} {{operation}}"),
           min=0),
        ts("NFS throughput", "Bps", "Bytes per second read from and written to the NAS, and written by the job to the "
           "client (page cache and O_DIRECT): what is written but not yet sent waits in the page cache.",
           q(rate("stoker_nfs_read_bytes_total"), "{{mountpoint}} read"),
           q(rate("stoker_nfs_write_bytes_total"), "{{mountpoint}} written to the NAS"),
           q(rate("stoker_nfs_client_write_bytes_total"), "{{mountpoint}} written by the job"), min=0),
        ts("Retransmissions, major timeouts, errors", "short", "Per mount: RPC retransmissions per second, major "
           "timeouts in the interval (no answer within timeo x retrans: StokerNfsMajorTimeouts on any), operations "
           "that failed per second.",
           q(f"sum by (mountpoint) ({rate('stoker_nfs_transmissions_total')}) - sum by (mountpoint) "
             f"({rate('stoker_nfs_operations_total')})", "{{mountpoint}} retransmissions/s"),
           q(f"sum by (mountpoint) (increase(stoker_nfs_major_timeouts_total{{{n}}}[{RI}]))",
             "{{mountpoint}} major timeouts"),
           q(f"sum by (mountpoint) ({rate('stoker_nfs_errors_total')})", "{{mountpoint}} errors/s"),
           thresholds=th((1, "red")), min=0),
        ts("NAS probe latency", "s", "p99 and median of each probe (write+fsync, uncached read, create/stat/unlink) "
           "per mount. p99 above 500 ms for 10 minutes: StokerNasLatencyHigh; a probe over 1 s is storage evidence.",
           q(f"histogram_quantile(0.99, sum by (mountpoint, probe, le) ({rate('stoker_nas_probe_seconds_bucket')}))",
             "{{mountpoint}} {{probe}} p99"),
           q(f"histogram_quantile(0.5, sum by (mountpoint, probe, le) ({rate('stoker_nas_probe_seconds_bucket')}))",
             "{{mountpoint}} {{probe}} median"),
           thresholds=th((ALERT_PROBE_P99, "orange"), (PROBE_SLOW, "red")), min=0),
        ts("NAS probes failed", "percentunit", "Share of probes that failed, by reason: a timed-out probe (killed "
           "at its deadline) never reaches the latency histogram, so a NAS that stops answering shows here, not there.",
           q(f"sum by (mountpoint, reason) ({rate('stoker_nas_probe_failures_total')}) / on (mountpoint) group_left () "
             f"(sum by (mountpoint) ({rate('stoker_nas_probe_failures_total')}) + sum by (mountpoint) "
             f"({rate('stoker_nas_probe_seconds_count')}))", "{{mountpoint}} {{reason}}"),
           thresholds=th((0.01, "red")), min=0, max=1),
        ts("Mount not answering probes for", "s", "Time since the mount last answered a probe (0 while it answers). "
           "5 s is storage evidence; over 30 s for a minute, StokerNasMountHung: every process touching a hard mount "
           "is blocked.",
           q(f"stoker_nas_probe_inflight_seconds{{{n}}}", "{{mountpoint}}"),
           thresholds=th((PROBE_HUNG, "orange"), (ALERT_HUNG, "red")), min=0),
        table("Mounts", "Each NFS mount: export, NFS version, transport, nconnect and role (data mounts feed the "
              "verdicts' READ evidence; checkpoint mounts are where checkpoints are tracked).",
              q(f"stoker_nfs_mount_info{{{n}}}"), columns={"A": None}, hide=("node",)),

        row("Checkpoints"),
        state("Checkpoint state per mount", "Writing, stalled (no byte reached the NAS for stall_after: "
              "StokerCheckpointStalled a minute later) and over budget (StokerCheckpointOverBudget).",
              q(f"stoker_checkpoint_in_progress{{{n}}}", "{{mountpoint}} writing"),
              q(f"stoker_checkpoint_stalled{{{n}}}", "{{mountpoint}} stalled"),
              q(f"stoker_checkpoint_over_budget{{{n}}}", "{{mountpoint}} over budget"),
              states={"0": ("no", "transparent"), "1": ("yes", "red")},
              overrides=[override("A", "byFrameRefID", mappings=mappings(
                  {"0": ("idle", "transparent"), "1": ("writing", "blue")}))]),
        table("Recent checkpoints", "The last checkpoints per mount (5 kept by the agent at a time; every one that "
              "ended in the time range is listed), however short: start (UTC), duration, bytes that reached the NAS, "
              "rate and outcome. A falling rate or a growing duration precedes a stall.",
              q(f"last_over_time(stoker_checkpoint_recent_duration_seconds{{{n}}}[{RANGE}])"),
              q(f"last_over_time(stoker_checkpoint_recent_written_bytes{{{n}}}[{RANGE}])"),
              q(f"last_over_time(stoker_checkpoint_recent_written_bytes{{{n}}}[{RANGE}]) / "
                f"last_over_time(stoker_checkpoint_recent_duration_seconds{{{n}}}[{RANGE}])"),
              columns={"A": ("duration", "s", th((ALERT_BUDGET, "red"))), "B": ("bytes", "bytes", None),
                       "C": ("rate", "Bps", None)}, sort="started", hide=("node",)),
        ts("Current checkpoint: elapsed, and since the last byte", "s", "While a checkpoint is in progress: time "
           "since it started (StokerCheckpointOverBudget past the 600 s budget) and since a byte last reached the NAS "
           "(StokerCheckpointStalled past 120 s and a minute). 0 when none is in progress.",
           q(f"(time() - stoker_checkpoint_started_timestamp_seconds{{{n}}}) * stoker_checkpoint_in_progress{{{n}}}",
             "{{mountpoint}} elapsed"),
           q(f"(time() - stoker_checkpoint_progress_timestamp_seconds{{{n}}}) * stoker_checkpoint_in_progress{{{n}}}",
             "{{mountpoint}} since the last byte"),
           thresholds=th((ALERT_STALL, "orange"), (ALERT_BUDGET, "red")), min=0),
        ts("Checkpoint writes: by the job, and reaching the NAS", "Bps", "On checkpoint mounts, bytes per second the "
           "job hands to the client and bytes reaching the NAS. The job writing while nothing reaches the NAS is a "
           "checkpoint stuck in the page cache.",
           q(f"{rate('stoker_nfs_client_write_bytes_total')} * {role}", "{{mountpoint}} by the job"),
           q(f"{rate('stoker_nfs_write_bytes_total')} * {role}", "{{mountpoint}} reaching the NAS"), min=0),
        ts("Current or last checkpoint: bytes and duration", "bytes", "Bytes written by the current (or last) "
           "checkpoint, and the duration of the last finished one (right axis).",
           q(f"stoker_checkpoint_written_bytes{{{n}}}", "{{mountpoint}} bytes"),
           q(f"stoker_checkpoint_last_duration_seconds{{{n}}}", "{{mountpoint}} last duration"),
           overrides=[override("B", "byFrameRefID", unit="s")], min=0),
        bars("Checkpoints finished, by outcome, over the range", "short", "Checkpoints that ended in the selected "
             "range, per outcome: stalled, aborted, abandoned or lost ones deserve a look (docs/VERDICTS.md).",
             q(f"sum by (outcome) (increase(stoker_checkpoints_total{{{n}}}[{RANGE}]))", "{{outcome}}")),

        row("Host"),
        ts("Host pressure (PSI)", "percentunit", "Share of time some (or all) runnable tasks waited for a CPU, memory "
           "or I/O. CPU above 40% or memory above 20% is host evidence: the input pipeline cannot keep up "
           "(StokerGpusStarvedByHost).",
           q(rate("stoker_host_pressure_seconds_total"), "{{resource}} {{kind}}"),
           thresholds=th((MEMORY_PRESSURE, "orange"), (CPU_PRESSURE, "red")), min=0, max=1, w=24, h=8),

        row("Agent"),
        state("Collectors", "Whether each collector's last cycle succeeded. FAILING: its metrics are missing and the "
              "verdicts are blind to it (StokerCollectorDown after 5 minutes).",
              q(f"stoker_collector_up{{{n}}}", "{{collector}}"),
                states={"0": ("FAILING", "red"), "1": ("ok", "green")}),
        ts("Seconds since each collector last succeeded", "s", "Grows while a collector fails; /healthz turns 503 "
           "after 3 intervals. Past 5 minutes StokerCollectorDown warns.",
           q(f"time() - stoker_collector_last_success_timestamp_seconds{{{n}}}", "{{collector}}"),
           thresholds=th((ALERT_COLLECTOR, "red")), min=0),
        ts("Collector errors, by reason", "cps", "Failures per second by collector and class: library_not_found "
           "(the driver is not loaded), eacces (the service's permissions), timeout (a hung source).",
           q(f"sum by (collector, reason) ({rate('stoker_collector_errors_total')})",
             "{{collector}} {{reason}}"), min=0),
        ts("Cycle duration and lag (p99)", "s", "How long one cycle takes and how late it starts against its "
           "schedule: a blocked event loop shows in the lag first.",
           q(f"histogram_quantile(0.99, sum by (collector, le) ({rate('stoker_collector_duration_seconds_bucket')}))",
             "{{collector}} duration"),
           q(f"histogram_quantile(0.99, sum by (collector, le) ({rate('stoker_collector_lag_seconds_bucket')}))",
             "{{collector}} lag"), min=0),
        table("Build and scrape", "The agent's version, NVML and driver versions, and its last scrape: how long it "
              "took and how many samples it brought (about 1,200 on an XE9680).",
              *(q(f'{m}{{job="stoker", {n}}} * on (node) group_left (version, nvml_version, driver_version) '
                  f"stoker_build_info{{{n}}}") for m in ("scrape_duration_seconds", "scrape_samples_scraped")),
              columns={"A": ("scrape took", "s", None), "B": ("samples", "short", None)}, hide=("node",)),

        row("The agent itself (its process)"),
        ts("Agent CPU", "percentunit", "CPU the agent's process uses, as a share of one core (user and system). "
           "About 0.5% on an XE9680 at a 1 s interval, three times that at 0.25 s (docs/PERFORMANCE.md); more at the "
           "same interval, with its collectors' cycles longer too: the Agent row above.",
           q(rate("process_cpu_seconds_total"), "CPU, share of one core"), min=0, w=6, calcs=("mean", "max")),
        ts("Agent resident memory", "bytes", "The agent's resident memory: about 50 MB on an XE9680 "
           "(docs/PERFORMANCE.md). Growing day after day while nothing changes on the node is a leak.",
           q(f"process_resident_memory_bytes{{{n}}}", "resident"), min=0, w=6),
        ts("Agent file descriptors, against the limit", "short", "Descriptors the agent holds open (sysfs and "
           "procfs files, scrape connections, probe children), and their share of its limit (right axis; the agent "
           "raises its soft limit to the hard one at start, the unit sets LimitNOFILE). Near the limit, a scrape "
           "or a collector fails to open its files.",
           q(f"process_open_fds{{{n}}}", "open"),
           q(f"process_open_fds{{{n}}} / process_max_fds{{{n}}}", "share of the limit"),
           overrides=[override("B", "byFrameRefID", unit="percentunit")], min=0, w=6),
        ts("Agent uptime", "s", "Time since the agent's process started: it falls to zero at each restart (a "
           "reload keeps the process; a driver replaced under it restarts it, exit status 75). A sawtooth is a crash "
           "loop that systemd restarts: journalctl -u stoker.",
           q(f"time() - process_start_time_seconds{{{n}}}", "since start"), min=0, w=6, calcs=("lastNotNull", "min")),
    ], [variable("node", "Node", f"label_values({AGENT_NODES}{{{SITE}}}, node)"),
        variable("job_id", "Job", f"label_values(stoker_gpu_job_info{{{n}, job_id!=\"unknown\"}}, job_id)",
                 multi=True)], NODE, AGENT_NODES)


# -- GPU health --------------------------------------------------------------------------------------

def gpu_health() -> dict:
    g = GPU

    def rate(metric: str, extra: str = "") -> str:
        return f"rate({metric}{{{g}{extra}}}[{RI}])"

    hardware = f', reason=~"{HW_THROTTLE}"'
    instance = "GPU {{gpu}} instance {{gpu_instance}}"  # a MIG GPU instance's legend

    def per_gpu(title: str, metric: str, description: str) -> dict:
        return ts(title, "percentunit", description, q(f"{metric}{{{g}}}", "GPU {{gpu}}"), min=0, max=1, w=8,
                  calcs=("mean", "min", "max"))

    def per_instance(title: str, metric: str, description: str) -> dict:
        return ts(title, "percentunit", description, q(f"{metric}{{{g}}}", instance), min=0, max=1, w=6,
                  calcs=("mean", "min", "max"))

    def with_mig_uuid(metric: str) -> str:
        """A GPU instance's series with the MIG device UUID its jobs are given (CUDA_VISIBLE_DEVICES)."""
        return f"{metric}{{{g}}} * on (gpu, uuid, gpu_instance) group_left (mig_uuid) stoker_gpu_instance_info{{{g}}}"

    return dashboard("stoker-gpu-health", "Stoker / GPU health", "One node's GPUs: identity, activity, "
                     "temperatures, power, throttling, XIDs, ECC, row remaps, interconnects and MIG instances.", [
        row("Now"),
        stat("GPUs lost", "short", "GPUs NVML does not answer for (StokerGpuLost). Red: drain the node; XID 79 "
             "below says it fell off the bus.", q(f"count(stoker_gpu_up{{{g}}} == 0) or vector(0)"), th((1, "red"))),
        stat("Critical XIDs, 15 min", "short", "Hardware XIDs (ECC, row remap, NVLink, fallen off the bus, GSP) seen "
             "in the last 15 minutes: StokerGpuXidError pages. Follow NVIDIA's XID guide.",
             q(f'count(time() - stoker_gpu_xid_last_timestamp_seconds{{{g}, xid=~"{CRITICAL_XIDS}"}} < {ALERT_XID_AGE})'
               " or vector(0)"), th((1, "red"))),
        stat("Uncorrected ECC, range", "short", "Uncorrected ECC errors over the selected range (counter resets on "
             "an agent or driver restart are handled). Red: a row remap or an RMA.",
             q(f'sum(increase(stoker_gpu_ecc_errors_total{{{g}, type="uncorrected"}}[{RANGE}])) or vector(0)'),
             th((1, "red"))),
        stat("Row remaps pending", "short", "Rows waiting for a GPU reset (StokerGpuRowRemapPending): drain the "
             "node when its job ends, reset the GPU.",
             q(f'sum(stoker_gpu_remapped_rows{{{g}, kind="pending"}}) or vector(0)'), th((1, "orange"))),
        stat("Row remap failures", "short", "No spare row left for a failing one (StokerGpuRowRemapFailure): RMA "
             "the GPU.", q(f'sum(stoker_gpu_remapped_rows{{{g}, kind="failure"}}) or vector(0)'), th((1, "red"))),
        stat("GPUs throttled by hardware", "short", "GPUs with clocks cut by slowdown, thermal or power brake over "
             "10% of the time (StokerGpuThrottling after 10 minutes): cooling or power delivery.",
             q(f"count(sum by (gpu) ({rate('stoker_gpu_throttle_seconds_total', hardware)}) > {ALERT_THROTTLE})"
               " or vector(0)"),
             th((1, "orange"))),
        stat("Profiling counters", "none", "Whether NVML refuses GPM to the agent (StokerGpuProfilingDenied): the "
             "busy ratio then comes from utilization.gpu bounded by power, and the verdicts are weaker. "
             "docs/OPERATIONS.md, \"GPU profiling counters\".",
             q(f'max(stoker_gpu_permission_denied{{{g}, call="gpm"}}) or vector(0)'),
             states={"0": ("granted", "green"), "1": ("REFUSED", "orange")}),
        stat("Hottest GPU", "celsius", "The highest GPU temperature now: near 87 C an H100 or H200 slows itself "
             "down (Throttled by hardware, below); check the node's fans and inlet temperature.",
             q(f'max(stoker_gpu_temperature_celsius{{{g}, sensor="gpu"}})'), th((80, "orange"), (87, "red"))),

        row("Identity and state"),
        state("GPU up", "Whether NVML answers for each GPU. LOST: StokerGpuLost after a minute.",
              q(f"stoker_gpu_up{{{g}}}", "GPU {{gpu}}"), states={"0": ("LOST", "red"), "1": ("up", "green")}),
        table("GPUs", "Each GPU: model, PCI bus id, driver, framebuffer, and where its busy ratio comes from "
              "(gpm, or utilization where GPM is unsupported or refused: the Profiling counters stat).",
              q(f"stoker_gpu_memory_total_bytes{{{g}}} * on (gpu, uuid) group_left (model, pci_bus_id, driver_version) "
                f"stoker_gpu_info{{{g}}} * on (gpu, uuid) group_left (source) stoker_gpu_activity_source{{{g}}}"),
              columns={"A": ("memory", "bytes", None)}, hide=("node",)),

        row("Activity"),
        ts("Busy ratio per GPU", "percentunit", "The busy ratio the verdicts judge, from its counter (exact over "
           "the interval): GPM SM activity, or utilization bounded by power without GPM.",
           q(rate("stoker_gpu_busy_seconds_total"), "GPU {{gpu}}"), min=0, max=1, w=8, calcs=("mean", "min", "max")),
        per_gpu("SM active", "stoker_gpu_sm_active_ratio", "GPM SM activity: the share of time the SMs had work. "
                "utilization.gpu (next) reads busy on copy-bound work that leaves the SMs idle."),
        per_gpu("utilization.gpu", "stoker_gpu_utilization_ratio", "NVML utilization.gpu: a kernel or copy was "
                "running. High here and low in SM active: copy-bound (PCIe, host)."),
        per_gpu("Tensor active", "stoker_gpu_tensor_active_ratio", "GPM tensor core activity: the matrix work of "
                "training. Lower on one GPU than on its siblings in the same job: that GPU waits."),
        per_gpu("DRAM bandwidth", "stoker_gpu_dram_active_ratio", "GPM DRAM bandwidth utilisation: "
                "memory-bound kernels sit high here with the tensor cores low."),
        per_gpu("SM occupancy", "stoker_gpu_sm_occupancy_ratio", "GPM SM occupancy: resident warps over the "
                "maximum. A property of the job's kernels more than of the node."),

        row("Thermals and power"),
        ts("Temperature", "celsius", "GPU and memory temperatures. H100/H200 slow down near 87 C (GPU) and 95 C "
           "(memory): hardware throttling follows.",
           q(f"stoker_gpu_temperature_celsius{{{g}}}", "GPU {{gpu}} {{sensor}}"), w=8),
        ts("Power and limit", "watt", "Power draw per GPU against the enforced limit (dashed), and the mean power "
           "over the interval from the energy counter (exact, however seldom scraped).",
           q(f"stoker_gpu_power_watts{{{g}}}", "GPU {{gpu}}"), q(f"max(stoker_gpu_power_limit_watts{{{g}}})", "limit"),
           q(f"sum({rate('stoker_gpu_energy_joules_total')}) / count(stoker_gpu_energy_joules_total{{{g}}})",
             "mean, from energy"),
           overrides=[reference("B")], min=0, w=8),
        ts("SM clock", "hertz", "Current SM clock per GPU: a GPU clocked below its siblings is throttled.",
           q(f"stoker_gpu_sm_clock_hertz{{{g}}}", "GPU {{gpu}}"), w=8, calcs=("mean", "min")),
        ts("Throttled by hardware", "percentunit", "Share of time clocks were cut by hardware slowdown, thermal "
           "limits or the power brake, per GPU and reason. Above 10% for 10 minutes: StokerGpuThrottling (cooling, "
           "power delivery).",
           q(rate("stoker_gpu_throttle_seconds_total", hardware), "GPU {{gpu}} {{reason}}"),
           thresholds=th((ALERT_THROTTLE, "red")), min=0, max=1),
        ts("Power-capped and sync boost", "percentunit", "Share of time under the workload's own power cap (normal "
           "under load) or held by sync boost: not a fault.",
           q(rate("stoker_gpu_throttle_seconds_total", ', reason=~"sw_power_cap|sync_boost"'),
             "GPU {{gpu}} {{reason}}"),
           min=0, max=1),

        row("Errors"),
        ts("XID events", "short", "XIDs per GPU in each interval (increase, so agent restarts do not read as "
           "events). Critical XIDs (48, 63, 64, 74, 79, 92, 94, 95, 119, 120) page; others are usually the job.",
           q(f"sum by (gpu, xid) (increase(stoker_gpu_xid_errors_total{{{g}}}[{RI}]))", "GPU {{gpu}} XID {{xid}}"),
           bars=True, thresholds=th((1, "red")), min=0, w=8),
        table("XIDs, last seen", "Each XID per GPU: events in the selected range and how long ago it was last seen "
              "(red within 15 minutes: StokerGpuXidError).",
              q(f"sum by (gpu, uuid, xid) (increase(stoker_gpu_xid_errors_total{{{g}}}[{RANGE}]))"),
              q(f"time() - max by (gpu, uuid, xid) (stoker_gpu_xid_last_timestamp_seconds{{{g}}})"),
              columns={"A": ("events in range", "short", None),
                       "B": ("last seen, ago", "s", th((ALERT_XID_AGE, "green"), base="red"))},
              w=8, sort="events in range"),
        ts("ECC errors", "short", "Volatile ECC errors per GPU in each interval, corrected and uncorrected (increase: "
           "a driver reload resets the counter, not the history). Uncorrected ones mean a row remap or an RMA.",
           q(f"sum by (gpu, type) (increase(stoker_gpu_ecc_errors_total{{{g}}}[{RI}]))", "GPU {{gpu}} {{type}}"),
           bars=True, thresholds=th((1, "red")), min=0, w=8),
        ts("Remapped rows", "short", "Row remapping state per GPU: correctable and uncorrectable remaps done, pending "
           "(a reset is needed: StokerGpuRowRemapPending) and failure (no spare row: StokerGpuRowRemapFailure).",
           q(f"stoker_gpu_remapped_rows{{{g}}}", "GPU {{gpu}} {{kind}}"), thresholds=th((1, "red")), min=0),
        ts("PCIe replays", "cps", "PCIe replays per second per GPU: a marginal link (riser, slot, retimer).",
           q(rate("stoker_gpu_pcie_replays_total"), "GPU {{gpu}}"), min=0),

        row("Memory and interconnects"),
        ts("Framebuffer used", "percentunit", "Framebuffer used over its size, per GPU. A job holds most of it; a "
           "GPU near zero in a running job has lost its process.",
           q(f"stoker_gpu_memory_used_bytes{{{g}}} / stoker_gpu_memory_total_bytes{{{g}}}", "GPU {{gpu}}"),
           min=0, max=1, w=8),
        ts("NVLink traffic", "Bps", "NVLink bytes per second per GPU, each way: the intra-node collectives.",
           q(f"sum by (gpu) ({rate('stoker_gpu_nvlink_transmit_bytes_total')})", "GPU {{gpu}} tx"),
           q(f"sum by (gpu) ({rate('stoker_gpu_nvlink_receive_bytes_total')})", "GPU {{gpu}} rx"), min=0, w=8),
        ts("PCIe traffic", "Bps", "PCIe bytes per second per GPU, each way: host input, checkpoints, GPUDirect RDMA.",
           q(f"sum by (gpu) ({rate('stoker_gpu_pcie_transmit_bytes_total')})", "GPU {{gpu}} tx"),
           q(f"sum by (gpu) ({rate('stoker_gpu_pcie_receive_bytes_total')})", "GPU {{gpu}} rx"), min=0, w=8),

        row("MIG instances (GPUs in MIG mode)"),
        state("MIG mode", "Whether each GPU is in MIG mode (read every slow_interval: a change shows without a "
              "restart). A GPU in MIG mode has no utilization.gpu and no volatile ECC counts; its SM, tensor and "
              "DRAM activity above are those of its instances that hold processes, weighted by their SMs.",
              q(f"stoker_gpu_mig_enabled{{{g}}}", "GPU {{gpu}}"),
              states={"0": ("off", "transparent"), "1": ("MIG", "blue")}, w=8),
        table("GPU instances", "Each GPU instance of the GPUs in MIG mode: NVML's GPU instance id, the MIG device "
              "UUID a job is given (CUDA_VISIBLE_DEVICES, nvidia-smi -L), its framebuffer and the compute processes "
              "in it now (MPS clients for their server).",
              q(with_mig_uuid("stoker_gpu_instance_memory_total_bytes")),
              q(with_mig_uuid("stoker_gpu_instance_memory_used_bytes")),
              q(with_mig_uuid("stoker_gpu_instance_compute_processes")),
              columns={"A": ("memory", "bytes", None), "B": ("memory used", "bytes", None),
                       "C": ("processes", "short", None)}, w=16, hide=("node", "uuid")),
        per_instance("SM active per instance", "stoker_gpu_instance_sm_active_ratio", "GPM SM activity of each GPU "
                     "instance (absent without GPM). An instance holding a job's rank and reading low: that rank "
                     "waits."),
        per_instance("Tensor active per instance", "stoker_gpu_instance_tensor_active_ratio", "GPM tensor core "
                     "activity of each GPU instance: the matrix work of the job in it."),
        per_instance("DRAM bandwidth per instance", "stoker_gpu_instance_dram_active_ratio", "GPM DRAM bandwidth "
                     "utilisation of each GPU instance: memory-bound kernels sit high here, the tensor cores low."),
        per_instance("SM occupancy per instance", "stoker_gpu_instance_sm_occupancy_ratio", "GPM SM occupancy of "
                     "each GPU instance: resident warps over the maximum, a property of its job's kernels."),
        ts("Framebuffer used per instance", "percentunit", "Framebuffer used over the instance's own size: a job "
           "holds most of it. The GPU's framebuffer (Memory and interconnects row) is the sum of its "
           "instances'.",
           q(f"stoker_gpu_instance_memory_used_bytes{{{g}}} / stoker_gpu_instance_memory_total_bytes{{{g}}}",
             instance), min=0, max=1),
        ts("Compute processes per instance", "short", "Processes in each GPU instance (MPS clients for their "
           "server). An instance that loses its processes mid-job has lost its rank.",
           q(f"stoker_gpu_instance_compute_processes{{{g}}}", instance), min=0),
    ], [variable("node", "Node", f"label_values({AGENT_NODES}{{{SITE}}}, node)"),
        variable("gpu", "GPU", 'label_values(stoker_gpu_info{node="$node"}, gpu)', multi=True, sort=3)],
        NODE, AGENT_NODES)


DASHBOARDS = {"fleet.json": fleet, "node.json": node, "gpu-health.json": gpu_health}


def render(build) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))
        print(f"wrote dashboards/{name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
