"""Floods against Stoker and node_exporter, side by side in the same run: does the authorised
scraper still get its answers?

Both serve the same trees (tests/fixtures/sysfs/xe9680 and tests/fixtures/procfs/node, as
bench/peer.py) behind the same exporter-toolkit web configuration (none, basic auth, TLS, or
both; bcrypt cost 10). For each flood, each exporter is started fresh, the flood runs from a
child process for `--seconds`, and a scraper on 127.0.0.1 asks for /metrics every 0.25 s with
Prometheus' default 10 s timeout, sending the right password where auth is on. Reported per
exporter: scrapes answered 200 out of those tried, their median and slowest time, the flood's
own rate (so both took the same beating), the exporter's resident memory and open descriptors
(before, at the peak, and 5 s after the flood), its log bytes, and for the failing-login floods
how long SIGTERM takes while the flood goes on.

Floods (clients come from 127.0.0.2 up, or from 64 addresses for `logins-64`):
    idle        N connections that send nothing (reopened when closed)
    slow        N connections trickling a header, a byte every 0.5 s
    churn       N clients connecting and closing at once, non-stop (a connect flood)
    malformed   N clients sending a request with a broken header, non-stop
    logins      N clients sending wrong passwords over kept-alive connections, non-stop
    logins-64   the same from 64 source addresses
    restart     `logins`, with the exporter restarted under it: the scraper's password is checked afresh
                (the flood goes on until the scraper is done)
    handshakes  N clients doing TLS handshakes (then closing), non-stop

    python -m bench.floods [--seconds 8] [--clients 1.0] [--only NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
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

from bench.common import emit, rss_bytes
from bench.scrape import free_port

ROOT = Path(__file__).resolve().parent.parent
SYSFS = ROOT / "tests" / "fixtures" / "sysfs" / "xe9680"
PROCFS = ROOT / "tests" / "fixtures" / "procfs" / "node"
USER, PASSWORD = "prometheus", "s3cret-scrape-password"
SCRAPE_EVERY, SCRAPE_TIMEOUT = 0.25, 10.0

# (flood, web configuration, clients at --clients 1.0)
RUNS = [
    ("idle", "plain", 1000), ("slow", "plain", 300), ("churn", "plain", 1000), ("malformed", "plain", 100),
    ("idle", "auth", 1000), ("churn", "auth", 1000), ("logins", "auth", 260), ("logins-64", "auth", 260),
    ("restart", "auth", 260),
    ("idle", "tls", 1000), ("churn", "tls", 1000), ("handshakes", "tls", 300), ("logins", "tls+auth", 260),
]


# -- the exporters ------------------------------------------------------------------------------


def write_configs(tmp: Path) -> dict[str, Path | None]:
    import bcrypt
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=bench", "-keyout", str(tmp / "key.pem"),
                    "-out", str(tmp / "cert.pem")], check=True, capture_output=True)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    tls = f"tls_server_config:\n  cert_file: {tmp / 'cert.pem'}\n  key_file: {tmp / 'key.pem'}\n"
    auth = f"basic_auth_users:\n  {USER}: {hashed}\n"
    configs: dict[str, Path | None] = {"plain": None}
    for name, text in (("auth", auth), ("tls", tls), ("tls+auth", tls + auth)):
        configs[name] = tmp / f"{name}.yml"
        configs[name].write_text(text)
    return configs


class Exporter:
    """One exporter process on a fixed port, its log in a file."""

    def __init__(self, name: str, web: Path | None, tmp: Path):
        self.name, self.web, self.tmp = name, web, tmp
        self.port = free_port()
        self.log = tmp / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        web = [] if self.web is None else [f"--web.config.file={self.web}"]
        if self.name == "node_exporter":
            return ["prometheus-node-exporter", f"--path.sysfs={SYSFS}", f"--path.procfs={PROCFS}",
                    "--collector.disable-defaults", "--collector.infiniband", "--collector.mountstats",
                    f"--web.listen-address=127.0.0.1:{self.port}", *web]
        config = self.tmp / f"stoker-{self.port}.toml"
        text = "[gpu]\nenabled = false\n[netdev]\nenabled = false\n"
        if self.web is not None:
            text = f'[agent]\nweb_config_file = "{self.web}"\n' + text
        config.write_text(text)
        return [sys.executable, "-m", "stoker", "run", "--config", str(config), "--sysfs-root", str(SYSFS),
                "--procfs-root", str(PROCFS), "--listen", f"127.0.0.1:{self.port}", "--log-format", "json"]

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log)

    def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if scrape(self.url, self.tls, self.auth, timeout=2)[0] == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not answer on {self.url}")

    def listening(self, timeout: float = 30) -> None:
        """Until the port accepts connections (the flood's among them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not listen on {self.port}")

    def stop(self) -> float:
        """SIGTERM; seconds until the process is gone (killed after 60 s)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - started

    @property
    def tls(self) -> bool:
        return self.web is not None and "tls_server_config" in self.web.read_text()

    @property
    def auth(self) -> bool:
        return self.web is not None and "basic_auth_users" in self.web.read_text()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/metrics"


def scrape(url: str, tls: bool, auth: bool, timeout: float = SCRAPE_TIMEOUT, password: str = PASSWORD) -> tuple:
    headers = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()} if auth else {}
    context = client_context() if tls else None
    started = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout,
                                    context=context) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        status = type(exc).__name__
    return status, time.monotonic() - started


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Watch(threading.Thread):
    """Samples a process's resident memory and open descriptors every 0.1 s (the peaks)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.rss, self.fds = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                self.rss = max(self.rss, rss_bytes(self.pid))
            except OSError:
                return
            self.fds = max(self.fds, open_files(self.pid))


# -- the floods (in a child process) ------------------------------------------------------------


async def _flood(kind: str, port: int, tls: bool, clients: int, stop, sources: int) -> tuple[int, float]:
    """Runs `clients` copies of one flood until `stop` (a multiprocessing.Event) is set; returns how
    many connections it opened, and in how many seconds."""
    opened = 0
    started = time.monotonic()
    flooding = True

    async def watch() -> None:
        nonlocal flooding
        while not stop.is_set():
            await asyncio.sleep(0.1)
        flooding = False
    context = client_context() if tls else None
    wrong = 0

    async def connect(i: int, handshake: bool = False):
        nonlocal opened
        opened += 1
        source = (f"127.0.{1 + (i % sources) // 250}.{2 + (i % sources) % 250}", 0)
        return await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, local_addr=source, ssl=context if handshake else None), 10)

    async def one(i: int) -> None:
        nonlocal wrong
        writer = None
        while flooding:
            try:
                if kind in ("idle", "slow", "churn", "malformed"):
                    reader, writer = await connect(i)
                    if kind == "churn":
                        writer.transport.abort()
                        writer = None
                        continue
                    if kind == "malformed":
                        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
                    elif kind == "slow":
                        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    while flooding:
                        try:
                            if await asyncio.wait_for(reader.read(65536), 0.5) == b"":
                                break
                        except asyncio.TimeoutError:
                            if kind == "slow":
                                writer.write(b"x")
                    writer.close()
                elif kind == "handshakes":
                    reader, writer = await connect(i, handshake=True)
                    writer.transport.abort()
                else:  # logins: wrong passwords, kept alive while the server allows
                    reader, writer = await connect(i, handshake=tls)
                    while flooding:
                        wrong += 1
                        token = base64.b64encode(f"{USER}:guess-{wrong}".encode()).decode()
                        writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n\r\n"
                                     .encode())
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                       if line.lower().startswith(b"content-length:")), 0)
                        await reader.readexactly(length)
                        if b"connection: close" in head.lower():
                            break
                    writer.transport.abort()
                writer = None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
                if writer is not None:
                    writer.transport.abort()
                    writer = None
                await asyncio.sleep(0.01)

    await asyncio.gather(watch(), *(one(i) for i in range(clients)))
    return opened, time.monotonic() - started


