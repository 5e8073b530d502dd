"""The verdict engine's parts, one behaviour at a time: attribution, starvation, jobs, checkpoints, saved levels."""

from __future__ import annotations

import json
import random

import pytest

from stoker.config import CheckpointConfig, DetectConfig
from stoker.detect.attribution import Attribution
from stoker.detect.checkpoint import CheckpointTracker, HintError
from stoker.detect.evidence import Signal
from stoker.detect.job import JobTracker
from stoker.detect.engine import Engine
from stoker.detect.state import Saved, StateStore
from stoker.sim.drive import ManualClock
from stoker.sources.gpu import GpuSample, GpuSnapshot
from stoker.sources.nfs import NfsSample, NfsSnapshot

NO = {"storage": 0.0, "network": 0.0, "checkpoint": 0.0, "host": 0.0}
READS = Signal("read_latency", "/mnt/data", 4.0, "/mnt/data: READ takes 80 ms")
RAIL = Signal("port_down", "mlx5_3/1", 4.0, "mlx5_3/1 down")


def scores(**kw) -> dict[str, float]:
    return {**NO, **kw}


# -- attribution ---------------------------------------------------------------------------------

def test_strength_counts_by_its_log_and_staleness_fades_it():
    a = Attribution(DetectConfig(evidence_memory=10.0))
    a.observe(0.0, [Signal("congestion", "mlx5_0/1", 1.0, ""), READS], at_level=False)
    assert a.scores()["network"] == pytest.approx(1.0) and a.scores()["storage"] == pytest.approx(3.0)
    a.observe(5.0, [], at_level=False)
    assert a.scores()["storage"] == pytest.approx(1.5), "half faded after half the memory"
    assert a.scores(fresh_only=True)["storage"] == 0.0
    a.observe(10.5, [], at_level=False)
    assert a.scores() == NO and not a.traces


def test_evidence_the_gpus_worked_through_is_discounted_until_it_grows():
    a = Attribution(DetectConfig(tolerate_after=10.0))
    for t in range(12):
        a.observe(float(t), [RAIL], at_level=True)
    assert a.scores()["network"] == pytest.approx(0.3)
    assert "present before the drop" in a.reasons("network")[0]
    a.observe(12.0, [Signal("port_down", "mlx5_3/1", 9.0, "worse")], at_level=False)
    assert a.scores()["network"] == pytest.approx(min(5.0, 1 + 3.17), abs=0.01), "more than twice as bad: full weight"


def test_a_slow_nas_the_prefetch_hid_weighs_half_until_it_cannot_have_been_hidden():
    a = Attribution(DetectConfig(tolerate_after=10.0, prefetch_hides=120.0))
    slow = Signal("read_latency", "/mnt/data", 4.0, "READ takes 80 ms")  # score 3
    for t in range(30):
        a.observe(float(t), [slow, RAIL], at_level=True)
    assert a.scores()["storage"] == pytest.approx(1.5), "the prefetch may have run dry only now"
    assert a.scores()["network"] == pytest.approx(0.3), "a rail is not buffered"
    assert "present before the drop" in a.reasons("storage")[0]
    for t in range(30, 121):
        a.observe(float(t), [slow], at_level=True)
    assert a.scores()["storage"] == pytest.approx(0.3), "two minutes at full speed: tolerated"


def test_a_checkpoint_is_not_remembered_once_it_ended():
    a = Attribution(DetectConfig())
    a.observe(0.0, [Signal("checkpoint", "/mnt/checkpoints", 1.0, ""),
                    Signal("checkpoint_write_latency", "/mnt/checkpoints", 4.0, "")], at_level=False)
    assert a.scores()["checkpoint"] == 6.0
    a.observe(1.0, [], at_level=False)
    assert a.scores()["checkpoint"] == 0.0, "nor its slow writes"


# -- starvation ------------------------------------------------------------------------------------

def test_noisy_healthy_signal_does_not_flap():
    detector = Engine(DetectConfig())
    rng = random.Random(7)
    causes = [detector.update(float(t), min(1.0, max(0.0, rng.gauss(0.62, 0.06))), True, 0.66, NO, NO)
              for t in range(3600)]
    assert set(causes) == {None}


def test_noisy_signal_around_the_threshold_changes_verdict_rarely():
    detector = Engine(DetectConfig())
    rng = random.Random(3)
    causes = [detector.update(float(t), rng.choice([0.3, 0.5, 0.6, 0.75, 0.8]), True, 0.9, NO, NO)
              for t in range(600)]
    changes = sum(1 for a, b in zip(causes, causes[1:]) if a != b)
    assert changes <= 40, changes  # without hysteresis this flips on most of the 600 samples


def test_no_job_no_verdict():
    assert Engine(DetectConfig()).update(1.0, 0.0, False, 0.9, scores(storage=3.0), NO) is None


def test_cold_start_needs_strong_fresh_evidence_and_a_low_absolute_level():
    strong = scores(storage=3.0)
    assert Engine(DetectConfig()).update(1.0, 0.2, True, None, strong, strong) == "storage"
    weak = scores(storage=1.5)
    assert Engine(DetectConfig()).update(1.0, 0.2, True, None, weak, weak) is None
    remembered_only = Engine(DetectConfig()).update(1.0, 0.2, True, None, strong, NO)
    assert remembered_only is None, "evidence from before this job or this start is not fresh"
    assert Engine(DetectConfig()).update(1.0, 0.6, True, None, strong, strong) is None
    assert Engine(DetectConfig()).update(1.0, 0.02, True, None, NO, NO) is None, "no level, no evidence"


def test_a_cold_verdict_ends_when_its_evidence_goes_or_the_gpus_pick_up():
    d = Engine(DetectConfig(recover_after=2.0))
    strong = scores(storage=3.0)
    d.update(0.0, 0.2, True, None, strong, strong)
    for t in (1.0, 2.0, 3.0):
        d.update(t, 0.2, True, None, strong, strong)
    assert d.cause == "storage"
    for t in (4.0, 5.0, 6.0):
        d.update(t, 0.2, True, None, NO, NO)  # the NAS is fine again; 20% is this job's level
    assert d.cause is None


def test_host_yields_at_once_to_evidence_but_not_while_recovering():
    d = Engine(DetectConfig(recover_after=3.0))
    assert d.update(0.0, 0.1, True, 0.9, NO, NO) is None, "one more sample: evidence may trail"
    assert d.update(1.0, 0.1, True, 0.9, NO, NO) == "host"
    assert d.update(10.0, 0.1, True, 0.9, scores(storage=1.2), scores(storage=1.2)) == "storage"
    d2 = Engine(DetectConfig(recover_after=3.0))
    d2.update(0.0, 0.1, True, 0.9, scores(storage=3.0), scores(storage=3.0))
    for t in (20.0, 21.0, 22.0):  # back at the level, the evidence faded: recovering, no switch to host
        assert d2.update(t, 0.9, True, 0.9, NO, NO) == "storage"
    assert d2.update(23.0, 0.9, True, 0.9, NO, NO) is None


def test_a_cause_replaces_another_by_margin_and_time_or_present_against_remembered():
    d = Engine(DetectConfig(recover_after=3.0))
    s, both = scores(storage=2.0), scores(storage=2.0, network=3.5)
    d.update(0.0, 0.1, True, 0.9, s, s)
    d.update(10.0, 0.1, True, 0.9, both, both)
    d.update(12.0, 0.1, True, 0.9, both, both)
    assert d.cause == "storage", "outranking by 1.75x for 2 s is not enough"
    d.update(13.0, 0.1, True, 0.9, both, both)
    assert d.cause == "network"
    d2 = Engine(DetectConfig(recover_after=3.0))
    d2.update(0.0, 0.1, True, 0.9, s, s)
    remembered, present = scores(storage=2.0, network=2.5), scores(network=2.5)
    d2.update(10.0, 0.1, True, 0.9, remembered, present)
    assert d2.cause == "storage"
    d2.update(11.0, 0.1, True, 0.9, remembered, present)
    assert d2.cause == "network", "present on two samples against one only remembered"


def test_a_verdict_that_comes_back_needs_a_longer_recovery():
    d = Engine(DetectConfig(recover_after=3.0, flap_factor=3.0, flap_window=60.0))
    s = scores(storage=3.0)
    d.update(0.0, 0.1, True, 0.9, s, s)
    for t in range(1, 5):
        d.update(float(t), 0.9, True, 0.9, NO, NO)
    assert d.cause is None
    d.update(10.0, 0.1, True, 0.9, s, s)
    for t in range(11, 19):
        d.update(float(t), 0.9, True, 0.9, NO, NO)
    assert d.cause == "storage", "8 s healthy between bursts of the same fault"
    d.update(20.0, 0.9, True, 0.9, NO, NO)
    assert d.cause is None
    assert d.seconds["storage"] > 0 and d.seconds["host"] == 0


# -- jobs --------------------------------------------------------------------------------------------

def snapshot(pids: tuple[int, ...], memory: float = 60e9) -> GpuSnapshot:
    return GpuSnapshot([GpuSample(i, f"GPU-{i}", processes=1 if pids else 0, pids=pids[i:i + 1] if pids else (),
                                  memory_used_bytes=memory) for i in range(2)])


def test_a_job_is_new_when_its_processes_all_change_or_the_gpus_were_released():
    job = JobTracker(DetectConfig())
    assert job.update(0.0, snapshot((100, 101)))
    for t in range(10):
        job.remember(float(t), 0.9)
    assert job.baseline() == 0.9
    assert not job.update(1.0, snapshot((100, 202))), "one rank restarted: the same job"
    assert job.baseline() == 0.9
    assert job.update(2.0, snapshot((300, 301))) and job.baseline() is None
    assert not job.update(3.0, snapshot((), memory=1e9)) and not job.present
    assert job.update(4.0, snapshot((), memory=60e9)), "memory held again after a release: another job"


def test_a_job_loading_for_minutes_is_not_given_an_idle_level():
    job = JobTracker(DetectConfig())
    job.update(0.0, snapshot((100, 101)))
    for t in range(90):
        job.remember(float(t), 0.0)  # loading its weights: memory held, no kernels
    for t in range(90, 100):
        job.remember(float(t), 0.95)
    assert job.baseline() == 0.95
    for t in range(100, 111):
        job.remember(float(t), 0.0)  # once it works, a pause is its own, as an eval pause is
    assert job.baseline() == 0.0


# -- checkpoints ------------------------------------------------------------------------------------

class Mount:
    """A checkpoint mount's mountstats totals, moved by hand (the client's count optional, as on kernels
    whose `bytes:` line the parser cannot split)."""

    def __init__(self, mountpoint: str = "/mnt/ckpt", role: str = "checkpoint", client: bool = True):
        self.mountpoint, self.role, self.with_client = mountpoint, role, client
        self.server = self.client = 1e9

    def sample(self) -> NfsSample:
        return NfsSample(self.mountpoint, f"nas:{self.mountpoint}", "4.1", "tcp", 1, self.role,
                         write_bytes=self.server, client_write_bytes=self.client if self.with_client else None)

    def write(self, server: float, client: float | None = None) -> NfsSnapshot:
        self.server += server
        self.client += server if client is None else client
        return NfsSnapshot([self.sample()])


