"""What the agent does to cost less keeps its behaviour: files kept open still see every change and
never block, chunks rendered when asked are the same bytes, the sampling lane keeps each call's
deadline, the simulated kernel is written in place. No timing is asserted here (bench/agent.py
measures the costs; docs/PERFORMANCE.md)."""

from __future__ import annotations

import asyncio
import errno
import gzip
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

from stoker.agent.collector import Collector
from stoker.agent.supervisor import Supervisor
from stoker.agent.worker import CollectorError, Worker
from stoker.exporters import exposition as expo
from stoker.exporters.exposition import Exposition, reference_render, render
from stoker.sources import files
from stoker.sources.files import KeptFiles
from stoker.sources.rdma import RdmaSource
from tests.conftest import ManualClock

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
DEVICE = "rocep24s0f0"


@pytest.fixture
def small(tmp_path) -> Path:
    root = tmp_path / "sys"
    shutil.copytree(SYSFS / "small", root, symlinks=True)
    return root


def port_dir(root: Path, port: str = "1") -> Path:
    return root / "class" / "infiniband" / DEVICE / "ports" / port


def port(snapshot, number: str = "1"):
    return next(p for p in snapshot.ports if p.port == number)


def sample_in_thread(source, seconds: float = 10.0):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", source.sample()), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), result.get("value")


# -- files kept open ----------------------------------------------------------------------------

def test_files_are_kept_open_and_in_place_writes_are_seen(small):
    source = RdmaSource(str(small), clock=ManualClock())
    path = port_dir(small) / "counters" / "symbol_error"
    before = int(path.read_text())
    first = port(source.sample())
    assert source.reader.kept() > 20  # both ports' counters, hw_counters and identity files
    path.write_text(f"{before + 40}\n")  # same inode, as sysfs
    assert port(source.sample()).errors["symbol_error"] == first.errors["symbol_error"] + 40


@pytest.mark.parametrize("name", ["counters/symbol_error", "hw_counters/out_of_sequence", "state", "rate"])
def test_a_file_replaced_by_another_inode_is_read_afresh(small, name):
    """Driver reload, hot plug, or a tool that writes by rename: the descriptor kept on the old inode
    would read the old value for ever; the directory's change sends the reader to the new file."""
    clock = ManualClock()
    source = RdmaSource(str(small), clock=clock)
    source.sample()
    path = port_dir(small) / name
    old_inode = path.stat().st_ino
    new_text = {"state": "1: DOWN\n", "rate": "200 Gb/sec (4X HDR)\n"}.get(name, "4242\n")
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(new_text)
    os.replace(tmp, path)
    assert path.stat().st_ino != old_inode
    clock.advance(1.0)
    p = port(source.sample())
    if name == "state":
        assert p.up is False and p.state == "DOWN"
    elif name == "rate":
        assert p.speed_bytes_per_second == 200e9 / 8
    else:
        assert {**p.errors, **p.hw_counters}[os.path.basename(name)] >= 4242


@pytest.mark.parametrize("name, tier", [("hw_counters/out_of_sequence", "every cycle"), ("state", "every cycle"),
                                        ("counters/symbol_error", "slow"), ("rate", "slow")])
def test_with_tiers_a_replaced_file_is_read_afresh_at_its_next_read(small, name, tier):
    """With tiers, a cycle checks only the directories it reads from, and every directory on the slow
    tier's cycles: a file replaced in either is read afresh the next time it is read."""
    clock = ManualClock()
    source = RdmaSource(str(small), clock=clock, every_cycle=("out_of_sequence", "np_cnp_sent"))
    source.sample()
    clock.advance(1.0)
    source.sample()
    path = port_dir(small) / name
    tmp = path.with_name(path.name + ".new")
    tmp.write_text({"state": "1: DOWN\n", "rate": "200 Gb/sec (4X HDR)\n"}.get(name, "4242\n"))
    os.replace(tmp, path)
    for second in range(2, 6):
        clock.advance(1.0)
        p = port(source.sample())
        if name == "state":
            fresh = p.up is False
        elif name == "rate":
            fresh = p.speed_bytes_per_second == 200e9 / 8
        else:
            fresh = {**p.errors, **p.hw_counters}[os.path.basename(name)] >= 4242
        assert fresh == (tier == "every cycle" or second == 5), (second, p)


