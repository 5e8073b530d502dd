"""Third round of attacks on the fixes of issue 25: what still broke, each a test that failed on the
code before its fix. Real servers and agents on loopback, real sockets, real bcrypt; the fake NVML
and simulated trees where hardware is involved."""

from __future__ import annotations

import asyncio
import threading

import bcrypt

from stoker.exporters import basicauth
from tests.test_hardening_http import PASSWORD, basic, web_config

WRONG = basic("prometheus", b"guess")["Authorization"]
RIGHT = basic("prometheus", PASSWORD)["Authorization"]


class HeldBcrypt:
    """Stands in for Logins._bcrypt: each check waits until `release`, so a test can fill the queue."""

    def __init__(self, logins: basicauth.Logins):
        self.real, self.gate, self.checked = logins._bcrypt, threading.Event(), []
        logins._bcrypt = self

    def __call__(self, user: str, password: bytes) -> bool:
        self.gate.wait(10)
        self.checked.append(password)
        return self.real(user, password)


def logins_with_clock(tmp_path, now: list[float]) -> basicauth.Logins:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
    cfg = web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n")
    return basicauth.Logins(cfg.users, cfg.dummy, clock=lambda: now[0])


async def test_guessers_that_pace_themselves_cannot_keep_a_new_scrapers_login_out(tmp_path):
    """The queue of logins made room for the address with the most budget left, but a budget refills
    (one failure every 5 s): guessers whose addresses fail once each 5 s tie with a scraper that never
    failed, and a tie turned the scraper away. With about 70 addresses (a /57 of IPv6 /64s, or any 70
    hosts) the queue stays full of such logins at bcrypt's pace, and an agent that had just started
    (the scraper's password not verified yet) answered its scraper 429 for as long as they went on.
    What ranks an address now is how often it has failed, which does not refill."""
    now = [1000.0]
    logins = logins_with_clock(tmp_path, now)
    guessers = [f"10.0.{i}.1" for i in range(40)]
    for address in guessers:  # each fails once...
        assert await logins.check(address, WRONG) == 401
    now[0] += 5.0  # ...and waits until its budget is whole again
    held = HeldBcrypt(logins)
    queued = [asyncio.create_task(logins.check(guessers[0], WRONG))]
    await asyncio.sleep(0.05)  # in bcrypt
    queued += [asyncio.create_task(logins.check(address, WRONG)) for address in guessers[1:basicauth.QUEUE + 1]]
    await asyncio.sleep(0.05)  # QUEUE waiting
    scraper = asyncio.create_task(logins.check("10.1.0.1", RIGHT))
    await asyncio.sleep(0.05)
    turned_away = scraper.done() and scraper.result() == basicauth.TOO_MANY
    held.gate.set()
    await asyncio.gather(*queued)
    assert not turned_away and await scraper == basicauth.OK
    assert held.checked.index(PASSWORD) <= basicauth.QUEUE, "it took a place in the queue"


async def test_every_loopback_address_is_one_client(tmp_path):
    """127.0.0.0/8 is one host: a local user can send from 16 million source addresses (bind() to any
    of them needs no privilege), each with a budget of 10 failures and a place in the queue of its own:
    a guesser with a fresh address for every login costs a bcrypt check per guess without end, and keeps
    the queue full of logins that never failed, which a new scraper's first login cannot displace
    (measured on a real agent: the scraper answered 429 at every try for as long as it went on). ::1
    is the same host."""
    now = [1000.0]
    logins = logins_with_clock(tmp_path, now)
    answers = [await logins.check(f"127.{i // 250}.{i % 250}.{i % 7 + 1}", WRONG) for i in range(30)]
    assert answers == [401] * basicauth.FAILURES_BURST + [429] * (30 - basicauth.FAILURES_BURST)
    assert await logins.check("::1", WRONG) == 429 and await logins.check("::ffff:127.9.9.9", WRONG) == 429
    assert await logins.check("192.0.2.7", WRONG) == 401, "another host has its own budget"


