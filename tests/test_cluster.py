"""Multi-node jobs on a simulated cluster (stoker/sim/cluster.py) and the `peer` verdict (stoker/detect/peer.py).

The waiting signature the simulator gives a node whose job waits for another node, and that the verdict reads,
is taken from public reports of NCCL's behaviour: a rank blocked in a collective keeps NCCL's kernel resident
(nvidia-smi reads 100%, cupy/cupy#3557; NVIDIA/nccl#238 multi-node: 100% while hung), the kernel holds one SM
per channel and never shares it (NVIDIA/nccl#689: 16 SMs on an 8-NIC DGX; NVIDIA/nccl#1432: a lone NCCL kernel
keeps 15% of the SMs active), and an H100 waiting so draws near idle power (NVIDIA/nccl#1550: 152 W at 100%
beside 129-137 W idle ones). utilization.gpu is "percent of time over the past sample period during which one
or more kernels was executing" (NVML API reference, nvmlUtilization_t).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from stoker.config import DetectConfig
from stoker.detect.goodput import GoodputLedger, StepRecord
from stoker.detect.peer import PEER, PeerJudge
from stoker.detect.view import NodeView
from stoker.sim import cluster as sim_cluster
from stoker.sim import jobs as sim_jobs
from stoker.sim import node as sim_node
from stoker.sim.cluster import Cluster, ClusterDrive, parse
from stoker.sim.judge import run_length
from stoker.sim.scenarios import ScenarioError
from stoker.sources.gpu import GpuSample, GpuSnapshot
from stoker.sources.jobs import JobSnapshot, Owner

CLUSTERS = Path(__file__).parent / "scenarios" / "cluster"


def play(spec, seconds: float | None = None) -> ClusterDrive:
    c = Cluster(spec)
    root = tempfile.TemporaryDirectory(dir=sim_cluster.scratch())
    drive = ClusterDrive(c, root.name)
    drive.root = root  # removed with the drive
    drive.run(seconds if seconds is not None else max(run_length(s) for s in c.scenarios))
    return drive


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one-origin", "job-life"])
def test_cluster_verdicts_are_right(name):
    """one-origin: a NAS crawling under one node of a 6-node job reads `storage` there and `peer` on the five
    others (never `host`); a 4-node job without step hints (its span from the fabric) whose node's input pipeline
    starves it with no PSI: `host` there (its GPUs idle between kernels), `peer` elsewhere; single-node jobs as on
    any single node. job-life: two faulty nodes at once, a rail down, a checkpoint on every node (nobody waits),
    the job's end."""
    drive = play(sim_cluster.load(str(CLUSTERS / f"{name}.toml")))
    try:
        wrong = {j.scenario: j.failures for j in drive.judge() if not j.right}
        assert not wrong, wrong
    finally:
        drive.close()


