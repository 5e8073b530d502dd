"""The HTTP side under abuse: floods of idle and slow connections, failing logins, malformed web
configurations and hint requests. Real servers on loopback, real sockets, a real agent process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from stoker import config
from stoker.config import CheckpointConfig
from stoker.detect.checkpoint import CheckpointTracker
from stoker.exporters import basicauth, http, webconfig
from stoker.exporters.exposition import Exposition
from stoker.exporters.hints import make_hint_app
from stoker.exporters.http import log_loop_errors, make_app, serve
from tests.conftest import free_port, need_binary, start_agent_process, wait_http

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "stoker.service"
PASSWORD = b"s3cret-scrape-password"
TOKEN = "0123456789abcdef-test-token"


# -- helpers ------------------------------------------------------------------------------------


def start_limited_agent(*args: str, nofile: tuple[int, int]) -> subprocess.Popen:
    """`stoker run` with RLIMIT_NOFILE set as a service without LimitNOFILE gets it (1,024 soft);
    its log goes to a file that `proc.log()` reads."""
    log = tempfile.NamedTemporaryFile(prefix="stoker-agent-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "stoker", "run", *args], stdout=subprocess.DEVNULL, stderr=log,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
    log.close()
    proc.log = lambda: open(log.name).read()  # type: ignore[attr-defined]
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def scrape(url: str, timeout: float = 5.0) -> tuple[int | str, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            status: int | str = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        status = type(exc).__name__
    return status, time.monotonic() - started


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """True once the agent closed `sock` (EOF or reset) before `deadline` (monotonic)."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True if the server closed the connection (EOF or reset) within `within` seconds: a bound
    that only proves it did not hang."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except asyncio.TimeoutError:
        return False


async def still_open(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), 0.2)
    except asyncio.TimeoutError:
        return True
    except (ConnectionResetError, BrokenPipeError):
        return False
    return False


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def small_server(handler=ok, **kwargs):
    app = web.Application()
    app.router.add_get("/", handler)
    return await serve(app, "127.0.0.1", 0, **kwargs)


def basic(user: str, password: bytes) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(user.encode() + b":" + password).decode()}


def web_config(tmp_path: Path, text: str) -> webconfig.WebConfig:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return webconfig.load(str(path))


class CountingBcrypt:
    """Wraps bcrypt.checkpw: which costs and passwords were checked, in order, and how many checks ran at once."""

    def __init__(self, monkeypatch):
        self.real = bcrypt.checkpw
        self.costs: list[int] = []
        self.passwords: list[bytes] = []
        self.running = self.most = 0
        self.lock = threading.Lock()
        monkeypatch.setattr(bcrypt, "checkpw", self)

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self.lock:
            self.costs.append(int(hashed[4:6]))
            self.passwords.append(password)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self.real(password, hashed)
        finally:
            with self.lock:
                self.running -= 1


