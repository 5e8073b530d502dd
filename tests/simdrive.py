"""The simulated node driven on a manual clock (the drive lives in the package: `stoker replay` uses it),
and a scenario played through it and judged against its own expectations."""

from stoker.sim.drive import SimDrive
from stoker.sim.judge import judge, run_length

__all__ = ["SimDrive", "play_judged"]


def play_judged(scenario, tmp_path, noise=None) -> SimDrive:
    """Play `scenario` to its end in `tmp_path` (`noise`: on a loaded machine, SimDrive); fail with the
    failed expectations and the verdict timeline."""
    drive = SimDrive(scenario, str(tmp_path), noise=noise)
    try:
        drive.run(run_length(scenario))
        result = judge(scenario, drive.samples, drive.outcomes())
    finally:
        drive.close()
    timeline = [f"{s.t:.0f}:{s.cause or '-'}/{s.checkpoint}" for s, prev in zip(drive.samples, [None] + drive.samples)
                if prev is None or (s.cause, s.checkpoint) != (prev.cause, prev.checkpoint)]
    assert result.right, "\n".join(result.failures + ["timeline: " + " ".join(timeline)])
    return drive
