"""What the agent knows of each job's span: `stoker_job_nodes` (as the job reports it) and
`stoker_job_multinode` (whether the job spans other nodes, and how the agent knows: detect/peer.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from stoker.detect.goodput import GoodputLedger
    from stoker.detect.peer import PeerJudge


def families(peer: PeerJudge, ledger: GoodputLedger):
    nodes = GaugeMetricFamily("stoker_job_nodes", "The nodes the job says it spans (its step hints: world size "
                              "over local world size, or its scheduler's node count).", labels=["job_id"])
    for job_id, acct in sorted(ledger.jobs.items()):
        if acct.nodes is not None:
            nodes.add_metric([job_id], acct.nodes)
    multinode = GaugeMetricFamily("stoker_job_multinode", "1 while the agent holds the job to span other nodes, "
                                  "0 to run on this node alone; source: hint (its step hints) or fabric (its "
                                  "collectives cross the RDMA ports, or do not, while it runs at its level).",
                                  labels=["job_id", "source"])
    for job_id, (many, how) in sorted(peer.multinode(ledger).items()):
        multinode.add_metric([job_id, how], 1 if many else 0)
    return [nodes, multinode]
