"""Property: no text makes the mountstats collector raise, and one damaged mount never
changes what is read for the others."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stoker.config import DEFAULT_NFS_OPERATIONS
from stoker.sources.mountstats import parse
from stoker.sources.nfs import NfsSource

TEXT = (Path(__file__).parent / "fixtures" / "procfs" / "mountstats" / "nfsv41_nconnect_rdma.txt").read_text()
BLOCKS = TEXT.split("\ndevice ")
# the /mnt/checkpoints block is damaged; /mnt/data and /mnt/data-bind must be unaffected
VICTIM = next(i for i, b in enumerate(BLOCKS) if "mounted on /mnt/checkpoints " in b)
CLEAN = {m.mountpoint: m for m in parse(TEXT)[0]}

tokens = st.sampled_from(["\t", " ", ":", "\n", "device ", "per-op statistics", "xprt:", "bytes:", "opts:",
                          "18446744073709551615", "-1", "N/A", "READ", "0", "1.1", "statvers=9.9", "\x00"])


@st.composite
def mutated_block(draw) -> str:
    block = "device " + BLOCKS[VICTIM]
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(block)))
        how = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.one_of(tokens, st.text(max_size=12)))
        if how == "insert":
            block = block[:pos] + piece + block[pos:]
        elif how == "delete":
            block = block[:pos] + block[pos + draw(st.integers(1, 40)):]
        else:
            block = block[:pos] + piece + block[pos + len(piece):]
    if not block.endswith("\n"):
        block += "\n"
    return block


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_random_text_never_raises(text):
    mounts, problems = parse(text)
    assert isinstance(mounts, list) and isinstance(problems, list)


@settings(max_examples=300, deadline=None)
@given(mutated_block())
def test_damage_to_one_mount_leaves_the_others_alone(block):
    if "device " in block[1:] or block.count("mounted on") != 1:
        return  # the mutation forged another mount header: not one damaged mount any more
    text = "\ndevice ".join(BLOCKS[:VICTIM]) + "\n" + block + "\ndevice " + "\ndevice ".join(BLOCKS[VICTIM + 1:])
    mounts, _ = parse(text)
    got = {m.mountpoint: m for m in mounts}
    for mountpoint in ("/mnt/data", "/mnt/data-bind"):
        assert got[mountpoint].ops == CLEAN[mountpoint].ops
        assert got[mountpoint].server_read_bytes == CLEAN[mountpoint].server_read_bytes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000))
def test_collector_survives_any_bytes(tmp_path, data):
    (tmp_path / "self").mkdir(exist_ok=True)
    (tmp_path / "self" / "mountstats").write_bytes(data)
    snapshot = NfsSource(str(tmp_path), DEFAULT_NFS_OPERATIONS, {}).sample()
    assert all(m.mountpoint for m in snapshot.mounts)
