"""The verdict engine's data: every signal, every cause, every weight and timing, as tables.

The machines (causes.py, starvation.py, arbiter.py) hold no number and no cause
name of their own: a new kind of evidence is a row of `SIGNALS`, a new cause a
row of `CAUSES`, and each field case that needs one is a scenario file
(tests/scenarios/). docs/VERDICTS.md explains every row; tests/test_detect.py
states every number again, so that changing one fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SignalSpec:
    """One kind of evidence (the `signal` label of stoker_evidence_strength)."""

    cause: str
    threshold: str | None
    """The [detect] key its measured value is divided by (strength 1 at the threshold); None: the
    measurement sets its strength itself (a port down, a checkpoint)."""
    prefetched: bool = False
    """A data loader's prefetch buffer delays its effect on the GPUs: it is tolerated (present while
    the GPUs kept their level) only after `prefetch_hides`, and weighs `Weights.predates` before."""
    present_only: bool = False
    """Explains a wait only while present: gone, it explains nothing (its end is known, not faded)."""
    of_the_job: bool = False
    """About the job's own activity: the last job's is not the next one's."""


SIGNALS: dict[str, SignalSpec] = {
    "port_down": SignalSpec("network", None),
    "link_down": SignalSpec("network", None),
    "congestion": SignalSpec("network", "cnp_per_second"),
    "retransmits": SignalSpec("network", "retransmits_per_second"),
    "pfc_pause": SignalSpec("network", "pause_ratio"),
    "read_latency": SignalSpec("storage", "read_latency_seconds", prefetched=True),
    "read_queue": SignalSpec("storage", "read_queue_seconds", prefetched=True),
    "reads_stalled": SignalSpec("storage", "reads_stalled_after", prefetched=True, of_the_job=True),
    "write_latency": SignalSpec("storage", "write_latency_seconds"),
    "probe_slow": SignalSpec("storage", "probe_latency_seconds", prefetched=True),
    "probe_hung": SignalSpec("storage", "probe_hung_seconds", prefetched=True),
    "checkpoint_write_latency": SignalSpec("checkpoint", "write_latency_seconds", present_only=True),
    "checkpoint": SignalSpec("checkpoint", None, present_only=True),
    "cpu_pressure": SignalSpec("host", "cpu_pressure_ratio"),
    "memory_pressure": SignalSpec("host", "memory_pressure_ratio"),
}


@dataclass(frozen=True)
class CausePolicy:
    """How the arbiter treats one cause (the `cause` label of stoker_starved)."""

    name: str
    preempts: bool = False
    """Present, strong and outranking the verdict's cause by the switch margin: taken at once, on
    the first sample (a synchronous checkpoint explains the whole wait)."""
    damped: bool = True
    """Back within `flap_window` of its last verdict's end: its recovery takes `flap_factor` times
    longer (an intermittent fault reads as one starvation). Not a checkpoint: its end is known."""
    residual: bool = False
    """Named when the GPUs starve against the job's level and nothing explains it (the input
    pipeline or the CPU); without evidence of its own it yields at once to a cause present."""


CAUSES: tuple[CausePolicy, ...] = (  # in this order on equal scores
    CausePolicy("storage"),
    CausePolicy("network"),
    CausePolicy("checkpoint", preempts=True, damped=False),
    CausePolicy("host", residual=True),
)
CAUSE_NAMES: tuple[str, ...] = tuple(c.name for c in CAUSES)
POLICY: dict[str, CausePolicy] = {c.name: c for c in CAUSES}
RESIDUAL: str = next(c.name for c in CAUSES if c.residual)


@dataclass(frozen=True)
class Weights:
    """What a signal weighs in the ranking (attribution.py)."""

    explains: float = 1.0
    """A cause scoring this much explains a drop (the weight of a signal at its threshold)."""
    strong: float = 2.0
    """Needed to name a starvation without the job's level (twice a threshold, fresh)."""
    most: float = 5.0
    """A signal's weight at most (16 times its threshold): no single signal outweighs a checkpoint."""
    checkpoint: float = 6.0
    """An open checkpoint that explains a wait: above any other signal."""
    tolerated: float = 0.1
    """A signal present while the GPUs kept their level for its tolerance time."""
    predates: float = 0.5
    """A prefetched signal present at the job's level for `tolerate_after`, not yet `prefetch_hides`."""
    grown: float = 2.0
    """A tolerated signal that has since grown past this many times its tolerated strength weighs fully."""


@dataclass(frozen=True)
class Timings:
    """The machines' clocks, in samples or in multiples of [detect] `recover_after`."""

    lag: int = 2
    """Low samples in a row with no cause present before the residual is named: evidence can trail
    the GPUs by one sampling interval."""
    resolve: float = 1.0
    """x recover_after: a cause only remembered (measured absent) while the GPUs starve stops
    explaining (x flap_factor once it came back after doing so in this verdict)."""
    margin: float = 1.5
    """A cause present outranks the verdict's present cause by this factor ..."""
    hold: float = 1.0
    """... for this long (x recover_after), to replace it."""
    replace: int = 2
    """A cause present above what a remembered verdict cause weighs replaces it on this many samples."""
    recover: float = 1.0
    """x recover_after back at the level (x flap_factor when damped): the verdict clears."""
    new_normal: float = 10.0
    """x recover_after between the starved and the recovered line, the cause no longer strong: the
    job's new normal (then the recovery above)."""
    jitter: int = 2
    """Low samples in a row that restart the new-normal clock (one is a noisy job's dip)."""
    cold_line: float = 2.0
    """A cold verdict (no level) ends when the GPUs reach this many times what they do starved."""
    cold_levels: int = 300
    """Starved samples of a cold verdict whose median is its starved level."""


WEIGHTS = Weights()
TIMINGS = Timings()
