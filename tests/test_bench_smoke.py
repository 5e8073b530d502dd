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
