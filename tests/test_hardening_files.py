"""Kernel files that lie, block or churn: each defect a tester measured, reproduced at the
file-system boundary (a fixture tree passed as the sysfs or procfs root)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker.config import DEFAULT_NFS_OPERATIONS
from stoker.counters import FORGET_AFTER
from stoker.exporters import nfs as nfs_families
from stoker.exporters import rdma as rdma_families
from stoker.exporters.exposition import render
from stoker.sources.mountstats import parse
from stoker.sources.nfs import NfsSource
from stoker.sources.rdma import RdmaSource
from tests.conftest import ManualClock

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
MOUNTSTATS = Path(__file__).parent / "fixtures" / "procfs" / "mountstats"
U64_MAX = (1 << 64) - 1


@pytest.fixture
def small(tmp_path) -> Path:
    root = tmp_path / "sys"
    shutil.copytree(SYSFS / "small", root, symlinks=True)
    return root


def port_dir(root: Path, port: str = "1", device: str = "rocep24s0f0") -> Path:
    return root / "class" / "infiniband" / device / "ports" / port


def ports(snapshot):
    return {(p.device, p.port): p for p in snapshot.ports}


def series(body: bytes) -> list[tuple[str, tuple]]:
    """Every sample of an exposition as (name, sorted labels)."""
    return [(s.name, tuple(sorted(s.labels.items())))
            for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def sample_in_thread(source, seconds: float = 10.0):
    """(finished, snapshot or exception): a read that blocks on a FIFO never finishes."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = source.sample()
        except Exception as exc:  # handed to the test, which says what it expected
            result["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), result.get("value")


def release(fifo: Path) -> None:
    """Give a reader blocked in open() on the FIFO its end of file, so its thread ends."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader is waiting: nothing to release


# -- RDMA: one bad file drops its own series only -----------------------------------------------

def test_rate_that_is_not_a_number_drops_only_the_speed(small):
    (port_dir(small) / "rate").write_text("1.2.3 Gb/sec (4X EDR)\n")
    snap = RdmaSource(str(small)).sample()
    p1, p2 = ports(snap)[("rocep24s0f0", "1")], ports(snap)[("rocep24s0f0", "2")]
    assert p1.up and p1.speed_bytes_per_second is None
    assert p1.traffic["transmit_bytes"] == 4000 and p1.hw_counters["np_cnp_sent"] == 4294967000
    assert p2.traffic["transmit_bytes"] == 8000
    assert snap.problems.count("garbage") == 1


def test_zero_rate_is_unknown_not_a_bound_that_counts_nothing(small):
    (port_dir(small) / "rate").write_text("0 Gb/sec (0X SDR)\n")
    clock = ManualClock()
    source = RdmaSource(str(small), clock=clock)
    source.sample()
    (port_dir(small) / "counters" / "port_xmit_data").write_text(f"{1000 + 10**9}\n")
    clock.advance(1.0)
    p = ports(source.sample())[("rocep24s0f0", "1")]
    assert p.speed_bytes_per_second is None
    assert p.traffic["transmit_bytes"] == 4000 + 4 * 10**9  # 4 GB in 1 s: any link can carry it


def test_counter_beyond_u64_drops_only_that_counter(small):
    (port_dir(small) / "counters" / "symbol_error").write_text("9" * 309 + "\n")
    (port_dir(small, "2") / "hw_counters" / "out_of_sequence").write_text("1" + "0" * 400 + "\n")
    snap = RdmaSource(str(small)).sample()
    p1, p2 = ports(snap)[("rocep24s0f0", "1")], ports(snap)[("rocep24s0f0", "2")]
    assert "symbol_error" not in p1.errors and p1.errors["port_rcv_errors"] == 3
    assert "out_of_sequence" not in p2.hw_counters and p2.hw_counters["np_cnp_sent"] == 4294967000
    assert snap.problems.count("garbage") == 2


@pytest.mark.parametrize("name", ["counters/symbol_error", "hw_counters/out_of_sequence", "rate", "state"])
def test_fifo_in_place_of_a_file_does_not_block_the_reader(small, name):
    fifo = port_dir(small) / name
    fifo.unlink()
    os.mkfifo(fifo)
    try:
        finished, snap = sample_in_thread(RdmaSource(str(small)))
    finally:
        release(fifo)
    assert finished, f"a FIFO at {name} blocked the RDMA collector"
    assert not isinstance(snap, Exception), snap
    p1, p2 = ports(snap)[("rocep24s0f0", "1")], ports(snap)[("rocep24s0f0", "2")]
    assert p1.traffic["transmit_bytes"] == 4000 and p2.traffic["transmit_bytes"] == 8000
    if name.startswith(("counters", "hw_counters")):
        assert "not_regular_file" in snap.problems
        assert os.path.basename(name) not in {**p1.errors, **p1.hw_counters}


# -- RDMA: counters that are not plausible -----------------------------------------------------

def rdma_steps(root: Path, name: str, values: list[int], port: str = "1"):
    """The monotonic total of one counter after each raw value, one second apart, and the problems."""
    clock = ManualClock()
    source = RdmaSource(str(root), clock=clock)
    path = port_dir(root, port) / name
    totals, problems = [], []
    for value in values:
        path.write_text(f"{value}\n")
        snap = source.sample()
        p = ports(snap)[("rocep24s0f0", port)]
        totals.append({**p.traffic, **p.errors, **p.hw_counters}.get(
            {"counters/port_xmit_data": "transmit_bytes"}.get(name, os.path.basename(name))))
        problems += snap.problems
        clock.advance(1.0)
    return totals, problems


def test_u64_max_in_port_xmit_data_is_not_traffic(small):
    totals, problems = rdma_steps(small, "counters/port_xmit_data", [1000, U64_MAX, 1250])
    assert totals == [4000, None, 5000]  # the all-ones reading drops that series, then 250 words
    assert "implausible_value" in problems
    first, _ = rdma_steps(small, "counters/port_xmit_data", [U64_MAX])
    assert first == [None], "not even as the first reading"


def test_a_step_beyond_the_link_rate_is_a_glitch_and_so_is_its_return(small):
    base = 10**12  # words since boot on a port that has run for a while (100 Gb/s)
    totals, _ = rdma_steps(small, "counters/port_xmit_data",
                           [base, base + 10**13, base + 1000, base + 2000, base + 2000 + 3 * 10**9])
    assert totals[1] == totals[0], "4e13 bytes in 1 s on a 100 Gb/s port"
    assert totals[2] == totals[0], "the return from the glitch is not a reset either"
    assert totals[3] - totals[2] == 4000
    assert totals[4] - totals[3] == 12e9, "1.2e10 B in 1 s at 100 Gb/s is traffic"


def test_error_counter_jump_beyond_any_event_rate_is_a_glitch(small):
    totals, _ = rdma_steps(small, "counters/symbol_error", [5, 10**15, 10**15 + 3])
    assert totals == [5, 5, 8]


def test_small_dip_of_a_32_bit_counter_is_a_glitch_not_a_wrap_or_reset(small):
    totals, _ = rdma_steps(small, "hw_counters/np_cnp_sent", [4294967000, 4294966000, 4294966500])
    assert totals == [4294967000, 4294967000, 4294967500]


def test_one_cycle_zero_near_the_top_of_32_bits_adds_no_wrap(small):
    totals, _ = rdma_steps(small, "hw_counters/np_cnp_sent", [4294967000, 0, 4294967100])
    assert totals[1] - totals[0] <= 296 and totals[2] - totals[0] < 1000  # not 2^32


def test_exported_counters_never_go_backwards_through_faults(small):
    values = [4294967000, 0, 4294967100, 3, 4294960000, 12, 1 << 31, 4294967295, 5, 5]
    totals, _ = rdma_steps(small, "hw_counters/np_cnp_sent", values)
    assert all(b >= a for a, b in zip(totals, totals[1:])), totals


# -- RDMA: ports that are gone ----------------------------------------------------------------

def test_state_of_a_port_gone_past_the_grace_period_is_dropped(small):
    clock = ManualClock()
    source = RdmaSource(str(small), clock=clock)
    first = ports(source.sample())[("rocep24s0f0", "1")]
    assert len(source._counters) and len(source._hw) and source.backoff._state  # N/A (no PMA) backs off
    link = small / "class" / "infiniband" / "rocep24s0f0"
    target = os.readlink(link)
    link.unlink()
    clock.advance(FORGET_AFTER / 2)
    source.sample()
    assert len(source._counters), "a brief absence (driver reload) keeps the totals"
    clock.advance(FORGET_AFTER)
    assert source.sample().ports == []
    assert (len(source._counters), len(source._hw), source.backoff._state) == (0, 0, {})
    os.symlink(target, link)
    (port_dir(small) / "hw_counters" / "out_of_sequence").write_text("2\n")
    back = ports(source.sample())[("rocep24s0f0", "1")]
    assert back.hw_counters["out_of_sequence"] == 2, "forgotten: it starts again from the kernel's value"
    assert back.traffic == first.traffic


def test_churning_device_names_keep_memory_bounded(small):
    clock = ManualClock()
    source = RdmaSource(str(small), clock=clock)
    cls = small / "class" / "infiniband"
    target = os.readlink(cls / "rocep24s0f0")
    source.sample()
    one_device = len(source._counters) + len(source._hw)
    name = "rocep24s0f0"
    for i in range(200):  # hot plug after hot plug, each with a new kernel name
        (cls / name).unlink()
        name = f"rocep{i}s0f0"
        os.symlink(target, cls / name)
        clock.advance(30.0)
        snap = source.sample()
        assert [p.device for p in snap.ports] == [name, name]
    text = render(rdma_families.families(snap)).decode()
    assert "rocep24s0f0" not in text and f'device="{name}"' in text
    within_grace = int(FORGET_AFTER // 30.0) + 1
    assert len(source._counters) + len(source._hw) <= within_grace * one_device
    assert len(source.backoff._state) <= within_grace


# -- NFS: stacked mounts ----------------------------------------------------------------------

def nfs_block(export: str, mountpoint: str, server_write: int, read_ops: int = 0) -> str:
    return (f"device {export} mounted on {mountpoint} with fstype nfs4 statvers=1.1\n"
            "\topts:\trw,vers=4.1,hard,proto=tcp,nconnect=1,sec=sys\n"
            f"\tbytes:\t0 {server_write} 0 0 0 {server_write} 0 0\n"
            "\tRPC iostats version: 1.1  p/v: 100003/4 (nfs)\n"
            "\txprt:\ttcp 880 0 1 0 11 5 5 0 5 0 2 0 0 7 7\n"
            "\tper-op statistics\n"
            f"\t        READ: {read_ops} {read_ops} 0 0 0 0 0 0 0\n"
            "\t       WRITE: 5 5 0 0 0 0 0 0 0\n\n")


class Procfs:
    """A procfs root whose self/mountstats the test rewrites between cycles."""

    def __init__(self, root: Path):
        (root / "4242").mkdir(parents=True)
        (root / "self").symlink_to("4242")
        self.root = root
        self.clock = ManualClock()
        self.source = NfsSource(str(root), DEFAULT_NFS_OPERATIONS, {}, clock=self.clock)

    def cycle(self, *blocks: str):
        (self.root / "4242" / "mountstats").write_text("".join(blocks))
        snap = self.source.sample()
        self.clock.advance(1.0)
        return snap


def test_stacked_mounts_export_the_topmost_once_at_its_own_rate(tmp_path):
    procfs = Procfs(tmp_path)
    lower, upper = "nas-a:/ifs/old", "nas-b:/ifs/new"
    first = procfs.cycle(nfs_block(lower, "/mnt/data", 5 * 10**12), nfs_block(upper, "/mnt/data", 10**9))
    second = procfs.cycle(nfs_block(lower, "/mnt/data", 5 * 10**12 + 5 * 10**6),
                          nfs_block(upper, "/mnt/data", 10**9 + 10**7))
    assert [(s.mountpoint, s.export) for s in second.mounts] == [("/mnt/data", upper)]
    assert second.mounts[0].write_bytes - first.mounts[0].write_bytes == 10**7  # 1e7 B/s, not 5e12
    names = series(render(nfs_families.families(second)))
    assert len(names) == len(set(names)), "duplicate series: Prometheus rejects the whole scrape"


@pytest.mark.parametrize("lower", ["nas-a:/ifs/old", "nas-b:/ifs/new"], ids=["other-export", "same-export"])
def test_uncovering_a_mount_continues_the_series_without_a_jump(tmp_path, lower):
    procfs = Procfs(tmp_path)
    upper = "nas-b:/ifs/new"
    procfs.cycle(nfs_block(lower, "/mnt/data", 5 * 10**12, read_ops=900), nfs_block(upper, "/mnt/data", 10**9))
    on_top = procfs.cycle(nfs_block(lower, "/mnt/data", 5 * 10**12, read_ops=900),
                          nfs_block(upper, "/mnt/data", 10**9 + 10**7, read_ops=4)).mounts[0]
    uncovered = procfs.cycle(nfs_block(lower, "/mnt/data", 5 * 10**12 + 10**6, read_ops=950)).mounts[0]
    assert uncovered.export == lower
    assert uncovered.write_bytes == on_top.write_bytes, "the lower mount's own total is no traffic"
    assert uncovered.ops["READ"]["ops"] == on_top.ops["READ"]["ops"]
    after = procfs.cycle(nfs_block(lower, "/mnt/data", 5 * 10**12 + 3 * 10**6, read_ops=960)).mounts[0]
    assert after.write_bytes - uncovered.write_bytes == 2 * 10**6
    assert after.ops["READ"]["ops"] - uncovered.ops["READ"]["ops"] == 10


# -- NFS: damaged mountstats ------------------------------------------------------------------

@pytest.mark.parametrize("escape", ["\\089", "\\9", "\\", "\\04", "\\x41"])
def test_bad_mountpoint_escape_skips_its_own_block(escape, tmp_path):
    text = (MOUNTSTATS / "nfsv41_nconnect_rdma.txt").read_text()
    damaged = text.replace("mounted on /mnt/checkpoints ", f"mounted on /mnt/check{escape}points ", 1)
    assert damaged != text
    mounts, problems = parse(damaged)
    assert [m.mountpoint for m in mounts] == ["/mnt/data", "/mnt/data-bind"]
    assert problems == ["malformed_header"]
    clean = {m.mountpoint: m for m in parse(text)[0]}
    assert all(m.ops == clean[m.mountpoint].ops for m in mounts)
    assert len(Procfs(tmp_path).cycle(damaged).mounts) == 2


def test_valid_escapes_still_decode():
    text = nfs_block("nas:/x", "/mnt/a\\040b\\134c\\011d", 0)
    assert parse(text)[0][0].mountpoint == "/mnt/a b\\c\td"


def best_time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_blank_lines_inside_a_block_cost_linear_time():
    """Measured before the fix: 288 KB took 4.96 s. Compared here with a clean text of as many
    lines, parsed in the same test: a linear parser costs about the same for both."""
    head = "device nas:/x mounted on /mnt/x with fstype nfs4 statvers=1.1\n\topts:\trw,vers=4.1\n"
    tail = "\tper-op statistics\n\t        READ: 7 7 0 0 0 0 0 0 0\n\n"
    n = 12_000
    damaged = head + "\tage:\t1\n\n" * n + tail
    clean = head + "\tage:\t1\n" * (2 * n) + tail
    mounts, problems = parse(damaged)
    assert problems == [] and mounts[0].ops["READ"]["ops"] == 7
    ratio = best_time(lambda: parse(damaged)) / best_time(lambda: parse(clean))
    print(f"blank lines: {len(damaged)} bytes, {ratio:.1f}x the clean text")
    assert ratio < 10, f"{ratio:.0f}x the time of a clean text of as many lines: not linear"


def test_fifo_in_place_of_mountstats_fails_the_cycle_without_blocking(tmp_path):
    (tmp_path / "self").mkdir()
    fifo = tmp_path / "self" / "mountstats"
    os.mkfifo(fifo)
    try:
        finished, result = sample_in_thread(NfsSource(str(tmp_path), DEFAULT_NFS_OPERATIONS, {}))
    finally:
        release(fifo)
    assert finished, "a FIFO at mountstats blocked the NFS collector"
    assert isinstance(result, OSError) and getattr(result, "reason", None) == "not_regular_file"


# -- NFS: mounts that are gone ----------------------------------------------------------------

def test_churned_mounts_leave_no_state_past_the_grace_period(tmp_path):
    procfs = Procfs(tmp_path)
    keep = nfs_block("nas:/ifs/home", "/home", 10**6)
    procfs.cycle(keep)
    one_mount = len(procfs.source._counters)
    step = 10.0
    for i in range(500):  # job directories mounted and unmounted all day
        procfs.clock.advance(step - 1.0)
        snap = procfs.cycle(keep, nfs_block(f"nas:/ifs/jobs/{i}", f"/mnt/job{i}", 10**6 + i))
    assert [m.mountpoint for m in snap.mounts] == ["/home", "/mnt/job499"]
    text = render(nfs_families.families(snap)).decode()
    assert "/mnt/job498" not in text and 'mountpoint="/mnt/job499"' in text
    within_grace = int(FORGET_AFTER // step) + 1
    assert len(procfs.source._counters) <= (1 + within_grace) * one_mount  # not 500 mounts' worth


def test_remount_within_the_grace_period_carries_on(tmp_path):
    procfs = Procfs(tmp_path)
    before = procfs.cycle(nfs_block("nas:/x", "/mnt/x", 10**9)).mounts[0]
    procfs.clock.advance(FORGET_AFTER / 2)
    assert procfs.cycle().mounts == []
    back = procfs.cycle(nfs_block("nas:/x", "/mnt/x", 10**6)).mounts[0]  # a new superblock counts from 0
    assert back.write_bytes == before.write_bytes + 10**6


# -- the state file -------------------------------------------------------------------------------

def fresh_state(**fields) -> dict:
    """A state file's record as the agent writes it, saved a second ago (ManualClock(1000.0))."""
    record = {"pids": [101, 102], "level": 0.9, "saved": 999.0, "checkpoints": [], "verdict": None}
    record.update(fields)
    return record


def load_state(tmp_path: Path, text: str, read_only: bool = False):
    """(what load() gives, the warnings it logged) for a state file holding `text`."""
    from structlog.testing import capture_logs

    from stoker.detect.state import StateStore
    path = tmp_path / "state.json"
    path.write_text(text)
    with capture_logs() as lines:
        saved = StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0), read_only=read_only).load()
    return saved, [line for line in lines if line["log_level"] in ("warning", "error")]


