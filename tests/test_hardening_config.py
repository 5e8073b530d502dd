"""Configuration files that are not what they should be: out-of-range numbers, FIFOs, binary and
deeply nested files, bad token files, and SIGHUP reloads of all of them. Each is one line naming
the key or the file and exit status 2 at start; a refused reload with READY=1 after RELOADING=1."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing
import urllib.request

import pytest

from stoker import config
from tests.conftest import free_port, start_agent_process, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEEP_TOML = "a = " + "[" * 5000 + "]" * 5000 + "\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`stoker run`; the timeout is the proof that a FIFO is not waited on."""
    return subprocess.run([sys.executable, "-m", "stoker", "run", *args], capture_output=True, text=True,
                          timeout=30)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    return lines[0]


def numbers() -> list[tuple[str, type]]:
    """Every int and float setting, as `section.key`."""
    out = []
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        for key, annotation in typing.get_type_hints(cls).items():
            if annotation in (int, float):
                out.append((f"{section.name}.{key}", annotation))
    return out


@pytest.mark.parametrize("key, annotation", numbers())
def test_every_number_has_a_finite_range_named_in_the_error(key, annotation):
    """inf froze /metrics (interval = inf) and 5e-324 overflowed the scheduler: every number,
    including one added later, must refuse what TOML can write but no node can mean."""
    section, name = key.split(".")
    for value in ([float("inf"), float("nan"), -1.0, 1e300] if annotation is float else [10**30, -1]):
        with pytest.raises(config.ConfigError) as err:
            config.load(overrides={section: {name: value}})
        assert str(err.value).startswith(f"{key}: must be "), str(err.value)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "5e-324", "0.001", "3601"])
def test_an_interval_out_of_range_is_one_line_with_the_range_and_exit_2(tmp_path, value):
    path = tmp_path / "stoker.toml"
    path.write_text(f"[agent]\ninterval = {value}\n")
    line = one_line(run_cli("--config", str(path), "--simulate"))
    assert "agent.interval: must be between 0.05 and 3600 seconds" in line, line


def test_the_edges_of_a_range_are_accepted():
    cfg = config.load(overrides={"agent": {"interval": 0.05}, "gpu": {"slow_interval": 3600}})
    assert cfg.agent.interval == 0.05 and cfg.gpu.slow_interval == 3600.0


def test_an_integer_too_large_for_a_float_names_the_key(tmp_path):
    path = tmp_path / "stoker.toml"
    path.write_text("[agent]\ninterval = " + "9" * 400 + "\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith("agent.interval: out of range")


@pytest.mark.parametrize("kind", ["fifo", "directory", "binary", "deep", "huge", "dotted"])
def test_a_config_file_that_is_not_a_toml_text_file_is_one_line_naming_it(tmp_path, kind):
    """`dotted`: a key of 100,000 parts (200 KB) kept tomllib busy for minutes, quadratic in the parts
    (found by tests/test_fuzz.py on scenario files)."""
    path = tmp_path / "stoker.toml"
    if kind == "fifo":
        os.mkfifo(path)  # nobody ever writes to it: open() and read() would wait for ever
    elif kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"[agent]\ninterval = 1.0\n# \xff\xfe\x00 latin-1: caf\xe9\n")
    elif kind == "deep":
        path.write_text(DEEP_TOML)
    elif kind == "dotted":
        path.write_text("a" + ".a" * 100_000 + " = 1\n")
    else:
        path.write_text("#" * (2 << 20))
    line = one_line(run_cli("--config", str(path), "--simulate"))
    expected = {"fifo": "not a regular file", "directory": "not a regular file", "binary": "not UTF-8",
                "deep": "nested too deeply", "huge": "larger than 1 MiB",
                "dotted": "line 1: a key of more than 16 dotted parts"}[kind]
    assert str(path) in line and expected in line, line


@pytest.mark.parametrize("kind, expected", [
    ("fifo", "not a regular file"),
    ("binary", "not UTF-8"),
    ("short", "shorter than 16"),
    ("spaces", "printable ASCII"),
])
def test_a_bad_token_file_is_one_line_naming_it_and_exit_2(tmp_path, kind, expected):
    token = tmp_path / "hint-token"
    if kind == "fifo":
        os.mkfifo(token)  # reading it blocked the event loop, and SIGTERM with it
    else:
        token.write_bytes({"binary": b"\x89PNG\r\n\x1a\n\xff\xfe\xfd\xfc0123456789abcdef",
                           "short": b"0123456789\n",
                           "spaces": b"0123456789 abcdef 0123456789\n"}[kind])
    path = tmp_path / "stoker.toml"
    path.write_text(f'[checkpoint]\ntoken_file = "{token}"\n')
    line = one_line(run_cli("--config", str(path), "--simulate", "--listen", "127.0.0.1:0"))
    assert "checkpoint.token_file" in line and str(token) in line and expected in line, line


