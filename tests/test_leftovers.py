"""What a run leaves behind when it ends, however it ends: no probe child, no simulated tree.

Measured before: every kill -9 of a simulated run left its node's directory in /tmp (and a scenario
of 100,000 steps ~400,000 directories), SIGTERM to `stoker replay` or `stoker check --simulate` left it
too, and kill -9 during a NAS hang left 18 probe children from 10 runs, each blocked on the mount for
as long as it hangs. Each run here gets its own $TMPDIR, so no other run's tree is ever looked at."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import start_agent_process

TREE = re.compile(r"stoker-(sim|replay)-.*")


def trees(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if TREE.fullmatch(p.name))


def wait_for(condition, seconds: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:g} s: {what}"
        time.sleep(0.1)


def tree_laid_out(tmpdir: Path) -> bool:
    """A simulated run's tree exists and holds its kernel files."""
    return any((tmpdir / name / "proc").is_dir() for name in trees(tmpdir))


def probe_children(directory: Path) -> dict[int, str]:
    """PID -> state (R, S, D, Z...) of every probe child probing `directory`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if b"stoker.probe_child" in cmdline and os.fsencode(directory) in cmdline:
            found[int(entry)] = stat.rsplit(")", 1)[1].split()[0]
    return found


@pytest.mark.slow
def test_probe_children_die_with_an_agent_killed_with_sigkill(tmp_path):
    """A hung hard mount blocks the probe child in open() (here a FIFO where it opens its file, as in
    tests/test_probes.py); the agent is killed with SIGKILL, so nothing of its own kills the child."""
    hung = tmp_path / "hung"
    hung.mkdir()
    os.mkfifo(hung / f".stoker-probe-{socket.gethostname()}")
    (tmp_path / "tmp").mkdir()
    config = tmp_path / "stoker.toml"
    config.write_text(f'[probes]\ninterval = 1.0\ntimeout = 600.0\n[[probes.targets]]\nmountpoint = "/mnt/hung"\n'
                      f'path = "{hung}"\n')
    agent = start_agent_process("--simulate", "healthy", "--config", str(config), "--listen", "127.0.0.1:0",
                                env={"TMPDIR": str(tmp_path / "tmp")})
    children: dict[int, str] = {}
    try:
        wait_for(lambda: children.update(probe_children(hung)) or children, what="a probe child")
        time.sleep(0.5)  # in open() on the FIFO by now
        agent.kill()
        agent.wait(timeout=10)
        # killed: gone, or a zombie until whoever inherited it reaps it
        wait_for(lambda: set(probe_children(hung).values()) <= {"Z"}, 10.0, f"probe children {children} outlived the agent")
    finally:
        agent.kill()
        for pid in children:  # started by this test's agent: ended here if the fix failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_tree_left_by_a_kill_9_is_removed_by_the_next_simulated_run(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    agent = start_agent_process("--simulate", "healthy", "--listen", "127.0.0.1:0", env={"TMPDIR": str(tmpdir)})
    try:
        wait_for(lambda: tree_laid_out(tmpdir), what="the simulated tree")
        left = trees(tmpdir)
        agent.kill()
        agent.wait(timeout=10)
        assert trees(tmpdir) == left, "SIGKILL runs no cleanup: the tree is left"
        replay = subprocess.run([sys.executable, "-m", "stoker", "replay", "healthy", "--seconds", "2"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert replay.returncode in (0, 1), replay.stderr[-2000:]
        assert trees(tmpdir) == [], "the next run removed the dead run's tree, and its own"
    finally:
        agent.kill()


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["run", "--simulate", "healthy", "--listen", "127.0.0.1:0"],
    ["check", "--simulate", "healthy", "--seconds", "60"],
    ["replay", "cycle", "--seconds", "20000"],
], ids=["run", "check", "replay"])
def test_sigterm_removes_the_simulated_tree(tmp_path, command):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "stoker", *command], env={**os.environ, "TMPDIR": str(tmpdir)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: tree_laid_out(tmpdir), what="the simulated tree")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        assert code in (0, 128 + signal.SIGTERM), (code, proc.stderr.read().decode()[-2000:])
        assert trees(tmpdir) == []
    finally:
        proc.kill()
        proc.wait()