# -- connections --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_flood_of_idle_and_slow_clients_leaves_metrics_and_health_answering(tmp_path):
    """1,000 idle connections and 50 that trickle their header, against an agent with the
    1,024 open files a unit without LimitNOFILE gets, while a client scrapes every 0.25 s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the test needs 4096 open files for its own sockets; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    agent = start_limited_agent("--simulate", "healthy", "--listen", f"127.0.0.1:{port}", "--log-format", "json",
                                nofile=(1024, 1024))
    sockets: list[socket.socket] = []
    stop_trickle = threading.Event()
    try:
        wait_http(f"{base}/metrics")
        refused = 0
        for _ in range(1000):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                refused += 1
        slow = []
        for _ in range(50):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: stoker\r\nX-Slow: ")
                slow.append(s)
            except OSError:
                refused += 1
        sockets.extend(slow)

        def trickle():
            while not stop_trickle.wait(0.5):
                for s in slow:
                    try:
                        s.send(b"x")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        scrapes = []
        for _ in range(20):
            scrapes.append(scrape(f"{base}/metrics"))
            if scrapes[-1][0] != 200:
                break
            time.sleep(0.25)
        health = scrape(f"{base}/healthz")
        deadline = time.monotonic() + 30
        still_held = sum(not closed_by_peer(s, deadline) for s in sockets)
        log = agent.log()
        print(f"\nflood: {len(sockets)} connections opened ({refused} refused at connect); scrapes "
              f"{[s for s, _ in scrapes]}; slowest scrape {max(d for _, d in scrapes) * 1000:.1f} ms, median "
              f"{statistics.median(d for _, d in scrapes) * 1000:.1f} ms; log {len(log)} bytes")
        assert all(status == 200 for status, _ in scrapes), scrapes
        assert health[0] == 200, health
        assert agent.poll() is None
        assert still_held == 0, f"{still_held} idle or slow connections were never closed"
        assert len(log) < 64 * 1024, log[-2000:]
        assert "Traceback" not in log and "Too many open files" not in log, log[-2000:]
    finally:
        stop_trickle.set()
        for s in sockets:
            s.close()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
        os.unlink(agent.log_path)


async def test_a_client_that_sends_nothing_is_dropped():
    listener = await small_server(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    try:
        started = time.monotonic()
        assert await closed_by_server(reader, within=10)
        print(f"\nidle client dropped after {time.monotonic() - started:.2f} s (header timeout 0.3 s)")
    finally:
        writer.close()
        await listener.close()


async def test_a_client_that_trickles_its_header_is_dropped():
    listener = await small_server(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)

    async def trickle():
        writer.write(b"GET / HTTP/1.1\r\nHost: stoker\r\nX-Slow: ")
        with_errors = (ConnectionResetError, BrokenPipeError)
        while True:
            await asyncio.sleep(0.05)
            try:
                writer.write(b"x")
                await writer.drain()
            except with_errors:
                return

    sender = asyncio.create_task(trickle())
    try:
        assert await closed_by_server(reader, within=10)
    finally:
        sender.cancel()
        writer.close()
        await listener.close()


async def test_a_kept_alive_connection_is_closed_when_idle():
    listener = await small_server(idle_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: stoker\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(2) == b"ok"
        assert await closed_by_server(reader, within=10)
    finally:
        writer.close()
        await listener.close()


async def test_at_the_limit_a_new_client_displaces_the_idle_connection_heard_from_least_recently():
    listener = await small_server(max_connections=4, header_timeout=60)
    idle = []
    try:
        for _ in range(4):
            idle.append(await asyncio.open_connection("127.0.0.1", listener.port))
            await asyncio.sleep(0.05)  # accepted in this order
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{listener.port}/") as resp:
                assert resp.status == 200 and await resp.text() == "ok"
        assert await closed_by_server(idle[0][0], within=5), "the oldest idle connection made room"
        assert all([await still_open(reader) for reader, _ in idle[1:]])
    finally:
        for _, writer in idle:
            writer.close()
        await listener.close()


async def test_when_every_connection_is_busy_a_newcomer_is_turned_away():
    entered, release = asyncio.Semaphore(0), asyncio.Event()

    async def slow(request):
        entered.release()
        await release.wait()
        return web.Response(text="done")

    listener = await small_server(slow, max_connections=2)
    url = f"http://127.0.0.1:{listener.port}/"
    try:
        async with aiohttp.ClientSession() as session:

            async def get() -> str:
                async with session.get(url) as resp:
                    return await resp.text()

            busy = [asyncio.create_task(get()) for _ in range(2)]
            for _ in busy:
                await asyncio.wait_for(entered.acquire(), 10)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            assert await closed_by_server(reader, within=5), "no idle connection to displace: refused"
            writer.close()
            release.set()
            assert await asyncio.gather(*busy) == ["done", "done"]
            assert await get() == "done"
    finally:
        release.set()
        await listener.close()


async def test_a_tls_client_that_never_says_hello_is_dropped(tmp_path):
    subprocess.run([need_binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=stoker-test", "-keyout", str(tmp_path / "key.pem"), "-out",
                    str(tmp_path / "cert.pem")], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = await small_server(ssl_context=context, header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    try:
        assert await closed_by_server(reader, within=10)
    finally:
        writer.close()
        await listener.close()


async def test_event_loop_errors_are_logged_once_then_counted():
    """asyncio reports an accept() failing with EMFILE once per pending connection, every second."""
    from structlog.testing import capture_logs

    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    log_loop_errors(loop)
    try:
        with capture_logs() as lines:
            for _ in range(1000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
    finally:
        loop.set_exception_handler(previous)
    assert len(lines) == 1 and lines[0]["event"] == "event loop error"
    assert "Too many open files" in lines[0]["error"] and "exc_info" not in lines[0]


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"hard limit {hard}")
    result = subprocess.run([sys.executable, "-c", "from stoker.exporters.http import raise_fd_limit; "
                             "print(raise_fd_limit())"], capture_output=True, text=True, timeout=30,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048)))
    assert result.stdout.strip() == "2048", result.stderr


def test_the_unit_sets_an_open_file_limit_well_above_the_connection_caps():
    limit = int(re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.MULTILINE).group(1))
    assert limit >= 4 * (256 + 16)


# -- basic auth ---------------------------------------------------------------------------------


async def auth_server(config: webconfig.WebConfig, **kwargs):
    app = make_app(Exposition(), lambda: [])
    webconfig.secure(app, config)
    return await serve(app, "127.0.0.1", 0, **kwargs)


async def timed_get(session: aiohttp.ClientSession, url: str, headers: dict) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - started


async def test_an_unknown_user_costs_the_same_bcrypt_work_as_a_known_one(tmp_path, monkeypatch):
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=10)).decode()
    cfg = web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n")
    checks = CountingBcrypt(monkeypatch)
    listener = await auth_server(cfg)
    url = f"http://127.0.0.1:{listener.port}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            known = [await timed_get(session, url, basic("prometheus", b"wrong-%d" % i)) for i in range(5)]
            unknown = [await timed_get(session, url, basic("nobody", b"wrong-%d" % i)) for i in range(5)]
    finally:
        await listener.close()
    assert {status for status, _ in known + unknown} == {401}
    assert checks.costs == [10] * 10, "one bcrypt check of the same cost for each, known user or not"
    print(f"\nwrong password, median: known user {statistics.median(d for _, d in known) * 1000:.1f} ms, "
          f"unknown user {statistics.median(d for _, d in unknown) * 1000:.1f} ms")


async def test_failing_logins_cannot_evict_the_scrapers_verified_credential(tmp_path, monkeypatch):
    """1,100 wrong passwords from 110 addresses (within each one's budget), then the scraper."""
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
    cfg = web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n")
    checks = CountingBcrypt(monkeypatch)
    logins = basicauth.Logins(cfg.users, cfg.dummy)
    assert await logins.check("127.0.0.1", basic("prometheus", PASSWORD)["Authorization"]) == 200
    for i in range(1100):
        header = basic(f"attacker{i % 7}", b"guess-%d" % i)["Authorization"]
        assert await logins.check(f"10.0.{i % 110}.1", header) == 401
    checks.costs.clear()
    assert await logins.check("10.0.0.1", basic("prometheus", PASSWORD)["Authorization"]) == 200
    assert checks.costs == [], "the verified pair was answered from the cache"


async def test_an_address_that_keeps_failing_is_answered_429_without_bcrypt(tmp_path, monkeypatch):
    """A guesser cost a bcrypt check per guess for as long as it guessed. Each address may fail 10
    logins, then one every 5 s; other addresses, and a verified password from the same one, are
    not affected."""
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
    cfg = web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n")
    checks = CountingBcrypt(monkeypatch)
    now = [1000.0]
    logins = basicauth.Logins(cfg.users, cfg.dummy, clock=lambda: now[0])
    assert await logins.check("10.0.0.9", basic("prometheus", PASSWORD)["Authorization"]) == 200
    wrong = [basic("prometheus", b"guess-%d" % i)["Authorization"] for i in range(20)]
    assert [await logins.check("10.0.0.1", w) for w in wrong[:12]] == [401] * 10 + [429] * 2
    assert len(checks.costs) == 11, "no bcrypt for the two over the budget"
    assert await logins.check("10.0.0.2", wrong[12]) == 401, "another address has its own budget"
    assert await logins.check("10.0.0.1", basic("prometheus", PASSWORD)["Authorization"]) == 200
    now[0] += 5.0
    assert [await logins.check("10.0.0.1", w) for w in wrong[13:15]] == [401, 429]
    assert await logins.check("2001:db8::1", wrong[15]) == 401
    assert await logins.check("::ffff:10.0.0.1", wrong[16]) == 429, "an IPv4-mapped address is the IPv4 one"


async def test_a_cached_scrape_does_not_queue_behind_failing_logins(tmp_path, monkeypatch):
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=10)).decode()
    cfg = web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n")
    checks = CountingBcrypt(monkeypatch)
    listener = await auth_server(cfg)
    try:
        assert await request(listener.port, basic("prometheus", PASSWORD)) == 200
        failing = [asyncio.create_task(request(listener.port, basic("prometheus", b"guess-%d" % i), f"127.0.1.{i}"))
                   for i in range(1, 13)]
        while not checks.running:
            await asyncio.sleep(0.005)
        status = await request(listener.port, basic("prometheus", PASSWORD))
        pending = sum(not task.done() for task in failing)
        assert set(await asyncio.gather(*failing)) == {401}
    finally:
        await listener.close()
    assert status == 200 and pending > 0, "the cached scrape was answered while failing logins still waited"
    assert checks.most == 1, "one bcrypt check at a time"