class Notifications:
    """The sd_notify socket systemd would listen on."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(15)
        self.received: list[str] = []

    def until_ready(self) -> list[str]:
        """The messages up to and including the next READY=1."""
        got = []
        while not got or "READY=1" not in got[-1]:
            got.append(self.sock.recv(4096).decode())
        self.received += got
        return got


@pytest.mark.slow
def test_every_failed_reload_is_refused_and_ready_follows_reloading(tmp_path):
    path = tmp_path / "stoker.toml"
    good = '[agent]\ninterval = 0.5\n'
    path.write_text(good)
    notify = Notifications(str(tmp_path / "notify"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    agent = start_agent_process("--simulate", "healthy", "--config", str(path), "--listen", f"127.0.0.1:{port}",
                                "--log-format", "json", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    bad = {
        "non-UTF-8": lambda: path.write_bytes(b"[agent]\ninterval = 0.5 # caf\xe9\n"),
        "nested": lambda: path.write_text(DEEP_TOML),
        "fifo": lambda: os.mkfifo(path),
        "infinite interval": lambda: path.write_text("[agent]\ninterval = inf\n"),
        "directory": lambda: path.mkdir(),
    }
    try:
        assert "READY=1" in notify.until_ready()[-1]
        wait_http(url)
        path.unlink()
        for name, write in bad.items():
            write()
            agent.send_signal(signal.SIGHUP)
            messages = notify.until_ready()
            assert messages[0].startswith("RELOADING=1") and messages[-1] == "READY=1", (name, messages)
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200, name
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        path.write_text('[agent]\ninterval = 0.25\n')
        agent.send_signal(signal.SIGHUP)
        notify.until_ready()
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = agent.log()
        assert log.count("configuration reload refused") == len(bad), log[-3000:]
        assert "configuration reloaded" in log
        assert "Exception in callback" not in log and "Traceback" not in log, log[-3000:]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
    finally:
        agent.kill()
        notify.sock.close()


def strings() -> list[str]:
    """Every string setting (paths, addresses, names), as `section.key`, lists of strings included."""
    out = []
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        for key, annotation in typing.get_type_hints(cls).items():
            if annotation is str or str in typing.get_args(annotation) or annotation == tuple[str, ...]:
                out.append(f"{section.name}.{key}")
    return out


@pytest.mark.parametrize("key", strings())
def test_a_nul_in_any_string_setting_is_refused_naming_the_key(key):
    """TOML strings may hold \\u0000; no path, address or name can. A NUL in `state_file` was accepted and
    then failed every save; one in `listen` ended in a traceback and exit status 1."""
    section, name = key.split(".")
    default = getattr(getattr(config.Config(), section), name)
    value = ["/mnt/da\0ta"] if isinstance(default, tuple) else "/var/lib/st\0ker"
    with pytest.raises(config.ConfigError) as err:
        config.load(overrides={section: {name: value}})
    assert str(err.value).startswith(key) and "NUL" in str(err.value), str(err.value)


@pytest.mark.parametrize("key, value", [
    ("listen", "127.0.0.\\u0000:9477"),
    ("listen", "a" * 64 + ":9477"),  # a DNS label of 64 characters: UnicodeError in the resolver
    ("listen", "caf\\u00e9..x:9477"),
    ("state_file", "/var/lib/stoker/st\\u0000te.json"),
])
def test_a_bad_listen_address_or_state_file_is_one_line_and_exit_2(tmp_path, key, value):
    path = tmp_path / "stoker.toml"
    path.write_text(f'[agent]\n{key} = "{value}"\n')
    line = one_line(run_cli("--config", str(path), "--simulate"))
    assert line.startswith(f"stoker: configuration error: agent.{key}: "), line


def test_every_listen_form_the_docs_show_still_parses():
    for value, expected in [("0.0.0.0:9477", ("0.0.0.0", 9477)), (":9477", ("0.0.0.0", 9477)),
                            ("[::1]:9478", ("::1", 9478)), ("[fe80::1%eth0]:0", ("fe80::1%eth0", 0)),
                            ("node-01.cluster.example.com:9477", ("node-01.cluster.example.com", 9477)),
                            ("localhost:9477", ("localhost", 9477))]:
        assert config.parse_listen(value) == expected


# -- files on a hung NFS mount (tests/hung_mount.py) ---------------------------------------------------

def hang(path) -> None:
    """From now on `path` reads as on a hung NFS mount, in an agent run through tests/hung_mount.py."""
    open(f"{path}.hung", "w").close()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["config", "web_config_file", "token_file"])
def test_a_file_that_does_not_answer_at_start_is_one_line_and_exit_75(tmp_path, which):
    """A configuration, web configuration or hint token file on a hung NFS mount blocked the start for
    good: the configuration file's read before the event loop, the other two on it, after asyncio took
    SIGTERM (measured on main with the token file: the agent still alive 5 s after SIGTERM, until
    SIGKILL). Each read is given up after config.READ_DEADLINE (shortened to 1 s here): one line naming
    the file, and exit status 75, not 2: nothing is wrong with the file, and systemd restarts the unit
    (Restart=on-failure) where RestartPreventExitStatus=2 would leave the node unwatched for good."""
    web, token = tmp_path / "web.yml", tmp_path / "hint-token"
    web.write_text("http_server_config:\n  headers: {}\n")
    token.write_text("0123456789abcdef-test-token\n")
    path = tmp_path / "stoker.toml"
    path.write_text(f'[agent]\nweb_config_file = "{web}"\n' if which == "web_config_file" else
                    f'[checkpoint]\ntoken_file = "{token}"\n' if which == "token_file" else "")
    hang({"config": path, "web_config_file": web, "token_file": token}[which])
    done = subprocess.run([sys.executable, "-m", "tests.hung_mount", "run", "--config", str(path), "--simulate",
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "STOKER_TEST_READ_DEADLINE": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 75 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    named = {"config": str(path), "web_config_file": f"agent.web_config_file: {web}",
             "token_file": f"checkpoint.token_file: {token}"}[which]
    assert named in lines[0] and "no answer within 1 s" in lines[0] and "exiting for a restart" in lines[0], lines


@pytest.mark.slow
def test_a_reload_whose_file_does_not_answer_keeps_the_loop_serving_and_sigterm_obeyed(tmp_path):
    """SIGHUP read the configuration file on the event loop: on a hung NFS mount that froze the agent,
    no scrape answered, no watchdog ping went out (systemd would kill it with SIGABRT after WatchdogSec)
    and SIGTERM was never heard. Now the read runs in a thread: while it hangs /metrics answers and the
    watchdog is pinged; after config.READ_DEADLINE the reload is refused, the running configuration
    stays and READY=1 follows; another SIGHUP while that read is still stuck is refused at once (one
    stuck thread, not one per signal); SIGTERM ends the agent, the read still stuck, with status 0."""
    path = tmp_path / "stoker.toml"
    path.write_text('[agent]\ninterval = 0.5\n')
    notify = Notifications(str(tmp_path / "notify"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    agent = start_agent_process("--simulate", "healthy", "--config", str(path), "--listen", f"127.0.0.1:{port}",
                                "--log-format", "json", module="tests.hung_mount",
                                env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000",
                                     "STOKER_TEST_READ_DEADLINE": "3"})
    try:
        assert "READY=1" in notify.until_ready()[-1]
        wait_http(url)
        hang(path)
        agent.send_signal(signal.SIGHUP)
        while (message := notify.sock.recv(4096).decode()) != "RELOADING=1":
            assert message == "WATCHDOG=1", message
        with urllib.request.urlopen(url, timeout=2) as resp:  # the read is hanging meanwhile
            assert resp.status == 200
        during = notify.until_ready()
        assert during[-1] == "READY=1" and during.count("WATCHDOG=1") >= 3, during
        agent.send_signal(signal.SIGHUP)
        again = notify.until_ready()
        assert again[0] == "RELOADING=1" and again[-1] == "READY=1", again
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
        refused = [json.loads(line) for line in agent.log().splitlines()
                   if "configuration reload refused" in line]
        assert [line["error"] for line in refused] == [
            f"{path}: no answer within 3 s (a hung network mount?)",
            f"{path}: still waiting for an earlier read of it to return"], refused
    finally:
        agent.kill()
        notify.sock.close()