def test_a_file_replaced_long_after_its_directory_changed_is_read_afresh(small):
    """The directory's timestamps are old when it is checked (not racy), then a file is replaced."""
    source = RdmaSource(str(small), clock=ManualClock())
    counters = port_dir(small) / "counters"
    past = time.time() - 3600
    os.utime(counters, (past, past))
    source.sample()
    source.sample()  # the directory's identity is now settled and trusted
    tmp = counters / ".symbol_error"
    tmp.write_text("777\n")
    os.replace(tmp, counters / "symbol_error")
    assert port(source.sample()).errors["symbol_error"] >= 777


def test_an_attribute_removed_under_its_descriptor_is_opened_again(small, monkeypatch):
    """sysfs answers ENODEV on a descriptor of an attribute the kernel removed (driver reload)."""
    reader = KeptFiles()
    path = str(port_dir(small) / "counters" / "symbol_error")
    assert reader.read(path).strip() == Path(path).read_text().strip()
    fd = reader._open[path][0]
    real_pread = os.pread
    removed = [fd]

    def pread(descriptor, n, offset):
        if descriptor in removed:
            removed.remove(descriptor)  # once: a new open gets a new kernfs node
            raise OSError(errno.ENODEV, "No such device")
        return real_pread(descriptor, n, offset)
    monkeypatch.setattr(files.os, "pread", pread)
    Path(path).write_text("9\n")
    assert reader.read(path).strip() == "9"
    reader.close()


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_something_else_in_place_of_a_kept_file_never_blocks(small, kind):
    source = RdmaSource(str(small), clock=ManualClock())
    first = port(source.sample())
    path = port_dir(small) / "counters" / "symbol_error"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    try:
        finished, snap = sample_in_thread(source)
    finally:
        if kind == "fifo":
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert finished, f"a {kind} in place of a kept file blocked the RDMA collector"
    p = port(snap)
    assert "symbol_error" not in p.errors and "not_regular_file" in snap.problems
    assert p.traffic["transmit_bytes"] == first.traffic["transmit_bytes"]


def test_descriptors_of_a_device_that_vanished_are_closed(small):
    source = RdmaSource(str(small), clock=ManualClock())
    source.sample()
    assert source.reader.kept() > 0
    link = small / "class" / "infiniband" / DEVICE
    target = os.readlink(link)
    link.unlink()
    assert source.sample().ports == [] and source.reader.kept() == 0
    os.symlink(target, link)
    assert len(source.sample().ports) == 2 and source.reader.kept() > 0


def test_at_most_a_quarter_of_the_descriptor_limit_is_kept(small, monkeypatch):
    monkeypatch.setattr(files.resource, "getrlimit", lambda what: (64, 1024))
    assert KeptFiles()._capacity() == 16
    monkeypatch.setattr(files, "KEPT_MAX", 8)
    limited = RdmaSource(str(small), clock=ManualClock())
    snap = limited.sample()
    assert limited.reader.kept() == 8, "past the budget, files are read the old way"
    reference = RdmaSource(str(small), clock=ManualClock(), reader=files.FileReader()).sample()
    assert [(p.traffic, p.errors, p.hw_counters) for p in snap.ports] == \
           [(p.traffic, p.errors, p.hw_counters) for p in reference.ports]
    limited.close()
    assert limited.reader.kept() == 0


# -- rendering when asked -------------------------------------------------------------------------

def odd_families(value: float):
    g = GaugeMetricFamily("stoker_odd", 'help with \\ and \n newline', labels=["path", "kind"])
    g.add_metric(['/mnt/a "quoted"\\dir\nx', "a"], value)
    g.add_metric(["plain", "b"], float("nan"))
    g.add_metric(["inf", "c"], float("inf"))
    g.add_metric(["neg-zero", "d"], -0.0)
    c = CounterMetricFamily("stoker_things", "Things.", labels=["device"])
    c.add_metric(["x"], value * 3)
    h = HistogramMetricFamily("stoker_hist", "A histogram.", labels=["m"])
    h.add_metric(["/mnt"], [("0.001", 1), ("+Inf", 3)], 0.5 + value)
    return [g, c, h]