def test_the_job_goes_at_its_slowest_node_and_the_others_wait_in_collectives():
    c = Cluster(parse('nodes = 3\n[[jobs]]\nname = "j"\nnodes = "0-1"\n[[jobs]]\nname = "solo"\nnodes = 2\n'
                      '[[faults]]\nnodes = [1, 2]\nfrom = 10\nto = 20\nstorage = "slow-read"\n', "c"))
    k, slow = c.coupling, sim_node.phase_speed()["input_starved"]
    assert 0.1 < slow < 0.3  # the recorded input-starved phase: 17% SM activity against 95%
    assert [k.waiting(n, 5.0) for n in range(3)] == [0.0, 0.0, 0.0]
    assert k.waiting(0, 15.0) == pytest.approx(1 - slow) and k.waiting(1, 15.0) == 0.0 and k.waiting(2, 15.0) == 0.0
    assert k.speed(0, 15.0) == k.speed(1, 15.0) == pytest.approx(slow) and k.speed(2, 15.0) is None
    assert sim_node.data_wait(c.scenarios[1].at(15.0)[0]) == pytest.approx(1 - slow)  # its loader is late
    assert sim_node.data_wait(c.scenarios[0].at(15.0)[0]) == 0.0  # its loader keeps up; it waits in collectives
    assert k.fabric(0, 5.0) and not k.fabric(2, 5.0)  # a single-node job's collectives stay on NVLink
    assert k.nodes(0, 5.0) == 2 and k.nodes(2, 5.0) == 1
    sims = sim_cluster.simulations(c, tempfile.mkdtemp(dir=sim_cluster.scratch()))
    waiting, computing = sims[0].node.gpu_row(0, 15.0), sims[0].node.gpu_row(0, 5.0)
    assert waiting["util_gpu"] >= 99 and computing["util_gpu"] >= 95  # a kernel runs all the time in both
    assert waiting["gpm_sm_util"] < 0.45 * computing["gpm_sm_util"]  # few SMs busy while it waits
    assert waiting["gpm_any_tensor_util"] < 0.25 * computing["gpm_any_tensor_util"]
    assert waiting["power_w"] < 0.5 * computing["power_w"]
    starved = sims[1].node.gpu_row(0, 15.0)  # the origin: idle between kernels, utilization as low as SM activity
    assert starved["util_gpu"] - starved["gpm_sm_util"] < 10


@pytest.mark.parametrize("text, message", [
    ("nodes = 0\n[[jobs]]\nname = 'j'\nnodes = 0\n", "nodes: expected"),
    ("nodes = 2\n", "at least one [[jobs]]"),
    ("nodes = 2\n[[jobs]]\nname = 'j'\nnodes = '0-2'\n", "jobs[0].nodes: nodes must be from 0 to 1"),
    ("nodes = 2\n[[jobs]]\nname = 'j'\nnodes = 'a-b'\n", "jobs[0].nodes: 'a-b'"),
    ("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = 0\n[[jobs]]\nname = 'b'\nnodes = '0-1'\n", "hold the same node"),
    ("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = 0\nend = 10\n[[jobs]]\nname = 'a'\nnodes = 1\n", "same name"),
    ("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = 0\n[[faults]]\nnodes = 1\nfrom = 5\nstorage = 'slow'\n",
     "faults[0].storage"),
    ("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = 0\n[[checkpoints]]\njob = 'b'\nfrom = 5\nseconds = 3\n",
     "checkpoints[0].job"),
    ("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = 0\nspeed = 2\n", "unknown key 'speed'"),
    ("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = 0\n[[expect]]\nnodes = 0\nfrom = 0\nto = 5\nverdict = 'slow'\n",
     "expect[0].verdict"),
])
def test_a_bad_cluster_scenario_is_refused_with_the_key(text, message):
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text, "c")


def test_two_jobs_may_follow_each_other_on_a_node():
    c = Cluster(parse("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = '0-1'\nend = 50\n[[jobs]]\nname = 'b'\nnodes = 0\n"
                      "start = 60\n", "c"))
    assert [c.scenarios[0].at(t)[0].job for t in (10, 55, 70)] == ["a", "", "b"]
    assert c.coupling.job(0, 10) is not None and c.coupling.job(0, 70) is None  # b runs on one node


# -- the verdict's decision, on views built by hand ---------------------------------------------------------

def view(t: float, utilization: float, busy: float) -> NodeView:
    gpus = [GpuSample(i, f"GPU-{i}", utilization=utilization, pids=(100 + i,), processes=1, gpm={"sm_active": busy},
                      activity_source="gpm") for i in range(8)]
    return NodeView(t, gpu=GpuSnapshot(gpus))


def ledger_with(job: str = "4242", nodes: int | None = 16, waits: float | None = None) -> GoodputLedger:
    ledger = GoodputLedger(DetectConfig(), clock=lambda: 0.0)
    snap = view(0.0, 0.9, 0.9).gpu
    owners = JobSnapshot({100 + i: Owner(job, "slurm", "cgroup") for i in range(8)})
    ledger.tick(0.0, snap, owners, None, {})
    if nodes is not None or waits is not None:
        ledger.record_steps([StepRecord(n, 2.0, data_wait=waits) for n in range(1, 6)], job=job, nodes=nodes)
    return ledger


