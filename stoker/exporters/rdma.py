"""RDMA port samples as the `stoker_rdma_*` families of METRICS.md."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stoker.sources.rdma import RdmaSnapshot

L = ["device", "port"]

# The hw_counters a default install exports ([rdma] hw_counters = "default"); a ConnectX-7 port has about
# 30 of them (26 on the XE9680 fixture), and each is one series per port: 8 ports, 208 series a node for all.
USED = (
    # read by the verdicts (stoker/detect/evidence.py), the alerts and the recording rules, and the dashboards
    "np_ecn_marked_roce_packets", "np_cnp_sent", "rp_cnp_handled",
    "out_of_sequence", "packet_seq_err", "local_ack_timeout_err", "roce_adp_retrans",
    "req_transport_retries_exceeded",
)
FIRST_LOOK = (
    # the error counters an operator checks first on a RoCE port that misbehaves (NVIDIA's mlx5 counter guide)
    "out_of_buffer",         # receive queue had no buffer: packets dropped by the host side
    "rnr_nak_retry_err",     # receiver-not-ready retries exhausted: a QP in error, like retries exceeded
    "req_cqe_error", "resp_cqe_error",  # completions in error: QPs torn down
    "rp_cnp_ignored",        # CNPs the NIC did not act on: DCQCN off or misconfigured on this port
    "roce_adp_retrans_to",   # adaptive retransmission timeouts: losses past fast retransmission
)
DEFAULT_HW_COUNTERS = frozenset(USED + FIRST_LOOK)


def hw_selection(setting: str | tuple[str, ...]) -> frozenset[str] | None:
    """The `[rdma] hw_counters` setting as the set of counters to export; None: every counter."""
    if setting == "all":
        return None
    if setting == "default":
        return DEFAULT_HW_COUNTERS
    return frozenset(setting)


class RdmaFamilies:
    """The families function of the rdma collector, with the hw_counters selection (changed on reload)."""

    def __init__(self, hw_counters: str | tuple[str, ...] = "default"):
        self.select(hw_counters)

    def select(self, hw_counters: str | tuple[str, ...]) -> None:
        self.hw_counters = hw_selection(hw_counters)

    def __call__(self, snapshot: RdmaSnapshot):
        return families(snapshot, self.hw_counters)
TRAFFIC = [
    ("transmit_bytes", "stoker_rdma_port_transmit_bytes", "RoCE/IB bytes sent (port_xmit_data x 4)."),
    ("receive_bytes", "stoker_rdma_port_receive_bytes", "RoCE/IB bytes received (port_rcv_data x 4)."),
    ("transmit_packets", "stoker_rdma_port_transmit_packets", "Packets sent."),
    ("receive_packets", "stoker_rdma_port_receive_packets", "Packets received."),
]


def families(snapshot: RdmaSnapshot, hw_counters: frozenset[str] | None = DEFAULT_HW_COUNTERS):
    """`hw_counters`: the hw_counters files exported (None: all); the snapshot keeps every one for the verdicts."""
    info = GaugeMetricFamily("stoker_rdma_port_info", "RDMA port identity and its netdev.",
                             labels=L + ["interface", "link_layer", "fw_version"])
    up = GaugeMetricFamily("stoker_rdma_port_up", "1 when the port state is ACTIVE.", labels=L)
    speed = GaugeMetricFamily("stoker_rdma_port_speed_bytes_per_second", "Link rate, only while active.", labels=L)
    traffic = {k: CounterMetricFamily(name, h, labels=L) for k, name, h in TRAFFIC}
    errors = CounterMetricFamily("stoker_rdma_port_errors", "Port error counters, by kernel file name.",
                                 labels=L + ["counter"])
    hw = CounterMetricFamily("stoker_rdma_hw_events", "hw_counters by kernel file name, wraps unwrapped.",
                             labels=L + ["counter"])
    for p in snapshot.ports:
        ids = [p.device, p.port]
        info.add_metric(ids + [p.interface, p.link_layer, p.fw_version], 1)
        if p.up is not None:
            up.add_metric(ids, 1 if p.up else 0)
        if p.speed_bytes_per_second is not None:
            speed.add_metric(ids, p.speed_bytes_per_second)
        for k, value in p.traffic.items():
            traffic[k].add_metric(ids, value)
        for name, value in p.errors.items():
            errors.add_metric(ids + [name], value)
        for name, value in p.hw_counters.items():
            if hw_counters is None or name in hw_counters:
                hw.add_metric(ids + [name], value)
    return [info, up, speed, *traffic.values(), errors, hw]