async def request(port: int, headers: dict, source: str = "127.0.0.1", path: str = "/metrics") -> int | str:
    """One GET on a new connection from `source` (any 127/8 address): the status, or `closed`
    when the server closed the connection without an answer (a refused newcomer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: stoker\r\nConnection: close\r\n{fields}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.read()
        return int(head.split()[1])
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    finally:
        writer.close()


async def failing_logins(port: int, source: str) -> None:
    """A client from `source` sending wrong passwords over a kept-alive connection, one every 10 ms,
    reconnecting when the server closes it, until cancelled."""
    sent = 0
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(0.01)
            continue
        try:
            while True:
                sent += 1
                auth = basic("prometheus", f"guess-{source}-{sent}".encode())["Authorization"]
                writer.write(f"GET /metrics HTTP/1.1\r\nHost: stoker\r\nAuthorization: {auth}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                await reader.readexactly(length)
                await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError):
            await asyncio.sleep(0.01)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def flood_of_failing_logins(port: int, sources: list[str], checks: CountingBcrypt, started: int = 1):
    """The clients of `sources` (one connection each) sending wrong passwords, once `started` checks ran."""
    tasks = [asyncio.create_task(failing_logins(port, source)) for source in sources]
    try:
        while len(checks.costs) < started:
            await asyncio.sleep(0.01)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def attackers(count: int, first: int = 2) -> list[str]:
    return [f"127.0.{(first + i) // 250}.{(first + i) % 250 + 1}" for i in range(count)]


@pytest.mark.slow
async def test_failing_logins_cannot_hold_every_connection(tmp_path, monkeypatch):
    """260 connections sending wrong passwords held all 256 connection slots waiting for bcrypt: the
    authorised scraper got 1 answer out of 80 (node_exporter: 108 of 108). Here 40 from 40 addresses
    against a listener of 32 connections: every scrape is answered. (exporter-toolkit, web/handler.go:
    one bcrypt check at a time behind a mutex, and no connection cap in Go's net/http.)"""
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=10)).decode()
    checks = CountingBcrypt(monkeypatch)
    listener = await auth_server(web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n"),
                                 max_connections=32)
    try:
        assert await request(listener.port, basic("prometheus", PASSWORD)) == 200
        async with flood_of_failing_logins(listener.port, attackers(40), checks, started=3):
            await asyncio.sleep(0.3)  # every attacker connected and asking
            answers = []
            for _ in range(10):
                answers.append(await request(listener.port, basic("prometheus", PASSWORD)))
                await asyncio.sleep(0.05)
    finally:
        await listener.close()
    assert answers == [200] * 10, answers