def tracker(**kw) -> tuple[CheckpointTracker, ManualClock, Mount]:
    clock = ManualClock(0.0)
    return CheckpointTracker(CheckpointConfig(**{"stall_after": 20.0, "quiet_after": 5.0, **kw}), clock), clock, Mount()


def tick(t: CheckpointTracker, clock: ManualClock, snap: NfsSnapshot | None, waiting: bool, dt: float = 1.0) -> None:
    clock.advance(dt)
    t.update(snap, waiting)


def test_a_hint_before_the_first_nfs_cycle_is_asked_again_not_told_the_mount_is_not_nfs():
    """`stoker checkpoint start --mountpoint /mnt/checkpoints` sent as the simulated node's /metrics first
    answered was refused with "/mnt/checkpoints is not an NFS mount of this node" (exit 1), and the
    same command half a second later was accepted: the tracker had not yet had the NFS collector's
    first snapshot. Before one, no mount is known or unknown: 503, send it again."""
    t, clock, mount = tracker()
    t.update(None, False)  # the verdicts' tick before the NFS collector's first cycle
    for where in ({"mountpoint": "/mnt/ckpt", "path": None}, {"mountpoint": None, "path": "/mnt/ckpt/step1"}):
        with pytest.raises(HintError) as err:
            t.resolve(**where)
        assert (err.value.status, str(err.value)) == (503, "the agent has not read this node's NFS mounts yet (it "
                                                      "has just started, or [nfs] is off): send the hint again")
    tick(t, clock, mount.write(0), False)
    assert t.resolve("/mnt/ckpt", None) == "/mnt/ckpt" and t.resolve(None, "/mnt/ckpt/step1") == "/mnt/ckpt"
    with pytest.raises(HintError) as err:
        t.resolve("/mnt/other", None)
    assert err.value.status == 404 and "not an NFS mount of this node" in str(err.value)


def nested_mounts() -> NfsSnapshot:
    """/mnt and /mnt/ckpt both NFS (a checkpoint share mounted inside the data share), /mnt/ckpt-old beside."""
    return NfsSnapshot([NfsSample(mp, f"nas:{mp}", "4.1", "tcp", 1, "checkpoint", write_bytes=1e9,
                                  client_write_bytes=2e9) for mp in ("/mnt", "/mnt/ckpt", "/mnt/ckpt-old")])


@pytest.mark.parametrize("mountpoint, path, resolved, status, says", [
    ("/mnt/ckpt", None, "/mnt/ckpt", None, None),
    (None, "/mnt/ckpt", "/mnt/ckpt", None, None),  # the mountpoint itself as a path
    (None, "/mnt/ckpt/step1/shard0", "/mnt/ckpt", None, None),  # the deepest mount holding the path
    (None, "/mnt/ckpt-old/step1", "/mnt/ckpt-old", None, None),  # a name that starts like another is not in it
    (None, "/mnt/data/x", "/mnt", None, None),
    ("/mnt/ckpt/", None, None, 404, "/mnt/ckpt/ is not an NFS mount of this node"),  # mountpoints are exact
    ("/scratch", None, None, 404, "/scratch is not an NFS mount of this node"),
    (None, "/scratch/step1", None, 404, "/scratch/step1 is not on an NFS mount of this node"),
    (None, "/mntx/step1", None, 404, "/mntx/step1 is not on an NFS mount of this node"),
    (None, None, None, 400, "give `mountpoint` or `path`"),
    ("", "", None, 400, "give `mountpoint` or `path`"),
])
def test_a_checkpoint_hint_names_its_mount_exactly_or_by_a_path_in_it(mountpoint, path, resolved, status, says):
    """How the hint API (`stoker checkpoint start --mountpoint M | --path P`) finds the mount, and what it
    answers the job when it cannot: HTTP status and message, each as docs/JOBS.md shows them."""
    t, clock, _ = tracker()
    tick(t, clock, nested_mounts(), False)
    if status is None:
        assert t.resolve(mountpoint, path) == resolved
        return
    with pytest.raises(HintError) as err:
        t.resolve(mountpoint, path)
    assert (err.value.status, str(err.value)) == (status, says)


def test_hint_ends_count_their_outcome_and_an_end_without_a_start_is_a_conflict():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    with pytest.raises(HintError) as err:
        t.hint_end("/mnt/ckpt", "completed")
    assert (err.value.status, str(err.value)) == (409, "no checkpoint in progress on /mnt/ckpt")
    m = t.mounts["/mnt/ckpt"]
    assert (m.server, m.client) == (mount.server, mount.client), "a mount first named by a hint starts at its totals"
    for outcome, counted in (("aborted", "aborted"), ("completed", "completed"), ("anything", "completed")):
        t.hint_start("/mnt/ckpt", expected_bytes=8e9)
        assert m.active.source == "hint" and m.active.expected_bytes == 8e9
        assert (m.active.start_server, m.active.start_client) == (mount.server, mount.client)
        clock.advance(4.0)
        t.hint_end("/mnt/ckpt", outcome)
        assert m.outcomes[counted] >= 1 and m.last_duration == 4.0 and m.state == "settling"
    assert m.outcomes["aborted"] == 1 and m.outcomes["completed"] == 2


def test_a_hint_on_a_mount_not_kept_for_checkpoints_counts_from_its_totals_at_the_hint():
    """A job may save to any NFS mount (`--path` on the data share): the tracker takes it on at the
    hint, from the mount's totals then, so its checkpoint counts only what is written after."""
    t, clock, _ = tracker()
    data = {"server": 7e9, "client": 9e9}

    def snap():
        return NfsSnapshot([NfsSample("/mnt/data", "nas:/data", "4.1", "tcp", 1, "data",
                                      write_bytes=data["server"], client_write_bytes=data["client"])])
    tick(t, clock, snap(), False)
    assert "/mnt/data" not in t.mounts
    t.hint_start(t.resolve(None, "/mnt/data/ckpt/step9"))
    m = t.mounts["/mnt/data"]
    assert (m.active.start_server, m.active.start_client) == (7e9, 9e9)
    data["server"] += 3e9
    data["client"] += 3e9
    tick(t, clock, snap(), True)
    assert m.written_bytes == 3e9 and m.active.unflushed == 0.0


def test_a_write_rate_at_the_floor_is_writing_and_under_it_is_quiet():
    """`write_floor_bytes_per_second` (1 MB/s): a checkpoint writing at it is still writing; a detected one
    ends `quiet_after` seconds after its writes fall under it."""
    t, clock, mount = tracker(quiet_after=3.0)
    floor = t.config.write_floor_bytes_per_second
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(2e9), True)
    m = t.mounts["/mnt/ckpt"]
    for _ in range(6):
        tick(t, clock, mount.write(floor), True)
        assert m.active is not None and m.active.writing and m.active.quiet_since is None
    tick(t, clock, mount.write(floor - 1), True)
    assert not m.active.writing and m.active.quiet_since == clock() - 1.0, "quiet since the window began"
    for _ in range(2):
        tick(t, clock, mount.write(0), True)
    assert m.active is None and m.last_duration == pytest.approx(7.0) and m.outcomes["completed"] == 1


def test_a_slow_checkpoint_is_seen_while_the_gpus_wait_and_ends_with_its_writes():
    t, clock, mount = tracker()
    for _ in range(5):
        tick(t, clock, mount.write(0), False)
    for _ in range(3):
        tick(t, clock, mount.write(4e6), False)
    assert t.mounts["/mnt/ckpt"].active is None, "4 MB/s while the GPUs work: not what a checkpoint does to them"
    for _ in range(3):
        tick(t, clock, mount.write(4e6), True)
    m = t.mounts["/mnt/ckpt"]
    assert m.active is not None and m.active.source == "detected"
    for _ in range(30):
        tick(t, clock, mount.write(4e6), True)
    assert m.active is not None and not m.active.stalled
    for _ in range(8):
        tick(t, clock, mount.write(0), True)  # writes over; the GPUs still wait (for something else)
    assert m.active is None and m.outcomes["completed"] == 1 and m.outcomes["stalled"] == 0
    assert m.written_bytes == pytest.approx(36 * 4e6, rel=0.1)


def test_a_detected_checkpoint_stalls_only_while_written_data_waits_for_the_server():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(2e9), True)
    m = t.mounts["/mnt/ckpt"]
    assert m.active is not None
    for _ in range(25):
        tick(t, clock, mount.write(0, client=50e6 if clock() < 5 else 0), True)
    assert m.active.stalled and m.active.unflushed > 0
    for _ in range(3):
        tick(t, clock, mount.write(5e6), True)
    assert not m.active.stalled and m.state == "open", "bytes reach the server again"


def test_a_hinted_checkpoint_stalls_without_progress_and_its_trailing_flush_is_not_another():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    for _ in range(22):
        tick(t, clock, mount.write(0), True)
    m = t.mounts["/mnt/ckpt"]
    assert m.active.stalled
    t.hint_end("/mnt/ckpt", "completed")
    assert m.outcomes["stalled"] == 1
    tick(t, clock, mount.write(3e9), False)
    assert m.active is None, "the page cache flushing after the end is the same checkpoint's bytes"


def test_writes_the_job_hands_over_after_an_end_are_a_checkpoint_even_while_the_nas_drains():
    """An end hint sent before the shards were written, or an unhinted save while the NAS still drains
    the last one: the flush moves only the server's bytes; the job handing over more is another."""
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    tick(t, clock, mount.write(4e6, client=500e6), True)
    t.hint_end("/mnt/ckpt", "completed")
    m = t.mounts["/mnt/ckpt"]
    tick(t, clock, mount.write(4e6, client=300e6), True)  # the window of the end: still that checkpoint's
    for _ in range(10):
        tick(t, clock, mount.write(4e6, client=0), False)  # the NAS drains; the job trains
    assert m.active is None and m.settling, "a drain is not a checkpoint"
    for _ in range(4):
        tick(t, clock, mount.write(4e6, client=4e6), True)  # the job writes again, the GPUs wait
    assert m.active is not None and m.active.source == "detected"


def test_a_checkpoint_announced_by_a_job_that_is_gone_ends_with_it():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    tick(t, clock, mount.write(1e9), True)
    t.job_changed()
    m = t.mounts["/mnt/ckpt"]
    assert m.active is None and m.outcomes["abandoned"] == 1
    tick(t, clock, mount.write(1e9), True)  # the killed job's last bytes, flushed
    assert m.active is None
    assert t.inherited("/mnt/ckpt") and t.signals() == [], "the drain is the gone job's"
    tick(t, clock, mount.write(0), False)
    assert not t.inherited("/mnt/ckpt"), "quiet: what it writes next is the new job's"


def test_a_checkpoint_on_a_vanished_mount_is_lost_and_the_mount_forgotten():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(2e9), True)
    assert t.mounts["/mnt/ckpt"].active is not None
    for _ in range(22):
        tick(t, clock, NfsSnapshot([]), True)
    assert t.mounts["/mnt/ckpt"].outcomes["lost"] == 1
    clock.advance(600.0 - 21.0)  # gone since the first empty snapshot, 21 s ago: 600 s in all
    t.update(NfsSnapshot([]), False)
    assert "/mnt/ckpt" in t.mounts, "forgotten only after ten minutes gone"
    clock.advance(0.5)
    t.update(NfsSnapshot([]), False)
    assert "/mnt/ckpt" not in t.mounts


