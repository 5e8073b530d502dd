"""What the checkpoint machine tells the operator: its log events, field for field, and the signal a
checkpoint gives the verdicts (its weight and text), with the edges of the machine they depend on.

docs/OPERATIONS.md ("Reading the logs") lists these events: an operator searches for `checkpoint stalled`
and reads how many bytes wait and for how long; `stoker replay` and `stoker check` print the signal's text
among the verdict's reasons. Each test drives the tracker through its public calls on a hand-moved clock."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from stoker.config import CheckpointConfig
from stoker.detect.checkpoint import Active, CheckpointTracker, MountCheckpoints
from stoker.detect.evidence import Signal
from stoker.sim.drive import ManualClock
from stoker.sources.nfs import NfsSnapshot
from tests.test_detect import Mount, tick, tracker

CKPT = "/mnt/ckpt"


def events(lines: list[dict]) -> list[dict]:
    """The checkpoint component's events, without the level (asserted where it matters)."""
    return [{k: v for k, v in line.items() if k != "log_level"} for line in lines if line.get("component") == "checkpoint"]


# -- the log events ---------------------------------------------------------------------------------

def test_a_hinted_checkpoint_logs_its_start_stall_resumption_and_end_with_their_numbers():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    with capture_logs() as lines:
        t.hint_start(CKPT, expected_bytes=8e9)  # t=1
        tick(t, clock, mount.write(2e9, client=3e9), True)  # t=2: 2 GB on the NAS, 1 GB in the page cache
        for _ in range(21):  # no byte reaches the NAS: stalled once past 20 s (t=23)
            tick(t, clock, mount.write(0), True)
        tick(t, clock, mount.write(1e9, client=0), True)  # t=24: the page cache drains
        clock.advance(0.5)
        t.hint_end(CKPT, "completed")
    assert events(lines) == [
        {"event": "checkpoint started", "component": "checkpoint", "mountpoint": CKPT, "source": "hint",
         "expected_bytes": 8e9},
        {"event": "checkpoint stalled", "component": "checkpoint", "mountpoint": CKPT, "written_bytes": 2e9,
         "waiting_bytes": 1e9, "seconds_without_progress": 21.0},
        {"event": "checkpoint resumed", "component": "checkpoint", "mountpoint": CKPT},
        {"event": "checkpoint ended", "component": "checkpoint", "mountpoint": CKPT, "outcome": "completed",
         "duration_seconds": 23.5, "written_bytes": 3e9},
    ]
    assert [line["log_level"] for line in lines] == ["info", "warning", "info", "info"]


def test_a_stall_logs_seconds_without_progress_to_a_tenth():
    t, clock, mount = tracker(stall_after=10.0)
    tick(t, clock, mount.write(0), False)
    t.hint_start(CKPT)  # t=1
    with capture_logs() as lines:
        for _ in range(4):
            tick(t, clock, mount.write(0), True, dt=2.83)  # t=12.32: 11.32 s without progress
    assert [(e["event"], e["seconds_without_progress"], e["written_bytes"], e["waiting_bytes"])
            for e in events(lines)] == [("checkpoint stalled", 11.3, 0.0, 0.0)]
    tick(t, clock, mount.write(0), True, dt=0.02)
    with capture_logs() as lines:
        t.hint_end(CKPT, "completed")
    assert events(lines)[0]["outcome"] == "stalled" and events(lines)[0]["duration_seconds"] == 11.3, "11.34 s"



def test_a_detected_checkpoint_logs_its_source_and_no_expected_size():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    with capture_logs() as lines:
        tick(t, clock, mount.write(2e9), False)
    assert events(lines) == [{"event": "checkpoint started", "component": "checkpoint", "mountpoint": CKPT,
                              "source": "detected", "expected_bytes": None}]


@pytest.mark.parametrize("how, said", [
    ("nobody ends it", ["checkpoint abandoned: nobody ended it", "checkpoint ended"]),
    ("its job is gone", ["checkpoint abandoned: the job that announced it is gone", "checkpoint ended"]),
    ("its mount is gone", ["checkpoint lost: its mount is gone", "checkpoint ended"]),
])
def test_a_checkpoint_that_never_ends_well_says_why_on_its_mount(how, said):
    t, clock, mount = tracker(stall_after=20.0, abandon_after=30.0)
    tick(t, clock, mount.write(0), False)
    t.hint_start(CKPT)
    with capture_logs() as lines:
        if how == "nobody ends it":
            for _ in range(31):
                tick(t, clock, mount.write(1e6), True)  # writing, slowly, for good
        elif how == "its job is gone":
            t.job_changed()
        else:
            for _ in range(22):
                tick(t, clock, NfsSnapshot([]), True)
    told = [e for e in events(lines) if e["event"] != "checkpoint stalled"]
    assert [e["event"] for e in told] == said
    assert all(e["mountpoint"] == CKPT for e in told)
    assert told[0].keys() == {"event", "component", "mountpoint"}
    assert [line["log_level"] for line in lines if line["event"] == said[0]] == ["warning"]
    assert told[1]["outcome"] == {"nobody ends it": "abandoned", "its job is gone": "abandoned",
                                  "its mount is gone": "lost"}[how]