@pytest.mark.slow
async def test_a_new_scrapers_login_waits_for_one_check_per_other_address(tmp_path, monkeypatch):
    """After a restart the scraper's password is not verified yet: it waited behind every queued
    wrong password (0 answers out of 29). 30 connections from one address flood; the scraper's own
    check comes after at most the one in progress and one more of that address."""
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=10)).decode()
    checks = CountingBcrypt(monkeypatch)
    listener = await auth_server(web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n"))
    try:
        async with flood_of_failing_logins(listener.port, ["127.0.0.2"] * 30, checks):
            await asyncio.sleep(0.3)
            before = len(checks.passwords)
            status = await request(listener.port, basic("prometheus", PASSWORD))
            ahead = checks.passwords.index(PASSWORD) - before
    finally:
        await listener.close()
    assert status == 200 and ahead <= 2, f"{ahead} checks of the flood ran before the scraper's"


@pytest.mark.slow
async def test_a_full_login_queue_makes_room_for_an_address_that_has_not_failed(tmp_path, monkeypatch):
    """40 addresses keep the queue of logins full; once they have failed, the scraper's first login
    takes the place of one of theirs, and waits at most for the queue ahead of it."""
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=8)).decode()
    checks = CountingBcrypt(monkeypatch)
    listener = await auth_server(web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n"))
    try:
        async with flood_of_failing_logins(listener.port, attackers(40), checks, started=60):
            before = len(checks.passwords)
            status = await request(listener.port, basic("prometheus", PASSWORD))
            ahead = checks.passwords.index(PASSWORD) - before
    finally:
        await listener.close()
    assert status == 200 and ahead <= basicauth.QUEUE + 1, f"{ahead} checks ran before the scraper's"


@pytest.mark.slow
async def test_stopping_turns_away_the_logins_still_waiting(tmp_path, monkeypatch):
    """SIGTERM during a flood of failing logins took 26 s: the server waited for every queued bcrypt
    check. Now at most the check in progress runs after the listener starts closing."""
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=10)).decode()
    checks = CountingBcrypt(monkeypatch)
    listener = await auth_server(web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n"))
    async with flood_of_failing_logins(listener.port, attackers(20), checks, started=2):
        await asyncio.sleep(0.2)
        before = len(checks.costs)
        await listener.close()
        after = len(checks.costs)
    assert after - before <= 1, f"{after - before} bcrypt checks ran while the listener closed"


@pytest.mark.slow
def test_a_flood_of_malformed_requests_is_one_log_line(tmp_path):
    """Each malformed request logged a 9-line traceback, ungated: 23,408 in 10 s, 16 MB."""
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--listen", f"127.0.0.1:{port}", "--log-format", "json")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: stoker\r\nContent-Length: nope\r\n\r\n")
                assert s.recv(64).split()[1] == b"400"
        assert scrape(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
    lines = [json.loads(line) for line in agent.log().splitlines()]
    bad = [line for line in lines if line["event"] == "bad request"]
    assert len(bad) == 1 and "BadHttpMessage" in bad[0]["error"], agent.log()[-3000:]
    assert all(line["event"] != "request failed" for line in lines)


async def test_a_connect_flood_does_not_overflow_the_accept_queue():
    """With a listen backlog of 64 (8 on the hint API) the kernel dropped the SYNs of a connect flood
    beyond it, a scraper's among them, and resent them only after a second: scrapes waited 1-2 s.
    500 clients connect while the event loop is busy: the kernel completes every handshake at once
    (it would resend a dropped SYN only after 1 s). Source: Linux net/ipv4/tcp_input.c,
    tcp_conn_request(), drops a SYN while sk_acceptq_is_full() (counted as ListenOverflows)."""
    listener = await small_server(max_connections=16)
    clients = []
    try:
        for _ in range(500):  # the event loop is blocked here: nothing is accepted meanwhile
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", listener.port))
            clients.append(s)
        poll = select.poll()
        for s in clients:
            poll.register(s, select.POLLOUT)
        established, deadline = set(), time.monotonic() + 0.5
        while len(established) < len(clients) and time.monotonic() < deadline:
            established.update(fd for fd, event in poll.poll(50) if event & select.POLLOUT)
        assert len(established) == len(clients), f"{len(established)} of {len(clients)} handshakes completed"
        async with aiohttp.ClientSession() as session:  # the queue drains; the guard displaces the flood
            async with session.get(f"http://127.0.0.1:{listener.port}/") as resp:
                assert resp.status == 200
    finally:
        for s in clients:
            s.close()
        await listener.close()


async def test_tls_handshakes_in_progress_count_against_the_connection_limit(tmp_path):
    """The event loop did TLS handshakes before the guard saw a connection: 1,000 clients that
    connect and never finish a handshake each held a connection and asyncio's 256 KiB buffer until
    the handshake timeout (RSS 47 -> 260 MB). Now they are connections like others: 40 that never
    say hello, against a limit of 8, leave 8 open; a TLS client then gets its answer. Source:
    CPython Lib/asyncio/sslproto.py, SSLProtocol.max_size = 256 * 1024, allocated in __init__."""
    subprocess.run([need_binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=stoker-test", "-keyout", str(tmp_path / "key.pem"), "-out",
                    str(tmp_path / "cert.pem")], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = await small_server(ssl_context=context, max_connections=8, header_timeout=60)
    silent = []
    try:
        for _ in range(40):
            silent.append(await asyncio.open_connection("127.0.0.1", listener.port))
            await asyncio.sleep(0.01)
        closed = [await closed_by_server(reader, within=5) for reader, _ in silent[:32]]
        assert all(closed), f"{closed.count(False)} of the 32 oldest silent clients still held"
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{listener.port}/", ssl=client) as resp:
                assert resp.status == 200 and await resp.text() == "ok"
    finally:
        for _, writer in silent:
            writer.close()
        await listener.close()


async def test_a_password_longer_than_bcrypt_reads_is_a_401_not_a_500(tmp_path):
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
    listener = await auth_server(web_config(tmp_path, f"basic_auth_users:\n  prometheus: {hashed}\n"))
    try:
        async with aiohttp.ClientSession() as session:
            assert (await timed_get(session, f"http://127.0.0.1:{listener.port}/metrics",
                                    basic("prometheus", b"x" * 100)))[0] == 401
    finally:
        await listener.close()


GOOD = "$2b$10$NvyWRXqie3gwq1vqLo/KK.z4EMPE9G.wUrqQ4t/VPFoX63teIcK/m"


@pytest.mark.parametrize("hashed", [
    "$2b$03" + GOOD[6:],               # cost below bcrypt's 4: "Invalid salt" on every request
    "$2b$32" + GOOD[6:],
    GOOD[:28] + "Z" + GOOD[29:],       # the salt's last character has bits set that must be zero
    "$2$10$" + GOOD[7:],
    GOOD[:-1],                         # one character short: no password could ever match
    GOOD + "A",
    GOOD[:-1] + "Z",                   # the hash's last character has bits set that must be zero
    "$2b$10$" + "!" * 53,
])
def test_a_broken_bcrypt_hash_is_refused_at_startup(tmp_path, hashed):
    with pytest.raises(config.ConfigError) as err:
        web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    assert "basic_auth_users.prometheus" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("prefix", ["2a", "2b", "2y"])
@pytest.mark.parametrize("rounds", [4, 5, 10])
def test_every_hash_bcrypt_writes_is_accepted(tmp_path, prefix, rounds):
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=rounds, prefix=b"2a" if prefix == "2a" else b"2b"))
    hashed = ("$" + prefix + hashed.decode()[3:])
    cfg = web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    assert bcrypt.checkpw(PASSWORD, cfg.users["prometheus"]) and len(cfg.dummy) == len(hashed)
    assert not bcrypt.checkpw(PASSWORD, cfg.dummy)