def _restarted(clock: ManualClock, records: list[dict], snap: NfsSnapshot) -> CheckpointTracker:
    """A fresh tracker (the agent restarted) given the last run's open checkpoints."""
    fresh = CheckpointTracker(CheckpointConfig(stall_after=20.0, quiet_after=5.0), clock)
    tick(fresh, clock, snap, True)
    fresh.restore(json.loads(json.dumps(records)))  # as the state file gives them back
    return fresh


def test_a_stalled_checkpoint_is_still_open_and_stalled_after_a_restart():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    tick(t, clock, mount.write(2e9, 6e9), True)  # 4 GB still in the page cache
    for _ in range(22):
        tick(t, clock, mount.write(0), True)
    assert t.mounts["/mnt/ckpt"].active.stalled
    records = t.open_records()
    clock.advance(5.0)
    fresh = _restarted(clock, records, mount.write(0))
    a = fresh.mounts["/mnt/ckpt"].active
    assert a is not None and a.stalled and a.source == "hint"
    assert a.progress == records[0]["progress"], "no byte since: the saved progress is exact"
    assert [s.kind for s in fresh.signals()] == ["checkpoint"]
    fresh.hint_end("/mnt/ckpt", "completed")
    assert fresh.mounts["/mnt/ckpt"].outcomes["stalled"] == 1


def test_a_checkpoint_that_progressed_while_no_agent_watched_restarts_its_stall_clock():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(2e9), True)  # detected: a burst
    records = t.open_records()
    assert records and records[0]["source"] == "detected"
    clock.advance(30.0)
    fresh = _restarted(clock, records, mount.write(1e9))
    a = fresh.mounts["/mnt/ckpt"].active
    assert a is not None and not a.stalled and a.progress == clock()
    assert fresh.mounts["/mnt/ckpt"].written_bytes == 3e9, "counted from the checkpoint's start, not the restart"
    for _ in range(8):
        tick(fresh, clock, mount.write(0), False)
    assert fresh.mounts["/mnt/ckpt"].active is None and fresh.mounts["/mnt/ckpt"].outcomes["completed"] == 1


def test_a_hinted_checkpoint_that_wrote_while_no_agent_watched_ends_with_its_writes():
    """Its end hint may have gone to no agent: held open by the hint, it would read as stalled."""
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    records = t.open_records()
    clock.advance(30.0)
    fresh = _restarted(clock, records, mount.write(5e9))
    assert fresh.mounts["/mnt/ckpt"].active.source == "detected"
    for _ in range(25):
        tick(fresh, clock, mount.write(0), False)
    m = fresh.mounts["/mnt/ckpt"]
    assert m.active is None and m.outcomes == {**m.outcomes, "completed": 1, "stalled": 0}


def test_a_remounted_checkpoint_mount_is_not_given_the_old_checkpoint():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    records = t.open_records()
    remounted = Mount()
    remounted.server = remounted.client = 0.0
    fresh = _restarted(clock, records, remounted.write(0))
    assert fresh.mounts["/mnt/ckpt"].active is None
    assert _restarted(clock, [{"mountpoint": "/mnt/ckpt", "source": "hint"}], mount.write(0)) \
        .mounts["/mnt/ckpt"].active is None, "a record missing its fields is left out"


def test_a_stall_is_called_while_the_nfs_collector_is_down():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    for _ in range(21):
        tick(t, clock, None, True)
    assert t.mounts["/mnt/ckpt"].active.stalled


# -- saved levels ----------------------------------------------------------------------------------

def test_a_saved_state_comes_back_only_while_fresh(tmp_path):
    clock = ManualClock(1000.0)
    store = StateStore(str(tmp_path / "state.json"), max_age=300.0, wall=clock)
    store.save(frozenset({1, 2}), 0.93, [{"mountpoint": "/mnt/ckpt"}])
    saved = store.load()
    assert (saved.pids, saved.level, saved.checkpoints) == (frozenset({1, 2}), 0.93, [{"mountpoint": "/mnt/ckpt"}])
    clock.advance(301)
    assert store.load() is None
    (tmp_path / "state.json").write_text("{not json")
    assert store.load() is None
    (tmp_path / "state.json").write_text(json.dumps({"pids": [1, 2], "level": 7, "saved": clock()}))
    assert store.load().level is None, "a level above 1 is not one"
    (tmp_path / "state.json").write_text(json.dumps({"pids": [1, 2], "level": 0.8, "saved": clock()}))
    assert store.load() == Saved(frozenset({1, 2}), 0.8, []), "the file of the release before (no checkpoints)"
    (tmp_path / "state.json").write_text(json.dumps({"pids": [1], "level": 0.5, "saved": clock(), "checkpoints": 3}))
    assert store.load() is None


def test_a_saved_verdict_keeps_whether_it_was_a_return(tmp_path):
    """An intermittent fault's return is damped (a longer recovery): a restart must not undo that."""
    clock = ManualClock(1000.0)
    store = StateStore(str(tmp_path / "state.json"), max_age=300.0, wall=clock)
    store.save(frozenset({1}), 0.9, [], ("storage", False, True))
    saved = store.load()
    assert (saved.cause, saved.cold, saved.came_back) == ("storage", False, True)
    d = Engine(DetectConfig(recover_after=3.0, flap_factor=3.0))
    d.resume(0.0, saved.cause, saved.cold, saved.came_back)
    scores = dict(NO)
    for t in range(1, 9):
        assert d.update(float(t), 0.9, True, 0.9, scores, scores) == "storage", t  # damped: 9 s, not 3
    assert d.update(10.0, 0.9, True, 0.9, scores, scores) is None


def test_a_state_file_that_cannot_be_written_costs_only_the_feature(tmp_path):
    store = StateStore(str(tmp_path / "missing-dir" / "state.json"), max_age=300.0)
    store.save(frozenset({1}), 0.5, [])
    assert store.load() is None


def test_a_jittery_sample_between_the_lines_does_not_restart_the_recovery():
    d = Engine(DetectConfig(recover_after=3.0))
    s = scores(storage=3.0)
    d.update(0.0, 0.1, True, 0.9, s, s)
    for t, busy in ((10.0, 0.9), (11.0, 0.6), (12.0, 0.9)):  # 0.6: above the starved line (0.45)
        d.update(t, busy, True, 0.9, NO, NO)
    assert d.cause == "storage"
    d.update(13.0, 0.9, True, 0.9, NO, NO)
    assert d.cause is None
    d2 = Engine(DetectConfig(recover_after=3.0))
    d2.update(0.0, 0.1, True, 0.9, s, s)
    for t, busy in ((10.0, 0.9), (11.0, 0.3), (12.0, 0.9), (13.0, 0.9)):  # 0.3: starved again
        d2.update(t, busy, True, 0.9, s, s)
    assert d2.cause == "storage"


def test_a_verdict_clears_when_its_evidence_is_gone_and_the_job_runs_above_the_starved_line():
    d = Engine(DetectConfig(recover_after=3.0))
    s = scores(storage=3.0)
    d.update(0.0, 0.1, True, 0.9, s, s)
    for t in range(10, 14):
        d.update(float(t), 0.65, True, 0.9, NO, NO)  # 72% of the level: between the lines, the NAS fine again
    assert d.cause is None
    host = Engine(DetectConfig(recover_after=3.0))
    host.update(0.0, 0.1, True, 0.9, NO, NO)
    host.update(1.0, 0.1, True, 0.9, NO, NO)
    for t in range(10, 38):
        host.update(float(t), 0.65, True, 0.9, NO, NO)
    assert host.cause == "host", "no evidence to lose: the band is held..."
    for t in range(38, 45):
        host.update(float(t), 0.65, True, 0.9, NO, NO)
    assert host.cause is None, "...until it has lasted long enough to be the job's new normal"


def test_a_new_job_is_not_a_fault_coming_back():
    d = Engine(DetectConfig(recover_after=3.0, flap_factor=3.0))
    s = scores(storage=3.0)
    d.update(0.0, 0.1, True, 0.9, s, s)
    d.new_job()
    d.update(5.0, 0.1, True, 0.9, s, s)
    for t in range(6, 10):
        d.update(float(t), 0.9, True, 0.9, NO, NO)
    assert d.cause is None, "a normal recovery, not the damped one of a flapping fault"


def test_what_is_present_at_a_job_change_keeps_its_history_and_what_is_remembered_goes():
    a = Attribution(DetectConfig(tolerate_after=10.0))
    for t in range(12):
        a.observe(float(t), [RAIL, READS] if t < 11 else [RAIL], at_level=True)
    a.new_job()
    assert set(a.traces) == {RAIL.key}
    assert a.scores()["network"] == pytest.approx(0.3), "the rail the last job did without"


def test_a_checkpoint_stalled_from_its_first_byte_is_seen_from_the_page_cache():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(0, client=512e6), False)  # handed to the page cache, nothing reaches the NAS
    m = t.mounts["/mnt/ckpt"]
    assert m.active is not None
    tick(t, clock, mount.write(0), True)
    assert m.active.unflushed >= 500e6 and not m.active.stalled
    for _ in range(21):
        tick(t, clock, mount.write(0), True)
    assert m.active.stalled


def test_evidence_not_yet_measured_is_not_evidence_gone():
    """After a restart (a window needs two samples) the carried cause's evidence is missing, not gone:
    it must not turn into `host` before every source has been measured."""
    d = Engine(DetectConfig())
    d.resume(0.0, "network", cold=False)
    for t in (1.0, 2.0, 3.0):
        assert d.update(t, 0.1, True, 0.9, NO, NO, measured=False) == "network"
    d.update(4.0, 0.1, True, 0.9, NO, NO)
    assert d.update(5.0, 0.1, True, 0.9, NO, NO) == "host", "measured and still absent: gone"


def test_a_verdict_whose_level_is_learned_again_ends_by_the_cold_rules():
    """GPM refused mid-incident (a profiler attached): the level is learned again on the other scale;
    the verdict held meanwhile must still end when the GPUs are back."""
    d = Engine(DetectConfig(recover_after=3.0))
    quiet = dict(NO)
    assert [d.update(float(t), 0.1, True, 0.9, quiet, quiet) for t in range(3)][-1] == "host"
    assert d.update(3.0, 0.1, True, None, quiet, quiet) == "host", "still starved, level unknown"
    causes = [d.update(float(t), 0.95, True, None, quiet, quiet) for t in range(4, 9)]
    assert causes[-1] is None


def test_evidence_that_flickers_while_the_gpus_starve_does_not_flip_the_verdict_each_gap():
    """A NAS slow 4 s out of 8 with the loaders' buffers long drained: the first gap may read `host`
    (it could be the NAS recovered and the input pipeline at fault); once the evidence came back after
    a gap, gaps are its own and the verdict stays `storage`."""
    d = Engine(DetectConfig(recover_after=3.0, flap_factor=3.0))
    quiet = dict(NO)
    slow = {**quiet, "storage": 3.0}
    causes = []
    for t in range(80):
        fresh = slow if t % 8 < 4 else quiet
        remembered = {**quiet, "storage": 3.0 - 0.2 * (t % 8 - 3)} if t % 8 >= 4 else slow
        causes.append(d.update(float(t), 0.1, True, 0.9, remembered, fresh))
    changes = sum(1 for a, b in zip(causes, causes[1:]) if a != b)
    assert causes[-1] == "storage" and changes <= 3, causes
    assert causes[20:].count("host") == 0