def test_link_local_ipv6_addresses_are_each_their_own_client():
    """Every host on a link has an address in fe80::/64: counted by /64, as a global IPv6 address is
    (one /64 is one host's, by SLAAC), every link-local client of every interface shared one budget
    and one place in the queue."""
    source = basicauth._source
    assert source("fe80::1%eth0") != source("fe80::2%eth0")
    assert source("fe80::1%eth0") != source("fe80::1%eth1")  # one address on two links: two hosts
    assert source("2001:db8::1") == source("2001:db8::ffff:1") != source("2001:db8:0:1::1")
    assert source("127.0.0.1") == source("127.200.3.4") == source("::1") == source("::ffff:127.0.0.2")
    assert source("10.0.0.1") == source("::ffff:10.0.0.1") != source("10.0.0.2")


def test_a_forged_run_after_a_quiet_spell_does_not_make_a_running_jobs_steps_lost():
    """A run that reports nothing for NEW_RUN_EVERY (30 s) yields to a new one: a checkpoint of a large
    model or an evaluation takes longer than that. One request from any holder of the token, naming the
    job and a new run from step 0, then counted every step of the job as lost (100 of 100 here, no
    restart, the job's processes the same all along), for good; repeated at each quiet spell. Steps are
    lost when a relaunch replaces the job's processes; the agent sees that they were not."""
    from tests.test_goodput import Clock, DetectConfig, GoodputLedger, StepRecord, run, slurm, snapshot
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    gpu, owners = snapshot({i: [100 + i] for i in range(8)}), {100 + i: slurm("42") for i in range(8)}
    run(ledger, clock, 2, gpu, owners)
    ledger.record_steps([StepRecord(n, 1.0) for n in range(1, 101)], run="slurm:42.0.0", pid=100)
    run(ledger, clock, 31, gpu, owners)  # a checkpoint: the same processes, no steps
    ledger.record_steps([StepRecord(0)], job="42", run="forged")
    run(ledger, clock, 2, gpu, owners)
    assert ledger.record_steps([StepRecord(101)], run="slurm:42.0.0", pid=100)[1:] == (1, 0)
    job = ledger.jobs["42"]
    assert (job.lost_steps, job.restarts, job.last_step) == (0, 0, 101)
    # a real relaunch still loses what it does again: new processes resume at step 51
    clock.now += 30
    relaunched = {200 + i: slurm("42") for i in range(8)}
    run(ledger, clock, 1, snapshot({i: [200 + i] for i in range(8)}), relaunched)
    assert ledger.record_steps([StepRecord(51)], run="slurm:42.0.1", pid=200)[1:] == (1, 0)
    assert (job.lost_steps, job.restarts) == (51, 1)


def test_one_jobs_own_cgroups_cannot_hide_the_other_jobs_processes(tmp_path):
    """Slurm's cgroup/v1 plugin makes each task's cgroup owned by the job's user (slurm
    src/plugins/cgroup/v1/cgroup_v1.c, `_handle_task_cgroup`: `common_cgroup_create(..., task_cgroup_path,
    job->uid, job->gid)`), so the user may make cgroups inside it. The walk that places PIDs /proc does
    not show (the service's ProtectProc=invisible) stops after MAX_CGROUPS directories of all jobs
    together: one job with 4,100 empty cgroups of its own, visited first, left every other job's GPU
    processes unplaced (`unknown`), every retry. Each job's subtree now gets MAX_CGROUPS_PER_JOB visits."""
    from stoker.sources.jobs import JobSource
    sysfs = tmp_path / "sys"
    freezer = sysfs / "fs" / "cgroup" / "freezer" / "slurm"
    victim = freezer / "uid_1001" / "job_1234" / "step_0" / "task_0"
    victim.mkdir(parents=True)
    (victim / "cgroup.procs").write_text("4242\n")
    own = freezer / "uid_1002" / "job_9999" / "step_0" / "task_0"
    for i in range(4100):
        (own / f"c{i:04d}").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    snap = JobSource(str(tmp_path / "proc"), str(sysfs)).resolve([4242])
    owner = snap.owners[4242]
    assert owner is not None and (owner.job_id, owner.source) == ("1234", "cgroup"), snap


