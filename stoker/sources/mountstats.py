"""NFS client statistics from `<procfs>/self/mountstats` (reading it sends no RPC).

The format (fs/nfs/super.c, net/sunrpc/stats.c) per NFS mount:

    device SERVER:/EXPORT mounted on /MNT with fstype nfs4 statvers=1.1
        opts:   rw,vers=4.1,...,proto=tcp,nconnect=8,...
        bytes:  normalread normalwrite directread directwrite serverread serverwrite readpages writepages
        RPC iostats version: 1.1  p/v: 100003/4 (nfs)
        xprt:   tcp ...          (one line per transport: several with nconnect; tcp, udp or rdma)
        per-op statistics
                READ: ops trans timeouts bytes_sent bytes_recv queue_ms rtt_ms execute_ms [errors]

Tolerance, by design: unknown keys (`impl_id:`, `caps:`, newer ones) are
skipped; an unknown newer statvers is parsed as far as the known fields go; an
op line has 8 fields (statvers 1.0) or 9 (1.1 added errors) or more (later
kernels: the first 9 are read). A value the kernel printed from a negative
number (18446743919241604546 is seen in real files) is dropped, that one
field only. A mount whose block cannot be parsed at all is skipped and counted;
the others keep their values. Damage stays where it is: a header whose
mountpoint escape is not one the kernel writes (`\\089`) skips its own block,
and parsing is linear in the text whatever it holds (blank lines within a
block included), so a damaged file costs no more than a clean one.

Names are printed as they are but for four characters: show_vfsstat
(fs/proc_namespace.c) escapes the device and the mountpoint with seq_escape and
seq_path (fs/seq_file.c) for " \\t\\n\\\\" only. Every other byte comes raw:
\\x0b, \\x0c, \\r, \\x1c-\\x1f, bytes that are not UTF-8. So lines end at "\\n" only
and a header's fields are separated by " " only (str.splitlines and str.split
break at all of those, and dropped such a mount without a word), and a name
that is not UTF-8 (NfsSource decodes with surrogateescape) gets its stray bytes
written as \\xNN: a label value must be UTF-8, or the whole exposition fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Collection

OP_FIELDS = ("ops", "transmissions", "major_timeouts", "bytes_sent", "bytes_received",
             "queue_ms", "rtt_ms", "execute_ms", "errors")
NFS_FSTYPES = ("nfs", "nfs4")
IMPLAUSIBLE = 1 << 63  # a u64 this large was a negative number in the kernel


class MountstatsError(ValueError):
    pass


@dataclass
class NfsMount:
    export: str
    mountpoint: str
    fstype: str
    statvers: str = ""
    version: str = ""
    protocol: str = ""
    nconnect: int = 1
    transports: list[str] = field(default_factory=list)
    server_read_bytes: int | None = None
    server_write_bytes: int | None = None
    client_write_bytes: int | None = None  # what applications wrote (page cache + O_DIRECT)
    ops: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_fields: int = 0  # implausible values left out


ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str | None:
    """Mountpoints escape space, tab, newline and backslash as three octal digits
    (\\040); None when a backslash starts anything else (the kernel escapes every
    backslash, so the name is damaged)."""
    if "\\" not in text:
        return text
    if text.count("\\") != len(ESCAPE.findall(text)):
        return None
    return ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def label_text(name: str) -> str:
    """`name` as UTF-8 text: bytes that are not UTF-8 (surrogate escapes) as \\xNN."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no byte decodes to (a caller's str)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _header(line: str) -> tuple[str, str, str, str] | None:
    """`device X mounted on Y with fstype Z [statvers=V]` -> (X, Y, Z, V); spaces in X and Y are escaped."""
    parts = line.rstrip(" \t").split(" ")
    if len(parts) not in (8, 9) or parts[2:4] != ["mounted", "on"] or parts[5:7] != ["with", "fstype"]:
        return None
    export, mountpoint = _unescape(parts[1]), _unescape(parts[4])
    if export is None or mountpoint is None or not export or not mountpoint:
        return None
    statvers = parts[8].partition("=")[2] if len(parts) == 9 else ""
    return label_text(export), label_text(mountpoint), parts[7], statvers