# -- the engine's numbers, each stated here and measured through behaviour ----------------------------
# (detect/policy.py holds them; a test that imported them would agree with any change)

def engine(**kw) -> Engine:
    return Engine(DetectConfig(**{"recover_after": 3.0, "flap_factor": 3.0, **kw}))


def run(e: Engine, ticks, level: float | None = 0.9) -> list[str | None]:
    """Tick `e` once a second from t=0 over (busy, scores, now) rows; the causes it holds after each."""
    return [e.update(float(t), busy, True, level, scores(**s), scores(**n)) for t, (busy, s, n) in enumerate(ticks)]


def test_the_signal_table():
    """Every kind of evidence: its cause, the [detect] key it is measured against, and how it is weighed."""
    from stoker.detect.policy import SIGNALS
    rows = {kind: (s.cause, s.threshold, s.prefetched, s.present_only, s.of_the_job) for kind, s in SIGNALS.items()}
    assert rows == {
        "port_down": ("network", None, False, False, False),
        "link_down": ("network", None, False, False, False),
        "congestion": ("network", "cnp_per_second", False, False, False),
        "retransmits": ("network", "retransmits_per_second", False, False, False),
        "pfc_pause": ("network", "pause_ratio", False, False, False),
        "read_latency": ("storage", "read_latency_seconds", True, False, False),
        "read_queue": ("storage", "read_queue_seconds", True, False, False),
        "reads_stalled": ("storage", "reads_stalled_after", True, False, True),
        "write_latency": ("storage", "write_latency_seconds", False, False, False),
        "probe_slow": ("storage", "probe_latency_seconds", True, False, False),
        "probe_hung": ("storage", "probe_hung_seconds", True, False, False),
        "checkpoint_write_latency": ("checkpoint", "write_latency_seconds", False, True, False),
        "checkpoint": ("checkpoint", None, False, True, False),
        "cpu_pressure": ("host", "cpu_pressure_ratio", False, False, False),
        "memory_pressure": ("host", "memory_pressure_ratio", False, False, False),
    }


def test_the_cause_table():
    """The causes in their tie order: a checkpoint preempts and is not damped; host is the residual."""
    from stoker.detect.policy import CAUSES
    assert [(c.name, c.preempts, c.damped, c.residual) for c in CAUSES] == [
        ("storage", False, True, False), ("network", False, True, False),
        ("checkpoint", True, False, False), ("host", False, True, True)]
    e = engine()
    assert run(e, [(0.1, {"storage": 2.0, "network": 2.0}, {"storage": 2.0, "network": 2.0})]) == ["storage"], \
        "a tie goes to the first in the table"


@pytest.mark.parametrize("strength, weight", [
    (1.0, 1.0), (2.0, 2.0), (4.0, 3.0), (8.0, 4.0), (16.0, 5.0), (1000.0, 5.0), (0.5, 1.0)])
def test_a_signal_weighs_one_more_per_doubling_up_to_five(strength, weight):
    from stoker.detect.attribution import strength_score
    assert strength_score(Signal("congestion", "mlx5_0/1", strength, "")) == pytest.approx(weight)


def test_an_open_checkpoint_weighs_six():
    from stoker.detect.attribution import strength_score
    assert strength_score(Signal("checkpoint", "/mnt/ckpt", 1.0, "")) == 6.0


@pytest.mark.parametrize("grown_to, weight", [(8.0, 0.4), (8.5, 1 + 3.087)])
def test_tolerated_evidence_weighs_a_tenth_until_it_grows_past_twice(grown_to, weight):
    a = Attribution(DetectConfig(tolerate_after=10.0))
    for t in range(11):
        a.observe(float(t), [RAIL], at_level=True)  # strength 4 for 10 s at the level
    a.observe(11.0, [Signal("port_down", "mlx5_3/1", grown_to, "")], at_level=False)
    assert a.scores()["network"] == pytest.approx(weight, abs=0.01)


@pytest.mark.parametrize("seconds, weight", [(9, 3.0), (10, 1.5), (119, 1.5), (120, 0.3)])
def test_a_slow_nas_at_the_level_weighs_full_then_half_then_a_tenth(seconds, weight):
    a = Attribution(DetectConfig(tolerate_after=10.0, prefetch_hides=120.0))
    for t in range(seconds + 1):
        a.observe(float(t), [READS], at_level=True)  # strength 4: score 3
    assert a.scores()["storage"] == pytest.approx(weight)


@pytest.mark.parametrize("now, cause", [(2.0, "network"), (1.99, None)])
def test_a_cold_start_names_a_cause_only_twice_past_its_threshold(now, cause):
    e = engine()
    assert run(e, [(0.2, {"network": now}, {"network": now})], level=None) == [cause]


@pytest.mark.parametrize("score, causes", [(1.0, ["storage", "storage"]), (0.99, [None, "host"])])
def test_a_score_of_one_explains_a_drop_and_nothing_explained_is_host_on_the_second_low_sample(score, causes):
    e = engine()
    assert run(e, [(0.1, {"storage": score}, {"storage": score})] * 2) == causes


def test_host_is_named_on_the_second_low_sample_only_when_every_source_was_measured():
    e = engine()
    assert e.update(0.0, 0.1, True, 0.9, NO, NO, measured=False) is None
    assert e.update(1.0, 0.1, True, 0.9, NO, NO, measured=False) is None
    assert e.update(2.0, 0.1, True, 0.9, NO, NO) == "host"


def test_a_cause_only_remembered_while_the_gpus_starve_resolves_after_recover_after():
    e = engine()
    slow = {"storage": 3.0}
    causes = run(e, [(0.1, slow, slow)] + [(0.1, slow, {})] * 6)
    assert causes == ["storage", "storage", "storage", "storage", "host", "host", "host"]
    assert e.causes["storage"].state == "resolved"


def test_a_cause_that_came_back_after_resolving_resolves_flap_factor_times_later():
    e = engine()
    slow = {"storage": 3.0}
    causes = run(e, [(0.1, slow, slow)] + [(0.1, slow, {})] * 4 + [(0.1, slow, slow)] + [(0.1, slow, {})] * 10)
    assert causes[4] == "host" and causes[5] == "storage"
    assert causes[6:] == ["storage"] * 9 + ["host"], "9 s absent (3 x 3 s), not 3"


def test_the_resolving_clock_stops_while_the_gpus_are_back():
    """An intermittent NAS whose evidence trails the GPUs by a tick: a gap spent recovering is not its
    absence while they starve (the field case nas-slow-8-of-14-evidence-lags)."""
    e = engine()
    slow = {"storage": 3.0}
    rows = [(0.1, slow, slow), (0.1, slow, {}), (0.9, slow, {}), (0.9, slow, {}), (0.9, slow, {}),
            (0.1, slow, {}), (0.1, slow, slow)]
    assert run(e, rows) == ["storage"] * 7


@pytest.mark.parametrize("rival, switched_at", [(3.0, 3), (2.99, None)])
def test_a_present_cause_replaces_another_outranking_it_one_and_a_half_times_for_recover_after(rival, switched_at):
    e = engine()
    both = {"storage": 2.0, "network": rival}
    causes = run(e, [(0.1, {"storage": 2.0}, {"storage": 2.0})] + [(0.1, both, both)] * 5)
    expected = ["storage"] * 6 if switched_at is None else ["storage"] * (switched_at + 1) + ["network"] * (5 - switched_at)
    assert causes == expected


def test_a_present_cause_heavier_than_a_remembered_one_replaces_it_on_the_second_sample():
    e = engine()
    causes = run(e, [(0.1, {"storage": 2.0}, {"storage": 2.0}),
                     (0.1, {"storage": 2.0, "network": 2.5}, {"network": 2.5}),
                     (0.1, {"storage": 2.0, "network": 2.5}, {"network": 2.5})])
    assert causes == ["storage", "storage", "network"]


def test_a_weaker_present_cause_replaces_a_remembered_one_after_recover_after():
    e = engine()
    rows = [(0.1, {"storage": 3.0}, {"storage": 3.0})] + [(0.1, {"storage": 3.0, "network": 1.5}, {"network": 1.5})] * 4
    assert run(e, rows) == ["storage"] * 4 + ["network"]


def test_a_checkpoint_preempts_at_once_and_host_yields_at_once():
    e = engine()
    both = {"storage": 3.0, "checkpoint": 6.0}
    assert run(e, [(0.1, {"storage": 3.0}, {"storage": 3.0}), (0.1, both, both)]) == ["storage", "checkpoint"]
    e = engine()
    assert run(e, [(0.1, {}, {}), (0.1, {}, {}), (0.1, {"network": 1.0}, {"network": 1.0})]) == \
        [None, "host", "network"]


@pytest.mark.parametrize("flap_window, clears_after", [(30.0, 9), (5.0, 3)])
def test_a_verdict_clears_after_recover_after_back_and_flap_factor_times_that_when_it_came_back(flap_window,
                                                                                                clears_after):
    e = engine(flap_window=flap_window)
    slow = {"storage": 3.0}
    assert run(e, [(0.1, slow, slow)] + [(0.9, {}, {})] * 4)[-1] is None, "the first time: 3 s after it is back"
    causes = [e.update(float(t), busy, True, 0.9, scores(**s), scores(**s))
              for t, (busy, s) in enumerate([(0.1, slow)] + [(0.9, {})] * 12, start=9)]
    assert causes.index(None) == clears_after + 1, causes  # ended at t=4, back at 9: 5 s later


def test_a_checkpoint_verdict_is_never_damped():
    e = engine()
    ck = {"checkpoint": 6.0}
    run(e, [(0.1, ck, ck)] + [(0.9, {}, {})] * 4)
    causes = [e.update(float(t), busy, True, 0.9, scores(**s), scores(**s))
              for t, (busy, s) in enumerate([(0.1, ck)] + [(0.9, {})] * 4, start=10)]
    assert causes == ["checkpoint", "checkpoint", "checkpoint", "checkpoint", None]


def test_a_host_verdict_in_the_band_is_the_new_normal_after_ten_times_recover_after_then_recovers():
    e = engine()
    causes = run(e, [(0.1, {}, {})] * 2 + [(0.65, {}, {})] * 40)
    assert causes.index(None, 2) == 2 + 30 + 3, causes


def test_one_low_sample_does_not_restart_the_new_normal_clock_and_two_do():
    one = run(engine(), [(0.1, {}, {})] * 2 + [(0.65, {}, {})] * 10 + [(0.1, {}, {})] + [(0.65, {}, {})] * 30)
    assert one.index(None, 2) == 2 + 30 + 3, "the dip's second is in the count"
    two = run(engine(), [(0.1, {}, {})] * 2 + [(0.65, {}, {})] * 10 + [(0.1, {}, {})] * 2 + [(0.65, {}, {})] * 40)
    assert two.index(None, 2) == 2 + 10 + 2 + 30 + 3


def test_a_strong_cause_in_the_band_is_not_a_new_normal():
    e = engine()
    slow = {"storage": 2.0}
    assert set(run(e, [(0.1, slow, slow)] + [(0.65, slow, slow)] * 60)) == {"storage"}
    e = engine()
    weak = {"storage": 1.99}
    assert run(e, [(0.1, weak, weak)] + [(0.65, weak, weak)] * 60)[-1] is None