def test_a_probe_writes_through_no_link_planted_at_its_file_name(tmp_path):
    """The probe's file name is known (`.stoker-probe-<hostname>`, docs/OPERATIONS.md) and its directory
    is on the NAS, often the mountpoint itself, where users write. The write opened it with O_CREAT|O_TRUNC
    and followed a symbolic link planted there: the link's target (resolved by the node, so any file the
    agent's user may write: its own state file, or anything when the agent runs as root) was truncated
    and overwritten with random bytes, and the link then unlinked, which hid it. A hard link to a file of
    the agent's user did the same. The probe now fails (an error, counted) and writes nothing."""
    import socket

    from stoker.probe_child import probe
    nas = tmp_path / "nas"
    nas.mkdir()
    name = nas / f".stoker-probe-{socket.gethostname()}"
    for plant in ("symlink", "hardlink"):
        victim = tmp_path / f"state-{plant}.json"
        victim.write_text('{"inventory": {"gpu": 8}}')
        (name.symlink_to if plant == "symlink" else name.hardlink_to)(victim)
        result = probe(str(nas), 4096)
        assert victim.read_text() == '{"inventory": {"gpu": 8}}', plant
        assert isinstance(result["write"], dict) and isinstance(result["read"], dict), (plant, result)
        assert isinstance(result["metadata"], float), "the metadata probe has a name of its own"
        name.unlink(missing_ok=True)


def test_a_statistic_name_the_driver_lists_twice_does_not_count_up_by_itself():
    """The kernel hands out a driver's ethtool statistic names as the driver writes them (linux
    net/ethtool/ioctl.c, `ethtool_get_strings` -> `ops->get_strings`); nothing makes them unique, and the
    agent strips them (some carry a trailing space). Two counters under one name (`rx_prio3_pause` and
    `rx_prio3_pause `) fed one monotonic counter two values each cycle: every fall read as a reset, and
    with both counters standing still the exported pause frames grew by 50,000 a cycle (pause storms
    and a congested fabric that were not there). The first of the names counts; the others are left out."""
    import ctypes

    from pyroute2.ethtool.ioctl import generate_EthtoolGStats

    from stoker.sources.netdev import EthtoolReader
    from tests.test_netdev import KernelEthtool

    listed = [("rx_prio3_pause", 100), ("rx_prio3_pause ", 50_000), ("rx_discards_phy", 7), ("rx_discards_phy", 900)]

    class Driver(KernelEthtool):
        def get_stringset(self, set_id=0, drvinfo_offset=0, null_terminate=1):
            return [name for name, _ in listed]

        def ioctl(self):
            buf = ctypes.cast(self.ifreq.gstats, ctypes.POINTER(generate_EthtoolGStats(len(listed)))).contents
            for i, (_, value) in enumerate(listed):
                buf.data[i] = value

    reader = EthtoolReader(Driver)
    seen = []
    for _ in range(5):
        stats, problems = reader.read(["ens18f0np0"])
        seen.append((stats["ens18f0np0"].pause_frames[("3", "rx")], stats["ens18f0np0"].discards["rx_discards_phy"]))
    assert seen == [(100, 7)] * 5


