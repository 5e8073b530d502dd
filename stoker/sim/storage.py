"""The simulated node's PowerScale mounts: a `/proc/self/mountstats` that moves, and probe directories.

Two NFS mounts, as on the XE9680 nodes: training data (NFSv4.1 over TCP,
nconnect=8) and checkpoints (NFSv4.1 over RDMA). Reads follow the GPU phase
(the input pipeline reads while the GPUs compute). Checkpoint writes follow
the `checkpoint` phase as the kernel sees them: the job's writes land in the
page cache (`bytes:` normalwrite) and write-back sends them to the server
(serverwrite) as fast as the NAS takes them; once `DIRTY_LIMIT` bytes are
waiting, the job's writes block. The scenario's storage condition slows reads,
slows or stops write-back, or hangs the NAS (no RPC completes). Where the NAS
does not answer, the probe directory gets a FIFO where the probe opens its
file, so a probe blocks in open() as on a hung hard mount.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from stoker.probe_child import CHECK_TAG, probe_file
from stoker.sim.node import SimNode, Ticker

PID = "4242"
MIB = 1 << 20
OPS = ("NULL", "READ", "WRITE", "COMMIT", "OPEN", "CLOSE", "GETATTR", "SETATTR", "LOOKUP", "ACCESS",
       "READDIR", "CREATE", "REMOVE", "RENAME", "FSINFO", "PATHCONF", "SERVER_CAPS", "SEQUENCE",
       "LAYOUTGET", "GETDEVICEINFO")
OP_FIELDS = 9  # statvers 1.1: ops trans timeouts bytes_sent bytes_recv queue rtt execute errors

# (ms queue, ms rtt, ms execute) per op, by storage condition
LATENCY = {
    "normal": {"READ": (0.05, 1.4, 1.6), "WRITE": (0.1, 2.5, 2.8), "COMMIT": (0.05, 4.0, 4.1), "*": (0.01, 0.3, 0.35)},
    "slow-read": {"READ": (55.0, 38.0, 95.0), "WRITE": (0.1, 2.5, 2.8), "COMMIT": (0.05, 4.0, 4.1), "*": (2.0, 6.0, 8.5)},
    "slow-write": {"READ": (0.05, 1.4, 1.6), "WRITE": (180.0, 120.0, 310.0), "COMMIT": (60.0, 900.0, 960.0), "*": (0.5, 2.0, 2.6)},
}
READ_BYTES_PER_BUSY_S = 2.4e9  # input pipeline at full GPU load, bytes/s from the data mount
CHECKPOINT_BYTES_PER_S = 1.25e9  # what the job hands to the page cache while it writes a checkpoint
SERVER_WRITE_BYTES_PER_S = {"slow-write": 4e6, "write-stall": 0.0, "hung": 0.0}  # else the NAS keeps up
DIRTY_LIMIT = 512 * MIB  # NFS write-back throttles a writer once this much waits for the server



@dataclass
class SimMount:
    export: str
    mountpoint: str
    role: str
    opts: str
    transport: str
    xprts: int
    probe_dir: str = ""
    ops: dict[str, list[float]] = field(default_factory=dict)
    bytes: list[float] = field(default_factory=lambda: [0.0] * 8)
    dirty: float = 0.0  # written by the job, not yet by the server


def _opts(vers: str, proto: str, nconnect: int) -> str:
    return (f"rw,vers={vers},rsize=1048576,wsize=1048576,namlen=255,acregmin=3,acregmax=60,acdirmin=30,"
            f"acdirmax=60,hard,proto={proto},nconnect={nconnect},timeo=600,retrans=2,sec=sys,"
            "clientaddr=10.40.1.17,local_lock=none")


class SimStorage:
    def __init__(self, node: SimNode, procfs_root: str, probe_root: str, hostname: str, extra_mounts: int = 0):
        """`extra_mounts` more data mounts that only answer metadata calls (for scaling benchmarks)."""
        self.node = node
        self.procfs_root = procfs_root
        self.hostname = hostname
        self.mounts = [
            SimMount("powerscale-nfs.example:/ifs/training", "/mnt/data", "data",
                     _opts("4.1", "tcp", 8), "tcp", 8),
            SimMount("powerscale-nfs.example:/ifs/checkpoints", "/mnt/checkpoints", "checkpoint",
                     _opts("4.1", "rdma", 4), "rdma", 4),
        ] + [SimMount(f"powerscale-nfs.example:/ifs/scratch{i}", f"/mnt/scratch{i}", "other",
                      _opts("4.1", "tcp", 2), "tcp", 2) for i in range(extra_mounts)]
        for m in self.mounts:
            m.probe_dir = os.path.join(probe_root, m.mountpoint.strip("/").replace("/", "_"))
            m.ops = {op: [0.0] * OP_FIELDS for op in OPS}
            m.ops["GETATTR"][0] = m.ops["GETATTR"][1] = 81_000.0
            m.ops["LOOKUP"][0] = m.ops["LOOKUP"][1] = 12_500.0
        self._lock = threading.Lock()
        self._ticker = Ticker(node)
        self._blocked: set[str] = set()  # mountpoints whose probes block
        self.blocked_since: dict[str, float] = {}  # mountpoint -> scenario time it stopped answering

    def build(self) -> None:
        proc = os.path.join(self.procfs_root, PID)
        os.makedirs(proc, exist_ok=True)
        link = os.path.join(self.procfs_root, "self")
        if not os.path.islink(link):
            os.symlink(PID, link)
        for m in self.mounts:
            os.makedirs(m.probe_dir, exist_ok=True)
        self._write_mountinfo()
        self.advance()

    def advance(self) -> None:
        with self._lock:
            t, dt = self._ticker.tick()
            condition = self.node.step().storage
            blocked = {"hung": self.mounts, "write-stall": [m for m in self.mounts if m.role == "checkpoint"]}
            self._block({m.mountpoint for m in blocked.get(condition, [])}, t)
            if condition != "hung":
                self._move(t, dt, condition)
            else:  # no RPC completes; the job's writes still fill the page cache until they block
                self._write_back(self.mounts[1], dt, self.node.gpu_phase(t - dt / 2) == "checkpoint", condition)
            self._write()

    def _move(self, t: float, dt: float, condition: str) -> None:
        mid = t - dt / 2  # what the job did over the interval, not at its end
        phase = self.node.gpu_phase(mid)
        busy = sum(self.node.gpu_row(g, mid)["gpm_sm_util"] for g in range(self.node.gpu_count)) / self.node.gpu_count / 100
        data, ckpt = self.mounts[:2]
        read_rate = READ_BYTES_PER_BUSY_S * max(busy, 0.05 if phase != "idle_after" else 0.0)
        if condition == "slow-read":
            read_rate = min(read_rate, 0.25e9)  # the NAS cannot keep up: the GPUs wait
        self._io(data, "READ", read_rate * dt, condition)
        self._meta(data, dt, condition)
        self._write_back(ckpt, dt, phase == "checkpoint", condition)
        self._meta(ckpt, dt * 0.2, condition)
        for extra in self.mounts[2:]:
            self._meta(extra, dt * 0.1, condition)

    def _write_back(self, m: SimMount, dt: float, writing: bool, condition: str) -> None:
        """The job's checkpoint writes into the page cache, and write-back to the server; the job
        blocks once `DIRTY_LIMIT` bytes wait."""
        capacity = SERVER_WRITE_BYTES_PER_S.get(condition, CHECKPOINT_BYTES_PER_S) * dt
        if writing:
            handed = max(0.0, min(CHECKPOINT_BYTES_PER_S * dt, DIRTY_LIMIT - m.dirty + capacity))
            m.bytes[1] += handed
            m.dirty += handed
        flushed = min(m.dirty, capacity)
        if flushed > 0:
            m.dirty -= flushed
            self._io(m, "WRITE", flushed, condition)
            self._ops(m, "COMMIT", 2 * dt, 0, condition)

    def _io(self, m: SimMount, op: str, nbytes: float, condition: str) -> None:
        """RPCs that moved `nbytes` to or from the server (reads bypass the page cache here)."""
        count = nbytes / MIB
        if op == "READ":
            m.bytes[0] += nbytes
            m.bytes[4] += nbytes
            self._ops(m, op, count, nbytes, condition, received=True)
        else:
            m.bytes[5] += nbytes
            self._ops(m, op, count, nbytes, condition)

    def _meta(self, m: SimMount, dt: float, condition: str) -> None:
        for op, per_s in (("GETATTR", 40.0), ("LOOKUP", 6.0), ("ACCESS", 3.0), ("OPEN", 1.0), ("CLOSE", 1.0)):
            self._ops(m, op, per_s * dt, 0, condition)

    def _ops(self, m: SimMount, op: str, count: float, payload: float, condition: str, received: bool = False) -> None:
        q, rtt, execute = LATENCY.get(condition, LATENCY["normal"]).get(op, LATENCY["normal"]["*"])
        row = m.ops[op]
        row[0] += count
        row[1] += count
        row[3] += (payload if not received else 0) + 200 * count
        row[4] += (payload if received else 0) + 120 * count
        row[5] += q * count
        row[6] += rtt * count
        row[7] += execute * count

    def _block(self, mountpoints: set[str], t: float) -> None:
        """Make the probes of these mounts block (and only these)."""
        self.blocked_since = {mp: self.blocked_since.get(mp, t) for mp in mountpoints}
        if mountpoints == self._blocked:
            return
        for m in self.mounts:
            if (m.mountpoint in mountpoints) == (m.mountpoint in self._blocked):
                continue
            for tag in ("", CHECK_TAG):  # the service's probes and `stoker check`'s
                path = os.path.join(m.probe_dir, probe_file(self.hostname, tag))
                if os.path.lexists(path):
                    os.unlink(path)
                if m.mountpoint in mountpoints:
                    os.mkfifo(path)
        self._blocked = mountpoints

    def _write(self) -> None:
        lines = ["device rootfs mounted on / with fstype rootfs",
                 "device proc mounted on /proc with fstype proc",
                 "device /dev/nvme0n1p2 mounted on /raid with fstype ext4"]
        for m in self.mounts:
            lines += [f"device {m.export} mounted on {m.mountpoint} with fstype nfs4 statvers=1.1",
                      f"\topts:\t{m.opts}",
                      "\tage:\t864000",
                      "\timpl_id:\tname='',domain='',date='0,0'",
                      "\tcaps:\tcaps=0x3ffbffff,wtmult=512,dtsize=1048576,bsize=0,namlen=255",
                      "\tnfsv4:\tbm0=0xfdffbfff,bm1=0xf9be3e,bm2=0x68800,acl=0x3,sessions,pnfs=not configured,lease_time=90,lease_expired=0",
                      "\tsec:\tflavor=1,pseudoflavor=1",
                      "\tevents:\t" + " ".join(["0"] * 27),
                      "\tbytes:\t" + " ".join(str(int(b)) for b in m.bytes),
                      "\tRPC iostats version: 1.1  p/v: 100003/4 (nfs)"]
            for i in range(m.xprts):
                if m.transport == "rdma":
                    lines.append(f"\txprt:\trdma 0 0 1 0 0 {i * 10} {i * 10} 0 {i * 10} 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0")
                else:
                    lines.append(f"\txprt:\ttcp {870 + i} 0 1 0 11 {i * 10} {i * 10} 0 {i * 10} 0 2 0 0")
            lines.append("\tper-op statistics")
            for op, row in m.ops.items():
                lines.append(f"\t{op:>12}: " + " ".join(str(int(v)) for v in row))
            lines.append("")
        self._replace("mountstats", "\n".join(lines) + "\n")

    def _write_mountinfo(self) -> None:
        """Static; node_exporter's mountstats collector needs it beside mountstats."""
        lines = ["24 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw",
                 "25 24 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw"]
        for i, m in enumerate(self.mounts):
            server = m.export.split(":")[0]
            lines.append(f"{101 + i} 24 0:{52 + i} / {m.mountpoint} rw,relatime shared:{60 + i} - nfs4 "
                         f"{m.export} {m.opts},addr={server}")
        self._replace("mountinfo", "\n".join(lines) + "\n")

    def _replace(self, name: str, text: str) -> None:
        """Write whole or not at all: a reader never sees half a file."""
        path = os.path.join(self.procfs_root, PID, name)
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
