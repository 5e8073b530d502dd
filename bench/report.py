"""Turns the benchmark results (JSON) into docs/BENCHMARKS.md tables and PNG plots.

    python -m bench.report [--results docs/bench] [--out docs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def peer(d: dict, out: Path) -> str:
    rows, conc, ne, st = [], [], [], []
    for r in d["scrapes"]:
        conc.append(r["concurrency"])
        ne.append(r["node_exporter"]["p99_ms"])
        st.append(r["stoker"]["p99_ms"])
        rows.append([r["concurrency"], f'{r["node_exporter"]["p50_ms"]} / {r["node_exporter"]["p99_ms"]}',
                     f'{r["stoker"]["p50_ms"]} / {r["stoker"]["p99_ms"]}', r["p99_ratio_stoker_over_node_exporter"],
                     f'{r["node_exporter"]["cpu_s_per_1000_scrapes"]} / {r["stoker"]["cpu_s_per_1000_scrapes"]}',
                     f'{r["node_exporter"]["rss_bytes"] / 1e6:.0f} / {r["stoker"]["rss_bytes"] / 1e6:.0f}'])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(conc, ne, "o-", label="node_exporter 1.5.0")
    ax.plot(conc, st, "o-", label="Stoker")
    ax.set(xscale="log", yscale="log", xlabel="concurrent scrapers", ylabel="p99 scrape latency (ms)",
           title="Same sysfs/procfs tree: scrape latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench-peer.png", dpi=100)
    plt.close(fig)
    return ("## Against node_exporter (bench/peer.py)\n\n" + f"Client: {d['client']}; tree: {d['tree']}.\n\n"
            + table(["scrapers", "node_exporter p50/p99 ms", "Stoker p50/p99 ms", "p99 ratio",
                     "CPU s per 1,000 scrapes (NE / Stoker)", "RSS MB (NE / Stoker)"], rows)
            + "\n![scrape latency](bench-peer.png)\n")


def cost(d: dict, out: Path) -> str:
    agent_rows = [[a["interval_s"], f'{100 * a["cpu_share_of_one_core"]:.1f}%', f'{a["rss_bytes"] / 1e6:.0f}',
                   a["series"], ", ".join(f'{k} {v["p99_le_s"] * 1000:g}' for k, v in a["lag"].items())]
                  for a in d["agent"]]
    sizes = d["scaling"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("gpu", "rdma", "netdev", "nfs", "total"):
        ax.plot([r["size"] for r in sizes], [r[f"{key}_cycle_ms"] for r in sizes], "o-", label=key)
    ax.set(xscale="log", yscale="log", xlabel="GPUs = RDMA ports = NFS mounts", ylabel="CPU per cycle (ms)",
           title="One sampling cycle (sample + render)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench-scaling.png", dpi=100)
    plt.close(fig)
    scale_rows = [[r["size"], r["gpu_cycle_ms"], r["rdma_cycle_ms"], r["netdev_cycle_ms"], r["nfs_cycle_ms"],
                   r["total_cycle_ms"]] for r in sizes]
    return ("## Stoker's own cost (bench/cost.py)\n\n"
            + table(["interval s", "CPU of one core (agent + simulator)", "RSS MB", "series",
                     "cycle lag p99 upper bound, ms"], agent_rows)
            + f"\nThe simulator alone (writing the fake kernel trees) costs "
              f"{100 * d['simulator_alone']['cpu_share_of_one_core']:.1f}% of a core in the same run.\n\n"
            + table(["size", "gpu ms", "rdma ms", "netdev ms", "nfs ms", "total ms"], scale_rows)
            + "\n![scaling](bench-scaling.png)\n")


def agent(d: dict, out: Path) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.3f}%"
    names = list(d["runs"][0]["collectors"])
    rows = []
    for r in d["runs"]:
        for label, run in (("this tree", r), *((("against: " + r["against"]["tree"], r["against"]),)
                                                if "against" in r else ())):
            fake = run.get("fake_nvml_share_of_one_core")
            rows.append([r["interval_s"], label, pct(run["agent_share_of_one_core"]),
                         "-" if fake is None else pct(fake),
                         *(pct(run["collectors"][n]["share_of_one_core"]) if n in run["collectors"] else "-"
                           for n in names),
                         pct(run["rest_share_of_one_core"]), pct(run["probe_children_share_of_one_core"]),
                         f'{run["rss_bytes"] / 1e6:.1f}', run["series"], pct(run["simulator_share_of_one_core"])])
    return ("## The agent alone (bench/agent.py)\n\n"
            + f"Scenario `{d['scenario']}` on the full simulated XE9680, production probe intervals; the simulator "
              "in a process of its own (its cost in the last column). CPU as a share of one core; per collector: its "
              "sampling plus its families and rendering; rest: the event loop, the agent's own metrics, HTTP. "
              "The fake NVML stands for the driver and is counted in the agent and in gpu; its share is shown "
              "apart.\n\n"
            + table(["interval s", "tree", "agent", "of it, fake NVML", *names, "rest", "NAS probe children", "RSS MB", "series",
                     "simulator"], rows)
            + f"\nSimulator per node: {pct(d['simulator_share_per_node'])} of a core; "
              f"{d['simulated_nodes_per_core']} simulated nodes per core.\n")


def detection(d: dict, out: Path) -> str:
    rows = [[r["scenario"], r["cause"], r.get("verdict_after_fault_s", "-"), r.get("alert", "-"),
             r.get("alert_after_fault_s", "-")] for r in d["scenarios"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["scenario"] for r in d["scenarios"]]
    ax.barh(names, [r.get("verdict_after_fault_s", 0) for r in d["scenarios"]])
    ax.set(xlabel="seconds from fault to verdict (1 s interval)", title="Detection latency")
    fig.tight_layout()
    fig.savefig(out / "bench-detection.png", dpi=100)
    plt.close(fig)
    return ("## Detection latency (bench/detection.py)\n\n"
            + f"Interval {d['interval_s']} s; Prometheus scrape and evaluation every {d['scrape_interval']}, "
              f"rules' `for:` scaled by {d['for_scale']} (1.0: as shipped).\n\n"
            + table(["scenario", "cause", "verdict after fault (s)", "alert", "alert firing after fault (s)"], rows)
            + "\n![detection](bench-detection.png)\n")


def fleet(d: dict, out: Path) -> str:
    rows = [[r["nodes"], r["nodes_up"], f'{100 * r["nodes_cpu_share_of_one_core"]:.1f}%' if "nodes_cpu_share_of_one_core" in r
             else "-", r["series_per_node"], r["head_series"], f'{r["rule_eval_seconds"]:.4f}',
             f'{1000 * r["scrape_duration_avg_s"]:.1f} / {1000 * r["scrape_duration_max_s"]:.1f}',
             f'{r["prometheus_rss_bytes"] / 1e6:.0f}', f'{r["samples_per_second"]:.0f}'] for r in d["sizes"]]
    ext = [[n, f'{e["head_series"]:.3g}', f'{e["samples_per_second"]:.3g}', f'{e["rule_eval_seconds"]:.3g}',
            f'{e["prometheus_rss_bytes"] / 1e9:.3g}'] for n, e in d.get("extrapolated", {}).items()]
    fig, ax = plt.subplots(figsize=(6, 4))
    nodes = [r["nodes"] for r in d["sizes"]]
    ax.plot(nodes, [r["head_series"] for r in d["sizes"]], "o-", label="head series")
    ax2 = ax.twinx()
    ax2.plot(nodes, [r["prometheus_rss_bytes"] / 1e6 for r in d["sizes"]], "s--", color="tab:red",
             label="Prometheus RSS (MB)")
    ax.set(xlabel="simulated nodes", ylabel="head series", title="One Prometheus, many nodes")
    ax2.set_ylabel("Prometheus RSS (MB)")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "bench-fleet.png", dpi=100)
    plt.close(fig)
    return ("## Fleet scale (bench/fleet.py)\n\n"
            + f"Scrape and rule interval {d['scrape_interval']}; each node samples every {d['node_interval_s']} s.\n\n"
            + table(["nodes", "up", "nodes' CPU (agents + simulators)", "series/node", "head series", "rule eval s",
                     "scrape avg/max ms",
                     "Prometheus RSS MB", "samples/s"], rows)
            + "\nExtrapolated (least squares over the measured sizes):\n\n"
            + table(["nodes", "head series", "samples/s", "rule eval s", "Prometheus RSS GB"], ext)
            + "\n![fleet](bench-fleet.png)\n")


SECTIONS = (("agent", agent), ("peer", peer), ("cost", cost), ("detection", detection), ("fleet", fleet))


def run(results: Path, out: Path) -> str:
    parts = ["# Benchmarks\n\nGenerated by `python -m bench.report` from the JSON results in "
             f"`{results}/` (`scripts/bench.sh` runs everything). Measured on the 2-core, shared "
             "development machine: compare ratios, not absolute times.\n"]
    for name, section in SECTIONS:
        data = load(results, name)
        if data is not None:
            parts.append(section(data, out))
    text = "\n".join(parts)
    (out / "BENCHMARKS.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/bench")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    run(Path(args.results), Path(args.out))


if __name__ == "__main__":
    main()
