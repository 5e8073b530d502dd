"""NFS mountstats: parser, collector semantics, and agreement with node_exporter."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker.config import DEFAULT_NFS_OPERATIONS
from stoker.exporters import nfs as nfs_families
from stoker.exporters.exposition import render
from stoker.sources.mountstats import parse
from stoker.sources.nfs import NfsSource, role_of
from tests.conftest import free_port, need_binary, start_agent_process, wait_http

TEXTS = Path(__file__).parent / "fixtures" / "procfs" / "mountstats"
NODE = Path(__file__).parent / "fixtures" / "procfs" / "node"
ROLES = {"data": ("/mnt/data",), "checkpoint": ("/mnt/checkpoints",)}


def read(name: str) -> str:
    return (TEXTS / name).read_text()


def by_mount(mounts):
    return {m.mountpoint: m for m in mounts}


def test_nfsv3_statvers_10_with_8_field_ops():
    mounts, problems = parse(read("nfsv3_statvers10.txt"))
    assert problems == [] and [m.mountpoint for m in mounts] == ["/mnt/imagenet"]
    m = mounts[0]
    assert (m.version, m.protocol, m.nconnect, m.statvers) == ("3", "udp", 1, "1.0")
    assert m.ops["READ"] == {"ops": 1298, "transmissions": 1298, "major_timeouts": 0, "bytes_sent": 207680,
                             "bytes_received": 1210292152, "queue_ms": 6, "rtt_ms": 79386, "execute_ms": 79407}
    assert m.server_read_bytes == 1210214218 and m.server_write_bytes == 0


def test_nfsv41_nconnect_rdma_and_a_garbage_wrapped_value():
    mounts, problems = parse(read("nfsv41_nconnect_rdma.txt"))
    m = by_mount(mounts)
    assert list(m) == ["/mnt/data", "/mnt/checkpoints", "/mnt/data-bind"], "ext4 and rootfs are not NFS"
    data, ckpt = m["/mnt/data"], m["/mnt/checkpoints"]
    assert (data.version, data.protocol, data.nconnect, len(data.transports)) == ("4.1", "tcp", 4, 4)
    assert data.ops["LOOKUP"]["errors"] == 2210
    assert (ckpt.protocol, ckpt.transports) == ("rdma", ["rdma"])
    # 18446743919241604546 is a negative number printed unsigned: that one field is dropped
    assert "queue_ms" not in ckpt.ops["WRITE"] and ckpt.ops["WRITE"]["execute_ms"] == 5505024
    assert ckpt.dropped_fields == 1 and problems == []


def test_unknown_newer_statvers_is_parsed_as_far_as_understood():
    mounts, problems = parse(read("future_statvers.txt"))
    m = mounts[0]
    assert problems == [] and m.statvers == "1.2" and m.version == "4.2" and m.nconnect == 2
    assert m.ops["WRITE"] == {"ops": 5, "transmissions": 6, "major_timeouts": 1, "bytes_sent": 500,
                              "bytes_received": 60, "queue_ms": 0, "rtt_ms": 40, "execute_ms": 41, "errors": 1}


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.77, 0.9])
def test_truncated_text_never_raises_and_keeps_complete_mounts(cut):
    text = read("nfsv41_nconnect_rdma.txt")
    mounts, problems = parse(text[: int(len(text) * cut)])
    whole = by_mount(parse(text)[0])
    for m in mounts[:-1]:  # every mount before the cut is whole
        assert m.ops == whole[m.mountpoint].ops


def test_malformed_mount_is_skipped_and_counted_others_keep_values():
    text = read("nfsv41_nconnect_rdma.txt").replace(
        "        READ: 0 0 0 0 0 0 0 0 0", "        READ: 0 0 zero", 1)
    mounts, problems = parse(text)
    assert problems == ["malformed_mount"]
    assert [m.mountpoint for m in mounts] == ["/mnt/data", "/mnt/data-bind"]
    assert by_mount(mounts)["/mnt/data"].ops == by_mount(parse(read("nfsv41_nconnect_rdma.txt"))[0])["/mnt/data"].ops


def test_escaped_mountpoint():
    text = read("nfsv3_statvers10.txt").replace("/mnt/imagenet", "/mnt/image\\040net")
    assert parse(text)[0][0].mountpoint == "/mnt/image net"


def procfs(tmp_path: Path, text: str) -> Path:
    (tmp_path / "4242").mkdir(exist_ok=True)
    (tmp_path / "4242" / "mountstats").write_text(text)
    if not (tmp_path / "self").exists():
        (tmp_path / "self").symlink_to("4242")
    return tmp_path


def test_operations_are_limited_and_roles_assigned(tmp_path):
    source = NfsSource(str(procfs(tmp_path, read("nfsv41_nconnect_rdma.txt"))), DEFAULT_NFS_OPERATIONS, ROLES)
    snap = source.sample()
    m = {s.mountpoint: s for s in snap.mounts}
    assert "SEQUENCE" not in m["/mnt/data"].ops and "NULL" not in m["/mnt/data"].ops
    assert set(m["/mnt/data"].ops) <= set(DEFAULT_NFS_OPERATIONS)
    assert (m["/mnt/data"].role, m["/mnt/checkpoints"].role, m["/mnt/data-bind"].role) == ("data", "checkpoint", "other")
    assert snap.problems == ["implausible_value"]


def test_role_prefix_matches_at_path_boundaries():
    roles = {"data": ("/mnt/data",), "checkpoint": ("/mnt/data/ckpt",)}
    assert role_of("/mnt/data", roles) == "data"
    assert role_of("/mnt/data/ckpt/run1", roles) == "checkpoint"
    assert role_of("/mnt/database", roles) == "other"


def test_counter_decrease_is_a_reset_of_that_counter(tmp_path):
    text = read("nfsv3_statvers10.txt")
    root = procfs(tmp_path, text)
    source = NfsSource(str(root), DEFAULT_NFS_OPERATIONS, ROLES)
    first = source.sample().mounts[0]
    (root / "4242" / "mountstats").write_text(text.replace("READ: 1298 1298 0 207680 1210292152 6 79386 79407",
                                                           "READ: 10 10 0 1600 9000000 0 500 510"))
    second = source.sample().mounts[0]
    assert second.ops["READ"]["ops"] == first.ops["READ"]["ops"] + 10
    assert second.ops["GETATTR"] == first.ops["GETATTR"]


def test_idle_operations_keep_their_totals_and_a_mount_over_it_starts_afresh(tmp_path):
    """Idle operations are not counted again each cycle; a mount over the same mountpoint showing the
    very same numbers is still a new baseline, and what it does next is counted from there."""
    text = read("nfsv3_statvers10.txt")
    root = procfs(tmp_path, text)
    source = NfsSource(str(root), DEFAULT_NFS_OPERATIONS, ROLES)
    first = source.sample().mounts[0]
    assert source.sample().mounts[0].ops == first.ops
    block = text[text.index("device "):]
    (root / "4242" / "mountstats").write_text(text + block)  # mounted over, same numbers
    over = source.sample().mounts[0]
    assert over.ops == first.ops
    moved = block.replace("READ: 1298 1298 0", "READ: 1300 1300 0")
    (root / "4242" / "mountstats").write_text(text + moved)
    assert source.sample().mounts[0].ops["READ"]["ops"] == first.ops["READ"]["ops"] + 2


def test_parse_skips_operations_not_asked_for():
    mounts, problems = parse(read("nfsv41_nconnect_rdma.txt").replace("SEQUENCE:", "SEQUENCE: x"), ("READ",))
    assert problems == [] and {tuple(m.ops) for m in mounts if m.ops} == {("READ",)}
    assert parse(read("nfsv41_nconnect_rdma.txt").replace("SEQUENCE:", "SEQUENCE: x"))[1]  # all: malformed


def test_missing_mountstats_is_empty_not_an_error(tmp_path):
    snap = NfsSource(str(tmp_path), DEFAULT_NFS_OPERATIONS, ROLES).sample()
    assert snap.mounts == [] and snap.problems == []


def test_families_in_base_units(tmp_path):
    source = NfsSource(str(procfs(tmp_path, read("nfsv3_statvers10.txt"))), DEFAULT_NFS_OPERATIONS, ROLES)
    text = render(nfs_families.families(source.sample())).decode()
    assert 'stoker_nfs_rtt_seconds_total{mountpoint="/mnt/imagenet",operation="READ"} 79.386' in text
    assert 'stoker_nfs_read_bytes_total{mountpoint="/mnt/imagenet"} 1.210214218e+09' in text
    assert 'nconnect="1",protocol="udp",role="other",version="3"' in text


# -- agreement with node_exporter ---------------------------------------------------------------

SAME = {
    "node_mountstats_nfs_operations_requests_total": "stoker_nfs_operations_total",
    "node_mountstats_nfs_operations_transmissions_total": "stoker_nfs_transmissions_total",
    "node_mountstats_nfs_operations_major_timeouts_total": "stoker_nfs_major_timeouts_total",
    "node_mountstats_nfs_operations_queue_time_seconds_total": "stoker_nfs_queue_seconds_total",
    "node_mountstats_nfs_operations_response_time_seconds_total": "stoker_nfs_rtt_seconds_total",
    "node_mountstats_nfs_operations_request_time_seconds_total": "stoker_nfs_execute_seconds_total",
    "node_mountstats_nfs_total_read_bytes_total": "stoker_nfs_read_bytes_total",
    "node_mountstats_nfs_total_write_bytes_total": "stoker_nfs_write_bytes_total",
}


def scrape(url: str) -> list:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


@pytest.mark.slow
def test_mountstats_equal_node_exporter(tmp_path):
    """The node fixture is the committed texts less the RDMA mount: node_exporter 1.5.0
    rejects a whole mountstats file with an `xprt: rdma` line (Stoker parses it, above)."""
    binary = need_binary("prometheus-node-exporter")
    ne_port, st_port = free_port(), free_port()
    config = tmp_path / "stoker.toml"
    config.write_text("[gpu]\nenabled = false\n[rdma]\nenabled = false\n[netdev]\nenabled = false\n")
    ne = subprocess.Popen([binary, f"--path.procfs={NODE}", "--collector.disable-defaults", "--collector.mountstats",
                           f"--web.listen-address=127.0.0.1:{ne_port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent = start_agent_process("--config", str(config), "--procfs-root", str(NODE), "--listen", f"127.0.0.1:{st_port}")
    try:
        wait_http(f"http://127.0.0.1:{ne_port}/metrics")
        wait_http(f"http://127.0.0.1:{st_port}/metrics")
        for _ in range(50):
            ours = scrape(f"http://127.0.0.1:{st_port}/metrics")
            if any(s.name == "stoker_nfs_mount_info" for s in ours):
                break
            time.sleep(0.1)
        theirs = scrape(f"http://127.0.0.1:{ne_port}/metrics")
        assert any(s.name == "node_scrape_collector_success" and s.value == 1 for s in theirs)
        exports = {s.labels["mountpoint"]: s.labels["export"] for s in ours if s.name == "stoker_nfs_mount_info"}
        index = {(s.name, s.labels["mountpoint"], s.labels.get("operation")): s.value
                 for s in ours if "mountpoint" in s.labels}
        compared = 0
        for s in theirs:
            if s.name not in SAME:
                continue
            op = s.labels.get("operation")
            if op is not None and op not in DEFAULT_NFS_OPERATIONS:
                continue  # Stoker keeps only the configured operations
            for mountpoint, export in exports.items():
                if export != s.labels["export"]:
                    continue
                # the same superblock under two mountpoints: both report it, neither double counts
                ours_value = index[(SAME[s.name], mountpoint, op)]
                assert ours_value == pytest.approx(s.value, rel=1e-12), (s.name, mountpoint, op)
                compared += 1
        assert compared >= 40
    finally:
        for proc in (ne, agent):
            proc.terminate()
            proc.wait(timeout=10)



# -- names the kernel prints raw ------------------------------------------------------------------

RAW_NAME_BYTES = [b"\x0b", b"\x0c", b"\r", b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\xc2\x85", b"\xe2\x80\xa8"]


def header(export: bytes, mountpoint: bytes) -> bytes:
    return (b"device " + export + b" mounted on " + mountpoint + b" with fstype nfs4 statvers=1.1\n"
            b"\topts:\trw,vers=4.1,proto=tcp\n\tbytes:\t1 2 3 4 5 6 7 8\n\txprt:\ttcp 1 2 3\n"
            b"\tper-op statistics\n\t        READ: 7 7 0 0 0 0 0 0 0\n\n")


@pytest.mark.parametrize("raw", RAW_NAME_BYTES, ids=lambda b: b.hex())
def test_a_mountpoint_with_a_character_the_kernel_prints_raw_is_parsed_and_exported(tmp_path, raw):
    """show_vfsstat (torvalds/linux fs/proc_namespace.c) writes the mountpoint with seq_path and the
    device with seq_escape, both escaping " \\t\\n\\\\" only (fs/seq_file.c mangle_path, seq_escape): a
    vertical tab, form feed, carriage return, \\x1c-\\x1f, NEL or U+2028 in a directory name comes as it
    is. str.splitlines and str.split break at each of those: the mount was dropped without a word."""
    (tmp_path / "self").mkdir()
    name = b"/mnt/a" + raw + b"b"
    (tmp_path / "self" / "mountstats").write_bytes(
        header(b"nas:/ifs/x" + raw, name) + header(b"nas:/ifs/data", b"/mnt/data"))
    snap = NfsSource(str(tmp_path), DEFAULT_NFS_OPERATIONS, ROLES).sample()
    decoded = name.decode()
    assert snap.problems == [] and [m.mountpoint for m in snap.mounts] == [decoded, "/mnt/data"]
    weird = snap.mounts[0]
    assert (weird.export, weird.read_bytes, weird.ops["READ"]["ops"]) == ("nas:/ifs/x" + raw.decode(), 5, 7)
    body = render(nfs_families.families(snap))
    labels = {s.labels["mountpoint"] for f in text_string_to_metric_families(body.decode()) for s in f.samples
              if s.name == "stoker_nfs_read_bytes_total"}
    assert labels == {decoded, "/mnt/data"}
    lint = subprocess.run([need_binary("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert lint.returncode == 0, lint.stderr.decode() + lint.stdout.decode()


def test_a_mountpoint_that_is_not_utf8_is_exported_with_its_bytes_escaped(tmp_path):
    """A directory name is bytes: one that is not UTF-8 must still give a label Prometheus accepts (label
    values are UTF-8), and two such names must stay two series."""
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountstats").write_bytes(
        header(b"nas:/x", b"/mnt/caf\xe9") + header(b"nas:/y", b"/mnt/caf\xe8") + header(b"nas:/z", "/mnt/café".encode()))
    snap = NfsSource(str(tmp_path), DEFAULT_NFS_OPERATIONS, ROLES).sample()
    assert [m.mountpoint for m in snap.mounts] == ["/mnt/caf\\xe9", "/mnt/caf\\xe8", "/mnt/café"]
    body = render(nfs_families.families(snap))
    labels = {s.labels["mountpoint"] for f in text_string_to_metric_families(body.decode()) for s in f.samples
              if s.name == "stoker_nfs_read_bytes_total"}
    assert labels == {"/mnt/caf\\xe9", "/mnt/caf\\xe8", "/mnt/café"}