def test_a_fifo_at_the_state_file_is_unreadable_not_a_hang(tmp_path):
    """A FIFO at `state_file` blocked the agent's start in open() for good (no READY=1, SIGTERM
    ignored, `stoker check` hung): the state file is opened without blocking and must be a regular file."""
    from structlog.testing import capture_logs

    from stoker.detect.state import StateStore
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    store = StateStore(str(fifo), max_age=300.0)
    result: dict = {}
    with capture_logs() as lines:
        thread = threading.Thread(target=lambda: result.setdefault("saved", store.load()), daemon=True)
        thread.start()
        thread.join(10)
    release(fifo)
    assert not thread.is_alive(), "load() blocked on the FIFO"
    assert result["saved"] is None
    assert [(line["event"], line["error"]) for line in lines] == [
        ("saved job state unreadable; learning it afresh", "not a regular file")]


@pytest.mark.slow
def test_an_agent_with_a_fifo_as_state_file_starts_serves_and_stops(tmp_path):
    """The same at the process level: READY=1, series on /metrics, SIGTERM obeyed, and `stoker check`
    with that configuration ends."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.conftest import free_port, start_agent_process
    from tests.test_hardening_config import Notifications
    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    config = tmp_path / "stoker.toml"
    config.write_text(f'[agent]\nstate_file = "{fifo}"\n')
    notify = Notifications(str(tmp_path / "notify"))
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert "READY=1" in notify.until_ready()[-1]
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            if "stoker_gpu_" in body or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "stoker_gpu_" in body, body[:500]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
        assert "saved job state unreadable" in agent.log() and "not a regular file" in agent.log()
        check = subprocess.run([sys.executable, "-m", "stoker", "check", "--simulate", "healthy", "--seconds", "1",
                                "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        agent.kill()
        notify.sock.close()
        release(fifo)


@pytest.mark.slow
def test_an_agent_whose_state_file_does_not_answer_serves_and_obeys_sigterm(tmp_path):
    """A state file on a hung NFS mount (tests/hung_mount.py). The verdicts gave up on it after 5 s,
    but the inventory read the same file in asyncio's default executor: on SIGTERM the agent logged
    `stoker stopped` and then never exited (asyncio.run waits for the executor's threads; measured on
    main: alive 8 s after SIGTERM, until SIGKILL). Now the inventory reads and writes it as the
    verdicts do, in the sampling lane's daemon thread with the state file's deadline: one line, the
    node's series, and exit status 0 on SIGTERM with the read still stuck."""
    import signal
    import urllib.request

    from tests.conftest import free_port, start_agent_process, wait_http
    state = tmp_path / "state.json"
    state.write_text("{}")
    (tmp_path / "state.json.hung").touch()
    config = tmp_path / "stoker.toml"
    config.write_text(f'[agent]\nstate_file = "{state}"\n')
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                                "--log-format", "json", module="tests.hung_mount")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        deadline = time.monotonic() + 30
        while "kept inventory unreadable" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        # the GPU cycle queued behind the stuck read runs once the lane gives up on it: the node's series come
        body = ""
        while "stoker_gpu_" not in body and time.monotonic() < deadline + 10:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            time.sleep(0.2)
        assert "stoker_gpu_" in body
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
        unreadable = [json.loads(line) for line in agent.log().splitlines() if "kept inventory unreadable" in line]
        assert [line["error"] for line in unreadable] == ["inventory: call exceeded 5s"], unreadable
    finally:
        agent.kill()