@pytest.mark.parametrize("busy, cause", [(0.39, "storage"), (0.41, None)])
def test_a_cold_verdict_recovers_at_twice_its_starved_level(busy, cause):
    e = engine()
    slow = {"storage": 3.0}
    causes = run(e, [(0.2, slow, slow)] * 3 + [(busy, slow, slow)] * 4, level=None)
    assert causes[-1] == cause


def test_a_cold_verdict_of_idle_gpus_recovers_at_the_cold_floor_and_idle_samples_are_not_its_level():
    e = engine()
    slow = {"storage": 3.0}
    assert run(e, [(0.0, slow, slow)] * 3 + [(0.45, slow, slow)] * 4, level=None)[-1] == "storage", "cold floor"
    e = engine()
    assert run(e, [(0.06, slow, slow)] * 3 + [(0.11, slow, slow)] * 4, level=None)[-1] == "storage"
    e = engine()
    assert run(e, [(0.06, slow, slow)] * 3 + [(0.13, slow, slow)] * 4, level=None)[-1] is None, "twice 0.06"
    e = engine()
    assert run(e, [(0.04, slow, slow)] * 5 + [(0.06, slow, slow)] * 3 + [(0.11, slow, slow)] * 4,
               level=None)[-1] == "storage", "the idle samples (0.04) are left out of its level: 0.06, not 0.04"


def test_a_cold_verdicts_starved_level_is_the_median_of_its_last_300_samples():
    e = engine()
    slow = {"storage": 3.0}
    run(e, [(0.3, slow, slow)] * 300 + [(0.1, slow, slow)] * 150, level=None)
    assert e.starvation.cold_line() == pytest.approx(0.4)
    assert run(e, [(0.45, slow, slow)] * 4, level=None)[-1] is None


def test_a_cold_verdict_ends_when_its_evidence_goes_never_host():
    """A 28% job started into a congested fabric: once the congestion clears, no `host` (the field case
    cold-start-small-job-into-congestion)."""
    e = engine()
    hot = {"network": 3.0}
    causes = run(e, [(0.28, hot, hot)] * 5 + [(0.28, hot, {})] * 12, level=None)
    assert "host" not in causes and causes[-1] is None
    assert causes.index(None) == 5 + 3 + 3, "resolved after 3 s starved without it, then 3 s of recovery"


def test_a_cold_verdict_passes_to_another_strong_cause_when_its_own_ends():
    e = engine()
    causes = run(e, [(0.0, {"checkpoint": 6.0}, {"checkpoint": 6.0}), (0.0, {"network": 2.0}, {"network": 2.0})],
                 level=None)
    assert causes == ["checkpoint", "network"]


def test_the_busy_ratio_judgement_lines():
    from stoker.detect.starvation import Starvation
    s = Starvation(DetectConfig())
    assert [s.judge(b, 1.0) for b in (0.04, 0.49, 0.5, 0.79, 0.8)] == ["low", "low", "band", "band", "back"]
    assert s.judge(0.049, 0.06) == "low", "idle, whatever the level"
    assert [s.judge(b, None) for b in (0.49, 0.5)] == ["low", "back"]
    assert s.usable(0.04) is None and s.usable(0.05) == 0.05
    assert [s.waiting(b, None) for b in (0.09, 0.1)] == [True, False]
    assert [s.at_level(b, None) for b in (0.49, 0.5)] == [False, True]
    assert [s.at_level(b, 1.0) for b in (0.79, 0.8)] == [False, True]
    assert [s.at_level(b, 0.5) for b in (0.39, 0.4)] == [False, True]
    assert [s.judge(b, 0.5) for b in (0.24, 0.25, 0.39, 0.4)] == ["low", "band", "band", "back"]
    assert s.judge(0.05, 0.06) == "back", "at the idle floor is not below it"


def test_a_job_level_needs_ten_samples():
    job = JobTracker(DetectConfig())
    job.update(0.0, snapshot((100, 101)))
    for t in range(9):
        job.remember(float(t), 0.9)
    assert job.baseline() is None
    job.remember(9.0, 0.9)
    assert job.baseline() == 0.9


def test_port_strengths():
    from stoker.detect.evidence import PORT_DOWN, PORT_NEVER_UP
    assert (PORT_DOWN, PORT_NEVER_UP) == (4.0, 2.0)


def test_a_sample_back_between_two_low_ones_restarts_the_lag():
    assert run(engine(), [(0.1, {}, {}), (0.9, {}, {}), (0.1, {}, {}), (0.1, {}, {})]) == [None, None, None, "host"]


def test_another_job_restarts_the_lag():
    e = engine()
    assert e.update(0.0, 0.1, True, 0.9, NO, NO) is None
    assert e.update(1.0, 0.1, False, 0.9, NO, NO) is None, "no job"
    assert e.update(2.0, 0.1, True, 0.9, NO, NO) is None
    assert e.update(3.0, 0.1, True, 0.9, NO, NO) == "host"
    assert e.update(4.0, None, True, 0.9, NO, NO) is None, "no busy ratio (NVML did not answer): no verdict"


def test_the_resolving_clock_starts_on_low_samples_not_in_the_band():
    s = {"storage": 3.0}
    causes = run(engine(), [(0.1, s, s), (0.65, s, {}), (0.65, s, {}), (0.65, s, {}), (0.1, s, {}), (0.1, s, {}),
                            (0.1, s, {}), (0.1, s, {})])
    assert causes == ["storage"] * 7 + ["host"]


def test_a_resolved_cause_stays_resolved_until_present_again():
    s = {"storage": 3.0}
    causes = run(engine(), [(0.1, s, s)] + [(0.1, s, {})] * 4 + [(0.9, s, {}), (0.1, s, {})])
    assert causes[4:] == ["host", "host", "host"]


def test_a_cause_whose_evidence_is_gone_turns_host_only_once_every_source_was_measured():
    e = engine()
    s = {"storage": 3.0}
    e.update(0.0, 0.1, True, 0.9, scores(**s), scores(**s))
    assert [e.update(float(t), 0.1, True, 0.9, NO, NO, measured=False) for t in (1, 2, 3)] == ["storage"] * 3
    assert e.update(4.0, 0.1, True, 0.9, NO, NO) == "host"


def test_a_cold_start_takes_the_strongest_cause_present():
    assert run(engine(), [(0.2, {"network": 2.5, "storage": 3.0}, {"network": 2.5, "storage": 3.0})],
               level=None) == ["storage"]


def test_a_checkpoint_preempts_only_strong_now():
    both = {"storage": 1.0, "checkpoint": 2.0}
    assert run(engine(), [(0.1, {"storage": 1.0}, {"storage": 1.0}), (0.1, both, both)]) == ["storage", "checkpoint"]
    weak = {"storage": 1.0, "checkpoint": 1.9}
    assert run(engine(), [(0.1, {"storage": 1.0}, {"storage": 1.0})] + [(0.1, weak, weak)] * 4) == \
        ["storage"] * 4 + ["checkpoint"], "not strong: it challenges as any cause does"


def test_a_present_cause_as_heavy_as_a_remembered_one_waits_recover_after():
    rows = [(0.1, {"storage": 2.5}, {"storage": 2.5})] + [(0.1, {"storage": 2.5, "network": 2.5}, {"network": 2.5})] * 4
    assert run(engine(), rows) == ["storage"] * 4 + ["network"]


def test_starved_seconds_count_the_time_each_cause_held():
    e = engine()
    s = {"storage": 3.0}
    for t in (0.0, 0.5, 1.0):
        e.update(t, 0.1, True, 0.9, scores(**s), scores(**s))
    assert e.seconds == {"storage": 1.0, "network": 0.0, "checkpoint": 0.0, "host": 0.0}
    e.update(1.5, 0.1, False, 0.9, NO, NO)
    e.update(2.0, 0.1, False, 0.9, NO, NO)
    assert e.seconds["storage"] == 1.5, "the tick that ends it counts, nothing after"


def test_a_cold_verdicts_first_sample_is_in_its_starved_level():
    s = {"storage": 3.0}
    assert engine().starvation.cold_line() == 0.5, "no verdict: the cold floor"
    e = engine()
    assert run(e, [(0.1, s, s), (0.15, s, s), (0.27, s, s)], level=None) == ["storage"] * 3
    assert e.starvation.state == "recovering", "twice the median of 0.1 and 0.15: 0.25"


def test_in_the_band_a_cause_gone_recovers_only_once_measured():
    e = engine()
    s = {"storage": 3.0}
    e.update(0.0, 0.1, True, 0.9, scores(**s), scores(**s))
    assert [e.update(float(t), 0.65, True, 0.9, NO, NO, measured=False) for t in range(1, 6)] == ["storage"] * 5


def test_the_gpu_machine_lines_for_the_collector():
    from stoker.detect.starvation import Starvation
    s = Starvation(DetectConfig())
    assert [s.low(b, 1.0) for b in (0.49, 0.5)] == [True, False]
    assert s.low(0.049, 0.06) and not s.low(0.05, 0.06)
    assert not s.low(0.0, None) and not s.low(0.0, 0.04), "no usable level: never low by it"
    assert [s.waiting(b, 1.0) for b in (0.49, 0.5)] == [True, False]
    assert not s.at_level(None, 1.0)
    s.begin(cold=False)
    assert not s.at_level(1.0, 1.0), "a verdict holds: the GPUs are not at their level over the window"


def test_what_a_signal_says_to_the_operator():
    a = Attribution(DetectConfig(evidence_memory=10.0))
    a.observe(0.0, [READS, RAIL], at_level=False)
    a.observe(5.0, [RAIL], at_level=False)
    assert a.reasons("storage") == ["/mnt/data: READ takes 80 ms (5 s ago)"]
    assert a.reasons("network") == ["mlx5_3/1 down"]
    assert a.current() == [RAIL]
    a.observe(10.0, [], at_level=False)
    assert (READS.key in a.traces, a.scores()["storage"]) == (True, 0.0), "kept, weightless, at exactly the memory"
    a.observe(10.5, [], at_level=False)
    assert READS.key not in a.traces


def test_evidence_about_the_last_jobs_reads_is_dropped_at_a_job_change():
    a = Attribution(DetectConfig())
    stalled = Signal("reads_stalled", "/mnt/data", 3.0, "")
    a.observe(0.0, [stalled, RAIL], at_level=False)
    a.new_job()
    assert set(a.traces) == {RAIL.key}


def test_a_level_saved_by_the_last_run_is_known_at_once():
    job = JobTracker(DetectConfig())
    job.update(0.0, snapshot((100, 101)))
    job.seed(50.0, 0.8)
    assert job.baseline() == 0.8


def test_a_job_level_is_the_median_of_the_last_baseline_window():
    job = JobTracker(DetectConfig(baseline_window=20.0))
    job.update(0.0, snapshot((100, 101)))
    for t in range(15):
        job.remember(float(t), 0.9)
    for t in range(15, 30):
        job.remember(float(t), 0.5)
    assert job.baseline() == 0.5 and len(job.history) == 21, "t=9 to 29"