async def test_a_family_of_the_agents_own_that_cannot_render_costs_itself_not_the_scrape():
    """The collectors' chunks are rendered each on its own (a failure keeps that chunk's last text), but
    the agent's own metrics and what is registered with them (the inventory, the process metrics) were
    rendered as one: a value no float holds in one family (the state file's 10**400 GPUs, item above)
    made every scrape a 500, the collectors' series with it. Now that family is left out, one line."""
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families
    from structlog.testing import capture_logs

    from stoker.agent.supervisor import Supervisor
    from stoker.exporters.exposition import Exposition

    class Broken:
        def collect(self):
            yield GaugeMetricFamily("stoker_test_broken", "A value no float holds.", value=10**400)
            yield GaugeMetricFamily("stoker_test_fine", "Registered after it.", value=3)

    exposition = Exposition()
    sup = Supervisor([], exposition, lambda: {"version": "t", "nvml_version": "", "driver_version": ""})
    sup.registry.register(Broken())
    sup._render_self()
    with capture_logs() as lines:
        body = exposition.body().decode()
        exposition.body()
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"stoker_build_info", "stoker_test_fine"} <= names and "stoker_test_broken" not in names
    assert [line["family"] for line in lines if line["event"] == "metric family left out"] == ["stoker_test_broken"]


async def test_an_authorization_header_that_is_not_ascii_is_a_401_not_a_500(tmp_path):
    """HTTP field values are bytes (RFC 9110, section 5.5); aiohttp hands them on as text with each byte
    that is not UTF-8 as a lone surrogate. Basic credentials that were not ASCII made base64 raise a
    ValueError that was not caught, and the hint API encoded the header strictly: either way a 500 and a
    logged traceback for a client without credentials, where a wrong password is a 401."""
    from stoker.config import CheckpointConfig
    from stoker.detect.checkpoint import CheckpointTracker
    from stoker.exporters.hints import make_hint_app
    from stoker.exporters.http import serve
    from tests.test_hardening_http import TOKEN, auth_server

    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
    metrics = await auth_server(web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n"))
    hints = await serve(make_hint_app(CheckpointTracker(CheckpointConfig()), TOKEN), "127.0.0.1", 0)

    async def status(port: int, path: str, value: bytes) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        method = b"POST" if path.startswith("/api") else b"GET"
        writer.write(method + b" " + path.encode() + b" HTTP/1.1\r\nHost: stoker\r\nConnection: close\r\n"
                     b"Content-Length: 2\r\nAuthorization: " + value + b"\r\n\r\n{}")
        head = await reader.readuntil(b"\r\n")
        writer.close()
        return int(head.split()[1])

    try:
        for value in (b"Basic \xc3\xa9", b"Basic \xff\xfe", b"Bearer \xff\xfe", b"\x80"):
            assert await status(metrics.port, "/metrics", value) == 401, value
            assert await status(hints.port, "/api/v1/checkpoints/start", value) == 401, value
    finally:
        await metrics.close()
        await hints.close()


def squatter(answer) -> tuple[int, threading.Event]:
    """A local user's server on a port the agent does not hold (the agent restarting, or away): it takes
    one request and answers with `answer(connection)`; returns its port and an event set once it is done."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        try:
            answer(conn)
        except OSError:
            pass
        finally:
            conn.close()
            server.close()
            done.set()
    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], done


def test_a_hint_reads_a_bounded_answer_within_its_timeout_whoever_answers():
    """The training process sends its hints to 127.0.0.1:9478, which any local user can listen on while
    the agent does not. The client read the whole answer, with its timeout applied to each read only: a
    server sending an endless body took a training process to 1.8 GB in 6 s (the step thread does the
    same in the background), and one sending a byte every 1.5 s held `with checkpoint(...)` around a save
    for as long as it liked. An answer is now read within the hint's timeout in all, at most 64 KiB."""
    import time

    from stoker import hints

    def endless(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
        for _ in range(500):  # 64 MB, then the server gives up
            conn.sendall(b"1," * 65536)

    def trickle(conn):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b" " * 100:
            conn.send(bytes([byte]))
            time.sleep(0.3)

    for answer in (endless, trickle):
        port, done = squatter(answer)
        started = time.monotonic()
        try:
            hints.start(mountpoint="/mnt/ckpt", url=f"http://127.0.0.1:{port}", token="t0k", timeout=1.0)
        except hints.HintFailed:
            pass
        took = time.monotonic() - started
        done.wait(30)
        assert took < 2.0, f"{answer.__name__}: the hint took {took:.1f} s with a timeout of 1 s"
