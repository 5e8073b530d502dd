"""Each evidence signal (stoker/detect/evidence.py) as the operator reads it, from snapshots holding
several sources at once, as a real node's do: eight rails, several NFS mounts, two probes.

Its source labels `stoker_evidence_strength`; its text is what `stoker replay`, `stoker check` and the
verdict's reasons print. tests/test_detect.py specifies one source at a time; these check that every
source of a snapshot is measured (one new port or mount does not hide the next), that windows shorter
than a second count their own length, and that a count the mountstats parser left out (not plausible)
leaves its window unmeasured instead of reading as latency."""

from __future__ import annotations

import pytest

from stoker.config import DetectConfig
from stoker.detect.evidence import EvidenceTracker
from stoker.detect.view import NodeView, ProbeState
from stoker.sources.netdev import NetInterface, NetSnapshot
from stoker.sources.nfs import NfsSample, NfsSnapshot
from stoker.sources.pressure import PressureSnapshot
from stoker.sources.rdma import RdmaPort, RdmaSnapshot


def full(signals) -> list[tuple]:
    return [(s.kind, s.source, round(s.strength, 3), s.text) for s in signals]


def windows(config: DetectConfig, *views: NodeView) -> list[tuple]:
    """The signals of the last view, after the ones before it."""
    ev = EvidenceTracker(config)
    for view in views:
        signals = ev.signals(view)
    return full(signals)


# -- RDMA ports ------------------------------------------------------------------------------------------

def port(device: str, up: bool = True, **counters: float) -> RdmaPort:
    return RdmaPort(device, "1", up=up, hw_counters=dict(counters))


def test_a_port_that_went_down_and_one_never_up_say_which():
    rails = [port(f"mlx5_{i}") for i in range(4)]
    up = RdmaSnapshot([*rails, port("mlx5_4", up=False)])
    after = RdmaSnapshot([port("mlx5_0", up=False), *rails[1:], port("mlx5_4", up=False)])
    assert windows(DetectConfig(), NodeView(0.0, rdma=up), NodeView(1.0, rdma=RdmaSnapshot(list(up.ports))),
                   NodeView(2.0, rdma=after)) == [
        ("port_down", "mlx5_0/1", 4.0, "mlx5_0/1 down"),
        ("port_down", "mlx5_4/1", 2.0, "mlx5_4/1 down (since the agent started)")]


def test_congestion_and_retransmits_per_port_say_their_rates():
    """Over 2 s: 2,000 CNPs sent is 1,000 a second (twice the 500 line); retransmits add up over their
    counters (60 + 40 a second, five times the 20 line). A port new in this snapshot, listed first, has
    no window yet and does not hide the next one's."""
    before = RdmaSnapshot([port("mlx5_0", np_cnp_sent=0, out_of_sequence=0, local_ack_timeout_err=0)])
    after = RdmaSnapshot([port("mlx5_9"), port("mlx5_0", np_cnp_sent=2000, out_of_sequence=120,
                                               local_ack_timeout_err=80)])
    assert windows(DetectConfig(), NodeView(0.0, rdma=before), NodeView(2.0, rdma=after)) == [
        ("congestion", "mlx5_0/1", 2.0, "mlx5_0/1: 1000 ECN/CNP per s"),
        ("retransmits", "mlx5_0/1", 5.0, "mlx5_0/1: 100 retransmits per s")]


# -- Ethernet pause --------------------------------------------------------------------------------------

def test_pause_is_the_share_of_the_window_a_priority_was_paused_on_receive():
    """0.45 s paused in a 0.5 s window: 90% of the time. A priority whose counter appears only now
    (a PFC class enabled) counts from its first reading, not from zero; eth0 new in this snapshot
    does not hide eth3."""
    before = NetSnapshot([NetInterface("eth3", True, pause_seconds={("3", "rx"): 1.0})])
    after = NetSnapshot([NetInterface("eth0", True),
                         NetInterface("eth3", True, pause_seconds={("3", "rx"): 1.45, ("4", "rx"): 700.0})])
    assert windows(DetectConfig(pause_ratio=0.02), NodeView(0.0, net=before), NodeView(0.5, net=after)) == [
        ("pfc_pause", "eth3", 45.0, "eth3: PFC-paused 90% of the time")]


# -- NFS mounts --------------------------------------------------------------------------------------------

def mount(mountpoint: str, role: str, read=(0, 0, 0), write=(0, 0, 0)) -> NfsSample:
    """`read`/`write`: (ops, execute_ms, queue_ms) totals; a None leaves that count out, as the parser
    does with one that is not plausible."""
    ops = {op: {k: v for k, v in zip(("ops", "execute_ms", "queue_ms"), counts) if v is not None}
           for op, counts in (("READ", read), ("WRITE", write))}
    return NfsSample(mountpoint, f"nas:{mountpoint}", "4.1", "tcp", 1, role, ops=ops)


def test_every_mount_of_a_snapshot_is_judged_each_with_its_own_signals():
    """A data mount reading and writing slowly, a mount new in this snapshot, a checkpoint mount writing
    slowly: 0.8 s a READ, 0.6 s queued, 0.9 s a WRITE, 0.7 s a checkpoint WRITE."""
    before = NfsSnapshot([mount("/mnt/data", "data", (100, 0, 0), (10, 0, 0)),
                          mount("/mnt/ckpt", "checkpoint", (0, 0, 0), (10, 0, 0))])
    after = NfsSnapshot([mount("/mnt/data", "data", (110, 8000, 6000), (20, 9000, 0)),
                         mount("/mnt/new", "data", (5, 50, 0), (0, 0, 0)),
                         mount("/mnt/ckpt", "checkpoint", (0, 0, 0), (20, 7000, 0))])
    assert windows(DetectConfig(), NodeView(0.0, nfs=before), NodeView(1.0, nfs=after)) == [
        ("read_latency", "/mnt/data", 40.0, "/mnt/data: READ takes 800 ms"),
        ("read_queue", "/mnt/data", 60.0, "/mnt/data: READ queued 600 ms"),
        ("write_latency", "/mnt/data", 9.0, "/mnt/data: WRITE takes 900 ms"),
        ("checkpoint_write_latency", "/mnt/ckpt", 7.0, "/mnt/ckpt: checkpoint WRITE takes 700 ms")]


