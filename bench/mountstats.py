"""Parse cost of a mountstats file with 4 NFS mounts x 60 ops, against node_exporter's
mountstats collector on the same file, in one run.

Stoker: CPU time of `NfsSource.sample()` (read, parse, monotonic counters).
node_exporter: its own `node_scrape_collector_duration_seconds{collector="mountstats"}`
(read and parse, per scrape), averaged over the same number of scrapes.

    python -m bench.mountstats [--cycles N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request

from bench.common import emit, summary_ms
from bench.scrape import free_port, wait_http
from stoker.config import DEFAULT_NFS_OPERATIONS
from stoker.sources.nfs import NfsSource

NFS4_OPS = ("NULL READ WRITE COMMIT OPEN OPEN_CONFIRM OPEN_NOATTR OPEN_DOWNGRADE CLOSE SETATTR FSINFO RENEW "
            "SETCLIENTID SETCLIENTID_CONFIRM LOCK LOCKT LOCKU ACCESS GETATTR LOOKUP LOOKUP_ROOT REMOVE RENAME "
            "LINK SYMLINK CREATE PATHCONF STATFS READLINK READDIR SERVER_CAPS DELEGRETURN GETACL SETACL "
            "FS_LOCATIONS RELEASE_LOCKOWNER SECINFO FSID_PRESENT EXCHANGE_ID CREATE_SESSION DESTROY_SESSION "
            "SEQUENCE GET_LEASE_TIME RECLAIM_COMPLETE LAYOUTGET GETDEVICEINFO LAYOUTCOMMIT LAYOUTRETURN "
            "SECINFO_NO_NAME TEST_STATEID FREE_STATEID GETDEVICELIST BIND_CONN_TO_SESSION DESTROY_CLIENTID "
            "SEEK ALLOCATE DEALLOCATE LAYOUTSTATS CLONE COPY").split()[:60]


def write_procfs(root: str, mounts: int = 4) -> None:
    os.makedirs(os.path.join(root, "4242"))
    os.symlink("4242", os.path.join(root, "self"))
    stats, info = [], ["24 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw"]
    for i in range(mounts):
        export, mnt = f"powerscale.example:/ifs/vol{i}", f"/mnt/vol{i}"
        opts = "rw,vers=4.1,rsize=1048576,wsize=1048576,hard,proto=tcp,nconnect=4,sec=sys"
        stats += [f"device {export} mounted on {mnt} with fstype nfs4 statvers=1.1", f"\topts:\t{opts}",
                  "\tage:\t1000", "\tevents:\t" + " ".join(["1"] * 27),
                  f"\tbytes:\t{i}1000 {i}2000 0 0 {i}1000 {i}2000 10 20",
                  "\tRPC iostats version: 1.1  p/v: 100003/4 (nfs)"]
        stats += [f"\txprt:\ttcp {870 + k} 0 1 0 11 100 100 0 100 0 2 0 0" for k in range(4)]
        stats.append("\tper-op statistics")
        stats += [f"\t{op:>12}: {n} {n} 0 {n * 100} {n * 200} {n} {n * 2} {n * 3} 0"
                  for n, op in enumerate(NFS4_OPS, start=1)]
        stats.append("")
        info.append(f"{100 + i} 24 0:{50 + i} / {mnt} rw,relatime - nfs4 {export} {opts},addr=powerscale.example")
    with open(os.path.join(root, "4242", "mountstats"), "w") as fh:
        fh.write("\n".join(stats) + "\n")
    with open(os.path.join(root, "4242", "mountinfo"), "w") as fh:
        fh.write("\n".join(info) + "\n")


def node_exporter_durations(root: str, scrapes: int) -> list[float]:
    port = free_port()
    proc = subprocess.Popen(["prometheus-node-exporter", f"--path.procfs={root}", "--collector.disable-defaults",
                             "--collector.mountstats", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        out = []
        for _ in range(scrapes):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            for line in body.splitlines():
                if line.startswith('node_scrape_collector_duration_seconds{collector="mountstats"}'):
                    out.append(float(line.split()[-1]))
                if line.startswith('node_scrape_collector_success{collector="mountstats"}'):
                    assert line.endswith(" 1"), "node_exporter failed to parse the file"
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(cycles: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        write_procfs(root)
        source = NfsSource(root, DEFAULT_NFS_OPERATIONS, {})
        assert len(source.sample().mounts) == 4
        cpu, wall = [], []
        for _ in range(cycles):
            t0, w0 = time.thread_time(), time.perf_counter()
            source.sample()
            cpu.append(time.thread_time() - t0)
            wall.append(time.perf_counter() - w0)
        all_ops = NfsSource(root, tuple(NFS4_OPS), {})
        cpu_all = []
        for _ in range(cycles):
            t0 = time.thread_time()
            all_ops.sample()
            cpu_all.append(time.thread_time() - t0)
        ne = node_exporter_durations(root, cycles)
    s, ne_ms = summary_ms(wall), summary_ms(ne)
    return {
        "mounts": 4, "ops_per_mount": 60,
        "stoker_cycle_wall": s, "stoker_cycle_cpu": summary_ms(cpu),
        "stoker_cycle_cpu_all_60_ops_kept": summary_ms(cpu_all),
        "node_exporter_collector_duration": ne_ms,
        "ratio_stoker_over_node_exporter_p50": round(s["p50_ms"] / ne_ms["p50_ms"], 3),
        "stoker_core_share_at_1s": round(statistics.fmean(cpu), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("mountstats", run(args.cycles), args.out)


if __name__ == "__main__":
    main()