def parse(text: str, operations: Collection[str] | None = None) -> tuple[list[NfsMount], list[str]]:
    """All NFS mounts in a mountstats text, and the reasons of the blocks that were skipped. With
    `operations`, the per-op lines of the others are not parsed (NFSv4 has ~60, the agent keeps 9)."""
    mounts: list[NfsMount] = []
    problems: list[str] = []
    block: list[str] = []
    head: tuple[str, str, str, str] | None = None

    def flush() -> None:
        if head is None or head[2] not in NFS_FSTYPES:
            return
        try:
            mounts.append(_mount(head, block, operations))
        except (MountstatsError, ValueError, IndexError):
            problems.append("malformed_mount")

    orphans = False
    in_ops = False  # the block reached its per-op section (a flag: rescanning the block per line is quadratic)
    for line in text.split("\n"):
        if line.startswith("no device "):  # a mount without a device name: never NFS
            flush()
            head, block, in_ops, orphans = None, [], False, True
        elif line.startswith("device "):
            flush()
            head, block, in_ops = _header(line), [], False
            orphans = head is None  # the body of a damaged header is counted with it, not again
            if head is None:
                problems.append("malformed_header")
        elif not line.strip():
            if head is not None and in_ops:
                flush()  # the kernel ends each NFS block with a blank line after its per-op section
                head, block = None, []
        elif head is not None and (not line[0].isspace() or " mounted on " in line):
            # a damaged header: it ends the block before it rather than being read as part of it
            flush()
            head, block, orphans = None, [], True
            problems.append("malformed_header")
        elif head is not None:
            block.append(line)
            in_ops = in_ops or line.strip() == "per-op statistics"
        elif not orphans:
            orphans = True  # lines outside any mount (a damaged header came before them)
            problems.append("orphan_lines")
    flush()
    return mounts, problems


def _number(token: str, mount: NfsMount) -> int | None:
    value = int(token)
    if value < 0 or value >= IMPLAUSIBLE:
        mount.dropped_fields += 1
        return None
    return value


def _mount(head: tuple[str, str, str, str], lines: list[str], operations: Collection[str] | None) -> NfsMount:
    export, mountpoint, fstype, statvers = head
    m = NfsMount(export, mountpoint, fstype, statvers)
    in_ops = False
    saw_ops_header = False
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line == "per-op statistics":
            in_ops = saw_ops_header = True
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise MountstatsError(f"unexpected line {line[:40]!r}")
        if in_ops:
            if operations is None or key.strip() in operations:
                _op(m, key, rest.split())
        elif key == "opts":
            _opts(m, rest.strip())
        elif key == "bytes":
            values = rest.split()
            if len(values) >= 6:
                m.server_read_bytes = _number(values[4], m)
                m.server_write_bytes = _number(values[5], m)
                normal, direct = _number(values[1], m), _number(values[3], m)
                if normal is not None and direct is not None:
                    m.client_write_bytes = normal + direct
            else:
                raise MountstatsError("short bytes line")
        elif key == "xprt":
            tokens = rest.split()
            if tokens:
                m.transports.append(tokens[0])
        # anything else (age, caps, sec, events, impl_id, nfsv4, RPC iostats, ...) is not needed
    if not saw_ops_header and fstype in NFS_FSTYPES and statvers:
        raise MountstatsError("no per-op statistics")
    if m.transports:
        m.protocol = m.protocol or m.transports[0]
        m.nconnect = max(m.nconnect, len(m.transports))
    return m


def _opts(m: NfsMount, opts: str) -> None:
    for option in opts.split(","):
        name, _, value = option.partition("=")
        if name == "vers":
            m.version = value
        elif name == "proto":
            m.protocol = value
        elif name == "nconnect" and value.isascii() and value.isdigit():
            m.nconnect = int(value)


def _op(m: NfsMount, name: str, values: list[str]) -> None:
    if len(values) < 8:
        raise MountstatsError(f"op {name}: {len(values)} fields")
    parsed: dict[str, int] = {}
    for key, token in zip(OP_FIELDS, values):
        number = _number(token, m)
        if number is not None:
            parsed[key] = number
    m.ops[name.strip()] = parsed