def test_reads_of_a_checkpoint_mount_are_no_data_loading():
    """Restoring a checkpoint reads slowly from its mount; that is the job's restart, not input starvation."""
    before = NfsSnapshot([mount("/mnt/ckpt", "checkpoint", (100, 0, 0))])
    after = NfsSnapshot([mount("/mnt/ckpt", "checkpoint", (110, 8000, 4000))])
    assert windows(DetectConfig(), NodeView(0.0, nfs=before), NodeView(1.0, nfs=after)) == []


def test_one_operation_completed_is_a_measured_window():
    before = NfsSnapshot([mount("/mnt/data", "data", (100, 0, 0))])
    after = NfsSnapshot([mount("/mnt/data", "data", (101, 50, 0))])
    assert windows(DetectConfig(), NodeView(0.0, nfs=before), NodeView(1.0, nfs=after)) == [
        ("read_latency", "/mnt/data", 2.5, "/mnt/data: READ takes 50 ms")]


@pytest.mark.parametrize("before, after", [
    ((100, 0, 0), (110, 8000, None)),  # queue_ms not plausible now
    ((100, 0, None), (110, 8000, 4000)),  # queue_ms not plausible before: its total would read as latency
    ((100, None, 0), (110, 8000, 4000)),
    ((None, 0, 0), (110, 8000, 4000)),
    ((100, 0, 0), (None, 8000, 4000)),
])
def test_a_window_missing_a_count_is_not_measured(before, after):
    views = [NodeView(float(t), nfs=NfsSnapshot([mount("/mnt/data", "data", counts)]))
             for t, counts in enumerate((before, after))]
    assert windows(DetectConfig(), *views) == []


def test_an_operation_line_gone_from_one_sample_is_not_measured():
    with_write = mount("/mnt/data", "data", (100, 0, 0), (10, 0, 0))
    without = NfsSample("/mnt/data", "nas:/mnt/data", "4.1", "tcp", 1, "data",
                        ops={"READ": {"ops": 110, "execute_ms": 50, "queue_ms": 0}})
    assert windows(DetectConfig(), NodeView(0.0, nfs=NfsSnapshot([with_write])),
                   NodeView(1.0, nfs=NfsSnapshot([without]))) == []
    assert windows(DetectConfig(), NodeView(0.0, nfs=NfsSnapshot([without])),
                   NodeView(1.0, nfs=NfsSnapshot([with_write]))) == []
    no_read = NfsSample("/mnt/data", "nas:/mnt/data", "4.1", "tcp", 1, "data",
                        ops={"WRITE": {"ops": 20, "execute_ms": 9000, "queue_ms": 0}})
    assert windows(DetectConfig(), NodeView(0.0, nfs=NfsSnapshot([with_write])),
                   NodeView(1.0, nfs=NfsSnapshot([no_read]))) == [
        ("write_latency", "/mnt/data", 9.0, "/mnt/data: WRITE takes 900 ms")], "the WRITEs still judged"


def test_a_read_count_not_plausible_is_neither_progress_nor_a_stall():
    """The READ count missing for a few samples (the parser dropped it) neither stalls the mount nor
    restarts its clock: it stalls from when READs last completed, once the count is back."""
    views = [NodeView(float(t), nfs=NfsSnapshot([mount("/mnt/data", "data", (ops, 0, 0))]))
             for t, ops in ((0, 100), (1, 200), (2, 300), (3, None), (4, None), (5, 300))]
    assert windows(DetectConfig(reads_stalled_after=1.0), *views[:5]) == []
    assert windows(DetectConfig(reads_stalled_after=1.0), *views) == [
        ("reads_stalled", "/mnt/data", 3.0, "/mnt/data: no READ completed for 3 s")]


# -- probes and host pressure -----------------------------------------------------------------------------

def test_each_probed_mount_gives_its_own_signals_naming_the_slow_probe():
    probes = [ProbeState("/mnt/data", 12.0, {"write": 0.01}),
              ProbeState("/mnt/ckpt", 6.0, {"write": 0.2, "read": 2.5})]
    assert windows(DetectConfig(probe_latency_seconds=1.0, probe_hung_seconds=5.0), NodeView(0.0, probes=probes)) == [
        ("probe_hung", "/mnt/data", 2.4, "/mnt/data: probe unanswered for 12 s"),
        ("probe_hung", "/mnt/ckpt", 1.2, "/mnt/ckpt: probe unanswered for 6 s"),
        ("probe_slow", "/mnt/ckpt", 2.5, "/mnt/ckpt: read probe took 2.5 s")]


def test_host_pressure_is_the_nodes_share_of_time_waited():
    """0.9 s of CPU stall in a 1 s window: 90%; memory 0.45 s: 45%."""
    before = PressureSnapshot(some_seconds={"cpu": 10.0, "memory": 5.0})
    after = PressureSnapshot(some_seconds={"cpu": 10.9, "memory": 5.45})
    assert windows(DetectConfig(), NodeView(0.0, host=before), NodeView(1.0, host=after)) == [
        ("cpu_pressure", "node", 2.25, "cpu pressure: tasks waited 90% of the time"),
        ("memory_pressure", "node", 2.25, "memory pressure: tasks waited 45% of the time")]