def test_rendering_is_byte_identical_to_prometheus_client_for_odd_values():
    for value in (1.0, 2.5e-7, 1e22, 0.0):
        families = odd_families(value)
        assert render(families) == reference_render(families)


def test_a_chunk_is_rendered_once_when_asked_not_after_each_cycle():
    exposition = Exposition()
    calls = []

    def chunk(text: bytes):
        def render_it():
            calls.append(text)
            return text
        return render_it
    exposition.set_source("a", chunk(b"a 1.0\n"))
    exposition.set_source("a", chunk(b"a 2.0\n"))  # a second cycle before anyone asked
    exposition.set_source("_agent", chunk(b"up 1.0\n"))
    assert calls == []
    assert exposition.body() == b"up 1.0\na 2.0\n" and exposition.body() == b"up 1.0\na 2.0\n"
    assert calls == [b"a 2.0\n", b"up 1.0\n"]  # the collectors' chunks first, the agent's own last
    exposition.set_source("a", lambda: None)  # a render that failed: the last chunk stays
    assert exposition.body() == b"up 1.0\na 2.0\n"


def test_gzip_is_the_body_and_only_changed_chunks_are_compressed_again(monkeypatch):
    exposition = Exposition()
    compressed = []
    real = expo.deflate_run
    monkeypatch.setattr(expo, "deflate_run", lambda data: compressed.append(data) or real(data))
    big = b"".join(b"stoker_x{i=\"%d\"} %d.0\n" % (i, i) for i in range(3000))
    exposition.set_chunk("a", big)
    exposition.set_chunk("b", b"b 1.0\n")
    assert gzip.decompress(exposition.gzipped()) == exposition.body() == big + b"b 1.0\n"
    assert len(compressed) == 2
    exposition.set_chunk("b", b"b 2.0\n")
    assert gzip.decompress(exposition.gzipped()) == big + b"b 2.0\n"
    assert compressed[2:] == [b"b 2.0\n"]
    assert exposition.gzipped() is exposition.gzipped()  # once per change


class Numbers(Collector):
    name = "numbers"
    interval = 1.0

    def __init__(self):
        self.n = 0
        self.broken = False

    async def cycle(self):
        self.n += 1
        return []

    def families(self):
        if self.broken:
            raise ValueError("a bug in a family")
        g = GaugeMetricFamily("stoker_numbers", "N.", labels=["k"])
        g.add_metric(["v"], self.n)
        return [g]


async def test_the_agents_own_metrics_match_prometheus_client_and_a_broken_family_is_counted():
    exposition = Exposition()
    numbers = Numbers()
    sup = Supervisor([numbers], exposition, lambda: {"version": "t", "nvml_version": "n", "driver_version": "d"})
    for _ in range(3):
        await sup.run_cycle(numbers)
    body = exposition.body()
    assert b'stoker_numbers{k="v"} 3.0' in body
    assert sup._self_chunk() == generate_latest(sup.registry)
    numbers.broken = True
    await sup.run_cycle(numbers)
    body = exposition.body()
    assert b'stoker_numbers{k="v"} 3.0' in body, "the last good chunk stays"
    assert b'stoker_collector_errors_total{collector="numbers",reason="render"} 1.0' in body
    assert b'stoker_collector_up{collector="numbers"} 0.0' in body


# -- the sampling lane ----------------------------------------------------------------------------

async def test_calls_made_in_one_pass_run_in_one_thread_in_turn():
    seen = []
    a, b = Worker("a"), Worker("b")
    await asyncio.gather(a.call(lambda: seen.append(threading.current_thread().name), timeout=1),
                         b.call(lambda: seen.append(threading.current_thread().name), timeout=1))
    assert len(seen) == 2 and seen[0] == seen[1] != threading.current_thread().name


async def test_a_hung_call_fails_alone_and_holds_the_others_back_once():
    gate = threading.Event()
    stuck, other = Worker("stuck"), Worker("other")
    try:
        results = await asyncio.gather(stuck.call(gate.wait, timeout=0.2), other.call(lambda: 7, timeout=0.2),
                                       return_exceptions=True)
        assert isinstance(results[0], CollectorError) and results[0].reason == "timeout"
        assert results[1] == 7, "the call queued behind the hung one ran in a new thread"
        with pytest.raises(CollectorError) as err:
            await stuck.call(lambda: 1, timeout=0.2)
        assert err.value.reason == "hung"
        started = time.monotonic()
        assert await other.call(lambda: 8, timeout=0.2) == 8
        assert time.monotonic() - started < 0.2, "not held back again"
    finally:
        gate.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        try:
            assert await stuck.call(lambda: 42, timeout=1) == 42
            break
        except CollectorError:
            continue
    else:
        pytest.fail("the worker never recovered once its hung call returned")


