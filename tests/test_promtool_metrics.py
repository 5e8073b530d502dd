"""`promtool check metrics` on the whole simulated node's exposition: zero findings.

promtool's linter is what Prometheus users run on an exporter: a name that contains its type
(`..._counter_total`), a counter without `_total`, a unit that is not a base unit, a missing HELP.
The exposition checked is the full agent's on the simulated XE9680 with every hw_counter exported,
and every family of the contract (docs/METRICS.md) is in it, so none escapes the linter."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import need_binary, simulated_exposition
from tests.contract import contract


async def _full_exposition(tmp_path) -> bytes:
    return await simulated_exposition(tmp_path, "checkpoint", rdma={"hw_counters": "all"})


def _promtool(promtool: str, body: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)


async def test_promtool_finds_nothing_in_the_full_simulated_exposition(tmp_path):
    promtool = need_binary("promtool")
    body = await _full_exposition(tmp_path)
    text = body.decode()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert set(contract()) - families == set(), "contract families missing from the exposition promtool checks"
    assert re.search(r'^stoker_rdma_hw_events_total\{.*counter="lifespan"', text, re.M) is None
    assert len(re.findall(r"^stoker_rdma_hw_events_total\{", text, re.M)) == 26 * 8  # "all": 26 per port

    result = _promtool(promtool, body)
    findings = (result.stdout + result.stderr).decode().strip()
    assert result.returncode == 0 and findings == "", f"promtool check metrics:\n{findings}"

    # The same linter does see a bad name in this exposition: the check above cannot pass vacuously.
    bad = body + b"# HELP stoker_rdma_hw_counter_total old name\n# TYPE stoker_rdma_hw_counter_total counter\n" \
                 b'stoker_rdma_hw_counter_total{device="mlx5_0",port="1",counter="np_cnp_sent"} 1\n'
    result = _promtool(promtool, bad)
    assert result.returncode != 0
    assert "stoker_rdma_hw_counter_total metric name should not include type 'counter'" in \
        (result.stdout + result.stderr).decode()