def test_a_job_level_is_the_median_as_samples_enter_and_leave_the_window():
    """The level is kept in order as samples come and go (a lookup each tick, not a sort of 300): at every
    tick it is what statistics.median of the window gives, ties and even counts included."""
    import statistics
    rng = random.Random(23)
    job = JobTracker(DetectConfig(baseline_window=25.0))
    for t in range(300):
        job.remember(float(t), rng.choice([0.5, 0.9, round(rng.random(), 2)]))
        window = [b for _, b in job.history]
        assert job.baseline() == (statistics.median(window) if len(window) >= 10 else None), t
    job.remember(300.0, float("nan"))
    assert len(job.history) == 26, "a NaN is no level"
    job.forget_level()
    assert job.baseline() is None and not job.history
    for t in range(10):
        job.remember(400.0 + t, 0.7)
    assert job.baseline() == 0.7, "learned afresh"


def test_a_verdict_carried_over_a_restart_resolves_as_any_other():
    """Carried, its cause has not come back after resolving: 3 s absent, not 9."""
    e = engine()
    e.new_job()
    e.resume(0.0, "storage", cold=False)
    s = {"storage": 3.0}
    assert run(e, [(0.1, s, {})] * 5)[1:] == ["storage", "storage", "host", "host"]


def test_host_with_evidence_of_its_own_is_challenged_as_any_cause():
    cpu = {"host": 2.0}
    both = {"host": 2.0, "network": 2.5}
    assert run(engine(), [(0.1, cpu, cpu)] + [(0.1, both, both)] * 5) == ["host"] * 6, "2.5 is not 1.5 x 2.0"


def test_host_without_evidence_does_not_yield_to_a_cause_only_remembered():
    assert run(engine(), [(0.1, {}, {}), (0.1, {}, {})] + [(0.1, {"storage": 2.0}, {})] * 3) == \
        [None] + ["host"] * 4


def test_a_cause_damped_when_it_comes_back_within_the_flap_window_at_any_hour():
    e = engine()
    slow = {"storage": 3.0}
    for t in range(1000, 1005):
        e.update(float(t), 0.1 if t == 1000 else 0.9, True, 0.9, scores(**slow) if t == 1000 else NO, NO)
    assert e.cause is None and e.arbiter.ended == ("storage", 1004.0)
    causes = [e.update(float(t), 0.1 if t == 1014 else 0.9, True, 0.9, scores(**slow) if t == 1014 else NO, NO)
              for t in range(1014, 1025)]
    assert causes == ["storage"] * 10 + [None], "back 10 s after it ended: 9 s to clear"


def test_a_checkpoint_that_ended_leaves_host_on_the_second_low_sample():
    ck = {"checkpoint": 6.0}
    assert run(engine(), [(0.1, ck, ck), (0.1, {}, {}), (0.1, {}, {})]) == ["checkpoint", "checkpoint", "host"]


def test_nothing_changes_cause_while_the_gpus_are_in_the_band():
    s, both = {"storage": 2.0}, {"storage": 2.0, "network": 3.0}
    causes = run(engine(), [(0.1, s, s)] + [(0.65, both, both)] * 5 + [(0.1, both, both)] * 4)
    assert causes == ["storage"] * 9 + ["network"], "the challenge starts at the first low sample"


def test_a_carried_verdict_recovers_undamped_unless_saved_as_a_return():
    e = engine()
    e.resume(0.0, "storage", cold=False)
    assert run(e, [(0.9, {}, {})] * 4)[-1] is None


def test_a_carried_verdict_whose_cause_shows_again_is_not_a_return():
    e = engine()
    e.new_job()
    e.resume(0.0, "storage", cold=False)
    s = {"storage": 3.0}
    assert run(e, [(0.1, s, s)] + [(0.1, s, {})] * 4)[-1] == "host"


def test_a_cause_at_exactly_one_is_not_gone():
    e = engine()
    s, one = {"storage": 3.0}, {"storage": 1.0}
    assert run(e, [(0.1, s, s)] + [(0.65, one, one)] * 8)[-1] == "storage"


def test_a_verdict_passed_on_without_a_level_is_still_starved():
    e = engine()
    run(e, [(0.0, {"checkpoint": 6.0}, {"checkpoint": 6.0}), (0.0, {"network": 2.0}, {"network": 2.0})], level=None)
    assert (e.cause, e.starvation.state, e.starvation.cold) == ("network", "low", True)
    e = engine()
    run(e, [(0.1, {"network": 2.0}, {"network": 2.0})])
    assert (e.cause, e.starvation.cold) == ("network", False)


def test_a_cold_verdict_is_not_passed_to_a_weak_cause():
    causes = run(engine(), [(0.0, {"checkpoint": 6.0}, {"checkpoint": 6.0})] + [(0.0, {"network": 1.5},
                                                                                 {"network": 1.5})] * 4, level=None)
    assert causes == ["checkpoint", "checkpoint", "checkpoint", "checkpoint", None], "it recovers: 3 s"


def test_a_cold_verdicts_level_counts_samples_at_the_idle_floor():
    e = engine()
    s = {"storage": 3.0}
    run(e, [(0.05, s, s)] * 3, level=None)
    assert e.starvation.cold_line() == pytest.approx(0.1)


def test_toleration_counts_seconds_not_samples():
    a = Attribution(DetectConfig(tolerate_after=10.0))
    for k in range(20):
        a.observe(k * 0.5, [RAIL], at_level=True)  # 9.5 s at the level
    assert a.scores()["network"] == pytest.approx(3.0)
    a.observe(10.0, [RAIL], at_level=True)
    assert a.scores()["network"] == pytest.approx(0.3)


def test_a_signal_back_within_the_memory_keeps_what_was_tolerated():
    a = Attribution(DetectConfig(tolerate_after=10.0, evidence_memory=15.0))
    for t in range(11):
        a.observe(float(t), [RAIL], at_level=True)
    a.observe(25.0, [RAIL], at_level=False)
    assert a.scores()["network"] == pytest.approx(0.3), "15 s later: the same trace"
    a.observe(40.5, [RAIL], at_level=False)
    assert a.scores()["network"] == pytest.approx(3.0), "forgotten: a new one"


def test_reasons_come_strongest_first_and_weightless_ones_are_left_out():
    a = Attribution(DetectConfig(evidence_memory=10.0))
    queue = Signal("read_queue", "/mnt/data", 2.0, "queued")
    a.observe(0.0, [queue, READS], at_level=False)
    assert a.reasons("storage") == ["/mnt/data: READ takes 80 ms", "queued"]
    a.observe(1.0, [queue], at_level=False)
    a.observe(11.0, [], at_level=False)
    assert a.reasons("storage") == [] and queue.key in a.traces, "10 s old: kept, weightless, not a reason"


# -- evidence: what each source's window measures -----------------------------------------------------
# (mountstats fields as Linux's fs/nfs/iostat.h and net/sunrpc/stats.c give them: per operation, ops,
# queue and execute milliseconds; PSI `some` totals in microseconds, here in seconds as the source keeps them)

from stoker.detect.evidence import EvidenceTracker  # noqa: E402
from stoker.detect.view import NodeView, ProbeState  # noqa: E402
from stoker.sources.netdev import NetInterface, NetSnapshot  # noqa: E402
from stoker.sources.pressure import PressureSnapshot  # noqa: E402


def nfs(read_ops: float, read_exec_ms: float, read_queue_ms: float = 0.0, write_ops: float = 0.0,
        write_exec_ms: float = 0.0, role: str = "data", mountpoint: str = "/mnt/data") -> NfsSnapshot:
    return NfsSnapshot([NfsSample(mountpoint, "nas:/x", "4.1", "tcp", 1, role, ops={
        "READ": {"ops": read_ops, "execute_ms": read_exec_ms, "queue_ms": read_queue_ms},
        "WRITE": {"ops": write_ops, "execute_ms": write_exec_ms, "queue_ms": 0.0}})])


def kinds(signals) -> dict[str, float]:
    return {s.kind: round(s.strength, 3) for s in signals}


def test_nfs_reads_are_judged_per_operation_over_the_window():
    ev = EvidenceTracker(DetectConfig())  # 20 ms per READ executing, 10 ms queued
    assert ev.signals(NodeView(0.0, nfs=nfs(100, 0))) == [] and not ev.measured()
    assert kinds(ev.signals(NodeView(1.0, nfs=nfs(200, 4000, 1500)))) == {"read_latency": 2.0, "read_queue": 1.5}
    assert ev.measured()
    assert kinds(ev.signals(NodeView(2.0, nfs=nfs(300, 6000, 2500)))) == {}, "20 ms and 10 ms: at, not past"


def test_a_data_mount_that_stops_completing_reads_is_stalled_reads():
    ev = EvidenceTracker(DetectConfig(reads_stalled_after=1.0))
    for t, ops in ((0.0, 100), (1.0, 200), (2.0, 300), (3.0, 300), (5.0, 300)):
        signals = ev.signals(NodeView(t, nfs=nfs(ops, ops * 5)))
    assert kinds(signals) == {"reads_stalled": 3.0}, "seen completing reads by t=2, none since: 3 s"
    ev.new_job()
    assert kinds(ev.signals(NodeView(5.0, nfs=nfs(300, 1500)))) == {}, "the gone job's reads are not the next one's"
    other = EvidenceTracker(DetectConfig())
    for t, ops in ((0.0, 100), (1.0, 200), (2.0, 300), (3.0, 300), (5.0, 300)):
        signals = other.signals(NodeView(t, nfs=nfs(ops, ops * 5, role="other", mountpoint="/mnt/logs")))
    assert signals == [], "only a data mount's reads are the job's input"
    idle = EvidenceTracker(DetectConfig())
    for t in (0.0, 1.0, 2.0, 9.0):
        signals = idle.signals(NodeView(t, nfs=nfs(100, 500)))
    assert signals == [], "never seen reading: not stalled (and no READ in a window: no latency)"


def test_writes_are_the_checkpoints_on_a_checkpoint_mount_and_storages_elsewhere():
    for role, kind in (("checkpoint", "checkpoint_write_latency"), ("data", "write_latency")):
        ev = EvidenceTracker(DetectConfig())  # 100 ms per WRITE
        ev.signals(NodeView(0.0, nfs=nfs(0, 0, role=role, write_ops=10)))
        assert kinds(ev.signals(NodeView(1.0, nfs=nfs(0, 0, role=role, write_ops=20, write_exec_ms=3000)))) == \
            {kind: 3.0}


def test_a_snapshot_seen_again_is_no_new_window_and_a_source_gone_says_nothing():
    ev = EvidenceTracker(DetectConfig())
    ev.signals(NodeView(0.0, nfs=nfs(100, 0)))
    slow = nfs(200, 4000)
    assert kinds(ev.signals(NodeView(1.0, nfs=slow))) == {"read_latency": 2.0}
    assert kinds(ev.signals(NodeView(2.0, nfs=slow))) == {"read_latency": 2.0}, "held, not measured again"
    assert ev.signals(NodeView(3.0)) == []


def test_a_window_is_as_long_as_between_the_collectors_samples():
    ev = EvidenceTracker(DetectConfig(cpu_pressure_ratio=0.4))
    ev.signals(NodeView(10.0, host=PressureSnapshot({"cpu": 1.0}), sampled={"host": 0.0}))
    signals = ev.signals(NodeView(11.0, host=PressureSnapshot({"cpu": 2.6}), sampled={"host": 2.0}))
    assert kinds(signals) == {"cpu_pressure": 2.0}, "1.6 s waited in the 2 s between its samples: 80%"