# -- the signal a checkpoint gives the verdicts -------------------------------------------------------

GB = 1e9


@pytest.mark.parametrize("source, writing, unflushed, stalled, start_server, text", [
    # open by a hint: it explains a wait whatever it does
    ("hint", False, 0.0, False, 1e9, "checkpoint on /mnt/ckpt (hint): 2.50 GB written in 40 s"),
    ("hint", True, 0.0, False, 1e9, "checkpoint on /mnt/ckpt (hint): 2.50 GB written in 40 s"),
    # detected: while it writes, while written data waits for the server, or stalled
    ("detected", True, 0.0, False, 1e9, "checkpoint on /mnt/ckpt (detected): 2.50 GB written in 40 s"),
    ("detected", False, 300e6, False, 1e12, "checkpoint on /mnt/ckpt (detected): 2.50 GB written in 40 s"),
    ("detected", False, 0.0, True, 1e9, "checkpoint on /mnt/ckpt (detected): stalled: no byte reached the NAS for 15 s"),
    ("hint", True, 0.0, True, 1e9, "checkpoint on /mnt/ckpt (hint): stalled: no byte reached the NAS for 15 s"),
    # detected, quiet, nothing waiting: done, waiting out quiet_after; it explains nothing
    ("detected", False, 0.0, False, 1e9, None),
    # waiting: past a thousandth of what was written (2.5 MB of 2.5 GB), not of the mount's totals
    ("detected", False, 2e6, False, 1e12, None),
    ("detected", False, 3e6, False, 1e12, "checkpoint on /mnt/ckpt (detected): 2.50 GB written in 40 s"),
])
def test_an_open_checkpoint_explains_a_wait_with_full_weight_and_says_how_far_it_got(
        source, writing, unflushed, stalled, start_server, text):
    clock = ManualClock(100.0)
    t = CheckpointTracker(CheckpointConfig(), clock)
    written = 2.5 * GB
    a = Active(60.0, source, start_server, start_server, start_server + written, 85.0, stalled=stalled,
               writing=writing, unflushed=unflushed)
    t.mounts[CKPT] = MountCheckpoints(CKPT, state="stalled" if stalled else "open", active=a, written_bytes=written)
    assert t.signals() == ([] if text is None else [Signal("checkpoint", CKPT, 1.0, text)])


def test_a_checkpoint_that_has_written_nothing_yet_says_zero():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    m = t.mounts[CKPT]
    t.hint_start(CKPT)
    m.written_bytes = None  # a mount first seen at the hint, before its first window
    clock.advance(3.0)
    assert [s.text for s in t.signals()] == ["checkpoint on /mnt/ckpt (hint): 0.00 GB written in 3 s"]


def test_each_mount_with_a_checkpoint_gives_its_own_signal():
    """Two checkpoint mounts, the first with nothing open: the second's checkpoint is still seen."""
    clock = ManualClock(10.0)
    t = CheckpointTracker(CheckpointConfig(), clock)
    t.mounts["/mnt/a"] = MountCheckpoints("/mnt/a")
    t.mounts["/mnt/b"] = MountCheckpoints("/mnt/b", state="open", active=Active(4.0, "hint", 0.0, 0.0, 0.0, 4.0),
                                          written_bytes=0.0)
    assert [s.source for s in t.signals()] == ["/mnt/b"]


def test_a_hint_by_path_finds_an_nfs_root_mount():
    """A diskless node boots from an NFS root: `/` holds every path no deeper NFS mount holds."""
    t, clock, _ = tracker()
    tick(t, clock, NfsSnapshot([Mount("/", role="data").sample(), Mount(CKPT).sample()]), False)
    assert t.resolve(None, "/home/alice/ckpt/step9") == "/"
    assert t.resolve(None, "/mnt/ckpt/step9") == CKPT


# -- edges of the machine the events and signals depend on ----------------------------------------------

def test_windows_shorter_than_a_second_count_their_own_length():
    """Snapshots 0.5 s apart: 150 MB in one is 300 MB/s, past the 200 MB/s burst line."""
    t, clock, mount = tracker(burst_bytes_per_second=200e6)
    tick(t, clock, mount.write(0), False, dt=0.5)
    tick(t, clock, mount.write(0), False, dt=0.5)
    tick(t, clock, mount.write(150e6), False, dt=0.5)
    assert t.mounts[CKPT].state == "open" and t.mounts[CKPT].last_started == 1.0


