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
        if "checked: 8 GPUs, 8 RDMA ports, 2 NFS mounts, 2 NAS probes\n" not in out:
            wrong[name] = f"does not say what it checked\n{out}"
        gpm_refused = "GPU profiling (GPM) is restricted to administrators" in out
        if gpm_refused != (name == "profiling-admin-only"):
            wrong[name] = f"the GPM note is {'shown' if gpm_refused else 'missing'}\n{out}"
    assert not wrong, "\n\n".join(f"== {name}: {text}" for name, text in wrong.items())


def check_beside_the_service(tmp_path, state_text: str, scenario: str, seconds: int, extra: str = ""):
    """`stoker check --simulate SCENARIO` with a configuration naming a service's state file holding
    `state_text`: (the state file, the finished check)."""
    state = tmp_path / "state.json"
    state.write_text(state_text)
    config = tmp_path / "stoker.toml"
    config.write_text(f'[agent]\nstate_file = "{state}"\n{extra}')
    return state, subprocess.run([sys.executable, "-m", "stoker", "check", "--simulate", scenario, "--seconds",
                                  str(seconds), "--config", str(config)], capture_output=True, text=True, timeout=100)


@pytest.mark.timeout(120)
def test_stoker_check_reads_the_services_state_file_and_leaves_it_as_it_was(tmp_path):
    """The check runs beside the service with the service's configuration: what it learns in a few
    seconds (here a checkpoint opening, which is saved at once) must not replace the service's state."""
    state, run = check_beside_the_service(tmp_path, '{"pids": [1, 2], "level": 0.9, "saved": 1.0, "checkpoints": []}',
                                          "checkpoint", 5)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checkpoint" in run.stdout
    assert state.read_text() == '{"pids": [1, 2], "level": 0.9, "saved": 1.0, "checkpoints": []}'
    assert not (tmp_path / "state.json.tmp").exists()


@pytest.mark.timeout(60)
def test_a_check_that_checked_nothing_could_not_check(tmp_path):
    """The GPU collector off, no RDMA device, no NFS mount, no probe target: the check said HEALTHY
    having looked at nothing. It must say so and exit 2, as for a node it could not check."""
    (tmp_path / "sys").mkdir()
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountstats").write_text("device proc mounted on /proc with fstype proc\n")
    config = tmp_path / "stoker.toml"
    config.write_text("[gpu]\nenabled = false\n")
    run = subprocess.run([sys.executable, "-m", "stoker", "check", "--config", str(config), "--seconds", "1",
                          "--sysfs-root", str(tmp_path / "sys"), "--procfs-root", str(tmp_path / "proc")],
                         capture_output=True, text=True, timeout=50)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "checked: nothing" in run.stdout and "HEALTHY" not in run.stdout.replace("UNHEALTHY", "")
    assert "COULD NOT CHECK\n  - nothing to check: the GPU collector is off; no RDMA port in " in run.stdout


@pytest.mark.timeout(120)
def test_a_node_short_of_ports_since_boot_is_unhealthy(tmp_path):
    """The service's state file says this node has shown 8 GPUs and 8 RDMA ports; it came up with 4
    ports (the simulated node's `[sim] rdma_ports = 4`): unhealthy, though every port present is up.
    The check reads the file and leaves it as it was."""
    kept = '{"inventory": {"gpu": 8, "rdma_port": 8}}'
    state, run = check_beside_the_service(tmp_path, kept, "healthy", 4, "[sim]\nrdma_ports = 4\n")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "checked: 8 GPUs, 4 RDMA ports, 2 NFS mounts, 2 NAS probes" in run.stdout
    assert f"  - 4 of 8 RDMA ports present (the most this node has shown, kept in {state})" in run.stdout
    assert "GPUs present" not in run.stdout
    assert state.read_text() == kept
