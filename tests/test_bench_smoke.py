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
