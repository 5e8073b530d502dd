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


@pytest.mark.timeout(120)
def test_stoker_check_reads_the_services_state_file_and_leaves_it_as_it_was(tmp_path):
    """The check runs beside the service with the service's configuration: what it learns in a few
    seconds (here a checkpoint opening, which is saved at once) must not replace the service's state."""
    state = tmp_path / "state.json"
    state.write_text('{"pids": [1, 2], "level": 0.9, "saved": 1.0, "checkpoints": []}')
    config = tmp_path / "stoker.toml"
    config.write_text(f'[agent]\nstate_file = "{state}"\n')
    run = subprocess.run([sys.executable, "-m", "stoker", "check", "--simulate", "checkpoint", "--seconds", "5",
                          "--config", str(config)], capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checkpoint" in run.stdout
    assert state.read_text() == '{"pids": [1, 2], "level": 0.9, "saved": 1.0, "checkpoints": []}'
    assert not (tmp_path / "state.json.tmp").exists()
