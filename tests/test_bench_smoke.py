"""The benchmark harnesses run and their output parses (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import pytest

from bench import gpu_cycle, scrape


def test_gpu_cycle_harness():
    result = gpu_cycle.run(cycles=5)
    assert result["gpus"] == 8 and result["cycle_cpu_with_fake"]["n"] == 5
    assert result["collector_over_fake"] > 0


@pytest.mark.slow
def test_scrape_harness_with_the_python_client():
    result = scrape.run(concurrency=2, requests=20, client="python")
    assert result["metrics"]["n"] == 20 and result["series"] > 200
    assert result["agent_rss_bytes"] > 0


@pytest.mark.slow
def test_peer_harness_against_node_exporter():
    from bench import peer
    result = peer.run(concurrencies=[2], requests=20, client="python", cycles=3)
    row = result["scrapes"][0]
    assert row["stoker"]["n"] == 20 and row["node_exporter"]["n"] == 20
    assert row["p99_ratio_stoker_over_node_exporter"] > 0


@pytest.mark.slow
def test_mountstats_harness_against_node_exporter():
    from bench import mountstats
    result = mountstats.run(cycles=3)
    assert result["node_exporter_collector_duration"]["n"] == 3
    assert result["ratio_stoker_over_node_exporter_p50"] > 0


@pytest.mark.slow
def test_cost_detection_fleet_and_report_harnesses(tmp_path):
    import json

    from bench import cost, detection, fleet, report
    results = tmp_path / "results"
    results.mkdir()
    c = cost.run(seconds=2, sizes=[1, 2], cycles=2)
    assert c["scaling"][1]["size"] == 2 and c["agent"][0]["rss_bytes"] > 0
    d = detection.run(["storage-starved"], ["storage-starved"], for_scale=0.02, scrape="1s", timeout=60)
    assert d["scenarios"][0]["verdict_after_fault_s"] >= 0 and "alert_after_fault_s" in d["scenarios"][0]
    f = fleet.run([1, 2], per_process=2, seconds=8, scrape_interval="2s")
    assert f["sizes"][1]["nodes_up"] == 2 and f["sizes"][1]["series_per_node"] > 100
    peer = {"client": "python", "tree": "t", "scrapes": [{"concurrency": 1, "p99_ratio_stoker_over_node_exporter": 0.5,
            **{k: {"p50_ms": 1, "p99_ms": 2, "cpu_s_per_1000_scrapes": 0.1, "rss_bytes": 1e7}
               for k in ("node_exporter", "stoker")}}]}
    for name, data in (("cost", c), ("detection", d), ("fleet", f), ("peer", peer)):
        (results / f"{name}.json").write_text(json.dumps(data))
    text = report.run(results, tmp_path)
    assert "## Fleet scale" in text and "## Detection latency" in text
    assert {p.name for p in tmp_path.glob("*.png")} == {"bench-peer.png", "bench-scaling.png",
                                                        "bench-detection.png", "bench-fleet.png"}
