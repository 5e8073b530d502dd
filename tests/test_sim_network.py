"""The simulated NICs, read through the real RDMA and ethtool code paths."""

from __future__ import annotations

from stoker.sim.simulation import Simulation
from stoker.sources.netdev import EthtoolReader
from stoker.sources.rdma import RdmaSource
from tests.conftest import ManualClock


def run(scenario: str, tmp_path, seconds: float, ports: int = 8):
    clock = ManualClock(0.0)
    sim = Simulation(scenario, str(tmp_path), rdma_ports=ports, clock=clock)
    source = RdmaSource(sim.sysfs_root, clock=clock)
    ethtool = EthtoolReader(sim.platform().open_ethtool)
    history = []
    for _ in range(int(seconds)):
        clock.advance(1.0)
        sim.network.advance()
        snap = source.sample()
        names = [p.interface for p in snap.ports]
        stats, problems = ethtool.read(names)
        history.append((snap, stats, problems))
    return sim, history


def rate(history, t0: int, t1: int, pick) -> float:
    return (pick(history[t1]) - pick(history[t0])) / (t1 - t0)


def hw(device: str, counter: str):
    return lambda h: next(p for p in h[0].ports if p.device == device).hw_counters[counter]


def test_congestion_raises_ecn_cnp_and_pfc_after_warmup(tmp_path):
    sim, history = run("network-congested", tmp_path, 25)
    before = rate(history, 2, 8, hw("mlx5_0", "np_ecn_marked_roce_packets"))
    during = rate(history, 14, 24, hw("mlx5_0", "np_ecn_marked_roce_packets"))
    assert before < 10 < 1000 < during
    assert rate(history, 14, 24, hw("mlx5_0", "np_cnp_sent")) > 1000
    pause = lambda h: h[1]["ens18f0np0"].pause_seconds[("3", "rx")]
    assert rate(history, 2, 8, pause) == 0 and rate(history, 14, 24, pause) > 0.01
    # mlx5_2 starts just below 2^32: its ECN counter wraps and still only goes up
    ecn2 = [hw("mlx5_2", "np_ecn_marked_roce_packets")(h) for h in history]
    assert ecn2 == sorted(ecn2) and ecn2[-1] > 2**32


def test_loss_raises_out_of_sequence_and_timeouts(tmp_path):
    _, history = run("network-lossy", tmp_path, 20)
    assert rate(history, 12, 19, hw("mlx5_5", "out_of_sequence")) > 50
    assert rate(history, 12, 19, hw("mlx5_5", "local_ack_timeout_err")) > 1
    assert rate(history, 2, 8, hw("mlx5_5", "out_of_sequence")) == 0


def test_port_down_takes_one_rail_down(tmp_path):
    sim, history = run("port-down", tmp_path, 15)
    last = {p.device: p for p in history[-1][0].ports}
    assert last["mlx5_3"].up is False and last["mlx5_3"].speed_bytes_per_second is None
    assert last["mlx5_3"].errors["link_downed"] == 1
    assert all(p.up for d, p in last.items() if d != "mlx5_3")
    assert sim.network.operstates()[last["mlx5_3"].interface] == "DOWN"


def test_four_port_nodes(tmp_path):
    _, history = run("healthy", tmp_path, 3, ports=4)
    snap = history[-1][0]
    assert len(snap.ports) == 4
    moved = rate(history, 0, 2, lambda h: h[0].ports[0].traffic["transmit_bytes"])
    assert moved > 1e9  # a busy rail moves GB/s of RoCE traffic
