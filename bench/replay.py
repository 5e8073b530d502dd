"""`stoker replay` of a long scenario: this tree's CPU time against another tree's, in the same run.

Each round plays the scenario once with each tree, in turn (so that a busy machine slows both alike),
in a child process of its own; reported: the median CPU seconds (user + system) of each, and their
ratio. The verdict engine runs once per simulated second: ten minutes of scenario are 600 ticks.

    python -m bench.replay --against TREE [--scenario tests/scenarios/long-noisy-healthy.toml]
                           [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import emit

ROOT = Path(__file__).resolve().parent.parent


def cpu_of(tree: Path, scenario: str, seconds: float) -> float:
    """CPU seconds of one `stoker replay` with the package in `tree`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "stoker", "replay", scenario, "--seconds", str(seconds)],
                   cwd=tree, env=env, stdout=subprocess.DEVNULL, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the other source tree (e.g. main, from git archive)")
    parser.add_argument("--scenario", default=str(ROOT / "tests" / "scenarios" / "long-noisy-healthy.toml"))
    parser.add_argument("--seconds", type=float, default=600.0, help="scenario seconds played")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(cpu_of(ROOT, args.scenario, args.seconds))
        theirs.append(cpu_of(Path(args.against), args.scenario, args.seconds))
    mine, other = statistics.median(ours), statistics.median(theirs)
    emit("replay", {"scenario": args.scenario, "seconds": args.seconds, "rounds": args.rounds,
                    "cpu_seconds": round(mine, 3), "against": {"tree": args.against, "cpu_seconds": round(other, 3)},
                    "ratio": round(mine / other, 3), "each": [round(x, 3) for x in ours],
                    "each_against": [round(x, 3) for x in theirs]}, args.out)


if __name__ == "__main__":
    main()
