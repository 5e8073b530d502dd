"""The adversarial suite: every scenario file with expectations, played on a simulated clock and judged.

`tests/scenarios/` holds field-like cases (restarts during incidents, job changes, mixed,
stale and intermittent faults, slow and stalled checkpoints with and without hints, small and
noisy jobs); the built-in scenarios carry their own expectations too. docs/VERDICTS.md has the
accuracy table (`python -m bench.accuracy` regenerates it).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from stoker import config
from stoker.sim import scenarios
from stoker.sim.judge import judge, run_length
from tests.random_scenarios import scenario as random_scenario
from tests.simdrive import SimDrive, play_judged

SUITE = sorted((Path(__file__).parent / "scenarios").glob("*.toml"))
ROOT = Path(__file__).resolve().parent.parent


def cases() -> list[str]:
    return [str(p) for p in SUITE] + scenarios.builtin_names()


@pytest.mark.parametrize("name", cases(), ids=lambda n: Path(n).stem)
def test_scenario_verdicts_are_right(tmp_path, name):
    play_judged(scenarios.get(name), tmp_path)


SHIPPED = {"sim": {"shorten": False}, "probes": {"interval": 2.0, "timeout": 4.0},
           "detect": {"probe_hung_seconds": 3.0}}
"""The simulated node's shortened timers, but the checkpoint ones as shipped (stall_after 120 s, quiet_after 10 s)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", cases(), ids=lambda n: Path(n).stem)
def test_scenario_verdicts_are_right_with_the_shipped_checkpoint_timings(tmp_path, name):
    """The verdicts must not lean on the simulated node's short checkpoint timers (8 s, 3 s): the same
    expectations hold with the shipped ones. Only the verdicts: the checkpoint states follow the timers."""
    scenario = scenarios.get(name)
    drive = SimDrive(scenario, str(tmp_path), cfg=config.load(overrides=SHIPPED))
    try:
        assert (drive.config.checkpoint.stall_after, drive.config.checkpoint.quiet_after) == (120.0, 10.0)
        drive.run(run_length(scenario))
        result = judge(scenario, drive.samples, drive.outcomes(), checkpoints=False)
    finally:
        drive.close()
    assert result.right, "\n".join(result.failures)


RANDOM_SEEDS = range(40)


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_field_scenarios_are_right(tmp_path, seed):
    """tests/random_scenarios.py: incidents drawn at random, with restarts, job changes and lead times."""
    play_judged(scenarios.parse(random_scenario(seed), f"random-{seed}"), tmp_path)


@pytest.mark.parametrize("seed", range(20))
def test_random_field_scenarios_are_right_on_a_loaded_machine(tmp_path, seed):
    """The same on a loaded 2-core machine: ticks 0.7-1.5 intervals apart, each collector missing a
    tick now and then (SimDrive's `noise`)."""
    play_judged(scenarios.parse(random_scenario(seed), f"random-{seed}"), tmp_path, noise=random.Random(seed))


def test_the_suite_is_large_enough_and_every_case_has_expectations():
    assert len(SUITE) >= 15
    for path in SUITE:
        assert scenarios.get(str(path)).expect, f"{path.name} has no [[expect]]"


def test_every_case_is_in_the_accuracy_table():
    table = (ROOT / "docs" / "VERDICTS.md").read_text()
    missing = [Path(n).stem for n in cases() if f"`{Path(n).stem}`" not in table]
    assert not missing, f"docs/VERDICTS.md lacks {missing}: run python -m bench.accuracy"


@pytest.mark.parametrize("text, message", [
    ("", "needs at least one [[steps]]"),
    ('[[steps]]\ngpu = "saturated"\n', "steps[0].seconds: required"),
    ('[[steps]]\ngpu = "warp"\nseconds = 1\n', "steps[0].gpu: 'warp' is not one of"),
    ('[[steps]]\ngpu = "saturated"\nseconds = 1\nstorage = "slow"\n', "steps[0].storage"),
    ('[[steps]]\ngpu = "saturated"\nseconds = 1\nlevel = 2\n', "steps[0].level: expected a number from 0 to 1"),
    ('[[steps]]\ngpu = "saturated"\nseconds = 1\ncolour = 1\n', "unknown key 'colour'"),
    ('[[steps]]\ngpu = "saturated"\nseconds = 1\n[[expect]]\nfrom = 5\nto = 1\nverdict = "host"\n', "expect[0].to"),
    ('[[steps]]\ngpu = "saturated"\nseconds = 1\n[[expect]]\nfrom = 0\nto = 1\n', "give `verdict`"),
    ("steps = [", "not valid TOML"),
])
def test_a_bad_scenario_file_is_refused_with_the_key(text, message):
    with pytest.raises(scenarios.ScenarioError, match=message.replace("[", r"\[").replace("(", r"\(")):
        scenarios.parse(text, "case")


def test_an_unknown_scenario_names_the_built_in_ones():
    with pytest.raises(scenarios.ScenarioError, match="storage-starved"):
        scenarios.get("storage-starve")
