"""NFS mount samples as the `stoker_nfs_*` families of METRICS.md."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stoker.sources.nfs import MS, NfsSnapshot

L = ["mountpoint", "operation"]
# (mountstats field, metric name, help, scale to base units)
PER_OP = [
    ("ops", "stoker_nfs_operations", "RPC operations completed.", 1.0),
    ("transmissions", "stoker_nfs_transmissions", "RPC transmissions (minus operations: retransmissions).", 1.0),
    ("major_timeouts", "stoker_nfs_major_timeouts", "Major timeouts.", 1.0),
    ("errors", "stoker_nfs_errors", "Operations that completed with an error.", 1.0),
    ("queue_ms", "stoker_nfs_queue_seconds", "Time requests waited in the client queue.", MS),
    ("rtt_ms", "stoker_nfs_rtt_seconds", "Round-trip time to the server.", MS),
    ("execute_ms", "stoker_nfs_execute_seconds", "Total time from queueing to completion.", MS),
]


def families(snapshot: NfsSnapshot):
    info = GaugeMetricFamily("stoker_nfs_mount_info", "NFS mount identity.",
                             labels=["mountpoint", "export", "version", "protocol", "nconnect", "role"])
    per_op = {f: CounterMetricFamily(name, h, labels=L) for f, name, h, _ in PER_OP}
    scale = {f: k for f, _, _, k in PER_OP}
    read = CounterMetricFamily("stoker_nfs_read_bytes", "Bytes read from the server.", labels=["mountpoint"])
    write = CounterMetricFamily("stoker_nfs_write_bytes", "Bytes written to the server.", labels=["mountpoint"])
    client_write = CounterMetricFamily("stoker_nfs_client_write_bytes", "Bytes applications wrote to the mount "
                                       "(page cache and O_DIRECT); those not yet in stoker_nfs_write_bytes_total "
                                       "wait for the server.", labels=["mountpoint"])
    for m in snapshot.mounts:
        info.add_metric([m.mountpoint, m.export, m.version, m.protocol, str(m.nconnect), m.role], 1)
        if m.read_bytes is not None:
            read.add_metric([m.mountpoint], m.read_bytes)
        if m.write_bytes is not None:
            write.add_metric([m.mountpoint], m.write_bytes)
        if m.client_write_bytes is not None:
            client_write.add_metric([m.mountpoint], m.client_write_bytes)
        for op, values in m.ops.items():
            for f, value in values.items():
                if f in per_op:  # per-op bytes are not exported: they would double the series
                    per_op[f].add_metric([m.mountpoint, op], value * scale[f])
    return [info, *per_op.values(), read, write, client_write]
