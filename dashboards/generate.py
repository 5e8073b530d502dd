"""Generates Stoker's Grafana dashboards as JSON: `python dashboards/generate.py`.

Plain Python rather than grafana-foundation-sdk: the dashboards are three,
their panels uniform (a PromQL query, a legend, a unit), and a small builder
keeps each panel one readable line, adds no dependency to the project, and
produces JSON whose diffs review well. tests/test_dashboards.py checks that
the committed JSON is what this file generates, lints it, and runs every
query against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
ROCE_CONGESTION = "np_ecn_marked_roce_packets|np_cnp_sent|rp_cnp_handled"
ROCE_RETRANSMITS = "out_of_sequence|packet_seq_err|local_ack_timeout_err|roce_adp_retrans|req_transport_retries_exceeded"
HW_THROTTLE = "hw_slowdown|hw_thermal|sw_thermal|hw_power_brake"


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(title: str, unit: str, queries: list[tuple[str, str]], kind: str = "timeseries",
          description: str = "", width: int = 12, **defaults) -> dict:
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, **defaults}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)],
        "gridPos": {"w": width, "h": 8},
    }


def layout(panels: list[dict]) -> list[dict]:
    x = y = 0
    for i, p in enumerate(panels, start=1):
        w = p["gridPos"]["w"]
        if x + w > 24:
            x, y = 0, y + 8
        p["gridPos"].update(x=x, y=y)
        p["id"] = i
        x += w
    return panels


def dashboard(uid: str, title: str, description: str, panels: list[dict], multi_node: bool) -> dict:
    node = {
        "name": "node", "label": "Node", "type": "query", "datasource": DS, "refresh": 2, "sort": 1,
        "query": {"query": "label_values(stoker_build_info, node)", "refId": "node"},
        "definition": "label_values(stoker_build_info, node)",
        "multi": multi_node, "includeAll": multi_node, "current": {},
    }
    if multi_node:
        node["allValue"] = ".*"
    return {
        "uid": uid, "title": title, "description": description, "tags": ["stoker"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            node,
        ]},
        "annotations": {"list": [{
            "name": "Stoker alerts", "datasource": DS, "enable": True, "iconColor": "red",
            "expr": 'ALERTS{alertstate="firing", alertname=~"Stoker.*", node=~"$node"}',
            "step": "30s", "titleFormat": "{{alertname}}", "tagKeys": "severity,node", "useValueForTime": False,
        }]},
        "panels": layout(panels),
    }


def fleet() -> dict:
    n = 'node=~"$node"'
    return dashboard("stoker-fleet", "Stoker / Fleet", "Starvation, checkpoints and rails across nodes.", [
        panel("Nodes starved, by cause", "short", [(f"sum by (cause) (stoker_starved{{{n}}})", "{{cause}}")],
              description="How many nodes the agents call starved, and by what.", stacking={"mode": "normal"}),
        panel("Starved time, by cause", "percentunit",
              [(f"sum by (cause) (rate(stoker_starved_seconds_total{{{n}}}[{RI}]))", "{{cause}}")],
              description="Node-seconds starved per second: 1 = one node starved all the time."),
        panel("Busy ratio by node", "percentunit",
              [(f"avg by (node) (stoker_gpu_busy_ratio{{{n}}})", "{{node}}")], min=0, max=1),
        panel("Last checkpoint duration", "s",
              [(f"max by (node, mountpoint) (stoker_checkpoint_last_duration_seconds{{{n}}})", "{{node}} {{mountpoint}}")]),
        panel("Checkpoints in progress and stalled", "short", [
            (f"sum(stoker_checkpoint_in_progress{{{n}}})", "in progress"),
            (f"sum(stoker_checkpoint_stalled{{{n}}})", "stalled")]),
        panel("Top congested rails", "cps", [(
            f'topk(10, sum by (node, device, port) (rate(stoker_rdma_hw_counter_total{{{n},counter=~"{ROCE_CONGESTION}"}}[{RI}])))',
            "{{node}} {{device}}/{{port}}")], description="ECN marks and CNPs per second."),
        panel("RDMA ports down, by node", "short",
              [(f"sum by (node) (1 - stoker_rdma_port_up{{{n}}})", "{{node}}")]),
        panel("NFS READ latency by node", "s", [(
            f'sum by (node) (rate(stoker_nfs_execute_seconds_total{{{n},operation="READ"}}[{RI}]))'
            f' / sum by (node) (rate(stoker_nfs_operations_total{{{n},operation="READ"}}[{RI}]))', "{{node}}")]),
    ], multi_node=True)


def node() -> dict:
    n = 'node="$node"'
    return dashboard("stoker-node", "Stoker / Node", "One node: GPUs, rails, NAS and checkpoints.", [
        panel("Busy ratio per GPU", "percentunit", [(f"stoker_gpu_busy_ratio{{{n}}}", "GPU {{gpu}}"),
                                                   (f"stoker_busy_baseline_ratio{{{n}}}", "job level")],
              description="GPM SM activity; the job level is the verdict's reference.", min=0, max=1),
        panel("Starved", "bool", [(f"stoker_starved{{{n}}}", "{{cause}}")], kind="state-timeline"),
        panel("Rail throughput (RoCE)", "Bps", [
            (f"rate(stoker_rdma_port_transmit_bytes_total{{{n}}}[{RI}])", "{{device}} tx"),
            (f"rate(stoker_rdma_port_receive_bytes_total{{{n}}}[{RI}])", "{{device}} rx")]),
        panel("RoCE congestion (ECN, CNP)", "cps", [(
            f'sum by (device) (rate(stoker_rdma_hw_counter_total{{{n},counter=~"{ROCE_CONGESTION}"}}[{RI}]))',
            "{{device}}")]),
        panel("PFC pause (switch pausing us)", "percentunit", [(
            f'sum by (interface) (rate(stoker_net_pause_seconds_total{{{n},direction="rx"}}[{RI}]))',
            "{{interface}}")]),
        panel("RoCE retransmissions", "cps", [(
            f'sum by (device) (rate(stoker_rdma_hw_counter_total{{{n},counter=~"{ROCE_RETRANSMITS}"}}[{RI}]))',
            "{{device}}")]),
        panel("NFS latency per operation", "s", [(
            f"sum by (mountpoint, operation) (rate(stoker_nfs_execute_seconds_total{{{n}}}[{RI}]))"
            f" / sum by (mountpoint, operation) (rate(stoker_nfs_operations_total{{{n}}}[{RI}]))",
            "{{mountpoint}} {{operation}}")]),
        panel("NFS throughput", "Bps", [
            (f"rate(stoker_nfs_read_bytes_total{{{n}}}[{RI}])", "{{mountpoint}} read"),
            (f"rate(stoker_nfs_write_bytes_total{{{n}}}[{RI}])", "{{mountpoint}} write")]),
        panel("NAS probe latency (p99)", "s", [(
            f"histogram_quantile(0.99, sum by (mountpoint, probe, le) (rate(stoker_nas_probe_seconds_bucket{{{n}}}[{RI}])))",
            "{{mountpoint}} {{probe}}")]),
        panel("NAS probe in flight", "s", [(f"stoker_nas_probe_inflight_seconds{{{n}}}", "{{mountpoint}}")]),
        panel("Checkpoint timeline", "bool", [
            (f"stoker_checkpoint_in_progress{{{n}}}", "{{mountpoint}} in progress"),
            (f"stoker_checkpoint_stalled{{{n}}}", "{{mountpoint}} stalled")], kind="state-timeline"),
        panel("Checkpoint bytes written", "bytes",
              [(f"stoker_checkpoint_written_bytes{{{n}}}", "{{mountpoint}}")]),
    ], multi_node=False)


def gpu_health() -> dict:
    n = 'node="$node"'
    return dashboard("stoker-gpu-health", "Stoker / GPU health", "Temperatures, power, throttling, errors.", [
        panel("GPU up", "bool", [(f"stoker_gpu_up{{{n}}}", "GPU {{gpu}}")], kind="state-timeline"),
        panel("Temperature", "celsius", [(f"stoker_gpu_temperature_celsius{{{n}}}", "GPU {{gpu}} {{sensor}}")]),
        panel("Power and limit", "watt", [(f"stoker_gpu_power_watts{{{n}}}", "GPU {{gpu}}"),
                                          (f"max(stoker_gpu_power_limit_watts{{{n}}})", "limit")]),
        panel("SM clock", "hertz", [(f"stoker_gpu_sm_clock_hertz{{{n}}}", "GPU {{gpu}}")]),
        panel("Throttled time (hardware)", "percentunit", [(
            f'sum by (gpu, reason) (rate(stoker_gpu_throttle_seconds_total{{{n},reason=~"{HW_THROTTLE}"}}[{RI}]))',
            "GPU {{gpu}} {{reason}}")]),
        panel("Power-capped time", "percentunit", [(
            f'rate(stoker_gpu_throttle_seconds_total{{{n},reason="sw_power_cap"}}[{RI}])', "GPU {{gpu}}")]),
        panel("XID events", "short", [(f"sum by (gpu, xid) (stoker_gpu_xid_errors_total{{{n}}})", "GPU {{gpu}} XID {{xid}}")]),
        panel("ECC errors", "short", [(f"stoker_gpu_ecc_errors_total{{{n}}}", "GPU {{gpu}} {{type}}")]),
        panel("Remapped rows", "short", [(f"stoker_gpu_remapped_rows{{{n}}}", "GPU {{gpu}} {{kind}}")]),
        panel("PCIe replays", "cps", [(f"rate(stoker_gpu_pcie_replays_total{{{n}}}[{RI}])", "GPU {{gpu}}")]),
        panel("Framebuffer used", "bytes", [(f"stoker_gpu_memory_used_bytes{{{n}}}", "GPU {{gpu}}")]),
        panel("NVLink and PCIe traffic", "Bps", [
            (f"sum by (gpu) (rate(stoker_gpu_nvlink_transmit_bytes_total{{{n}}}[{RI}]))", "GPU {{gpu}} NVLink tx"),
            (f"sum by (gpu) (rate(stoker_gpu_pcie_receive_bytes_total{{{n}}}[{RI}]))", "GPU {{gpu}} PCIe rx")]),
    ], multi_node=False)


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