def test_host_pressure_for_cpu_and_memory():
    ev = EvidenceTracker(DetectConfig(cpu_pressure_ratio=0.4, memory_pressure_ratio=0.2))
    ev.signals(NodeView(0.0, host=PressureSnapshot({"cpu": 10.0, "memory": 5.0})))
    assert kinds(ev.signals(NodeView(1.0, host=PressureSnapshot({"cpu": 10.5, "memory": 5.3})))) == \
        {"cpu_pressure": 1.25, "memory_pressure": 1.5}


def test_probes_slow_and_hung():
    ev = EvidenceTracker(DetectConfig(probe_latency_seconds=1.0, probe_hung_seconds=5.0))
    probe = ProbeState("/mnt/data", 10.0, {"write": 0.01, "read": 3.0})
    assert kinds(ev.signals(NodeView(0.0, probes=[probe]))) == {"probe_hung": 2.0, "probe_slow": 3.0}
    assert ev.signals(NodeView(1.0, probes=[ProbeState("/mnt/data", 0.0, {})])) == []


def test_a_link_that_goes_down_and_pfc_pauses():
    ev = EvidenceTracker(DetectConfig(pause_ratio=0.02))
    up = NetInterface("eth3", True, pause_seconds={("3", "rx"): 1.0, ("3", "tx"): 0.0})
    ev.signals(NodeView(0.0, net=NetSnapshot([up])))
    paused = NetInterface("eth3", True, pause_seconds={("3", "rx"): 1.05, ("3", "tx"): 9.0})
    assert kinds(ev.signals(NodeView(1.0, net=NetSnapshot([paused])))) == {"pfc_pause": 2.5}, "rx only: 5%"
    down = NetInterface("eth3", False, pause_seconds={("3", "rx"): 1.05})
    assert kinds(ev.signals(NodeView(2.0, net=NetSnapshot([down])))) == {"link_down": 4.0}
    never = EvidenceTracker(DetectConfig())
    never.signals(NodeView(0.0, net=NetSnapshot([NetInterface("eth9", False)])))
    assert never.signals(NodeView(1.0, net=NetSnapshot([NetInterface("eth9", False)]))) == [], \
        "never seen up: no evidence"


