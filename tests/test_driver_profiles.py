"""The verdict suite on each driver profile of the fake NVML (stoker/sim/drivers.py): the same scenarios, the
same expectations, judged the same, whatever the driver branch, with MIG on some GPUs, with MPS.

A representative subset, chosen for what the profiles change: every cause; GPM refused (the PCIe byte fields
an R535/R550 driver does not know, a MIG GPU without any activity); a GPU lost (its XID); job changes and
restarts (the processes MPS and MIG hide). The whole suite on the default profile is tests/test_scenarios.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stoker.sim import scenarios
from tests.simdrive import play_judged

SUITE = Path(__file__).parent / "scenarios"
PROFILES = {
    "535": {"driver": "535"},
    "550": {"driver": "550"},
    "570": {"driver": "570"},
    "mig": {"mig": (0, 1)},
    "mps": {"mps": True},
    "535-mig-mps": {"driver": "535", "mig": (2, 5), "mps": True},
}
CASES = ["storage-starved", "network-congested", "host-starved", "checkpoint-stall", "gpu-lost",
         "profiling-admin-only", *(str(SUITE / f"{name}.toml") for name in (
             "gpm-refused-during-host", "no-gpm-copy-bound", "job-change-relaunch",
             "restart-during-storage-kept-level"))]


@pytest.mark.parametrize("name", CASES, ids=lambda n: Path(n).stem)
@pytest.mark.parametrize("profile", PROFILES)
def test_the_verdicts_are_the_same_on_each_driver_profile(tmp_path, profile, name):
    play_judged(dataclasses.replace(scenarios.get(name), **PROFILES[profile]), tmp_path)