# -- malformed web configurations: one line naming the key, exit 2 -------------------------------


def run_with_web_config(tmp_path: Path, web: bytes | None, fifo: bool = False) -> subprocess.CompletedProcess:
    path = tmp_path / "web.yml"
    if fifo:
        os.mkfifo(path)
    else:
        path.write_bytes(web)
    (tmp_path / "stoker.toml").write_text(f'[agent]\nweb_config_file = "{path}"\n')
    return subprocess.run([sys.executable, "-m", "stoker", "run", "--config", str(tmp_path / "stoker.toml"),
                           "--simulate", "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("web, key", [
    (b"\x00\x89PNG\r\n\x1a\n\xff\xfe\xfd", "not UTF-8"),
    (b"basic_auth_users: [prometheus, grafana]\n", "basic_auth_users: expected a mapping"),
    (b"http_server_config:\n  headers: [X-Frame-Options]\n", "http_server_config.headers: expected a mapping"),
    (b"http_server_config: 5\n", "http_server_config: expected a mapping"),
    (b"http_server_config:\n  headers:\n    Content-Length: 0\n", "http_server_config.headers.Content-Length"),
    (b"tls_server_config: yes\n", "tls_server_config: expected a mapping"),
    (b"tls_server_config:\n  cert_file: a\n  key_file: b\n  max_version: TLS11\n", "tls_server_config.max_version"),
    (b"tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n", "tls_server_config.min_version"),
    (b"tls_server_config:\n  cert_file: [a]\n  key_file: b\n", "tls_server_config.cert_file"),
    (b"basic_auth_users:\n  prometheus: '$2b$03" + GOOD[6:].encode() + b"'\n", "basic_auth_users.prometheus"),
    (b"a: " + b"[" * 8000 + b"]" * 8000 + b"\n", "nested too deeply"),
    (b"a: [\n", "not valid YAML"),
    # values PyYAML cannot build ended with a traceback and exit 1 (a restart loop), or named no key
    (b"basic_auth_users: !!timestamp x\n", "basic_auth_users: 'x' is not a valid !!timestamp"),
    (b"basic_auth_users:\n  prometheus: !!bool maybe\n", "basic_auth_users.prometheus"),
    (b"basic_auth_users:\n  prometheus: 2024-02-30\n", "basic_auth_users.prometheus"),
    (b"http_server_config:\n  http2: !!int two\n", "http_server_config.http2"),
    (b"tls_server_config: !!set {cert_file: null}\n", "tls_server_config: !!set is not supported"),
])
def test_a_malformed_web_config_is_one_line_naming_the_key_and_exit_2(tmp_path, web, key):
    result = run_with_web_config(tmp_path, web)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "agent.web_config_file" in lines[0] and key in lines[0], lines[0]