def test_the_tables_cannot_be_changed_while_the_agent_runs():
    """Every machine reads the same rows for the agent's life: a row is data, not state."""
    import dataclasses

    from stoker.detect.policy import CAUSES, SIGNALS, TIMINGS, WEIGHTS
    for row, key in ((SIGNALS["congestion"], "cause"), (CAUSES[0], "name"), (WEIGHTS, "strong"), (TIMINGS, "lag")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(row, key, None)


def test_signals_are_values():
    assert len({READS, Signal("read_latency", "/mnt/data", 4.0, "/mnt/data: READ takes 80 ms")}) == 1


def test_a_held_window_of_the_last_jobs_reads_goes_with_it():
    ev = EvidenceTracker(DetectConfig())
    for t, ops in ((0.0, 100), (1.0, 200), (2.0, 300), (3.0, 300)):
        snap = nfs(ops, ops * 5)
        ev.signals(NodeView(t, nfs=snap))
    assert kinds(ev.signals(NodeView(5.0, nfs=nfs(300, 1500)))) == {"reads_stalled": 3.0}
    held = nfs(300, 1500)
    ev.signals(NodeView(6.0, nfs=held))
    ev.new_job()
    assert ev.signals(NodeView(7.0, nfs=held)) == [], "the collector did not sample again: its window is held"


def test_missing_counters_are_no_evidence_and_no_error():
    ev = EvidenceTracker(DetectConfig())
    only_reads = NfsSnapshot([NfsSample("/mnt/data", "nas:/x", "4.1", "tcp", 1, "data",
                                        ops={"READ": {"ops": 100, "execute_ms": 0, "queue_ms": 0}})])
    ev.signals(NodeView(0.0, nfs=only_reads, host=PressureSnapshot({"cpu": 1.0, "memory": 1.0})))
    later = NfsSnapshot([NfsSample("/mnt/data", "nas:/x", "4.1", "tcp", 1, "data",
                                   ops={"READ": {"ops": 200, "execute_ms": 4000, "queue_ms": 0}})])
    assert kinds(ev.signals(NodeView(1.0, nfs=later, host=PressureSnapshot({"cpu": 1.9})))) == \
        {"read_latency": 2.0, "cpu_pressure": 2.25}


def test_rdma_ports_down_and_congestion_from_the_worst_counter():
    from stoker.sources.rdma import RdmaPort, RdmaSnapshot
    ev = EvidenceTracker(DetectConfig(cnp_per_second=500.0))

    def rdma(up: list[bool | None], cnp: float, ecn: float) -> RdmaSnapshot:
        return RdmaSnapshot([RdmaPort(f"mlx5_{i}", "1", f"eth{i}", up=u,
                                      hw_counters={"np_cnp_sent": cnp, "np_ecn_marked_roce_packets": ecn})
                             for i, u in enumerate(up)])
    ev.signals(NodeView(0.0, rdma=rdma([True, True, True, False], 0, 0)))
    signals = ev.signals(NodeView(2.0, rdma=rdma([True, True, True, False], 1000, 4000), sampled={"rdma": 2.0}))
    strengths = {(s.kind, s.source): round(s.strength, 2) for s in signals}
    assert strengths[("port_down", "mlx5_3/1")] == 2.0, "never up, most siblings up"
    assert strengths[("congestion", "mlx5_0/1")] == 4.0, "the ECN marks: 2000 per s over 2 s"
    signals = ev.signals(NodeView(3.0, rdma=rdma([False, True, True, False], 1000, 4000)))
    assert {(s.kind, s.source): s.strength for s in signals if s.kind == "port_down"} == \
        {("port_down", "mlx5_0/1"): 4.0}, "up before, down now: 4; mlx5_3 no longer beside a majority up"
    half = EvidenceTracker(DetectConfig())
    half.signals(NodeView(0.0, rdma=rdma([True, True, False, False], 0, 0)))
    assert [s for s in half.signals(NodeView(1.0, rdma=rdma([True, True, False, False], 0, 0)))
            if s.kind == "port_down"] == [], "half the ports never up: spares, not lost rails"


def test_a_jobs_pids_are_kept_while_they_are_invisible_and_dropped_when_it_goes():
    job = JobTracker(DetectConfig())
    job.update(0.0, snapshot((100, 101)))
    assert not job.update(1.0, snapshot(())), "memory held, PIDs in another namespace: the same job"
    assert job.pids == frozenset({100, 101}) and job.present
    job.update(2.0, snapshot((), memory=1e9))
    assert job.pids == frozenset() and not job.present
    assert not job.update(3.0, None) and not job.present, "no GPU snapshot: no job seen"


def test_a_job_is_present_by_its_processes_or_by_memory_past_the_floor():
    job = JobTracker(DetectConfig(job_memory_floor_bytes=4 << 30))
    assert job.update(0.0, GpuSnapshot([GpuSample(0, "GPU-0", processes=1, pids=(5,), memory_used_bytes=0)]))
    job.update(1.0, None)
    assert not job.update(2.0, GpuSnapshot([GpuSample(0, "GPU-0", processes=0, memory_used_bytes=4 << 30)]))
    assert job.update(3.0, GpuSnapshot([GpuSample(0, "GPU-0", processes=0, memory_used_bytes=(4 << 30) + 1)]))


def test_a_job_works_from_its_first_sample_at_the_idle_floor():
    job = JobTracker(DetectConfig())
    job.update(0.0, snapshot((100,)))
    job.remember(0.0, 0.04)
    assert not job.worked
    job.remember(1.0, 0.05)
    assert job.worked and len(job.history) == 1


def test_a_jobs_last_ten_samples_outlast_the_window():
    job = JobTracker(DetectConfig(baseline_window=20.0))
    job.update(0.0, snapshot((100,)))
    for t in range(10):
        job.remember(float(t), 0.9)
    job.remember(1000.0, 0.9)
    assert len(job.history) == 10 and job.baseline() == 0.9



# -- the checkpoint machine's clocks and lines, at 2 s windows (a window's length must count) ---------

def tick2(t: CheckpointTracker, clock: ManualClock, snap: NfsSnapshot | None, waiting: bool) -> None:
    clock.advance(2.0)
    t.update(snap, waiting)


def test_the_mount_machine_through_a_detected_checkpoint():
    t, clock, mount = tracker(detect_after=4.0, quiet_after=6.0, write_floor_bytes_per_second=1e6)
    tick2(t, clock, mount.write(0), False)
    m = t.mounts["/mnt/ckpt"]
    states = []
    for rate, waiting in ((0, False), (2.5e6, True), (2.5e6, True), (2.5e6, True), (0, True), (0, True), (0, True),
                          (0, False), (0, False)):
        tick2(t, clock, mount.write(2 * rate), waiting)
        states.append(m.state)
    assert states == ["idle", "candidate", "open", "open", "open", "open", "settling", "idle", "idle"]
    assert m.outcomes["completed"] == 1 and m.last_started == 4.0, "opened from the candidate's start"
    assert m.last_duration == 6.0, "ended when its writes did (t=10), not when quiet_after told (t=16)"


def test_writes_at_the_floor_are_quiet():
    t, clock, mount = tracker(write_floor_bytes_per_second=1e6)
    tick2(t, clock, mount.write(0), False)
    for _ in range(4):
        tick2(t, clock, mount.write(2e6), True)
    assert t.mounts["/mnt/ckpt"].state == "idle" and t.mounts["/mnt/ckpt"].usual_rate == 1e6


def test_a_burst_is_past_both_lines():
    for written, state in ((400e6, "idle"), (401e6, "open")):  # 200 MB/s: at the line, not past it
        t, clock, mount = tracker(burst_bytes_per_second=200e6)
        tick2(t, clock, mount.write(0), False)
        tick2(t, clock, mount.write(0), False)
        tick2(t, clock, mount.write(written), False)
        assert t.mounts["/mnt/ckpt"].state == state


def test_the_usual_rate_is_the_median_of_the_last_30_windows():
    t, clock, mount = tracker()
    tick2(t, clock, mount.write(0), False)
    for rate in [50e6] * 16 + [0] * 15:
        tick2(t, clock, mount.write(2 * rate), False)
    assert t.mounts["/mnt/ckpt"].usual_rate == 25e6


def test_data_waits_for_the_server_past_a_mebibyte_or_a_thousandth_of_what_was_written():
    from stoker.detect.checkpoint import Active, _waiting_for_server
    a = Active(0.0, "hint", 0.0, 0.0, 0.0, 0.0)
    a.unflushed = 1 << 20
    assert not _waiting_for_server(a)
    a.unflushed += 1
    assert _waiting_for_server(a)
    a.last_server = 2e9  # 2 GB written: up to 2 MB is rounding
    assert not _waiting_for_server(a)
    a.unflushed = 2e6 + 1
    assert _waiting_for_server(a)


def test_a_stall_is_past_stall_after_and_abandonment_past_abandon_after():
    t, clock, mount = tracker(stall_after=10.0, abandon_after=30.0)
    tick2(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")  # at t=2
    states = []
    for _ in range(16):
        tick2(t, clock, mount.write(0), True)
        states.append(t.mounts["/mnt/ckpt"].state)
    assert states[4:6] == ["open", "stalled"], "10 s without progress at t=12: not yet; 12 s: stalled"
    assert states[13:16] == ["stalled", "stalled", "settling"], "open 30 s at t=32, abandoned past it"
    assert t.mounts["/mnt/ckpt"].outcomes["abandoned"] == 1


def test_over_budget_past_the_budget():
    t, clock, mount = tracker(budget=10.0)
    tick2(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    m = t.mounts["/mnt/ckpt"]
    clock.advance(10.0)
    assert not t.over_budget(m)
    clock.advance(0.5)
    assert t.over_budget(m)
    t.hint_end("/mnt/ckpt", "completed")
    assert not t.over_budget(m) and m.last_duration == 10.5


def test_a_mount_gone_past_stall_after_loses_its_checkpoint():
    t, clock, mount = tracker(stall_after=10.0)
    tick2(t, clock, mount.write(0), False)
    t.hint_start("/mnt/ckpt")
    tick2(t, clock, NfsSnapshot([]), True)  # opened at t=2, gone from t=4
    for _ in range(5):
        tick2(t, clock, NfsSnapshot([]), True)
    assert t.mounts["/mnt/ckpt"].state == "stalled", "10 s gone: not lost yet (12 s without progress: stalled)"
    tick2(t, clock, NfsSnapshot([]), True)
    m = t.mounts["/mnt/ckpt"]
    assert (m.state, m.outcomes["lost"], m.last_duration) == ("settling", 1, 2.0), "ended when it went"


def test_a_start_hint_confirms_a_detected_checkpoint_and_keeps_its_start():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(2e9), False)
    m = t.mounts["/mnt/ckpt"]
    started = m.active.started
    t.hint_start("/mnt/ckpt", expected_bytes=5e9)
    assert (m.active.source, m.active.started, m.active.expected_bytes) == ("hint", started, 5e9)
    t.hint_start("/mnt/ckpt")
    assert m.active.expected_bytes == 5e9


def test_a_start_hint_on_a_mount_never_sampled_counts_from_zero():
    t, clock, _ = tracker()
    t.update(NfsSnapshot([NfsSample("/mnt/ckpt", "nas:/ckpt", "4.1", "tcp", 1, "checkpoint")]), False)
    t.hint_start("/mnt/ckpt")
    a = t.mounts["/mnt/ckpt"].active
    assert (a.start_server, a.start_client, a.last_server) == (0.0, 0.0, 0.0)


def test_a_detected_checkpoint_outlives_a_job_change_and_is_handed_over():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(2e9), True)
    t.job_changed()
    m = t.mounts["/mnt/ckpt"]
    assert m.state == "open" and m.outcomes["abandoned"] == 0 and t.inherited("/mnt/ckpt")
    assert t.signals() == [], "the gone job's"
    assert not t.inherited("/mnt/other")


def test_a_snapshot_seen_again_is_no_new_window():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    snap = mount.write(2e9)
    tick(t, clock, snap, False)
    m = t.mounts["/mnt/ckpt"]
    assert m.state == "open" and m.written_bytes == 0.0
    tick(t, clock, snap, False)
    assert m.written_bytes == 0.0 and m.active.writing, "the same totals: nothing measured, nothing quiet"


def test_without_client_counts_the_flush_after_an_end_is_not_another_checkpoint():
    t, clock, _ = tracker(quiet_after=2.0)
    server = [1e9]

    def snap(add: float) -> NfsSnapshot:
        server[0] += add
        return NfsSnapshot([NfsSample("/mnt/ckpt", "nas:/ckpt", "4.1", "tcp", 1, "checkpoint", write_bytes=server[0])])
    tick(t, clock, snap(0), False)
    t.hint_start("/mnt/ckpt")
    tick(t, clock, snap(1e9), True)
    t.hint_end("/mnt/ckpt", "completed")
    for _ in range(3):
        tick(t, clock, snap(1e9), False)
    assert t.mounts["/mnt/ckpt"].state == "settling", "no client count: no way to tell the job's new bytes"


# -- the busy ratio, the snapshot, the state file's clocks ----------------------------------------------

def test_the_busy_ratio_is_gpm_sm_activity_else_utilization_bounded_by_power():
    """The recorded H200 (stoker/sim/data/H200-RECORDING.md): 121 W idle of a 700 W limit, 673 W saturated;
    the copy-bound phase reads 15% utilization at 124 W."""
    from stoker.detect.view import gpu_busy
    gpus = [GpuSample(0, "GPU-0", gpm={"sm_active": 0.42}, utilization=0.9),
            GpuSample(1, "GPU-1", utilization=0.15, power_watts=124.0, power_limit_watts=700.0),
            GpuSample(2, "GPU-2", utilization=0.95, power_watts=673.0, power_limit_watts=700.0),
            GpuSample(3, "GPU-3", utilization=0.30, power_watts=100.0, power_limit_watts=700.0),
            GpuSample(4, "GPU-4", utilization=0.5),
            GpuSample(5, "GPU-5", utilization=0.5, power_watts=300.0, power_limit_watts=0.0),
            GpuSample(6, "GPU-6"),
            GpuSample(7, "GPU-7", up=False, utilization=0.9)]
    busy = gpu_busy(NodeView(0.0, gpu=GpuSnapshot(gpus)))
    assert busy[("0", "GPU-0")] == 0.42
    assert busy[("1", "GPU-1")] == pytest.approx((124 - 119) / 441)  # power says idle: 1%
    assert busy[("2", "GPU-2")] == 0.95, "power past the working share: utilization holds"
    assert busy[("3", "GPU-3")] == 0.0, "below idle power"
    assert busy[("4", "GPU-4")] == 0.5 and busy[("5", "GPU-5")] == 0.5, "no power reading: utilization"
    assert ("6", "GPU-6") not in busy and ("7", "GPU-7") not in busy
    assert gpu_busy(NodeView(0.0)) == {}


def test_a_snapshots_mount_reads_its_state():
    from stoker.detect.snapshot import MountSnapshot
    m = {s: MountSnapshot("/m", s, None, False, False, None, None, None, None, {}, ()) for s in
         ("idle", "candidate", "open", "stalled", "settling")}
    assert [s for s, x in m.items() if x.in_progress] == ["open", "stalled"]
    assert [s for s, x in m.items() if x.stalled] == ["stalled"]


def test_the_state_file_is_due_every_30_s_and_carries_a_verdict_for_60(tmp_path):
    clock = ManualClock(1000.0)
    store = StateStore(str(tmp_path / "state.json"), max_age=300.0, wall=clock)
    assert store.due()
    store.save(frozenset({1}), 0.9, [], ("network", True, True))
    clock.advance(29.9)
    assert not store.due()
    clock.advance(0.1)
    assert store.due()
    clock.advance(30.0)
    saved = store.load()
    assert (saved.cause, saved.cold, saved.came_back) == ("network", True, True), "60 s old: carried"
    clock.advance(0.1)
    saved = store.load()
    assert (saved.cause, saved.cold, saved.came_back, saved.level) == (None, False, False, 0.9), \
        "older: the level only (the verdict may have ended while no agent watched)"


def test_the_state_file_comes_back_up_to_max_age_and_never_from_the_future(tmp_path):
    clock = ManualClock(1000.0)
    store = StateStore(str(tmp_path / "state.json"), max_age=300.0, wall=clock)
    store.save(frozenset({1}), 1.0, [])
    clock.advance(300.0)
    assert store.load().level == 1.0, "a level of 1 is a level"
    clock.now = 999.0
    assert store.load() is None, "written after now: a clock that jumped"
    (tmp_path / "state.json").write_text(json.dumps({"pids": [1], "level": 0, "saved": clock()}))
    assert store.load().level is None, "0 is no level"
    (tmp_path / "state.json").write_text(json.dumps({"pids": [1], "level": None, "saved": clock(),
                                                     "checkpoints": [1]}))
    assert store.load().checkpoints == [], "a record that is not a record is left out, the rest is used"


def test_a_read_only_state_file_is_never_written(tmp_path):
    clock = ManualClock(1000.0)
    store = StateStore(str(tmp_path / "state.json"), max_age=300.0, wall=clock, read_only=True)
    store.save(frozenset({1}), 0.9, [])
    assert not (tmp_path / "state.json").exists() and not store.due()


def full(signals) -> list[tuple]:
    return sorted((s.kind, s.source, round(s.strength, 3), s.text) for s in signals)


def test_each_signal_names_its_source_and_says_what_was_measured():
    """The source labels stoker_evidence_strength and the reason is what `stoker replay`, `stoker check` and
    the verdict's reasons print: both are the operator's, so each is specified here, per kind."""
    ev = EvidenceTracker(DetectConfig())
    ev.signals(NodeView(0.0, nfs=nfs(100, 0)))
    assert full(ev.signals(NodeView(1.0, nfs=nfs(200, 4000, 1500)))) == [
        ("read_latency", "/mnt/data", 2.0, "/mnt/data: READ takes 40 ms"),
        ("read_queue", "/mnt/data", 1.5, "/mnt/data: READ queued 15 ms")]
    for role, expected in (("checkpoint", ("checkpoint_write_latency", "/mnt/ckpt", 3.0,
                                           "/mnt/ckpt: checkpoint WRITE takes 300 ms")),
                           ("data", ("write_latency", "/mnt/ckpt", 3.0, "/mnt/ckpt: WRITE takes 300 ms"))):
        ev = EvidenceTracker(DetectConfig())
        ev.signals(NodeView(0.0, nfs=nfs(0, 0, role=role, write_ops=10, mountpoint="/mnt/ckpt")))
        assert full(ev.signals(NodeView(1.0, nfs=nfs(0, 0, role=role, write_ops=20, write_exec_ms=3000,
                                                     mountpoint="/mnt/ckpt")))) == [expected]
    ev = EvidenceTracker(DetectConfig(reads_stalled_after=1.0))
    for t, ops in ((0.0, 100), (1.0, 200), (2.0, 300), (3.0, 300), (5.0, 300)):
        signals = ev.signals(NodeView(t, nfs=nfs(ops, ops * 5)))
    assert full(signals) == [("reads_stalled", "/mnt/data", 3.0, "/mnt/data: no READ completed for 3 s")]
    ev = EvidenceTracker(DetectConfig(probe_latency_seconds=1.0, probe_hung_seconds=5.0))
    probe = ProbeState("/mnt/data", 10.0, {"write": 0.01, "read": 3.0})
    assert [(k, s, v) for k, s, v, _ in full(ev.signals(NodeView(0.0, probes=[probe])))] == [
        ("probe_hung", "/mnt/data", 2.0), ("probe_slow", "/mnt/data", 3.0)]
    assert full(ev.signals(NodeView(0.0, probes=[probe])))[0][3] == "/mnt/data: probe unanswered for 10 s"
    ev = EvidenceTracker(DetectConfig(pause_ratio=0.02))
    ev.signals(NodeView(0.0, net=NetSnapshot([NetInterface("eth3", True, pause_seconds={("3", "rx"): 1.0})])))
    paused = NetInterface("eth3", True, pause_seconds={("3", "rx"): 1.05, ("3", "tx"): 9.0})
    assert full(ev.signals(NodeView(1.0, net=NetSnapshot([paused])))) == [
        ("pfc_pause", "eth3", 2.5, "eth3: PFC-paused 5% of the time")]
    down = NetInterface("eth3", False, pause_seconds={("3", "rx"): 1.05})
    assert full(ev.signals(NodeView(2.0, net=NetSnapshot([down])))) == [("link_down", "eth3", 4.0, "eth3 down")]
