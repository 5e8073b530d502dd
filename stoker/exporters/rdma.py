"""RDMA port samples as the `stoker_rdma_*` families of METRICS.md."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stoker.sources.rdma import RdmaSnapshot

L = ["device", "port"]
TRAFFIC = [
    ("transmit_bytes", "stoker_rdma_port_transmit_bytes", "RoCE/IB bytes sent (port_xmit_data x 4)."),
    ("receive_bytes", "stoker_rdma_port_receive_bytes", "RoCE/IB bytes received (port_rcv_data x 4)."),
    ("transmit_packets", "stoker_rdma_port_transmit_packets", "Packets sent."),
    ("receive_packets", "stoker_rdma_port_receive_packets", "Packets received."),
]


def families(snapshot: RdmaSnapshot):
    info = GaugeMetricFamily("stoker_rdma_port_info", "RDMA port identity and its netdev.",
                             labels=L + ["interface", "link_layer", "fw_version"])
    up = GaugeMetricFamily("stoker_rdma_port_up", "1 when the port state is ACTIVE.", labels=L)
    speed = GaugeMetricFamily("stoker_rdma_port_speed_bytes_per_second", "Link rate, only while active.", labels=L)
    traffic = {k: CounterMetricFamily(name, h, labels=L) for k, name, h in TRAFFIC}
    errors = CounterMetricFamily("stoker_rdma_port_errors", "Port error counters, by kernel file name.",
                                 labels=L + ["counter"])
    hw = CounterMetricFamily("stoker_rdma_hw_counter", "hw_counters by kernel file name, wraps unwrapped.",
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
            hw.add_metric(ids + [name], value)
    return [info, up, speed, *traffic.values(), errors, hw]
