"""The Slurm HealthCheckProgram and prolog of docs/OPERATIONS.md, run as written against the real
`stoker check` on the simulated node, with `scontrol`, `runuser` and `logger` stubbed: what each does
to the node for a healthy, an unhealthy and an unchecked node."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "OPERATIONS.md").read_text()
STUB_SECONDS = "1"  # the examples sample 8 s and 5 s; the faults below show within 1 s on the simulator


def script(heading: str) -> str:
    section = DOC.split(f"### {heading}", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.search(r"```sh\n(#!/bin/sh\n.*?)```", section, re.S).group(1)


@pytest.fixture
def stubs(tmp_path):
    """A PATH of stubs that log their calls; `stoker` is the real one, checking the simulated node."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    files = {
        "runuser": '[ "$1 $2 $3" = "-u stoker --" ] || { echo "runuser $*" >> "$CALLS"; exit 125; }\n'
                   'shift 3\nexec "$@"\n',
        "scontrol": 'echo "scontrol $*" >> "$CALLS"\n'
                    'if [ "$1 $2 $3" = "-o show node" ]; then\n'
                    '  echo "NodeName=$4 Arch=x86_64 State=$NODE_STATE Partitions=gpu $NODE_REASON"\nfi\n',
        "logger": 'echo "logger $*" >> "$CALLS"\n',
        "hostname": 'echo gpu-node-017\n',
        "stoker": f'echo "stoker $*" >> "$CALLS"\n'
                  f'args=$(echo "$*" | sed "s/--seconds [0-9]*/--seconds {STUB_SECONDS}/")\n'
                  f'[ -n "$SCENARIO" ] || exit 2\n'
                  f'exec {shlex.quote(sys.executable)} -m stoker $args --simulate "$SCENARIO"\n',
    }
    for name, body in files.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return bin_dir, log


def run(heading: str, stubs, tmp_path, scenario: str, state: str = "IDLE", reason: str = "",
        env: dict | None = None) -> tuple[int, list[str]]:
    bin_dir, log = stubs
    text = script(heading)
    assert "\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n" in text  # slurmd gives scripts no PATH: the doc sets one
    path = tmp_path / heading.split(":")[0].replace(" ", "-")
    path.write_text(text.replace("\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n", f"\nPATH={bin_dir}:/usr/bin:/bin\n"))
    log.unlink(missing_ok=True)
    environment = {"PATH": "/usr/bin:/bin", "CALLS": str(log), "SCENARIO": scenario, "NODE_STATE": state,
                   "NODE_REASON": reason, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(["sh", str(path)], env=environment, capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return done.returncode, calls


HC = "HealthCheckProgram: drain with a reason, resume when healthy again"
PROLOG = "Prolog: check the node before each job"


def test_health_check_drains_an_unhealthy_node_with_the_problem_as_reason(stubs, tmp_path):
    rc, calls = run(HC, stubs, tmp_path, "gpu-lost", env={"SLURMD_NODENAME": "n17"})
    assert rc == 0
    assert calls[0] == "stoker check --seconds 8"  # as the service user, through runuser
    assert calls[-1] == "scontrol update NodeName=n17 State=DRAIN Reason=stoker: gpu 5 lost"


def test_health_check_leaves_a_healthy_node_alone_and_resumes_its_own_drain(stubs, tmp_path):
    rc, calls = run(HC, stubs, tmp_path, "healthy")
    assert rc == 0 and not [c for c in calls if c.startswith("scontrol update")]
    assert "scontrol -o show node gpu-node-017" in calls  # no SLURMD_NODENAME: the short host name
    rc, calls = run(HC, stubs, tmp_path, "healthy", state="IDLE+DRAIN",
                    reason="Reason=stoker: gpu 5 lost [root@2026-11-29T13:26:50]")
    assert rc == 0 and calls[-1] == "scontrol update NodeName=gpu-node-017 State=RESUME"
    rc, calls = run(HC, stubs, tmp_path, "healthy", state="IDLE+DRAIN", reason="Reason=bad DIMM [ops@2026-11-29]")
    assert rc == 0 and not [c for c in calls if c.startswith("scontrol update")]  # an operator's drain stays


def test_health_check_keeps_an_operator_s_drain_and_its_reason(stubs, tmp_path):
    rc, calls = run(HC, stubs, tmp_path, "port-down", state="IDLE+DRAIN", reason="Reason=bad DIMM [ops@2026-11-29]")
    assert rc == 0 and not [c for c in calls if c.startswith("scontrol update")]
    rc, calls = run(HC, stubs, tmp_path, "port-down", state="MIXED+DRAIN",
                    reason="Reason=stoker: gpu 5 lost [root@2026-11-29T13:26:50]")
    assert calls[-1] == "scontrol update NodeName=gpu-node-017 State=DRAIN Reason=stoker: mlx5_3/1 is DOWN"


def test_health_check_drains_nothing_when_the_check_could_not_run(stubs, tmp_path):
    rc, calls = run(HC, stubs, tmp_path, "")  # the stub exits 2, as stoker check on a bad configuration
    assert rc == 0 and not [c for c in calls if c.startswith("scontrol update")]
    assert any(c.startswith("logger -t stoker-healthcheck") and "could not check (exit 2)" in c for c in calls)


def test_prolog_fails_on_an_unhealthy_node_and_passes_otherwise(stubs, tmp_path):
    rc, calls = run(PROLOG, stubs, tmp_path, "nas-hang", env={"SLURM_JOB_ID": "4242"})
    assert rc == 1  # Slurm drains the node ("Prolog error") and requeues the job
    assert calls[0] == "stoker check"
    said = next(c for c in calls if c.startswith("logger -t stoker-prolog -p daemon.err"))
    assert "job 4242: UNHEALTHY" in said and "probe unanswered" in said
    assert not [c for c in calls if c.startswith("scontrol")]  # a prolog does not call Slurm
    rc, calls = run(PROLOG, stubs, tmp_path, "healthy")
    assert rc == 0 and calls == ["stoker check"]
    rc, calls = run(PROLOG, stubs, tmp_path, "")
    assert rc == 0 and any("could not check (exit 2)" in c for c in calls)


def test_the_examples_are_posix_sh():
    for heading in (HC, PROLOG):
        checked = subprocess.run(["sh", "-n"], input=script(heading), capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