NO_SCORES = {"storage": 0.0, "network": 0.0, "checkpoint": 0.0, "host": 0.0}


def judge(judge_: PeerJudge, ledger, t, cause, utilization, busy, scores=NO_SCORES):
    return judge_.judge(t, cause, ["no evidence"], view(t, utilization, busy), scores, ledger, frozenset({100}),
                        False, busy)


def test_a_multi_node_job_waiting_in_a_collective_is_peer_and_its_time_is_counted_as_peer():
    peer, ledger = PeerJudge(), ledger_with()
    cause, reasons = judge(peer, ledger, 10.0, "host", 1.0, 0.3)
    assert cause == PEER and "16 nodes" in reasons[0] and "waiting for the other nodes" in reasons[1]
    assert peer.waiting == pytest.approx(0.7)
    judge(peer, ledger, 12.0, "host", 1.0, 0.3)
    assert peer.seconds == pytest.approx(2.0)
    assert judge(peer, ledger, 13.0, None, 0.95, 0.95)[0] is None and peer.seconds == pytest.approx(3.0)


@pytest.mark.parametrize("case, ledger_args, cause, scores, utilization", [
    ("a single-node job (its hints say 1 node)", {"nodes": 1}, "host", NO_SCORES, 1.0),
    ("a job whose span is unknown", {"nodes": None}, "host", NO_SCORES, 1.0),
    ("host evidence of its own (PSI)", {}, "host", {**NO_SCORES, "host": 2.0}, 1.0),
    ("GPUs idle between kernels: the input pipeline here", {}, "host", NO_SCORES, 0.32),
    ("its steps wait for their batches", {"waits": 1.2}, "host", NO_SCORES, 1.0),
    ("a local cause", {}, "storage", NO_SCORES, 1.0),
])
def test_what_stays_local(case, ledger_args, cause, scores, utilization):
    peer, ledger = PeerJudge(), ledger_with(**ledger_args)
    judge(peer, ledger, 9.0, None, 0.95, 0.95)  # the step hints' totals are seen before the wait
    assert judge(peer, ledger, 10.0, cause, utilization, 0.3, scores)[0] == cause, case


def test_without_utilization_a_multi_node_wait_with_nothing_local_is_peer():
    peer, ledger = PeerJudge(), ledger_with()
    v = view(10.0, 1.0, 0.3)
    for g in v.gpu.gpus:
        g.utilization = None
    assert peer.judge(10.0, "host", [], v, NO_SCORES, ledger, frozenset({100}), False, 0.3)[0] == PEER
    assert peer.waiting is None


def samples(collector) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.families() for s in f.samples}


def test_the_peer_verdict_and_the_job_span_are_exported():
    """A 2-node job with step hints (the node count, the data wait) whose node 1 input-starves: node 0 reads peer,
    its time in `stoker_starved_seconds_total{cause="peer"}` (not host's) and `stoker_job_seconds_total{state="peer"}`;
    each node says how it knows the job's span; node 1's steps report their data wait."""
    spec = parse('nodes = 2\n[[jobs]]\nname = "j"\nnodes = "0-1"\nstep_rate = 0.5\n'
                 '[[faults]]\nnodes = 1\nfrom = 20\n', "c")
    drive = play(spec, 50)
    try:
        victim, origin = (samples(d.verdicts) for d in drive.drives)
        job_id = sim_jobs.job_id("j", "slurm")
        assert victim[("stoker_starved", (("cause", "peer"),))] == 1
        assert origin[("stoker_starved", (("cause", "host"),))] == 1
        peer_s = victim[("stoker_starved_seconds_total", (("cause", "peer"),))]
        assert 25 <= peer_s <= 30 and victim[("stoker_starved_seconds_total", (("cause", "host"),))] == 0
        assert victim[("stoker_job_seconds_total", (("job_id", job_id), ("state", "peer")))] >= 25
        assert victim[("stoker_goodput_seconds_total", (("state", "peer"),))] >= 25
        assert victim[("stoker_job_nodes", (("job_id", job_id),))] == 2
        assert victim[("stoker_job_multinode", (("job_id", job_id), ("source", "hint")))] == 1
        assert victim[("stoker_evidence_strength", (("cause", "peer"), ("signal", "collective_wait"),
                                                    ("source", "node")))] > 1
        waited, stepped = (origin[(name, (("job_id", job_id),))] for name in
                           ("stoker_job_data_wait_seconds_total", "stoker_job_step_seconds_sum"))
        # 20 s of steps at full speed (no wait), then ~30 s of steps at 18% of it: 82% of each waiting for data
        assert 0.35 < waited / stepped < 0.65
        assert victim[("stoker_job_data_wait_seconds_total", (("job_id", job_id),))] == 0
    finally:
        drive.close()