def test_a_checkpoint_ended_within_a_second_lasted_that_long():
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start(CKPT)
    clock.advance(0.25)
    t.hint_end(CKPT, "completed")
    assert t.mounts[CKPT].last_duration == 0.25


def test_a_detected_checkpoint_counts_from_the_last_quiet_window_not_the_first():
    """Writes under the floor in the quiet windows before are not the checkpoint's: it counts from the
    start of the last quiet window (the checkpoint may have begun within it), not from the first."""
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    for _ in range(5):
        tick(t, clock, mount.write(0.5e6), False)  # 0.5 MB/s: logs, under the 1 MB/s floor
    tick(t, clock, mount.write(2e9), False)
    m = t.mounts[CKPT]
    assert m.active is not None and m.active.start_server == mount.server - 2e9 - 0.5e6
    tick(t, clock, mount.write(0), False)
    assert m.written_bytes == 2e9 + 0.5e6


def test_after_an_end_a_flush_at_the_floor_is_still_settling():
    """The server drains the ended checkpoint at exactly the write floor (1 MB/s): not quiet, so the mount
    stays settling; the job hands over nothing of its own."""
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    t.hint_start(CKPT)
    tick(t, clock, mount.write(1e9), True)
    t.hint_end(CKPT, "completed")
    for _ in range(3):
        tick(t, clock, mount.write(1e6, client=0), False)
        assert t.mounts[CKPT].state == "settling"
    tick(t, clock, mount.write(1e6 - 1, client=0), False)
    assert t.mounts[CKPT].state == "idle"


def test_after_a_job_change_bytes_at_the_floor_are_still_the_gone_jobs():
    """The new job hands the page cache exactly the floor's worth past the first window: not more than
    the floor, so not bytes of its own yet; one byte more is."""
    t, clock, mount = tracker()
    tick(t, clock, mount.write(0), False)
    tick(t, clock, mount.write(2e9), True)  # detected
    t.job_changed()
    tick(t, clock, mount.write(5e6), True)  # the first window after the change: where counting starts
    tick(t, clock, mount.write(1e6), True)
    assert t.inherited(CKPT)
    tick(t, clock, mount.write(1e6, client=1), True)
    assert not t.inherited(CKPT)


def test_a_hint_on_a_mount_without_client_counts_counts_the_servers_bytes():
    t, clock, _ = tracker()
    data = Mount("/mnt/data", role="data", client=False)
    tick(t, clock, data.write(0), False)
    t.hint_start("/mnt/data")
    tick(t, clock, data.write(3e9), True)
    m = t.mounts["/mnt/data"]
    assert m.written_bytes == 3e9 and m.active.unflushed == 0.0 and m.active.start_client == 1e9


# -- reopened after a restart, as saved ------------------------------------------------------------------

def saved_records(clock: ManualClock, mount: Mount, stalled: bool) -> list[dict]:
    t = CheckpointTracker(CheckpointConfig(stall_after=20.0), clock)
    tick(t, clock, mount.write(0), False)
    t.hint_start(CKPT, expected_bytes=8e9)
    for _ in range(22 if stalled else 1):
        tick(t, clock, mount.write(0), True)
    return json.loads(json.dumps(t.open_records()))


@pytest.mark.parametrize("stalled", [False, True])
def test_a_restart_reopens_a_checkpoint_with_its_expected_size_and_stall(stalled):
    clock = ManualClock(0.0)
    mount = Mount()
    records = saved_records(clock, mount, stalled)
    fresh = CheckpointTracker(CheckpointConfig(stall_after=20.0), clock)
    tick(fresh, clock, mount.write(0), True)
    assert fresh.restore(records) == [CKPT]
    assert fresh.open_records() == records, "kept as it was saved"
    assert fresh.mounts[CKPT].state == ("stalled" if stalled else "open")


def test_a_record_that_cannot_be_reopened_leaves_the_next_one_reopened():
    clock = ManualClock(0.0)
    mount, other = Mount(), Mount("/mnt/other")
    good = saved_records(clock, mount, stalled=False)[0]
    unknown_mount = {**good, "mountpoint": "/mnt/gone"}
    bad_source = {**good, "mountpoint": "/mnt/other", "source": "guess"}
    missing = {k: v for k, v in good.items() if k != "expected_bytes"}
    no_size = {**good, "expected_bytes": None}
    fresh = CheckpointTracker(CheckpointConfig(stall_after=20.0), clock)
    tick(fresh, clock, NfsSnapshot([mount.write(0).mounts[0], other.sample()]), True)
    assert fresh.restore([missing, unknown_mount, bad_source, no_size]) == [CKPT]
    assert fresh.mounts[CKPT].active.expected_bytes is None
    assert "/mnt/other" not in fresh.mounts or fresh.mounts["/mnt/other"].active is None, "not a hint or detected"