def test_a_fifo_as_web_config_is_refused_not_waited_on(tmp_path):
    result = run_with_web_config(tmp_path, None, fifo=True)
    assert result.returncode == 2 and "not a regular file" in result.stderr, result.stderr[-3000:]


# -- the hint API: the client's mistakes are 400s ------------------------------------------------


@pytest.fixture
async def hint_api():
    listener = await serve(make_hint_app(CheckpointTracker(CheckpointConfig()), TOKEN), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{listener.port}/api/v1/checkpoints/start"
    await listener.close()


async def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                         "Content-Type": content_type}) as resp:
            return resp.status, json.loads(await resp.read())


@pytest.mark.parametrize("body, content_type, fragment", [
    (b'{"mountpoint": "/mnt/c", "expected_bytes": ' + b"9" * 5000 + b"}", "application/json", "not JSON"),
    (b'{"mountpoint": "/mnt/c", "expected_bytes": ' + str(2**70).encode() + b"}", "application/json",
     "expected_bytes"),
    (b'{"mountpoint": "/mnt/c"}', "application/json; charset=bogus", "charset"),
    (b'{"mountpoint": "/mnt/c"}', "application/json; charset=latin-1", "charset"),
    (b'{"a": ' + b"[" * 8000 + b"]" * 8000 + b"}", "application/json", "nested too deeply"),
    (b'{"mountpoint": "/mnt/\xff"}', "application/json", "not JSON"),
])
async def test_a_bad_hint_request_is_a_400_with_a_message(hint_api, body, content_type, fragment):
    status, answer = await post(hint_api, body, content_type)
    assert status == 400 and fragment in answer["error"], answer


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/json; charset=UTF8"])
async def test_a_good_hint_request_reaches_the_tracker(hint_api, content_type):
    status, answer = await post(hint_api, b'{"mountpoint": "/mnt/c", "expected_bytes": 1024}', content_type)
    assert status == 503 and "again" in answer["error"]  # no NFS mount read yet: the tracker answered


async def test_memory_is_handed_back_once_a_flood_has_ended(monkeypatch):
    """glibc keeps the blocks a flood's connections freed (with TLS, OpenSSL's state and buffers):
    the agent stayed 225 MB larger after a TLS handshake flood. Once a flood (more than half the
    connection limit open) is gone, the heap is trimmed, once; a few connections never trigger it."""
    trims = []
    monkeypatch.setattr(http, "release_memory", lambda: trims.append(time.monotonic()))
    listener = await small_server(max_connections=16, header_timeout=60)
    try:
        few = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(4)]
        for _, writer in few:
            writer.close()
        flood = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(12)]
        await asyncio.sleep(0.2)
        assert trims == [], "nothing to hand back while the connections are open"
        for _, writer in flood:
            writer.close()
        deadline = time.monotonic() + 10
        while not trims and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    assert len(trims) == 1, trims
