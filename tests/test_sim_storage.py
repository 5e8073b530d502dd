"""The simulated PowerScale mounts, read through the real mountstats code path."""

from __future__ import annotations

import os
import socket
import stat

from stoker.config import DEFAULT_NFS_OPERATIONS
from stoker.sim.simulation import Simulation
from stoker.sources.nfs import NfsSource
from tests.conftest import ManualClock

ROLES = {"data": ("/mnt/data",), "checkpoint": ("/mnt/checkpoints",)}


def run(scenario: str, tmp_path, seconds: int):
    clock = ManualClock(0.0)
    sim = Simulation(scenario, str(tmp_path), clock=clock)
    source = NfsSource(sim.procfs_root, DEFAULT_NFS_OPERATIONS, ROLES)
    history = []
    for _ in range(seconds):
        clock.advance(1.0)
        sim.advance()
        history.append({m.mountpoint: m for m in source.sample().mounts})
    return sim, history


def per_op_latency(history, t0, t1, mount="/mnt/data", op="READ", field="execute_ms") -> float:
    a, b = history[t0][mount].ops[op], history[t1][mount].ops[op]
    return (b[field] - a[field]) / max(1, b["ops"] - a["ops"])


def test_healthy_reads_follow_the_gpus(tmp_path):
    _, h = run("healthy", tmp_path, 6)
    read_rate = (h[5]["/mnt/data"].read_bytes - h[1]["/mnt/data"].read_bytes) / 4
    assert read_rate > 1e9
    assert per_op_latency(h, 1, 5) < 5  # ms per READ
    assert h[5]["/mnt/data"].role == "data" and h[5]["/mnt/checkpoints"].protocol == "rdma"


def test_slow_reads_raise_latency_and_queueing(tmp_path):
    _, h = run("storage-starved", tmp_path, 20)
    assert per_op_latency(h, 2, 8) < 5
    assert per_op_latency(h, 12, 19) > 50
    assert per_op_latency(h, 12, 19, field="queue_ms") > 20


def test_checkpoint_writes_reach_the_checkpoint_mount(tmp_path):
    _, h = run("checkpoint", tmp_path, 20)
    written = h[19]["/mnt/checkpoints"].write_bytes - h[9]["/mnt/checkpoints"].write_bytes
    assert written > 10e9  # ~1.25 GB/s for the checkpoint phase


def test_slow_checkpoint_crawls(tmp_path):
    _, h = run("checkpoint-slow", tmp_path, 20)
    rate = (h[19]["/mnt/checkpoints"].write_bytes - h[12]["/mnt/checkpoints"].write_bytes) / 7
    assert 0 < rate < 10e6
    assert per_op_latency(h, 12, 19, mount="/mnt/checkpoints", op="WRITE") > 100


def test_hung_nas_freezes_counters_and_plants_a_blocking_probe_path(tmp_path):
    sim, h = run("nas-hang", tmp_path, 16)
    assert h[15]["/mnt/data"].ops == h[11]["/mnt/data"].ops, "no RPC completes"
    fifo = os.path.join(sim.storage.mounts[0].probe_dir, f".stoker-probe-{socket.gethostname()}")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