def flood_process(kind: str, port: int, tls: bool, clients: int, stop, sources: int, out) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    out.put(asyncio.run(_flood(kind, port, tls, clients, stop, sources)))


# -- one measurement ----------------------------------------------------------------------------


def measure(name: str, web: Path | None, kind: str, clients: int, seconds: float, tmp: Path) -> dict:
    exporter = Exporter(name, web, tmp)
    exporter.start()
    exporter.ready()
    time.sleep(1.0)
    pid = exporter.proc.pid
    before = {"rss_mb": rss_bytes(pid) / 2**20, "fds": open_files(pid)}
    log_before = exporter.log.stat().st_size
    out = multiprocessing.Queue()
    sources = 64 if kind == "logins-64" else 1
    stop = multiprocessing.Event()
    flood = multiprocessing.Process(target=flood_process, args=(
        "logins" if kind in ("logins-64", "restart") else kind, exporter.port, exporter.tls, clients,
        stop, sources, out))
    flood.start()
    watch = Watch(pid)
    watch.start()
    time.sleep(min(2.0, seconds / 4))  # the flood builds up
    row: dict = {}
    if kind == "restart":
        row["sigterm_s"] = round(exporter.stop(), 2)
        watch.done.set()
        exporter.start()
        exporter.listening()
        pid = exporter.proc.pid
        watch = Watch(pid)
        watch.start()
    scrapes = []
    deadline = time.monotonic() + seconds - min(2.0, seconds / 4)
    while time.monotonic() < deadline:
        scrapes.append(scrape(exporter.url, exporter.tls, exporter.auth))
        time.sleep(SCRAPE_EVERY)
    if kind in ("logins", "logins-64") and exporter.auth:
        row["sigterm_s"] = round(exporter.stop(), 2)
    stop.set()
    flood.join(timeout=60)
    opened, flooding = out.get(timeout=5) if not out.empty() else (None, None)
    if exporter.proc.poll() is None:
        time.sleep(5)
        row["after"] = {"rss_mb": round(rss_bytes(pid) / 2**20, 1), "fds": open_files(pid)}
        exporter.stop()
    watch.done.set()
    answered = [took for status, took in scrapes if status == 200]
    statuses: dict = {}
    for status, _ in scrapes:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        **row,
        "answered": len(answered), "tried": len(scrapes), "statuses": statuses,
        "median_ms": round(statistics.median(answered) * 1000, 1) if answered else None,
        "slowest_ms": round(max(answered) * 1000, 1) if answered else None,
        "flood_connections_per_s": round(opened / flooding) if opened is not None else None,
        "before": {"rss_mb": round(before["rss_mb"], 1), "fds": before["fds"]},
        "peak": {"rss_mb": round(watch.rss / 2**20, 1), "fds": watch.fds},
        "log_bytes": exporter.log.stat().st_size - log_before,
    }


def run(seconds: float = 8.0, scale: float = 1.0, only: list[str] | None = None) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="stoker-floods-") as tmp:
        configs = write_configs(Path(tmp))
        for kind, web, clients in RUNS:
            if only and kind not in only and f"{kind}/{web}" not in only:
                continue
            n = max(1, round(clients * scale))
            row = {"flood": kind, "web": web, "clients": n}
            for name in ("stoker", "node_exporter"):
                row[name] = measure(name, configs[web], kind, n, seconds, Path(tmp))
                print(f"{kind}/{web} x{n} {name}: {row[name]['answered']}/{row[name]['tried']} "
                      f"median {row[name]['median_ms']} ms, peak {row[name]['peak']}", file=sys.stderr)
            rows.append(row)
    return {"seconds": seconds, "scrape_every_s": SCRAPE_EVERY, "scrape_timeout_s": SCRAPE_TIMEOUT, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=float, default=1.0, help="scale the number of flood clients")
    parser.add_argument("--only", nargs="*", help="floods to run (name or name/web, e.g. logins/auth)")
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("floods", run(args.seconds, args.clients, args.only), args.out)


if __name__ == "__main__":
    main()