def test_the_save_never_follows_a_link_planted_at_its_temporary_name(tmp_path):
    """A link at `<state>.tmp` made the agent overwrite its target with JSON. The save writes a new file
    of its own (O_EXCL|O_NOFOLLOW, a random name), and only over a regular file or nothing."""
    from stoker.detect.state import StateStore
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state.json"
    (tmp_path / "state.json.tmp").symlink_to(victim)
    store = StateStore(str(state), max_age=300.0, wall=ManualClock(1000.0))
    store.save(frozenset({1}), 0.5, [])
    assert victim.read_text() == "precious\n"
    assert json.loads(state.read_text())["pids"] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.tmp", "victim"]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_state_file_that_is_not_a_regular_file_is_left_as_it_is(tmp_path, kind):
    from structlog.testing import capture_logs

    from stoker.detect.state import StateStore
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state.json"
    {"symlink": lambda: state.symlink_to(victim), "fifo": lambda: os.mkfifo(state),
     "directory": lambda: state.mkdir()}[kind]()
    store = StateStore(str(state), max_age=300.0, wall=ManualClock(1000.0))
    with capture_logs() as lines:
        assert store.load() is None
        store.save(frozenset({1}), 0.5, [])
    assert victim.read_text() == "precious\n"
    assert (state.is_symlink(), state.is_fifo(), state.is_dir()) == (kind == "symlink", kind == "fifo",
                                                                     kind == "directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "victim"], "no temporary file left"
    assert [line["event"] for line in lines] == ["saved job state unreadable; learning it afresh",
                                                 "cannot save the job state"]


def test_a_save_cut_short_leaves_a_temporary_file_the_next_writer_removes(tmp_path):
    from stoker.detect.state import StateStore
    state = tmp_path / "state.json"
    (tmp_path / "state.json.0123456789abcdef.tmp").write_text("{")  # kill -9 between write and rename
    (tmp_path / "state.json.not-ours.tmp").write_text("{")
    StateStore(str(state), max_age=300.0, read_only=True).load()
    assert (tmp_path / "state.json.0123456789abcdef.tmp").exists(), "`stoker check` removes nothing"
    StateStore(str(state), max_age=300.0).load()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json.not-ours.tmp"]


DEEP_JSON = '{"pids": ' + "[" * 30_000 + "]" * 30_000 + "}"  # 60 KB: within the size cap


@pytest.mark.parametrize("text, error", [
    (json.dumps(fresh_state(verdict=[])), None),
    ("[1, 2]", "not a JSON object but list"),
    (DEEP_JSON, "nested too deeply"),
    (json.dumps(fresh_state(saved=float("nan"))), "saved: not a finite number"),
    (json.dumps(fresh_state(saved=float("inf"))), "saved: not a finite number"),
    (json.dumps(fresh_state(saved=True)), "saved: not a number"),
    (json.dumps(fresh_state(pids=[1, True])), "pids: not a list of PIDs"),
    (json.dumps(fresh_state(pids=[1, 1 << 40])), "pids: not a list of PIDs"),
    (json.dumps(fresh_state(checkpoints={"a": 1})), "checkpoints: not a list"),
    ('{"pids": [1], "saved": 999, "level": ' + "9" * 5000 + "}", "not JSON"),
    ("\xff", "not JSON"),
    (" " * 70_000, "larger than 65536 bytes"),
    (" " * 65_537, "larger than 65536 bytes"),
    (json.dumps(fresh_state(pids=[0, 101])), "pids: not a list of PIDs"),
    (json.dumps(fresh_state(pids=[101, (1 << 22) + 1])), "pids: not a list of PIDs"),
    (json.dumps(fresh_state(saved=-1.0)), "saved: before 1970: -1.0"),
], ids=["verdict-list", "not-object", "deep", "saved-nan", "saved-inf", "saved-bool", "pid-bool", "pid-huge",
        "checkpoints-object", "huge-int", "not-utf8", "huge", "one-byte-over", "pid-zero", "pid-over-pid-max",
        "saved-before-1970"])
def test_a_damaged_state_file_is_one_line_never_a_traceback(tmp_path, text, error):
    """A non-object `verdict` or deep nesting raised out of load() (a traceback at every start); a NaN
    `saved` was dropped without a word."""
    saved, warnings = load_state(tmp_path, text)
    if error is None:  # only the verdict is bad: the rest is used, the verdict left out with its line
        assert saved is not None and saved.pids == frozenset({101, 102}) and saved.cause is None
        assert [(w["event"], w["part"]) for w in warnings] == [("part of the saved job state left out", "verdict")]
        assert warnings[0]["error"] == "not an object but list"
        return
    assert saved is None
    assert len(warnings) == 1 and warnings[0]["event"] == "saved job state unreadable; learning it afresh"
    assert warnings[0]["error"].startswith(error), warnings[0]["error"]


def test_the_state_files_bounds_are_inclusive(tmp_path):
    """PIDs from 1 to the kernel's largest (PID_MAX_LIMIT, 4 * 1024 * 1024 on 64-bit: linux
    include/linux/threads.h) and a file of exactly 64 KiB are read."""
    text = json.dumps(fresh_state(pids=[1, 1 << 22]))
    text = text[:-1] + " " * (65_536 - len(text)) + "}"
    assert len(text.encode()) == 65_536
    saved, warnings = load_state(tmp_path, text)
    assert warnings == [] and saved is not None and saved.pids == frozenset({1, 1 << 22})


@pytest.mark.parametrize("saved_at, reason", [(1001.0, "saved in the future"), (699.0, "older than 300 s")])
def test_a_state_file_from_the_future_or_too_old_is_ignored_with_why(tmp_path, saved_at, reason):
    from structlog.testing import capture_logs

    from stoker.detect.state import StateStore
    path = tmp_path / "state.json"
    path.write_text(json.dumps(fresh_state(saved=saved_at)))
    with capture_logs() as lines:
        assert StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0)).load() is None
    assert [line.get("reason") for line in lines if "reason" in line] == [reason]