async def test_a_call_waits_its_turn_but_its_deadline_runs_from_its_start():
    slow, quick = Worker("slow"), Worker("quick")
    results = await asyncio.gather(slow.call(time.sleep, 0.15, timeout=0.3), quick.call(lambda: 1, timeout=0.1))
    assert results == [None, 1], "0.15 s in the queue is not 0.1 s of the call"


# -- the simulated kernel -------------------------------------------------------------------------

def test_the_simulated_kernel_files_are_written_in_place(tmp_path):
    from stoker.sim.kernfs import KernelFiles

    kernel = KernelFiles()
    path = tmp_path / "state"
    assert kernel.put(str(path), "4: ACTIVE\n") and path.read_text() == "4: ACTIVE\n"
    inode = path.stat().st_ino
    assert not kernel.put(str(path), "4: ACTIVE\n"), "unchanged: not written"
    kernel.put(str(path), "1: DOWN\n")  # shorter: padded, then truncated
    assert path.read_text() == "1: DOWN\n" and path.stat().st_ino == inode
    kernel.put(str(path), "123456789012\n")
    assert path.read_text() == "123456789012\n" and path.stat().st_ino == inode
    stale = tmp_path / "left-by-a-crash"
    stale.write_text("9999999999\n")
    KernelFiles().put(str(stale), "1\n")
    assert stale.read_text() == "1\n"
    kernel.close()


def test_the_simulated_files_move_once_per_agent_cycle_just_before_it():
    from types import SimpleNamespace

    from stoker.sim.simulation import ADVANCE_EVERY, ADVANCE_LEAD, Simulation

    def agent(interval, due):
        return SimpleNamespace(config=SimpleNamespace(agent=SimpleNamespace(interval=interval)),
                               supervisor=SimpleNamespace(next_due=lambda: due))
    assert Simulation.pause(agent(1.0, 100.0), 99.0) == pytest.approx(1.0 - ADVANCE_LEAD)
    # just after that cycle's move (the cycle itself not yet run): the next cycle's
    assert Simulation.pause(agent(1.0, 100.0), 99.96) == pytest.approx(101.0 - ADVANCE_LEAD - 99.96)
    assert Simulation.pause(agent(5.0, 100.0), 99.99) == pytest.approx(105.0 - ADVANCE_LEAD - 99.99)
    assert Simulation.pause(agent(0.1, 100.0), 99.0) == ADVANCE_EVERY  # faster than the files move
    assert Simulation.pause(agent(1.0, None), 99.0) == ADVANCE_EVERY  # the agent has not started yet


async def test_a_cycles_duration_is_its_own_work_not_its_wait_for_the_lane():
    from stoker.agent.sourced import SourceCollector

    class Source:
        def __init__(self, seconds):
            self.seconds = seconds

        def sample(self):
            time.sleep(self.seconds)
            return type("Snapshot", (), {"problems": []})()

    slow = SourceCollector("slow", 1.0, Source(0.3), lambda s: [], timeout=2.0)
    quick = SourceCollector("quick", 1.0, Source(0.0), lambda s: [], timeout=2.0)
    sup = Supervisor([slow, quick], Exposition(), lambda: {"version": "t", "nvml_version": "", "driver_version": ""})
    await asyncio.gather(sup.run_cycle(slow), sup.run_cycle(quick))  # quick's call waits behind slow's
    body = sup._self_chunk().decode()
    quick_sum = float(next(line.split()[-1] for line in body.splitlines()
                           if line.startswith('stoker_collector_duration_seconds_sum{collector="quick"}')))
    slow_sum = float(next(line.split()[-1] for line in body.splitlines()
                          if line.startswith('stoker_collector_duration_seconds_sum{collector="slow"}')))
    assert slow_sum >= 0.3 and quick_sum < 0.2
