"""A real Prometheus scrapes the agent on the simulated node."""

from __future__ import annotations

import pytest

from tests.conftest import free_port, start_agent_process, wait_http
from tests.servers import prometheus

pytestmark = pytest.mark.slow


def test_real_prometheus_sees_sm_activity_for_eight_gpus():
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--listen", f"127.0.0.1:{port}", "--interval", "0.5")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        with prometheus([f"127.0.0.1:{port}"]) as prom:
            result = prom.wait_for("stoker_gpu_sm_active_ratio", lambda r: len(r) == 8)
            assert sorted(int(r["metric"]["gpu"]) for r in result) == list(range(8))
            assert all(0.5 < float(r["value"][1]) <= 1.0 for r in result)
            assert all(r["metric"]["uuid"].startswith("GPU-") for r in result)
            up = prom.query('up{job="stoker"}')
            assert up and up[0]["value"][1] == "1"
            rate = prom.wait_for("sum(rate(stoker_gpu_nvlink_transmit_bytes_total[5s]))", lambda r: r and float(r[0]["value"][1]) > 0)
            assert float(rate[0]["value"][1]) > 1e9  # eight GPUs moving tens of GB/s over NVLink
    finally:
        agent.terminate()
        agent.wait(timeout=10)