GOOD_CHECKPOINT = {"mountpoint": "/mnt/ckpt", "started": 900.0, "source": "hint", "start_server": 0.0,
                   "start_client": 0.0, "last_server": 5e9, "progress": 990.0, "expected_bytes": None,
                   "stalled": False}


@pytest.mark.parametrize("part, fields, error", [
    ("level", {"level": float("nan")}, "level: not a finite number"),
    ("level", {"level": float("inf")}, "level: not a finite number"),
    ("level", {"level": 1.5}, "level: not a share"),
    ("level", {"level": "0.9"}, "level: not a number"),
    ("verdict", {"verdict": {"cause": "gremlins"}}, "cause: not one of"),
    ("verdict", {"verdict": {"cause": "storage", "cold": "yes"}}, "cold, came_back"),
    ("checkpoints[1]", {"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "last_server": float("nan")}]},
     "last_server: not a finite number"),
    ("checkpoints[1]", {"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "progress": float("-inf")}]},
     "progress: not a finite number"),
    ("checkpoints[1]", {"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "mountpoint": "/mnt/\ud800"}]},
     "mountpoint: not an absolute path"),
    ("checkpoints[1]", {"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "expected_bytes": -5}]},
     "expected_bytes: negative"),
    ("checkpoints[1]", {"checkpoints": [GOOD_CHECKPOINT, 7]}, "not an object"),
])
def test_a_damaged_part_of_the_state_is_left_out_with_one_line_and_the_rest_used(tmp_path, part, fields, error):
    """NaN or out-of-range `level` was dropped without a word, and checkpoint records holding NaN were
    restored and exported as NaN series: every field is checked, each rejected part named in one line."""
    saved, warnings = load_state(tmp_path, json.dumps(fresh_state(**fields)))
    assert saved is not None and saved.pids == frozenset({101, 102})
    assert [(w["event"], w["part"]) for w in warnings] == [("part of the saved job state left out", part)]
    assert warnings[0]["error"].startswith(error), warnings[0]["error"]
    assert saved.level == (None if part == "level" else 0.9)
    if part.startswith("checkpoints"):
        assert saved.checkpoints == [GOOD_CHECKPOINT]


def test_no_nan_is_written_either(tmp_path):
    from stoker.detect.state import StateStore
    state = tmp_path / "state.json"
    store = StateStore(str(state), max_age=300.0, wall=ManualClock(1000.0))
    store.save(frozenset({1}), float("nan"), [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "started": float("inf")}])
    text = state.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["level"] is None and json.loads(text)["checkpoints"] == [GOOD_CHECKPOINT]


# -- pressure files -------------------------------------------------------------------------------

def test_pressure_files_that_block_or_overflow_cost_only_their_own_resource(tmp_path):
    """A FIFO in place of /proc/pressure/cpu blocked the host collector in open(); a total of
    thousands of digits raised OverflowError out of the cycle (a float cannot hold it)."""
    from stoker.sources.pressure import PressureSource
    pressure = tmp_path / "pressure"
    pressure.mkdir()
    os.mkfifo(pressure / "cpu")
    (pressure / "memory").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=" + "9" * 4000 + "\n"
                                     "full avg10=0.00 avg60=0.00 avg300=0.00 total=25\n")
    (pressure / "io").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n")
    try:
        finished, snap = sample_in_thread(PressureSource(str(tmp_path)))
    finally:
        release(pressure / "cpu")
    assert finished, "a FIFO at pressure/cpu blocked the host collector"
    assert not isinstance(snap, Exception), snap
    assert snap.some_seconds == {"io": 1.0} and snap.full_seconds == {"memory": pytest.approx(25e-6)}
    assert snap.problems == ["not_regular_file"]
