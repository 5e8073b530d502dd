"""Scenario files that are not what they should be (`stoker replay FILE`, `stoker run --simulate FILE`,
`stoker check --simulate FILE`): each is one line naming the file or the key and exit status 2, at
once. Measured before: nested arrays gave a 3,000-line traceback, `inf` an OverflowError, `to = 1e308`
and `--interval 1e-6` never finished, a FIFO blocked for ever, /dev/zero was read until MemoryError,
and 100,000 steps took over 30 s and left ~400,000 directories. Found by the fuzzing since: a dotted key
of 100,000 parts keeps tomllib busy for minutes (its time is quadratic in the parts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stoker.sim import scenarios

STEP = '[[steps]]\ngpu = "saturated"\nseconds = 10\n'


def stoker(*args: str) -> subprocess.CompletedProcess:
    """The CLI as its own process; the timeout is the proof that nothing is waited on for long."""
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True, timeout=30)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    return lines[0]


CASES = {
    "nested": ("steps = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "nested-shallow": ("steps = " + "[" * 200 + "]" * 200 + "\n", "steps[0]: expected a table"),
    "inf-seconds": ('[[steps]]\ngpu = "saturated"\nseconds = inf\n', "steps[0].seconds: expected a number from 0.1 to 86400"),
    "huge-to": (STEP + '[[expect]]\nfrom = 0\nto = 1e308\nverdict = "none"\n', "expect[0].to: expected a number"),
    "huge-integer": ('[[steps]]\ngpu = "saturated"\nseconds = ' + "9" * 5000 + "\n", "not valid TOML"),
    "long-dotted-key": ("a" + ".a" * 100_000 + " = 1\n" + STEP, "line 1: a key of more than 16 dotted parts"),
    "many-steps": ('[[steps]]\ngpu="idle"\nseconds=1\n' * 1001, "steps: expected a list of at most 1000"),
    "too-large": ('[[steps]]\ngpu="idle"\nseconds=1\n' * 100_000, "larger than 256 KiB"),
    "many-launches": ("".join(f'[[steps]]\ngpu="saturated"\nseconds=1\nlaunch={i}\n' for i in range(65)),
                      "more than 64 distinct job launches"),
    "many-restarts": ("restarts = [" + ", ".join(["1"] * 101) + "]\n" + STEP, "restarts: expected a list"),
    "job-name": (STEP + 'job = "../../etc"\n', "steps[0].job"),
    "not-utf8": (None, "not UTF-8"),
    "fifo": (None, "not a regular file"),
    "directory": (None, "not a regular file"),
}


def scenario_file(tmp_path, kind: str) -> str:
    path = tmp_path / "incident.toml"
    text = CASES[kind][0]
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes to it: open() and read() would wait for ever
    elif kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(STEP.encode() + b'description = "caf\xe9"\n')
    else:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kind", CASES)
def test_a_bad_scenario_file_is_refused_naming_the_key(tmp_path, kind):
    with pytest.raises(scenarios.ScenarioError) as err:
        scenarios.get(scenario_file(tmp_path, kind))
    assert CASES[kind][1] in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", ["nested", "inf-seconds", "huge-to", "fifo", "too-large"])
def test_a_bad_scenario_file_is_one_line_and_exit_2_in_replay(tmp_path, kind):
    line = one_line(stoker("replay", scenario_file(tmp_path, kind)))
    assert CASES[kind][1] in line, line


@pytest.mark.parametrize("kind", ["inf-seconds", "fifo"])
def test_a_bad_scenario_file_is_one_line_and_exit_2_in_run_and_check(tmp_path, kind):
    path = scenario_file(tmp_path, kind)
    line = one_line(stoker("run", "--simulate", path, "--listen", "127.0.0.1:0"))
    assert line.startswith("stoker: configuration error: ") and CASES[kind][1] in line, line
    assert CASES[kind][1] in one_line(stoker("check", "--simulate", path))


def test_dev_zero_is_refused_before_a_byte_is_read():
    """/dev/zero ends in ".../zero": given as a path (it has a "/"), it is read as a scenario file."""
    line = one_line(stoker("replay", "/dev/zero"))
    assert "/dev/zero: not a regular file" in line, line


@pytest.mark.parametrize("args, message", [
    (["--interval", "1e-6"], "--interval: must be between 0.05 and 3600 seconds"),
    (["--interval", "0.05", "--seconds", "86400"], "more than 100000"),
])
def test_a_replay_too_long_to_finish_is_refused_at_once(args, message):
    line = one_line(stoker("replay", "cycle", *args))
    assert message in line, line


def test_the_limits_leave_every_shipped_and_suite_scenario_alone():
    from pathlib import Path
    suite = sorted((Path(__file__).parent / "scenarios").glob("*.toml"))
    for name in [*scenarios.builtin_names(), *map(str, suite)]:
        scenario = scenarios.get(name)
        assert len(scenario.steps) <= scenarios.MAX_STEPS and scenario.period <= scenarios.MAX_SECONDS