def test_the_documented_cluster_format_parses():
    text = (Path(__file__).parent.parent / "docs" / "SCENARIOS.md").read_text().split("## Clusters", 1)[1]
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    c = Cluster(parse(example, "doc"))
    assert c.spec.nodes == 18 and c.coupling.job(7, 100.0).name == "llama-16" and c.coupling.job(16, 100.0) is None
    assert c.scenarios[7].at(100.0)[0].storage == "slow-read" and c.scenarios[3].at(130.0)[0].gpu_phase == "checkpoint"


def test_stoker_cluster_refuses_a_bad_scenario_with_the_key(tmp_path, capsys):
    from stoker.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("nodes = 2\n[[jobs]]\nname = 'a'\nnodes = 5\n")
    assert main(["cluster", str(bad)]) == 2
    assert "jobs[0].nodes" in capsys.readouterr().err


def rails(t: float, gbytes: float, ports: int = 8):
    from stoker.sources.rdma import RdmaPort, RdmaSnapshot
    return RdmaSnapshot([RdmaPort(f"mlx5_{i}", "1", traffic={"transmit_bytes": t * gbytes * 5e8,
                                                               "receive_bytes": t * gbytes * 5e8})
                         for i in range(ports)])


def test_the_fabric_tells_a_multi_node_job_even_while_some_of_its_processes_are_not_placed_yet():
    """A job lookup that timed out under load leaves some GPUs `unknown` for a while (agent/jobs.py tries again
    after 1, 2, 4 ... 60 s); the collectives the node's one known job moves on every rail are still its."""
    ledger = GoodputLedger(DetectConfig(), clock=lambda: 0.0)
    owners = JobSnapshot({100 + i: Owner("4242", "slurm", "cgroup") if i < 4 else None for i in range(8)})
    ledger.tick(0.0, view(0.0, 0.9, 0.9).gpu, owners, None, {})
    assert {b.job_id for bs in ledger.gpus.values() for b in bs} == {"4242", "unknown"}
    peer = PeerJudge()
    for t, gbytes in ((1.0, 0.0), (2.0, 3.0), (3.0, 3.0)):  # 3 GB/s a rail at the job's level
        v = view(t, 0.99, 0.95)
        v.rdma = rails(t, gbytes)
        peer.judge(t, None, [], v, NO_SCORES, ledger, frozenset({100}), True, 0.95)
    assert peer.multinode(ledger)["4242"] == (True, "fabric")
    quiet = PeerJudge()
    for t in (1.0, 2.0):  # rails nearly still at the job's level (0.1 GB/s): a job on this node alone
        v = view(t, 0.99, 0.95)
        v.rdma = rails(t, 0.1)
        quiet.judge(t, None, [], v, NO_SCORES, ledger, frozenset({100}), True, 0.95)
    assert quiet.multinode(ledger)["4242"] == (False, "fabric")
    assert quiet.judge(3.0, "host", [], view(3.0, 1.0, 0.3), NO_SCORES, ledger, frozenset({100}), False, 0.3)[0] == \
        "host"
