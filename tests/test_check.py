"""`stoker check` on the simulated node, started inside each built-in scenario's fault: a few seconds
are enough because the plumbing is judged from the evidence itself, not from a learned level."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stoker.sim.scenarios import builtin_names

pytestmark = pytest.mark.slow
HEALTHY = {"healthy", "checkpoint", "cycle"}  # a checkpoint in progress is not a fault; cycle starts idle


@pytest.mark.timeout(180)
def test_stoker_check_exits_1_for_every_faulty_scenario_and_0_for_the_healthy_ones():
    procs = {name: subprocess.Popen([sys.executable, "-m", "stoker", "check", "--simulate", name, "--seconds", "6"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in builtin_names()}
    wrong = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=150)
        expected = 0 if name in HEALTHY else 1
        if proc.returncode != expected or ("HEALTHY" if expected == 0 else "UNHEALTHY") not in out:
            wrong[name] = f"exit {proc.returncode}\n{out}{err}"
        gpm_refused = "GPU profiling (GPM) is restricted to administrators" in out
        if gpm_refused != (name == "profiling-admin-only"):
            wrong[name] = f"the GPM note is {'shown' if gpm_refused else 'missing'}\n{out}"
    assert not wrong, "\n\n".join(f"== {name}: {text}" for name, text in wrong.items())
